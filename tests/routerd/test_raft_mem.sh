#!/usr/bin/env bash
# Issue 19: --raft-log memory (the default). Three routers in one Raft group with entries and
# snapshots in memory, term and vote on disk, and memlog's vote rule (docs/DESIGN.md "Raft log
# in memory"). Under route load: SIGKILL a follower, then the leader, restart each (empty log)
# and the digests converge. Then a follower is frozen (SIGSTOP, its log intact) and the other
# two are SIGKILLed and restarted empty: they must not elect a leader between themselves (their
# logs lack what the frozen one holds); once it resumes the group elects and converges without
# the frozen router's raft refusing the leader's log. Finally all three are SIGKILLed and
# restarted: they agree, with no bookings. Throughout, never two leaders in one term.
# KVR_TEST_NO_VOTE_RULE=1 runs the routers without the rule (the test must then fail).
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_raft_mem
[ -x "$KVR_BIN/kvr-routerd" ] || kvr_fail "no kvr-routerd"
kvr_start_nats
read -r A1 A2 A3 <<<"$(rd_raft_ports 3)"
[ -n "$A3" ] || kvr_fail "no free raft ports"
PEERS="1@$A1,2@$A2,3@$A3"
declare -A HP RA
HP[1]=$(kvr_free_port); HP[2]=$(kvr_free_port); HP[3]=$(kvr_free_port)
RA[1]=$A1; RA[2]=$A2; RA[3]=$A3
rd_secret "$KVR_TMP/secret"
start() {
    rd_start "r$1" "$1" "${HP[$1]}" "$KVR_TMP/r$1" --raft-addr "${RA[$1]}" --peers "$PEERS" \
        --cluster-secret-file "$KVR_TMP/secret" --heartbeat-misses 3 --raft-snapshot-threshold 512
}
role() { rd_q "${HP[$1]}" .raft.role 2>/dev/null; }
same() {
    local f=$1 a b c
    a=$(rd_q "${HP[1]}" "$f"); b=$(rd_q "${HP[2]}" "$f"); c=$(rd_q "${HP[3]}" "$f")
    [ -n "$a" ] && [ "$a" != null ] && [ "$a" = "$b" ] && [ "$b" = "$c" ]
}
digests() { for i in 1 2 3; do echo -n "r$i=$(rd_q "${HP[$i]}" .raft.fsm_digest)/$(role $i)/t$(rd_q "${HP[$i]}" .raft.term) "; done; }
converge() { kvr_wait_for "$1" same .raft.fsm_digest || kvr_fail "$2: digests differ: $(digests)"; }

rd_beat beat1 ns1 1
rd_beat beat2 ns1 2
for i in 1 2 3; do start $i; done
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 20; done
L=$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")
[ -n "$L" ] || kvr_fail "no leader"
for i in 1 2 3; do rd_wait_workers_up "${HP[$i]}" 2 10 || kvr_fail "r$i: workers not up"; done

# who led which term: every 50 ms, each router that says it leads, with its term
cat >"$KVR_TMP/sampler.sh" <<'SAMPLER'
while :; do
    for p in "$@"; do
        curl -s --max-time 1 "http://127.0.0.1:$p/v1/state" |
            jq -r 'select(.raft.role == "leader") | "\(.raft.term) \(.router_id)"' 2>/dev/null
    done
    sleep 0.05
done
SAMPLER
kvr_spawn sampler bash "$KVR_TMP/sampler.sh" "${HP[1]}" "${HP[2]}" "${HP[3]}"
# route load: batches of 20 requests over NATS kvr.route, booked through Raft
cat >"$KVR_TMP/load.sh" <<LOAD
n=0
while :; do
    for k in \$(seq 1 20); do n=\$((n + 1)); echo "route m1 ns1 7 256 load-\$n"; done | "$PUB" --nats "$NATS_URL" >>"$KVR_TMP/load.out" 2>&1
done
LOAD
kvr_spawn load bash "$KVR_TMP/load.sh"
sleep 2
others() { for i in 1 2 3; do [ "$i" != "$1" ] && echo -n "$i "; done; }

# 1. a follower dies and comes back empty: it catches up from the leader
F=$(others "$L" | cut -d' ' -f1)
kvr_log "leader r$L; SIGKILL follower r$F under load"
kvr_kill9 "r$F"
sleep 1
start "$F"
kvr_wait_http "http://127.0.0.1:${HP[$F]}/ready" 20
sleep 2
kvr_kill9 load # digests compare only between changes
converge 20 "after the follower's restart"
kvr_spawn load bash "$KVR_TMP/load.sh"
sleep 2

# 2. the leader dies and comes back empty
kvr_log "SIGKILL leader r$L under load"
kvr_kill9 "r$L"
sleep 1
start "$L"
kvr_wait_http "http://127.0.0.1:${HP[$L]}/ready" 20
L=$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")
[ -n "$L" ] || kvr_fail "no leader after the leader's restart"
sleep 2
kvr_kill9 load
converge 20 "after the leader's restart"
kvr_log "leader now r$L; routes answered so far: $(grep -c '^route ok=1' "$KVR_TMP/load.out")"
# per-hop histograms: the leader measured queue/commit/reply/leader, the followers forward
for h in queue commit reply leader; do
    n=$(rd_metric "${HP[$L]}" "kvr_routerd_raft_hop_seconds_count{hop=\"$h\"}")
    [ "${n:-0}" -gt 0 ] 2>/dev/null || kvr_fail "leader r$L: no $h hop observed ($n)"
