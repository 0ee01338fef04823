#!/bin/bash
# frontend_lora (issue 13, items 3 and 4): LoRA-aware routing and the model-card check, with
# real processes: nats-server, two kvr-routerd over Raft, five kvr-worker, one kvr-frontend.
#   w1, w2: model m1 with --lora A; w3, w4: m1 alone; w5: m1 with another model card.
#   The frontend loads --tokenizer m1=DIR; w1-w4 announce DIR's checksum (--model-dir DIR).
# Checks:
#  1. /v1/models lists A with parent m1 (frontend and worker).
#  2. The same prompt under A and under m1 shares no block: the routers' /v1/match shows an
#     overlap under lora A only on the worker that served A, and the base overlap elsewhere.
#  3. Requests for A go only to the workers listing A (w1, w2).
#  4. A second request for A with the same prefix goes to the worker holding A's blocks.
#  5. w5 (mismatched mdc_sum) gets no request; the frontend counts it once.
# LORA_TEST_NO_FILTER=lora (or mdc) starts the routers with --no-lora-filter (--no-mdc-filter):
# then check 3 (5) fails, which shows the filter is what passes it.
source "$(dirname "$0")/../lib/testenv.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../routerd/rd_lib.sh"
kvr_test_init frontend_lora
kvr_need_bins kvr-worker kvr-frontend kvr-routerd
kvr_start_nats
BS=16
TOK="$KVR_TMP/tok"
mkdir -p "$TOK"
# a small byte-level tokenizer.json (the fuzz seed, without its trailing fuzz input)
/usr/bin/python3 -c 'import sys; d=open(sys.argv[1], encoding="utf-8").read(); open(sys.argv[2], "w", encoding="utf-8").write(d.split("\n\x01\n")[0])' \
    "$HERE/../fuzz/seeds/tokenizer/bytelevel.json" "$TOK/tokenizer.json"

declare -A WPORT RPORT
spawn_worker() { # id extra...
    local id=$1
    shift
    WPORT[$id]=$(kvr_free_port)
    kvr_spawn "worker$id" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:${WPORT[$id]} \
        --nats "$NATS_URL" --namespace default --model m1 --id "$id" --speedup 100 \
        --block-size $BS --announce-delay-ms 200 "$@"
}
spawn_worker 1 --model-dir "$TOK" --lora A --lora B
spawn_worker 2 --model-dir "$TOK" --lora A
spawn_worker 3 --model-dir "$TOK"
spawn_worker 4 --model-dir "$TOK"
spawn_worker 5 --mdc-sum tok1:00000000000000ff

RFLAGS=()
case "${LORA_TEST_NO_FILTER:-}" in
lora) RFLAGS=(--no-lora-filter) ;;
mdc) RFLAGS=(--no-mdc-filter) ;;
esac
raft=($(rd_raft_ports 2))
peers="1@${raft[0]},2@${raft[1]}"
for i in 1 2; do
    RPORT[$i]=$(kvr_free_port)
    mkdir -p "$KVR_TMP/r$i"
    rd_start "router$i" "$i" "${RPORT[$i]}" "$KVR_TMP/r$i" --block-size $BS \
        --raft-addr "${raft[$((i - 1))]}" --peers "$peers" \
        --cluster-secret-file "$(kvr_cluster_secret)" "${RFLAGS[@]}"
done
fport=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fport --nats "$NATS_URL" --id 7 \
    --router-mode kv --route-timeout 1s --route-tries 3 --tokenizer "m1=$TOK"
