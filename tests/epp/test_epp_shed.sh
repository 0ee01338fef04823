#!/bin/bash
# epp_shed: kvr-epp's load shedding (--max-pending-picks). A stand-in router subscribes to
# kvr.route and never answers, so each pick stays out for --route-timeout; with
# --max-pending-picks 1, of 8 streams whose bodies end together one pick goes out (and ends as
# a local fallback after the timeout) and the other 7 get ImmediateResponse 429 at once,
# counted in inference_objective_request_error_total{error_code="InferencePoolResourceExhausted"}.
source "$(dirname "$0")/../lib/testenv.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
kvr_test_init epp_shed
kvr_need_bins kvr-worker kvr-epp
PY=/usr/bin/python3
command -v protoc >/dev/null && $PY -c 'import grpc, google.protobuf' 2>/dev/null ||
    { echo "protoc / python3-grpcio missing: skipped"; exit 77; }
kvr_start_nats
WP=$(kvr_free_port)
kvr_spawn worker1 "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$WP --nats "$NATS_URL" \
    --namespace default --model m1 --id 1 --speedup 10
# the black-hole router: a raw NATS client subscribed to kvr.route that answers only PINGs
NP=${NATS_URL##*:}
kvr_spawn blackhole $PY -c '
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"CONNECT {\"verbose\":false}\r\nSUB kvr.route 1\r\nPING\r\n")
while True:
    d = s.recv(65536)
    if not d:
        break
    if b"PING\r\n" in d:
        s.sendall(b"PONG\r\n")
' "$NP"
GP=$(kvr_free_port)
MP=$(kvr_free_port)
kvr_spawn epp "$KVR_BIN/kvr-epp" --secure-serving=false --grpc-port $GP --grpc-health-port -1 \
    --metrics-port $MP --nats "$NATS_URL" --id 9 --bind 127.0.0.1 --route-timeout 3s \
    --route-tries 1 --max-pending-picks 1
emetric() { curl -s "http://127.0.0.1:$MP/metrics" | awk -v k="$1" '$1==k {s+=$2} END {printf "%d\n", s}'; }
eworkers() { [ "$(emetric inference_pool_ready_pods)" = 1 ]; }
kvr_wait_for 15 eworkers || kvr_fail "kvr-epp never saw the worker"
r=$($PY "$HERE/epp_client.py" "127.0.0.1:$GP" shed --n 8)
kvr_log "shed: $r"
kvr_assert_eq "$(echo "$r" | jq -r .n429)" 7 "7 of 8 concurrent picks shed with 429"
kvr_assert_eq "$(echo "$r" | jq -r .picked)" 1 "the one pick in flight still answered (fallback)"
kvr_assert_eq "$(echo "$r" | jq -r .body429 | jq -r .error.code)" 429 "429 body is OpenAI error JSON"
n=$(curl -s "http://127.0.0.1:$MP/metrics" |
    awk '/^inference_objective_request_error_total\{error_code="InferencePoolResourceExhausted"\}/ {print $2}')
kvr_assert_eq "$n" 7 "429s counted as InferencePoolResourceExhausted"
kvr_assert_eq "$(emetric kvr_epp_pending_picks)" 0 "no pick left pending"
# the slot is free again: the next stream is picked (after the timeout, as a local fallback)
r=$($PY "$HERE/epp_client.py" "127.0.0.1:$GP" post)
kvr_assert_eq "$(echo "$r" | jq -r .dest)" "127.0.0.1:$WP" "next pick after the shed burst"
kvr_alive epp || kvr_fail "kvr-epp died"
kvr_pass
