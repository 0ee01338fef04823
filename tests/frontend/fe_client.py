#!/usr/bin/python3
"""Raw HTTP/1.1 client for the frontend's integration tests (stdlib only).

  fe_client.py sse URL BODY [--key K]          one request; prints a JSON summary
  fe_client.py hold URL BODY N PID [--key K]   N concurrent SSE streams held open at once;
                                               prints JSON {opened, completed, rss_kb_*}
  fe_client.py slowloris URL SECONDS           sends headers one byte per 0.5 s; prints the
                                               status the server answered (or "closed")
  fe_client.py stall URL BODY SECONDS PID      starts a stream and stops reading; RSS samples
  fe_client.py disconnect URL BODY [--key K]   reads the first SSE event, then drops the socket
"""
import asyncio
import json
import sys
import time
import urllib.parse


def parse_url(url):
    u = urllib.parse.urlsplit(url)
    return u.hostname, u.port or 80, (u.path or "/") + (("?" + u.query) if u.query else "")


def request_bytes(host, port, path, body, key=None, method="POST"):
    b = body.encode() if isinstance(body, str) else body
    h = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
         f"Content-Length: {len(b)}"]
    if key:
        h.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(h) + "\r\n\r\n").encode() + b


async def read_head(r):
    head = await r.readuntil(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for l in lines[1:]:
        if ":" in l:
            k, v = l.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    return status, hdrs


async def body_chunks(r, hdrs):
    """Yields body pieces (de-chunked)."""
    if hdrs.get("transfer-encoding", "").lower() == "chunked":
        while True:
            line = await r.readuntil(b"\r\n")
            n = int(line.split(b";")[0], 16)
            if n == 0:
                await r.readuntil(b"\r\n")
                return
            data = await r.readexactly(n + 2)
            yield data[:-2]
    elif "content-length" in hdrs:
        n = int(hdrs["content-length"])
        if n:
            yield await r.readexactly(n)
    else:
        while True:
            d = await r.read(65536)
            if not d:
                return
            yield d


def sse_events(buf):
    """Splits complete events off buf; returns (events, rest)."""
    evs = []
    while b"\n\n" in buf:
        ev, buf = buf.split(b"\n\n", 1)
        data = [l[5:].lstrip(b" ") for l in ev.split(b"\n") if l.startswith(b"data:")]
        if data:
            evs.append(b"\n".join(data).decode())
    return evs, buf


async def one(url, body, key):
    host, port, path = parse_url(url)
    r, w = await asyncio.open_connection(host, port)
    t0 = time.monotonic()
    w.write(request_bytes(host, port, path, body, key))
    await w.drain()
    status, hdrs = await read_head(r)
    out = {"status": status, "headers": hdrs, "events": [], "done": False, "text": "",
           "ttft_ms": None}
    buf = b""
    raw = b""
    async for piece in body_chunks(r, hdrs):
        raw += piece
        if hdrs.get("content-type", "").startswith("text/event-stream"):
            buf += piece
            evs, buf = sse_events(buf)
            for e in evs:
                if out["ttft_ms"] is None:
                    out["ttft_ms"] = (time.monotonic() - t0) * 1000
                if e == "[DONE]":
                    out["done"] = True
                    continue
                j = json.loads(e)
                out["events"].append(j)
                for c in j.get("choices", []):
                    if "text" in c:
                        out["text"] += c["text"] or ""
                    elif "delta" in c:
                        out["text"] += c["delta"].get("content") or ""
    if not hdrs.get("content-type", "").startswith("text/event-stream"):
        try:
            out["json"] = json.loads(raw)
        except Exception:
            out["body"] = raw.decode("latin1")
    w.close()
    return out


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for l in f:
                if l.startswith("VmRSS:"):
                    return int(l.split()[1])
    except OSError:
        return -1
    return -1


async def hold(url, body, n, pid, key):
    host, port, path = parse_url(url)
    first = asyncio.Event()
    state = {"opened": 0, "completed": 0, "failed": 0, "errors": []}
    all_open = asyncio.Event()

    async def stream():
        try:
            r, w = await asyncio.open_connection(host, port)
            w.write(request_bytes(host, port, path, body, key))
            await w.drain()
            status, hdrs = await read_head(r)
            if status != 200:
                state["failed"] += 1
                state["errors"].append(status)
                w.close()
                return
            buf = b""
            got_first = False
            done = False
            async for piece in body_chunks(r, hdrs):
                buf += piece
                evs, buf = sse_events(buf)
                if evs and not got_first:
                    got_first = True
                    state["opened"] += 1
                    if state["opened"] == n:
                        all_open.set()
                    # hold: stop reading until every stream is open (backpressure upstream)
                    await all_open.wait()
                if "[DONE]" in evs:
                    done = True
            state["completed"] += 1 if done else 0
            if not done:
                state["failed"] += 1
            w.close()
        except Exception as e:  # noqa
            state["failed"] += 1
            state["errors"].append(repr(e)[:80])
            if state["opened"] + state["failed"] >= n:
                all_open.set()

    base = rss_kb(pid)
    tasks = [asyncio.create_task(stream()) for _ in range(n)]
    peak = base
    t0 = time.monotonic()
    while not all_open.is_set() and time.monotonic() - t0 < 90:
        await asyncio.sleep(0.2)
        peak = max(peak, rss_kb(pid))
        if state["opened"] + state["failed"] >= n:
            all_open.set()
    held = state["opened"]
    peak = max(peak, rss_kb(pid))
    all_open.set()
    await asyncio.gather(*tasks)
    state.update({"held_at_once": held, "rss_kb_before": base, "rss_kb_peak": peak,
                  "rss_kb_after": rss_kb(pid), "errors": state["errors"][:5]})
    return state


async def slowloris(url, seconds):
    host, port, path = parse_url(url)
    r, w = await asyncio.open_connection(host, port)
    req = f"GET /health HTTP/1.1\r\nHost: {host}\r\nX-Slow: " + "a" * 200
    t0 = time.monotonic()
    try:
        for ch in req:
            w.write(ch.encode())
            await w.drain()
            try:
                d = await asyncio.wait_for(r.read(4096), 0.5)
                if not d:
                    return {"result": "closed", "after_s": time.monotonic() - t0}
                return {"result": d.split(b"\r\n")[0].decode(), "after_s": time.monotonic() - t0}
            except asyncio.TimeoutError:
                pass
            if time.monotonic() - t0 > seconds:
                return {"result": "still-open", "after_s": time.monotonic() - t0}
    except (ConnectionError, BrokenPipeError):
        return {"result": "closed", "after_s": time.monotonic() - t0}
    return {"result": "still-open", "after_s": time.monotonic() - t0}


async def stall(url, body, seconds, pid, key):
    """Starts a stream, reads its head and first bytes, then reads nothing for `seconds`
    while sampling the server's RSS; then drops the connection."""
    host, port, path = parse_url(url)
    r, w = await asyncio.open_connection(host, port, limit=1 << 16)
    # a small receive buffer so the server's socket fills quickly
    sock = w.get_extra_info("socket")
    import socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    w.write(request_bytes(host, port, path, body, key))
    await w.drain()
    status, hdrs = await read_head(r)
    base = rss_kb(pid)
    peak = base
    t0 = time.monotonic()
    r._transport.pause_reading()
    while time.monotonic() - t0 < seconds:
        await asyncio.sleep(0.2)
        peak = max(peak, rss_kb(pid))
    w.transport.abort()
    return {"status": status, "rss_kb_before": base, "rss_kb_peak": peak}


async def disconnect(url, body, key):
    host, port, path = parse_url(url)
    r, w = await asyncio.open_connection(host, port)
    w.write(request_bytes(host, port, path, body, key))
    await w.drain()
    status, hdrs = await read_head(r)
    buf = b""
    async for piece in body_chunks(r, hdrs):
        buf += piece
        evs, buf = sse_events(buf)
        if evs:
            break
    w.transport.abort()
    return {"status": status, "first_event": evs[0] if evs else None}


def main():
    a = sys.argv[1:]
    key = None
    if "--key" in a:
        i = a.index("--key")
        key = a[i + 1]
        del a[i:i + 2]
    cmd = a[0]
    if cmd == "sse":
        res = asyncio.run(one(a[1], a[2], key))
    elif cmd == "hold":
        res = asyncio.run(hold(a[1], a[2], int(a[3]), int(a[4]), key))
    elif cmd == "slowloris":
        res = asyncio.run(slowloris(a[1], float(a[2])))
    elif cmd == "stall":
        res = asyncio.run(stall(a[1], a[2], float(a[3]), int(a[4]), key))
    elif cmd == "disconnect":
        res = asyncio.run(disconnect(a[1], a[2], key))
    else:
        sys.exit("unknown command " + cmd)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
