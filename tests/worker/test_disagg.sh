#!/usr/bin/env bash
# worker_disagg: kvr-worker --role prefill / --role decode speaking vLLM's NixlConnector proxy
# protocol (issue 15 item 1), real processes on a real nats-server, driven as vLLM's toy proxy
# drives vLLM (tests/v1/kv_connector/nixl_integration/toy_proxy_server.py):
# - the prefill leg's answer carries exactly vLLM's kv_transfer_params fields, and holds blocks;
# - the decode leg with them pulls the blocks over the side channel (bytes counted, each block
#   checked against the decoder's own prompt), streams the exact tokens, its cache gains the
#   blocks and the KV events of both workers rebuild their caches (kvr-worker-probe digest);
# - a decoder that already caches the prefix asks for nothing but still frees the hold;
# - read twice, garbage params, empty remote_block_ids, a decoder with the wrong secret, an
#   expired hold, the prefill worker SIGKILLed mid-transfer: the request recomputes and
#   completes with the same tokens;
# - forged, garbage, unknown-id, wrong-engine and unheld-block side channel requests are
#   refused and leave the hold in place; the right decoder then reads it.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init worker_disagg
kvr_start_nats
PROBE="$KVR_BIN/kvr-worker-probe"
KVX="/usr/bin/python3 $(dirname "$0")/kvx_client.py"
kvr_wait_for 15 "$PROBE" ensure-stream --nats "$NATS_URL" || kvr_fail "creating KVR_EVENTS"

SECRET=$(kvr_cluster_secret)
WRONG="$KVR_TMP/wrong.secret"
(umask 077; echo "not-the-cluster-secret-at-all" >"$WRONG")
BPB=65536
pp=$(kvr_free_port); pk=$(kvr_free_port); pd=$(kvr_free_port); px=$(kvr_free_port)
P="http://127.0.0.1:$pp" D="http://127.0.0.1:$pd" X="http://127.0.0.1:$px"
common=(--nats "$NATS_URL" --namespace dg --model sim --block-size 16 --seed 5 --speedup 20
    --kv-bytes-per-block $BPB)
kvr_spawn prefill "$KVR_BIN/kvr-worker" --listen "127.0.0.1:$pp" --id 1 "${common[@]}" \
    --role prefill --kv-port "$pk" --kv-secret-file "$SECRET" --kv-hold-timeout 60
kvr_spawn decode "$KVR_BIN/kvr-worker" --listen "127.0.0.1:$pd" --id 2 "${common[@]}" \
    --role decode --kv-secret-file "$SECRET"
kvr_spawn decodex "$KVR_BIN/kvr-worker" --listen "127.0.0.1:$px" --id 3 "${common[@]}" \
    --role decode --kv-secret-file "$WRONG"
for u in $P $D $X; do kvr_wait_http "$u/health" 10; done

# a role without a secret does not start
"$KVR_BIN/kvr-worker" --role decode --listen 127.0.0.1:1 2>"$KVR_TMP/nosecret.txt" &&
    kvr_fail "--role decode started without --kv-secret-file"
grep -q 'kv-secret-file' "$KVR_TMP/nosecret.txt" || kvr_fail "no reason given: $(cat "$KVR_TMP/nosecret.txt")"

