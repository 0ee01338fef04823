#!/bin/bash
# frontend_disagg (issue 15 items 2 and 3): both legs booked in one replicated decision and run
# by the frontend, with real processes: nats-server, three kvr-routerd over Raft, kvr-worker
# --role prefill (w1, w2) and --role decode (w3, w4) sharing --kv-secret-file, and two
# kvr-frontend (--forward tokens and --forward body).
#  1. a short prompt stays local: no prefill leg (the prefill workers serve nothing), path local;
#  2. a long prompt goes remote: the prefill worker serves one request, a decoder counts a pull,
#     the stream completes; path remote; the same with --forward body (chat);
#  3. client kv_transfer_params are dropped: a decoder would count a failed pull for them;
#  4. every router holds the same booking digest, and no booking stays after the requests;
#  5. both prefill workers SIGKILLed: long requests still complete (prefill leg failed, or the
#     routers' fallback), path fallback, nothing stays booked.
source "$(dirname "$0")/../lib/testenv.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../routerd/rd_lib.sh"
kvr_test_init frontend_disagg
kvr_need_bins kvr-worker kvr-frontend kvr-routerd
kvr_start_nats
BS=16
SECRET=$(kvr_cluster_secret)

declare -A WPORT RPORT
spawn_worker() { # id role
    WPORT[$1]=$(kvr_free_port)
    kvr_spawn "worker$1" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:${WPORT[$1]} \
        --nats "$NATS_URL" --namespace default --model m1 --id "$1" --speedup 50 \
        --block-size $BS --role "$2" --kv-secret-file "$SECRET" --kv-bytes-per-block 4096
}
spawn_worker 1 prefill
spawn_worker 2 prefill
spawn_worker 3 decode
spawn_worker 4 decode

raft=($(rd_raft_ports 3))
peers="1@${raft[0]},2@${raft[1]},3@${raft[2]}"
for i in 1 2 3; do
    RPORT[$i]=$(kvr_free_port)
    mkdir -p "$KVR_TMP/r$i"
    rd_start "router$i" "$i" "${RPORT[$i]}" "$KVR_TMP/r$i" --block-size $BS \
        --raft-addr "${raft[$((i - 1))]}" --peers "$peers" --cluster-secret-file "$SECRET" \
        --max-local-prefill 200 --max-prefill-queue 4
done
fport=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fport --nats "$NATS_URL" --id 7 \
    --router-mode kv --route-timeout 1s --route-tries 3 --block-size $BS
F=http://127.0.0.1:$fport
bport=$(kvr_free_port)
kvr_spawn feb "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$bport --nats "$NATS_URL" --id 8 \
    --router-mode kv --route-timeout 1s --route-tries 3 --block-size $BS --forward body
FB=http://127.0.0.1:$bport
kvr_wait_http "$F/health" 10
kvr_wait_http "$FB/health" 10
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${RPORT[$i]}/health" 20; done
rworkers() { rd_state "${RPORT[$1]}" | jq -e '[.workers[] | select(.up)] | length == 4' >/dev/null; }
for i in 1 2 3; do kvr_wait_for 20 rworkers $i || kvr_fail "router $i never saw 4 workers: $(rd_state "${RPORT[$i]}")"; done
# the frontend counts the workers it may choose itself: prefill workers are not among them
fworkers() { curl -s "$1/metrics" | awk '/^kvr_frontend_live_workers / {exit !($2==2)}'; }
kvr_wait_for 10 fworkers "$F" || kvr_fail "frontend never saw 2 decode workers: $(curl -s "$F/metrics" | grep -i live)"
kvr_wait_for 10 fworkers "$FB" || kvr_fail "body frontend never saw 2 decode workers"
ready() { [ "$(rd_q "${RPORT[1]}" .ready)" = true ] && [ -n "$(rd_common_leader "${RPORT[1]}" "${RPORT[2]}" "${RPORT[3]}")" ]; }
kvr_wait_for 20 ready || kvr_fail "no Raft leader"

wm() { curl -s "http://127.0.0.1:${WPORT[$1]}/metrics" | awk -v k="$2" '$1==k {s+=$2} END {printf "%d\n", s}'; }
served() { wm "$1" kvr_worker_requests_total; }
pulls() { echo $(( $(wm 3 "kvr_worker_kv_pulls_total{result=\"$1\"}") + $(wm 4 "kvr_worker_kv_pulls_total{result=\"$1\"}") )); }
fm() { curl -s "$1/metrics" | awk -v k="$2" '$1==k {s+=$2} END {printf "%d\n", s}'; }
path() { fm "${2:-$F}" "kvr_frontend_disagg_requests_total{path=\"$1\"}"; }
bookings() { rd_q "${RPORT[$1]}" .bookings; }
no_bookings() { local i; for i in "$@"; do [ "$(bookings "$i")" = 0 ] || return 1; done; }
same_digest() {
    local d1
    d1=$(rd_q "${RPORT[$1]}" .raft.fsm_digest)
    [ -n "$d1" ] && [ "$d1" != null ] || return 1
    for i in "${@:2}"; do [ "$(rd_q "${RPORT[$i]}" .raft.fsm_digest)" = "$d1" ] || return 1; done
}
# stream PROMPT N [FRONTEND]: a streamed completion; prints its text tokens' count
stream() {
    local out
    out=$(curl -s --max-time 30 "${3:-$F}/v1/completions" \
        -d "{\"model\":\"m1\",\"prompt\":\"$1\",\"max_tokens\":$2,\"stream\":true}")
    [ "$(tail -n 1 <<<"$out")" = "data: [DONE]" ] || { echo "incomplete: $(tail -c 300 <<<"$out")" >&2; return 1; }
    grep -c '"text"' <<<"$out"
}
LONG=""
for i in $(seq 1 60); do LONG+="word$i alpha beta gamma delta "; done # a few hundred tokens

