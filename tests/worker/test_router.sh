#!/usr/bin/env bash
# worker_router: a real kvr-routerd consumes a real kvr-worker's KV events through JetStream;
# its index (digest of worker x seq hash, /v1/state) must equal the worker's cache, after
# traffic with evictions and again after nats-server is SIGKILLed and restarted under both.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init worker_router
kvr_need_bins kvr-routerd
kvr_start_nats
PROBE="$KVR_BIN/kvr-worker-probe"
rport=$(kvr_free_port)
wport=$(kvr_free_port)
while [ "$wport" = "$rport" ]; do wport=$(kvr_free_port); done
R="http://127.0.0.1:$rport"
W="http://127.0.0.1:$wport"
mkdir -p "$KVR_TMP/r1"
(umask 077 && echo "worker-router-test-token" >"$KVR_TMP/admin-token")
kvr_spawn router "$KVR_BIN/kvr-routerd" --id 1 --nats "$NATS_URL" --http "127.0.0.1:$rport" \
    --data-dir "$KVR_TMP/r1" --namespace rt --block-size 16 --log-level info \
    --admin-token-file "$KVR_TMP/admin-token"
kvr_wait_http "$R/ready" 20
kvr_spawn worker "$KVR_BIN/kvr-worker" --listen "127.0.0.1:$wport" --nats "$NATS_URL" --namespace rt \
    --model sim --id 9 --block-size 16 --capacity-blocks 40 --speedup 50 --event-buffer-max 1000
kvr_wait_http "$W/health" 10

traffic() { # round
    local pids=() i body
    for i in 0 1 2 3 4 5; do
        body="{\"prompt\":$(jq -cn --argjson r "$1" --argjson i $i '[range(0;64) | . + 7000 * ($i % 3)] + [range(0; 20 + $i * 13) | . + 90000 + $r * 1000 + $i * 100]'),\"max_tokens\":$((6 + i * 3))}"
        curl -s --max-time 30 -o /dev/null "$W/v1/completions" -d "$body" &
        pids+=($!)
    done
    wait "${pids[@]}"
}
idle() { curl -s "$W/debug/cache" | jq -e '.busy == false and .used_blocks == 0' >/dev/null; }
same_digest() {
    curl -s "$W/debug/cache" >"$KVR_TMP/cache.json"
    want=$("$PROBE" cache-digest --cache "$KVR_TMP/cache.json" --worker-id 9)
    got=$(curl -s --max-time 2 "$R/v1/state" | jq -r .index.digest)
    [ "$got" = "$want" ]
}

traffic 1
traffic 2
kvr_wait_for 20 idle || kvr_fail "worker not idle"
kvr_wait_for 20 same_digest || kvr_fail "router index != worker cache after traffic (router $got, cache $want)"
[ "$(jq '.seq_hashes | length' "$KVR_TMP/cache.json")" -gt 20 ] || kvr_fail "cache too small to mean anything"
[ "$(curl -s "$W/metrics" | awk '$1 == "kvr_worker_kv_blocks_removed_total" {print $2}')" -gt 0 ] || kvr_fail "no evictions"
# a served prompt matches on the worker
body=$(jq -cn '{token_ids: ([range(0;64) | . + 7000] + [range(0;20) | . + 92000])}')
ov=$(curl -s -H "Authorization: Bearer worker-router-test-token" "$R/v1/match" -d "$body" |
    jq -r '.overlaps["9"] // 0')
[ "$ov" -ge 4 ] || kvr_fail "router /v1/match overlap for the worker is $ov, want >= 4"

# nats-server dies under both; the worker keeps serving; it comes back on the same port/store
kvr_kill9 nats
sleep 1
traffic 3
sleep 2
kvr_start_nats nats
resynced() { [ "$(curl -s "$W/metrics" | awk '$1 == "kvr_worker_kv_resyncs_total" {print $2}')" -ge 1 ]; }
kvr_wait_for 30 resynced || kvr_fail "worker did not resync after a 3 s outage"
traffic 4
kvr_wait_for 20 idle || kvr_fail "worker not idle"
kvr_wait_for 40 same_digest || kvr_fail "router index != worker cache after the NATS restart (router $got, cache $want)"
kvr_log "converged: digest $want"
kvr_pass
