#!/bin/bash
# frontend_load: 1,000 concurrent SSE streams held open at once through one kvr-frontend with
# bounded memory (RSS from /proc), every stream completes; a client that disconnects
# mid-stream cancels the worker's request (worker metrics) and is counted by the frontend.
source "$(dirname "$0")/../lib/testenv.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
kvr_test_init frontend_load
kvr_need_bins kvr-worker kvr-frontend
N=${FE_LOAD_STREAMS:-1000}
# Under AddressSanitizer RSS includes the quarantine of freed memory: memory bounds only
# hold for normal builds.
ASAN=0
ldd "$KVR_BIN/kvr-frontend" 2>/dev/null | grep -q libasan && ASAN=1
kvr_start_nats
wport=$(kvr_free_port)
fport=$(kvr_free_port)
kvr_spawn worker1 "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$wport --nats "$NATS_URL" \
    --namespace default --model m1 --id 1 --speedup 2 --max-num-seqs 2048 \
    --max-batched-tokens 65536
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fport --nats "$NATS_URL" --id 1 \
    --router-mode least-loaded --log-level warn
F=http://127.0.0.1:$fport
W=http://127.0.0.1:$wport
kvr_wait_http "$F/health" 10
kvr_wait_http "$W/health" 10
models_ok() { curl -s "$F/v1/models" | jq -e '.data|length>0' >/dev/null; }
kvr_wait_for 10 models_ok || kvr_fail "worker never seen"
wmetric() { curl -s "$W/metrics" | awk -v n="$1" '$1==n {printf "%d\n", $2}'; }

# --- a client that disconnects mid-stream ---
c0=$(wmetric kvr_worker_requests_cancelled_total)
d=$(/usr/bin/python3 "$HERE/fe_client.py" disconnect "$F/v1/completions" \
    '{"model":"m1","prompt":"disconnect me","max_tokens":100000,"stream":true}')
kvr_assert_eq "$(echo "$d" | jq -r .status)" 200 "disconnect stream status"
cancelled() { [ "$(wmetric kvr_worker_requests_cancelled_total)" -gt "$c0" ]; }
kvr_wait_for 10 cancelled || kvr_fail "worker request not cancelled after the client left"
idle() { [ "$(curl -s "$W/metrics" | awk '$1=="kvr_worker_running_seqs" {printf "%d", $2}')" = 0 ]; }
kvr_wait_for 10 idle || kvr_fail "worker still running the abandoned request"
# counted when the frontend finishes the request, which can be after the worker has seen
# its upstream close: wait for it too
disconnect_counted() { curl -s --max-time 2 "$F/metrics" | grep '^kvr_frontend_client_disconnects_total [1-9]' >/dev/null; }
kvr_wait_for 5 disconnect_counted || kvr_fail "disconnect not counted"
kvr_log "disconnect cancelled the worker request"

# --- a client that stops reading: the upstream transfer is paused, memory stays bounded ---
# A fast worker (speedup 1000) would push ~100k tokens (~15 MB of SSE) in a few seconds.
w2port=$(kvr_free_port)
f2port=$(kvr_free_port)
kvr_spawn worker2 "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$w2port --nats "$NATS_URL" \
    --namespace fast --model m1 --id 2 --speedup 1000
kvr_spawn fe2 "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$f2port --nats "$NATS_URL" --id 2 \
    --namespace fast --router-mode least-loaded --log-level warn
kvr_wait_http "http://127.0.0.1:$f2port/health" 10
models2() { curl -s "http://127.0.0.1:$f2port/v1/models" | jq -e '.data|length>0' >/dev/null; }
kvr_wait_for 10 models2 || kvr_fail "fast worker never seen"
st=$(/usr/bin/python3 "$HERE/fe_client.py" stall "http://127.0.0.1:$f2port/v1/completions" \
    '{"model":"m1","prompt":"stall","max_tokens":100000,"stream":true}' 6 "$(kvr_pid fe2)")
kvr_log "stalled client: $st"
kvr_assert_eq "$(echo "$st" | jq -r .status)" 200 "stalled stream status"
sgrow=$(( $(echo "$st" | jq -r .rss_kb_peak) - $(echo "$st" | jq -r .rss_kb_before) ))
[ "$ASAN" = 1 ] || [ "$sgrow" -lt 4096 ] || kvr_fail "a stalled client grew the frontend by $sgrow KiB"
gen=$(curl -s "http://127.0.0.1:$w2port/metrics" | awk '$1=="kvr_worker_generated_tokens_total" {printf "%d", $2}')
kvr_log "stalled stream: frontend grew $sgrow KiB; worker generated $gen tokens"

# --- N streams at once ---
pid=$(kvr_pid fe)
res=$(/usr/bin/python3 "$HERE/fe_client.py" hold "$F/v1/completions" \
    '{"model":"m1","prompt":"hold the line","max_tokens":300,"stream":true}' "$N" "$pid")
kvr_log "hold: $res"
kvr_assert_eq "$(echo "$res" | jq -r .held_at_once)" "$N" "streams open at once"
kvr_assert_eq "$(echo "$res" | jq -r .completed)" "$N" "streams completed"
before=$(echo "$res" | jq -r .rss_kb_before)
peak=$(echo "$res" | jq -r .rss_kb_peak)
grow=$((peak - before))
per=$((grow / N))
kvr_log "frontend RSS $before KiB → peak $peak KiB: +$grow KiB, $per KiB per stream"
# bounded: under 200 KiB per held stream (client + upstream buffers)
[ "$ASAN" = 1 ] || [ "$grow" -lt $((N * 200)) ] || kvr_fail "RSS grew $grow KiB for $N streams"
# and the server is fine afterwards
r=$(curl -s -d '{"model":"m1","prompt":"after","max_tokens":3}' "$F/v1/completions")
kvr_assert_eq "$(echo "$r" | jq -r .usage.completion_tokens)" 3 "request after the load (reply: ${r:0:300})"
kvr_pass
