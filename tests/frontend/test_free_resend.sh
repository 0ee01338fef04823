#!/bin/bash
# frontend_free_resend: a FREE published while nats-server is down is kept by the frontend's
# NATS client and sent on reconnect; if the frontend reconnects before any router has
# resubscribed, the server drops it and the booking lived until --max-request-age (600 s): seen
# as "bookings leaked: r1 1 r2 1 r3 1" in chaos_nats_restart_load on a loaded machine. Made
# deterministic here: the router is SIGSTOPped across the restart, so it resubscribes only after
# the frontend has reconnected and flushed. The frontend publishes such FREEs again 2 s and 8 s
# after its reconnect; the booking must be gone within a few seconds of the router's return.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init frontend_free_resend
kvr_need_bins kvr-worker kvr-frontend kvr-routerd
kvr_start_nats
WP=$(kvr_free_port)
kvr_spawn worker "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$WP --nats "$NATS_URL" \
    --namespace default --model m1 --id 1
RP=$(kvr_free_port)
kvr_spawn r1 "$KVR_BIN/kvr-routerd" --id 1 --nats "$NATS_URL" --http 127.0.0.1:$RP \
    --data-dir "$KVR_TMP/r1"
fport=$(kvr_free_port)
kvr_spawn fe "${KVR_FRONTEND_BIN:-$KVR_BIN/kvr-frontend}" --listen 127.0.0.1:$fport \
    --nats "$NATS_URL" --id 1
F=http://127.0.0.1:$fport
kvr_wait_http "$F/health" 10
kvr_wait_http "http://127.0.0.1:$RP/ready" 20
live1() { curl -s "$F/metrics" | awk '/^kvr_frontend_live_workers / {f=1; ok=($2+0==1)} END {exit !(f && ok)}'; }
kvr_wait_for 10 live1 || kvr_fail "frontend never saw the worker"
bookings() { curl -s --max-time 2 "http://127.0.0.1:$RP/v1/state" | jq -r .bookings; }

# a stream of ~6 s (200 tokens at speedup 1), booked through the router
curl -s -N --max-time 60 "$F/v1/completions" \
    -d '{"model":"m1","prompt":"free me after the restart","max_tokens":200,"stream":true}' \
    >"$KVR_TMP/stream.txt" &
cpid=$!
booked() { [ "$(bookings)" = 1 ]; }
kvr_wait_for 10 booked || kvr_fail "the stream was not booked on the router ($(bookings))"
# issue 19: the route round trip of the answered try is in the frontend's histogram
curl -s "$F/metrics" | awk '$1 == "kvr_frontend_route_rtt_seconds_count" {f = ($2 > 0)} END {exit !f}' ||
    kvr_fail "no kvr.route round trip observed: $(curl -s "$F/metrics" | grep route_rtt_seconds_count)"

kvr_kill9 nats
kill -STOP "$(kvr_pid r1)"
kvr_start_nats
# the stream ends (the worker needs no NATS) and the frontend reconnects, router still stopped
wait "$cpid" || kvr_fail "the stream failed"
grep -q '^data: \[DONE\]' "$KVR_TMP/stream.txt" || kvr_fail "the stream did not end with [DONE]"
fe_back() { grep -q 'msg="nats reconnected"' "$KVR_TMP/fe.log"; }
kvr_wait_for 15 fe_back || kvr_fail "the frontend did not reconnect"
sleep 0.5 # let it flush what it kept to a server with no router subscribed
kill -CONT "$(kvr_pid r1)"
freed() { [ "$(bookings)" = 0 ]; }
if ! kvr_wait_for 15 freed; then
    kvr_fail "the booking was never freed after the router came back ($(bookings) left)"
fi
resent=$(curl -s "$F/metrics" | awk '$1 == "kvr_frontend_route_free_resent_total" {print $2}')
kvr_log "booking freed; FREEs re-sent: ${resent:-none}"
kvr_pass
