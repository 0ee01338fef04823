#!/usr/bin/python3
"""A stand-in for Envoy's ext_proc filter (FULL_DUPLEX_STREAMED bodies, trailers SEND) driving
kvr-epp over h2c. Its _pb2 modules are generated with protoc from Envoy's REAL protos
(tests/epp/protos), so kvr-epp's pruned proto is checked against the upstream wire format.

usage: epp_client.py ADDR SCENARIO [options]   → one JSON line on stdout
scenarios: get, post, post-close, garbage, cancel, cancel-after-body, hang, hold, concurrent, open-together (plaintext
only: --n streams all open at once on one connection), seq, health, unknown-method
"""
import argparse
import atexit
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOS = os.path.join(HERE, "protos")


def load_pb():
    out = tempfile.mkdtemp(prefix="epp_pb_")
    # the modules are imported once, below: the generated files are not needed after exit
    atexit.register(shutil.rmtree, out, True)
    files = []
    for root, _, names in os.walk(PROTOS):
        for n in names:
            if n.endswith(".proto"):
                files.append(os.path.relpath(os.path.join(root, n), PROTOS))
    subprocess.run(["protoc", "-I", PROTOS, "-I", "/usr/include", "--python_out=" + out] + files,
                   check=True)
    sys.path.insert(0, out)
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    # the generated grpc/health/v1 package would be shadowed by grpcio's "grpc": load by path
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "health_pb2", os.path.join(out, "grpc", "health", "v1", "health_pb2.py"))
    hp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hp)
    return ep, hp


# "grpc" the package must be imported before the generated grpc/health/v1 path shadows it
import grpc  # noqa: E402

ep, hp = load_pb()
from google.protobuf import struct_pb2  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402

PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
CHUNK = 62000


def hdrs(pairs, eos=False, subset=None, served=None):
    hm = base_pb2.HeaderMap()
    for k, v in pairs:
        hm.headers.add(key=k, raw_value=v.encode())
    r = ep.ProcessingRequest()
    if eos is None:
        r.response_headers.headers.CopyFrom(hm)
    else:
        r.request_headers.headers.CopyFrom(hm)
        r.request_headers.end_of_stream = eos
    set_md(r, subset, served)
    return r


def set_md(r, subset=None, served=None):
    if subset is not None:
        s = struct_pb2.Struct()
        if isinstance(subset, list):
            s.fields["x-gateway-destination-endpoint-subset"].list_value.extend(subset)
        else:
            s.fields["x-gateway-destination-endpoint-subset"].string_value = subset
        r.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(s)
    if served is not None:
        s = struct_pb2.Struct()
        s.fields["x-gateway-destination-endpoint-served"].string_value = served
        r.metadata_context.filter_metadata["envoy.lb"].CopyFrom(s)


def body(data, eos, response=False):
    r = ep.ProcessingRequest()
    b = r.response_body if response else r.request_body
    b.body = data
    b.end_of_stream = eos
    return r


class Stream:
    """One bidi Process call fed from a queue (Envoy sends as the HTTP stream progresses)."""

    def __init__(self, channel, timeout=20):
        self.q = queue.Queue()
        call = channel.stream_stream(PATH, request_serializer=ep.ProcessingRequest.SerializeToString,
                                     response_deserializer=ep.ProcessingResponse.FromString)
        self.it = call(iter(self.q.get, None), timeout=timeout)

    def send(self, m):
        self.q.put(m)

    def close(self):
        self.q.put(None)

    def recv(self):
        return next(self.it)


def dest_of(resp):
    """(header value, metadata value, clear_route_cache) of a request HeadersResponse."""
    cr = resp.request_headers.response
    hv = [h.header for h in cr.header_mutation.set_headers
          if h.header.key == "x-gateway-destination-endpoint"]
    h = (hv[0].raw_value.decode() or hv[0].value) if hv else None
    md = resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields[
        "x-gateway-destination-endpoint"].string_value if "envoy.lb" in resp.dynamic_metadata.fields else None
    return h, md, cr.clear_route_cache


