#!/bin/bash
# epp_flow: kvr-epp (h2c) driven by a Python stand-in for Envoy's ext_proc filter whose
# messages come from Envoy's real protos, with real nats-server, kvr-routerd and two
# kvr-worker processes: headers-only GET, body in one chunk and in many, a body over 62,000
# bytes echoed unchanged, a LoRA adapter, subset hints (list and string), garbage → 400, client cancel
# mid-body, a dropped connection, 100 concurrent streams and 1,000 open at once, gRPC health (readiness needs NATS and a
# live worker, unless --ready-without-workers), unknown method, TLS (self-signed default and
# --cert-path, ALPN h2), no router (local fallback), no live worker → 503.
source "$(dirname "$0")/../lib/testenv.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
kvr_test_init epp_flow
kvr_need_bins kvr-worker kvr-routerd kvr-epp
PY=/usr/bin/python3
command -v protoc >/dev/null && $PY -c 'import grpc, google.protobuf' 2>/dev/null ||
    { echo "protoc / python3-grpcio missing: skipped"; exit 77; }
kvr_start_nats
declare -A WPORT
for i in 1 2; do
    WPORT[$i]=$(kvr_free_port)
    extra=()
    [ $i = 2 ] && extra=(--lora A) # worker 2 serves adapter A of m1
    kvr_spawn "worker$i" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:${WPORT[$i]} --nats "$NATS_URL" \
        --namespace default --model m1 --id "$i" --speedup 10 "${extra[@]}"
done
RPORT=$(kvr_free_port)
mkdir -p "$KVR_TMP/r1"
kvr_spawn router1 "$KVR_BIN/kvr-routerd" --id 1 --nats "$NATS_URL" --http 127.0.0.1:$RPORT \
    --data-dir "$KVR_TMP/r1"
GP=$(kvr_free_port)
HP=$(kvr_free_port)
MP=$(kvr_free_port)
kvr_spawn epp "$KVR_BIN/kvr-epp" --secure-serving=false --grpc-port $GP --grpc-health-port $HP \
    --metrics-port $MP --nats "$NATS_URL" --id 9 --bind 127.0.0.1 --log-level debug
kvr_wait_http "http://127.0.0.1:$RPORT/health" 15
rworkers() { curl -s --max-time 2 "http://127.0.0.1:$RPORT/v1/state" | jq -e '[.workers[] | select(.up)] | length == 2' >/dev/null; }
kvr_wait_for 15 rworkers || kvr_fail "router never saw both workers"
emetric() { curl -s "http://127.0.0.1:$MP/metrics" | awk -v k="$1" '$1==k {s+=$2} END {printf "%d\n", s}'; }
eworkers() { [ "$(emetric inference_pool_ready_pods)" = 2 ]; }
kvr_wait_for 10 eworkers || kvr_fail "kvr-epp never saw both workers"
bookings() { curl -s --max-time 2 "http://127.0.0.1:$RPORT/v1/state" | jq -r .bookings; }
CL() { $PY "$HERE/epp_client.py" "127.0.0.1:$GP" "$@"; }
W1=127.0.0.1:${WPORT[1]}
W2=127.0.0.1:${WPORT[2]}
live() { [ "$1" = "$W1" ] || [ "$1" = "$W2" ]; }

# --- health (both ports) and an unknown method ---
for svc in liveness readiness inference-extension envoy.service.ext_proc.v3.ExternalProcessor; do
    kvr_assert_eq "$($PY "$HERE/epp_client.py" 127.0.0.1:$HP health --service $svc | jq -r .status)" \
        SERVING "health $svc"
done
kvr_assert_eq "$(CL health --service readiness | jq -r .status)" SERVING "health on the ext_proc port"
kvr_assert_eq "$(CL health --service nope | jq -r .code)" StatusCode.NOT_FOUND "unknown health service"
kvr_assert_eq "$(CL unknown-method | jq -r .code)" StatusCode.UNIMPLEMENTED "unknown method"

