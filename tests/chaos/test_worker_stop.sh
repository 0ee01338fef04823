#!/bin/bash
# chaos_worker_stop (issue 18, chaos case 5): long streams run on both workers; one worker is
# SIGSTOPped mid-stream while short requests keep flowing, then SIGCONTed. Asserts: every
# stream on the stopped worker ends within CHAOS_HANG_S (default 15 s) with an error event and
# [DONE] (not silence), streams on the other worker complete, no short request fails (the
# healthy worker can serve them all, so requests sent to the stopped one must be retried
# before their first token), bookings are freed, and after SIGCONT the worker serves again.
# Figures: time for the stopped worker's streams to end, requests ok/failed, bookings.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init chaos_worker_stop
source "$(dirname "$0")/chaos_lib.sh"
chaos_need
HANG_S=${CHAOS_HANG_S:-15}
NSTREAMS=6
TOKENS=${CHAOS_STREAM_TOKENS:-6000}
CHAOS_ROUTER_ARGS="--snapshot-interval 2s --election-timeout 500ms"
chaos_cluster lo
for k in $(seq 1 $NSTREAMS); do
    chaos_stream "long$k" "{\"model\":\"m1\",\"prompt\":\"long stream $k, stopped or not\",\"max_tokens\":$TOKENS,\"stream\":true}"
done
spread() { [ "$(w_metric 1 kvr_worker_running_seqs)" -ge 1 ] && [ "$(w_metric 2 kvr_worker_running_seqs)" -ge 1 ]; }
chaos_wait 20 spread || kvr_fail "long streams not on both workers: w1 $(w_metric 1 kvr_worker_running_seqs), w2 $(w_metric 2 kvr_worker_running_seqs)"
sleep 1
V=1
[ "$(w_metric 2 kvr_worker_running_seqs)" -gt "$(w_metric 1 kvr_worker_running_seqs)" ] && V=2
H=$((3 - V))
NV=$(w_metric "$V" kvr_worker_running_seqs)
t_stop=$(now_ms)
kill -STOP -- "-$(kvr_pid "worker$V")"
kvr_log "SIGSTOP worker $V with $NV streams; worker $H keeps $(w_metric "$H" kvr_worker_running_seqs)"
chaos_load_start load 2 --stream --max-tokens 8 --timeout 60
streams_done() { local k; for k in $(seq 1 $NSTREAMS); do [ -f "$KVR_TMP/long$k.end" ] || return 1; done; }
victims_done() { # the NV streams that did not complete are the stopped worker's: all ended?
    local k n=0
    for k in $(seq 1 $NSTREAMS); do [ -f "$KVR_TMP/long$k.end" ] && n=$((n + 1)); done
    [ "$n" -ge "$NV" ]
}
chaos_wait "$HANG_S" victims_done
t_victims=$(now_ms)
ended=0
for k in $(seq 1 $NSTREAMS); do [ -f "$KVR_TMP/long$k.end" ] && ended=$((ended + 1)); done
kvr_log "$HANG_S s after SIGSTOP: $ended of $NSTREAMS streams ended"
chaos_check "the stopped worker's $NV streams end within $HANG_S s ($ended of $NSTREAMS streams ended)" test "$ended" -ge "$NV"
sleep 3
t_cont=$(now_ms)
kill -CONT -- "-$(kvr_pid "worker$V")"
kvr_log "SIGCONT worker $V after $(((t_cont - t_stop) / 1000)) s"
chaos_wait 90 streams_done || kvr_log "streams still running 90 s after SIGCONT"
errs=0 oks=0 lat=0
for k in $(seq 1 $NSTREAMS); do
    j=$KVR_TMP/long$k.json
    [ -f "$KVR_TMP/long$k.end" ] && e=$(($(cat "$KVR_TMP/long$k.end") - t_stop)) || e=-1
    if [ "$(jq -r '.text | length' "$j" 2>/dev/null)" = "$TOKENS" ] && [ "$(jq -r .done "$j")" = true ]; then
        oks=$((oks + 1))
    elif [ "$(jq -r '[.events[] | select(.error)] | length' "$j" 2>/dev/null)" -ge 1 ] && [ "$(jq -r .done "$j")" = true ]; then
        errs=$((errs + 1))
        [ "$e" -gt "$lat" ] && lat=$e
    else
        kvr_log "stream $k ended after $e ms with neither all tokens nor an error event: $(head -c 300 "$j")"
    fi
done
chaos_check "$NV streams on the stopped worker end with an error event (got $errs)" test "$errs" = "$NV"
chaos_check "the $((NSTREAMS - NV)) streams on worker $H complete (complete: $oks)" test "$oks" -ge $((NSTREAMS - NV))
# after SIGCONT the worker serves again: directly, and requests reach it through the frontend
direct=$(cx curl -s --max-time 10 -d '{"model":"m1","prompt":"awake?","max_tokens":3}' "${WURL[$V]}/v1/completions" | jq -r .usage.completion_tokens)
chaos_check "worker $V answers after SIGCONT" test "$direct" = 3
r0=$(w_metric "$V" kvr_worker_requests_total)
more() { [ "$(w_metric "$V" kvr_worker_requests_total)" -gt "$r0" ]; }
chaos_wait 20 more
chaos_check "the frontend sends requests to worker $V again" more
sum=$(chaos_load_stop load 90)
kvr_log "load: $sum"
chaos_wait 30 chaos_converged
chaos_check "bookings 0 and digests equal after the load" chaos_converged
chaos_table >&2
chaos_figure "stopped_worker_streams=$NV ended_with_error=$errs slowest_error_end_ms=$lat others_ok=$oks" \
    "ended_within_${HANG_S}s=$ended/$NSTREAMS requests_ok=$(jq -r .ok <<<"$sum") requests_failed=$(jq -r .failed <<<"$sum")" \
    "max_request_s=$(jq -r .max_s <<<"$sum") max_gap_s=$(jq -r .max_gap_s <<<"$sum")" \
    "bookings=$(r_q 1 .bookings),$(r_q 2 .bookings),$(r_q 3 .bookings) fsm_digest=$(r_q 1 .raft.fsm_digest)"
chaos_check "no failed client request ($(jq -c .errors <<<"$sum"))" test "$(jq -r .failed <<<"$sum")" = 0
# a short request left waiting on the stopped worker is as good as failed for its client
chaos_check "no short request waits $HANG_S s or more (longest $(jq -r .max_s <<<"$sum") s)" \
    jq -e ".max_s < $HANG_S" <<<"$sum"
chaos_done
