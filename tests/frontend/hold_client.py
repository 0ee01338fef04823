#!/usr/bin/python3
"""Clients for the frontend's hold tests (requests held for a pool waking from zero).

  hold_client.py streams URL BODY N OUT   N concurrent requests (SSE when BODY says stream);
                                          writes a JSON list, one summary per request, to OUT
  hold_client.py one URL BODY             one request; prints its JSON summary
  hold_client.py disconnect URL BODY      starts a stream, reads until its first SSE comment
                                          line, then drops the socket; prints a JSON summary
  hold_client.py bench URL BODY N PID METRICS_URL
                                          N held connections at once; prints RSS of PID before,
                                          with all N held (kvr_frontend_held_requests == N) and
                                          after they are dropped

A summary: status, headers (lower-case names), comments (SSE comment lines seen), done ([DONE]
seen), text, events, ttft_ms (first data event), elapsed_ms, json/body (non-SSE answers)."""
import asyncio
import json
import sys
import time
import urllib.request


# the HTTP/1.1 pieces are fe_client.py's (same folder: python puts it on sys.path)
from fe_client import body_chunks, parse_url, read_head, request_bytes  # noqa: E402


async def one(url, body, stop_at_comment=False):
    host, port, path = parse_url(url)
    t0 = time.monotonic()
    r, w = await asyncio.open_connection(host, port)
    w.write(request_bytes(host, port, path, body))
    await w.drain()
    out = {"status": 0, "headers": {}, "comments": [], "events": 0, "done": False, "text": "",
           "ttft_ms": None}
    try:
        status, hdrs = await read_head(r)
        out["status"], out["headers"] = status, hdrs
        out["head_ms"] = (time.monotonic() - t0) * 1000
        sse = hdrs.get("content-type", "").startswith("text/event-stream")
        buf = raw = b""
        async for piece in body_chunks(r, hdrs):
            raw += piece
            if not sse:
                continue
            buf += piece
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                for l in ev.split(b"\n"):
                    if l.startswith(b":"):
                        out["comments"].append(l.decode("latin1"))
                        if stop_at_comment:
                            w.close()
                            out["elapsed_ms"] = (time.monotonic() - t0) * 1000
                            return out
                    elif l.startswith(b"data:"):
                        d = l[5:].strip().decode()
                        if out["ttft_ms"] is None:
                            out["ttft_ms"] = (time.monotonic() - t0) * 1000
                        if d == "[DONE]":
                            out["done"] = True
                            continue
                        j = json.loads(d)
                        if "error" in j:
                            out["error"] = j["error"]
                            continue
                        out["events"] += 1
                        for c in j.get("choices", []):
                            out["text"] += c.get("text") or (c.get("delta") or {}).get("content") or ""
        if not sse:
            try:
                out["json"] = json.loads(raw)
            except ValueError:
                out["body"] = raw.decode("latin1")
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        out["error"] = repr(e)[:100]
    out["elapsed_ms"] = (time.monotonic() - t0) * 1000
    w.close()
    return out


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for l in f:
            if l.startswith("VmRSS:"):
                return int(l.split()[1])
    return -1


def held_now(metrics_url):
    try:
        t = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    except OSError:
        return -1
    n = 0
    for l in t.splitlines():
        if l.startswith("kvr_frontend_held_requests{"):
            n += int(float(l.rsplit(" ", 1)[1]))
    return n


async def bench(url, body, n, pid, metrics_url):
    host, port, path = parse_url(url)
    base = rss_kb(pid)
    conns = []
    t0 = time.monotonic()
    for i in range(n):
        r, w = await asyncio.open_connection(host, port)
        w.write(request_bytes(host, port, path, body))
        conns.append((r, w))
        if i % 500 == 499:
            await asyncio.sleep(0.05)
    held = 0
    while time.monotonic() - t0 < 120:
        await asyncio.sleep(0.5)
        held = await asyncio.get_running_loop().run_in_executor(None, held_now, metrics_url)
        if held >= n:
            break
    peak = rss_kb(pid)
    for r, w in conns:
        w.close()
    await asyncio.sleep(2)
    return {"n": n, "held": held, "rss_kb_before": base, "rss_kb_held": peak,
            "rss_kb_after": rss_kb(pid), "per_request_bytes": (peak - base) * 1024 // max(n, 1),
            "seconds_to_hold": round(time.monotonic() - t0, 1)}


async def main():
    mode = sys.argv[1]
    if mode == "streams":
        url, body, n, outf = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        res = await asyncio.gather(*[one(url, body) for _ in range(n)])
        with open(outf + ".tmp", "w") as o:
            json.dump(res, o)
        import os
        os.replace(outf + ".tmp", outf)
    elif mode == "one":
        print(json.dumps(await one(sys.argv[2], sys.argv[3])))
    elif mode == "disconnect":
        print(json.dumps(await one(sys.argv[2], sys.argv[3], stop_at_comment=True)))
    elif mode == "bench":
        print(json.dumps(await bench(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                                     sys.argv[6])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    asyncio.run(main())
