#!/bin/bash
# chaos_nats_cluster_failover (issue 18): NATS as a cluster. Three nats-servers with JetStream
# (KVR_EVENTS with 3 replicas); every process is given all three URLs. Router r1 and the
# frontend are connected to node 1 (first in their list); router r2 and the workers to node 2;
# the stream's leader is not node 1 (see NC_KILL_STREAM_LEADER below).
# Under load through the frontend, node 1 is SIGKILLed: no client request may fail, r1 must
# reconnect to another node and resume its JetStream consumer after the last applied sequence,
# and once the load is over r1's index must equal r2's (same stream sequence, same digest: no
# event lost, none applied twice). Prints the time r1 took to apply events again.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init chaos_nats_cluster_failover
source "$(dirname "$0")/nats_lib.sh"
kvr_start_nats_cluster 3
U1="${NATS_NODE_URL[1]},${NATS_NODE_URL[2]},${NATS_NODE_URL[3]}"
U2="${NATS_NODE_URL[2]},${NATS_NODE_URL[3]},${NATS_NODE_URL[1]}"
declare -A WPORT
for i in 1 2; do
    WPORT[$i]=$(kvr_free_port)
    kvr_spawn "worker$i" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:${WPORT[$i]} --nats "$U2" \
        --namespace default --model m1 --id "$i" --speedup 50
done
R1=$(kvr_free_port)
R2=$(kvr_free_port)
kvr_spawn r2 "$KVR_BIN/kvr-routerd" --id 2 --nats "$U2" --http 127.0.0.1:$R2 \
    --data-dir "$KVR_TMP/r2" --stream-replicas 3
kvr_wait_http "http://127.0.0.1:$R2/ready" 30
kvr_spawn r1 "$KVR_BIN/kvr-routerd" --id 1 --nats "$U1" --http 127.0.0.1:$R1 \
    --data-dir "$KVR_TMP/r1" --stream-replicas 3
kvr_wait_http "http://127.0.0.1:$R1/ready" 30
FP=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$FP --nats "$U1" --id 1
F=http://127.0.0.1:$FP
kvr_wait_http "$F/health" 10
live2() { curl -s "$F/metrics" | awk '/^kvr_frontend_live_workers / {f=1; ok=($2+0==2)} END {exit !(f && ok)}'; }
kvr_wait_for 15 live2 || kvr_fail "frontend never saw 2 workers"
# who is where: r1 (both connections) and the frontend on node 1
conns() { curl -s "http://127.0.0.1:${NATS_NODE_MON[$1]}/connz?limit=1024" | jq -r '.connections[].name'; }
on1=$(conns 1 | sort | tr '\n' ' ')
kvr_log "node 1 clients: $on1"
for c in kvr-routerd-1 kvr-routerd-1-js kvr-frontend; do
    case " $on1 " in *" $c "*) ;; *) kvr_fail "$c not on node 1 ($on1)" ;; esac
done
replicas=$(curl -s "http://127.0.0.1:${NATS_NODE_MON[2]}/jsz?streams=true&config=true" |
    jq -r '.account_details[0].stream_detail[] | select(.name == "KVR_EVENTS") | .config.num_replicas')
kvr_assert_eq "$replicas" 3 "KVR_EVENTS replicas"
# NC_KILL_STREAM_LEADER=1 (ctest chaos_nats_stream_leader_kill): node 1 also leads the stream,
# so its loss forces a stream leader election under load. Workers publish KV events as
# JetStream publishes and send again what the stream did not acknowledge; with core publishes
# (before), what arrived while the stream had no leader was dropped by the server.
if [ "${NC_KILL_STREAM_LEADER:-0}" = 1 ]; then
    nc_move_stream_leader n1 "${NATS_NODE_MON[2]}" "${NATS_NODE_URL[2]}" ||
        kvr_fail "could not move the KVR_EVENTS leader to node 1"
elif [ "$(nc_stream_leader "${NATS_NODE_MON[2]}")" = n1 ]; then
    nc_move_stream_leader n2 "${NATS_NODE_MON[2]}" "${NATS_NODE_URL[2]}" ||
        kvr_fail "could not move the KVR_EVENTS leader off node 1"
fi
kvr_log "KVR_EVENTS stream leader: $(nc_stream_leader "${NATS_NODE_MON[2]}")"

nc_load_start "$F" 16 4
sleep 5 # load running for a while before the fault
seq_at_kill=$(nc_q "$R1" .index.stream_seq)
t0=$(nc_now_ms)
kvr_kill9 nats1
kvr_log "node 1 SIGKILLed (r1 at stream seq $seq_at_kill)"
resumed() { [ "$(nc_q "$R1" .index.stream_seq)" -gt "$seq_at_kill" ]; }
kvr_wait_for 30 resumed || kvr_fail "r1 never applied an event after node 1 died"
t1=$(nc_now_ms)
nc_load_wait
nc_load_report || kvr_fail "client requests failed during the node loss"
# Events the stream could not take while it elected a leader wait in the workers' outboxes and
# are sent again (on a loaded machine the election took over 10 s once): the stream is whole
# only when every worker's outbox is empty.
drained() {
    local i v
    for i in 1 2; do
        v=$(curl -s --max-time 2 "http://127.0.0.1:${WPORT[$i]}/metrics" |
            awk '$1 == "kvr_worker_kv_event_batches_buffered" {printf "%d", $2}')
        [ "$v" = 0 ] || return 1
    done
}
t2=$(nc_now_ms)
kvr_wait_for 90 drained || kvr_fail "the workers' KV events were never all acknowledged by the stream"
kvr_log "workers' outboxes empty $(( $(nc_now_ms) - t2 )) ms after the load ended"
# the load is over: both routers converge on the whole stream
same() {
    local a b
    a=$(nc_state "$R1" | jq -c '[.index.stream_seq, .index.digest, .index.entries]')
    b=$(nc_state "$R2" | jq -c '[.index.stream_seq, .index.digest, .index.entries]')
    [ -n "$a" ] && [ "$a" = "$b" ]
}
kvr_wait_for 30 same || kvr_fail "r1 and r2 differ: r1 $(nc_state "$R1" | jq -c .index) r2 $(nc_state "$R2" | jq -c .index)"
last=$(curl -s "http://127.0.0.1:${NATS_NODE_MON[2]}/jsz?streams=true&config=true" |
    jq -r '.account_details[0].stream_detail[] | select(.name == "KVR_EVENTS") | .state.last_seq')
kvr_assert_eq "$(nc_q "$R1" .index.stream_seq)" "$last" "r1 applied the whole stream"
# every request's prompt is distinct from its first block on and stores 2 full blocks
ok=$(grep -c '^200$' "$KVR_TMP/load.codes")
kvr_assert_eq "$(nc_q "$R1" .index.blocks)" $((2 * ok)) "blocks in r1's index (2 per request)"
kvr_log "r1 index $(nc_state "$R1" | jq -c .index) = r2's; stream last_seq $last"
restarts=$(curl -s "http://127.0.0.1:$R1/metrics" | awk '$1 == "kvr_routerd_consumer_restarts_total" {print $2}')
kvr_log "RECOVERY: r1 applied events again $((t1 - t0)) ms after node 1 was SIGKILLed (consumer restarts: ${restarts:-?})"
for i in 1 2 3; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 \
        -d '{"model":"m1","prompt":"after the node loss","max_tokens":2}' "$F/v1/completions")
    kvr_assert_eq "$code" 200 "request after the node loss"
done
kvr_pass
