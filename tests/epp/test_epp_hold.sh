#!/usr/bin/env bash
# epp_hold: scale-to-zero through the endpoint picker, with real processes: nats-server, one
# kvr-routerd with --pools-file and the local exec scaler (scripts/kvr-local-scaler starts real
# kvr-worker processes after an 8 s "model load", long enough for step 3 on a loaded machine),
# kvr-epp, and the ext_proc client built from Envoy's protos.
#  1. the pool sleeps with no worker; kvr-epp --ready-without-workers is ready (gRPC readiness);
#  2. 20 ext_proc streams open at once: kvr-epp asks the routers although no worker is live,
#     the router wakes the pool and answers "waking", kvr-epp holds every pick (no
#     HeadersResponse) until the scaler's worker is up, then each gets that worker's ip:port,
#     8 s or more after it was sent, runs its response path and ends OK; held_total{served} 20;
#  3. idle: the pool sleeps again; on a picker with --max-held 1 --wake-timeout 1500ms a held
#     pick whose client goes away leaves the hold (client_gone); then two picks at once: one is
#     refused at once (rejected_full), the other waits and gets 503 "model m1 is starting" at
#     its deadline (timeout), all before the worker is up.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/../routerd/rd_lib.sh"
source "$(dirname "$0")/../lib/local_scaler.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
kvr_test_init epp_hold
kvr_need_bins kvr-worker kvr-epp kvr-routerd
PY=/usr/bin/python3
command -v protoc >/dev/null && $PY -c 'import grpc, google.protobuf' 2>/dev/null ||
    { echo "protoc / python3-grpcio missing: skipped"; exit 77; }
kvr_start_nats
cat >"$KVR_TMP/pools.json" <<'JSON'
{"pools": [{"namespace": "default", "model": "m1", "target": "m1-workers"}]}
JSON
kvr_local_scaler_env 8
RP=$(kvr_free_port)
rd_start r1 1 "$RP" "$KVR_TMP/r1" --pools-file "$KVR_TMP/pools.json" \
    --scaler "exec:$SRC/scripts/kvr-local-scaler" --idle-after 4s --wake-timeout 20s \
    --scaler-timeout 20s
kvr_wait_http "http://127.0.0.1:$RP/ready" 20
pool_is() { [ "$(rd_q "$RP" '.pools[] | select(.model == "m1") | .state')" = "$1" ]; }
kvr_wait_for 10 pool_is sleeping || kvr_fail "pool m1 not sleeping: $(rd_q "$RP" .pools)"

GP=$(kvr_free_port)
MP=$(kvr_free_port)
kvr_spawn epp "$KVR_BIN/kvr-epp" --secure-serving=false --grpc-port $GP --grpc-health-port -1 \
    --metrics-port $MP --nats "$NATS_URL" --id 9 --bind 127.0.0.1 --ready-without-workers
CL() { $PY "$HERE/epp_client.py" "127.0.0.1:$GP" "$@"; }
up() { [ "$(CL health --service readiness | jq -r .status)" = SERVING ]; }
kvr_wait_for 10 up || kvr_fail "kvr-epp --ready-without-workers not ready at zero workers"
metric() { curl -s "http://127.0.0.1:$MP/metrics" | awk -v k="$1" '$1==k {print $2}'; }

# --- 2. 20 streams at zero workers ---
r=$(CL open-together --n 20)
kvr_log "held streams: $(jq -c 'del(.first_bad)' <<<"$r")"
kvr_assert_eq "$(jq -r .ok <<<"$r")" 20 "streams served through the wake: $(jq -c .first_bad <<<"$r")"
kvr_assert_eq "$(jq -r '.dests | length' <<<"$r")" 1 "one destination (the woken worker): $r"
# the scaler's "model load" takes 8 s: every pick waited for it
kvr_assert "every pick waited for the wake ($(jq -r .pick_s_min <<<"$r") s)" \
    $PY -c "import sys; sys.exit(not float(sys.argv[1]) >= 8.0)" "$(jq -r .pick_s_min <<<"$r")"
