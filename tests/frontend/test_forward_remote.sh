#!/bin/bash
# frontend_forward_remote (issue 12 part 4, issue 13 part 5). Real nats-server, kvr-worker (for
# its heartbeats: --advertise-url points them at the stand-in) and kvr-frontend processes; the
# engine is tests/frontend/vllm_standin.py, which STANDS IN FOR vLLM (its /tokenize and OpenAI
# formats; see that file).
#  - --tokenizer-fallback remote: a model whose chat template the interpreter refuses is
#    tokenized by a live worker's vLLM POST /tokenize (messages, tools, chat_template_kwargs,
#    add_generation_prompt, add_special_tokens=false); the ids it returns are what the frontend
#    sends on (--forward tokens: the worker's /v1/completions prompt); counted in
#    kvr_frontend_remote_tokenize_total{result}; a failing /tokenize is a 502 and counted;
#    without the flag the same request is a 501.
#  - --forward tokens with a model's own template: the ids POSTed to the worker for a chat are
#    the ids POST /tokenize's messages form gives (checked against jinja2 + tokenizers in
#    frontend_chat_template), for a small body (parsed on the loop) and a big one (thread pool).
#  - --forward body: the client's body reaches the worker's same endpoint byte for byte, and
#    the worker's answer (SSE or JSON, with reasoning_content, tool_calls, logprobs) reaches the
#    client byte for byte with its Content-Type.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init frontend_forward_remote
kvr_need_bins kvr-worker kvr-frontend
src=$(cd "$(dirname "$0")/../.." && pwd)
cache=$("$src/scripts/fetch-models" | tail -1)
[ -s "$cache/models/qwen3/tokenizer.json" ] || kvr_fail "no qwen3 model files in $cache"
mkdir -p "$KVR_TMP/refused"
cp "$cache/models/qwen3/tokenizer.json" "$KVR_TMP/refused/"
echo '{"chat_template": "{% include \"x.jinja\" %}"}' >"$KVR_TMP/refused/tokenizer_config.json"

