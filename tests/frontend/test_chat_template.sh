#!/bin/bash
# frontend_chat_template (issue 12 part 3): a real kvr-frontend loaded with the real Qwen3,
# Llama-3.1 and Gemma 3 tokenizer directories renders each model's own chat template and
# tokenizes the result (add_special_tokens=false, as vLLM does for chat). POST /tokenize's
# messages form must give, id for id, what jinja2 configured as transformers configures it
# (tests/template/render_ref.py) followed by the Rust `tokenizers` library
# (@anush008/tokenizers, tests/tokenizer/reference.js) give for the same conversation: system
# prompts, multi-turn, content parts, tools and tool calls, enable_thinking on and off,
# add_generation_prompt on and off, continue_final_message (cut as transformers cuts), a
# template that raises (400). Also: a per-request chat_template only with
# --trust-request-chat-template, and a model whose template the interpreter refuses is named at
# start-up and its chat requests get a clear 501 (no --tokenizer-fallback).
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init frontend_chat_template
[ -x "$KVR_BIN/kvr-frontend" ] || { echo "SKIP: kvr-frontend not built"; exit 77; }
src=$(cd "$(dirname "$0")/../.." && pwd)
cache=$("$src/scripts/fetch-models" | tail -1)
for f in qwen3 llama3_1 gemma3; do
    [ -s "$cache/models/$f/tokenizer_config.json" ] || kvr_fail "no $f model files in $cache"
done
# a model whose template uses what the interpreter does not implement ({% include %})
mkdir -p "$KVR_TMP/refused"
cp "$cache/models/qwen3/tokenizer.json" "$KVR_TMP/refused/"
echo '{"chat_template": "{% include \"other.jinja\" %}{{ messages[0].content }}"}' \
    >"$KVR_TMP/refused/tokenizer_config.json"

fa=$(kvr_free_port)
kvr_spawn fea "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fa --id 1 --router-mode round-robin \
    --tokenizer "qwen3=$cache/models/qwen3" --tokenizer "llama=$cache/models/llama3_1" \
    --tokenizer "gemma=$cache/models/gemma3" --tokenizer "refused=$KVR_TMP/refused" \
    --trust-request-chat-template
fb=$(kvr_free_port)
kvr_spawn feb "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fb --id 2 --router-mode round-robin \
    --tokenizer "qwen3=$cache/models/qwen3"
kvr_wait_http "http://127.0.0.1:$fa/health" 30
kvr_wait_http "http://127.0.0.1:$fb/health" 30
grep -q 'chat template refused.*model=refused.*include' "$KVR_TMP/fea.log" ||
    kvr_fail "the refused template is not named at start-up: $(cat "$KVR_TMP/fea.log")"
grep -q 'chat template loaded.*model=qwen3' "$KVR_TMP/fea.log" || kvr_fail "qwen3 template not loaded"

python3 - "$fa" "$fb" "$cache" "$src" "$KVR_TMP" <<'PY' || kvr_fail "chat /tokenize differs from jinja2 + tokenizers"
import glob, json, os, subprocess, sys, urllib.request
fa, fb, cache, src, tmp = sys.argv[1:6]
def post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/tokenize", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
def ref_render(model_dir, conv):
    p = os.path.join(tmp, "conv.json")
    json.dump(conv, open(p, "w"))
    return subprocess.run(["python3", src + "/tests/template/render_ref.py", model_dir, p],
                          check=True, capture_output=True, text=True).stdout
def ref_ids(model_dir, texts):
    p = os.path.join(tmp, "texts.json")
    json.dump(texts, open(p, "w"))
    out = subprocess.run(["node", src + "/tests/tokenizer/reference.js", cache + "/node/node_modules",
                          model_dir, p], check=True, capture_output=True, text=True).stdout
    return [json.loads(l)["ids"] for l in out.splitlines()]
def cont_cut(rendered, conv):
    # transformers' apply_chat_template(continue_final_message=True)
    fm = conv["messages"][-1]["content"]
    loc = rendered.rindex(fm.strip())
    if rendered[loc:loc + len(fm.lstrip())] == fm:
        return rendered[:loc + len(fm.lstrip())]
    return rendered[:loc + len(fm.strip())]
