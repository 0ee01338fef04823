#!/bin/bash
# frontend_openai_node: the official OpenAI Node client (npm openai@4, installed into a
# test-local directory) streams a chat completion through kvr-frontend and receives every
# token: the text equals the worker's own deterministic output for the same ChatML prompt.
source "$(dirname "$0")/../lib/testenv.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
kvr_test_init frontend_openai_node
kvr_need_bins kvr-worker kvr-frontend
NODE_DIR=${FE_NODE_DIR:-$KVR_TMP/node}
mkdir -p "$NODE_DIR"
if [ ! -d "$NODE_DIR/node_modules/openai" ]; then
    (cd "$NODE_DIR" && [ -f package.json ] || echo '{"name":"kvr-fe-test","private":true}' >package.json
     cd "$NODE_DIR" && timeout 150 npm install --no-audit --no-fund --silent openai@4 >"$KVR_TMP/npm.log" 2>&1) ||
        { tail -20 "$KVR_TMP/npm.log"; kvr_fail "npm install openai@4 failed"; }
fi
kvr_start_nats
wport=$(kvr_free_port)
fport=$(kvr_free_port)
kvr_spawn worker1 "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$wport --nats "$NATS_URL" \
    --namespace default --model m1 --id 1 --speedup 50
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fport --nats "$NATS_URL" --id 1 \
    --router-mode round-robin --api-key node-key
kvr_wait_http "http://127.0.0.1:$fport/health" 10
kvr_wait_http "http://127.0.0.1:$wport/health" 10
models_ok() { curl -s -H 'Authorization: Bearer node-key' "http://127.0.0.1:$fport/v1/models" | jq -e '.data|length>0' >/dev/null; }
kvr_wait_for 10 models_ok || kvr_fail "worker never seen"

N=40
out=$(cd "$HERE" && NODE_PATH="$NODE_DIR/node_modules" BASE="http://127.0.0.1:$fport/v1" KEY=node-key \
    MODEL=m1 MAX_TOKENS=$N timeout 60 node "$HERE/openai_stream.js") || kvr_fail "node client failed: $out"
kvr_log "node: $out"
prompt=$(printf '<|im_start|>system\nYou are a test.<|im_end|>\n<|im_start|>user\nCount the tokens, please.<|im_end|>\n<|im_start|>assistant\n')
# $(...) dropped the prompt's final newline: add it back.
ids=$(printf '%s\n' "$prompt" | od -An -tu1 -v | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
want=$(curl -s -d "{\"model\":\"m1\",\"prompt\":[$ids],\"max_tokens\":$N}" "http://127.0.0.1:$wport/v1/completions" |
    jq -r '.choices[0].text')
[ -n "$want" ] || kvr_fail "worker gave no text"
kvr_assert_eq "$(echo "$out" | jq -r .text)" "$want" "node client text == worker output"
kvr_assert_eq "$(echo "$out" | jq -r .role)" assistant "role"
kvr_assert_eq "$(echo "$out" | jq -r .usage.completion_tokens)" $N "usage.completion_tokens"
kvr_assert_eq "$(echo "$out" | jq -r .usage.prompt_tokens)" "$(printf '%s\n' "$prompt" | wc -c)" "prompt_tokens"
kvr_pass
