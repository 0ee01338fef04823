#!/usr/bin/env bash
# Three real router processes in one Raft group on loopback: SIGKILL the leader during a burst
# of route requests -> every request answered (retried by request id), none booked twice, a new
# leader quickly; the killed router restarts and converges (same booking and index digests);
# with 2 of 3 down the survivor answers in mode "local" (it stays in the NATS queue groups: no
# other router has a quorum); back together they converge again. No router leaves the queue
# groups during the elections. A follower restarted in place (POST /admin/restart) keeps its pid,
# comes back and converges. A leader stopped while it holds FREEs hands them over first.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_raft
[ -x "$KVR_BIN/kvr-routerd" ] || kvr_fail "no kvr-routerd"
kvr_start_nats
read -r A1 A2 A3 A4 <<<"$(rd_raft_ports 4)"
[ -n "$A4" ] || kvr_fail "no free raft ports"
PEERS="1@$A1,2@$A2,3@$A3"
declare -A HP RA
HP[1]=$(kvr_free_port); HP[2]=$(kvr_free_port); HP[3]=$(kvr_free_port); HP[4]=$(kvr_free_port)
RA[1]=$A1; RA[2]=$A2; RA[3]=$A3; RA[4]=$A4
rd_secret "$KVR_TMP/secret"
start() { rd_start "r$1" "$1" "${HP[$1]}" "$KVR_TMP/r$1" --raft-addr "${RA[$1]}" --peers "$PEERS" --snapshot-interval 2s --cluster-secret-file "$KVR_TMP/secret"; }
rd_beat beat1 ns1 1
rd_beat beat2 ns1 2
rd_beat beat3 ns1 3
for i in 1 2 3; do start $i; done
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 20; done
seq=$(rd_pub "store ns1 1 array int 7 0 4" "store ns1 2 map bytes 7 0 2" "store ns1 3 array int 8 0 3")
for i in 1 2 3; do rd_wait_seq "${HP[$i]}" "$seq"; done

leader_of() { rd_q "${HP[$1]}" .raft.leader 2>/dev/null; }
# same_leader NOT NODES...: every listed node reports the same leader, other than NOT (0: any);
# sets AGREED to it.
same_leader() {
    local not=$1 i first
    shift
    first=$(leader_of "$1")
    [ -n "$first" ] && [ "$first" != 0 ] && [ "$first" != null ] && [ "$first" != "$not" ] || return 1
    for i in "$@"; do [ "$(leader_of "$i")" = "$first" ] || return 1; done
    AGREED=$first
}
# wait_leader SECONDS NOT NODES...: prints the leader they agree on, within SECONDS of the clock
wait_leader() {
    local t=$1
    shift
    AGREED=
    kvr_wait_for "$t" same_leader "$@" && echo "$AGREED"
}
L=$(wait_leader 10 0 1 2 3) || kvr_fail "no leader elected"
kvr_log "leader is $L"
# worker registrations go through Raft: wait until every replica sees 3 live workers
kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$L]}/v1/state | jq '[.workers[] | select(.up)] | length')\" = 3 ]" ||
    kvr_fail "workers not up"

# burst of 300 route requests; SIGKILL the leader after ~100 answers
N=1500
for ((k = 1; k <= N; k++)); do
    printf 'route m1 ns1 %d 256 burst-%05d\n' $((7 + k % 2)) "$k"
done >"$KVR_TMP/burst.txt"
"$PUB" --nats "$NATS_URL" <"$KVR_TMP/burst.txt" >"$KVR_TMP/burst.out" 2>&1 &
BURST=$!
kvr_wait_for 30 bash -c "[ \$(grep -c '^route' $KVR_TMP/burst.out) -ge 300 ]" || kvr_fail "burst too slow"
t_kill=$(date +%s%3N)
kvr_kill9 "r$L"
SURV=()
for i in 1 2 3; do [ "$i" != "$L" ] && SURV+=("$i"); done
NL=$(wait_leader 10 "$L" "${SURV[@]}") || kvr_fail "no new leader after killing $L"
t_new=$(date +%s%3N)
kvr_log "new leader $NL after $((t_new - t_kill)) ms"
wait "$BURST" || kvr_fail "burst client failed"
answered=$(grep -c '^route ok=1' "$KVR_TMP/burst.out")
kvr_assert_eq "$answered" "$N" "every request answered"
rids=$(grep '^route ok=1' "$KVR_TMP/burst.out" | sed 's/.*rid=\([^ ]*\).*/\1/' | sort -u | wc -l)
kvr_assert_eq "$rids" "$N" "distinct request ids answered"
# one booking per request id on every surviving replica, and the same replicated state
for i in "${SURV[@]}"; do
    kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$i]}/v1/state | jq -r .bookings)\" = $N ]" ||
        kvr_fail "r$i bookings: $(rd_q "${HP[$i]}" .bookings), want $N (a request booked twice or lost)"
