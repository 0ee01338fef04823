#!/usr/bin/env bash
# A real frontend against abusive HTTP clients (issue 18, defects 6 and 7):
# - 30,000 pipelined GET /metrics whose answers are never read must not grow the frontend's
#   memory with them (it stops reading that client; 226 MB before the fix);
# - slow uploads holding every connection slot (a big Content-Length, a byte now and then) must
#   not make /health fail: the oldest slow reader is shed to serve a new client.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init http_frontend_abuse
kvr_start_nats
P=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$P --nats "$NATS_URL" --id 7 \
    --router-mode round-robin --max-connections 32
kvr_wait_http "http://127.0.0.1:$P/health" 10
pid=$(kvr_pid fe)
rss() { awk '/VmRSS/{print $2}' /proc/"$pid"/status; }

rss0=$(rss)
# Pipeline without reading; hold the connection open until the server has stopped answering.
python3 - "$P" "$pid" >"$KVR_TMP/pipe.out" <<'PY'
import socket, sys, time
port, pid = int(sys.argv[1]), sys.argv[2]
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
s.setblocking(False)
req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 30000
sent, peak, last, stable = 0, 0, None, 0
t0 = time.time()
while time.time() - t0 < 20 and stable < 20:
    try:
        sent += s.send(req[sent:]) if sent < len(req) else 0
    except BlockingIOError:
        pass
    time.sleep(0.05)
    r = rss()
    peak = max(peak, r)
    stable = stable + 1 if r == last else 0
    last = r
print(sent // 35, peak)
s.close()
PY
read -r nsent peak <"$KVR_TMP/pipe.out"
kvr_log "pipelined ${nsent} GET /metrics unread: RSS ${rss0} kB -> peak ${peak} kB"
# ASan's quarantine and shadow memory keep freed buffers resident: a looser bound there, still
# far below the ~215 MB the unbounded queue grew by.
bound=16384
[ -n "${ASAN_OPTIONS:-}" ] && bound=65536
[ $((peak - rss0)) -lt $bound ] || kvr_fail "RSS grew from ${rss0} to ${peak} kB (bound ${bound} kB)"
kvr_assert_eq "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$P/health")" 200 \
    "health after the pipeliner"

# 64 slow uploads against 32 connection slots, then 20 health checks while they trickle.
python3 - "$P" >"$KVR_TMP/slow.out" <<'PY'
import socket, subprocess, sys, time
port = int(sys.argv[1])
slow = []
for i in range(64):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 4000000\r\n\r\n{")
    slow.append(s)
ok = 0
for i in range(20):
    for s in slow[:8]:
        try:
            s.send(b" ")
        except OSError:
            pass
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        if c.recv(64).startswith(b"HTTP/1.1 200"):
            ok += 1
        c.close()
    except OSError:
        pass
print(ok)
PY
kvr_assert_eq "$(cat "$KVR_TMP/slow.out")" 20 "health checks answered 200 among slow uploads"
kvr_pass