kvr_assert_eq "$(metric 'kvr_epp_held_total{result="served"}')" 20 "held_total served"
kvr_assert_eq "$(metric kvr_epp_held_picks)" 0 "held gauge after the wake"
# the woken worker's port is the destination
wport=$(sed -n 's/.* started .* port \([0-9]*\)$/\1/p' "$KVR_SCALER_DIR/calls.log" | head -1)
[ -n "$wport" ] || kvr_fail "no worker start in the scaler's log: $(cat "$KVR_SCALER_DIR/calls.log")"
dest=$(jq -r '.dests[0]' <<<"$r")
kvr_assert_eq "${dest%%,*}" "127.0.0.1:$wport" "destination is the woken worker"
bookings() { rd_q "$RP" .bookings; }
zero() { [ "$(bookings)" = 0 ]; }
kvr_wait_for 10 zero || kvr_fail "bookings left after the held streams: $(bookings)"

# --- 3. asleep again: the hold's bounds ---
kvr_wait_for 30 pool_is sleeping || kvr_fail "idle pool did not sleep: $(rd_q "$RP" .pools)"
kvr_wait_for 15 bash -c "[ \"\$(ls $KVR_SCALER_DIR/pool-*/*.pid 2>/dev/null | wc -l)\" = 0 ]" ||
    kvr_fail "worker not stopped"
G2=$(kvr_free_port)
M2=$(kvr_free_port)
kvr_spawn epp2 "$KVR_BIN/kvr-epp" --secure-serving=false --grpc-port $G2 --grpc-health-port -1 \
    --metrics-port $M2 --nats "$NATS_URL" --id 10 --bind 127.0.0.1 --max-held 1 \
    --wake-timeout 1500ms
kvr_wait_for 10 bash -c "curl -s http://127.0.0.1:$M2/metrics | grep -q '^kvr_epp_held_picks'" ||
    kvr_fail "kvr-epp 2 never served /metrics"
sleep 0.5 # its NATS connection
m2() { curl -s "http://127.0.0.1:$M2/metrics" | awk -v k="$1" '$1==k {print $2}'; }
t0=${EPOCHREALTIME/./}
$PY "$HERE/epp_client.py" "127.0.0.1:$G2" cancel-after-body >/dev/null
gone() { [ "$(m2 'kvr_epp_held_total{result="client_gone"}')" = 1 ] && [ "$(m2 kvr_epp_held_picks)" = 0 ]; }
kvr_wait_for 5 gone || kvr_fail "a held pick whose client went is still held: $(curl -s "http://127.0.0.1:$M2/metrics" | grep held)"
$PY "$HERE/epp_client.py" "127.0.0.1:$G2" post >"$KVR_TMP/p1.json" &
p1=$!
$PY "$HERE/epp_client.py" "127.0.0.1:$G2" post >"$KVR_TMP/p2.json" &
p2=$!
wait $p1 $p2
ms=$(((${EPOCHREALTIME/./} - t0) / 1000))
kvr_log "two picks on a sleeping pool with --max-held 1: $(cat "$KVR_TMP/p1.json") $(cat "$KVR_TMP/p2.json") in $ms ms"
for f in p1 p2; do kvr_assert_eq "$(jq -r .status "$KVR_TMP/$f.json")" 503 "$f: 503"; done
kvr_assert_eq "$(m2 'kvr_epp_held_total{result="rejected_full"}')" 1 "one refused: the holds were full"
kvr_assert_eq "$(m2 'kvr_epp_held_total{result="timeout"}')" 1 "one held to its deadline"
grep -q "is starting" "$KVR_TMP/p1.json" "$KVR_TMP/p2.json" || kvr_fail "no 'model is starting' answer"
kvr_assert_eq "$(m2 kvr_epp_held_picks)" 0 "held gauge after the deadline"
kvr_assert "all before the worker was up ($ms ms)" [ "$ms" -lt 7500 ]
kvr_alive epp2 || kvr_fail "kvr-epp 2 died"
kvr_pass
