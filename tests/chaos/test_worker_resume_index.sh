#!/bin/bash
# chaos_worker_resume_index (issue 18, defect 5: the index as a function of the KV stream).
# Three routers (Raft), two workers, a frontend. Requests store blocks on both workers; one
# follower router is stopped; a worker is SIGSTOPped until the routers declare it down, then
# SIGCONTed and serves again; then the stopped router restarts and replays the stream from its
# snapshot. Asserts: all three routers end with the same index digest, entry count and stream
# sequence (and no bookings).
# Before, a router dropped a down worker's entries when it learned the worker was down and
# ignored its events meanwhile: the router that was stopped never learned it, replayed them
# all and kept the worker's old entries (a lost attempt saw 88 vs 73 entries). Now only the
# leader's AllBlocksCleared in the worker's own stream subject removes them, and every router
# applies it at the same stream position.
# Figures: entries per router, time for the restarted router to converge.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init chaos_worker_resume_index
source "$(dirname "$0")/chaos_lib.sh"
chaos_need
CHAOS_ROUTER_ARGS="--snapshot-interval 1s --election-timeout 500ms"
chaos_cluster lo

# send TAG N: N distinct prompts through the frontend (several blocks each); counts failures
send() {
    local tag=$1 n=$2 k p bad=0
    for ((k = 0; k < n; k++)); do
        p="$tag request $k: $(printf 'word%d-%s ' $(seq 1 60) | head -c 600)"
        cx curl -s --max-time 20 -o /dev/null -w '%{http_code}\n' \
            -d "{\"model\":\"m1\",\"prompt\":\"$p\",\"max_tokens\":4}" "$F/v1/completions" |
            grep -qx 200 || bad=$((bad + 1))
    done
    echo "$bad"
}
entries() { r_q "$1" .index.entries; }

bad=$(send first 16)
# the workers' KV events reach the routers through JetStream after the replies: wait for them
has_entries() { [ "$(entries 1)" -gt 0 ]; }
chaos_wait 10 has_entries || kvr_fail "no index entries 10 s after the first requests"
kvr_log "first batch: $bad failed; entries $(entries 1)/$(entries 2)/$(entries 3)"
chaos_wait 20 chaos_converged || { chaos_table >&2; kvr_fail "not converged before the fault"; }

L=$(chaos_leader 10) || kvr_fail "no leader"
D=$((L % 3 + 1)) # a follower: it is stopped while the worker goes down and comes back
LIVE=()
for i in 1 2 3; do [ "$i" != "$D" ] && LIVE+=("$i"); done
sleep 2 # its snapshot covers the first batch (--snapshot-interval 1s)
kvr_term "router$D" 10
kvr_log "router $D (follower; leader $L) stopped at entries $(entries "${LIVE[0]}")"

V=1
kill -STOP -- "-$(kvr_pid "worker$V")"
t_stop=$(now_ms)
down() { chaos_workers_up 1 "${LIVE[@]}"; }
chaos_wait 30 down || kvr_fail "the live routers never saw worker $V down"
kvr_log "worker $V down after $(($(now_ms) - t_stop)) ms"
bad2=$(send during 6) # to the other worker
kill -CONT -- "-$(kvr_pid "worker$V")"
up() { chaos_workers_up 2 "${LIVE[@]}"; }
chaos_wait 30 up || kvr_fail "the live routers never saw worker $V up again"
kvr_log "worker $V up again after $(($(now_ms) - t_stop)) ms"
bad3=$(send after 16) # to both workers again
chaos_wait 20 chaos_converged "${LIVE[@]}"
chaos_check "the live routers agree before the restart" chaos_converged "${LIVE[@]}"
chaos_table "${LIVE[@]}" >&2

t_start=$(now_ms)
chaos_router_start "$D"
cx_wait_http "${RURL[$D]}/ready" 60
chaos_wait 30 chaos_converged
conv_ms=$(($(now_ms) - t_start))
chaos_table >&2
chaos_check "digests, entries and stream sequence equal after router $D replayed ($(entries 1)/$(entries 2)/$(entries 3) entries)" chaos_converged
chaos_check "no failed request ($bad/$bad2/$bad3)" test "$((bad + bad2 + bad3))" = 0
chaos_figure "entries=$(entries 1),$(entries 2),$(entries 3) restarted_router=$D" \
    "converged_ms=$conv_ms digests=$(r_q 1 .index.digest),$(r_q 2 .index.digest),$(r_q 3 .index.digest)"
chaos_done
