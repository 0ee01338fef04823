#!/bin/bash
# frontend_router_failover: kv mode with real kvr-routerd processes.
#  1. requests are routed by a router (kvr.route), no fallback;
#  2. a client that disconnects mid-stream frees its booking (router /v1/state bookings → 0)
#     and cancels the worker's request;
#  3. SIGKILL the router that routed a live stream → the stream completes intact (same text as
#     the worker's deterministic output);
#  4. kill all routers → new requests are still served (local fallback), counted in /metrics.
source "$(dirname "$0")/../lib/testenv.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
kvr_test_init frontend_router_failover
kvr_need_bins kvr-worker kvr-frontend kvr-routerd
PY=/usr/bin/python3
kvr_start_nats
declare -A WPORT RPORT
for i in 1 2; do
    WPORT[$i]=$(kvr_free_port)
    kvr_spawn "worker$i" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:${WPORT[$i]} --nats "$NATS_URL" \
        --namespace default --model m1 --id "$i" --speedup 10
done
start_router() {
    RPORT[$1]=$(kvr_free_port)
    mkdir -p "$KVR_TMP/r$1"
    kvr_spawn "router$1" "$KVR_BIN/kvr-routerd" --id "$1" --nats "$NATS_URL" \
        --http 127.0.0.1:${RPORT[$1]} --data-dir "$KVR_TMP/r$1"
}
start_router 1
fport=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fport --nats "$NATS_URL" --id 5 \
    --router-mode kv --route-timeout 200ms --route-tries 2 --log-level debug
F=http://127.0.0.1:$fport
kvr_wait_http "$F/health" 10
kvr_wait_http "http://127.0.0.1:${RPORT[1]}/health" 15
rworkers() { curl -s --max-time 2 "http://127.0.0.1:${RPORT[$1]}/v1/state" | jq -e '[.workers[] | select(.up)] | length == 2' >/dev/null; }
kvr_wait_for 15 rworkers 1 || kvr_fail "router 1 never saw both workers"
fworkers() { curl -s "$F/metrics" | awk '/^kvr_frontend_live_workers / {exit !($2==2)}'; }
kvr_wait_for 10 fworkers || kvr_fail "frontend never saw both workers"
fmetric() { curl -s "$F/metrics" | awk -v k="$1" '$1==k {s+=$2} END {printf "%d\n", s}'; }
bookings() { curl -s --max-time 2 "http://127.0.0.1:${RPORT[$1]}/v1/state" | jq -r .bookings; }

# 1. routed by the router
for i in 1 2 3; do
    r=$(curl -s -d '{"model":"m1","prompt":"route me please","max_tokens":4}' "$F/v1/completions")
    kvr_assert_eq "$(echo "$r" | jq -r .usage.completion_tokens)" 4 "routed request $i"
done
routed=$(( $(fmetric 'kvr_frontend_routed_total{mode="raft"}') + $(fmetric 'kvr_frontend_routed_total{mode="local"}') ))
kvr_assert_eq "$routed" 3 "requests routed by a router"
kvr_assert_eq "$(curl -s "$F/metrics" | awk '/^kvr_frontend_route_fallback_total/ {s+=$2} END {printf "%d", s}')" 0 "no fallback yet"
zero_bookings() { [ "$(bookings 1)" = 0 ]; }
zero_bookings_of() { [ "$(bookings "$1")" = 0 ]; }
kvr_wait_for 10 zero_bookings || kvr_fail "bookings not freed after finished requests: $(bookings 1)"

# 2. a disconnecting client frees its booking and cancels the worker's request
cancelled_sum() {
    local s=0 i v
    for i in 1 2; do
        v=$(curl -s "http://127.0.0.1:${WPORT[$i]}/metrics" | awk '$1=="kvr_worker_requests_cancelled_total" {printf "%d", $2}')
        s=$((s + v))
    done
    echo $s
}
c0=$(cancelled_sum)
$PY "$HERE/fe_client.py" sse "$F/v1/completions" '{"model":"m1","prompt":"long one","max_tokens":100000,"stream":true}' \
    >/dev/null 2>&1 &
bg=$!
one_booking() { [ "$(bookings 1)" = 1 ]; }
kvr_wait_for 10 one_booking || kvr_fail "no booking for a live stream: $(bookings 1)"
kill -KILL $bg 2>/dev/null
wait $bg 2>/dev/null
kvr_wait_for 10 zero_bookings || kvr_fail "booking not freed after the client left: $(bookings 1)"
more_cancelled() { [ "$(cancelled_sum)" -gt "$c0" ]; }
kvr_wait_for 10 more_cancelled || kvr_fail "worker request not cancelled"
kvr_log "disconnect: booking freed, worker request cancelled"