def post_flow(ch, payload, chunks=1, subset=None, path="/v1/completions", respond=True):
    s = Stream(ch)
    out = {}
    s.send(hdrs([(":method", "POST"), (":path", path), ("content-type", "application/json")],
                subset=subset))
    step = max(1, -(-len(payload) // chunks))
    parts = [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
    for i, p in enumerate(parts):
        s.send(body(p, i == len(parts) - 1))
    first = s.recv()
    kind = first.WhichOneof("response")
    out["first"] = kind
    if kind == "immediate_response":
        out["status"] = first.immediate_response.status.code
        out["body"] = first.immediate_response.body.decode(errors="replace")
        s.close()
        return out
    out["dest"], out["meta"], out["clear_route_cache"] = dest_of(first)
    echoed, n, sizes, eos = b"", 0, [], False
    while not eos:
        r = s.recv()
        assert r.WhichOneof("response") == "request_body", r
        sb = r.request_body.response.body_mutation.streamed_response
        echoed += sb.body
        sizes.append(len(sb.body))
        eos = sb.end_of_stream
        n += 1
    out["body_same"] = echoed == payload
    out["body_chunks"] = n
    out["max_chunk"] = max(sizes)
    if respond:
        pick = out["dest"].split(",")[0]
        r = hdrs([(":status", "200"), ("content-type", "text/event-stream")], eos=None, served=pick)
        s.send(r)
        seq = [s.recv().WhichOneof("response")]
        rb = [b"data: {\"x\":1}\n\n", b"data: [DONE]\n\n"]
        got = b""
        for i, c in enumerate(rb):
            s.send(body(c, False, response=True))
            r = s.recv()
            seq.append(r.WhichOneof("response"))
            got += r.response_body.response.body_mutation.streamed_response.body
        tr = ep.ProcessingRequest()
        tr.response_trailers.trailers.headers.add(key="grpc-status", raw_value=b"0")
        s.send(tr)
        seq.append(s.recv().WhichOneof("response"))
        out["response_seq"] = seq
        out["response_body_same"] = got == b"".join(rb)
    s.close()
    try:
        s.recv()
        out["end"] = "extra message"
    except StopIteration:
        out["end"] = "ok"
    except grpc.RpcError as e:
        out["end"] = str(e.code())
    return out


async def open_together(addr, payload, path, n, hold_s=60):
    """n Process streams on one HTTP/2 connection, all open at once (grpc.aio, one thread):
    each sends headers and body and reads its pick and the body echo; none answers the
    response path until all n have their pick, so the server holds n streams (and n bookings)
    at the same time; then each sends response headers, two body chunks and trailers and
    checks the echoes and the call's end."""
    import asyncio
    picked, all_picked = [0], asyncio.Event()

    async def one(call_of, i):
        out = {}
        t_start = time.time()
        call = call_of(timeout=hold_s + 60)
        await call.write(hdrs([(":method", "POST"), (":path", path),
                               ("content-type", "application/json")]))
        await call.write(body(payload, True))
        first = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("response") != "request_headers":
            picked[0] += n  # nobody waits for a stream that got no pick
            all_picked.set()
            return {"first": "EOF" if first is grpc.aio.EOF else first.WhichOneof("response")}
        out["dest"], out["meta"], _ = dest_of(first)
        out["pick_s"] = time.time() - t_start
        echoed, eos = b"", False
        while not eos:
            r = await call.read()
            sb = r.request_body.response.body_mutation.streamed_response
            echoed += sb.body
            eos = sb.end_of_stream
        out["body_same"] = echoed == payload
        picked[0] += 1
        if picked[0] >= n:
            all_picked.set()
        await asyncio.wait_for(all_picked.wait(), hold_s)
        pick = out["dest"].split(",")[0]
        await call.write(hdrs([(":status", "200"), ("content-type", "text/event-stream")],
                              eos=None, served=pick))
        seq = [(await call.read()).WhichOneof("response")]
        rb, got = [b"data: {\"x\":1}\n\n", b"data: [DONE]\n\n"], b""
        for c in rb:
            await call.write(body(c, False, response=True))
            r = await call.read()
            seq.append(r.WhichOneof("response"))
            got += r.response_body.response.body_mutation.streamed_response.body
        tr = ep.ProcessingRequest()
        tr.response_trailers.trailers.headers.add(key="grpc-status", raw_value=b"0")
        await call.write(tr)
        seq.append((await call.read()).WhichOneof("response"))
        await call.done_writing()
        out["end"] = "ok" if await call.read() is grpc.aio.EOF else "extra message"
        out["code"] = str(await call.code())
        out["ok"] = (out["dest"] == out["meta"] and out["body_same"] and got == b"".join(rb)
                     and seq == ["response_headers", "response_body", "response_body",
                                 "response_trailers"] and out["end"] == "ok"
                     and out["code"] == "StatusCode.OK")
        return out

    async with grpc.aio.insecure_channel(addr) as ach:
        call_of = ach.stream_stream(PATH, request_serializer=ep.ProcessingRequest.SerializeToString,
                                    response_deserializer=ep.ProcessingResponse.FromString)
        t0 = time.time()
        rs = await asyncio.gather(*[one(call_of, i) for i in range(n)], return_exceptions=True)
    ok = [r for r in rs if isinstance(r, dict) and r.get("ok")]
    bad = [r if isinstance(r, dict) else {"err": repr(r)} for r in rs
           if not (isinstance(r, dict) and r.get("ok"))]
    res = {"n": n, "ok": len(ok), "open_at_once": picked[0] == n,
           "seconds": round(time.time() - t0, 3),
           "dests": sorted({r["dest"] for r in ok}),
           "pick_s_min": round(min((r["pick_s"] for r in ok), default=0), 3),
           "pick_s_max": round(max((r["pick_s"] for r in ok), default=0), 3)}
    if bad:
        res["first_bad"] = bad[0]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("addr")
    ap.add_argument("scenario")
    ap.add_argument("--model", default="m1")
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument("--size", type=int, default=0, help="pad the prompt to this many bytes")
    ap.add_argument("--subset-list", default=None)
    ap.add_argument("--subset-str", default=None)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--service", default="")
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--tls-ca", default=None, help="TLS: trust this PEM certificate")
    ap.add_argument("--tls-name", default=None, help="TLS: the name to verify")
    ap.add_argument("--tls-cert", default=None, help="TLS: our client certificate (PEM)")
    ap.add_argument("--tls-key", default=None, help="TLS: its private key (PEM)")
    a = ap.parse_args()
    if a.tls_ca:
        cc = dict(certificate_chain=open(a.tls_cert, "rb").read(),
                  private_key=open(a.tls_key, "rb").read()) if a.tls_cert else {}
        creds = grpc.ssl_channel_credentials(root_certificates=open(a.tls_ca, "rb").read(), **cc)
        opts = [("grpc.ssl_target_name_override", a.tls_name)] if a.tls_name else []
        ch = grpc.secure_channel(a.addr, creds, options=opts)
    else:
        ch = grpc.insecure_channel(a.addr)
    subset = a.subset_list.split(",") if a.subset_list is not None else a.subset_str
    if a.subset_list == "":
        subset = []
    prompt = "The quick brown fox"
    if a.size > len(prompt):
        prompt += "x" * (a.size - len(prompt) - 60)
    if a.chat:
        payload = json.dumps({"model": a.model, "messages": [{"role": "user", "content": prompt}],
                              "max_tokens": 4}).encode()
        path = "/v1/chat/completions"
    else:
        payload = json.dumps({"model": a.model, "prompt": prompt, "max_tokens": 4}).encode()
        path = "/v1/completions"
    if a.no_model:
        payload = json.dumps({"prompt": prompt}).encode()
    res = {}
    if a.scenario == "get":
        s = Stream(ch)
        s.send(hdrs([(":method", "GET"), (":path", "/v1/models")], eos=True, subset=subset))
        r = s.recv()
        res["first"] = r.WhichOneof("response")
        if res["first"] == "request_headers":
            res["dest"], res["meta"], res["clear_route_cache"] = dest_of(r)
        else:
            res["status"] = r.immediate_response.status.code
        s.close()
    elif a.scenario == "post":
        res = post_flow(ch, payload, a.chunks, subset, path)
    elif a.scenario == "post-close":
        # the gateway half-closes right after the body, while the pick is still out: every
        # answer must still come, then the call ends OK
        s = Stream(ch)
        s.send(hdrs([(":method", "POST"), (":path", path)]))
        s.send(body(payload, True))
        s.close()
        kinds = []
        try:
            while True:
                kinds.append(s.recv().WhichOneof("response"))
            res["end"] = "?"
        except StopIteration:
            res["end"] = "ok"
        except grpc.RpcError as e:
            res["end"] = str(e.code())
        res["kinds"] = kinds
    elif a.scenario == "garbage":
        res = post_flow(ch, b"{not json", 1, None, path)
    elif a.scenario in ("cancel", "cancel-after-body"):
        # cancel: headers and half a body, then the client goes away (Envoy resets the stream);
        # cancel-after-body: the whole request, then it goes while its pick is out (or held)
        whole = a.scenario == "cancel-after-body"
        q = queue.Queue()
        call = ch.stream_stream(PATH, request_serializer=ep.ProcessingRequest.SerializeToString,
                                response_deserializer=ep.ProcessingResponse.FromString)
        fut = call(iter(q.get, None), timeout=20)
        q.put(hdrs([(":method", "POST"), (":path", path)]))
        q.put(body(payload, True) if whole else body(payload[:len(payload) // 2], False))
        time.sleep(0.5 if whole else 0.3)
        fut.cancel()
        res["cancelled"] = True
    elif a.scenario == "hang":
        # n streams with headers and half a body, then wait to be killed: the connection then
        # drops with its streams open (no RST_STREAM, as when a gateway pod dies)
        q = queue.Queue()
        call = ch.stream_stream(PATH, request_serializer=ep.ProcessingRequest.SerializeToString,
                                response_deserializer=ep.ProcessingResponse.FromString)
        futs = []
        for i in range(a.n):
            qi = queue.Queue()
            futs.append(call(iter(qi.get, None), timeout=600))
            qi.put(hdrs([(":method", "POST"), (":path", path)]))
            qi.put(body(payload[:len(payload) // 2], False))
        print(json.dumps({"hanging": a.n}), flush=True)
        time.sleep(600)
    elif a.scenario == "hold":
        # a picked (booked) stream held open: the pick made, the response never comes
        s = Stream(ch, timeout=600)
        s.send(hdrs([(":method", "POST"), (":path", path)]))
        s.send(body(payload, True))
        r = s.recv()
        print(json.dumps({"first": r.WhichOneof("response")}), flush=True)
        time.sleep(600)
    elif a.scenario == "concurrent":
        results, lock = [], threading.Lock()

        def one(i):
            try:
                r = post_flow(ch, payload, 1 + i % 3, None, path, respond=(i % 2 == 0))
                ok = r.get("dest") and r["dest"] == r["meta"] and r["body_same"] and r["end"] == "ok"
            except Exception as e:  # noqa: BLE001
                ok, r = False, {"err": repr(e)}
            with lock:
                results.append((ok, r))
        ts = [threading.Thread(target=one, args=(i,)) for i in range(a.n)]
        t0 = time.time()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        res["ok"] = sum(1 for ok, _ in results if ok)
        res["n"] = a.n
        res["seconds"] = round(time.time() - t0, 3)
        bad = [r for ok, r in results if not ok]
        if bad:
            res["first_bad"] = bad[0]
    elif a.scenario == "open-together":
        import asyncio
        res = asyncio.run(open_together(a.addr, payload, path, a.n))
    elif a.scenario == "shed":
        # n streams whose bodies all end at once (threads released together): with
        # --max-pending-picks 1 and a router that never answers, one pick is out and the rest
        # must be shed with 429 at once
        results, lock, go = [], threading.Lock(), threading.Barrier(a.n)

        def one_shed(i):
            go.wait()
            try:
                r = post_flow(ch, payload, 1, None, path, respond=True)
            except Exception as e:  # noqa: BLE001
                r = {"err": repr(e)}
            with lock:
                results.append(r)
        ts = [threading.Thread(target=one_shed, args=(i,)) for i in range(a.n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        res["n429"] = sum(1 for r in results if r.get("status") == 429)
        res["picked"] = sum(1 for r in results if r.get("dest") and r.get("end") == "ok")
        res["other"] = [r for r in results if r.get("status") != 429 and not r.get("dest")][:2]
        res["body429"] = next((r["body"] for r in results if r.get("status") == 429), None)
    elif a.scenario == "seq":
        # n streams one after the other (figures: kvr-epp's kvr_epp_pick_seconds)
        t0, ok = time.time(), 0
        for i in range(a.n):
            r = post_flow(ch, payload, 1, None, path, respond=True)
            ok += bool(r.get("body_same")) and r.get("end") == "ok"
        res = {"ok": ok, "n": a.n, "seconds": round(time.time() - t0, 3)}
    elif a.scenario == "health":
        m = ch.unary_unary("/grpc.health.v1.Health/Check",
                           request_serializer=hp.HealthCheckRequest.SerializeToString,
                           response_deserializer=hp.HealthCheckResponse.FromString)
        try:
            r = m(hp.HealthCheckRequest(service=a.service), timeout=5)
            res["status"] = hp.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            res["code"] = str(e.code())
    elif a.scenario == "unknown-method":
        m = ch.unary_unary("/no.Such/Method")
        try:
            m(b"", timeout=5)
        except grpc.RpcError as e:
            res["code"] = str(e.code())
    print(json.dumps(res, default=str))


if __name__ == "__main__":
    main()
