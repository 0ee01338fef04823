#!/bin/bash
# measure_pick.sh (not a ctest): pick latency figures: kvr-epp + 1 router + 2 workers, N sequential and 200 concurrent streams
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../lib/testenv.sh"
KVR_BIN=${KVR_BIN:-$HERE/../../build/bin}
kvr_test_init epp_measure
kvr_start_nats
for i in 1 2; do
    p=$(kvr_free_port)
    kvr_spawn "worker$i" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$p --nats "$NATS_URL" --namespace default --model m1 --id "$i" --speedup 10
done
R=$(kvr_free_port); mkdir -p "$KVR_TMP/r1"
kvr_spawn router1 "$KVR_BIN/kvr-routerd" --id 1 --nats "$NATS_URL" --http 127.0.0.1:$R --data-dir "$KVR_TMP/r1"
GP=$(kvr_free_port); MP=$(kvr_free_port)
kvr_spawn epp "$KVR_BIN/kvr-epp" --secure-serving=false --grpc-port $GP --grpc-health-port -1 --metrics-port $MP --nats "$NATS_URL" --id 9 --bind 127.0.0.1
ready() { curl -s http://127.0.0.1:$MP/metrics | awk '/^inference_pool_ready_pods / {exit !($2==2)}'; }
kvr_wait_for 15 ready || kvr_fail "not ready"
sleep 2
/usr/bin/python3 "$HERE/epp_client.py" 127.0.0.1:$GP seq --n 500
curl -s http://127.0.0.1:$MP/metrics | grep -E '^kvr_epp_pick_seconds|^kvr_epp_routed_total|^kvr_epp_route_fallback_total'
/usr/bin/python3 "$HERE/epp_client.py" 127.0.0.1:$GP concurrent --n 200
curl -s http://127.0.0.1:$MP/metrics | grep -E '^kvr_epp_pick_seconds_(bucket|count)'
ps -o rss=,cputime= -p $(kvr_pid epp)
uptime
kvr_pass
