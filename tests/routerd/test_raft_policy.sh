#!/usr/bin/env bash
# Lease and request-age policy with Raft (issue 18, defect 13). Three real routers with
# --frontend-timeout 2s --max-request-age 8s, frontend 77 beating every 200 ms:
#  1. an idle group with a beating frontend commits (almost) nothing: the leader alone proposes
#     FRONTEND_SEEN, and only while the replicated table lacks the frontend, and EXPIRE only
#     when a booking is over age (before: every router proposed FRONTEND_SEEN for every beat,
#     ~15 entries/s here, and every router its own EXPIRE);
#  2. --max-request-age takes effect: bookings of a live frontend go after ~8 s, not 600 s;
#  3. --frontend-timeout takes effect: when the frontend stops beating its bookings go within
#     ~2 s + a housekeeping period, well before their age would free them.
# And the route policy (DESIGN section 6): the routers run different --load-weight (0, 50, 20);
#  4. a follower whose weight differs from the leader's routes by the leader's: six requests
#     whose 8 blocks worker 1 caches go all to worker 1 under load weight 0 and alternate
#     1 2 1 2 1 2 under 50 or 20 (before: a ROUTE carried the answering router's own weights);
#     every router shows its own flags ("cost") and the leader's as the policy ("cost_policy");
#  5. after the leader is killed the new leader's flags become the policy on both survivors.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_raft_policy
[ -x "$KVR_BIN/kvr-routerd" ] || kvr_fail "no kvr-routerd"
kvr_start_nats
read -r A1 A2 A3 <<<"$(rd_raft_ports 3)"
[ -n "$A3" ] || kvr_fail "no free raft ports"
PEERS="1@$A1,2@$A2,3@$A3"
declare -A HP RA
for i in 1 2 3; do HP[$i]=$(kvr_free_port); done
RA[1]=$A1; RA[2]=$A2; RA[3]=$A3
rd_secret "$KVR_TMP/secret"
AUTH_ARGS=${AUTH_ARGS---cluster-secret-file $KVR_TMP/secret} # "" to run against builds before peer auth
LW=(x 0 50 20) # each router's --load-weight (index = router id)
for i in 1 2 3; do
    # shellcheck disable=SC2086
    rd_start "r$i" "$i" "${HP[$i]}" "$KVR_TMP/r$i" --raft-addr "${RA[$i]}" --peers "$PEERS" \
        $AUTH_ARGS --frontend-timeout 2s --max-request-age 8s --load-weight "${LW[$i]}"
done
rd_beat beat1 ns1 1
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 20; done
L=$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")
[ -n "$L" ] || kvr_fail "no common leader"
rd_wait_workers_up "${HP[$L]}" 1 10 || kvr_fail "worker not up"

# frontend 77 (the id kvr-test-pub's route requests carry) beats every 200 ms
for ((k = 0; k < 600; k++)); do printf 'raw kvr.frontends.77 c0\nsleep 200\n'; done >"$KVR_TMP/beats.txt"
# (a background job's stdin is /dev/null: redirect inside the spawned shell)
kvr_spawn fe77 bash -c 'exec "$0" --nats "$1" --core <"$2"' "$PUB" "$NATS_URL" "$KVR_TMP/beats.txt"
sleep 2 # the first beats: the leader proposes one FRONTEND_SEEN
wait_bookings() { # wait_bookings N SECONDS: every replica holds N bookings
    local i
    for i in 1 2 3; do
        kvr_wait_for "$2" bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$i]}/v1/state | jq -r .bookings)\" = $1 ]" ||
            return 1
    done
}

# 1. idle group, beating frontend: commit index flat
c0=$(rd_q "${HP[$L]}" .raft.commit_index)
sleep 3
c1=$(rd_q "${HP[$L]}" .raft.commit_index)
kvr_log "commit index over 3 s idle with frontend 77 beating 5/s: $c0 -> $c1"
[ $((c1 - c0)) -le 1 ] || kvr_fail "idle group committed $((c1 - c0)) entries in 3 s (lease beats or expiries proposed for nothing)"

# 2. max request age: bookings of a live frontend expire after ~8 s
for ((k = 1; k <= 10; k++)); do printf 'route m1 ns1 7 256 age-%03d\n' "$k"; done |
    "$PUB" --nats "$NATS_URL" >"$KVR_TMP/r1.out" 2>&1 || kvr_fail "route client failed"
kvr_assert_eq "$(grep -c '^route ok=1' "$KVR_TMP/r1.out")" 10 "routes answered"
t0=$(date +%s%3N)
wait_bookings 10 10 || kvr_fail "bookings not replicated"
sleep 4
kvr_assert_eq "$(rd_q "${HP[$L]}" .bookings)" 10 "bookings of a live frontend at 4 s (age 8 s, lease 2 s)"
wait_bookings 0 20 || kvr_fail "bookings older than --max-request-age 8s not expired"
t1=$(date +%s%3N)
kvr_log "bookings expired by age after $((t1 - t0)) ms"
[ $((t1 - t0)) -ge 7000 ] || kvr_fail "bookings expired after $((t1 - t0)) ms, before their age"

