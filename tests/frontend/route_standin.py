#!/usr/bin/python3
"""A stand-in router for the frontend's hold tests: answers kvr.route over a real nats-server.

  route_standin.py HOST PORT STATE_FILE

Speaks the NATS text protocol over a socket (python3 has no NATS library here), subscribes to
kvr.route in queue group kvr-routers, as kvr-routerd does, and answers every route request
from STATE_FILE, re-read at each request: a JSON object model -> {"state": "ok", "worker_id":
N, "url": U} | {"state": "refuse"} | {"state": "waking", "retry_after_ms": R}, with "log": true to print each
request's arrival ("route MODEL UNIX_TIME"); a model it does not name is waking:
  {"ok": false, "pool_state": "waking", "retry_after_ms": R, "error": "pool waking"}
(R from the model's or the state file's "retry_after_ms", default 200). The number of route requests per model
is written to STATE_FILE.counts (JSON) every 0.3 s."""
import json
import os
import socket
import sys
import threading
import time

import msgpack


def main():
    host, port, state_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = socket.create_connection((host, port), timeout=10)
    s.settimeout(None)
    f = s.makefile("rb")
    info = f.readline()
    if not info.startswith(b"INFO"):
        sys.exit("no INFO: %r" % info)
    connect = {"verbose": False, "pedantic": False, "protocol": 1, "name": "route-standin",
               "lang": "py", "version": "test"}
    s.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\n")
    s.sendall(b"SUB kvr.route kvr-routers 1\r\nPING\r\n")
    counts = {}

    def dump():
        try:
            c = dict(counts)
        except RuntimeError:
            return
        tmp = state_file + ".counts.tmp.%d" % threading.get_ident()
        with open(tmp, "w") as o:
            json.dump(c, o)
        os.replace(tmp, state_file + ".counts")

    def dumper():
        while True:
            time.sleep(0.3)
            dump()

    threading.Thread(target=dumper, daemon=True).start()

    ready = False
    while True:
        line = f.readline()
        if not line:
            break
        if line.startswith(b"PING"):
            s.sendall(b"PONG\r\n")
            continue
        if line.startswith(b"PONG"):
            if not ready:
                ready = True
                print("standin ready", flush=True)
                dump()
            continue
        if line.startswith(b"-ERR"):
            print("server error:", line.decode().strip(), flush=True)
            continue
        if not line.startswith(b"MSG"):
            continue
        parts = line.split()
        # MSG <subject> <sid> [reply] <size>
        reply = parts[3].decode() if len(parts) == 5 else None
        size = int(parts[-1])
        payload = f.read(size + 2)[:size]
        if not reply:
            continue
        try:
            req = msgpack.unpackb(payload, raw=False)
            model = req.get("model", "")
        except Exception as e:  # noqa
            print("bad request:", e, flush=True)
            continue
        try:
            with open(state_file) as sf:
                st = json.load(sf)
        except (OSError, ValueError):
            st = {}
        counts[model] = counts.get(model, 0) + 1
        m = st.get(model) or {}
        if m.get("log"):
            print("route %s %.3f" % (model, time.time()), flush=True)
        if m.get("state") == "ok":
            rep = {"ok": True, "worker_id": int(m["worker_id"]), "url": m["url"],
                   "overlap_blocks": 0, "router_id": 99, "mode": "raft"}
        elif m.get("state") == "refuse":
            rep = {"ok": False, "error": "no such pool"}
        else:
            ra = m.get("retry_after_ms", st.get("retry_after_ms", 200))
            rep = {"ok": False, "pool_state": "waking", "retry_after_ms": int(ra),
                   "error": "pool waking"}
        b = msgpack.packb(rep, use_bin_type=True)
        s.sendall(b"PUB " + reply.encode() + b" " + str(len(b)).encode() + b"\r\n" + b + b"\r\n")
    dump()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
