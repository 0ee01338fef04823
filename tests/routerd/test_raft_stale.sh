#!/usr/bin/env bash
# Issue 18 defect 5: a worker that dies while every router is down must not live on. Three
# routers in one Raft group, two workers (real heartbeat processes) with KV entries in every
# router's index; all routers stop (final LMDB snapshot), worker 2 is SIGKILLed, the routers
# come back (Raft log/snapshot still says worker 2 is up, the LMDB snapshot still holds its
# entries). Within the worker ttl (--heartbeat-misses 3 s) + a few seconds: no route goes to
# worker 2, the leader alone has declared it down (followers propose no WORKER_DOWN), its index
# entries are gone on every router, and all three booking digests and index digests are equal.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_raft_stale
[ -x "$KVR_BIN/kvr-routerd" ] || kvr_fail "no kvr-routerd"
kvr_start_nats
read -r A1 A2 A3 <<<"$(rd_raft_ports 3)"
[ -n "$A3" ] || kvr_fail "no free raft ports"
PEERS="1@$A1,2@$A2,3@$A3"
declare -A HP RA
HP[1]=$(kvr_free_port); HP[2]=$(kvr_free_port); HP[3]=$(kvr_free_port)
RA[1]=$A1; RA[2]=$A2; RA[3]=$A3
rd_secret "$KVR_TMP/secret"
# --raft-log disk: the scenario needs the registry to survive the restart in the Raft log (with
# the memory log, the default, a whole-group restart starts with an empty registry instead).
start() { rd_start "r$1" "$1" "${HP[$1]}" "$KVR_TMP/r$1" --raft-log disk --raft-addr "${RA[$1]}" --peers "$PEERS" --snapshot-interval 1s --cluster-secret-file "$KVR_TMP/secret" --heartbeat-misses 3; }
leader_of() { rd_q "${HP[$1]}" .raft.leader 2>/dev/null; }
one_leader() { # prints the leader all three agree on
    local l
    l=$(leader_of 1)
    [ -n "$l" ] && [ "$l" != 0 ] && [ "$l" != null ] && [ "$(leader_of 2)" = "$l" ] && [ "$(leader_of 3)" = "$l" ] && echo "$l"
}
up_ids() { rd_state "${HP[$1]}" | jq -c '[.workers[] | select(.up) | .id] | sort'; }

rd_beat beat1 ns1 1
rd_beat beat2 ns1 2
for i in 1 2 3; do start $i; done
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 20; done
# worker 2 holds the longer prefix: the cost prefers it whenever it is up
seq=$(rd_pub "store ns1 1 array int 7 0 2" "store ns1 2 array int 7 0 4")
for i in 1 2 3; do rd_wait_seq "${HP[$i]}" "$seq"; done
wait_leader() { local k; for ((k = 0; k < 200; k++)); do one_leader && return 0; sleep 0.1; done; return 1; }
wait_leader >/dev/null || kvr_fail "no leader"
for i in 1 2 3; do
    kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$i]}/v1/state | jq -c '[.workers[] | select(.up) | .id] | sort')\" = '[1,2]' ]" ||
        kvr_fail "r$i: workers not up: $(up_ids "$i")"
done
out=$(printf 'route m1 ns1 7 256 warm-1\n' | "$PUB" --nats "$NATS_URL" | grep '^route')
case "$out" in "route ok=1 worker=2 "*) ;; *) kvr_fail "before the restart worker 2 should win: $out" ;; esac
sleep 2 # an LMDB snapshot with both workers' entries on every router

# all routers stop; worker 2 dies while none runs; the routers come back
for i in 1 2 3; do kvr_term "r$i" 10; done
kvr_kill9 beat2
sleep 1
t0=$(date +%s%3N)
for i in 1 2 3; do start $i; done
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 30; done
for i in 1 2 3; do
    grep -q 'snapshot loaded' "$KVR_TMP/r$i.log" || kvr_fail "r$i did not load its LMDB snapshot"
done

# routes during and after the grace: from t0 + ttl + 5 s on, none may go to worker 2
BOUND_MS=10000
bad=0 total=0 late=0
for ((k = 0; k < 30; k++)); do
    out=$(printf 'route m1 ns1 7 256 after-%02d\n' "$k" | "$PUB" --nats "$NATS_URL" | grep '^route')
    now=$(date +%s%3N)
    total=$((total + 1))
    case "$out" in
    "route ok=1 worker=2 "*)
        bad=$((bad + 1))
        [ $((now - t0)) -gt "$BOUND_MS" ] && late=$((late + 1))
        kvr_log "t+$((now - t0)) ms: routed to the dead worker: $out" ;;
    esac
    [ $((now - t0)) -gt $((BOUND_MS + 3000)) ] && [ "$k" -ge 15 ] && break
    sleep 0.5
