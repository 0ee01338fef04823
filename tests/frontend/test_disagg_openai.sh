#!/bin/bash
# frontend_disagg_openai (issue 15, "How it will be checked"): the official OpenAI Node client
# (npm openai@4) streams long and short chats through a cluster of 2 prefill and 2 decode
# kvr-workers while a prefill worker is SIGKILLed: every stream completes, and the short ones
# never leave their decode worker.
# Real processes: nats-server, three kvr-routerd in Raft (cluster secret and admin token as in
# tests/routerd/rd_lib.sh), kvr-worker --role prefill (w1, w2) and --role decode (w3, w4) with
# a slow KV side channel (transfers take a fraction of a second, so the kill finds some in
# flight), kvr-frontend (--forward tokens, an API key).
#  - LONG_N long chats (~700 tokens, over --max-local-prefill) and SHORT_N short ones (~30
#    tokens) start spread over a few seconds, all streaming MAX_TOKENS tokens;
#  - once a prefill worker holds or computes a prefill (something in flight there) it is
#    SIGKILLed;
#  - every stream must end with finish_reason "length" after MAX_TOKENS tokens;
#  - no short chat reached a prefill worker: every long chat has the same prompt length P, and
#    each prefill worker's kvr_worker_prompt_tokens_total must be P x its
#    kvr_worker_requests_total (the killed one's read just before the kill; a short chat there
#    would make the sum smaller).
# Before that, one long completion checks that the prefill worker's booking ends with the
# prefill leg (the frontend's PREFILL_DONE), while the decoder still pulls.
# DISAGG_OPENAI_MAX_LOCAL (default 200) sets the routers' --max-local-prefill: with 0 every
# chat is disaggregated and the short-stay check must fail (that is how the test was checked).
source "$(dirname "$0")/../lib/testenv.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../routerd/rd_lib.sh"
kvr_test_init frontend_disagg_openai
kvr_need_bins kvr-worker kvr-frontend kvr-routerd
command -v node >/dev/null || { echo "SKIP: no node"; exit 77; }
NODE_DIR=${FE_NODE_DIR:-$KVR_TMP/node}
mkdir -p "$NODE_DIR"
if [ ! -d "$NODE_DIR/node_modules/openai" ]; then
    (cd "$NODE_DIR" && [ -f package.json ] || echo '{"name":"kvr-fe-test","private":true}' >package.json
     cd "$NODE_DIR" && timeout 150 npm install --no-audit --no-fund --silent openai@4 >"$KVR_TMP/npm.log" 2>&1) ||
        { tail -20 "$KVR_TMP/npm.log"; kvr_fail "npm install openai@4 failed"; }
fi
MAX_LOCAL=${DISAGG_OPENAI_MAX_LOCAL:-200}
LONG_N=16
SHORT_N=16
MAX_TOKENS=60
BS=16
SECRET=$(kvr_cluster_secret)
kvr_start_nats

declare -A WPORT RPORT
for spec in 1:prefill 2:prefill 3:decode 4:decode; do
    id=${spec%%:*}
    WPORT[$id]=$(kvr_free_port)
    # 64 KiB per block at 4 MB/s: a long chat's ~44 blocks take ~0.7 s to pull
    kvr_spawn "worker$id" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:${WPORT[$id]} \
        --nats "$NATS_URL" --namespace default --model m1 --id "$id" --speedup 10 \
        --block-size $BS --role "${spec#*:}" --kv-secret-file "$SECRET" \
        --kv-bytes-per-block 65536 --kv-bandwidth 4000000
done
raft=($(rd_raft_ports 3))
peers="1@${raft[0]},2@${raft[1]},3@${raft[2]}"
for i in 1 2 3; do
    RPORT[$i]=$(kvr_free_port)
    mkdir -p "$KVR_TMP/r$i"
    rd_start "router$i" "$i" "${RPORT[$i]}" "$KVR_TMP/r$i" --block-size $BS \
        --raft-addr "${raft[$((i - 1))]}" --peers "$peers" --cluster-secret-file "$SECRET" \
        --max-local-prefill "$MAX_LOCAL" --max-prefill-queue 8
