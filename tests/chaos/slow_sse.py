#!/usr/bin/env python3
"""slow_sse.py URL BODY GO_FILE: one streaming request from a client that stops reading.

After the first event it reads nothing more (a small receive buffer, so the frontend's queue
for it fills and the frontend pauses the upstream transfer) until GO_FILE exists (at most
120 s), then reads the rest at full speed. Prints the same JSON summary as
tests/frontend/fe_client.py sse (text, events, done) plus paused_s."""
import asyncio
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "frontend"))
from fe_client import body_chunks, parse_url, read_head, request_bytes, sse_events  # noqa: E402


async def main(url, body, go):
    host, port, path = parse_url(url)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, port))
    s.setblocking(False)
    r, w = await asyncio.open_connection(sock=s)
    w.write(request_bytes(host, port, path, body))
    await w.drain()
    status, hdrs = await read_head(r)
    out = {"status": status, "events": [], "done": False, "text": "", "paused_s": 0.0}
    buf = b""
    paused = False
    async for piece in body_chunks(r, hdrs):
        buf += piece
        evs, buf = sse_events(buf)
        for e in evs:
            if e == "[DONE]":
                out["done"] = True
                continue
            j = json.loads(e)
            out["events"].append(j)
            for c in j.get("choices", []):
                out["text"] += c.get("text") or ""
        if not paused and out["events"]:
            paused = True
            t0 = time.monotonic()
            r._transport.pause_reading()
            while not os.path.exists(go) and time.monotonic() - t0 < 120:
                await asyncio.sleep(0.1)
            out["paused_s"] = round(time.monotonic() - t0, 2)
            r._transport.resume_reading()
    w.close()
    out["events"] = [e for e in out["events"] if "error" in e] + out["events"][:1]
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
