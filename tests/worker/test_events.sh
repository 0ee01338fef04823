#!/usr/bin/env bash
# worker_events: KV events and heartbeats on a real nats-server. Two workers (array/int and
# map/bytes wire forms) serve overlapping prompts on small caches, so blocks are stored,
# shared and evicted; replaying each worker's subject from the JetStream stream KVR_EVENTS into
# the project's indexer (kvr-worker-probe digest) must give exactly the worker's cache.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init worker_events
kvr_start_nats
PROBE="$KVR_BIN/kvr-worker-probe"
kvr_wait_for 15 "$PROBE" ensure-stream --nats "$NATS_URL" || kvr_fail "creating KVR_EVENTS" # (JetStream may need a moment)

start_worker() { # name id port extra...
    local name=$1 id=$2 port=$3
    shift 3
    kvr_spawn "$name" "$KVR_BIN/kvr-worker" --listen "127.0.0.1:$port" --nats "$NATS_URL" \
        --namespace ev --model sim --id "$id" --block-size 16 --capacity-blocks 48 --speedup 50 "$@"
    kvr_wait_http "http://127.0.0.1:$port/health" 10
}
p1=$(kvr_free_port)
p2=$(kvr_free_port)
while [ "$p2" = "$p1" ]; do p2=$(kvr_free_port); done
start_worker w1 1 "$p1" --event-format array --hash-format int
start_worker w2 2 "$p2" --event-format map --hash-format bytes --mdc-sum tok1:00000000000000aa --lora A

# heartbeat (DESIGN 4)
hb=$("$PROBE" heartbeat --nats "$NATS_URL" --subject kvr.workers.ev.2) || kvr_fail "no heartbeat"
kvr_assert_eq "$(jq -c '[.id,.namespace,.model,.role,.url,.block_size,.capacity_blocks,.active,.waiting,.used_blocks]' <<<"$hb")" \
    "[2,\"ev\",\"sim\",\"both\",\"http://127.0.0.1:$p2\",16,48,0,0,0]" "heartbeat fields"
jq -e '.started_ms > 1700000000000 and .mdc_sum == "tok1:00000000000000aa" and .loras == ["A"]' <<<"$hb" >/dev/null || kvr_fail "heartbeat started_ms/mdc_sum: $hb"

# traffic: 4 prefix families x varied tails, 8 at a time, on both workers
gen_prompt() { # family i -> token ids: 96 shared + 24..120 own
    jq -cn --argjson f "$1" --argjson i "$2" '[range(0;96) | . + 1000 * ($f + 1)] + [range(0; 24 + ($i * 37) % 97) | . + 50000 + $i * 211]'
}
for round in 0 1 2 3; do
    pids=()
    for i in 0 1 2 3 4 5 6 7; do
        n=$((round * 8 + i))
        body="{\"prompt\":$(gen_prompt $((n % 4)) $n),\"max_tokens\":$((5 + n % 23))}"
        curl -s --max-time 30 -o /dev/null "http://127.0.0.1:$p1/v1/completions" -d "$body" &
        pids+=($!)
        curl -s --max-time 30 -o /dev/null "http://127.0.0.1:$p2/v1/completions" -d "$body" &
        pids+=($!)
    done
    wait "${pids[@]}" # (a bare wait would wait for the spawned servers too)
done

idle() { curl -s "http://127.0.0.1:$1/debug/cache" | jq -e '.busy == false and .used_blocks == 0' >/dev/null; }
for p in $p1 $p2; do kvr_wait_for 20 idle "$p" || kvr_fail "worker on $p not idle"; done

for w in 1 2; do
    port=$p1
    [ $w = 2 ] && port=$p2
    curl -s "http://127.0.0.1:$port/debug/cache" >"$KVR_TMP/cache$w.json"
    res=$("$PROBE" digest --nats "$NATS_URL" --subject "kvr.kv.ev.$w" --worker-id $w --block-size 16 --cache "$KVR_TMP/cache$w.json")
    rc=$?
    kvr_log "worker $w: $res"
    [ $rc = 0 ] || kvr_fail "worker $w: index rebuilt from events differs from the cache: $res"
    jq -e '.removes > 0 and .stores > 0 and .clears >= 1 and .cache_blocks > 20 and .dropped_unknown_parent == 0' <<<"$res" >/dev/null ||
        kvr_fail "worker $w: expected stores, evictions and the start-up clear: $res"
done
m=$(curl -s "http://127.0.0.1:$p1/metrics")
[ "$(awk '$1 == "kvr_worker_kv_blocks_removed_total" {print $2}' <<<"$m")" -gt 0 ] || kvr_fail "no evictions counted"
kvr_pass