m() { curl -s "$1/metrics" | awk -v k="$2" '$1 == k { print $2 }'; }
pulls() { m "$D" "kvr_worker_kv_pulls_total{result=\"$1\"}"; }
holds() { m "$P" "kvr_worker_kv_holds_total{result=\"$1\"}"; }
# meq URL KEY WANT WHAT: the metric reaches WANT within 5 s. The prefill worker ends a hold when
# its last write completes, which may come after the decoder has already answered its client.
meq() {
    local got i
    for i in $(seq 50); do
        got=$(m "$1" "$2")
        [ "$got" = "$3" ] && return 0
        sleep 0.1
    done
    kvr_fail "$4: got '$got', want '$3'"
}
sends() { m "$P" "kvr_worker_kv_sends_total{result=\"$1\"}"; }
KVP_NULL='{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}'
# the prefill leg as vLLM's proxy sends it: stream false, max_tokens 1, the request id header
prefill_leg() { # URL PROMPT -> answer JSON
    curl -s --max-time 20 -H 'content-type: application/json' -H "X-Request-Id: req-$RANDOM" "$1/v1/completions" \
        -d "{\"model\":\"sim\",\"prompt\":\"$2\",\"max_tokens\":1,\"stream\":false,\"kv_transfer_params\":$KVP_NULL}"
}
# the decode leg: the original body (streamed, with usage) plus the answer's kv_transfer_params
decode_leg() { # URL PROMPT KVP N -> the SSE events' JSON, one per line
    local f
    f=$(mktemp "$KVR_TMP/sse.XXXXXX")
    curl -s --max-time 30 -H 'content-type: application/json' "$1/v1/completions" \
        -d "{\"model\":\"sim\",\"prompt\":\"$2\",\"max_tokens\":$4,\"stream\":true,\"stream_options\":{\"include_usage\":true},\"kv_transfer_params\":$3}" >"$f"
    tail -c 14 "$f" | cmp -s - <(printf 'data: [DONE]\n\n') || kvr_fail "decode stream did not complete: $(tail -c 300 "$f")"
    grep -v '^$' "$f" | grep -v '^data: \[DONE\]$' | sed 's/^data: //'
}
check_tokens() { # EVENTS PROMPT N WHAT
    local want
    want=$("$PROBE" gen --seed 5 --text "$2" --n "$3")
    kvr_assert_eq "$(jq -sc '[.[] | .choices[]?.token_ids[]]' <<<"$1")" "$want" "$4: streamed tokens"
}
mkprompt() { printf '%s: the quick brown fox jumps over the lazy dog, again and again!!!!!' "$1" | head -c 72; }

# --- 1. the prefill leg: vLLM's fields, exactly; its prompt's 4 full blocks held
A=$(mkprompt alpha)
ans=$(prefill_leg "$P" "$A")
kvr_assert_eq "$(jq -c '.kv_transfer_params | keys' <<<"$ans")" \
    '["do_remote_decode","do_remote_prefill","remote_block_ids","remote_engine_id","remote_host","remote_port","remote_request_id","tp_size"]' \
    "prefill answer's kv_transfer_params fields"
jq -e --argjson pk "$pk" '.kv_transfer_params | .do_remote_prefill == true and .do_remote_decode == false
    and (.remote_block_ids | length == 4 and all(type == "number")) and (.remote_engine_id | type == "string")
    and (.remote_request_id | type == "string") and .remote_host == "127.0.0.1" and .remote_port == $pk
    and .tp_size == 1' <<<"$ans" >/dev/null || kvr_fail "prefill kv_transfer_params values: $ans"
kvr_assert_eq "$(jq -c '[.choices[0].finish_reason, .usage.completion_tokens]' <<<"$ans")" '["length",1]' "prefill leg: one token"
kvr_assert_eq "$(m "$P" kvr_worker_kv_held_blocks)" 4 "held blocks after the prefill leg"
kvp=$(jq -c .kv_transfer_params <<<"$ans")
curl -s "$P/debug/cache" | jq -c '.seq_hashes | sort' >"$KVR_TMP/p_hashes.json" # alpha's blocks
# chat: the same protocol (max_completion_tokens 1)
chat=$(curl -s --max-time 20 "$P/v1/chat/completions" -d "{\"messages\":[{\"role\":\"user\",\"content\":\"$A\"}],\"max_completion_tokens\":1,\"stream\":false,\"kv_transfer_params\":$KVP_NULL}")
jq -e '.object == "chat.completion" and .kv_transfer_params.do_remote_prefill == true and (.kv_transfer_params.remote_block_ids | length) == (.usage.prompt_tokens / 16 | floor)' <<<"$chat" >/dev/null ||
    kvr_fail "chat prefill leg: $chat"
chat_kvp=$(jq -c .kv_transfer_params <<<"$chat")
# a plain request on the prefill worker holds nothing and answers no params
plain=$(curl -s --max-time 20 "$P/v1/completions" -d "{\"prompt\":\"$A\",\"max_tokens\":1}")
jq -e 'has("kv_transfer_params") | not' <<<"$plain" >/dev/null || kvr_fail "plain request got kv_transfer_params"

