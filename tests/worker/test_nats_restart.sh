#!/usr/bin/env bash
# worker_nats_restart: nats-server is SIGKILLed under two workers that keep serving; one
# (--event-buffer-max 2) overflows its event buffer and must heal with AllBlocksCleared + its
# cache after the reconnect, the other (--resync-after-ms large, so the outage does not force a
# resync either) buffers and flushes. Afterwards, replaying each
# worker's events from the persisted JetStream stream into the indexer gives exactly its cache.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init worker_nats_restart
kvr_start_nats
PROBE="$KVR_BIN/kvr-worker-probe"
kvr_wait_for 15 "$PROBE" ensure-stream --nats "$NATS_URL" || kvr_fail "creating KVR_EVENTS" # (JetStream may need a moment)

pa=$(kvr_free_port)
pb=$(kvr_free_port)
while [ "$pb" = "$pa" ]; do pb=$(kvr_free_port); done
common=(--nats "$NATS_URL" --namespace nr --model sim --block-size 16 --capacity-blocks 40 --speedup 50)
kvr_spawn wa "$KVR_BIN/kvr-worker" --listen "127.0.0.1:$pa" --id 1 --event-buffer-max 2 "${common[@]}"
kvr_spawn wb "$KVR_BIN/kvr-worker" --listen "127.0.0.1:$pb" --id 2 --event-buffer-max 100000 --resync-after-ms 600000 "${common[@]}"
kvr_wait_http "http://127.0.0.1:$pa/health" 10
kvr_wait_http "http://127.0.0.1:$pb/health" 10

traffic() { # round
    local pids=() i body
    for i in 0 1 2 3 4 5; do
        body="{\"prompt\":$(jq -cn --argjson r "$1" --argjson i $i '[range(0;64) | . + 7000 * ($i % 3)] + [range(0; 20 + $i * 13) | . + 90000 + $r * 1000 + $i * 100]'),\"max_tokens\":$((6 + i * 3))}"
        curl -s --max-time 30 -o /dev/null "http://127.0.0.1:$pa/v1/completions" -d "$body" &
        pids+=($!)
        curl -s --max-time 30 -o /dev/null "http://127.0.0.1:$pb/v1/completions" -d "$body" &
        pids+=($!)
    done
    wait "${pids[@]}"
}
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n {print $2}'; }
idle() { curl -s "http://127.0.0.1:$1/debug/cache" | jq -e '.busy == false and .used_blocks == 0' >/dev/null; }

traffic 1
kvr_kill9 nats
sleep 1 # let both workers see the connection drop
traffic 2
traffic 3
kvr_assert_eq "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$pa/health")" 200 "serving without NATS"
[ "$(metric "$pa" kvr_worker_kv_event_batches_dropped_total)" -gt 0 ] || kvr_fail "worker A did not overflow its 2-payload buffer"
[ "$(metric "$pb" kvr_worker_kv_event_batches_buffered)" -gt 2 ] || kvr_fail "worker B buffered nothing"
kvr_assert_eq "$(metric "$pb" kvr_worker_kv_event_batches_dropped_total)" 0 "worker B dropped nothing"

kvr_start_nats nats # same port, same store
resynced() { [ "$(metric "$pa" kvr_worker_kv_resyncs_total)" -ge 1 ]; }
flushed() { [ "$(metric "$pb" kvr_worker_kv_event_batches_buffered)" = 0 ]; }
kvr_wait_for 30 resynced || kvr_fail "worker A did not resync after the reconnect"
kvr_wait_for 30 flushed || kvr_fail "worker B did not flush its buffer"
kvr_assert_eq "$(metric "$pb" kvr_worker_kv_resyncs_total)" 0 "worker B needed no resync"
traffic 4 # and life goes on
for p in $pa $pb; do kvr_wait_for 20 idle "$p" || kvr_fail "worker on $p not idle"; done

for w in 1 2; do
    port=$pa
    [ $w = 2 ] && port=$pb
    curl -s "http://127.0.0.1:$port/debug/cache" >"$KVR_TMP/cache$w.json"
    res=$("$PROBE" digest --nats "$NATS_URL" --subject "kvr.kv.nr.$w" --worker-id $w --block-size 16 --cache "$KVR_TMP/cache$w.json")
    rc=$?
    kvr_log "worker $w: $res"
    [ $rc = 0 ] || kvr_fail "worker $w: published state did not converge: $res"
done
# A's stream holds the resync's AllBlocksCleared. (The start-up one may be gone: SIGKILL loses
# what nats-server had not yet written out of its file store's buffer, and the kill comes a
# few hundred ms after start-up; the server log then says "Restored 0 messages".)
res1=$("$PROBE" digest --nats "$NATS_URL" --subject kvr.kv.nr.1 --worker-id 1 --block-size 16 --cache "$KVR_TMP/cache1.json")
jq -e '.clears >= 1' <<<"$res1" >/dev/null || kvr_fail "worker A: no AllBlocksCleared from the resync: $res1"
kvr_pass
