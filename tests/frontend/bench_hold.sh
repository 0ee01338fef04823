#!/bin/bash
# bench_hold: the frontend's memory with N requests held for a pool waking from zero (issue 16:
# 10,000 held requests under 100 MiB). Not a ctest (10,000 sockets): run it by hand,
#   bash tests/frontend/bench_hold.sh [N] [stream|plain]
# A stand-in router answers "waking" forever; the client opens N connections, each with one
# request, waits until kvr_frontend_held_requests says N, and reads the frontend's VmRSS.
source "$(dirname "$0")/../lib/testenv.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
kvr_test_init bench_hold
kvr_need_bins kvr-frontend
N=${1:-10000}
KIND=${2:-stream}
PY=/usr/bin/python3
ulimit -n "$(ulimit -Hn)"
kvr_start_nats
STATE=$KVR_TMP/pools.json
echo '{"retry_after_ms":1000}' >"$STATE"
kvr_spawn standin $PY -u "$HERE/route_standin.py" 127.0.0.1 "${NATS_URL##*:}" "$STATE"
kvr_wait_for 10 grep -q "standin ready" "$KVR_TMP/standin.log" || kvr_fail "stand-in router not ready"
fp=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fp --nats "$NATS_URL" --id 7 \
    --max-held $((N + 10)) --max-connections $((N + 100)) --log-level warn
kvr_wait_http "http://127.0.0.1:$fp/health" 10
body='{"model":"m1","prompt":"a prompt of some length, as a client would send one to a model","max_tokens":16}'
[ "$KIND" = stream ] && body=$(echo "$body" | jq -c '.stream=true')
r=$($PY "$HERE/hold_client.py" bench "http://127.0.0.1:$fp/v1/completions" "$body" "$N" \
    "$(kvr_pid fe)" "http://127.0.0.1:$fp/metrics")
echo "$r"
echo "loadavg: $(cat /proc/loadavg)"
[ "$(echo "$r" | jq .held)" -ge "$N" ] || kvr_fail "not all held"
kvr_pass
