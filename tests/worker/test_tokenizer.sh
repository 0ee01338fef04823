#!/usr/bin/env bash
# worker_tokenizer: kvr-worker --tokenizer DIR stands in for a real model (issue 12 item 5):
# prompts are encoded with the model's tokenizer (special tokens as add_special_tokens says),
# chats are rendered with the model's own chat template (tools, chat_template_kwargs,
# add_generation_prompt, content parts) and encoded, and the output tokens come back as the
# model's text, streamed without half characters. Real files: qwen3 and llama3_1 from
# scripts/fetch-models; the reference ids come from kvr-tokenize (parity-tested against the
# Rust library in tokenizer_parity).
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init worker_tokenizer
models="$("$KVR_SRC/scripts/fetch-models" | tail -1)/models"
kvr_start_nats
TOK="$KVR_BIN/kvr-tokenize"

start_worker() { # name dir -> sets W
    local port
    port=$(kvr_free_port)
    kvr_spawn "$1" "$KVR_BIN/kvr-worker" --listen "127.0.0.1:$port" --nats "$NATS_URL" \
        --namespace t --model "$1" --id "$3" --block-size 16 --seed 5 --speedup 50 --tokenizer "$2"
    kvr_wait_http "http://127.0.0.1:$port/health" 20
    W="http://127.0.0.1:$port"
}
post() { curl -s --max-time 20 -H 'content-type: application/json' "$W$1" -d "$2"; }

# --- llama3_1: a prompt gets <|begin_of_text|> unless add_special_tokens is false
start_worker llama "$models/llama3_1" 1
text='Hello world, naïve café 😀 12345'
withsp=$("$TOK" "$models/llama3_1" --text "$text") # kvr-tokenize adds special tokens
kvr_assert_eq "$(jq -c '.[0]' <<<"$withsp")" 128000 "reference starts with <|begin_of_text|>"
plain=$(jq -c '.[1:]' <<<"$withsp")
kvr_assert_eq "$(post /tokenize "$(jq -cn --arg p "$text" '{prompt:$p, add_special_tokens:false}')" | jq -c .tokens)" "$plain" "llama prompt, no special tokens"
kvr_assert_eq "$(post /tokenize "$(jq -cn --arg p "$text" '{prompt:$p}')" | jq -c .tokens)" "$withsp" "llama prompt with <|begin_of_text|>"
out=$(post /v1/completions "$(jq -cn --arg p "$text" '{prompt:$p, max_tokens:4}')")
kvr_assert_eq "$(jq -r .usage.prompt_tokens <<<"$out")" "$(( $(jq length <<<"$plain") + 1 ))" "llama completion prompt tokens"

# --- qwen3: chats through Qwen3's own template
start_worker qwen "$models/qwen3" 2
want=$("$TOK" "$models/qwen3" --text $'<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n')
kvr_assert_eq "$(post /tokenize '{"messages":[{"role":"user","content":"hi there"}]}' | jq -c .tokens)" "$want" "qwen3 chat = its template, tokenized"
want=$("$TOK" "$models/qwen3" --text $'<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n')
kvr_assert_eq "$(post /tokenize '{"messages":[{"role":"user","content":"hi there"}],"chat_template_kwargs":{"enable_thinking":false}}' | jq -c .tokens)" "$want" "qwen3 chat, enable_thinking false"
want=$("$TOK" "$models/qwen3" --text $'<|im_start|>user\nhi there<|im_end|>\n')
kvr_assert_eq "$(post /tokenize '{"messages":[{"role":"user","content":"hi there"}],"add_generation_prompt":false}' | jq -c .tokens)" "$want" "qwen3 chat, no generation prompt"
# content parts reach the template as vLLM hands them over: Qwen3's template never loops over
# a message's content (vLLM's "string" content format), so the text parts are joined with "\n"
want=$(post /tokenize '{"messages":[{"role":"user","content":"hi\n there"}]}' | jq -c .tokens)
kvr_assert_eq "$(post /tokenize '{"messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:,"}},{"type":"text","text":" there"}]}]}' | jq -c .tokens)" "$want" "qwen3 content parts: joined as vLLM joins them"

# --- output decoded with the vocabulary, streamed a token at a time, same text either way
body='{"messages":[{"role":"user","content":"hi there"}],"max_tokens":24}'
out=$(post /v1/chat/completions "$body")
ids=$(jq -c '.choices[0].token_ids' <<<"$out")
kvr_assert_eq "$(jq length <<<"$ids")" 24 "completion tokens"
text=$(jq -r '.choices[0].message.content' <<<"$out")
[ -n "$text" ] || kvr_fail "empty decoded text"
curl -s --max-time 20 -H 'content-type: application/json' "$W/v1/chat/completions" \
    -d "$(jq -c '. + {stream:true}' <<<"$body")" >"$KVR_TMP/sse.txt"
streamed=$(grep '^data: {' "$KVR_TMP/sse.txt" | sed 's/^data: //' | jq -sr '[.[] | .choices[]?.delta.content // empty] | join("")')
kvr_assert_eq "$streamed" "$text" "streamed text = whole text"
kvr_assert_eq "$(grep '^data: {' "$KVR_TMP/sse.txt" | sed 's/^data: //' | jq -sc '[.[] | .choices[]?.token_ids[]]')" "$ids" "streamed ids = whole ids"

# --- gemma3: its template loops over content parts (vLLM's "openai" format): the list
# reaches it, and it prints each text part trimmed
start_worker gemma "$models/gemma3" 3
want=$("$TOK" "$models/gemma3" --text $'<start_of_turn>user\nhithere<end_of_turn>\n<start_of_turn>model\n')
kvr_assert_eq "$(post /tokenize '{"messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"text","text":" there"}]}]}' | jq -c .tokens)" "$want" "gemma3 content parts through its template"

# --- a directory that is not a model: the worker refuses to start, naming it
port=$(kvr_free_port)
if timeout 10 "$KVR_BIN/kvr-worker" --listen "127.0.0.1:$port" --nats "$NATS_URL" --tokenizer "$KVR_TMP" 2>"$KVR_TMP/err.txt"; then
    kvr_fail "worker started with a bad --tokenizer"
fi
grep -q -- "--tokenizer" "$KVR_TMP/err.txt" || kvr_fail "no clear error: $(cat "$KVR_TMP/err.txt")"
kvr_alive qwen || kvr_fail "worker died"
kvr_pass