# --- 2. the decode leg pulls the 4 blocks and streams; its cache gains them
ev=$(decode_leg "$D" "$A" "$kvp" 12) || exit 1
check_tokens "$ev" "$A" 12 "decode leg"
kvr_assert_eq "$(jq -sr 'last | .usage.prompt_tokens_details.cached_tokens' <<<"$ev")" 64 "decode leg: transferred tokens count as cached"
kvr_assert_eq "$(pulls ok)" 1 "pulls ok"
kvr_assert_eq "$(m "$D" 'kvr_worker_kv_transfer_bytes_total{dir="received"}')" $((4 * BPB)) "bytes received"
kvr_assert_eq "$(m "$P" 'kvr_worker_kv_transfer_bytes_total{dir="sent"}')" $((4 * BPB)) "bytes sent"
meq "$P" 'kvr_worker_kv_holds_total{result="read"}' 1 "holds read"
kvr_assert_eq "$(m "$D" 'kvr_worker_kv_transfer_seconds_count{side="pull"}')" 1 "pull seconds observed"
# alpha's 4 blocks on P (taken before the chat leg): all on D too
curl -s "$D/debug/cache" | jq -c '.seq_hashes | sort' >"$KVR_TMP/d_hashes.json"
jq -e -n --slurpfile p "$KVR_TMP/p_hashes.json" --slurpfile d "$KVR_TMP/d_hashes.json" \
    '($p[0] | length) >= 4 and ($p[0] - $d[0] | length) == 0' >/dev/null ||
    kvr_fail "decoder's cache lacks the transferred blocks: P $(cat "$KVR_TMP/p_hashes.json") D $(cat "$KVR_TMP/d_hashes.json")"
Z=$(mkprompt zulu)
ev=$(decode_leg "$D" "$Z" "$chat_kvp" 3) || exit 1 # the chat's blocks for another prompt
kvr_assert_eq "$(pulls mismatch)" 1 "blocks of another prompt are refused (mismatch)"
check_tokens "$ev" "$Z" 3 "mismatch recomputed"

# --- 3. read twice, garbage params, empty ids: recompute, complete
B=$(mkprompt bravo)
ev=$(decode_leg "$D" "$B" "$kvp" 6) || exit 1 # alpha's params, already read
check_tokens "$ev" "$B" 6 "second read"
kvr_assert_eq "$(pulls refused)" 1 "second read refused"
kvr_assert_eq "$(sends unknown)" 1 "prefill: unknown request"
for bad in '{"do_remote_prefill":true,"remote_block_ids":[1,2],"remote_engine_id":"e","remote_request_id":"r","remote_host":"127.0.0.1","remote_port":"x"}' \
    '{"do_remote_prefill":true,"remote_block_ids":[1,2],"remote_engine_id":"e","remote_request_id":"r","remote_port":1}' \
    '{"do_remote_prefill":true,"remote_block_ids":"abc","remote_engine_id":"e","remote_request_id":"r","remote_host":"h","remote_port":1}' \
    '{"do_remote_prefill":true,"remote_block_ids":[-1],"remote_engine_id":"e","remote_request_id":"r","remote_host":"h","remote_port":1}'; do
    ev=$(decode_leg "$D" "$B" "$bad" 4) || exit 1
    check_tokens "$ev" "$B" 4 "garbage params $bad"
done
kvr_assert_eq "$(pulls invalid)" 4 "invalid params counted"
ev=$(decode_leg "$D" "$B" '"not an object"' 4) || exit 1
check_tokens "$ev" "$B" 4 "non-object params"
ev=$(decode_leg "$D" "$B" '{"do_remote_prefill":true,"remote_block_ids":[],"remote_engine_id":"e","remote_request_id":"r","remote_host":"127.0.0.1","remote_port":1}' 4) || exit 1
check_tokens "$ev" "$B" 4 "empty block ids"
kvr_assert_eq "$(pulls empty)" 1 "empty remote_block_ids: nothing to pull"

# --- 4. a decoder caching the prefix asks for no block, and the hold is still freed
C=$(mkprompt charlie)
curl -s --max-time 20 -o /dev/null "$D/v1/completions" -d "{\"prompt\":\"$C\",\"max_tokens\":2}"
kvpc=$(prefill_leg "$P" "$C" | jq -c .kv_transfer_params)
bytes0=$(m "$D" 'kvr_worker_kv_transfer_bytes_total{dir="received"}')
read0=$(holds read)
ev=$(decode_leg "$D" "$C" "$kvpc" 5) || exit 1
check_tokens "$ev" "$C" 5 "prefix-cached decode"
kvr_assert_eq "$(pulls ok)" 2 "prefix-cached pull ok"
kvr_assert_eq "$(m "$D" 'kvr_worker_kv_transfer_bytes_total{dir="received"}')" "$bytes0" "nothing transferred for a cached prefix"
meq "$P" kvr_worker_kv_held_blocks 0 "the hold was freed by the empty read"
(($(holds read) >= read0 + 1)) || kvr_fail "the empty read not counted as a read"