done
fwd=0
for i in $(others "$L"); do
    n=$(rd_metric "${HP[$i]}" 'kvr_routerd_raft_hop_seconds_count{hop="forward"}')
    fwd=$((fwd + ${n:-0}))
done
[ "$fwd" -gt 0 ] || kvr_fail "followers observed no forward hop"
hops=$(curl -s "http://127.0.0.1:${HP[$L]}/metrics" "http://127.0.0.1:${HP[$(others "$L" | cut -d' ' -f1)]}/metrics" |
    awk -F'[{}" ]+' '/^kvr_routerd_raft_hop_seconds_(sum|count)/ {split($1, a, "_"); v[$3 "_" a[length(a)]] += $4}
        END {for (k in v) if (k ~ /_count$/) {h = substr(k, 1, length(k) - 6); if (v[k] > 0) printf "%s=%.0fus ", h, 1e6 * v[h "_sum"] / v[k]}}')
kvr_log "mean per hop (leader r$L + one follower): $hops"
# the restarted routers caught up from the leader: after the hold (4 s) they vote again
unrestricted() { for i in 1 2 3; do [ "$(rd_q "${HP[$i]}" .raft.vote_restricted)" = false ] || return 1; done; }
kvr_wait_for 15 unrestricted || kvr_fail "a restarted router never regained its vote: $(for i in 1 2 3; do rd_q "${HP[$i]}" .raft.vote_restricted; done | tr '\n' ' ')"
for i in 1 2 3; do kvr_assert_eq "$(rd_q "${HP[$i]}" .raft.log)" memory "r$i raft.log"; done

# 3. a follower is frozen with its log; the other two restart empty: no leader among them
S=$(others "$L" | cut -d' ' -f1)
read -r X Y <<<"$(others "$S")"
kvr_log "SIGSTOP r$S (log intact); SIGKILL r$X and r$Y, restart them empty"
kill -STOP "$(kvr_pid "r$S")"
kvr_kill9 "r$X"
kvr_kill9 "r$Y"
start "$X"
start "$Y"
kvr_wait_for 10 bash -c "curl -s http://127.0.0.1:${HP[$X]}/v1/state >/dev/null && curl -s http://127.0.0.1:${HP[$Y]}/v1/state >/dev/null" || kvr_fail "restarted routers do not answer"
elected=
for ((k = 0; k < 60; k++)); do
    for i in $X $Y; do [ "$(role "$i")" = leader ] && elected="r$i"; done
    [ -n "$elected" ] && break
    sleep 0.1
done
[ -z "$elected" ] || kvr_fail "$elected was elected by routers restarted empty while r$S (holding the log) was frozen"
withheld=$(($(rd_q "${HP[$X]}" .raft.votes_withheld) + $(rd_q "${HP[$Y]}" .raft.votes_withheld)))
kvr_log "no leader among r$X and r$Y in 6 s (correct; votes withheld: $withheld); resuming r$S"
if [ "${KVR_TEST_NO_VOTE_RULE:-0}" != 1 ]; then
    [ "$withheld" -gt 0 ] || kvr_fail "no vote was withheld (nobody asked?)"
fi
kill -CONT "$(kvr_pid "r$S")"
L=$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")
[ -n "$L" ] || L=$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")
[ -n "$L" ] || kvr_fail "no common leader after r$S resumed: $(digests)"
converge 20 "after r$S resumed"
[ "$(role "$S")" != unavailable ] || kvr_fail "r$S's raft stopped (it refused the leader's log)"

# 4. all three die and restart empty: they agree, with no bookings
kvr_log "SIGKILL all three, restart"
for i in 1 2 3; do kvr_kill9 "r$i"; done
for i in 1 2 3; do start $i; done
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 30; done
L=$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")
[ -n "$L" ] || L=$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")
[ -n "$L" ] || kvr_fail "no common leader after the whole-group restart: $(digests)"
converge 20 "after the whole-group restart"
for i in 1 2 3; do
    b=$(rd_q "${HP[$i]}" .bookings)
    kvr_assert_eq "$b" 0 "r$i bookings after the whole-group restart"
done

# never two leaders in one term
kvr_kill9 sampler
dup=$(sort -u "$KVR_TMP/sampler.log" 2>/dev/null | awk '{n[$1]++} END {for (t in n) if (n[t] > 1) print t}')
[ -z "$dup" ] || kvr_fail "two leaders in term(s) $dup: $(sort -u "$KVR_TMP/sampler.log" | tr '\n' ';')"
kvr_log "terms led: $(sort -u "$KVR_TMP/sampler.log" | tr '\n' ';')"
kvr_pass
