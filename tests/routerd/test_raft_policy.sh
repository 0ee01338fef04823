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
for i in 1 2 3; do
    # shellcheck disable=SC2086
    rd_start "r$i" "$i" "${HP[$i]}" "$KVR_TMP/r$i" --raft-addr "${RA[$i]}" --peers "$PEERS" \
        $AUTH_ARGS --frontend-timeout 2s --max-request-age 8s
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
kvr_pass
