#!/bin/bash
# chaos_nats_restart_load (issue 18): the only nats-server SIGKILLed under load, restarted 2 s
# later on the same port and store. Two routers, two workers, one frontend. No client request
# may fail (while NATS is down the frontend keeps its workers and chooses locally); afterwards
# no booking leaks (both routers' bookings return to 0), both routers' index digests converge
# and equal each other, and they apply events again. Prints the time to recover.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init chaos_nats_restart_load
source "$(dirname "$0")/nats_lib.sh"
kvr_start_nats
declare -A WPORT
for i in 1 2; do
    WPORT[$i]=$(kvr_free_port)
    kvr_spawn "worker$i" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:${WPORT[$i]} --nats "$NATS_URL" \
        --namespace default --model m1 --id "$i" --speedup 50
done
# three routers in one Raft group (bookings are replicated: a free reaches every replica)
source "$(dirname "$0")/../routerd/rd_lib.sh"
read -r A1 A2 A3 <<<"$(rd_raft_ports 3)"
[ -n "$A3" ] || kvr_fail "no free raft ports"
PEERS="1@$A1,2@$A2,3@$A3"
declare -A RP RA=([1]=$A1 [2]=$A2 [3]=$A3)
for r in 1 2 3; do
    RP[$r]=$(kvr_free_port)
    kvr_spawn "r$r" "$KVR_BIN/kvr-routerd" --id "$r" --nats "$NATS_URL" --http 127.0.0.1:${RP[$r]} \
        --data-dir "$KVR_TMP/r$r" --raft-addr "${RA[$r]}" --peers "$PEERS" \
        --cluster-secret-file "$(kvr_cluster_secret)"
done
for r in 1 2 3; do kvr_wait_http "http://127.0.0.1:${RP[$r]}/ready" 30; done
FP=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$FP --nats "$NATS_URL" --id 1
F=http://127.0.0.1:$FP
kvr_wait_http "$F/health" 10
live2() { curl -s "$F/metrics" | awk '/^kvr_frontend_live_workers / {f=1; ok=($2+0==2)} END {exit !(f && ok)}'; }
kvr_wait_for 15 live2 || kvr_fail "frontend never saw 2 workers"

nc_load_start "$F" 16 4
sleep 5
seq1=$(nc_q "${RP[1]}" .index.stream_seq)
seq2=$(nc_q "${RP[2]}" .index.stream_seq)
kvr_kill9 nats
kvr_log "nats-server SIGKILLed (routers at stream seq $seq1, $seq2)"
sleep 2
kvr_start_nats
t0=$(nc_now_ms)
kvr_log "nats-server restarted"
resumed() {
    [ "$(nc_q "${RP[1]}" .index.stream_seq)" -gt "$seq1" ] &&
        [ "$(nc_q "${RP[2]}" .index.stream_seq)" -gt "$seq2" ]
}
kvr_wait_for 30 resumed || kvr_fail "routers never applied an event after the restart"
t1=$(nc_now_ms)
nc_load_wait
nc_load_report || kvr_fail "client requests failed around the nats-server restart"
routed=$(curl -s "$F/metrics" | awk '$1 == "kvr_frontend_route_requests_total" {print $2}')
kvr_log "frontend: route requests ${routed:-?}; fallbacks: $(curl -s "$F/metrics" | grep '^kvr_frontend_route_fallback_total' | tr '\n' ' ')"
# no booking leaks: every booking made for the load is freed
no_bookings() {
    local r
    for r in 1 2 3; do [ "$(nc_q "${RP[$r]}" .bookings)" = 0 ] || return 1; done
}
kvr_wait_for 30 no_bookings ||
    kvr_fail "bookings leaked: $(for r in 1 2 3; do echo -n "r$r $(nc_q "${RP[$r]}" .bookings) "; done)"
same() { # index and booking (FSM) digests equal on the three routers
    local a b c
    a=$(nc_state "${RP[1]}" | jq -c '[.index.stream_seq, .index.digest, .index.entries, .raft.fsm_digest]')
    b=$(nc_state "${RP[2]}" | jq -c '[.index.stream_seq, .index.digest, .index.entries, .raft.fsm_digest]')
    c=$(nc_state "${RP[3]}" | jq -c '[.index.stream_seq, .index.digest, .index.entries, .raft.fsm_digest]')
    [ -n "$a" ] && [ "$a" = "$b" ] && [ "$a" = "$c" ]
}
kvr_wait_for 30 same ||
    kvr_fail "digests differ: r1 $(nc_state "${RP[1]}" | jq -c .index) r2 $(nc_state "${RP[2]}" | jq -c .index)"
t2=$(nc_now_ms)
kvr_log "routers' index $(nc_state "${RP[1]}" | jq -c .index)"
kvr_log "RECOVERY: routers applied events again $((t1 - t0)) ms after nats-server restarted (down 2 s); digests equal, no bookings, $((t2 - t0)) ms after the restart"
for r in 1 2 3; do
    kvr_assert_eq "$(nc_state "${RP[$r]}" | jq '[.workers[] | select(.up)] | length')" 2 "router $r: both workers up"
done
kvr_pass
