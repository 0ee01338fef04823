#!/usr/bin/env bash
# A leader commits WORKER_DOWN and dies before its AllBlocksCleared is in the stream (here: NATS
# refuses its publishes on kvr.kv.>, then it is SIGKILLed). Its successor must send the clear:
# within a few sweeps the down worker's entries are gone on the routers left, with equal
# digests. Before (no sweep), the clear was never sent and the entries stayed for good.
# Routers connect as users r1..r3 (user/password in the URL); only the leader's user is
# denied kvr.kv.>, by a configuration reload once the leader is known.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_clear_takeover
[ -x "$KVR_BIN/kvr-routerd" ] || kvr_fail "no kvr-routerd"
auth() { # auth DENIED_ROUTER (0: none): the authorization block
    local i perm
    echo 'authorization { users = ['
    for i in 1 2 3; do
        perm=''
        [ "$i" = "$1" ] && perm=', permissions: { publish: { deny: ["kvr.kv.>"] } }'
        echo "  { user: r$i, password: pw$i$perm },"
    done
    echo '  { user: other, password: pwo } ] }'
}
KVR_NATS_EXTRA_CONF=$(auth 0) kvr_start_nats
BASE=$NATS_URL
NATS_URL="nats://other:pwo@${BASE#nats://}"
read -r A1 A2 A3 <<<"$(rd_raft_ports 3)"
[ -n "$A3" ] || kvr_fail "no free raft ports"
PEERS="1@$A1,2@$A2,3@$A3"
declare -A HP RA
HP[1]=$(kvr_free_port); HP[2]=$(kvr_free_port); HP[3]=$(kvr_free_port)
RA[1]=$A1; RA[2]=$A2; RA[3]=$A3
rd_secret "$KVR_TMP/secret"
start() {
    NATS_URL="nats://r$1:pw$1@${BASE#nats://}" rd_start "r$1" "$1" "${HP[$1]}" "$KVR_TMP/r$1" \
        --raft-addr "${RA[$1]}" --peers "$PEERS" --cluster-secret-file "$KVR_TMP/secret" \
        --heartbeat-misses 2 --election-timeout 500ms
}
leader_of() { rd_q "${HP[$1]}" .raft.leader 2>/dev/null; }
rd_beat beat1 ns1 1
rd_beat beat2 ns1 2
for i in 1 2 3; do start $i; done
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 20; done
seq=$(rd_pub "store ns1 1 array int 7 0 2" "store ns1 2 array int 9 0 3")
for i in 1 2 3; do rd_wait_seq "${HP[$i]}" "$seq"; done
for i in 1 2 3; do rd_wait_workers_up "${HP[$i]}" 2 10 || kvr_fail "r$i: workers not up"; done
L=
for ((k = 0; k < 100; k++)); do
    L=$(leader_of 1)
    [ -n "$L" ] && [ "$L" != 0 ] && [ "$L" != null ] && [ "$(leader_of 2)" = "$L" ] && [ "$(leader_of 3)" = "$L" ] && break
    L=
    sleep 0.1
done
[ -n "$L" ] || kvr_fail "no leader"
# the leader may no longer publish on kvr.kv.> (nats-server applies a reload to connected clients)
auth "$L" >"$KVR_TMP/auth.conf"
{ sed '/^authorization/,$d' "$NATS_DIR/nats.conf"; cat "$KVR_TMP/auth.conf"; } >"$KVR_TMP/nats.conf.new"
mv "$KVR_TMP/nats.conf.new" "$NATS_DIR/nats.conf"
kill -HUP "$(kvr_pid nats)"
kvr_wait_for 5 grep -q "Reloaded" "$KVR_TMP/nats.log" || kvr_fail "nats-server did not reload: $(tail -3 "$KVR_TMP/nats.log")"
kvr_log "leader r$L denied kvr.kv.>"

# worker 2 dies; the leader commits its WORKER_DOWN but cannot get the clear into the stream
kvr_kill9 beat2
committed() { grep -q "worker down committed" "$KVR_TMP/r$L.log"; }
kvr_wait_for 15 committed || kvr_fail "r$L never committed worker 2 down"
sleep 1
m=$(rd_match "${HP[$L]}" 9 192)
kvr_log "after the commit on r$L: $m"
[ "$m" = '{"2":3}' ] || kvr_fail "the leader's clear got through although denied: $m"
t0=$(date +%s%3N)
kvr_kill9 "r$L"
LIVE=()
for i in 1 2 3; do [ "$i" != "$L" ] && LIVE+=("$i"); done
gone() { local i; for i in "${LIVE[@]}"; do [ "$(rd_match "${HP[$i]}" 9 192)" = '{}' ] || return 1; done; }
kvr_wait_for 30 gone || kvr_fail "worker 2's entries still on the routers left: $(rd_match "${HP[${LIVE[0]}]}" 9 192) / $(rd_match "${HP[${LIVE[1]}]}" 9 192)"
kvr_log "worker 2's entries gone on r${LIVE[0]} and r${LIVE[1]} $(($(date +%s%3N) - t0)) ms after the leader died"
kvr_assert_eq "$(rd_match "${HP[${LIVE[0]}]}" 7 128)" '{"1":2}' "worker 1 kept"
kvr_assert_eq "$(rd_q "${HP[${LIVE[0]}]}" .index.digest)" "$(rd_q "${HP[${LIVE[1]}]}" .index.digest)" "same digest"
kvr_pass