done
fport=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fport --nats "$NATS_URL" --id 7 \
    --router-mode kv --route-timeout 1s --route-tries 3 --block-size $BS --api-key node-key
F=http://127.0.0.1:$fport
kvr_wait_http "$F/health" 10
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${RPORT[$i]}/health" 20; done
rworkers() { rd_state "${RPORT[$1]}" | jq -e '[.workers[] | select(.up)] | length == 4' >/dev/null; }
for i in 1 2 3; do kvr_wait_for 20 rworkers $i || kvr_fail "router $i never saw 4 workers"; done
fworkers() { curl -s "$F/metrics" | awk '/^kvr_frontend_live_workers / {exit !($2==2)}'; }
kvr_wait_for 10 fworkers || kvr_fail "frontend never saw 2 decode workers"
ready() { [ "$(rd_q "${RPORT[1]}" .ready)" = true ] && [ -n "$(rd_common_leader "${RPORT[1]}" "${RPORT[2]}" "${RPORT[3]}")" ]; }
kvr_wait_for 20 ready || kvr_fail "no Raft leader"

# metric KEY of a worker's /metrics text (exact sample name with labels), summed
mval() { awk -v k="$2" '$1==k {s+=$2} END {printf "%d\n", s}' "$1"; }
scrape() { curl -s --max-time 2 "http://127.0.0.1:${WPORT[$1]}/metrics" >"$2"; }
fm() { curl -s "$F/metrics" | awk -v k="$1" '$1==k {s+=$2} END {printf "%d\n", s}'; }
paths() { echo "remote=$(fm 'kvr_frontend_disagg_requests_total{path="remote"}') local=$(fm 'kvr_frontend_disagg_requests_total{path="local"}') fallback=$(fm 'kvr_frontend_disagg_requests_total{path="fallback"}')"; }

# The prefill worker's booking ends with its leg (kvr-frontend publishes PREFILL_DONE then),
# not at the decode leg's first token: while a decoder still pulls a long prompt's blocks
# (~1700 tokens: ~1.7 s at 4 MB/s), no prefill worker is booked any more.
PROBE=""
for k in $(seq 1 300); do PROBE+="probe$k "; done
curl -s --max-time 30 -H 'Authorization: Bearer node-key' "$F/v1/completions" \
    -d "{\"model\":\"m1\",\"prompt\":\"$PROBE\",\"max_tokens\":4,\"stream\":true}" >"$KVR_TMP/probe.out" &
probe_pid=$!
pulling() {
    local d
    for d in 3 4; do
        scrape $d "$KVR_TMP/p$d.metrics" && (( $(mval "$KVR_TMP/p$d.metrics" kvr_worker_waiting_seqs) > 0 )) && return 0
    done
    return 1
}
prefill_booked() { rd_state "${RPORT[1]}" | jq '[.workers[] | select(.role == "prefill") | .bookings] | add'; }
no_prefill_booking() { [ "$(prefill_booked)" = 0 ]; }
kvr_wait_for 10 pulling || kvr_fail "the probe's blocks were never pulled: $(cat "$KVR_TMP/probe.out")"
kvr_wait_for 1 no_prefill_booking || kvr_fail "a prefill worker is still booked during the pull: $(prefill_booked)"
pulling || kvr_fail "probe: the pull ended before the check (too fast to tell)"
wait "$probe_pid"
grep -q "^data: \[DONE\]" "$KVR_TMP/probe.out" || kvr_fail "probe stream incomplete"
# the prefill workers' counters from here on count the chats only
declare -A REQ0 PROMPT0
for w in 1 2; do
    scrape $w "$KVR_TMP/b$w.metrics" || kvr_fail "prefill worker $w metrics"
    REQ0[$w]=$(mval "$KVR_TMP/b$w.metrics" kvr_worker_requests_total)
    PROMPT0[$w]=$(mval "$KVR_TMP/b$w.metrics" kvr_worker_prompt_tokens_total)
done

