#!/bin/bash
# chaos_worker_stop (issue 18, chaos case 5): long streams run on both workers; one worker is
# SIGSTOPped mid-stream while short requests keep flowing, then SIGCONTed. Asserts: every
# stream on the stopped worker ends within CHAOS_HANG_S (default 15 s) with an error event and
# [DONE] (not silence), streams on the other worker complete, no short request fails (the
# healthy worker can serve them all, so requests sent to the stopped one must be retried
# before their first token), bookings are freed, and after SIGCONT the worker serves again.
# One more stream, on the stopped worker, has a client that stops reading after its first event
# (slow_sse.py), so the frontend has paused its upstream transfer when the worker stops; its
# client reads again 12 s after the SIGSTOP and must get the error event while the worker is
# still stopped (with the stall clock stopped while paused, the stream stayed open until
# SIGCONT). Reading what was queued for it takes 3-4 s on an idle machine and more on a loaded
# one, so the worker stays stopped until that stream ends (at most SLOW_MAX_S); its time is a
# figure, not a limit.
# Figures: time for the stopped worker's streams to end (paused_stream_end_ms for the paused
# one), requests ok/failed, bookings.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init chaos_worker_stop
source "$(dirname "$0")/chaos_lib.sh"
chaos_need
HANG_S=${CHAOS_HANG_S:-15}
NSTREAMS=6
TOKENS=${CHAOS_STREAM_TOKENS:-6000}
CHAOS_ROUTER_ARGS="--snapshot-interval 2s --election-timeout 500ms"
SLOW_HOLD_S=${CHAOS_SLOW_HOLD_S:-12}
chaos_cluster lo
# One more stream whose client stops reading after its first event (tests/chaos/slow_sse.py):
# the frontend pauses its upstream transfer, which showed no response bytes whether the worker
# lived or not, so its stall timeout never ran. It is on the worker we stop; its client reads
# again SLOW_HOLD_S after the SIGSTOP and must find the error event there.
t_slow=$(now_ms)
chaos_spawn slow bash -c "'$PY' '$HERE/slow_sse.py' '$F/v1/completions' \
    '{\"model\":\"m1\",\"prompt\":\"a stream read by nobody for a while\",\"max_tokens\":40000,\"stream\":true}' \
    '$KVR_TMP/slow.go' >'$KVR_TMP/slow.json' 2>&1; date +%s%3N >'$KVR_TMP/slow.end'"
slow_on() { [ "$(w_metric 1 kvr_worker_running_seqs)" -ge 1 ] || [ "$(w_metric 2 kvr_worker_running_seqs)" -ge 1 ]; }
chaos_wait 20 slow_on || kvr_fail "the slow stream reached no worker"
V=1
[ "$(w_metric 2 kvr_worker_running_seqs)" -ge 1 ] && V=2
# paused for sure: the frontend's connection to that worker holds unread bytes (Recv-Q)
up_paused() { cx ss -tnH dst "127.0.0.1:${WPORT[$V]}" 2>/dev/null | awk '$2 > m {m = $2} END {exit !(m > 65536)}'; }
chaos_wait 60 up_paused || kvr_fail "the frontend never paused the slow stream's transfer: $(cx ss -tnH dst "127.0.0.1:${WPORT[$V]}")"
kvr_log "slow stream on worker $V paused after $(($(now_ms) - t_slow)) ms"
for k in $(seq 1 $NSTREAMS); do
    chaos_stream "long$k" "{\"model\":\"m1\",\"prompt\":\"long stream $k, stopped or not\",\"max_tokens\":$TOKENS,\"stream\":true}"
done
spread() { [ "$(w_metric 1 kvr_worker_running_seqs)" -ge 1 ] && [ "$(w_metric 2 kvr_worker_running_seqs)" -ge 1 ]; }
chaos_wait 20 spread || kvr_fail "long streams not on both workers: w1 $(w_metric 1 kvr_worker_running_seqs), w2 $(w_metric 2 kvr_worker_running_seqs)"
sleep 1
H=$((3 - V))
NV=$(w_metric "$V" kvr_worker_running_seqs)
t_stop=$(now_ms)
kill -STOP -- "-$(kvr_pid "worker$V")"
kvr_log "SIGSTOP worker $V with $NV streams; worker $H keeps $(w_metric "$H" kvr_worker_running_seqs)"
chaos_load_start load 2 --stream --max-tokens 8 --timeout 60
NAMES="slow $(seq -f long%g 1 $NSTREAMS)"
NALL=$((NSTREAMS + 1))
streams_done() { local k; for k in $NAMES; do [ -f "$KVR_TMP/$k.end" ] || return 1; done; }
victims_done() { # the NV streams that did not complete are the stopped worker's: all ended?
    local k n=0
    [ "$(now_ms)" -ge $((t_stop + SLOW_HOLD_S * 1000)) ] && touch "$KVR_TMP/slow.go"
    for k in $NAMES; do [ -f "$KVR_TMP/$k.end" ] && n=$((n + 1)); done
    [ "$n" -ge "$NV" ]
}
# the paused stream's client reads again SLOW_HOLD_S after the SIGSTOP; it must end while the
# worker is still stopped, however long reading its queue takes on this machine
SLOW_MAX_S=${CHAOS_SLOW_MAX_S:-60}
chaos_wait "$((HANG_S > SLOW_HOLD_S ? HANG_S : SLOW_HOLD_S))" victims_done
touch "$KVR_TMP/slow.go"
slow_ended() { [ -f "$KVR_TMP/slow.end" ]; }
chaos_wait "$((SLOW_MAX_S - ($(now_ms) - t_stop) / 1000))" slow_ended
ended=0
for k in $NAMES; do
    [ -f "$KVR_TMP/$k.end" ] || continue
    e=$(($(cat "$KVR_TMP/$k.end") - t_stop))
    if [ "$k" = slow ]; then ended=$((ended + 1))
    else [ "$e" -lt $((HANG_S * 1000)) ] && ended=$((ended + 1)); fi