done
kvr_assert_eq "$(rd_q "${HP[${SURV[0]}]}" .raft.fsm_digest)" "$(rd_q "${HP[${SURV[1]}]}" .raft.fsm_digest)" "survivors' booking digests"
# How fast a new leader comes is a figure (logged above; kvr-bench and the chaos suite report it),
# not an assertion: wait_leader bounds it at 10 s. A 3 s bound failed in CI at 3208 ms under load.
# an election is not a lost quorum: no survivor left the routers' NATS queue groups (leaving on
# "no leader for 500 ms" did, and requests got "no responders")
for i in "${SURV[@]}"; do
    kvr_assert_eq "$(rd_q "${HP[$i]}" .raft.queue_groups_left)" 0 "r$i left the queue groups during an election"
done

# restart the killed router: converges (bookings via Raft, index via the stream)
start "$L"
kvr_wait_http "http://127.0.0.1:${HP[$L]}/ready" 30
kvr_wait_for 15 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$L]}/v1/state | jq -r .raft.fsm_digest)\" = \"$(rd_q "${HP[$NL]}" .raft.fsm_digest)\" ]" ||
    kvr_fail "restarted router's booking digest differs"
kvr_assert_eq "$(rd_q "${HP[$L]}" .index.digest)" "$(rd_q "${HP[$NL]}" .index.digest)" "restarted router's index digest"
kvr_assert_eq "$(rd_q "${HP[$L]}" .bookings)" "$N" "restarted router's bookings ($(rd_state "${HP[$L]}" | jq -c .raft))"

# kill two: the survivor answers alone, in local mode
S=${SURV[0]}
for i in 1 2 3; do [ "$i" != "$S" ] && kvr_kill9 "r$i"; done
survivor_degraded() { [ "$(rd_q "${HP[$S]}" .raft.degraded)" = true ]; }
kvr_wait_for 15 survivor_degraded || kvr_fail "the survivor never noticed it lost its quorum"
# it lost the quorum, but no other router has one: it stays in the queue groups and answers
# (were it to leave, nobody would answer kvr.route)
survivor_lost() { [ "$(rd_q "${HP[$S]}" .raft.quorum_lost)" = true ]; }
kvr_wait_for 15 survivor_lost || kvr_fail "the survivor never reported its quorum lost"
out=$(printf 'route m1 ns1 7 256 alone-1\n' | "$PUB" --nats "$NATS_URL" | grep '^route')
kvr_log "$out"
case "$out" in "route ok=1 "*"mode=local router=$S "*) ;; *) kvr_fail "survivor did not answer locally: $out" ;; esac
kvr_assert_eq "$(rd_q "${HP[$S]}" .raft.degraded)" true "survivor degraded"
kvr_assert_eq "$(rd_q "${HP[$S]}" .raft.in_queue_groups)" true "survivor still in the queue groups"
kvr_assert_eq "$(rd_q "${HP[$S]}" .raft.queue_groups_left)" 0 "survivor never left the queue groups"

# bring them back: everyone converges on one replicated state
for i in 1 2 3; do [ "$i" != "$S" ] && start "$i"; done
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 30; done
wait_leader 15 0 1 2 3 >/dev/null || kvr_fail "no leader after the group came back"
converged() {
    local d1 d2 d3
    d1=$(rd_q "${HP[1]}" .raft.fsm_digest); d2=$(rd_q "${HP[2]}" .raft.fsm_digest); d3=$(rd_q "${HP[3]}" .raft.fsm_digest)
    [ -n "$d1" ] && [ "$d1" = "$d2" ] && [ "$d2" = "$d3" ] && [ "$(rd_q "${HP[1]}" .raft.degraded)" = false ] &&
        [ "$(rd_q "${HP[$S]}" .raft.degraded)" = false ]
}
kvr_wait_for 20 converged || kvr_fail "replicas did not converge"
kvr_assert_eq "$(rd_q "${HP[1]}" .bookings)" $((N + 1)) "the local booking was reconciled into Raft"
kvr_assert_eq "$(rd_q "${HP[1]}" .index.digest)" "$(rd_q "${HP[$S]}" .index.digest)" "index digests"

# restart in place (POST /admin/restart; also what a router does when its Raft log became
# unusable after a failed write, sync.h log_stuck_cb): admin token required; the process execs
# itself (same pid), comes back through the warm-restart path, answers and converges
L=$(wait_leader 10 0 1 2 3) || kvr_fail "no leader before the restart in place"
F=1; [ "$L" = 1 ] && F=2
pid=$(kvr_pid "r$F")
n0=$(grep -c 'msg="started"' "$KVR_TMP/r$F.log")
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:${HP[$F]}/admin/restart")
kvr_assert_eq "$code" 401 "restart in place without the admin token"
sleep 0.5 # the restart would come 100 ms after an accepted request
kvr_assert_eq "$(grep -c 'msg="started"' "$KVR_TMP/r$F.log")" "$n0" "no restart without the admin token"
kvr_assert_eq "$(rd_post "${HP[$F]}" /admin/restart | jq -r .restarting)" true "restart in place accepted"
restarted() { [ "$(grep -c 'msg="started"' "$KVR_TMP/r$F.log")" -gt "$n0" ]; }
kvr_wait_for 10 restarted || kvr_fail "r$F did not start again"
kvr_assert_eq "$(kvr_pid "r$F")" "$pid" "same process"
kill -0 "$pid" || kvr_fail "r$F's process is gone"
kvr_wait_http "http://127.0.0.1:${HP[$F]}/ready" 30
for k in 1 2 3 4; do
    out=$(printf 'route m1 ns1 7 256 after-restart-%d\n' "$k" | "$PUB" --nats "$NATS_URL" | grep '^route')
    case "$out" in "route ok=1 "*) ;; *) kvr_fail "route after the restart in place: $out" ;; esac