done
kvr_log "routes to the dead worker: $bad of $total ($late after ${BOUND_MS} ms)"
[ "$late" = 0 ] || kvr_fail "$late routes went to the dead worker more than ${BOUND_MS} ms after the restart"
out=$(printf 'route m1 ns1 7 256 final-1\n' | "$PUB" --nats "$NATS_URL" | grep '^route')
case "$out" in "route ok=1 worker=1 "*) ;; *) kvr_fail "a route after the grace: $out" ;; esac

# the replicated registry, the indexes and all digests agree
for i in 1 2 3; do
    kvr_assert_eq "$(up_ids "$i")" "[1]" "r$i workers up"
    kvr_assert_eq "$(rd_match "${HP[$i]}" 7 256)" '{"1":2}' "r$i index matches (the dead worker's snapshot entries gone)"
done
same() {
    local f=$1 a b c
    a=$(rd_q "${HP[1]}" "$f"); b=$(rd_q "${HP[2]}" "$f"); c=$(rd_q "${HP[3]}" "$f")
    [ -n "$a" ] && [ "$a" != null ] && [ "$a" = "$b" ] && [ "$b" = "$c" ]
}
kvr_wait_for 5 same .raft.fsm_digest || kvr_fail "booking digests differ: $(for i in 1 2 3; do rd_q "${HP[$i]}" .raft.fsm_digest; done | tr '\n' ' ')"
kvr_wait_for 5 same .index.digest || kvr_fail "index digests differ: $(for i in 1 2 3; do rd_q "${HP[$i]}" .index.digest; done | tr '\n' ' ')"
# one owner: only the leader logged a liveness WORKER_DOWN after the restart
L=$(wait_leader) || kvr_fail "no agreed leader at the end"
total_down=0
for i in 1 2 3; do
    n=$(grep -c 'sync worker down: not heard' "$KVR_TMP/r$i.log" || true)
    kvr_log "r$i (leader now: $L): liveness WORKER_DOWN proposals logged: $n"
    total_down=$((total_down + n))
done
[ "$total_down" -ge 1 ] || kvr_fail "no leader proposed WORKER_DOWN for the dead worker"
[ "$(grep -c 'sync worker down: not heard' "$KVR_TMP/r$L.log" || true)" -ge 1 ] ||
    kvr_log "note: leadership moved after the WORKER_DOWN was proposed"

# The same rule without Raft (one router, its own state): entries of a worker that died while
# the router was down, loaded from its LMDB snapshot, go one TTL after ready.
HP[4]=$(kvr_free_port)
rd_beat beat3 ns1 3
rd_start r4 4 "${HP[4]}" "$KVR_TMP/r4" --snapshot-interval 1s --heartbeat-misses 3
kvr_wait_http "http://127.0.0.1:${HP[4]}/ready" 20
seq=$(rd_pub "store ns1 3 array int 9 0 3")
rd_wait_seq "${HP[4]}" "$seq"
kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[4]}/v1/state | jq -c '[.workers[] | select(.up) | .id] | sort')\" = '[1,3]' ]" ||
    kvr_fail "r4: workers not up: $(up_ids 4)"
kvr_assert_eq "$(rd_match "${HP[4]}" 9 192)" '{"3":3}' "r4 index before the restart"
sleep 2
kvr_term r4 10
kvr_kill9 beat3
rd_start r4 4 "${HP[4]}" "$KVR_TMP/r4" --snapshot-interval 1s --heartbeat-misses 3
kvr_wait_http "http://127.0.0.1:${HP[4]}/ready" 20
t1=$(date +%s%3N)
kvr_assert_eq "$(grep -c 'snapshot loaded' "$KVR_TMP/r4.log")" 1 "r4 loaded its LMDB snapshot"
kvr_wait_for 8 bash -c "[ \"\$(\"$PUB\" tokens 9 192 | curl -s -X POST -H 'Authorization: Bearer $(cat "$KVR_TMP/admin-token")' --data @- http://127.0.0.1:${HP[4]}/v1/match | jq -cS .overlaps)\" = '{}' ]" ||
    kvr_fail "r4 still matches the dead worker's snapshot entries: $(rd_match "${HP[4]}" 9 192)"
kvr_log "local mode: the dead worker's snapshot entries gone $(($(date +%s%3N) - t1)) ms after ready"
kvr_pass