# 3. kill the router that routed a live stream
start_router 2
start_router 3
kvr_wait_http "http://127.0.0.1:${RPORT[2]}/health" 15
kvr_wait_http "http://127.0.0.1:${RPORT[3]}/health" 15
kvr_wait_for 15 rworkers 2 || kvr_fail "router 2 never saw the workers"
kvr_wait_for 15 rworkers 3 || kvr_fail "router 3 never saw the workers"
body='{"model":"m1","prompt":"a stream that outlives its router","max_tokens":400,"stream":true}'
routed0=$(grep -cE 'msg="?routed"? ' "$KVR_TMP/fe.log" || true)
$PY "$HERE/fe_client.py" sse "$F/v1/completions" "$body" >"$KVR_TMP/live.json" 2>&1 &
bg=$!
routed_more() { [ "$(grep -cE 'msg="?routed"? ' "$KVR_TMP/fe.log")" -gt "$routed0" ]; }
kvr_wait_for 10 routed_more || kvr_fail "the stream was never routed"
line=$(grep -E 'msg="?routed"? ' "$KVR_TMP/fe.log" | tail -1)
rid=$(echo "$line" | sed -n 's/.*router=\([0-9]*\).*/\1/p')
[ -n "$rid" ] || kvr_fail "no routed log line: $line"
kvr_log "stream routed by router $rid; SIGKILL it"
kvr_kill9 "router$rid"
kill -0 $bg 2>/dev/null || kvr_fail "the stream ended before its router was killed (test too fast)"
wait $bg || kvr_fail "stream client failed"
kvr_assert_eq "$(jq -r .status "$KVR_TMP/live.json")" 200 "live stream status"
kvr_assert_eq "$(jq -r .done "$KVR_TMP/live.json")" true "live stream reached [DONE]"
got=$(jq -r .text "$KVR_TMP/live.json")
want=$(curl -s -d '{"model":"m1","prompt":"a stream that outlives its router","max_tokens":400}' \
    "http://127.0.0.1:${WPORT[1]}/v1/completions" | jq -r '.choices[0].text')
kvr_assert_eq "$got" "$want" "stream intact after its router died"

# 4a. a router that stops answering (SIGSTOP): every try times out, then a local choice.
#     One router only, so that the late booking and the "free" meet the same (local-mode) state.
last=""
for i in 1 2 3; do
    [ "$i" = "$rid" ] && continue
    if [ -z "$last" ]; then last=$i; else kvr_kill9 "router$i"; fi
done
kill -STOP -- "-$(kvr_pid "router$last")"
t0=$(date +%s%N)
r=$(curl -s --max-time 10 -d '{"model":"m1","prompt":"routers asleep","max_tokens":3}' "$F/v1/completions")
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
kvr_assert_eq "$(echo "$r" | jq -r .usage.completion_tokens)" 3 "served with routers stopped"
kvr_assert_eq "$(fmetric 'kvr_frontend_route_fallback_total{reason="timeout"}')" 1 "timeout fallback counted"
[ "$ms" -ge 400 ] || kvr_fail "answered in $ms ms: 2 tries x 200 ms should have run first"
kvr_log "routers stopped: fallback after $ms ms"
# The router wakes up and applies the timed-out route request late: the frontend's "free"
# (sent because a timed-out try may have booked) must leave it with no booking.
# Wait until it has decided the late request (its decision counter moves), so that the zero
# below is the free's doing, not a request still queued.
decisions() { curl -s --max-time 2 "http://127.0.0.1:${RPORT[$1]}/metrics" |
    awk '$1 ~ /^kvr_routerd_route_decisions_total/ {s+=$2} END {printf "%d\n", s}'; }
d0=$(decisions "$last")
kill -CONT -- "-$(kvr_pid "router$last")"
late_decided() { [ "$(decisions "$last")" -gt "$d0" ]; }
kvr_wait_for 10 late_decided || kvr_fail "the woken router never decided the timed-out request"
kvr_wait_for 10 zero_bookings_of "$last" || kvr_fail "a late booking of a timed-out route lingers: $(bookings "$last")"

# 4b. all routers gone: still served, counted as fallback
for i in 1 2 3; do kvr_kill9 "router$i"; done
for i in 1 2 3 4; do
    r=$(curl -s --max-time 10 -d '{"model":"m1","prompt":"no routers","max_tokens":3}' "$F/v1/completions")
    kvr_assert_eq "$(echo "$r" | jq -r .usage.completion_tokens)" 3 "served without routers ($i)"
done
fb=$(curl -s "$F/metrics" | awk '/^kvr_frontend_route_fallback_total/ {s+=$2} END {printf "%d", s}')
[ "$fb" -ge 4 ] || kvr_fail "fallbacks not counted: $fb"
kvr_log "fallback decisions counted: $fb"

# 5. a worker that dies before its first token: the request is retried once on another
#    worker (a round-robin frontend, so the dead worker's turn is certain to come)
f2port=$(kvr_free_port)
kvr_spawn fe2 "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$f2port --nats "$NATS_URL" --id 6 \
    --router-mode round-robin
F2=http://127.0.0.1:$f2port
kvr_wait_http "$F2/health" 10
f2workers() { curl -s "$F2/metrics" | awk '/^kvr_frontend_live_workers / {exit !($2==2)}'; }
kvr_wait_for 10 f2workers || kvr_fail "frontend 2 never saw both workers"
kvr_kill9 worker1
for i in 1 2 3; do
    r=$(curl -s --max-time 10 -d '{"model":"m1","prompt":"retry me","max_tokens":3}' "$F2/v1/completions")
    kvr_assert_eq "$(echo "$r" | jq -r .usage.completion_tokens)" 3 "served despite a dead worker ($i)"
done
retries=$(curl -s "$F2/metrics" | awk '$1=="kvr_frontend_upstream_retries_total" {printf "%d", $2}')
[ "$retries" -ge 1 ] || kvr_fail "no retry counted"
kvr_log "retries on another worker: $retries"
kvr_pass
