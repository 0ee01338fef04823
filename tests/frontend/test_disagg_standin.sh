#!/bin/bash
# frontend_disagg_standin (issue 15 item 3): each leg's body, field by field, as vLLM's
# NixlConnector proxy sends them. The engines are tests/frontend/nixl_standin.py, which STANDS
# IN FOR a vLLM prefill and a vLLM decode instance (it logs every leg); kvr-worker processes
# only announce them (--advertise-url, --role prefill / decode); one kvr-routerd
# (--max-local-prefill 10: every prompt here goes remote); kvr-frontend --forward body and
# --forward tokens.
#  1. body mode, streamed chat with stream_options, min_tokens and a client kv_transfer_params:
#     the prefill leg is the client's body with stream:false, max_tokens:1,
#     max_completion_tokens:1, no stream_options/min_tokens, kv_transfer_params = vLLM's nulls;
#     the decode leg is the client's body without its kv_transfer_params plus exactly the prefill
#     answer's; X-Request-Id the same on both legs; the client's stream completes.
#  2. tokens mode: the same legs around the token-id body.
#  3. the prefill instance fails (500): the decode leg goes without kv_transfer_params, the
#     client gets its answer, counted as fallback.
source "$(dirname "$0")/../lib/testenv.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../routerd/rd_lib.sh"
kvr_test_init frontend_disagg_standin
kvr_need_bins kvr-worker kvr-frontend kvr-routerd
kvr_start_nats
BS=16
SECRET=$(kvr_cluster_secret)
SP=$(kvr_free_port)
SD=$(kvr_free_port)
LOG="$KVR_TMP/legs.jsonl"
: >"$LOG"
kvr_spawn standin /usr/bin/python3 "$HERE/nixl_standin.py" "$SP" "$SD" "$LOG"
kvr_wait_http "http://127.0.0.1:$SP/health" 10
kvr_wait_http "http://127.0.0.1:$SD/health" 10
for spec in 1:prefill:$SP 2:decode:$SD; do
    IFS=: read -r id role port <<<"$spec"
    kvr_spawn "w$id" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$(kvr_free_port) --nats "$NATS_URL" \
        --namespace default --model m1 --id "$id" --block-size $BS --role "$role" \
        --kv-secret-file "$SECRET" --advertise-url "http://127.0.0.1:$port"
done
RP=$(kvr_free_port)
mkdir -p "$KVR_TMP/r"
rd_start router 1 "$RP" "$KVR_TMP/r" --block-size $BS --max-local-prefill 10
FBP=$(kvr_free_port)
FTP=$(kvr_free_port)
kvr_spawn feb "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$FBP --nats "$NATS_URL" --id 3 \
    --router-mode kv --route-timeout 1s --block-size $BS --forward body
kvr_spawn fet "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$FTP --nats "$NATS_URL" --id 4 \
    --router-mode kv --route-timeout 1s --block-size $BS
FB=http://127.0.0.1:$FBP FT=http://127.0.0.1:$FTP
kvr_wait_http "$FB/health" 10
kvr_wait_http "$FT/health" 10
kvr_wait_http "http://127.0.0.1:$RP/health" 20
rd_wait_workers_up "$RP" 2 20 || kvr_fail "router never saw both workers: $(rd_state "$RP")"
fworkers() { curl -s "$1/metrics" | awk '/^kvr_frontend_live_workers / {exit !($2==1)}'; }
kvr_wait_for 10 fworkers "$FB" || kvr_fail "body frontend never saw the decode worker"
kvr_wait_for 10 fworkers "$FT" || kvr_fail "tokens frontend never saw the decode worker"
path() { curl -s "$1/metrics" | awk -v k="kvr_frontend_disagg_requests_total{path=\"$2\"}" '$1==k {printf "%d", $2}'; }
leg() { jq -c --arg s "$1" 'select(.side == $s)' "$LOG" | tail -n 1; } # the last leg of a side
NULLS='{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}'
LONG="tell me a long story about the sea, the wind and the ships that sail on it at night"

# 1. body mode: a streamed chat with everything the prefill leg must change
client=$(jq -cn --arg c "$LONG" '{model:"m1", messages:[{role:"user", content:$c}], stream:true,
    stream_options:{include_usage:true}, min_tokens:2, max_completion_tokens:50, temperature:0.5,
    kv_transfer_params:{do_remote_prefill:true, remote_host:"evil.example", remote_port:1}}')
