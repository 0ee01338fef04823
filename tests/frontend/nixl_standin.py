#!/usr/bin/env python3
"""nixl_standin.py PREFILL_PORT DECODE_PORT LOGFILE: two small HTTP servers that STAND IN FOR a
vLLM prefill instance and a vLLM decode instance run with the NixlConnector (no GPU engine
here), for frontend_disagg_standin. Each POST is appended to LOGFILE as one JSON line
{"side": "prefill"|"decode", "path", "x_request_id", "body"} (body parsed).
  prefill  answers a non-streamed completion carrying, at top level, the kv_transfer_params
           vLLM's scheduler returns (request_finished): {do_remote_prefill: true,
           do_remote_decode: false, remote_block_ids, remote_engine_id, remote_request_id,
           remote_host, remote_port, tp_size}. A prompt or message containing "PREFILL-FAIL"
           gets vLLM's 500 error object instead.
  decode   streams a completion (SSE) or a chat completion (SSE or JSON), as any request."""
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = None
lock = threading.Lock()

KVP = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [3, 1, 4],
       "remote_engine_id": "standin-engine", "remote_request_id": None,
       "remote_host": "10.1.2.3", "remote_port": 5600, "tp_size": 1}


def handler(side):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def send(self, status, ctype, text):
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.send(200, "application/json", '{"status":"ok"}')

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
            body = json.loads(raw)
            rid = self.headers.get("X-Request-Id")
            with lock, open(LOG, "a") as f:
                f.write(json.dumps({"side": side, "path": self.path, "x_request_id": rid,
                                    "body": body}) + "\n")
            chat = self.path == "/v1/chat/completions"
            if side == "prefill":
                if "PREFILL-FAIL" in raw:
                    return self.send(500, "application/json",
                                     '{"object":"error","message":"boom","type":"InternalServerError","param":null,"code":500}')
                kvp = dict(KVP, remote_request_id="cmpl-%s-0" % rid)
                ans = {"id": "cmpl-p", "object": "chat.completion" if chat else "text_completion",
                       "created": 1, "model": body.get("model"),
                       "choices": [{"index": 0, "finish_reason": "length",
                                    **({"message": {"role": "assistant", "content": "x"}} if chat
                                       else {"text": "x"})}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                       "kv_transfer_params": kvp}
                return self.send(200, "application/json", json.dumps(ans))
            if chat and not body.get("stream"):
                return self.send(200, "application/json", json.dumps(
                    {"id": "chatcmpl-d", "object": "chat.completion", "created": 1, "model": "m",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}))
            if chat:
                return self.send(200, "text/event-stream",
                                 'data: {"id":"chatcmpl-d","object":"chat.completion.chunk","created":1,"model":"m",'
                                 '"choices":[{"index":0,"delta":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}\n\n'
                                 'data: [DONE]\n\n')
            n = len(body.get("prompt") or []) if isinstance(body.get("prompt"), list) else 3
            return self.send(200, "text/event-stream",
                             'data: {"id":"cmpl-d","object":"text_completion","created":1,"model":"m",'
                             '"choices":[{"index":0,"text":"ok","token_ids":[5],"logprobs":null,"finish_reason":"length"}]}\n\n'
                             'data: {"id":"cmpl-d","object":"text_completion","created":1,"model":"m",'
                             '"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":1,"total_tokens":%d}}\n\n'
                             'data: [DONE]\n\n' % (n, n + 1))
    return H


if __name__ == "__main__":
    LOG = sys.argv[3]
    servers = [ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler("prefill")),
               ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), handler("decode"))]
    threading.Thread(target=servers[0].serve_forever, daemon=True).start()
    servers[1].serve_forever()