# 3. frontend timeout: stop beating -> bookings go after ~2 s, long before 8 s
for ((k = 1; k <= 10; k++)); do printf 'route m1 ns1 7 256 lease-%03d\n' "$k"; done |
    "$PUB" --nats "$NATS_URL" >"$KVR_TMP/r2.out" 2>&1 || kvr_fail "route client failed"
wait_bookings 10 10 || kvr_fail "bookings not replicated"
kvr_kill9 fe77
t0=$(date +%s%3N)
wait_bookings 0 15 || kvr_fail "bookings of a silent frontend not freed"
t1=$(date +%s%3N)
kvr_log "silent frontend's bookings freed after $((t1 - t0)) ms"
[ $((t1 - t0)) -le 6000 ] || kvr_fail "lease expiry took $((t1 - t0)) ms with --frontend-timeout 2s"
D=$(rd_q "${HP[$L]}" .raft.fsm_digest)
for i in 1 2 3; do kvr_assert_eq "$(rd_q "${HP[$i]}" .raft.fsm_digest)" "$D" "r$i digest"; done

# 4. the leader's weights route a follower's requests
if [ "$L" = 1 ]; then F=2; else F=1; fi # load weight 0 on one side, > 0 on the other
rd_beat beat2 ns1 2
for i in 1 2 3; do rd_wait_workers_up "${HP[$i]}" 2 10 || kvr_fail "r$i: worker 2 not up"; done
seq=$(rd_pub "store ns1 1 array int 31 0 8") # worker 1 caches blocks 0-7 of prefix 31
rd_wait_seq "${HP[$F]}" "$seq"
body=$("$PUB" tokens 31 512 | jq -c '. + {model:"m1",namespace:"ns1"}')
got=""
for ((k = 1; k <= 6; k++)); do
    got="$got $(rd_post "${HP[$F]}" /v1/route --data "$body" | jq -r .worker_id)"
done
got=${got# }
if [ "${LW[$L]}" = 0 ]; then want="1 1 1 1 1 1"; else want="1 2 1 2 1 2"; fi
kvr_log "leader r$L (load weight ${LW[$L]}), follower r$F (${LW[$F]}): workers $got"
kvr_assert_eq "$got" "$want" "workers booked for follower r$F's requests (leader's load weight ${LW[$L]})"
wait_policy() { # wait_policy ROUTER LEADER: ROUTER shows LEADER's flags as the policy
    kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$1]}/v1/state | jq -r .cost_policy.set_by)\" = $2 ]" ||
        kvr_fail "r$1: policy not set by r$2: $(rd_q "${HP[$1]}" .cost_policy)"
    kvr_assert_eq "$(rd_q "${HP[$1]}" .cost_policy.load_weight)" "${LW[$2]}" "r$1 policy load weight"
    kvr_assert_eq "$(rd_q "${HP[$1]}" .cost.load_weight)" "${LW[$1]}" "r$1 own --load-weight"
    kvr_assert_eq "$(rd_q "${HP[$1]}" .cost_policy.matches_flags)" "$([ "$1" = "$2" ] && echo true || echo false)" \
        "r$1 policy matches its flags"
}
for i in 1 2 3; do wait_policy "$i" "$L"; done
wait_bookings 6 5 || kvr_fail "routes not replicated"
D=$(rd_q "${HP[$L]}" .raft.fsm_digest)
for i in 1 2 3; do kvr_assert_eq "$(rd_q "${HP[$i]}" .raft.fsm_digest)" "$D" "r$i digest after routing"; done

# 5. leader change: the new leader's flags become the policy
kvr_kill9 "r$L"
S=()
for i in 1 2 3; do [ "$i" = "$L" ] || S+=("$i"); done
L2=""
for ((k = 0; k < 30 && (${#L2} == 0 || L2 == L); k++)); do # the survivors name r$L for a while
    L2=$(rd_common_leader "${HP[${S[0]}]}" "${HP[${S[1]}]}")
    [ "$L2" = "$L" ] && sleep 0.5
done
[ -n "$L2" ] && [ "$L2" != "$L" ] || kvr_fail "no new leader after killing r$L (got '$L2')"
for i in "${S[@]}"; do wait_policy "$i" "$L2"; done
kvr_log "after r$L was killed: leader r$L2, policy load weight $(rd_q "${HP[$L2]}" .cost_policy.load_weight)"
D=$(rd_q "${HP[$L2]}" .raft.fsm_digest)
for i in "${S[@]}"; do kvr_assert_eq "$(rd_q "${HP[$i]}" .raft.fsm_digest)" "$D" "r$i digest after the leader change"; done
kvr_pass
