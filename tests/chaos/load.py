#!/usr/bin/python3
"""Closed-loop request load for the chaos tests (stdlib only).

  load.py URL CONCURRENCY STOP_FILE OUT_JSON [--max-tokens N] [--stream] [--timeout S]
          [--prefix P] [--sessions K]

CONCURRENCY threads each send POST URL (an OpenAI completion) one after another until
STOP_FILE exists, then the summary goes to OUT_JSON:
  {"total","ok","failed","errors":[first 10],"max_s","max_gap_s","inflight_at_stop"}
A request is ok when it answers 200 with max_tokens completion tokens (streamed: bytes of text,
one per token with kvr-worker) and, streamed, ends with
[DONE] and no error event. Prompts cycle over K sessions sharing a prefix, so KV routing and
bookings are exercised. max_gap_s is the longest time without any request finishing ok
(counted while the load ran), which is what an outage looks like to clients.
"""
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse


def one(u, body, stream, timeout, max_tokens):
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        c.request("POST", u.path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return f"status {r.status}: {r.read()[:200]!r}"
        if not stream:
            d = json.loads(r.read())
            n = d.get("usage", {}).get("completion_tokens")
            return None if n == max_tokens else f"completion_tokens {n}"
        done, ntok, err = False, 0, None
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            ev = json.loads(data)
            if "error" in ev:
                err = ev["error"]
                continue
            for ch in ev.get("choices", []):
                ntok += len((ch.get("text") or "").encode())  # one byte per token
        if err is not None:
            return f"error event: {json.dumps(err)[:200]}"
        if not done:
            return "stream ended without [DONE]"
        return None if ntok >= max_tokens else f"{ntok} tokens"
    except Exception as e:  # timeouts, resets: a failed request
        return f"{type(e).__name__}: {e}"
    finally:
        c.close()


def main():
    a = sys.argv[1:]
    url, conc, stop, out = a[0], int(a[1]), a[2], a[3]
    opt = {"--max-tokens": "8", "--timeout": "30", "--prefix": "chaos", "--sessions": "8"}
    stream = "--stream" in a
    for i, x in enumerate(a):
        if x in opt:
            opt[x] = a[i + 1]
    max_tokens, timeout = int(opt["--max-tokens"]), float(opt["--timeout"])
    u = urllib.parse.urlsplit(url)
    lock = threading.Lock()
    st = {"total": 0, "ok": 0, "failed": 0, "errors": [], "max_s": 0.0}
    t_start = time.monotonic()
    last_ok = [t_start]
    max_gap = [0.0]
    inflight = [0]

    def worker(k):
        n = 0
        while not os.path.exists(stop):
            n += 1
            s = (k * 7919 + n) % int(opt["--sessions"])
            prompt = f"{opt['--prefix']} session {s} " + "shared context " * 40 + f"turn {k}.{n}"
            body = {"model": "m1", "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
            t0 = time.monotonic()
            with lock:
                inflight[0] += 1
            e = one(u, body, stream, timeout, max_tokens)
            t1 = time.monotonic()
            with lock:
                inflight[0] -= 1
                st["total"] += 1
                st["max_s"] = max(st["max_s"], t1 - t0)
                if e is None:
                    st["ok"] += 1
                    max_gap[0] = max(max_gap[0], t1 - last_ok[0])
                    last_ok[0] = t1
                else:
                    st["failed"] += 1
                    if len(st["errors"]) < 10:
                        st["errors"].append(f"t={t1 - t_start:.1f}s {e}")

    th = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(conc)]
    for t in th:
        t.start()
    while not os.path.exists(stop):
        time.sleep(0.05)
    t_stop = time.monotonic()
    st["inflight_at_stop"] = inflight[0]
    for t in th:
        t.join()
    st["max_gap_s"] = round(max(max_gap[0], t_stop - last_ok[0]), 2)
    st["max_s"] = round(st["max_s"], 2)
    with open(out + ".tmp", "w") as f:
        json.dump(st, f)
    os.rename(out + ".tmp", out)


if __name__ == "__main__":
    main()