# --- 5. the side channel refuses what is not the right decoder's request
E=$(mkprompt echo)
ans=$(prefill_leg "$P" "$E")
rid=$(jq -r .kv_transfer_params.remote_request_id <<<"$ans")
eng=$(jq -r .kv_transfer_params.remote_engine_id <<<"$ans")
ids=$(jq -r '.kv_transfer_params.remote_block_ids | map(tostring) | join(",")' <<<"$ans")
kvr_assert_eq "$($KVX "$pk" "$WRONG" "$rid" "$eng" "$ids")" "1 0" "forged request (wrong secret) refused"
kvr_assert_eq "$($KVX "$pk" --garbage)" "4 0" "garbage refused as malformed"
kvr_assert_eq "$($KVX "$pk" "$SECRET" "no-such-request" "$eng" "$ids")" "2 0" "unknown request id refused"
kvr_assert_eq "$($KVX "$pk" "$SECRET" "$rid" "kvr-worker-1-0000000000000000" "$ids")" "2 0" "other engine id refused"
kvr_assert_eq "$($KVX "$pk" "$SECRET" "$rid" "$eng" "$ids,999999")" "3 0" "unheld block refused"
ev=$(decode_leg "$X" "$E" "$(jq -c .kv_transfer_params <<<"$ans")" 4) || exit 1
check_tokens "$ev" "$E" 4 "decoder with the wrong secret"
kvr_assert_eq "$(m "$X" 'kvr_worker_kv_pulls_total{result="refused"}')" 1 "wrong-secret decoder refused"
kvr_assert_eq "$(sends bad_secret)" 2 "prefill counted both bad secrets"
kvr_assert_eq "$(m "$P" kvr_worker_kv_held_blocks)" 4 "refusals leave the hold"
ev=$(decode_leg "$D" "$E" "$(jq -c .kv_transfer_params <<<"$ans")" 4) || exit 1 # the control
check_tokens "$ev" "$E" 4 "the right decoder after the refusals"
kvr_assert_eq "$(pulls ok)" 3 "the right decoder reads the hold"
meq "$P" kvr_worker_kv_held_blocks 0 "nothing held"

# --- 5b. a prompt under one block: empty remote_block_ids, nothing held
short=$(prefill_leg "$P" "tiny")
kvr_assert_eq "$(jq -c '.kv_transfer_params.remote_block_ids' <<<"$short")" "[]" "short prompt: no block ids"
meq "$P" kvr_worker_kv_held_blocks 0 "short prompt: nothing held"

# --- 5c. 16 two-leg requests at once: every pull succeeds, nothing stays held
ok0=$(pulls ok)
pair() { # i
    local pr kv ev
    pr=$(mkprompt "burst$1")
    kv=$(prefill_leg "$P" "$pr" | jq -c .kv_transfer_params)
    ev=$(decode_leg "$D" "$pr" "$kv" 6) || exit 1
    check_tokens "$ev" "$pr" 6 "burst $1"
}
bp=()
for i in $(seq 1 16); do
    pair "$i" &
    bp+=($!)
done
for p in "${bp[@]}"; do wait "$p" || kvr_fail "a concurrent two-leg request failed"; done
kvr_assert_eq "$(pulls ok)" $((ok0 + 16)) "16 concurrent pulls ok"
meq "$P" kvr_worker_kv_held_blocks 0 "nothing held after the burst"

# --- 6. KV events: both workers' events rebuild their caches (the decoder's imports included)
idle() { curl -s "$1/debug/cache" | jq -e '.busy == false and .used_blocks == 0' >/dev/null; }
for u in $P $D; do kvr_wait_for 20 idle "$u" || kvr_fail "$u not idle (blocks still referenced)"; done
for w in 1 2; do
    u=$P
    [ $w = 2 ] && u=$D
    curl -s "$u/debug/cache" >"$KVR_TMP/cache$w.json"
    kvr_wait_for 10 "$PROBE" digest --nats "$NATS_URL" --subject "kvr.kv.dg.$w" --worker-id $w --block-size 16 --cache "$KVR_TMP/cache$w.json" ||
        kvr_fail "worker $w: index rebuilt from events differs from its cache"
done

# --- 7. hold timeout, and the prefill worker killed mid-transfer (slow side channel)
pk2=$(kvr_free_port); pp2=$(kvr_free_port)
P2="http://127.0.0.1:$pp2"
kvr_spawn prefill2 "$KVR_BIN/kvr-worker" --listen "127.0.0.1:$pp2" --id 4 "${common[@]}" \
    --role prefill --kv-port "$pk2" --kv-secret-file "$SECRET" --kv-hold-timeout 1 --kv-bandwidth 200000
