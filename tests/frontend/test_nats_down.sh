#!/bin/bash
# frontend_nats_down (issue 18, defect 8): nats-server SIGKILLed under a frontend, a router and
# two healthy workers. For well over the heartbeat TTL (3 s) every request must still be served
# (the frontend falls back to its local least-loaded choice and keeps the workers it knew);
# the router must not declare them down either. After NATS is back, a worker that died during
# the outage expires one TTL after the reconnect.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init frontend_nats_down
kvr_need_bins kvr-worker kvr-frontend kvr-routerd
kvr_start_nats
declare -A WPORT
for i in 1 2; do
    WPORT[$i]=$(kvr_free_port)
    kvr_spawn "worker$i" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:${WPORT[$i]} --nats "$NATS_URL" \
        --namespace default --model m1 --id "$i" --speedup 100
done
RP=$(kvr_free_port)
kvr_spawn r1 "$KVR_BIN/kvr-routerd" --id 1 --nats "$NATS_URL" --http 127.0.0.1:$RP \
    --data-dir "$KVR_TMP/r1"
fport=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fport --nats "$NATS_URL" --id 1
F=http://127.0.0.1:$fport
kvr_wait_http "$F/health" 10
kvr_wait_http "http://127.0.0.1:$RP/ready" 20
live_is() { curl -s "$F/metrics" | awk -v n="$1" '/^kvr_frontend_live_workers / {f=1; ok=($2+0==n)} END {exit !(f && ok)}'; }
live2() { live_is 2; }
kvr_wait_for 10 live2 || kvr_fail "frontend never saw 2 workers"
router_up() { # number of workers the router holds up
    curl -s --max-time 2 "http://127.0.0.1:$RP/v1/state" | jq '[.workers[] | select(.up)] | length'
}
r_up2() { [ "$(router_up)" = 2 ]; }
kvr_wait_for 10 r_up2 || kvr_fail "router never saw 2 workers up"
req() {
    curl -s -o /dev/null -w '%{http_code}\n' --max-time 5 \
        -d '{"model":"m1","prompt":"nats is down, still served","max_tokens":2}' "$F/v1/completions"
}
[ "$(req)" = 200 ] || kvr_fail "request before the outage"

kvr_kill9 nats
t0=$(date +%s%N)
n=0 bad=0
# 9 s of requests, three heartbeat TTLs
while [ $(( ($(date +%s%N) - t0) / 1000000 )) -lt 9000 ]; do
    code=$(req)
    n=$((n + 1))
    [ "$code" = 200 ] || { bad=$((bad + 1)); kvr_log "request $n during the outage: $code"; }
done
kvr_log "outage: $n requests, $bad failed"
kvr_assert_eq "$bad" 0 "requests failed while nats-server was down"
[ "$n" -ge 10 ] || kvr_fail "too few requests during the outage: $n"
kvr_assert_eq "$(router_up)" 2 "router still holds both workers up while NATS is down"
live2 || kvr_fail "frontend dropped workers while NATS was down"

# worker 2 dies during the outage; it must go once NATS is back and it does not beat
kvr_kill9 worker2
kvr_start_nats
live1() { live_is 1; }
kvr_wait_for 15 live1 || kvr_fail "a dead worker was not expired after the reconnect"
r_up1() { [ "$(router_up)" = 1 ]; }
kvr_wait_for 15 r_up1 || kvr_fail "router did not declare the dead worker down after the reconnect"
for i in 1 2 3 4 5; do
    [ "$(req)" = 200 ] || kvr_fail "request after the reconnect"
done
kvr_pass
