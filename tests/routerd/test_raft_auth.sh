#!/usr/bin/env bash
# Router peers authenticate each other (issue 18, defect 2). Three real routers with a cluster
# secret book requests; then
#  (a) a raw TCP client sends a valid forwarded EXPIRE (before = far future, which frees every
#      booking if applied) to every router's forward port without the handshake, and again
#      after a handshake with a wrong secret: refused, bookings and digests unchanged;
#  (b) a 4th router with the wrong secret cannot join (its Raft connections are refused, it
#      never receives the log), and a wrong-keyed handshake on a Raft port is refused;
#  (c) the group still works: requests to followers are forwarded, digests equal;
#  positive control: the same EXPIRE after a handshake with the right secret IS applied.
# Without the fix (AUTH_ARGS="" against a build with no peer auth) (a) fails: the EXPIRE frees
# every booking on every replica.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_raft_auth
[ -x "$KVR_BIN/kvr-routerd" ] || kvr_fail "no kvr-routerd"
PEER="/usr/bin/python3 $(dirname "$0")/raft_peer.py"
kvr_start_nats
read -r A1 A2 A3 A4 <<<"$(rd_raft_ports 4)"
[ -n "$A4" ] || kvr_fail "no free raft ports"
PEERS="1@$A1,2@$A2,3@$A3"
declare -A HP RA
for i in 1 2 3 4; do HP[$i]=$(kvr_free_port); done
RA[1]=$A1; RA[2]=$A2; RA[3]=$A3; RA[4]=$A4
fport() { echo $((${RA[$1]##*:} + 1)); }
rport() { echo "${RA[$1]##*:}"; }
rd_secret "$KVR_TMP/secret"
rd_secret "$KVR_TMP/wrong"
AUTH_ARGS=${AUTH_ARGS---cluster-secret-file $KVR_TMP/secret}
# shellcheck disable=SC2086
start() { rd_start "r$1" "$1" "${HP[$1]}" "$KVR_TMP/r$1" --raft-addr "${RA[$1]}" --peers "$PEERS" $AUTH_ARGS; }

# a multi-router group without a secret is refused unless --insecure-cluster
if [ -n "$AUTH_ARGS" ]; then
    timeout 10 "$KVR_BIN/kvr-routerd" --id 1 --nats "$NATS_URL" --http 127.0.0.1:1 --data-dir "$KVR_TMP/x" \
        --raft-addr "$A1" --peers "$PEERS" >"$KVR_TMP/nosecret.out" 2>&1
    kvr_assert_eq "$?" 2 "multi-router group without --cluster-secret-file"
    grep -q "cluster-secret-file" "$KVR_TMP/nosecret.out" || kvr_fail "no error message naming --cluster-secret-file"
fi

rd_beat beat1 ns1 1
rd_beat beat2 ns1 2
for i in 1 2 3; do start $i; done
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 20; done
L=$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")
[ -n "$L" ] || kvr_fail "no common leader"
rd_wait_workers_up "${HP[$L]}" 2 10 || kvr_fail "workers not up"

# (c) 60 bookings (route requests over NATS land on every router: followers forward them)
N=60
for ((k = 1; k <= N; k++)); do printf 'route m1 ns1 7 256 auth-%03d\n' "$k"; done >"$KVR_TMP/routes.txt"
"$PUB" --nats "$NATS_URL" <"$KVR_TMP/routes.txt" >"$KVR_TMP/routes.out" 2>&1 || kvr_fail "route client failed"
kvr_assert_eq "$(grep -c '^route ok=1' "$KVR_TMP/routes.out")" "$N" "routes answered"
for i in 1 2 3; do
    kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$i]}/v1/state | jq -r .bookings)\" = $N ]" ||
        kvr_fail "r$i bookings $(rd_q "${HP[$i]}" .bookings), want $N"
done
D=$(rd_q "${HP[$L]}" .raft.fsm_digest)

# (a) raw EXPIRE without the handshake, and with a wrong-keyed one, on every forward port
for i in 1 2 3; do
    out=$($PEER expire 127.0.0.1 "$(fport $i)")
    kvr_log "r$i forward port, no handshake: $out"
    [ "$out" = closed ] || kvr_fail "r$i forward port answered an unauthenticated EXPIRE: $out"
    out=$($PEER expire 127.0.0.1 "$(fport $i)" "$KVR_TMP/wrong")
    kvr_log "r$i forward port, wrong secret: $out"
    case "$out" in handshake-refused*closed) ;; *) kvr_fail "r$i forward port, wrong secret: $out" ;; esac