# 1. a short prompt stays on its decode worker
n=$(stream "hi there" 4) || kvr_fail "short request failed"
kvr_assert_eq "$(( $(served 1) + $(served 2) ))" 0 "short prompt: no prefill leg"
kvr_assert_eq "$(path local)" 1 "short prompt: path local"
kvr_assert_eq "$(( $(served 3) + $(served 4) ))" 1 "short prompt: served by a decoder"

# 2. a long prompt goes remote: prefill leg on a prefill worker, then a pull on the decoder
n=$(stream "one $LONG" 8) || kvr_fail "long request failed"
kvr_assert_eq "$(( $(served 1) + $(served 2) ))" 1 "long prompt: one prefill leg"
kvr_assert_eq "$(path remote)" 1 "long prompt: path remote"
kvr_assert_eq "$(pulls ok)" 1 "long prompt: the decoder pulled the blocks"
# more of them, the tokens frontend and the body frontend (chat) alike
for k in 2 3 4; do stream "p$k $LONG" 5 >/dev/null || kvr_fail "long request $k failed"; done
chat=$(curl -s --max-time 30 "$FB/v1/chat/completions" \
    -d "{\"model\":\"m1\",\"messages\":[{\"role\":\"user\",\"content\":\"chat $LONG\"}],\"max_completion_tokens\":6,\"stream\":true}")
[ "$(tail -n 1 <<<"$chat")" = "data: [DONE]" ] || kvr_fail "body-mode chat incomplete: $(tail -c 300 <<<"$chat")"
kvr_assert_eq "$(path remote "$FB")" 1 "body mode chat: path remote"
kvr_assert_eq "$(pulls ok)" 5 "five remote prefills pulled"

# 3. client kv_transfer_params never reach a worker (they would make a decoder pull from it)
bad='{"do_remote_prefill":true,"remote_block_ids":[1,2],"remote_engine_id":"e","remote_request_id":"r","remote_host":"127.0.0.1","remote_port":1}'
for body in "{\"model\":\"m1\",\"prompt\":\"hi\",\"max_tokens\":2,\"kv_transfer_params\":$bad}" \
    "{\"model\":\"m1\",\"prompt\":\"hi\",\"max_tokens\":2,\"kv_transfer_param\\u0073\":$bad}"; do
    r=$(curl -s --max-time 10 "$FB/v1/completions" -d "$body")
    kvr_assert_eq "$(jq -r .usage.completion_tokens <<<"$r")" 2 "client params request completes"
done
kvr_assert_eq "$(( $(pulls failed) + $(pulls invalid) + $(pulls refused) ))" 0 "client kv_transfer_params dropped"

# 4. the same pairs on every router; nothing stays booked
kvr_wait_for 10 no_bookings 1 2 3 || kvr_fail "bookings left: $(bookings 1) $(bookings 2) $(bookings 3)"
kvr_wait_for 10 same_digest 1 2 3 || kvr_fail "routers' FSM digests differ"
# concurrent long requests: pairs booked while others are in flight
pids=()
for k in $(seq 1 8); do
    stream "c$k $LONG" 6 >/dev/null &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || kvr_fail "a concurrent request failed"; done
kvr_wait_for 10 no_bookings 1 2 3 || kvr_fail "bookings left after the burst: $(bookings 1) $(bookings 2) $(bookings 3)"
kvr_wait_for 10 same_digest 1 2 3 || kvr_fail "routers' FSM digests differ after the burst"
kvr_log "paths: remote=$(path remote) local=$(path local) fallback=$(path fallback)"

# 5. the prefill workers die: requests still complete
fb0=$(path fallback)
kvr_kill9 worker1
kvr_kill9 worker2
for k in 1 2 3; do stream "dead$k $LONG" 5 >/dev/null || kvr_fail "request $k after the prefill workers died"; done
(( $(path fallback) >= fb0 + 3 )) || kvr_fail "fallback not counted: $(path fallback) (was $fb0)"
down() { rd_state "${RPORT[1]}" | jq -e '[.workers[] | select(.up)] | length == 2' >/dev/null; }
kvr_wait_for 20 down || kvr_fail "routers never saw the prefill workers go"
stream "after $LONG" 5 >/dev/null || kvr_fail "request after the routers saw the prefill workers go"
kvr_wait_for 10 no_bookings 1 2 3 || kvr_fail "bookings left at the end"
kvr_wait_for 10 same_digest 1 2 3 || kvr_fail "routers' FSM digests differ at the end"
kvr_pass
