#!/usr/bin/env bash
# --index approx (issue 14 item 4): for workers that publish no KV events the router assumes
# the worker a request was booked on now holds its blocks. Real nats-server, kvr-routerd and
# kvr-test-pub heartbeats (workers without events) plus one worker publishing real events.
#   test_approx.sh local   one router:
#     1. the same prefix routed twice (the first freed) goes to the same worker, overlap 4;
#     2. a worker's capacity (heartbeat capacity_blocks 8) evicts its LRU blocks;
#     3. guesses older than --approx-ttl are not matched, and the next apply drops them;
#     4. mixed pool: a worker with events keeps its event entries (a guess does not hide a
#        removal it published);
#   test_approx.sh raft    three routers in one Raft group: step 1 through whichever router
#     the queue group picks, then every router holds the same approximate index (digest),
#     entries included.
# ROUTER_INDEX=events runs the same steps in event mode: they fail (no guesses).
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
MODE=${1:-local}
kvr_test_init "routerd_approx_$MODE"
[ -x "$KVR_BIN/kvr-routerd" ] || kvr_fail "no kvr-routerd"
INDEX=${ROUTER_INDEX:-approx}
kvr_start_nats
TTL_S=6

declare -A HP
if [ "$MODE" = raft ]; then
    read -r A1 A2 A3 <<<"$(rd_raft_ports 3)"
    [ -n "$A3" ] || kvr_fail "no free raft ports"
    PEERS="1@$A1,2@$A2,3@$A3"
    declare -A RA=([1]=$A1 [2]=$A2 [3]=$A3)
    rd_secret "$KVR_TMP/secret"
    N=3
    for i in 1 2 3; do
        HP[$i]=$(kvr_free_port)
        rd_start "r$i" "$i" "${HP[$i]}" "$KVR_TMP/r$i" --raft-addr "${RA[$i]}" --peers "$PEERS" \
            --cluster-secret-file "$KVR_TMP/secret" --index "$INDEX" --approx-ttl "${TTL_S}s"
    done
else
    N=1
    HP[1]=$(kvr_free_port)
    rd_start r1 1 "${HP[1]}" "$KVR_TMP/r1" --index "$INDEX" --approx-ttl "${TTL_S}s"
fi
P1=${HP[1]}
# ns1: workers 1 and 2, no events; ns2: worker 4, capacity 8 blocks, no events;
# ns3: worker 3 publishes events, worker 5 does not
rd_beat b1 ns1 1
rd_beat b2 ns1 2
KVR_TEST_PUB_CAPACITY=8 rd_beat b4 ns2 4
rd_beat b3 ns3 3
rd_beat b5 ns3 5
for i in $(seq 1 $N); do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 20; done
if [ "$MODE" = raft ]; then
    L=$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")
    [ -n "$L" ] || kvr_fail "no common leader"
fi
for i in $(seq 1 $N); do rd_wait_workers_up "${HP[$i]}" 5 15 || kvr_fail "workers not up on r$i"; done
kvr_assert_eq "$(rd_q "$P1" .index.mode)" "$INDEX" "index.mode"

# route NS P RID: prints "worker overlap router"
route() {
    printf 'route m1 %s %s 256 %s\n' "$1" "$2" "$3" | "$PUB" --nats "$NATS_URL" >"$KVR_TMP/route.out" 2>&1
    grep -q '^route ok=1' "$KVR_TMP/route.out" || kvr_fail "route $*: $(cat "$KVR_TMP/route.out")"
    sed -n 's/^route ok=1 worker=\([0-9]*\) overlap=\([0-9]*\).*router=\([0-9]*\).*/\1 \2 \3/p' "$KVR_TMP/route.out"
}
free() { printf 'rev %s free\n' "$1" | "$PUB" --nats "$NATS_URL" --core >/dev/null 2>&1; }
bookings_zero() {
    local i
    for i in $(seq 1 $N); do
        kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$i]}/v1/state | jq -r .bookings)\" = 0 ]" ||
            kvr_fail "bookings not freed on r$i"
    done
}

# 1. same prefix twice -> same worker, overlap 4 (the first booking freed, so load is equal)
for p in 5 6 7; do
    read -r w1 o1 r1 <<<"$(route ns1 $p "a$p")"
    free "a$p"
    bookings_zero
    read -r w2 o2 r2 <<<"$(route ns1 $p "b$p")"
    free "b$p"
    bookings_zero
    kvr_log "prefix $p: first worker $w1 overlap $o1 (router $r1), again worker $w2 overlap $o2 (router $r2)"
    kvr_assert_eq "$o1" 0 "prefix $p first overlap"
    kvr_assert_eq "$w2" "$w1" "prefix $p routed again: worker"
    kvr_assert_eq "$o2" 4 "prefix $p routed again: overlap"
