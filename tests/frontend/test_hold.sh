#!/bin/bash
# frontend_hold: requests held for a pool waking from zero (issue 16, item 3). A stand-in
# router (route_standin.py, speaking the NATS text protocol to a real nats-server, queue group
# kvr-routers) answers kvr.route "pool_state":"waking" until the test wakes the pool, then ok
# with a real kvr-worker's url. Real kvr-frontend and kvr-worker processes:
#   1. 20 concurrent streams (and one non-streaming request) for a pool with no worker are held:
#      SSE headers with x-kvroute-cold-start at once, keepalive comments, one probe kvr.route
#      per retry interval (not one per held request); the worker starts, the router says ok:
#      all complete, TTFT includes the wait, the gauge is back to 0.
#   2. --max-held 3 on a pool that never wakes: the 4th request gets 503 + Retry-After at once;
#      the 3 held ones get 503 + Retry-After "model m2 is starting; try again" at --wake-timeout,
#      nothing stays held.
#   2b. --max-held-bytes: past it, 503 at once.
#   3. A held stream whose client disconnects leaves the queue at once (client_gone counted).
#   4. A worker's first heartbeat makes a held request ask a router at once (not at the next
#      retry_after_ms).
#   5. SIGTERM: held requests get 503 (shutting_down) at once and the frontend exits.
source "$(dirname "$0")/../lib/testenv.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
kvr_test_init frontend_hold
kvr_need_bins kvr-worker kvr-frontend
PY=/usr/bin/python3
CL="$PY $HERE/hold_client.py"

kvr_start_nats
STATE=$KVR_TMP/pools.json
echo '{"retry_after_ms":200}' >"$STATE"
kvr_spawn standin $PY -u "$HERE/route_standin.py" 127.0.0.1 "${NATS_URL##*:}" "$STATE"
kvr_wait_for 10 grep -q "standin ready" "$KVR_TMP/standin.log" || kvr_fail "stand-in router not ready"

fa=$(kvr_free_port)
fb=$(kvr_free_port)
wport=$(kvr_free_port)
kvr_spawn fea "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fa --nats "$NATS_URL" --id 7 \
    --hold-keepalive 300ms
kvr_spawn feb "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fb --nats "$NATS_URL" --id 8 \
    --max-held 3 --wake-timeout 3s --hold-keepalive 300ms
FA=http://127.0.0.1:$fa
FB=http://127.0.0.1:$fb
kvr_wait_http "$FA/health" 10
kvr_wait_http "$FB/health" 10

metric() { curl -s "$1/metrics" | awk -v k="$2" '$1==k {print $2}'; }
held() { metric "$1" "kvr_frontend_held_requests{namespace=\"default\",model=\"$2\"}"; }
held_total() { metric "$1" "kvr_frontend_held_total{result=\"$2\"}"; }
held_is() { [ "$(held "$1" "$2")" = "$3" ]; }
probes() { jq -r --arg m "$1" '.[$m] // 0' "$STATE.counts"; }

# --- 1. 20 held streams, then the wake ---
sbody='{"model":"m1","prompt":"hello cold start","max_tokens":8,"stream":true}'
nbody='{"model":"m1","prompt":"hello cold start","max_tokens":8}'
t0=${EPOCHREALTIME/./}
$CL streams "$FA/v1/completions" "$sbody" 20 "$KVR_TMP/streams.json" &
cpid=$!
$CL one "$FA/v1/completions" "$nbody" >"$KVR_TMP/plain.json" &
ppid=$!
kvr_wait_for 10 held_is "$FA" m1 21 || kvr_fail "21 requests not held: held=$(held "$FA" m1)"
kvr_log "21 requests held"
sleep 0.7 # the stand-in writes its counts every 0.3 s
p0=$(probes m1)
sleep 2
p1=$(probes m1)
kvr_log "probes in 2 s with 21 held (retry_after 200 ms): $((p1 - p0))"
# one probe per 200 ms: ~10; one per held request would be ~200
(((p1 - p0) >= 3 && (p1 - p0) <= 20)) || kvr_fail "probes in 2 s: $((p1 - p0)), want 3..20"
kvr_assert_eq "$(held_total "$FA" served)" 0 "nothing served before the wake"