F=http://127.0.0.1:$fport
kvr_wait_http "$F/health" 10
for i in 1 2; do kvr_wait_http "http://127.0.0.1:${RPORT[$i]}/health" 20; done
rworkers() { rd_state "${RPORT[$1]}" | jq -e '[.workers[] | select(.up)] | length == 5' >/dev/null; }
for i in 1 2; do kvr_wait_for 20 rworkers $i || kvr_fail "router $i never saw 5 workers: $(rd_state "${RPORT[$i]}")"; done
fworkers() { curl -s "$F/metrics" | awk '/^kvr_frontend_live_workers / {exit !($2==5)}'; }
kvr_wait_for 10 fworkers || kvr_fail "frontend never saw 5 workers"
leader() { # port of a router that answers /v1/route with a leader (ready)
    local i
    for i in 1 2; do
        [ "$(rd_q "${RPORT[$i]}" .ready)" = true ] && { echo "${RPORT[$i]}"; return 0; }
    done
    return 1
}
kvr_wait_for 20 leader >/dev/null || kvr_fail "no router ready"
fmetric() { curl -s "$F/metrics" | awk -v k="$1" '$1==k {s+=$2} END {printf "%d\n", s}'; }
served() { curl -s "http://127.0.0.1:${WPORT[$1]}/metrics" | awk '$1=="kvr_worker_requests_total" {printf "%d\n", $2}'; }
snapshot() { local i; for i in 1 2 3 4 5; do S0[$i]=$(served $i); done; }
delta() { echo $(( $(served "$1") - ${S0[$1]} )); }
complete() { # model prompt → http code
    curl -s -o /dev/null -w '%{http_code}' --max-time 10 \
        -d "$(jq -cn --arg m "$1" --arg p "$2" '{model:$m,prompt:$p,max_tokens:1}')" "$F/v1/completions"
}
burst() { # model tag N: N fresh prompts, 8 at a time, 200 tokens each; prints the 200s
    seq "$3" | xargs -P 8 -I{} curl -s -o /dev/null -w '%{http_code}\n' --max-time 20 \
        -d "{\"model\":\"$1\",\"prompt\":\"{} is the number of this fresh $2 prompt with words of its own\",\"max_tokens\":200}" \
        "$F/v1/completions" | grep -c '^200$'
}
cached() { curl -s "http://127.0.0.1:${WPORT[$1]}/metrics" | awk '$1=="kvr_worker_cached_tokens_total" {printf "%d\n", $2}'; }
tokens_of() { # prompt → JSON token ids (the frontend's tokenizer for m1)
    curl -s -d "$(jq -cn --arg p "$1" '{model:"m1",prompt:$p}')" "$F/tokenize" | jq -c .tokens
}
match() { # router-port tokens-json lora → overlaps, keys sorted
    rd_post "$1" /v1/match -d "$(jq -cn --argjson t "$2" --arg l "$3" '{model:"m1",token_ids:$t} + (if $l == "" then {} else {lora:$l} end)')" |
        jq -cS .overlaps
}

# 1. the adapters are models, vLLM style
curl -s "$F/v1/models" | jq -e '[.data[] | select(.id=="A" and .parent=="m1")] | length == 1' >/dev/null ||
    kvr_fail "frontend /v1/models lacks A (parent m1): $(curl -s "$F/v1/models")"
curl -s "$F/v1/models" | jq -e '[.data[] | select(.id=="B" and .parent=="m1")] | length == 1' >/dev/null ||
    kvr_fail "frontend /v1/models lacks B"
curl -s "http://127.0.0.1:${WPORT[1]}/v1/models" | jq -e '[.data[].id] == ["m1","A","B"] and .data[1].parent == "m1"' >/dev/null ||
    kvr_fail "worker /v1/models: $(curl -s "http://127.0.0.1:${WPORT[1]}/v1/models")"
kvr_assert_eq "$(fmetric kvr_frontend_mdc_mismatch_workers_total)" 1 "mismatched worker counted once"

