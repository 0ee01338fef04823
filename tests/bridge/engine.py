#!/usr/bin/python3
"""A vLLM engine stand-in for kvr-bridge tests: KV events in vLLM's exact ZMQ framing, plus a
tiny /metrics and /health server. Python: Debian's python3-zmq and python3-msgpack.

Framing as in vLLM's vllm/distributed/kv_events.py (ZmqEventPublisher): PUB sends
(topic, seq.to_bytes(8, "big"), msgpack batch); the ROUTER replay socket takes
[identity, "", start_seq(8B BE)] and answers every buffered (seq, payload) with seq >= start
as [identity, "", seq, payload] (layout "old") or [identity, "", topic, seq, payload] (layout
"new", vLLM PR #45177), then the end marker with seq (-1).to_bytes(8, "big", signed=True).
Data-parallel rank r uses both ports + r (vLLM's offset_endpoint_port).

Control: POST /ctl with a JSON list of commands, run in order (see Engine.ctl). GET
/overlap?rank=R&tokens=1,2,3 returns how many leading full blocks of the tokens the engine
holds (what a router's /v1/match should say)."""
import argparse, hashlib, json, threading, time, urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer

import msgpack, zmq

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def block_hash(parent, toks):
    h = hashlib.sha256((str(parent) + ":" + ",".join(map(str, toks))).encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1  # a positive int64, like vLLM's ints


class Rank:
    def __init__(self, ctx, r, a):
        self.r, self.a = r, a
        self.pub = ctx.socket(zmq.PUB)
        self.pub.bind("tcp://127.0.0.1:%d" % (a.pub + r))
        self.router = None
        if a.replay:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.bind("tcp://127.0.0.1:%d" % (a.replay + r))
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.seq = 0
        self.buffer = []      # (seq, payload)
        self.held = {}        # block hash -> parent
        self.drop_next = 0

    def publish(self, events, fmt):
        if fmt == "map":
            events = [self.to_map(e) for e in events]
        batch = [time.time(), events, self.r]
        payload = msgpack.packb(batch, use_bin_type=True)
        self.send_payload(payload)

    def send_payload(self, payload):
        with self.lock:
            seq = self.seq
            self.seq += 1
            self.buffer.append((seq, payload))
            self.buffer = self.buffer[-self.a.buffer_steps:]
            if self.drop_next > 0:
                self.drop_next -= 1
                return
            self.pub.send_multipart([self.a.topic.encode(), seq.to_bytes(8, "big"), payload])

    @staticmethod
    def to_map(e):
        if e[0] == "BlockStored":
            return {"type": "BlockStored", "block_hashes": e[1], "parent_block_hash": e[2],
                    "token_ids": e[3], "block_size": e[4], "medium": "GPU",
                    "kv_cache_spec_kind": "full_attention"}
        if e[0] == "BlockRemoved":
            return {"type": "BlockRemoved", "block_hashes": e[1], "medium": "GPU"}
        return {"type": e[0]}

    def serve_replay(self, stop):
        while not stop.is_set():
            if not self.router.poll(100):
                continue
            frames = self.router.recv_multipart()
            if len(frames) != 3 or self.a.replay_mode == "silent":
                continue
            ident, _, start = frames
            start = int.from_bytes(start, "big")
            with self.lock:
                items = [(s, p) for s, p in self.buffer if s >= start]
            if self.a.replay_delay_ms:  # answer as of the request, sent late
                time.sleep(self.a.replay_delay_ms / 1000)
            topic = self.a.topic.encode()
            for s, p in items:
                if self.a.replay_mode == "new":
                    self.router.send_multipart([ident, b"", topic, s.to_bytes(8, "big"), p])
                else:
                    self.router.send_multipart([ident, b"", s.to_bytes(8, "big"), p])
            if self.a.replay_mode == "partial":  # the batches, then never the end marker
                continue
            if self.a.replay_mode == "new":
                self.router.send_multipart([ident, b"", b"", END_SEQ, b""])
            else:
                self.router.send_multipart([ident, b"", END_SEQ, b""])


class Engine:
    def __init__(self, a):
        self.a = a
        self.ctx = zmq.Context()
        self.ranks = [Rank(self.ctx, r, a) for r in range(a.dp)]
        self.fmt = a.format
        self.up = True
        self.start_s = time.time()
        self.stop = threading.Event()
        for rk in self.ranks:
            if rk.router:
                threading.Thread(target=rk.serve_replay, args=(self.stop,), daemon=True).start()

    def store(self, rk, tokens, extra_bad=False):
        bs = self.a.block_size
        parent, hashes, toks = None, [], []
        evs = []
        for i in range(0, len(tokens) - bs + 1, bs):
            b = tokens[i:i + bs]
            h = block_hash(parent, b)
            if h not in rk.held:
                hashes.append(h)
                toks += b
                if len(hashes) == 1:
                    first_parent = parent
            rk.held.setdefault(h, parent)
            parent = h
        if hashes:
            evs.append(["BlockStored", hashes, first_parent, toks, bs, None])
        if extra_bad:  # an event the decoder must reject: tokens != hashes * block_size
            evs.insert(0, ["BlockStored", [12345], None, [1, 2, 3], bs, None])
        return evs

    def remove(self, rk, tokens, from_block):
        bs = self.a.block_size
        parent, rm = None, []
        for n, i in enumerate(range(0, len(tokens) - bs + 1, bs)):
            h = block_hash(parent, tokens[i:i + bs])
            if n >= from_block and h in rk.held:
                rm.append(h)
            parent = h
        for h in rm:
            del rk.held[h]
        return [["BlockRemoved", rm]] if rm else []

    def ctl(self, cmds):
        """Commands: {"op":"store","rank":0,"tokens":[...],"bad":false} (one batch);
        {"op":"remove","rank":0,"tokens":[...],"from_block":2}; {"op":"drop","rank":0,"n":1}
        (the next n batches are buffered for replay but not published);
        {"op":"restart"} (seq back to 0, nothing held, replay buffer empty);
        {"op":"format","value":"array|map"}; {"op":"replay_mode","value":"old|new|partial|silent"};
        {"op":"replay_delay","value":ms} (a replay answer is the buffer when the request came,
        sent ms later);
        {"op":"up","value":true|false} (/metrics and /health answer 503 when false);
        {"op":"garbage","rank":0} (malformed frames and a garbage payload, with seqs)."""
        for c in cmds:
            op = c["op"]
            rk = self.ranks[c.get("rank", 0)]
            if op == "store":
                evs = self.store(rk, c["tokens"], c.get("bad", False))
                rk.publish(evs, self.fmt)
            elif op == "remove":
                rk.publish(self.remove(rk, c["tokens"], c.get("from_block", 0)), self.fmt)
            elif op == "drop":
                rk.drop_next += c.get("n", 1)
            elif op == "restart":
                self.start_s = time.time()
                for r in self.ranks:
                    with r.lock:
                        r.reset()
            elif op == "format":
                self.fmt = c["value"]
            elif op == "replay_mode":
                self.a.replay_mode = c["value"]
            elif op == "replay_delay":
                self.a.replay_delay_ms = int(c["value"])
            elif op == "up":
                self.up = bool(c["value"])
            elif op == "garbage":
                rk.pub.send_multipart([b"x"])                          # 1 frame
                rk.pub.send_multipart([b"", b"\x00\x01", b"\x90"])      # seq of 2 bytes
                rk.send_payload(b"\xc1\xc1\xc1")                        # garbage, real seq
            else:
                raise ValueError(op)

    def overlap(self, rank, tokens):
        rk, bs, parent, n = self.ranks[rank], self.a.block_size, None, 0
        for i in range(0, len(tokens) - bs + 1, bs):
            h = block_hash(parent, tokens[i:i + bs])
            if h not in rk.held:
                break
            n, parent = n + 1, h
        return n

    def metrics(self):
        lines = ["process_start_time_seconds %.3f" % self.start_s,
                 "# HELP vllm:num_requests_running x", "# TYPE vllm:num_requests_running gauge"]
        for rk in self.ranks:
            l = 'model_name="%s",engine="%d"' % (self.a.model, rk.r)
            lines += ['vllm:num_requests_running{%s} %d' % (l, 1 + rk.r),
                      'vllm:num_requests_waiting{%s} %d' % (l, 2),
                      'vllm:kv_cache_usage_perc{%s} %f' % (l, len(rk.held) / self.a.blocks),
                      'vllm:cache_config_info{block_size="%d",cache_dtype="auto",engine="%d",'
                      'num_gpu_blocks="%d"} 1.0' % (self.a.block_size, rk.r, self.a.blocks)]
        return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pub", type=int, required=True)
    p.add_argument("--replay", type=int, default=0)
    p.add_argument("--http", type=int, required=True)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--topic", default="")
    p.add_argument("--format", default="array")
    p.add_argument("--replay-mode", default="new")
    p.add_argument("--replay-delay-ms", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--blocks", type=int, default=1000)
    p.add_argument("--buffer-steps", type=int, default=10000)
    p.add_argument("--model", default="stand-in")
    a = p.parse_args()
    eng = Engine(a)

    class H(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code, body, ctype="text/plain"):
            b = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            self.wfile.write(b)

        def do_GET(self):
            u = urllib.parse.urlparse(self.path)
            if u.path in ("/metrics", "/health"):
                if not eng.up:
                    return self.reply(503, "down\n")
                return self.reply(200, eng.metrics() if u.path == "/metrics" else "")
            if u.path == "/overlap":
                q = urllib.parse.parse_qs(u.query)
                toks = [int(x) for x in q["tokens"][0].split(",")]
                return self.reply(200, str(eng.overlap(int(q.get("rank", ["0"])[0]), toks)))
            self.reply(404, "no\n")

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                eng.ctl(json.loads(body))
            except Exception as e:  # a test bug: say it
                return self.reply(400, repr(e))
            self.reply(200, "ok\n")

    HTTPServer(("127.0.0.1", a.http), H).serve_forever()


if __name__ == "__main__":
    main()
