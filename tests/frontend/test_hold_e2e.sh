#!/bin/bash
# frontend_hold_e2e: scale-to-zero end to end (issue 16) with real processes: nats-server, one
# kvr-routerd with --pools-file and the local exec scaler (scripts/kvr-local-scaler, which
# starts real kvr-worker processes after a 2 s "model load"), and kvr-frontend.
#   - the pool has no worker and sleeps; 20 concurrent streams arrive: the router wakes the pool
#     and answers "waking", the frontend holds them (SSE headers with x-kvroute-cold-start and
#     keepalive comments at once), the scaler starts a worker, and all 20 complete; their TTFT
#     includes the wake;
#   - idle: the router stops the worker and the pool sleeps again; the next request wakes it
#     again and is served.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/../routerd/rd_lib.sh"
source "$(dirname "$0")/../lib/local_scaler.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
kvr_test_init frontend_hold_e2e
kvr_need_bins kvr-worker kvr-frontend kvr-routerd
PY=/usr/bin/python3
CL="$PY $HERE/hold_client.py"
kvr_start_nats
cat >"$KVR_TMP/pools.json" <<'JSON'
{"pools": [{"namespace": "default", "model": "m1", "target": "m1-workers"}]}
JSON
kvr_local_scaler_env 2
RP=$(kvr_free_port)
rd_start r1 1 "$RP" "$KVR_TMP/r1" --pools-file "$KVR_TMP/pools.json" \
    --scaler "exec:$SRC/scripts/kvr-local-scaler" --idle-after 4s --wake-timeout 20s \
    --scaler-timeout 20s
kvr_wait_http "http://127.0.0.1:$RP/ready" 20
pool_state() { rd_q "$RP" '.pools[] | select(.model == "m1") | .state'; }
pool_is() { [ "$(pool_state)" = "$1" ]; }
kvr_wait_for 10 pool_is sleeping || kvr_fail "pool m1 not sleeping: $(rd_q "$RP" .pools)"
fp=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fp --nats "$NATS_URL" --id 7 \
    --hold-keepalive 500ms
F=http://127.0.0.1:$fp
kvr_wait_http "$F/health" 10
metric() { curl -s "$F/metrics" | awk -v k="$1" '$1==k {print $2}'; }

# --- 20 streams at zero workers ---
sbody='{"model":"m1","prompt":"a cold start","max_tokens":8,"stream":true}'
t0=${EPOCHREALTIME/./}
$CL streams "$F/v1/completions" "$sbody" 20 "$KVR_TMP/streams.json" &
cpid=$!
for i in $(seq 300); do kill -0 $cpid 2>/dev/null || break; sleep 0.1; done
kill -0 $cpid 2>/dev/null && kvr_fail "20 streams not done 30 s after they were sent"
wait $cpid || kvr_fail "stream client failed"
kvr_log "20 streams done $(((${EPOCHREALTIME/./} - t0) / 1000)) ms after they were sent"
S=$KVR_TMP/streams.json
kvr_assert_eq "$(jq '[.[] | select(.status==200 and .done and .events > 0 and .error == null)] | length' "$S")" 20 \
    "streams completed"
kvr_assert_eq "$(jq '[.[] | select(.headers["x-kvroute-cold-start"]=="1")] | length' "$S")" 20 "cold-start header"
kvr_assert_eq "$(jq '[.[] | select((.comments|length) >= 2)] | length' "$S")" 20 "keepalive comments"
# the scaler's "model load" takes 2 s: every TTFT includes it
kvr_assert_eq "$(jq '[.[] | select(.ttft_ms >= 2000)] | length' "$S")" 20 "TTFT includes the wake"
kvr_log "TTFT ms: min $(jq '[.[].ttft_ms] | min | floor' "$S") max $(jq '[.[].ttft_ms] | max | floor' "$S")"
# worker ready (its "listening" line) → the held requests sent to it (the frontend's line)
ts_ms() { date -d "$(sed -n 's/^ts=\([^ ]*\) .*/\1/p' | head -1)" +%s%3N; }
t_ready=$(cat "$KVR_SCALER_DIR"/pool-*/*.log | grep 'msg="listening"' | ts_ms)
t_sent=$(grep 'pool woke' "$KVR_TMP/fe.log" | ts_ms)
kvr_log "worker ready → held requests sent to it: $((t_sent - t_ready)) ms (load $(cut -d' ' -f1 /proc/loadavg))"
kvr_assert_eq "$(workers_running)" 1 "workers after the wake"
kvr_assert_eq "$(metric 'kvr_frontend_held_total{result="served"}')" 20 "held_total served"
kvr_assert_eq "$(metric 'kvr_frontend_held_requests{namespace="default",model="m1"}')" 0 "held gauge"

# --- idle: asleep, no worker left; the next request wakes it again ---
kvr_wait_for 30 pool_is sleeping || kvr_fail "idle pool did not sleep: $(rd_q "$RP" .pools)"
kvr_wait_for 15 bash -c "[ \"\$(ls $KVR_SCALER_DIR/pool-*/*.pid 2>/dev/null | wc -l)\" = 0 ]" ||
    kvr_fail "worker not stopped: $(cat "$KVR_SCALER_DIR/calls.log")"
kvr_log "idle: pool sleeping, no worker left"
# the official OpenAI Node client (openai@4) through a cold start, when FE_NODE_DIR has it
# (test_openai_node.sh installs it): 5 concurrent streams from a sleeping pool
if [ -n "${FE_NODE_DIR:-}" ] && [ -d "$FE_NODE_DIR/node_modules/openai" ] && command -v node >/dev/null; then
    pids=()
    for i in 1 2 3 4 5; do
        (cd "$HERE" && NODE_PATH="$FE_NODE_DIR/node_modules" BASE="$F/v1" KEY=none MODEL=m1 \
            MAX_TOKENS=6 timeout 60 node "$HERE/openai_stream.js" >"$KVR_TMP/node$i.json") &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || kvr_fail "OpenAI node client failed through a cold start"; done
    for i in 1 2 3 4 5; do
        jq -e '.chunks > 0 and .usage.completion_tokens == 6' "$KVR_TMP/node$i.json" >/dev/null ||
            kvr_fail "node client $i: $(cat "$KVR_TMP/node$i.json")"
    done
    kvr_log "5 OpenAI node clients served through a cold start"
    kvr_wait_for 30 pool_is sleeping || kvr_fail "idle pool did not sleep again"
else
    kvr_log "FE_NODE_DIR without openai@4: the OpenAI node client step is skipped"
fi
r=$($CL one "$F/v1/completions" '{"model":"m1","prompt":"again","max_tokens":4}')
kvr_assert_eq "$(echo "$r" | jq -r .status)" 200 "a request after the sleep"
kvr_assert_eq "$(echo "$r" | jq -r '.headers["x-kvroute-cold-start"]')" 1 "it waited"
kvr_log "woken again: served in $(echo "$r" | jq '.elapsed_ms | floor') ms"
kvr_pass