done
kvr_assert_eq "$(rd_q "$P1" .index.approx.ttl_ms)" $((TTL_S * 1000)) "approx.ttl_ms"
kvr_assert_eq "$(rd_q "$P1" .index.approx.capacity_blocks)" 16384 "approx.capacity_blocks"
kvr_assert_eq "$(rd_q "$P1" .index.approx.entries)" 12 "approx.entries"

if [ "$MODE" = raft ]; then
    D=$(rd_q "${HP[1]}" .index.approx.digest)
    for i in 1 2 3; do
        kvr_wait_for 5 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$i]}/v1/state | jq -r .index.approx.digest)\" = $D ]" ||
            kvr_fail "r$i approx digest $(rd_q "${HP[$i]}" .index.approx.digest), r1 $D"
        kvr_assert_eq "$(rd_q "${HP[$i]}" .index.approx.entries)" 12 "r$i approx entries"
        kvr_assert_eq "$(rd_match "${HP[$i]}" 5 256)" "$(rd_match "$P1" 5 256)" "r$i match of prefix 5"
    done
    kvr_log "3 routers agree: approx digest $D, 12 entries"
    kvr_pass
fi

# 2. capacity: worker 4 holds 8 blocks; a third 4-block prefix evicts the oldest (prefix 20)
for p in 20 21 22; do
    route ns2 $p "c$p" >/dev/null
    free "c$p"
done
kvr_assert_eq "$(rd_match "$P1" 22 256)" '{"4":4}' "prefix 22 on worker 4"
kvr_assert_eq "$(rd_match "$P1" 21 256)" '{"4":4}' "prefix 21 on worker 4"
kvr_assert_eq "$(rd_match "$P1" 20 256)" '{}' "prefix 20 evicted (LRU, capacity 8)"
kvr_assert_eq "$(rd_q "$P1" '.workers[] | select(.id == 4) | .approx_entries')" 8 "worker 4 approx entries"
kvr_assert_eq "$(rd_q "$P1" .index.approx.evicted)" 4 "approx.evicted"
kvr_assert_eq "$(rd_metric "$P1" kvr_routerd_approx_evicted_total)" 4 "evicted metric"

# 4. mixed pool: worker 3 stores prefix 40 through events; routing it books worker 3 (event
# overlap 4), and its guess of 4 blocks does not hide the removal of blocks 2-3 it publishes
SEQ=$(rd_pub "store ns3 3 array int 40 0 4")
rd_wait_seq "$P1" "$SEQ"
read -r w o r <<<"$(route ns3 40 d40)"
free d40
kvr_assert_eq "$w $o" "3 4" "prefix 40 on the event worker"
kvr_assert_eq "$(rd_q "$P1" '.workers[] | select(.id == 3) | .has_events')" true "worker 3 has_events"
kvr_assert_eq "$(rd_q "$P1" '.workers[] | select(.id == 5) | .has_events')" false "worker 5 has_events"
SEQ=$(rd_pub "remove ns3 3 array int 40 2 2")
rd_wait_seq "$P1" "$SEQ"
kvr_assert_eq "$(rd_match "$P1" 40 256)" '{"3":2}' "event worker after its removal"
# a fresh prefix in ns3: a guess counts only for worker 5
read -r w o r <<<"$(route ns3 41 d41)"
free d41
if [ "$w" = 5 ]; then want='{"5":4}'; else want='{}'; fi
kvr_assert_eq "$(rd_match "$P1" 41 256)" "$want" "prefix 41 booked on worker $w"

# 3. TTL: after TTL_S seconds nothing assumed before is matched; the next apply drops it
sleep $((TTL_S + 1))
kvr_assert_eq "$(rd_match "$P1" 5 256)" '{}' "prefix 5 after the TTL"
kvr_assert_eq "$(rd_match "$P1" 21 256)" '{}' "prefix 21 after the TTL"
before=$(rd_q "$P1" .index.approx.entries)
route ns1 50 e50 >/dev/null
free e50
st=$(rd_state "$P1")
kvr_log "after the TTL: entries $before -> $(jq .index.approx.entries <<<"$st"), expired $(jq .index.approx.expired <<<"$st")"
kvr_assert_eq "$(jq .index.approx.entries <<<"$st")" 4 "approx entries after the TTL (prefix 50 only)"
kvr_assert_eq "$(jq .index.approx.expired <<<"$st")" "$before" "approx.expired"
kvr_assert_eq "$(rd_metric "$P1" kvr_routerd_approx_expired_total)" "$before" "expired metric"
kvr_assert_eq "$(rd_metric "$P1" kvr_routerd_approx_inserted_total)" 36 "inserted metric (9 prefixes x 4 blocks)"
kvr_pass