done
kvr_wait_for 20 converged || kvr_fail "replicas did not converge after r$F restarted in place"
kvr_assert_eq "$(rd_q "${HP[$F]}" .bookings)" $((N + 5)) "bookings after the restart in place"
kvr_assert_eq "$(rd_q "${HP[$F]}" .index.digest)" "$(rd_q "${HP[$L]}" .index.digest)" "index digest after the restart in place"
kvr_log "r$F restarted in place (pid $pid) and converged"

# a router stopped (SIGTERM) while it holds FREEs hands them over first: 40 bookings; both
# followers paused (SIGSTOP), so the leader can commit nothing and the FREEs the queue group
# gives it wait there; SIGTERM the leader, resume the followers 0.3 s later: every booking is
# freed (before, the stopping leader dropped the commands it had not proposed yet: those
# bookings stayed until --max-request-age)
for k in $(seq 1 40); do printf 'route m1 ns1 7 256 held-%d\n' "$k"; done | "$PUB" --nats "$NATS_URL" >"$KVR_TMP/held.out"
kvr_assert_eq "$(grep -c '^route ok=1' "$KVR_TMP/held.out")" 40 "40 bookings to free"
L=$(wait_leader 10 0 1 2 3) || kvr_fail "no leader before the stop"
FOL=()
for i in 1 2 3; do [ "$i" != "$L" ] && FOL+=("$i"); done
kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[${FOL[0]}]}/v1/state | jq -r .bookings)\" = $((N + 45)) ]" ||
    kvr_fail "r${FOL[0]} bookings before the stop: $(rd_q "${HP[${FOL[0]}]}" .bookings)"
for i in "${FOL[@]}"; do kill -STOP "$(kvr_pid "r$i")"; done
for k in $(seq 1 40); do printf 'rev held-%d free\n' "$k"; done | "$PUB" --nats "$NATS_URL" >/dev/null
sleep 0.1
kill -TERM "$(kvr_pid "r$L")"
sleep 0.3
for i in "${FOL[@]}"; do kill -CONT "$(kvr_pid "r$i")"; done
stopped() { ! kvr_alive "r$L"; }
kvr_wait_for 10 stopped || kvr_fail "r$L did not stop"
grep -E 'msg="(stopping: handing over first|handed over|hand-over not finished)' "$KVR_TMP/r$L.log" | tail -2 >&2
start "$L"
kvr_wait_http "http://127.0.0.1:${HP[$L]}/ready" 30
kvr_wait_for 20 converged || kvr_fail "replicas did not converge after r$L stopped"
kvr_assert_eq "$(rd_q "${HP[$L]}" .bookings)" $((N + 5)) "bookings after FREEs held by a stopping leader"

# membership through the admin API: add router 4 (started with --join), promote, remove
rd_start r4 4 "${HP[4]}" "$KVR_TMP/r4" --raft-addr "$A4" --peers "$PEERS" --join --cluster-secret-file "$KVR_TMP/secret"
kvr_wait_http "http://127.0.0.1:${HP[4]}/ready" 30
L=$(wait_leader 10 0 1 2 3) || kvr_fail "no leader before membership change"
F=1; [ "$L" = 1 ] && F=2
code=$(rd_post "${HP[$F]}" /admin/raft/add -o /dev/null -w '%{http_code}' -d "{\"id\":4,\"raft_addr\":\"$A4\"}")
kvr_assert_eq "$code" 409 "add on a follower is refused"
kvr_assert_eq "$(rd_post "${HP[$L]}" /admin/raft/add -d "{\"id\":4,\"raft_addr\":\"$A4\"}" | jq -r .ok)" true "add node 4"
kvr_assert_eq "$(rd_post "${HP[$L]}" /admin/raft/promote -d '{"id":4}' | jq -r .ok)" true "promote node 4"
kvr_wait_for 15 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[4]}/v1/state | jq -r .raft.fsm_digest)\" = \"$(rd_q "${HP[$L]}" .raft.fsm_digest)\" ]" ||
    kvr_fail "node 4 did not catch up"
kvr_assert_eq "$(rd_q "${HP[4]}" .bookings)" $((N + 5)) "node 4 bookings"
kvr_assert_eq "$(rd_post "${HP[$L]}" /admin/raft/remove -d '{"id":4}' | jq -r .ok)" true "remove node 4"
kvr_pass