out=$(curl -s --max-time 10 "$FB/v1/chat/completions" -d "$client")
[ "$(tail -n 1 <<<"$out")" = "data: [DONE]" ] || kvr_fail "body mode: stream incomplete: $out"
p=$(leg prefill) d=$(leg decode)
[ -n "$p" ] && [ -n "$d" ] || kvr_fail "body mode: legs missing: $(cat "$LOG")"
kvr_assert_eq "$(jq -r .path <<<"$p") $(jq -r .path <<<"$d")" "/v1/chat/completions /v1/chat/completions" "body mode: both legs on the client's endpoint"
want_p=$(jq -cS --argjson n "$NULLS" 'del(.stream_options, .min_tokens) | .stream = false |
    .max_tokens = 1 | .max_completion_tokens = 1 | .kv_transfer_params = $n' <<<"$client")
kvr_assert_eq "$(jq -cS .body <<<"$p")" "$want_p" "body mode: prefill leg body"
rid=$(jq -r .x_request_id <<<"$p")
[ -n "$rid" ] && [ "$rid" != null ] || kvr_fail "body mode: no X-Request-Id on the prefill leg"
kvr_assert_eq "$(jq -r .x_request_id <<<"$d")" "$rid" "body mode: X-Request-Id on both legs"
want_d=$(jq -cS --arg r "cmpl-$rid-0" '.kv_transfer_params = {do_remote_prefill:true,
    do_remote_decode:false, remote_block_ids:[3,1,4], remote_engine_id:"standin-engine",
    remote_request_id:$r, remote_host:"10.1.2.3", remote_port:5600, tp_size:1}' <<<"$client")
kvr_assert_eq "$(jq -cS .body <<<"$d")" "$want_d" "body mode: decode leg body"
kvr_assert_eq "$(path "$FB" remote)" 1 "body mode: counted remote"

# 2. tokens mode: the same legs around the token-id body
: >"$LOG"
out=$(curl -s --max-time 10 "$FT/v1/completions" \
    -d "{\"model\":\"m1\",\"prompt\":\"$LONG\",\"max_tokens\":7,\"stream\":true}")
[ "$(tail -n 1 <<<"$out")" = "data: [DONE]" ] || kvr_fail "tokens mode: stream incomplete: $out"
p=$(leg prefill) d=$(leg decode)
ids=$(jq -c '.body.prompt' <<<"$d")
kvr_assert_eq "$(jq -r 'length' <<<"$ids")" "${#LONG}" "tokens mode: the prompt's ids (byte tokenizer)"
kvr_assert_eq "$(jq -cS .body <<<"$p")" \
    "$(jq -cnS --argjson ids "$ids" --argjson n "$NULLS" '{model:"m1", stream:false, max_tokens:1,
        max_completion_tokens:1, kv_transfer_params:$n, prompt:$ids}')" "tokens mode: prefill leg body"
rid=$(jq -r .x_request_id <<<"$p")
kvr_assert_eq "$(jq -r .x_request_id <<<"$d")" "$rid" "tokens mode: X-Request-Id on both legs"
kvr_assert_eq "$(jq -cS .body <<<"$d")" \
    "$(jq -cnS --argjson ids "$ids" --arg r "cmpl-$rid-0" '{model:"m1", stream:true,
        stream_options:{include_usage:true}, max_tokens:7, prompt:$ids,
        kv_transfer_params:{do_remote_prefill:true, do_remote_decode:false,
        remote_block_ids:[3,1,4], remote_engine_id:"standin-engine", remote_request_id:$r,
        remote_host:"10.1.2.3", remote_port:5600, tp_size:1}}')" "tokens mode: decode leg body"
kvr_assert_eq "$(path "$FT" remote)" 1 "tokens mode: counted remote"

# 3. the prefill instance fails: decode-only, no error for the client
: >"$LOG"
r=$(curl -s --max-time 10 "$FB/v1/chat/completions" \
    -d "{\"model\":\"m1\",\"messages\":[{\"role\":\"user\",\"content\":\"PREFILL-FAIL $LONG\"}],\"max_completion_tokens\":5}")
kvr_assert_eq "$(jq -r '.choices[0].message.content' <<<"$r")" hi "prefill failure: the client gets its answer"
kvr_assert_eq "$(jq -c '.body | has("kv_transfer_params")' <<<"$(leg decode)")" false "prefill failure: decode leg without params"
kvr_assert_eq "$(path "$FB" fallback)" 1 "prefill failure: counted fallback"
kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:$RP/v1/state | jq -r .bookings)\" = 0 ]" ||
    kvr_fail "bookings left: $(rd_q "$RP" .bookings)"
kvr_pass
