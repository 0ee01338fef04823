#!/bin/bash
# frontend_edges (issue 18, defects 9, 11, 14 and the worker allow-list): real nats-server,
# kvr-routerd, kvr-worker and kvr-frontend processes.
#  - "bearer" in any case is accepted; 502 messages name the worker id, never its URL;
#  - a frontend stall (SIGSTOP longer than the TTL) expires no worker;
#  - a heartbeat whose url is outside --worker-cidr is refused and counted;
#  - a SIGSTOPped worker: before the first token the request is retried on another worker,
#    after it the client gets an SSE error event and [DONE] and the router booking is freed;
#  - SIGTERM drains: the listener closes, in-flight streams finish; at --drain-timeout the rest
#    get an SSE error event and [DONE]; a second SIGTERM cuts at once, with the same ending.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init frontend_edges
kvr_need_bins kvr-worker kvr-frontend kvr-routerd kvr-test-pub
KEY=edge-key
PUB="$KVR_BIN/kvr-test-pub"
kvr_start_nats
ports=()
while [ ${#ports[@]} -lt 7 ]; do
    p=$(kvr_free_port)
    [[ " ${ports[*]} " == *" $p "* ]] || ports+=("$p")
done
W1=${ports[0]} W2=${ports[1]} RP=${ports[2]} F1=${ports[3]} F2=${ports[4]} F3=${ports[5]} F4=${ports[6]}
(umask 077 && echo edge-admin >"$KVR_TMP/admin-token")
kvr_spawn r1 "$KVR_BIN/kvr-routerd" --id 1 --nats "$NATS_URL" --http 127.0.0.1:$RP \
    --data-dir "$KVR_TMP/r1" --admin-token-file "$KVR_TMP/admin-token"
# speedup 0.5: ~one token per 40-80 ms, so a 200-token stream lasts seconds
for i in 1 2; do
    port=W$i
    kvr_spawn w$i "$KVR_BIN/kvr-worker" --listen 127.0.0.1:${!port} --nats "$NATS_URL" \
        --namespace default --model m1 --id $i --speedup 0.5
done
fe() { # fe NAME PORT ID EXTRA...
    local name=$1 port=$2 id=$3
    shift 3
    kvr_spawn "$name" "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$port --nats "$NATS_URL" --id $id \
        --api-key "$KEY" --upstream-stall-timeout 2s "$@"
    kvr_wait_http "http://127.0.0.1:$port/health" 10
}
fe f1 $F1 11 --router-mode kv --drain-timeout 20s
fe f2 $F2 12 --router-mode round-robin
kvr_wait_http "http://127.0.0.1:$RP/ready" 15
AUTH=(-H "Authorization: Bearer $KEY")
live2() { [ "$(curl -s "http://127.0.0.1:$1/metrics" | awk '$1 == "kvr_frontend_live_workers" {print $2}')" = "$2" ]; }
kvr_wait_for 10 live2 $F1 2 || kvr_fail "f1 does not see both workers"
kvr_wait_for 10 live2 $F2 2 || kvr_fail "f2 does not see both workers"

# --- Bearer scheme in any case (RFC 7235) ---
kvr_assert_eq "$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: bearer $KEY" "http://127.0.0.1:$F1/v1/models")" 200 "lower-case bearer"
kvr_assert_eq "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer x$KEY" "http://127.0.0.1:$F1/v1/models")" 401 "wrong key"

# --- allow-list: a public address and a hostname are refused and counted ---
printf 'beat default 901 m9 http://8.8.8.8:80 64 1000\nbeat default 902 m9 http://evil.example:80 64 1000\n' |
    "$PUB" --nats "$NATS_URL" --core >/dev/null
refused() { [ "$(curl -s "http://127.0.0.1:$F1/metrics" | awk '$1 == "kvr_frontend_heartbeats_refused_url_total" {print $2}')" = 2 ]; }
kvr_wait_for 5 refused || kvr_fail "refused heartbeats not counted"
curl -s "${AUTH[@]}" "http://127.0.0.1:$F1/v1/models" | jq -e '[.data[] | select(.id == "m9")] | length == 0' >/dev/null ||
    kvr_fail "a refused worker's model is listed"

# --- 502 names the worker id, not its URL (a worker at a closed port, the only one of mx) ---
kvr_spawn dead "$PUB" --nats "$NATS_URL" beat-loop default 50 mx "http://127.0.0.1:1/dead" 64 1000 300
kvr_wait_for 5 bash -c "curl -s ${AUTH[*]@Q} http://127.0.0.1:$F2/v1/models | jq -e '.data[] | select(.id==\"mx\")' >/dev/null" ||
    kvr_fail "mx never listed"
r=$(curl -s "${AUTH[@]}" -d '{"model":"mx","prompt":"hi","max_tokens":2}' "http://127.0.0.1:$F2/v1/completions")
echo "$r" | jq -e '.error.message | test("upstream worker 50")' >/dev/null || kvr_fail "502 message: $r"
case "$r" in *127.0.0.1:1*|*/dead*) kvr_fail "502 leaks the worker URL: $r" ;; esac
kvr_term dead

# --- loop stall: the frontend and a worker's heartbeat source frozen 5 s (TTL 3 s); the
#     frontend then runs alone for 0.5 s: the worker must still be live (the loop had ~1.7 s
#     of its 3 s TTL; /v1/models checks for a stall itself, whether or not a tick ran) ---
kvr_spawn fb "$PUB" --nats "$NATS_URL" beat-loop default 60 mstall "http://127.0.0.1:3/x" 64 1000 200
listed() { curl -s "${AUTH[@]}" "http://127.0.0.1:$F2/v1/models" | jq -e '.data[] | select(.id=="mstall")' >/dev/null; }
kvr_wait_for 5 listed || kvr_fail "mstall never listed"
kill -STOP "$(kvr_pid f2)" "$(kvr_pid fb)"
sleep 5
kill -CONT "$(kvr_pid f2)"
sleep 0.5
listed || kvr_fail "a frontend stall expired a worker"
kill -CONT "$(kvr_pid fb)"
kvr_term fb

body() { jq -cn --argjson n "$1" '{model:"m1",prompt:"The quick brown fox jumps",max_tokens:$n,stream:true}'; }
# --- stall before the first token: retried on the other worker (round-robin sends one of two
#     requests to the stopped worker) ---
kill -STOP "$(kvr_pid w1)"
t0=$(date +%s%N)
cpids=()
for i in 1 2; do
    curl -s -N --max-time 20 "${AUTH[@]}" -d "$(body 8)" "http://127.0.0.1:$F2/v1/completions" >"$KVR_TMP/pre$i.sse" &
    cpids+=($!)
done
wait "${cpids[@]}"
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
kvr_log "two requests with worker 1 stopped: ${ms} ms"
for i in 1 2; do
    grep -q '^data: \[DONE\]' "$KVR_TMP/pre$i.sse" && ! grep -q '"error"' "$KVR_TMP/pre$i.sse" ||
        kvr_fail "request $i with a stopped worker: $(head -c 400 "$KVR_TMP/pre$i.sse")"
done
[ "$ms" -lt 15000 ] || kvr_fail "retry took $ms ms"
[ "$(curl -s "http://127.0.0.1:$F2/metrics" | awk '$1 == "kvr_frontend_upstream_retries_total" {print $2}')" -ge 1 ] ||
    kvr_fail "no retry counted"
kill -CONT "$(kvr_pid w1)"
kvr_wait_for 10 live2 $F1 2 || kvr_fail "worker 1 not live again"

# --- stall after the first token: SSE error + [DONE], booking freed ---
kvr_spawn s1 curl -s -N --max-time 60 "${AUTH[@]}" -d "$(body 400)" "http://127.0.0.1:$F1/v1/completions"
kvr_wait_for 10 grep -q '"text"' "$KVR_TMP/s1.log" || kvr_fail "no first token"
wid=$(curl -s "http://127.0.0.1:$RP/v1/state" | jq -r '[.workers[] | select(.bookings > 0) | .id][0]')
[ "$wid" = 1 ] || [ "$wid" = 2 ] || kvr_fail "no booked worker in the router: $wid"
kill -STOP "$(kvr_pid w$wid)"
t0=$(date +%s%N)
kvr_wait_for 10 grep -q '^data: \[DONE\]' "$KVR_TMP/s1.log" || kvr_fail "stream of a stopped worker never ended"
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
kvr_log "stream ended ${ms} ms after its worker was stopped"
grep -q 'upstream worker .* failed: stalled' "$KVR_TMP/s1.log" || kvr_fail "no SSE error event: $(tail -c 300 "$KVR_TMP/s1.log")"
kvr_wait_for 5 bash -c "[ \"\$(curl -s http://127.0.0.1:$RP/v1/state | jq -r .bookings)\" = 0 ]" ||
    kvr_fail "booking not freed after the stall"
kill -CONT "$(kvr_pid w$wid)"
kvr_wait_for 10 live2 $F1 2 || kvr_fail "worker $wid not live again"

# --- SIGTERM drain: the listener closes, /ready would say 503, the stream finishes ---
kvr_spawn s2 curl -s -N --max-time 60 "${AUTH[@]}" -d "$(body 60)" "http://127.0.0.1:$F1/v1/completions"
kvr_wait_for 10 grep -q '"text"' "$KVR_TMP/s2.log" || kvr_fail "no first token (drain)"
# a keep-alive connection opened before the SIGTERM: its next request gets 503 (not a reset)
ready_after_term=$(/usr/bin/python3 - "$F1" "$(kvr_pid f1)" <<'PY'
import os, signal, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port), timeout=5)
def ask():
    s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return "closed"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    n = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(body) < n:
        body += s.recv(4096)
    return head.split(b" ")[1].decode()
first = ask()
os.kill(pid, signal.SIGTERM)
time.sleep(0.5)
print(first, ask())
PY
)
kvr_assert_eq "$ready_after_term" "200 503" "/ready on a kept-alive connection before and after SIGTERM"
kvr_wait_for 5 bash -c "! curl -s -o /dev/null --max-time 1 http://127.0.0.1:$F1/health" ||
    kvr_fail "listener still open while draining"
kvr_wait_for 30 bash -c "! kill -0 $(kvr_pid f1) 2>/dev/null" || kvr_fail "f1 did not exit after its stream"
grep -q '^data: \[DONE\]' "$KVR_TMP/s2.log" || kvr_fail "drained stream has no [DONE]"
! grep -q '"error"' "$KVR_TMP/s2.log" || kvr_fail "drained stream got an error: $(tail -c 300 "$KVR_TMP/s2.log")"
kvr_assert_eq "$(jq -rs '[.[] | .choices[0].text] | length' < <(sed -n 's/^data: \({.*\)$/\1/p' "$KVR_TMP/s2.log"))" \
    "$(sed -n 's/^data: \({.*\)$/\1/p' "$KVR_TMP/s2.log" | wc -l)" "drained stream events parse"

# --- drain timeout: the rest get an SSE error event and [DONE] ---
fe f3 $F3 13 --router-mode round-robin --drain-timeout 1s
kvr_wait_for 10 live2 $F3 2 || kvr_fail "f3 does not see both workers"
kvr_spawn s3 curl -s -N --max-time 60 "${AUTH[@]}" -d "$(body 400)" "http://127.0.0.1:$F3/v1/completions"
kvr_wait_for 10 grep -q '"text"' "$KVR_TMP/s3.log" || kvr_fail "no first token (drain timeout)"
kill -TERM "$(kvr_pid f3)"
kvr_wait_for 10 bash -c "! kill -0 $(kvr_pid f3) 2>/dev/null" || kvr_fail "f3 did not exit at its drain timeout"
grep -q '"code":"worker_failed"\|shutting down' "$KVR_TMP/s3.log" || kvr_fail "no SSE error at the drain timeout: $(tail -c 300 "$KVR_TMP/s3.log")"
grep -q '^data: \[DONE\]' "$KVR_TMP/s3.log" || kvr_fail "no [DONE] at the drain timeout"

# --- a second SIGTERM cuts at once, with the same ending ---
fe f4 $F4 14 --router-mode round-robin --drain-timeout 60s
kvr_wait_for 10 live2 $F4 2 || kvr_fail "f4 does not see both workers"
kvr_spawn s4 curl -s -N --max-time 60 "${AUTH[@]}" -d "$(body 400)" "http://127.0.0.1:$F4/v1/completions"
kvr_wait_for 10 grep -q '"text"' "$KVR_TMP/s4.log" || kvr_fail "no first token (second signal)"
kill -TERM "$(kvr_pid f4)"
sleep 0.3
kvr_assert "f4 still draining after one SIGTERM" kvr_alive f4
kill -TERM "$(kvr_pid f4)"
kvr_wait_for 5 bash -c "! kill -0 $(kvr_pid f4) 2>/dev/null" || kvr_fail "f4 did not exit on the second SIGTERM"
grep -q '^data: \[DONE\]' "$KVR_TMP/s4.log" || kvr_fail "no [DONE] after the second SIGTERM"
kvr_pass
