#!/usr/bin/env python3
"""vllm_standin.py PORT LOGDIR: a small HTTP server that STANDS IN FOR vLLM's OpenAI server in
the frontend tests (no GPU engine here). It speaks vLLM's formats exactly where the frontend
depends on them:
  POST /tokenize   vLLM's TokenizeChatRequest {model, messages, add_generation_prompt,
                   continue_final_message, tools, chat_template_kwargs, add_special_tokens, ...}
                   -> TokenizeResponse {"count", "max_model_len", "tokens", "token_strs"};
                   here the ids are a pure function of the messages (1000 + code point of every
                   character of the contents, then 7), so a test can predict them. A first
                   message whose content is "FAIL" gets vLLM's 500 error object.
  POST /v1/completions, /v1/chat/completions
                   an OpenAI stream (SSE, text/event-stream) or JSON answer carrying fields a
                   rewriting proxy would drop (reasoning_content, tool_calls, logprobs), so
                   --forward body can be checked byte for byte.
Every request body is appended to LOGDIR/requests.jsonl as {"path", "body"} (body as text)."""
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = None
lock = threading.Lock()

CHAT_SSE = (
    'data: {"id":"chatcmpl-standin","object":"chat.completion.chunk","created":1,"model":"m",'
    '"choices":[{"index":0,"delta":{"role":"assistant","reasoning_content":"let me think"},'
    '"logprobs":{"content":[{"token":"x","logprob":-0.25,"bytes":[120],"top_logprobs":[]}]},'
    '"finish_reason":null}]}\n\n'
    'data: {"id":"chatcmpl-standin","object":"chat.completion.chunk","created":1,"model":"m",'
    '"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
    '"function":{"name":"get_weather","arguments":"{\\"city\\": \\"Paris\\"}"}}]},'
    '"logprobs":null,"finish_reason":"tool_calls"}]}\n\n'
    'data: [DONE]\n\n')
CHAT_JSON = ('{"id":"chatcmpl-standin","object":"chat.completion","created":1,"model":"m",'
             '"choices":[{"index":0,"message":{"role":"assistant","content":"hi",'
             '"reasoning_content":"r","tool_calls":[]},"logprobs":null,"finish_reason":"stop"}],'
             '"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4},'
             '"kv_transfer_params":null}')


def completion_sse(body):
    # the shape kvr-worker and vLLM stream for /v1/completions (the tokens path rewrites it)
    return ('data: {"id":"cmpl-standin","object":"text_completion","created":1,"model":"m",'
            '"choices":[{"index":0,"text":"ok","logprobs":null,"finish_reason":null}]}\n\n'
            'data: {"id":"cmpl-standin","object":"text_completion","created":1,"model":"m",'
            '"choices":[{"index":0,"text":"!","logprobs":null,"finish_reason":"length"}]}\n\n'
            'data: {"id":"cmpl-standin","object":"text_completion","created":1,"model":"m",'
            '"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":2,"total_tokens":%d}}\n\n'
            'data: [DONE]\n\n' % (len(body.get("prompt") or []), len(body.get("prompt") or []) + 2))


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
        with lock, open(LOG, "a") as f:
            f.write(json.dumps({"path": self.path, "body": raw}) + "\n")
        body = json.loads(raw)
        if self.path == "/tokenize":
            msgs = body.get("messages") or []
            if msgs and msgs[0].get("content") == "FAIL":
                return self.send(500, "application/json",
                                 '{"object":"error","message":"boom","type":"InternalServerError","param":null,"code":500}')
            text = "".join(m.get("content") or "" for m in msgs if isinstance(m.get("content"), str))
            toks = [1000 + ord(c) for c in text] + [7]
            return self.send(200, "application/json", json.dumps(
                {"count": len(toks), "max_model_len": 32768, "tokens": toks, "token_strs": None}))
        if self.path == "/v1/chat/completions":
            if body.get("stream"):
                return self.send(200, "text/event-stream", CHAT_SSE)
            return self.send(200, "application/json", CHAT_JSON)
        if self.path == "/v1/completions":
            return self.send(200, "text/event-stream", completion_sse(body))
        self.send(404, "application/json", '{"object":"error","message":"not found","code":404}')


if __name__ == "__main__":
    LOG = sys.argv[2] + "/requests.jsonl"
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