# --- headers only (GET) ---
r=$(CL get)
kvr_log "get: $r"
kvr_assert_eq "$(echo "$r" | jq -r .first)" request_headers "GET answered with headers"
d=$(echo "$r" | jq -r .dest)
live "${d%%,*}" || kvr_fail "GET destination $d is not a live worker"
kvr_assert_eq "$(echo "$r" | jq -r .meta)" "$d" "GET metadata == header"
kvr_assert_eq "$(echo "$d" | tr , '\n' | sort -u | wc -l)/$(echo "$d" | tr , '\n' | wc -l)" 2/2 \
    "GET: pick + one fallback, distinct: $d"

# --- body in one chunk, completions; the whole response path ---
r=$(CL post)
kvr_log "post: $r"
d=$(echo "$r" | jq -r .dest)
live "${d%%,*}" || kvr_fail "destination $d is not a live worker"
kvr_assert_eq "$(echo "$r" | jq -r .meta)" "$d" "metadata == header"
kvr_assert_eq "$(echo "$r" | jq -r .clear_route_cache)" true "clear_route_cache"
kvr_assert_eq "$(echo "$r" | jq -r .body_same)" true "body echoed"
kvr_assert_eq "$(echo "$r" | jq -c .response_seq)" \
    '["response_headers","response_body","response_body","response_trailers"]' "response path in order"
kvr_assert_eq "$(echo "$r" | jq -r .response_body_same)" true "response body echoed"
kvr_assert_eq "$(echo "$r" | jq -r .end)" ok "stream ends OK"
case "$d" in *,*) ;; *) kvr_fail "no fallback endpoint in $d (two workers live)" ;; esac
kvr_assert_eq "$(echo "$d" | tr , '\n' | sort -u | wc -l)/$(echo "$d" | tr , '\n' | wc -l)" 2/2 \
    "pick + one fallback, distinct: $d"
kvr_assert_eq "$(emetric kvr_epp_routed_total)" 1 "picked by the router"

# --- a LoRA adapter: routed under its base model to the worker that lists it (as the frontend) ---
r=$(CL post --model A)
kvr_assert_eq "$(echo "$r" | jq -r '.dest | split(",")[0]')" "$W2" "adapter A picked on the worker listing it"
kvr_assert_eq "$(echo "$r" | jq -r .body_same)" true "adapter request body echoed"

# --- chat, many chunks; a body over 62,000 bytes ---
r=$(CL post --chat --chunks 7)
kvr_assert_eq "$(echo "$r" | jq -r .body_same)" true "chat body in 7 chunks echoed"
r=$(CL post --size 130000 --chunks 13)
kvr_log "big: $(echo "$r" | jq -c '{dest,body_chunks,max_chunk,body_same}')"
kvr_assert_eq "$(echo "$r" | jq -r .body_same)" true "130 kB body echoed unchanged"
kvr_assert_eq "$(echo "$r" | jq -r .body_chunks)" 3 "130 kB body in 3 chunks"
kvr_assert_eq "$(echo "$r" | jq -r .max_chunk)" 62000 "chunks of at most 62,000 bytes"

# --- subset hints ---
r=$(CL post --subset-list "$W2")
kvr_assert_eq "$(echo "$r" | jq -r .dest)" "$W2" "subset list: only W2"
r=$(CL post --subset-str "10.9.9.9:1, $W1")
kvr_assert_eq "$(echo "$r" | jq -r .dest)" "$W1" "subset string: only W1"
r=$(CL post --subset-str "10.9.9.9:1")
kvr_assert_eq "$(echo "$r" | jq -r .status)" 503 "subset with no live worker: 503"
r=$(CL post --subset-list "")
kvr_assert_eq "$(echo "$r" | jq -r .status)" 503 "empty subset: 503"

