#!/bin/bash
# frontend_tokenize (issue 12): a real kvr-frontend (with a real nats-server) loaded with the
# real Qwen3 and Llama-3.1 tokenizers (--tokenizer NAME=DIR, twice) answers POST /tokenize
# exactly as the Rust `tokenizers` library encodes (add_special_tokens true and false), and
# POST /detokenize as it decodes; a model without --tokenizer keeps the byte tokenizer; the
# messages form renders the model's chat template (checked in detail by frontend_chat_template).
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init frontend_tokenize
[ -x "$KVR_BIN/kvr-frontend" ] || { echo "SKIP: kvr-frontend not built"; exit 77; }
src=$(cd "$(dirname "$0")/../.." && pwd)
cache=$("$src/scripts/fetch-models" | tail -1)
kvr_start_nats
fport=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fport --nats "$NATS_URL" --id 1 \
    --tokenizer "qwen3=$cache/models/qwen3" --tokenizer="llama=$cache/models/llama3_1"
F=http://127.0.0.1:$fport
kvr_wait_http "$F/health" 30
python3 - "$F" "$cache" "$src/tests/tokenizer/reference.js" "$KVR_TMP" <<'PY' || kvr_fail "/tokenize differs from the reference"
import json, subprocess, sys, urllib.request
F, cache, refjs, tmp = sys.argv[1:5]
texts = ["Hello world", "", "<|im_start|>user\nHi there<|im_end|>\n", "数字 1234567 and émoji 😀",
         "  spaces\n\n\ttabs", "I'm ok, we'll see " * 50, "e\u0301 NFC", "<|begin_of_text|>x"]
json.dump(texts, open(tmp + "/c.json", "w"))
def post(path, body):
    req = urllib.request.Request(F + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
bad = 0
for model, fam in (("qwen3", "qwen3"), ("llama", "llama3_1")):
    ref = subprocess.run(["node", refjs, cache + "/node/node_modules", cache + "/models/" + fam,
                          tmp + "/c.json"], check=True, capture_output=True, text=True).stdout
    ref = [json.loads(l) for l in ref.splitlines()]
    for t, r in zip(texts, ref):
        for add, key in ((True, "ids_special"), (False, "ids")):
            st, got = post("/tokenize", {"model": model, "prompt": t, "add_special_tokens": add})
            if st != 200 or got["tokens"] != r[key] or got["count"] != len(r[key]):
                bad += 1
                print(f"{model} {t[:30]!r} add={add}: {st} {got} != {r[key]}")
        st, got = post("/detokenize", {"model": model, "tokens": r["ids_special"]})
        if st != 200 or got["prompt"] != r["decoded"]:
            bad += 1
            print(f"{model} detokenize {t[:30]!r}: {st} {got} != {r['decoded']!r}")
    st, got = post("/tokenize", {"model": model, "prompt": "x"})
    print(model, "max_model_len", got.get("max_model_len"))
st, got = post("/tokenize", {"model": "other", "prompt": "héllo"})
if st != 200 or got["tokens"] != list("héllo".encode()):
    bad += 1
    print("byte tokenizer for an unknown model:", st, got)
st, got = post("/tokenize", {"model": "qwen3", "messages": [{"role": "user", "content": "hi"}]})
if st != 200 or got["count"] < 3:  # rendered by the model's template (frontend_chat_template)
    bad += 1
    print("messages form:", st, got)
st, got = post("/tokenize", {"model": "qwen3", "prompt": 5})
if st != 400:
    bad += 1
    print("bad prompt:", st, got)
print("checked, mismatches:", bad)
sys.exit(1 if bad else 0)
PY
# a directory that is not a model is refused at start-up, naming it
out=$("$KVR_BIN/kvr-frontend" --listen 127.0.0.1:0 --tokenizer "m=$KVR_TMP/nope" 2>&1) && kvr_fail "started with a bad --tokenizer"
grep -q "nope/tokenizer.json" <<<"$out" || kvr_fail "bad --tokenizer error does not name the file: $out"
kvr_pass