done
sleep 1 # an applied EXPIRE would have committed on every replica by now (one Raft round trip)
for i in 1 2 3; do
    kvr_assert_eq "$(rd_q "${HP[$i]}" .bookings)" "$N" "r$i bookings after hostile EXPIREs"
    kvr_assert_eq "$(rd_q "${HP[$i]}" .raft.fsm_digest)" "$D" "r$i digest after hostile EXPIREs"
done

# (b) wrong-keyed handshake on a Raft port; a router with the wrong secret cannot join
for i in 1 2 3; do
    out=$($PEER hello 127.0.0.1 "$(rport $i)" "$KVR_TMP/wrong" 1)
    kvr_assert_eq "$out" refused "r$i raft port, wrong secret"
    out=$($PEER hello 127.0.0.1 "$(rport $i)" "$KVR_TMP/secret" 1)
    kvr_assert_eq "$out" ok "r$i raft port, right secret (handshake control)"
done
rd_start r4 4 "${HP[4]}" "$KVR_TMP/r4" --raft-addr "${RA[4]}" --peers "$PEERS" --join \
    --cluster-secret-file "$KVR_TMP/wrong"
kvr_wait_http "http://127.0.0.1:${HP[4]}/health" 20
# with the admin token: the leader really tries to bring r4 in, and must refuse its handshake
rd_token >/dev/null
code=$(curl -s -o "$KVR_TMP/add.out" -w '%{http_code}' -X POST --max-time 10 "${RD_AUTH[@]}" \
    --data "{\"id\":4,\"raft_addr\":\"${RA[4]}\"}" "http://127.0.0.1:${HP[$L]}/admin/raft/add")
kvr_log "add r4 (wrong secret): HTTP $code $(cat "$KVR_TMP/add.out")"
sleep 3
kvr_assert_eq "$(rd_q "${HP[4]}" .raft.applied_index)" 0 "r4 (wrong secret) applied entries"
[ "$(rd_q "${HP[4]}" .bookings)" = 0 ] || kvr_fail "r4 (wrong secret) received bookings"
grep -q "raft peer refused: failed authentication" "$KVR_TMP/r$L.log" ||
    kvr_fail "leader did not log refusing r4"
kvr_kill9 r4

# (c) still one working group: more routes, digests equal on the three
for ((k = 1; k <= 20; k++)); do printf 'route m1 ns1 7 256 after-%03d\n' "$k"; done |
    "$PUB" --nats "$NATS_URL" >"$KVR_TMP/routes2.out" 2>&1 || kvr_fail "route client failed"
kvr_assert_eq "$(grep -c '^route ok=1' "$KVR_TMP/routes2.out")" 20 "routes after the attacks"
for i in 1 2 3; do
    kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$i]}/v1/state | jq -r .bookings)\" = $((N + 20)) ]" ||
        kvr_fail "r$i bookings $(rd_q "${HP[$i]}" .bookings), want $((N + 20))"
done
D=$(rd_q "${HP[$L]}" .raft.fsm_digest)
for i in 1 2 3; do kvr_assert_eq "$(rd_q "${HP[$i]}" .raft.fsm_digest)" "$D" "r$i digest"; done

# positive control: with the right secret the same EXPIRE is accepted and frees everything,
# so the refusals above are the authentication, not a broken frame
out=$($PEER expire 127.0.0.1 "$(fport $L)" "$KVR_TMP/secret")
kvr_assert_eq "$out" "reply status=0" "EXPIRE with the right secret"
for i in 1 2 3; do
    kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$i]}/v1/state | jq -r .bookings)\" = 0 ]" ||
        kvr_fail "r$i: authenticated EXPIRE not applied"
done
kvr_pass