# --- the gateway half-closes while the pick is out: answers still come, then OK ---
r=$(CL post-close)
kvr_assert_eq "$(echo "$r" | jq -c '{kinds: .kinds, end: .end}')" '{"kinds":["request_headers","request_body"],"end":"ok"}' \
    "half-close during the pick"

# --- garbage body, unknown model ---
r=$(CL garbage)
kvr_assert_eq "$(echo "$r" | jq -r .status)" 400 "garbage body: 400"
r=$(CL post --no-model)
kvr_assert_eq "$(echo "$r" | jq -r .status)" 400 "no model: 400"
r=$(CL post --model nope)
kvr_assert_eq "$(echo "$r" | jq -r .status)" 404 "unknown model (workers of another live): 404"

# every booking so far was freed
zero() { [ "$(bookings)" = 0 ]; }
kvr_wait_for 5 zero || kvr_fail "bookings left after complete streams: $(bookings)"

# --- client cancel mid-body: nothing booked, nothing left ---
c0=$(emetric kvr_epp_streams_cancelled_total)
CL cancel >/dev/null
sleep 0.5
kvr_assert_eq "$(emetric kvr_epp_streams_cancelled_total)" $((c0 + 1)) "cancel seen"
kvr_assert_eq "$(emetric kvr_epp_open_streams)" 0 "no stream left open"

# --- the gateway's connection drops with 5 streams open (no RST_STREAM): all closed ---
kvr_spawn hang $PY "$HERE/epp_client.py" "127.0.0.1:$GP" hang --n 5
hanging() { [ "$(emetric kvr_epp_open_streams)" = 5 ]; }
kvr_wait_for 10 hanging || kvr_fail "5 hanging streams never open: $(emetric kvr_epp_open_streams)"
kvr_kill9 hang
closed() { [ "$(emetric kvr_epp_open_streams)" = 0 ]; }
kvr_wait_for 5 closed || kvr_fail "streams of a dropped connection left open: $(emetric kvr_epp_open_streams)"

# --- 100 concurrent streams (half answer the whole response path, half end early) ---
r=$(CL concurrent --n 100)
kvr_log "concurrent: $r"
kvr_assert_eq "$(echo "$r" | jq -r .ok)" 100 "100 concurrent streams"
kvr_wait_for 5 zero || kvr_fail "bookings left after concurrent streams: $(bookings)"
# --- 1,000 streams open at once on one connection (grpc.aio, one thread): each keeps its pick,
#     and the router its booking, until all 1,000 have theirs; then each runs the response path
#     and ends OK, and every booking is freed ---
r=$(CL open-together --n 1000)
kvr_log "open together: $(jq -c 'del(.first_bad)' <<<"$r")"
kvr_assert_eq "$(jq -r .open_at_once <<<"$r")" true "1000 streams open at once: $r"
kvr_assert_eq "$(jq -r .ok <<<"$r")" 1000 "1000 streams open at once: $(jq -c .first_bad <<<"$r")"
kvr_wait_for 10 zero || kvr_fail "bookings left after 1000 streams open at once: $(bookings)"
kvr_assert_eq "$(emetric kvr_epp_open_streams)" 0 "no stream left open"
kvr_assert "requests counted" [ "$(emetric inference_objective_request_total)" -ge 100 ]

# --- TLS with ALPN h2: the self-signed default, and --cert-path ---
TP=$(kvr_free_port)
kvr_spawn epp_tls "$KVR_BIN/kvr-epp" --grpc-port $TP --grpc-health-port -1 --metrics-port -1 \
    --nats "$NATS_URL" --id 10 --bind 127.0.0.1 --max-fallbacks 0
alpn() {
    local o
    o=$(echo | timeout 5 openssl s_client -connect 127.0.0.1:$1 -alpn h2 2>/dev/null || true)
    echo "$o" | grep -aq 'ALPN protocol: h2'
}
kvr_wait_for 10 alpn $TP || kvr_fail "no TLS with ALPN h2 on the default (secure) port"
echo | timeout 5 openssl s_client -connect 127.0.0.1:$TP 2>/dev/null |
    sed -n '/BEGIN CERT/,/END CERT/p' >"$KVR_TMP/self.pem"
