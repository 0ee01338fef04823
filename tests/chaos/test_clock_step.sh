#!/bin/bash
# chaos_clock_step (issue 18, chaos case 4): every router runs under libfaketime (Debian's
# libfaketime; monotonic clocks untouched, so only the wall clock moves) and the Raft leader's
# wall clock is stepped forward by CHAOS_CLOCK_STEP (default +30s, three frontend timeouts)
# while long streams hold bookings and short requests flow. Asserts: no lease expires early
# (no "frontend lease expired" and the long streams' bookings stay booked on every router),
# every stream and request completes, bookings return to 0, digests converge.
# Figures: fewest bookings seen after the step vs long streams live, expiries logged, requests.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init chaos_clock_step
source "$(dirname "$0")/chaos_lib.sh"
chaos_need
FT_LIB=$(ls /usr/lib/*/faketime/libfaketimeMT.so.1 2>/dev/null | head -1)
[ -n "$FT_LIB" ] || { echo "SKIP: libfaketime not installed"; exit 77; }
STEP=${CHAOS_CLOCK_STEP:-+30s}
NSTREAMS=3
TOKENS=${CHAOS_STREAM_TOKENS:-12000} # ~30 s at --speedup 10: outlives the 15 s window with room
for i in 1 2 3; do
    echo "+0" >"$KVR_TMP/clock$i"
    # the file is re-read at most once a second (FAKETIME_CACHE_DURATION)
    RPREFIX[$i]="env LD_PRELOAD=$FT_LIB FAKETIME_TIMESTAMP_FILE=$KVR_TMP/clock$i FAKETIME_DONT_FAKE_MONOTONIC=1 FAKETIME_CACHE_DURATION=1"
done
CHAOS_ROUTER_ARGS="--snapshot-interval 2s --election-timeout 500ms --frontend-timeout 10s"
chaos_cluster lo
L=$(chaos_leader 15) || kvr_fail "no leader"

for k in $(seq 1 $NSTREAMS); do
    chaos_stream "long$k" "{\"model\":\"m1\",\"prompt\":\"long stream $k under a clock step\",\"max_tokens\":$TOKENS,\"stream\":true}"
done
# Only the long streams run until every router holds exactly their bookings (a stream the
# routers did not book, e.g. a route timeout's local choice, would make the check below
# meaningless); the short load, which only adds bookings, starts after.
booked() { local i; for i in 1 2 3; do [ "$(r_q "$i" .bookings)" = $NSTREAMS ] || return 1; done; }
chaos_wait 20 booked || kvr_fail "long streams not booked: $(chaos_table | tr '\n' ';')"
chaos_load_start load 2 --stream --max-tokens 8
sleep 2

exp0=$(cat "$KVR_TMP"/router*.log | grep -c 'lease expired')
t_step=$(now_ms)
echo "$STEP" >"$KVR_TMP/clock$L"
kvr_log "stepped r$L's wall clock by $STEP"
MINB=999999
end=$((t_step + 15000))
while [ "$(now_ms)" -lt "$end" ]; do
    for i in 1 2 3; do
        b=$(r_q "$i" .bookings)
        [ -n "$b" ] && [ "$b" != null ] && [ "$b" -lt "$MINB" ] && MINB=$b
    done
    sleep 0.3
done
live=0
for k in $(seq 1 $NSTREAMS); do [ -f "$KVR_TMP/long$k.end" ] || live=$((live + 1)); done
exp1=$(cat "$KVR_TMP"/router*.log | grep -c 'lease expired')
kvr_log "15 s after the step: fewest bookings $MINB, long streams live $live; $(chaos_table | tr '\n' ';')"
chaos_check "the long streams outlive the observation window (test too fast)" test "$live" = $NSTREAMS
chaos_check "no frontend lease expired after the step ($((exp1 - exp0)) expiries)" test "$exp1" = "$exp0"
chaos_check "no booking freed early: fewest bookings seen $MINB, $NSTREAMS long streams live" test "$MINB" -ge $NSTREAMS

streams_done() { local k; for k in $(seq 1 $NSTREAMS); do [ -f "$KVR_TMP/long$k.end" ] || return 1; done; }
chaos_wait 90 streams_done
okst=0
for k in $(seq 1 $NSTREAMS); do
    j=$KVR_TMP/long$k.json
    if [ "$(jq -r .status "$j" 2>/dev/null)" = 200 ] && [ "$(jq -r .done "$j")" = true ] &&
        [ "$(jq -r '.text | length' "$j")" = "$TOKENS" ]; then okst=$((okst + 1)); fi
done
sum=$(chaos_load_stop load 60)
kvr_log "load: $sum"
chaos_wait 30 chaos_converged
chaos_check "bookings 0 and digests equal after the load" chaos_converged
chaos_table >&2
chaos_figure "step=$STEP on_leader=r$L fewest_bookings_after_step=$MINB long_streams=$NSTREAMS" \
    "lease_expiries=$((exp1 - exp0)) long_streams_ok=$okst/$NSTREAMS" \
    "requests_ok=$(jq -r .ok <<<"$sum") requests_failed=$(jq -r .failed <<<"$sum")" \
    "bookings=$(r_q 1 .bookings),$(r_q 2 .bookings),$(r_q 3 .bookings) fsm_digest=$(r_q 1 .raft.fsm_digest)"
chaos_check "every long stream completes" test "$okst" = $NSTREAMS
chaos_check "no failed client request ($(jq -c .errors <<<"$sum"))" test "$(jq -r .failed <<<"$sum")" = 0
chaos_done
