#!/bin/bash
# frontend_prefix_hits (issue 14 item 5): the frontend compares the overlap the router predicted
# with the cached tokens the worker reports (usage.prompt_tokens_details.cached_tokens) and says
# why a hit was missed. Real nats-server, one kvr-routerd, two kvr-workers.
#  1. a repeated prompt: predicted and cached agree (within the one block an engine must
#     compute), nothing counted as missed, and the client's usage carries cached_tokens;
#  2. concurrent requests of that prompt load its worker until the router sends some
#     elsewhere: those count as other_worker_had_more (at most one per request moved).
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/../routerd/rd_lib.sh"
kvr_test_init frontend_prefix_hits
kvr_need_bins kvr-worker kvr-frontend kvr-routerd
kvr_start_nats
declare -A WPORT
for i in 1 2; do
    WPORT[$i]=$(kvr_free_port)
    kvr_spawn "worker$i" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:${WPORT[$i]} --nats "$NATS_URL" \
        --namespace default --model m1 --id "$i" --speedup 50 --block-size 16
done
RP=$(kvr_free_port)
mkdir -p "$KVR_TMP/r1"
rd_start r1 1 "$RP" "$KVR_TMP/r1" --block-size 16
fport=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fport --nats "$NATS_URL" --id 5 \
    --router-mode kv --route-timeout 500ms
F=http://127.0.0.1:$fport
kvr_wait_http "$F/health" 10
kvr_wait_http "http://127.0.0.1:$RP/health" 15
rd_wait_workers_up "$RP" 2 20 || kvr_fail "router never saw both workers"
fworkers() { curl -s "$F/metrics" | awk '/^kvr_frontend_live_workers / {exit !($2==2)}'; }
kvr_wait_for 10 fworkers || kvr_fail "frontend never saw both workers"
fmetric() { curl -s --max-time 2 "$F/metrics" | awk -v k="$1" '$1==k {s+=$2} END {printf "%d\n", s}'; }
served() { curl -s --max-time 2 "http://127.0.0.1:${WPORT[$1]}/metrics" | awk '$1=="kvr_worker_requests_total" {printf "%d", $2}'; }

P=$(jq -cn '[range(0;160) | . + 3000]') # 10 blocks of 16
ask() { curl -s --max-time 20 -d "{\"model\":\"m1\",\"prompt\":$P,\"max_tokens\":2}" "$F/v1/completions"; }
r=$(ask)
kvr_assert_eq "$(jq -r .usage.completion_tokens <<<"$r")" 2 "first request ($r)"
match() { rd_post "$RP" /v1/match --data "{\"model\":\"m1\",\"token_ids\":$P}" | jq -c .overlaps; }
indexed() { [ "$(match | jq '[.[]] | max // 0')" -ge 10 ]; }
kvr_wait_for 10 indexed || kvr_fail "the router never indexed the prompt: $(match)"
W=$(match | jq -r 'to_entries | max_by(.value) | .key')
O=$((3 - W))
kvr_log "prompt cached on worker $W"

# 1. warm repeat
r=$(ask)
kvr_assert_eq "$(jq -r .usage.prompt_tokens_details.cached_tokens <<<"$r")" 144 "cached tokens in usage ($r)"
pred=$(fmetric kvr_frontend_prefix_predicted_tokens_total)
got=$(fmetric kvr_frontend_prefix_cached_tokens_total)
kvr_log "predicted $pred, cached $got"
[ "$pred" -ge 144 ] && [ "$pred" -le $((got + 16)) ] || kvr_fail "predicted $pred vs cached $got"
kvr_assert_eq "$(fmetric 'kvr_frontend_prefix_misses_total{kind="index_stale"}')" 0 "stale misses"
kvr_assert_eq "$(fmetric 'kvr_frontend_prefix_misses_total{kind="other_worker_had_more"}')" 0 "other misses"

# 2. many requests of the prompt at once: as bookings load W, the router sends some to O,
# which did not hold the prefix when they were routed (it may learn it from the first one)
s0=$(served "$O")
pids=()
for i in $(seq 1 12); do
    curl -s --max-time 30 -o /dev/null -d "{\"model\":\"m1\",\"prompt\":$P,\"max_tokens\":200}" \
        "$F/v1/completions" &
    pids+=($!)
done
wait "${pids[@]}"
moved=$(($(served "$O") - s0))
other=$(fmetric 'kvr_frontend_prefix_misses_total{kind="other_worker_had_more"}')
kvr_log "of 12 concurrent requests, $moved went to worker $O; other_worker_had_more=$other"
[ "$moved" -ge 1 ] || kvr_fail "no request went to the less loaded worker"
[ "$other" -ge 1 ] && [ "$other" -le "$moved" ] || kvr_fail "other_worker_had_more $other, moved $moved"
kvr_assert_eq "$(fmetric 'kvr_frontend_prefix_misses_total{kind="index_stale"}')" 0 "stale misses"
kvr_pass