TCL() { $PY "$HERE/epp_client.py" "127.0.0.1:$TP" "$@" --tls-ca "$KVR_TMP/self.pem" --tls-name kvr-epp; }
tls_ready() { TCL post | jq -e '.body_same == true and .end == "ok"' >/dev/null; }
kvr_wait_for 10 tls_ready || kvr_fail "no full stream over TLS: $(TCL post)"
r=$(TCL post --chunks 3)
d=$(echo "$r" | jq -r .dest)
live "$d" || kvr_fail "TLS (--max-fallbacks 0): destination $d is not one live worker"
kvr_assert_eq "$(echo "$r" | jq -r .meta)" "$d" "TLS: metadata == header"
kvr_assert_eq "$($PY "$HERE/epp_client.py" 127.0.0.1:$TP health | jq -r .code)" \
    StatusCode.UNAVAILABLE "plaintext client on the TLS port"
out=$(echo | timeout 5 openssl s_client -connect 127.0.0.1:$TP -alpn http/1.1 2>&1 || true)
echo "$out" | grep -aq 'no application protocol' || kvr_fail "a client without h2 in ALPN was not refused"
mkdir -p "$KVR_TMP/certs"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost -keyout "$KVR_TMP/certs/tls.key" \
    -out "$KVR_TMP/certs/tls.crt" 2>/dev/null || kvr_fail "openssl req"
TP2=$(kvr_free_port)
kvr_spawn epp_tls2 "$KVR_BIN/kvr-epp" --grpc-port $TP2 --grpc-health-port -1 --metrics-port -1 \
    --cert-path "$KVR_TMP/certs" --id 11 --bind 127.0.0.1 --ready-without-workers
kvr_wait_for 10 alpn $TP2 || kvr_fail "no TLS on the --cert-path port"
kvr_assert_eq "$($PY "$HERE/epp_client.py" localhost:$TP2 health --tls-ca "$KVR_TMP/certs/tls.crt" | jq -r .status)" \
    SERVING "health over TLS with --cert-path, name verified"
kvr_assert_eq "$($PY "$HERE/epp_client.py" localhost:$TP2 health --service readiness --tls-ca "$KVR_TMP/certs/tls.crt" | jq -r .status)" \
    SERVING "readiness with --ready-without-workers and no worker"
r=$($PY "$HERE/epp_client.py" localhost:$TP2 post --tls-ca "$KVR_TMP/certs/tls.crt")
kvr_assert_eq "$(echo "$r" | jq -r .status)" 503 "--cert-path instance without NATS: 503"
kvr_term epp_tls2

# --- mutual TLS (--client-ca-file): only a client whose certificate the CA signed is served ---
C=$KVR_TMP/certs
mkcert() { # NAME CA_NAME: a client key + certificate signed by CA_NAME
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
        -keyout "$C/$1.key" -out "$C/$1.csr" 2>/dev/null &&
        openssl x509 -req -in "$C/$1.csr" -CA "$C/$2.crt" -CAkey "$C/$2.key" -CAcreateserial \
            -days 1 -out "$C/$1.crt" 2>/dev/null
}
for ca in gwca otherca; do
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj "/CN=$ca" \
        -keyout "$C/$ca.key" -out "$C/$ca.crt" 2>/dev/null || kvr_fail "openssl CA $ca"
done
mkcert gateway gwca && mkcert intruder otherca || kvr_fail "client certificates"
TP3=$(kvr_free_port)
kvr_spawn epp_mtls "$KVR_BIN/kvr-epp" --grpc-port $TP3 --grpc-health-port -1 --metrics-port -1 \
    --cert-path "$C" --client-ca-file "$C/gwca.crt" --id 12 --bind 127.0.0.1