kvr_spawn worker1 "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$wport --nats "$NATS_URL" \
    --namespace default --model m1 --id 1 --speedup 50
kvr_wait_http "http://127.0.0.1:$wport/health" 10
printf '{"retry_after_ms":200,"m1":{"state":"ok","worker_id":1,"url":"http://127.0.0.1:%s"}}\n' \
    "$wport" >"$STATE"
t_wake=${EPOCHREALTIME/./}
for i in $(seq 100); do kill -0 $cpid 2>/dev/null || break; sleep 0.1; done
kill -0 $cpid 2>/dev/null && kvr_fail "held streams not completed 10 s after the wake"
wait $cpid || kvr_fail "stream client failed"
wait $ppid || kvr_fail "plain client failed"
waited_ms=$(((t_wake - t0) / 1000))
kvr_log "woke after ${waited_ms} ms; served in $(((${EPOCHREALTIME/./} - t_wake) / 1000)) ms"
S=$KVR_TMP/streams.json
kvr_assert_eq "$(jq '[.[] | select(.status==200)] | length' "$S")" 20 "streams answered 200"
kvr_assert_eq "$(jq '[.[] | select(.headers["x-kvroute-cold-start"]=="1")] | length' "$S")" 20 \
    "x-kvroute-cold-start on every stream"
kvr_assert_eq "$(jq '[.[] | select(.head_ms < 2000)] | length' "$S")" 20 \
    "stream headers sent at once, not after the wake"
kvr_assert_eq "$(jq '[.[] | select((.comments|length) >= 3 and
    (.comments | all(. == ": waiting for model m1 to start")))] | length' "$S")" 20 \
    "keepalive comments on every held stream"
kvr_assert_eq "$(jq '[.[] | select(.done and .events > 0 and (.text|length) > 0 and (.error == null))] | length' "$S")" 20 \
    "every stream completed with text and [DONE]"
# every stream was held 2.7 s at least (the sleeps above) before the wake
kvr_assert_eq "$(jq '[.[] | select(.ttft_ms >= 2700)] | length' "$S")" 20 "TTFT includes the wait"
P=$KVR_TMP/plain.json
kvr_assert_eq "$(jq -r .status "$P")" 200 "non-streaming held request"
kvr_assert_eq "$(jq -r '.headers["x-kvroute-cold-start"]' "$P")" 1 "x-kvroute-cold-start (non-streaming)"
jq -e '.json.choices[0].text | length > 0' "$P" >/dev/null || kvr_fail "non-streaming text: $(cat "$P")"
kvr_assert_eq "$(held "$FA" m1)" 0 "held gauge back to 0"
kvr_assert_eq "$(held_total "$FA" served)" 21 "held_total served"
# a request after the wake is not held
r=$($CL one "$FA/v1/completions" "$sbody")
kvr_assert_eq "$(echo "$r" | jq -r '.headers["x-kvroute-cold-start"] // "none"')" none "no cold-start header once awake"
kvr_assert_eq "$(echo "$r" | jq -r .done)" true "request after the wake"
kvr_log "1: 20 held streams + 1 plain request served after the wake"

# --- 2. --max-held 3, wake timeout 3 s (model m2 never wakes) ---
m2='{"model":"m2","prompt":"never","max_tokens":4}'
pids=()
for i in 1 2 3; do
    $CL one "$FB/v1/completions" "$m2" >"$KVR_TMP/to$i.json" &
    pids+=($!)
