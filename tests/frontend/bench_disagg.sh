#!/bin/bash
# bench_disagg (not a ctest): what the two-leg path costs over the aggregated one on the same
# workers. One kvr-routerd, one kvr-worker --role prefill, one --role decode (simulated compute
# at --speedup 1000, so the engines' time is near zero; 4 KiB per block, unpaced), one
# kvr-frontend (--forward tokens). N sequential streamed completions of ~300-token prompts
# (each prompt new: no cache hit), first with --max-local-prefill 100000000 (every prefill on
# the decode worker: aggregated), then with --max-local-prefill 0 (every prefill remote).
# Prints client-side latency (curl time_total) mean/p50/p90 for both and the load average.
# The difference is an upper bound on the frontend's two-leg overhead: it also holds the
# prefill worker's HTTP round trip and the KV transfer.
#   tests/frontend/bench_disagg.sh [N]
source "$(dirname "$0")/../lib/testenv.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../routerd/rd_lib.sh"
kvr_test_init bench_disagg
N=${1:-100}
BS=16
SECRET=$(kvr_cluster_secret)
kvr_start_nats
declare -A WPORT
for spec in 1:prefill 2:decode; do
    id=${spec%%:*}
    WPORT[$id]=$(kvr_free_port)
    kvr_spawn "worker$id" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:${WPORT[$id]} \
        --nats "$NATS_URL" --namespace default --model m1 --id "$id" --speedup 1000 \
        --block-size $BS --role "${spec#*:}" --kv-secret-file "$SECRET" --kv-bytes-per-block 4096
done
fport=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fport --nats "$NATS_URL" --id 7 \
    --router-mode kv --route-timeout 1s --block-size $BS --log-level debug
F=http://127.0.0.1:$fport
kvr_wait_http "$F/health" 10
LONG=""
for i in $(seq 1 60); do LONG+="word$i alpha beta gamma delta "; done

phase() { # NAME MAX_LOCAL_PREFILL
    local rport i
    rport=$(kvr_free_port)
    mkdir -p "$KVR_TMP/r-$1"
    rd_start "router-$1" 1 "$rport" "$KVR_TMP/r-$1" --block-size $BS --max-local-prefill "$2"
    kvr_wait_http "http://127.0.0.1:$rport/health" 20
    rd_wait_workers_up "$rport" 2 20 || kvr_fail "router saw no workers"
    sleep 1
    for i in $(seq 1 "$N"); do
        curl -s -o /dev/null -w '%{time_total}\n' --max-time 30 "$F/v1/completions" \
            -d "{\"model\":\"m1\",\"prompt\":\"$1 $i $LONG\",\"max_tokens\":4,\"stream\":true}"
    done >"$KVR_TMP/$1.times"
    kvr_kill9 "router-$1"
    sort -n "$KVR_TMP/$1.times" | awk -v name="$1" '{ a[NR] = $1 * 1000; s += $1 * 1000 }
        END { printf "%-10s n=%d mean=%.2f ms p50=%.2f ms p90=%.2f ms\n", name, NR, s / NR,
              a[int(NR * 0.5) + 1], a[int(NR * 0.9) + 1] }'
}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
phase agg 100000000
phase disagg 0
curl -s "$F/metrics" | grep '^kvr_frontend_disagg_requests_total'
# the frontend's own work on the two legs, and the prefill leg's wall time, per request
sed -n 's/.*msg="prefill leg done".* leg_us=\([0-9]*\) frontend_us=\([0-9]*\).*/\1 \2/p' "$KVR_TMP/fe.log" |
    sort -k2 -n | awk '{ l += $1; f += $2; a[NR] = $2 } END { if (NR) printf "prefill legs n=%d: leg mean=%.2f ms; frontend work mean=%.1f us p50=%d us max=%d us\n", NR, l / NR / 1000, f / NR, a[int(NR / 2) + 1], a[NR] }'
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
kvr_pass