kvr_start_nats
ports=()
while [ ${#ports[@]} -lt 7 ]; do
    p=$(kvr_free_port)
    [[ " ${ports[*]} " == *" $p "* ]] || ports+=("$p")
done
S=${ports[0]} W1=${ports[1]} W2=${ports[2]} F1=${ports[3]} F2=${ports[4]} F3=${ports[5]}
: >"$KVR_TMP/requests.jsonl"
kvr_spawn standin python3 "$src/tests/frontend/vllm_standin.py" "$S" "$KVR_TMP"
kvr_wait_http "http://127.0.0.1:$S/health" 10
# heartbeats for two models, both pointing at the stand-in
kvr_spawn w1 "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$W1 --nats "$NATS_URL" --namespace default \
    --model refused --id 1 --block-size 16 --advertise-url "http://127.0.0.1:$S"
kvr_spawn w2 "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$W2 --nats "$NATS_URL" --namespace default \
    --model qwen3 --id 2 --block-size 16 --advertise-url "http://127.0.0.1:$S"
fe() { # fe NAME PORT ID EXTRA...
    local name=$1 port=$2 id=$3
    shift 3
    kvr_spawn "$name" "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$port --nats "$NATS_URL" --id $id \
        --router-mode round-robin "$@"
    kvr_wait_http "http://127.0.0.1:$port/health" 30
}
fe fe1 $F1 1 --tokenizer "refused=$KVR_TMP/refused" --tokenizer-fallback remote \
    --tokenizer "qwen3=$cache/models/qwen3"
fe fe2 $F2 2 --tokenizer "qwen3=$cache/models/qwen3" --forward body
fe fe3 $F3 3 --tokenizer "refused=$KVR_TMP/refused"
# both models live in every frontend's table
for f in $F1 $F2 $F3; do
    for i in $(seq 100); do
        m=$(curl -s "http://127.0.0.1:$f/v1/models")
        [[ $m == *refused* && $m == *qwen3* ]] && break
        sleep 0.1
    done
    [[ $m == *refused* && $m == *qwen3* ]] || kvr_fail "frontend $f does not see both models: $m"
done

python3 - "$F1" "$F2" "$F3" "$KVR_TMP" "$src/tests/frontend/vllm_standin.py" <<'PY' || kvr_fail "remote fallback / forward body"
import http.client, importlib.util, json, sys
F1, F2, F3, tmp, standin_path = sys.argv[1:6]
spec = importlib.util.spec_from_file_location("standin", standin_path)
standin = importlib.util.module_from_spec(spec)
spec.loader.exec_module(standin)
bad = 0
def post(port, path, body_bytes):
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=20)
    c.request("POST", path, body_bytes, {"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, r.getheader("Content-Type"), r.read()
def requests():
    return [json.loads(l) for l in open(tmp + "/requests.jsonl")]
def metric(port, name):
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=5)
    c.request("GET", "/metrics")
    for line in c.getresponse().read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None
def check(cond, what):
    global bad
    if not cond:
        bad += 1
        print("FAIL:", what)

# 1. remote fallback, tokens path
tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 😀"}]
req = {"model": "refused", "messages": msgs, "tools": tools, "chat_template_kwargs": {"enable_thinking": False},
       "max_tokens": 2, "stream": False}
n0 = len(requests())
st, ct, body = post(F1, "/v1/chat/completions", json.dumps(req).encode())
check(st == 200, f"remote fallback chat: {st} {body[:300]}")
new = requests()[n0:]
tok = [r for r in new if r["path"] == "/tokenize"]
comp = [r for r in new if r["path"] == "/v1/completions"]
check(len(tok) == 1 and len(comp) == 1, f"stand-in saw {[r['path'] for r in new]}")
if tok and comp:
    tb = json.loads(tok[0]["body"])
    check(tb.get("messages") == msgs and tb.get("tools") == tools and tb.get("model") == "refused"
          and tb.get("chat_template_kwargs") == {"enable_thinking": False}
          and tb.get("add_special_tokens") is False, f"/tokenize body: {tb}")
    want = [1000 + ord(c) for c in "Be brief.Héllo 😀"] + [7]
    check(json.loads(comp[0]["body"]).get("prompt") == want,
          f"ids sent on != the worker's /tokenize ids: {comp[0]['body'][:300]}")
check(metric(F1, 'kvr_frontend_remote_tokenize_total{result="ok"}') == 1, "ok metric")
# a failing worker /tokenize: 502, counted
st, ct, body = post(F1, "/v1/chat/completions", json.dumps({"model": "refused", "messages": [{"role": "user", "content": "FAIL"}]}).encode())
check(st == 502 and b"tokenize" in body, f"failing /tokenize: {st} {body[:300]}")
check(metric(F1, 'kvr_frontend_remote_tokenize_total{result="error"}') == 1, "error metric")
# without the flag: 501 naming the fix, and no request reached the worker
n0 = len(requests())
st, ct, body = post(F3, "/v1/chat/completions", json.dumps(req).encode())
check(st == 501 and b"--tokenizer-fallback remote" in body, f"no fallback: {st} {body[:300]}")
check(len(requests()) == n0, "no fallback: the worker was asked anyway")

# 1b. the model's own template on the tokens path: the ids sent on are /tokenize's
for n in (1, 400):  # ~100 bytes: parsed on the loop; ~40 KB: on the thread pool
    chat = {"model": "qwen3", "messages": [{"role": "system", "content": "Be brief."}] +
            [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: the quick brown fox 数字 😀"}
             for i in range(n)], "tools": tools, "chat_template_kwargs": {"enable_thinking": False}}
    st, ct, body = post(F1, "/tokenize", json.dumps(chat).encode())
    check(st == 200, f"/tokenize qwen3: {st} {body[:200]}")
    want = json.loads(body)["tokens"] if st == 200 else None
    n0 = len(requests())
    st, ct, body = post(F1, "/v1/chat/completions", json.dumps({**chat, "max_tokens": 2}).encode())
    new = [r for r in requests()[n0:] if r["path"] == "/v1/completions"]
    check(st == 200 and len(new) == 1 and json.loads(new[0]["body"])["prompt"] == want,
          f"chat ids (n={n}) differ from /tokenize's: {st} {body[:200]}")
    check(not [r for r in requests()[n0:] if r["path"] == "/tokenize"], "a template model asked the worker")

# 2. --forward body: unchanged both ways
for stream in (True, False):
    # odd spacing and key order, unknown fields: only a byte-for-byte relay keeps them
    raw = ('{ "model":"qwen3",  "stream": %s, "messages":[{"role":"user","content":"Weather in Paris?"}],'
           '"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}],'
           '"logprobs":true,"top_logprobs":1,"chat_template_kwargs":{"enable_thinking":true},'
           '"vendor_field":{"x":[1,2.50,"\\u00e9"]} }' % ("true" if stream else "false")).encode()
    n0 = len(requests())
    st, ct, body = post(F2, "/v1/chat/completions", raw)
    new = requests()[n0:]
    check([r["path"] for r in new] == ["/v1/chat/completions"], f"forward body paths: {[r['path'] for r in new]}")
    check(new and new[0]["body"].encode() == raw, f"body changed on the way: {new[0]['body'][:200] if new else None}")
    want = standin.CHAT_SSE if stream else standin.CHAT_JSON
    check(st == 200 and body == want.encode(), f"stream={stream}: answer changed: {st} {body[:400]!r}")
    check((ct or "").startswith("text/event-stream" if stream else "application/json"), f"content type {ct}")
# completions go to the worker's /v1/completions, unchanged
raw = b'{"model":"qwen3","prompt":"Hello there","max_tokens":2,"stream":true,"echo":false}'
n0 = len(requests())
st, ct, body = post(F2, "/v1/completions", raw)
new = requests()[n0:]
check(st == 200 and [r["path"] for r in new] == ["/v1/completions"] and new[0]["body"].encode() == raw,
      f"completions forward: {st} {[r['path'] for r in new]}")
check(body.startswith(b'data: {"id":"cmpl-standin"'), f"completions answer rewritten: {body[:200]!r}")
print("forward/remote checks done, failures:", bad)
sys.exit(1 if bad else 0)
PY
kvr_pass
