#!/usr/bin/env bash
# worker_api: OpenAI completions and chat, streaming and not, against a real kvr-worker with a
# real nats-server: exact generated tokens, usage (cached_tokens on a repeated prompt), SSE
# framing, error answers, metrics.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init worker_api
kvr_start_nats
PROBE="$KVR_BIN/kvr-worker-probe"
port=$(kvr_free_port)
W="http://127.0.0.1:$port"
kvr_spawn worker "$KVR_BIN/kvr-worker" --listen "127.0.0.1:$port" --nats "$NATS_URL" \
    --namespace t --model sim --id 7 --block-size 16 --seed 5 --speedup 20
kvr_wait_http "$W/health" 10

post() { curl -s --max-time 20 -H 'content-type: application/json' "$W$1" -d "$2"; }
# SSE body -> the JSON events (one per line), checking the framing on the way
# (bodies go through a file: $(...) would strip the trailing blank line we check)
stream() {
    curl -s --max-time 20 -H 'content-type: application/json' "$W$1" -d "$2" >"$KVR_TMP/sse.txt"
    tail -c 14 "$KVR_TMP/sse.txt" | cmp -s - <(printf 'data: [DONE]\n\n') || kvr_fail "stream does not end with data: [DONE]"
    [ -z "$(grep -v '^$' "$KVR_TMP/sse.txt" | grep -v '^data: ')" ] || kvr_fail "a non-blank line without data: in the stream"
    grep -v '^$' "$KVR_TMP/sse.txt" | grep -v '^data: \[DONE\]$' | sed 's/^data: //'
}
bytes_text() { jq -r 'map([.] | implode) | join("")' <<<"$1"; }