# 2 + 4. one prompt under A, then under m1: separate overlaps
P="lora routing probe: the quick brown fox jumps over the lazy dog, twice over, and then some more words to fill blocks"
T=$(tokens_of "$P")
n=$(jq length <<<"$T")
[ "$n" -ge $((3 * BS)) ] || kvr_fail "prompt too short: $n tokens"
snapshot
kvr_assert_eq "$(complete A "$P")" 200 "request under A"
wa=
for i in 1 2 3 4 5; do [ "$(delta $i)" = 1 ] && wa=$i; done
[ -n "$wa" ] || kvr_fail "no worker served the A request"
kvr_log "A served by worker $wa"
[ "$wa" = 1 ] || [ "$wa" = 2 ] || kvr_fail "the A request went to worker $wa, which does not list A"
have_a() { local m; m=$(match "${RPORT[$1]}" "$T" A); jq -e --arg w "$wa" '.[$w] >= 3' <<<"$m" >/dev/null; }
for i in 1 2; do kvr_wait_for 10 have_a $i || kvr_fail "router $i: no A overlap on worker $wa: $(match "${RPORT[$i]}" "$T" A) base: $(match "${RPORT[$i]}" "$T" "") $(curl -s http://127.0.0.1:${RPORT[$i]}/metrics | grep -E "rejected|events_applied|blocks_applied") tokens=$T cache=$(curl -s http://127.0.0.1:${WPORT[$wa]}/debug/cache) ptok=$(curl -s http://127.0.0.1:${WPORT[$wa]}/metrics | grep prompt_tokens)"; done
kvr_assert_eq "$(match "${RPORT[1]}" "$T" "")" "{}" "the base model sees none of A's blocks"
snapshot
declare -A C0
for i in 1 2 3 4 5; do C0[$i]=$(cached $i); done
kvr_assert_eq "$(complete m1 "$P")" 200 "request under the base model"
wb=
for i in 1 2 3 4 5; do [ "$(delta $i)" = 1 ] && wb=$i; done
kvr_log "m1 served by worker $wb"
# the engine too keeps them apart: no cache hit for the base request, even on A's worker
kvr_assert_eq $(( $(cached "$wb") - ${C0[$wb]} )) 0 "base request's cached tokens"
have_b() { local m; m=$(match "${RPORT[1]}" "$T" ""); jq -e --arg w "$wb" '.[$w] >= 3' <<<"$m" >/dev/null; }
kvr_wait_for 10 have_b || kvr_fail "no base overlap on worker $wb: $(match "${RPORT[1]}" "$T" "")"
ma=$(match "${RPORT[1]}" "$T" A)
mb=$(match "${RPORT[1]}" "$T" "")
kvr_log "overlaps under A: $ma, under m1: $mb"
[ "$wa" = "$wb" ] || jq -e --arg w "$wb" '.[$w] == null' <<<"$ma" >/dev/null ||
    kvr_fail "A's overlaps include the base worker $wb: $ma"
[ "$wa" = "$wb" ] || jq -e --arg w "$wa" '.[$w] == null' <<<"$mb" >/dev/null ||
    kvr_fail "the base overlaps include A's worker $wa: $mb"
# 4. the same prefix under A again: the worker holding A's blocks, every time
snapshot
for k in 1 2 3 4; do
    kvr_assert_eq "$(complete A "$P and a tail $k")" 200 "A again ($k)"
done
kvr_assert_eq "$(delta "$wa")" 4 "A's repeats on the worker holding A's blocks ($wa)"

# 3. fresh prompts under A: only w1 and w2; 5. base prompts: never w5
snapshot
kvr_assert_eq "$(burst A adapter 24)" 24 "fresh A requests served"
kvr_log "fresh A: w1=$(delta 1) w2=$(delta 2) w3=$(delta 3) w4=$(delta 4) w5=$(delta 5)"
kvr_assert_eq $(( $(delta 1) + $(delta 2) )) 24 "A requests only on the workers listing A"
snapshot
kvr_assert_eq "$(burst m1 base 40)" 40 "fresh m1 requests served"
kvr_log "fresh m1: w1=$(delta 1) w2=$(delta 2) w3=$(delta 3) w4=$(delta 4) w5=$(delta 5)"
kvr_assert_eq "$(delta 5)" 0 "the worker with another model card got no request"
# an adapter no worker lists is an unknown model
kvr_assert_eq "$(complete nope "x")" 404 "unknown adapter/model"
kvr_assert_eq "$(fmetric kvr_frontend_mdc_mismatch_workers_total)" 1 "still counted once"
kvr_assert_eq "$(curl -s "$F/metrics" | awk '/^kvr_frontend_route_fallback_total/ {s+=$2} END {printf "%d", s}')" 0 "every request routed by a router"
kvr_pass