done
kvr_log "after SIGSTOP: $ended of $NALL streams ended in time"
chaos_check "the stopped worker's $NV streams end within $HANG_S s (the paused one before SIGCONT; $ended of $NALL streams ended)" test "$ended" -ge "$NV"
slow_end=-1
[ -f "$KVR_TMP/slow.end" ] && slow_end=$(($(cat "$KVR_TMP/slow.end") - t_stop))
chaos_check "the paused stream ends with an error event and [DONE] while its worker is stopped (after $slow_end ms: $(head -c 300 "$KVR_TMP/slow.json"))" \
    jq -e '([.events[] | select(.error)] | length) >= 1 and .done' "$KVR_TMP/slow.json"
sleep 3
t_cont=$(now_ms)
kill -CONT -- "-$(kvr_pid "worker$V")"
kvr_log "SIGCONT worker $V after $(((t_cont - t_stop) / 1000)) s"
chaos_wait 90 streams_done || kvr_log "streams still running 90 s after SIGCONT"
errs=0 oks=0 lat=0
for k in $NAMES; do
    j=$KVR_TMP/$k.json
    [ -f "$KVR_TMP/$k.end" ] && e=$(($(cat "$KVR_TMP/$k.end") - t_stop)) || e=-1
    if [ "$k" != slow ] && [ "$(jq -r '.text | length' "$j" 2>/dev/null)" = "$TOKENS" ] && [ "$(jq -r .done "$j")" = true ]; then
        oks=$((oks + 1))
    elif [ "$(jq -r '[.events[] | select(.error)] | length' "$j" 2>/dev/null)" -ge 1 ] && [ "$(jq -r .done "$j")" = true ]; then
        errs=$((errs + 1))
        [ "$e" -gt "$lat" ] && lat=$e
    else
        kvr_log "stream $k ended after $e ms with neither all tokens nor an error event: $(head -c 300 "$j")"
    fi
done
chaos_check "$NV streams on the stopped worker end with an error event (got $errs)" test "$errs" = "$NV"
chaos_check "the $((NALL - NV)) streams on worker $H complete (complete: $oks)" test "$oks" -ge $((NALL - NV))
# after SIGCONT the worker serves again: directly, and requests reach it through the frontend
direct=$(cx curl -s --max-time 10 -d '{"model":"m1","prompt":"awake?","max_tokens":3}' "${WURL[$V]}/v1/completions" | jq -r .usage.completion_tokens)
chaos_check "worker $V answers after SIGCONT" test "$direct" = 3
r0=$(w_metric "$V" kvr_worker_requests_total)
# The load's prompts are cached on worker $H, and the routers' cost (--load-weight 0.25) rightly
# keeps them there while $H has room, so "serves again" is asked with prompts nobody holds: the
# idle worker $V is then the cheaper one as long as it is live again in the routers.
k=0
more() {
    k=$((k + 1))
    cx curl -s --max-time 10 -o /dev/null \
        -d "{\"model\":\"m1\",\"prompt\":\"fresh $k $RANDOM after the SIGCONT\",\"max_tokens\":2}" \
        "$F/v1/completions"
    [ "$(w_metric "$V" kvr_worker_requests_total)" -gt "$r0" ]
}
chaos_wait 20 more
chaos_check "the frontend sends requests to worker $V again" more
sum=$(chaos_load_stop load 90)
kvr_log "load: $sum"
chaos_wait 30 chaos_converged
chaos_check "bookings 0 and digests equal after the load" chaos_converged
chaos_table >&2
chaos_figure "stopped_worker_streams=$NV ended_with_error=$errs slowest_error_end_ms=$lat others_ok=$oks" \
    "paused_stream_end_ms=$slow_end ended_within_${HANG_S}s=$ended/$NALL requests_ok=$(jq -r .ok <<<"$sum") requests_failed=$(jq -r .failed <<<"$sum")" \
    "max_request_s=$(jq -r .max_s <<<"$sum") max_gap_s=$(jq -r .max_gap_s <<<"$sum")" \
    "bookings=$(r_q 1 .bookings),$(r_q 2 .bookings),$(r_q 3 .bookings) fsm_digest=$(r_q 1 .raft.fsm_digest)"
chaos_check "no failed client request ($(jq -c .errors <<<"$sum"))" test "$(jq -r .failed <<<"$sum")" = 0
# a short request left waiting on the stopped worker is as good as failed for its client
chaos_check "no short request waits $HANG_S s or more (longest $(jq -r .max_s <<<"$sum") s)" \
    jq -e ".max_s < $HANG_S" <<<"$sum"
chaos_done
