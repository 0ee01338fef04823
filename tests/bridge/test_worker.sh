#!/usr/bin/env bash
# bridge_worker: the whole path with real processes and no stand-in written for the test:
# two kvr-worker --kv-events zmq (vLLM's ZMQ framing, replay socket, vllm:* metrics) -> one
# kvr-bridge each -> real nats-server -js -> 3 kvr-routerd in one Raft group. After traffic with
# evictions every router's index digest must equal what the two workers hold (/debug/cache);
# requests route to the worker that holds their prefix, with its overlap; a bridge SIGKILLed
# mid-stream and restarted loses nothing the worker can still replay; a worker SIGKILLed (its
# /metrics gone) expires in every router.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/../routerd/rd_lib.sh"
kvr_test_init bridge_worker
kvr_need_bins kvr-routerd kvr-bridge kvr-worker kvr-worker-probe
PROBE="$KVR_BIN/kvr-worker-probe"
kvr_start_nats
read -r A1 A2 A3 <<<"$(rd_raft_ports 3)"
[ -n "$A3" ] || kvr_fail "no free raft ports"
PEERS="1@$A1,2@$A2,3@$A3"
declare -A HP RA WP PUBP REPP
RA[1]=$A1; RA[2]=$A2; RA[3]=$A3
port() { rd_port_avoiding "$A1" "$A2" "$A3"; }
for i in 1 2 3; do HP[$i]=$(port); done
for w in 9 10; do WP[$w]=$(port); PUBP[$w]=$(port); REPP[$w]=$(port); done
rd_secret "$KVR_TMP/secret"
for i in 1 2 3; do
    rd_start "r$i" "$i" "${HP[$i]}" "$KVR_TMP/r$i" --raft-addr "${RA[$i]}" --peers "$PEERS" \
        --cluster-secret-file "$KVR_TMP/secret" --namespace bw --block-size 16 --log-level info
done
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 30; done
[ -n "$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")" ] || kvr_fail "no Raft leader"

start_worker() { # id
    kvr_spawn "w$1" "$KVR_BIN/kvr-worker" --listen "127.0.0.1:${WP[$1]}" --kv-events zmq \
        --zmq-endpoint "tcp://127.0.0.1:${PUBP[$1]}" \
        --zmq-replay-endpoint "tcp://127.0.0.1:${REPP[$1]}" --model sim --id "$1" \
        --block-size 16 --capacity-blocks 40 --speedup 50 ${LORA[$1]:-}
}
declare -A LORA
LORA[9]="--lora sql-lora --lora chat-lora" # listed in vllm:lora_requests_info, so in the heartbeat
start_bridge() { # id
    kvr_spawn "b$1" "$KVR_BIN/kvr-bridge" --engine-url "http://127.0.0.1:${WP[$1]}" \
        --zmq "tcp://127.0.0.1:${PUBP[$1]}" --replay "tcp://127.0.0.1:${REPP[$1]}" \
        --nats "$NATS_URL" --namespace bw --id "$1" --scrape-interval 100ms \
        --replay-timeout 2s --stats-interval 1s ${BROLE[$1]:-}
}
declare -A BROLE
BROLE[10]="--role decode" # a vLLM decode instance: the role travels in its heartbeats
for w in 9 10; do start_worker $w; done
for w in 9 10; do kvr_wait_http "http://127.0.0.1:${WP[$w]}/health" 10; done
for w in 9 10; do start_bridge $w; done
for i in 1 2 3; do rd_wait_workers_up "${HP[$i]}" 2 20 || kvr_fail "router $i: workers not up"; done
# LoRA adapters: the bridge's heartbeat lists what vllm:lora_requests_info names
hb=$("$PROBE" heartbeat --nats "$NATS_URL" --subject kvr.workers.bw.9) || kvr_fail "no heartbeat of worker 9"
jq -e '.loras == ["sql-lora","chat-lora"]' <<<"$hb" >/dev/null || kvr_fail "worker 9's heartbeat loras: $hb"
hb=$("$PROBE" heartbeat --nats "$NATS_URL" --subject kvr.workers.bw.10) || kvr_fail "no heartbeat of worker 10"
jq -e 'has("loras") | not' <<<"$hb" >/dev/null || kvr_fail "worker 10 lists adapters: $hb"
# --role: what the bridge's heartbeats say, and so what every router books it as
jq -e '.role == "decode"' <<<"$hb" >/dev/null || kvr_fail "worker 10's heartbeat role: $hb"
for i in 1 2 3; do
    roles=$(rd_q "${HP[$i]}" '[.workers[] | select(.id == 9 or .id == 10) | "\(.id)=\(.role)"] | sort | join(",")')
    [ "$roles" = "10=decode,9=both" ] || kvr_fail "router $i: worker roles $roles"
done