convs = {os.path.basename(c)[:-5]: json.load(open(c)) for c in sorted(glob.glob(src + "/tests/template/convs/*.json"))}
# continue_final_message: an assistant turn to continue (with trailing space: the cut keeps it
# only where the template does)
convs["continue"] = {"messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Count to five."},
                                  {"role": "assistant", "content": "One, two, three, "}],
                     "add_generation_prompt": False, "continue_final_message": True}
convs["continue_ws"] = {"messages": [{"role": "user", "content": "Say yes."},
                                     {"role": "assistant", "content": "\n  Yes,\tand "}],
                        "add_generation_prompt": False, "continue_final_message": True}
bad = runs = 0
for model, fam in (("qwen3", "qwen3"), ("llama", "llama3_1"), ("gemma", "gemma3")):
    mdir = cache + "/models/" + fam
    names, texts = [], []
    for name, conv in convs.items():
        t = ref_render(mdir, {k: v for k, v in conv.items() if k != "continue_final_message"})
        if conv.get("continue_final_message") and t != "ERROR\n":
            t = cont_cut(t, conv)
        names.append(name)
        texts.append(t)
    ids = ref_ids(mdir, [t if t != "ERROR\n" else "" for t in texts])
    for name, t, want in zip(names, texts, ids):
        conv = convs[name]
        body = {"model": model, "messages": conv["messages"],
                "add_generation_prompt": bool(conv.get("add_generation_prompt"))}
        for k in ("tools", "chat_template_kwargs", "continue_final_message"):
            if k in conv:
                body[k] = conv[k]
        st, got = post(fa, body)
        runs += 1
        if t == "ERROR\n":
            if st != 400:
                bad += 1
                print(f"{model}/{name}: jinja2 raises, frontend answered {st} {str(got)[:200]}")
            continue
        if st != 200 or got.get("tokens") != want or got.get("count") != len(want):
            bad += 1
            print(f"{model}/{name}: {st} {str(got)[:300]}\n   want {want[:40]}...")
    # enable_thinking must change something for qwen3 (the test would not see a dropped kwarg)
    if model == "qwen3":
        on, off = post(fa, {"model": model, **convs["think_on"]}), post(fa, {"model": model, **convs["think_off"]})
        if on[1]["tokens"] == off[1]["tokens"]:
            bad += 1
            print("qwen3: enable_thinking on and off give the same ids")
# a per-request template: only where trusted
msgs = [{"role": "user", "content": "hi there"}]
st, got = post(fa, {"model": "qwen3", "messages": msgs, "chat_template": "<<{{ messages[0].content }}>>"})
want = ref_ids(cache + "/models/qwen3", ["<<hi there>>"])[0]
if st != 200 or got["tokens"] != want:
    bad += 1
    print("per-request template (trusted):", st, got, want)
st, got = post(fb, {"model": "qwen3", "messages": msgs, "chat_template": "{{ 1 }}"})
if st != 400 or "trust-request-chat-template" not in got.get("message", ""):
    bad += 1
    print("per-request template (untrusted):", st, got)
# both continue_final_message and add_generation_prompt: refused like vLLM
st, got = post(fa, {"model": "qwen3", "messages": msgs, "continue_final_message": True, "add_generation_prompt": True})
if st != 400:
    bad += 1
    print("continue + add_generation_prompt:", st, got)
# the refused template: a clear 501 naming what to do
st, got = post(fa, {"model": "refused", "messages": msgs})
if st != 501 or "refused" not in got.get("message", ""):
    bad += 1
    print("refused template:", st, got)
# its prompts still tokenize
st, got = post(fa, {"model": "refused", "prompt": "hi"})
if st != 200:
    bad += 1
    print("refused template, prompt form:", st, got)
print(f"chat /tokenize: {runs} conversations checked, {bad} mismatches")
sys.exit(1 if bad or runs < 36 else 0)
PY
kvr_pass