prompt="The quick brown fox jumps over the lazy dog, again and again and again!!"
n_prompt=${#prompt}
kvr_assert_eq "$n_prompt" 72 "prompt length"
want=$("$PROBE" gen --seed 5 --text "$prompt" --n 12)

# --- non-streaming completion
out=$(post /v1/completions "{\"model\":\"sim\",\"prompt\":\"$prompt\",\"max_tokens\":12}")
kvr_assert_eq "$(jq -c '.choices[0].token_ids' <<<"$out")" "$want" "completion token_ids"
kvr_assert_eq "$(jq -r '.choices[0].text' <<<"$out")" "$(bytes_text "$want")" "completion text"
kvr_assert_eq "$(jq -r '.choices[0].finish_reason' <<<"$out")" length "finish_reason"
kvr_assert_eq "$(jq -r '.object' <<<"$out")" text_completion "object"
kvr_assert_eq "$(jq -c '[.usage.prompt_tokens,.usage.completion_tokens,.usage.prompt_tokens_details.cached_tokens]' <<<"$out")" "[72,12,0]" "usage (cold)"

# --- the same prompt again: every full block but the last token's is cached (71 -> 4 blocks)
out=$(post /v1/completions "{\"prompt\":\"$prompt\",\"max_tokens\":12}")
kvr_assert_eq "$(jq -r '.usage.prompt_tokens_details.cached_tokens' <<<"$out")" 64 "cached_tokens (warm)"
kvr_assert_eq "$(jq -c '.choices[0].token_ids' <<<"$out")" "$want" "deterministic output"

# --- streaming completion with usage
ev=$(stream /v1/completions "{\"prompt\":\"$prompt\",\"max_tokens\":12,\"stream\":true,\"stream_options\":{\"include_usage\":true}}") || exit 1
kvr_assert_eq "$(jq -sc '[.[] | .choices[]?.token_ids[]]' <<<"$ev")" "$want" "streamed token_ids"
kvr_assert_eq "$(jq -sr '[.[] | .choices[]?.text] | join("")' <<<"$ev")" "$(bytes_text "$want")" "streamed text"
kvr_assert_eq "$(jq -sr '[.[] | select(.choices | length > 0)] | last | .choices[0].finish_reason' <<<"$ev")" length "last chunk finish_reason"
kvr_assert_eq "$(jq -sr '[.[] | select(.choices | length > 0)] | .[:-1] | map(.choices[0].finish_reason) | unique | join(",")' <<<"$ev")" "" "earlier chunks have null finish_reason"
kvr_assert_eq "$(jq -sc 'last | [.choices, .usage.prompt_tokens, .usage.completion_tokens, .usage.prompt_tokens_details.cached_tokens]' <<<"$ev")" "[[],72,12,64]" "usage chunk"
# without include_usage: no usage chunk
ev=$(stream /v1/completions "{\"prompt\":\"$prompt\",\"max_tokens\":3,\"stream\":true}") || exit 1
kvr_assert_eq "$(jq -s '[.[] | select(.usage)] | length' <<<"$ev")" 0 "no usage chunk unless asked"

# --- token-id prompt with non-text ids (>= 256): text carries nothing for them
ids=$(jq -cn '[range(0;40) | . + 300]')
out=$(post /v1/completions "{\"prompt\":$ids,\"max_tokens\":5,\"ignore_eos\":true}")
kvr_assert_eq "$(jq -c '[.usage.prompt_tokens,.usage.completion_tokens,.usage.prompt_tokens_details.cached_tokens]' <<<"$out")" "[40,5,0]" "token-id prompt usage"
out=$(post /v1/completions "{\"prompt\":$ids,\"max_tokens\":5}")
kvr_assert_eq "$(jq -r '.usage.prompt_tokens_details.cached_tokens' <<<"$out")" 32 "token-id prompt cached"

# --- chat, non-streaming and streaming (ChatML -> byte tokens)
want_chat=$("$PROBE" gen --seed 5 --chat-user "Hello there, worker" --n 9)
chat='{"model":"sim","messages":[{"role":"user","content":"Hello there, worker"}],"max_tokens":9'
out=$(post /v1/chat/completions "$chat}")
kvr_assert_eq "$(jq -r '.object' <<<"$out")" chat.completion "chat object"
kvr_assert_eq "$(jq -r '.choices[0].message.role' <<<"$out")" assistant "chat role"
kvr_assert_eq "$(jq -r '.choices[0].message.content' <<<"$out")" "$(bytes_text "$want_chat")" "chat content"
kvr_assert_eq "$(jq -c '.choices[0].token_ids' <<<"$out")" "$want_chat" "chat token_ids"
# "<|im_start|>user\nHello there, worker<|im_end|>\n<|im_start|>assistant\n" = 69 bytes
kvr_assert_eq "$(jq -r '.usage.prompt_tokens' <<<"$out")" 69 "chat prompt tokens"
ev=$(stream /v1/chat/completions "$chat,\"stream\":true,\"stream_options\":{\"include_usage\":true}}") || exit 1
kvr_assert_eq "$(jq -sr '[.[] | .choices[]?.delta.content] | join("")' <<<"$ev")" "$(bytes_text "$want_chat")" "chat streamed content"
kvr_assert_eq "$(jq -sr 'first | .choices[0].delta.role' <<<"$ev")" assistant "chat first delta role"
kvr_assert_eq "$(jq -sr 'first | .object' <<<"$ev")" chat.completion.chunk "chat chunk object"
kvr_assert_eq "$(jq -sr 'last | .usage.prompt_tokens_details.cached_tokens' <<<"$ev")" 64 "chat cached tokens"

# --- errors: OpenAI error JSON, nothing queued
code() { curl -s -o "$KVR_TMP/err.json" -w '%{http_code}' --max-time 5 -H 'content-type: application/json' "$W$1" -d "$2"; }
kvr_assert_eq "$(code /v1/completions '{"prompt": ')" 400 "truncated JSON"
jq -e '.error.message | length > 0' "$KVR_TMP/err.json" >/dev/null || kvr_fail "error body has no message"
kvr_assert_eq "$(code /v1/completions '{"max_tokens":3}')" 400 "missing prompt"
kvr_assert_eq "$(code /v1/completions '{"prompt":"x","max_tokens":0}')" 400 "max_tokens 0"
kvr_assert_eq "$(code /v1/completions '{"prompt":[1,-2,3]}')" 400 "negative token id"
kvr_assert_eq "$(code /v1/completions '{"prompt":[1,2.5]}')" 400 "fractional token id"
kvr_assert_eq "$(code /v1/completions '{"prompt":""}')" 400 "empty prompt"
kvr_assert_eq "$(code /v1/chat/completions '{"messages":[{"role":"user"}]}')" 400 "chat message without content"
kvr_assert_eq "$(code /v1/completions '{"prompt":"x","stream":"yes"}')" 400 "stream not a bool"
kvr_assert_eq "$(code /v1/completions "{\"prompt\":\"x\",\"max_tokens\":200000}")" 400 "max_tokens over max-model-len"
kvr_assert_eq "$(curl -s -o /dev/null -w '%{http_code}' "$W/nope")" 404 "unknown path"
kvr_assert_eq "$(curl -s -o /dev/null -w '%{http_code}' "$W/v1/completions")" 405 "GET completions"

# --- metrics: counters add up (prompt tokens of 8 admitted requests, cached of the warm ones)
m=$(curl -s "$W/metrics")
metric() { awk -v n="$1" '$1 == n {print $2}' <<<"$m"; }
kvr_assert_eq "$(metric kvr_worker_prompt_tokens_total)" $((72 * 4 + 40 * 2 + 69 * 2)) "prompt tokens metric"
kvr_assert_eq "$(metric kvr_worker_cached_tokens_total)" $((64 * 3 + 32 + 64)) "cached tokens metric"
kvr_assert_eq "$(metric kvr_worker_running_seqs)" 0 "running after all done"
kvr_assert_eq "$(metric kvr_worker_kv_blocks_used)" 0 "blocks used after all done"
kvr_assert_eq "$(metric kvr_worker_kv_blocks_capacity)" 16384 "capacity metric"
[ -n "$(metric kvr_worker_sim_lag_seconds)" ] || kvr_fail "no lag metric"
[ "$(metric kvr_worker_steps_total)" -gt 10 ] || kvr_fail "steps metric"
kvr_alive worker || kvr_fail "worker died"

# --- --stream-interval 5 (vLLM's streaming granularity): every chunk but the last has >= 5
port2=$(kvr_free_port)
while [ "$port2" = "$port" ]; do port2=$(kvr_free_port); done
kvr_spawn worker2 "$KVR_BIN/kvr-worker" --listen "127.0.0.1:$port2" --nats "$NATS_URL" \
    --namespace t --model sim --id 8 --block-size 16 --seed 5 --speedup 20 --stream-interval 5
kvr_wait_http "http://127.0.0.1:$port2/health" 10
W="http://127.0.0.1:$port2"
ev=$(stream /v1/completions "{\"prompt\":\"$prompt\",\"max_tokens\":12,\"stream\":true}") || exit 1
kvr_assert_eq "$(jq -sc '[.[] | .choices[]?.token_ids[]]' <<<"$ev")" "$want" "stream-interval token_ids"
kvr_assert_eq "$(jq -s '[.[] | .choices[0].token_ids | length] | .[:-1] | map(select(. < 5)) | length' <<<"$ev")" 0 "chunks of at least 5 tokens"

# --- OpenAI content parts, as clients (and a frontend passing bodies through) send them: the
# text parts count, joined with "\n" as vLLM joins them for a string-content template; an
# image part is skipped: the same prompt as the joined string, same output
parts='{"model":"sim","messages":[{"role":"user","content":[{"type":"text","text":"Hello there, "},{"type":"image_url","image_url":{"url":"data:,"}},{"type":"text","text":"worker"}]}],"max_tokens":9}'
joined='{"model":"sim","messages":[{"role":"user","content":"Hello there, \nworker"}],"max_tokens":9}'
out=$(post /v1/chat/completions "$parts")
out_joined=$(post /v1/chat/completions "$joined")
kvr_assert_eq "$(jq -c '[.usage.prompt_tokens, .choices[0].token_ids]' <<<"$out")" "$(jq -c '[.usage.prompt_tokens, .choices[0].token_ids]' <<<"$out_joined")" "chat content parts"
kvr_assert_eq "$(jq -c '.usage.prompt_tokens' <<<"$out")" 70 "chat content parts: joined with a newline"
kvr_assert_eq "$(code /v1/chat/completions '{"messages":[{"role":"user","content":[{"type":"text"}]}]}')" 400 "text part without text"
kvr_assert_eq "$(code /v1/chat/completions '{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":null},{"role":"user","content":"y"}],"max_tokens":1}')" 200 "null content (an assistant turn)"