W() { echo "http://127.0.0.1:${WP[$1]}"; }
# prompts: a shared head per (worker, i % 3) and a tail per round, so blocks are reused and
# evicted (40 blocks of capacity)
traffic() { # worker round
    local pids=() i body
    for i in 0 1 2 3 4 5; do
        body="{\"prompt\":$(jq -cn --argjson w "$1" --argjson r "$2" --argjson i $i \
            '[range(0;64) | . + 7000 * ($i % 3) + 100000 * $w] + [range(0; 20 + $i * 13) | . + 90000 + $r * 1000 + $i * 100]'),\"max_tokens\":$((6 + i * 3))}"
        curl -s --max-time 30 -o /dev/null "$(W "$1")/v1/completions" -d "$body" &
        pids+=($!)
    done
    wait "${pids[@]}"
}
idle() { curl -s --max-time 5 "$(W "$1")/debug/cache" | jq -e '.busy == false and .used_blocks == 0' >/dev/null; }
want_digest() { # the index digest the two workers' caches give (a sum of per-pair mixes)
    local w d sum=0
    for w in 9 10; do
        curl -s --max-time 5 "$(W $w)/debug/cache" >"$KVR_TMP/cache$w.json"
        d=$("$PROBE" cache-digest --cache "$KVR_TMP/cache$w.json" --worker-id $w)
        sum=$(/usr/bin/python3 -c "print('%016x' % ((int('$sum', 16) + int('$d', 16)) % 2**64))")
    done
    echo "$sum"
}
same_everywhere() {
    want=$(want_digest)
    for i in 1 2 3; do
        got=$(rd_q "${HP[$i]}" .index.digest)
        [ "$got" = "$want" ] || { bad="router $i: $got, workers: $want"; return 1; }
    done
}
converge() { # what
    for w in 9 10; do kvr_wait_for 20 idle $w || kvr_fail "$1: worker $w not idle"; done
    kvr_wait_for 30 same_everywhere || kvr_fail "$1: index != worker caches ($bad)"
    kvr_log "ok: $1 (digest $want)"
}

both() { # round (a bare `wait` would wait for the spawned servers too)
    traffic 9 "$1" &
    local t=$!
    traffic 10 "$1"
    wait $t
}
both 1
both 2
converge "traffic with evictions"
[ "$(jq '.seq_hashes | length' "$KVR_TMP/cache9.json")" -gt 20 ] || kvr_fail "cache too small to mean anything"
[ "$(curl -s --max-time 5 "$(W 9)/metrics" | awk '$1 == "kvr_worker_kv_blocks_removed_total" {print $2}')" -gt 0 ] ||
    kvr_fail "no evictions"

# a prompt whose head worker 10 holds matches there on every router and routes there, with its
# overlap (4 blocks of 16); route once per prompt: a booking adds load that a second identical
# request would rightly weigh
rd_token >/dev/null
b10=$(jq -cn '{model: "sim", token_ids: ([range(0;64) | . + 7000 + 1000000] + [range(0;20) | . + 5])}')
b9=$(jq -cn '{model: "sim", token_ids: ([range(0;64) | . + 14000 + 900000] + [range(0;20) | . + 5])}')
for i in 1 2 3; do
    m=$(rd_post "${HP[$i]}" /v1/match --data "$b10" | jq -c .overlaps)
    [ "$(jq -r '.["10"] // 0' <<<"$m")" -ge 4 ] && [ "$(jq -r '.["9"] // 0' <<<"$m")" = 0 ] ||
        kvr_fail "router $i: match of a worker-10 prefix: $m"
done
r=$(rd_post "${HP[2]}" /v1/route --data "$b10")
[ "$(jq -r .worker_id <<<"$r")" = 10 ] && [ "$(jq -r .overlap_blocks <<<"$r")" -ge 4 ] ||
    kvr_fail "a worker-10 prefix routed as $r"
r=$(rd_post "${HP[3]}" /v1/route --data "$b9")
[ "$(jq -r .worker_id <<<"$r")" = 9 ] && [ "$(jq -r .overlap_blocks <<<"$r")" -ge 4 ] ||
    kvr_fail "a worker-9 prefix routed as $r"
kvr_log "ok: requests route to the worker holding their prefix: $r"

# the bridge dies mid-stream: the worker keeps publishing (PUB drops, its replay buffer keeps)
traffic 9 3 &
T=$!
sleep 0.3
kvr_kill9 b9
wait $T
traffic 9 4
start_bridge 9
converge "bridge SIGKILLed mid-stream and restarted: nothing lost that replay had"
# it got them by replay: the worker was asked again for batches it had published (a restarted
# bridge asks from seq 0 and re-applies; stores and removals are set operations)
awk '/msg="replay requested"/ { split($0, a, /from=| next=| oldest=/); f = a[2] + 0; n = a[3] + 0;
     if (n > f) ok = 1 } END { exit !ok }' "$KVR_TMP/w9.log" ||
    kvr_fail "the restarted bridge did not replay what it missed (worker 9's log)"

# a worker restart (seq back to 0, empty cache): the bridge clears it, then indexes the new one
kvr_kill9 w9
start_worker 9
kvr_wait_http "$(W 9)/health" 10
traffic 9 5
converge "worker restarted (seq from 0 again)"

# the engine is gone (no /metrics): no heartbeat, the worker expires in every router
kvr_kill9 w9
expired() {
    for i in 1 2 3; do
        [ "$(rd_q "${HP[$i]}" '[.workers[] | select(.id == 9 and .up)] | length')" = 0 ] || return 1
    done
}
kvr_wait_for 20 expired || kvr_fail "worker 9 did not expire after its engine died"
r=$(rd_post "${HP[1]}" /v1/route --data "$b9")
[ "$(jq -r .worker_id <<<"$r")" = 10 ] || kvr_fail "routed to a dead worker: $r"
kvr_log "ok: engine gone -> worker 9 expired, requests go to 10"
kvr_pass