done
kvr_wait_for 10 held_is "$FB" m2 3 || kvr_fail "3 requests not held on FB: $(held "$FB" m2)"
r=$($CL one "$FB/v1/completions" "$m2")
kvr_assert_eq "$(echo "$r" | jq -r .status)" 503 "4th request past --max-held"
echo "$r" | jq -e '.elapsed_ms < 1000' >/dev/null || kvr_fail "the 4th 503 was not immediate: $r"
echo "$r" | jq -e '.headers["retry-after"] | tonumber >= 1' >/dev/null || kvr_fail "no Retry-After: $r"
echo "$r" | jq -e '.json.error.type == "service_unavailable"' >/dev/null || kvr_fail "not an OpenAI error: $r"
kvr_assert_eq "$(held_total "$FB" rejected_full)" 1 "rejected_full counted"
for p in "${pids[@]}"; do wait "$p" || kvr_fail "held client failed"; done
for i in 1 2 3; do
    f=$KVR_TMP/to$i.json
    kvr_assert_eq "$(jq -r .status "$f")" 503 "held request $i past --wake-timeout"
    jq -e '.elapsed_ms >= 2900 and .elapsed_ms < 4500' "$f" >/dev/null ||
        kvr_fail "held request $i: 503 not at the 3 s wake timeout: $(cat "$f")"
    jq -e '.headers["retry-after"] | tonumber >= 1' "$f" >/dev/null || kvr_fail "no Retry-After: $(cat "$f")"
    kvr_assert_eq "$(jq -r .json.error.message "$f")" "model m2 is starting; try again" "timeout message"
    kvr_assert_eq "$(jq -r '.headers["x-kvroute-cold-start"]' "$f")" 1 "cold-start header on the timeout"
done
kvr_assert_eq "$(held "$FB" m2)" 0 "nothing held after the wake timeout"
kvr_assert_eq "$(held_total "$FB" timeout)" 3 "held_total timeout"
kvr_log "2: --max-held 503 at once; 3 held → 503 at the wake timeout, gauge 0"

# --- 2b. --max-held-bytes: a frontend whose pools may hold 4 KiB of bodies ---
fc=$(kvr_free_port)
kvr_spawn fec "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fc --nats "$NATS_URL" --id 9 \
    --max-held-bytes 4KiB --wake-timeout 2s
FC=http://127.0.0.1:$fc
kvr_wait_http "$FC/health" 10
big=$(jq -nc --arg p "$(printf 'x%.0s' $(seq 600))" '{model:"m2",prompt:$p,max_tokens:4}')
$CL one "$FC/v1/completions" "$big" >"$KVR_TMP/big1.json" &
bpid=$!
kvr_wait_for 10 held_is "$FC" m2 1 || kvr_fail "first big request not held"
r=$($CL one "$FC/v1/completions" "$big")
kvr_assert_eq "$(echo "$r" | jq -r .status)" 503 "request past --max-held-bytes"
echo "$r" | jq -e '.elapsed_ms < 1000 and (.headers["retry-after"] | tonumber >= 1)' >/dev/null ||
    kvr_fail "past --max-held-bytes: not an immediate 503 with Retry-After: $r"
kvr_assert_eq "$(held_total "$FC" rejected_full)" 1 "rejected_full (bytes)"
wait $bpid
kvr_assert_eq "$(jq -r .status "$KVR_TMP/big1.json")" 503 "the held big request at its wake timeout"
kvr_assert_eq "$(held "$FC" m2)" 0 "nothing held on FC"
kvr_log "2b: --max-held-bytes 503 at once"

# --- 3. a held client that disconnects ---
r=$($CL disconnect "$FB/v1/completions" '{"model":"m2","prompt":"bye","max_tokens":4,"stream":true}')
kvr_assert_eq "$(echo "$r" | jq -r .status)" 200 "held stream started"
kvr_wait_for 2 held_is "$FB" m2 0 || kvr_fail "disconnected client still held: $(held "$FB" m2)"
kvr_assert_eq "$(held_total "$FB" client_gone)" 1 "client_gone counted"
kvr_assert_eq "$(held_total "$FB" timeout)" 3 "not counted as a timeout"
kvr_log "3: a disconnected held client left the queue at once"

# --- 4. a worker's heartbeat makes the held requests ask at once ---
# m3's router asks for retries every 2 s (the frontend's upper bound) and already says ok: a
# worker of m3 that starts right after a probe must have its request served long before the
# next timed probe, because its first heartbeat makes the pool's probe ask now.
w2port=$(kvr_free_port)
printf '{"retry_after_ms":200,"m1":{"state":"ok","worker_id":1,"url":"http://127.0.0.1:%s"},"m3":{"state":"waking","retry_after_ms":2000,"log":true}}\n' \
    "$wport" >"$STATE"
$CL one "$FA/v1/completions" '{"model":"m3","prompt":"hb","max_tokens":4,"stream":true}' \
    >"$KVR_TMP/hb.json" &