(cd "$HERE" && NODE_PATH="$NODE_DIR/node_modules" BASE="$F/v1" KEY=node-key MODEL=m1 \
    LONG_N=$LONG_N SHORT_N=$SHORT_N MAX_TOKENS=$MAX_TOKENS SPREAD_MS=5000 LONG_WORDS=160 \
    timeout 120 node "$HERE/openai_disagg.js" >"$KVR_TMP/node.out" 2>"$KVR_TMP/node.err") &
node_pid=$!

# SIGKILL a prefill worker while it has a prefill leg running or blocks held for a decoder
# (whichever is seen busy first: the routers send most long chats to the one that already
# holds their common first block)
busy() {
    local w
    for w in 1 2; do
        scrape $w "$KVR_TMP/w$w.metrics" || continue
        if (( $(mval "$KVR_TMP/w$w.metrics" kvr_worker_kv_holds) + $(mval "$KVR_TMP/w$w.metrics" kvr_worker_running_seqs) > 0 )); then
            echo $w >"$KVR_TMP/victim"
            return 0
        fi
    done
    return 1
}
kvr_wait_for 30 busy ||
    kvr_fail "no prefill worker ever got a prefill leg: paths $(paths); node: $(cat "$KVR_TMP/node.err" "$KVR_TMP/node.out")"
K=$(cat "$KVR_TMP/victim")
L=$((3 - K))
kvr_kill9 "worker$K"
k_req=$(( $(mval "$KVR_TMP/w$K.metrics" kvr_worker_requests_total) - REQ0[$K] ))
k_prompt=$(( $(mval "$KVR_TMP/w$K.metrics" kvr_worker_prompt_tokens_total) - PROMPT0[$K] ))
kvr_log "prefill worker $K killed: requests=$k_req prompt_tokens=$k_prompt holds=$(mval "$KVR_TMP/w$K.metrics" kvr_worker_kv_holds) running=$(mval "$KVR_TMP/w$K.metrics" kvr_worker_running_seqs)"

wait "$node_pid" || kvr_fail "node client failed: $(cat "$KVR_TMP/node.err" "$KVR_TMP/node.out")"
out=$(cat "$KVR_TMP/node.out")
kvr_log "node: $out"
kvr_assert_eq "$(jq -r '.failures | length' <<<"$out")" 0 "no stream failed ($(jq -c .failures <<<"$out"))"
kvr_assert_eq "$(jq -r .long_ok <<<"$out")" $LONG_N "every long stream completed"
kvr_assert_eq "$(jq -r .short_ok <<<"$out")" $SHORT_N "every short stream completed"
kvr_assert_eq "$(jq -r '.long_prompt_tokens | length' <<<"$out")" 1 "long chats share one prompt length"
P=$(jq -r '.long_prompt_tokens[0]' <<<"$out")
S=$(jq -r '.short_prompt_tokens[0]' <<<"$out")
(( P > MAX_LOCAL && S < P )) || kvr_fail "prompt lengths: long $P short $S"

scrape $L "$KVR_TMP/w$L.metrics" || kvr_fail "prefill worker $L gone"
l_req=$(( $(mval "$KVR_TMP/w$L.metrics" kvr_worker_requests_total) - REQ0[$L] ))
l_prompt=$(( $(mval "$KVR_TMP/w$L.metrics" kvr_worker_prompt_tokens_total) - PROMPT0[$L] ))
pulls=""
for d in 3 4; do
    scrape $d "$KVR_TMP/w$d.metrics"
    for r in ok failed refused; do pulls+=" w$d.$r=$(mval "$KVR_TMP/w$d.metrics" "kvr_worker_kv_pulls_total{result=\"$r\"}")"; done
done
kvr_log "prefill legs: killed w$K $k_req ($k_prompt tokens), w$L $l_req ($l_prompt tokens); long prompt $P short $S tokens; pulls$pulls"
kvr_log "paths: $(paths)"
kvr_assert_eq "$k_prompt" $((k_req * P)) "killed prefill worker $K saw only long chats (prompt tokens = legs x $P)"
kvr_assert_eq "$l_prompt" $((l_req * P)) "prefill worker $L saw only long chats (prompt tokens = legs x $P)"
(( k_req >= 1 && k_req + l_req <= LONG_N )) || kvr_fail "prefill legs: $k_req + $l_req for $LONG_N long chats"
kvr_pass