kvr_wait_for 10 alpn $TP3 || kvr_fail "no TLS on the mutual-TLS port"
MT() { $PY "$HERE/epp_client.py" localhost:$TP3 health --tls-ca "$C/tls.crt" "$@"; }
kvr_assert_eq "$(MT --tls-cert "$C/gateway.crt" --tls-key "$C/gateway.key" | jq -r .status)" \
    SERVING "mutual TLS: the gateway's certificate is accepted"
kvr_assert_eq "$(MT | jq -r .code)" StatusCode.UNAVAILABLE "mutual TLS: a client without a certificate"
kvr_assert_eq "$(MT --tls-cert "$C/intruder.crt" --tls-key "$C/intruder.key" | jq -r .code)" \
    StatusCode.UNAVAILABLE "mutual TLS: a certificate another CA signed"
kvr_term epp_mtls
"$KVR_BIN/kvr-epp" --secure-serving=false --client-ca-file "$C/gwca.crt" >/dev/null 2>&1 &&
    kvr_fail "--client-ca-file without TLS was accepted"

# --- SIGTERM with a booked stream open: its booking is freed at once, not at lease expiry ---
kvr_spawn hold $PY "$HERE/epp_client.py" "127.0.0.1:$TP" hold --tls-ca "$KVR_TMP/self.pem" \
    --tls-name kvr-epp
booked() { [ "$(bookings)" = 1 ]; }
kvr_wait_for 10 booked || kvr_fail "the held stream was never booked: $(bookings)"
kill -TERM "$(kvr_pid epp_tls)"
kvr_wait_for 3 zero || kvr_fail "SIGTERM left the held stream's booking: $(bookings)"
kvr_kill9 hold
kvr_wait_for 5 bash -c "! kill -0 $(kvr_pid epp_tls) 2>/dev/null" || kvr_fail "kvr-epp did not exit on SIGTERM"

# --- no router answers: a local least-loaded pick, as the frontend's fallback ---
kvr_term router1
r=$(CL post)
d=$(echo "$r" | jq -r .dest)
live "${d%%,*}" || kvr_fail "routers down: destination $d is not a live worker"
kvr_assert_eq "$(echo "$r" | jq -r .body_same)" true "routers down: body echoed"
nfb=$(curl -s "http://127.0.0.1:$MP/metrics" | awk 'index($1, "kvr_epp_route_fallback_total{") == 1 {s+=$2} END {printf "%d\n", s}')
kvr_assert "fallback counted ($nfb)" [ "$nfb" -ge 1 ]

# --- no live worker: 503 ---
kvr_term worker1
kvr_term worker2
gone() { [ "$(emetric inference_pool_ready_pods)" = 0 ]; }
kvr_wait_for 10 gone || kvr_fail "workers never expired"
# an EPP that could only answer 503 is not ready (the gateway's probe takes it out); alive still
for svc in readiness inference-extension envoy.service.ext_proc.v3.ExternalProcessor; do
    kvr_assert_eq "$($PY "$HERE/epp_client.py" 127.0.0.1:$HP health --service $svc | jq -r .status)" \
        NOT_SERVING "health $svc with no live worker"
done
kvr_assert_eq "$(CL health --service readiness | jq -r .status)" NOT_SERVING \
    "readiness on the ext_proc port with no live worker"
kvr_assert_eq "$(CL health --service liveness | jq -r .status)" SERVING "liveness with no live worker"
r=$(CL post)
kvr_assert_eq "$(echo "$r" | jq -r .status)" 503 "no live worker: 503"
r=$(CL get)
kvr_assert_eq "$(echo "$r" | jq -r .status)" 503 "GET with no live worker: 503"
n503=$(curl -s http://127.0.0.1:$MP/metrics | awk '/error_code="ServiceUnavailable"/ {print $2}')
kvr_assert "503s counted ($n503)" [ "$n503" -ge 3 ]
kvr_alive epp || kvr_fail "kvr-epp died"
kvr_pass