# --- POST /tokenize as vLLM serves it (a frontend's remote tokenizer fallback): the same
# tokens the completion paths use
out=$(post /tokenize '{"model":"sim","prompt":"hi!","add_special_tokens":true}')
kvr_assert_eq "$(jq -c '[.count, .tokens, .max_model_len]' <<<"$out")" "[3,[104,105,33],131072]" "tokenize prompt"
out=$(post /tokenize '{"model":"sim","messages":[{"role":"user","content":"Hello there, worker"}],"add_generation_prompt":true}')
kvr_assert_eq "$(jq -r .count <<<"$out")" 69 "tokenize chat = the chat completion's prompt tokens"
kvr_assert_eq "$(jq -r '.tokens[:12] | implode' <<<"$out")" "<|im_start|>" "tokenize chat: ChatML"
kvr_assert_eq "$(code /tokenize '{"prompt":[1,2]}')" 400 "tokenize: token ids are not a prompt"
kvr_assert_eq "$(code /tokenize '{"prompt":"x","messages":[]}')" 400 "tokenize: prompt and messages"
kvr_assert_eq "$(code /tokenize '{"prompt":"x","add_special_tokens":1}')" 400 "tokenize: bad bool"
head -c 1100000 /dev/zero | tr '\0' a | jq -Rc '{prompt: .}' >"$KVR_TMP/big.json"
kvr_assert_eq "$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$W/tokenize" --data-binary @"$KVR_TMP/big.json")" 413 "tokenize: body over 1 MiB"
kvr_pass