kvr_wait_http "$P2/health" 10
F=$(mkprompt foxtrot)
kvpf=$(prefill_leg "$P2" "$F" | jq -c .kv_transfer_params)
kvr_assert_eq "$(m "$P2" kvr_worker_kv_held_blocks)" 4 "held before the timeout"
expired() { [ "$(m "$P2" 'kvr_worker_kv_holds_total{result="expired"}')" = 1 ]; }
kvr_wait_for 5 expired || kvr_fail "hold did not expire"
kvr_assert_eq "$(m "$P2" kvr_worker_kv_held_blocks)" 0 "expired hold freed its blocks"
kvr_assert_eq "$(m "$P2" kvr_worker_kv_blocks_used)" 0 "no block referenced after the expiry"
refused0=$(pulls refused)
ev=$(decode_leg "$D" "$F" "$kvpf" 4) || exit 1
check_tokens "$ev" "$F" 4 "after the hold expired"
kvr_assert_eq "$(pulls refused)" $((refused0 + 1)) "expired hold: unknown to the prefill worker"

# a client that goes away during the pull: the pull is cancelled, the prefill worker's hold
# aborted, nothing stays referenced
H=$(for i in 1 2 3 4; do mkprompt "hotel$i"; done)
kvph=$(prefill_leg "$P2" "$H" | jq -c .kv_transfer_params)
curl -s --max-time 1 -o /dev/null "$D/v1/completions" -d "{\"prompt\":\"$H\",\"max_tokens\":4,\"stream\":true,\"kv_transfer_params\":$kvph}"
meq "$D" 'kvr_worker_kv_pulls_total{result="cancelled"}' 1 "pull of a client gone: cancelled"
meq "$P2" 'kvr_worker_kv_holds_total{result="aborted"}' 1 "prefill: the broken transfer's hold aborted"
meq "$P2" kvr_worker_kv_held_blocks 0 "prefill: aborted hold freed"
kvr_wait_for 10 idle "$D" || kvr_fail "decoder keeps blocks of a cancelled pull"

# 288 tokens = 18 blocks = 1.1 MiB at 200 kB/s: about 6 s, killed once bytes flow
G=$(for i in 1 2 3 4; do mkprompt "golf$i"; done)
kvpg=$(prefill_leg "$P2" "$G" | jq -c .kv_transfer_params)
kvr_assert_eq "$(jq '.remote_block_ids | length' <<<"$kvpg")" 18 "18 blocks held"
failed0=$(pulls failed)
recv0=$(m "$D" 'kvr_worker_kv_transfer_bytes_total{dir="received"}')
decode_leg "$D" "$G" "$kvpg" 8 >"$KVR_TMP/killed.txt" &
leg=$!
flowing() { (($(m "$D" 'kvr_worker_kv_transfer_bytes_total{dir="received"}') > recv0)); }
kvr_wait_for 10 flowing || kvr_fail "no bytes flowed from the slow prefill worker"
# a request waiting for its blocks is a waiting request, as vLLM counts WAITING_FOR_REMOTE_KVS
kvr_assert_eq "$(m "$D" 'vllm:num_requests_waiting{model_name="sim",engine="0"}')" 1.0 "pulling request counted as waiting"
kvr_kill9 prefill2
wait $leg || kvr_fail "the decode leg did not complete after the prefill worker died"
check_tokens "$(cat "$KVR_TMP/killed.txt")" "$G" 8 "prefill worker killed mid-transfer"
kvr_assert_eq "$(pulls failed)" $((failed0 + 1)) "the broken pull counted"
(($(m "$D" 'kvr_worker_kv_transfer_bytes_total{dir="received"}') < recv0 + 18 * BPB)) || kvr_fail "the whole payload arrived: not a mid-transfer kill"

for u in $D $X; do kvr_wait_for 20 idle "$u" || kvr_fail "$u not idle at the end"; done
kvr_alive prefill && kvr_alive decode && kvr_alive decodex || kvr_fail "a worker died"
# SIGTERM with a hold still in place: a clean exit (under ASan: no leak, exit 0)
prefill_leg "$P" "$(mkprompt hotel)" >/dev/null
kvr_assert_eq "$(m "$P" kvr_worker_kv_held_blocks)" 4 "a hold left for the shutdown"
for w in prefill decode decodex; do
    kvr_term $w 15
    rc=$?
    [ $rc = 0 ] || kvr_fail "$w exited $rc after SIGTERM"
done
kvr_pass