hpid=$!
kvr_wait_for 10 held_is "$FA" m3 1 || kvr_fail "m3 request not held"
nprobes() { grep -c '^route m3 ' "$KVR_TMP/standin.log"; }
n0=$(nprobes)
next_probe() { [ "$(nprobes)" -gt "$n0" ]; }
kvr_wait_for 5 next_probe || kvr_fail "no timed probe for m3"
printf '{"retry_after_ms":200,"m1":{"state":"ok","worker_id":1,"url":"http://127.0.0.1:%s"},"m3":{"state":"ok","worker_id":2,"url":"http://127.0.0.1:%s","log":true}}\n' \
    "$wport" "$w2port" >"$STATE"
kvr_spawn worker2 "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$w2port --nats "$NATS_URL" \
    --namespace default --model m3 --id 2 --speedup 50
wait $hpid || kvr_fail "m3 client failed"
kvr_assert_eq "$(jq -r .done "$KVR_TMP/hb.json")" true "m3 stream completed"
kvr_assert_eq "$(held "$FA" m3)" 0 "m3 gauge back to 0"
# times in ms since the epoch: the last timed probe (stand-in), the worker ready (its
# "listening" line), the held request sent to it (the frontend's "pool woke" line)
ts_ms() { date -d "$(sed -n 's/^ts=\([^ ]*\) .*/\1/p' | head -1)" +%s%3N; }
t_last=$(grep '^route m3 ' "$KVR_TMP/standin.log" | sed -n "${n0},\$p" | tail -n +2 | head -1 |
    awk '{printf "%.0f", $3 * 1000}')
t_ready=$(grep 'msg="listening"' "$KVR_TMP/worker2.log" | ts_ms)
t_sent=$(grep 'pool woke' "$KVR_TMP/fea.log" | grep 'model=m3' | ts_ms)
kvr_log "4: timed probe → worker ready $((t_ready - t_last)) ms → held request sent to it $((t_sent - t_ready)) ms (timed probes every 2000 ms; load $(cut -d' ' -f1 /proc/loadavg))"
if ((t_ready - t_last > 1500)); then
    kvr_log "4: the worker took too long to start for the check to tell a heartbeat from a timed probe: inconclusive"
else
    ((t_sent - t_last < 1900 && t_sent - t_ready < 500)) ||
        kvr_fail "m3 sent $((t_sent - t_ready)) ms after its worker was ready: the heartbeat did not make it ask"
fi

# --- 5. SIGTERM: held requests get 503 at once (nothing to drain), the frontend exits ---
$CL one "$FB/v1/completions" "$m2" >"$KVR_TMP/term1.json" &
t1=$!
$CL one "$FB/v1/completions" '{"model":"m2","prompt":"s","max_tokens":4,"stream":true}' >"$KVR_TMP/term2.json" &
t2=$!
kvr_wait_for 10 held_is "$FB" m2 2 || kvr_fail "2 requests not held on FB before SIGTERM"
t_term=${EPOCHREALTIME/./}
kvr_term feb 5 || kvr_fail "frontend B did not exit cleanly on SIGTERM with held requests"
wait $t1 $t2
kvr_log "5: SIGTERM with 2 held: exited after $(((${EPOCHREALTIME/./} - t_term) / 1000)) ms"
kvr_assert_eq "$(jq -r .status "$KVR_TMP/term1.json")" 503 "held request at SIGTERM"
kvr_assert_eq "$(jq -r .json.error.code "$KVR_TMP/term1.json")" shutting_down "its error code"
kvr_assert_eq "$(jq -r .error.code "$KVR_TMP/term2.json")" shutting_down "held stream at SIGTERM: error event"
kvr_assert_eq "$(jq -r .done "$KVR_TMP/term2.json")" true "held stream at SIGTERM: [DONE]"

kvr_alive fea || kvr_fail "frontend A died"
kvr_alive fec || kvr_fail "frontend C died"
# clean exits (an ASan build reports leaks here)
kvr_term fea 10 || kvr_fail "frontend A did not exit cleanly"
kvr_term fec 10 || kvr_fail "frontend C did not exit cleanly"
kvr_pass
