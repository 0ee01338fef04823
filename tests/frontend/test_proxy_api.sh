#!/bin/bash
# frontend_proxy_api: the /proxy/ model-switching API (issue 16 item 4) with real processes:
# nats-server, three kvr-routerd in one Raft group with --pools-file and the local exec scaler
# (scripts/kvr-local-scaler starting and stopping real kvr-worker processes), and kvr-frontend
# with a model catalogue and --proxy-api-key-file.
#   - no key or a wrong key: 401; the right one: version and the catalogue (available);
#   - start wakes a pool (kvr.pools.set waking through Raft): a worker appears, running shows it;
#   - switch to another model puts the first to sleep (its worker stops); a request for the new
#     one wakes it and completes;
#   - stop sleeps it (no worker left); an unknown model_id: 404.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/../routerd/rd_lib.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
kvr_test_init frontend_proxy_api
kvr_need_bins kvr-worker kvr-frontend kvr-routerd
kvr_start_nats
read -r A1 A2 A3 <<<"$(rd_raft_ports 3)"
[ -n "$A3" ] || kvr_fail "no free raft ports"
PEERS="1@$A1,2@$A2,3@$A3"
declare -A HP RA
HP[1]=$(kvr_free_port); HP[2]=$(kvr_free_port); HP[3]=$(kvr_free_port)
RA[1]=$A1; RA[2]=$A2; RA[3]=$A3
rd_secret "$KVR_TMP/secret"
cat >"$KVR_TMP/pools.json" <<'JSON'
{"pools": [{"namespace": "default", "model": "m1", "target": "m1-workers"},
           {"namespace": "default", "model": "m2", "target": "m2-workers"}]}
JSON
cat >"$KVR_TMP/catalogue.json" <<'JSON'
{"models": [{"id": "model-a", "namespace": "default", "model": "m1",
             "engine_args": {"max_model_len": 4096}},
            {"id": "model-b", "model": "m2"}]}
JSON
(umask 077 && echo "proxy-secret-$$" >"$KVR_TMP/proxy.key")
KEY="proxy-secret-$$"
export KVR_SCALER_DIR="$KVR_TMP/scaler" KVR_SCALER_NATS="$NATS_URL" KVR_WORKER_BIN="$KVR_BIN/kvr-worker"
# --speedup 5: a 800-token stream lasts ~3 s, long enough to be in flight across a switch
export KVR_SCALER_ARGS="--speedup 5"
mkdir -p "$KVR_SCALER_DIR"
# the workers the scaler started are ours to clean up too: first the routers (no new scaler
# call), then each pool's lock (a call still running finishes and records its worker), then
# the workers
stop_workers() {
    local i pf lk
    for i in 1 2 3; do kvr_kill9 "r$i" 2>/dev/null; done
    for lk in "$KVR_SCALER_DIR"/pool-*/lock; do
        [ -e "$lk" ] && flock -w 15 "$lk" true
    done
    for pf in "$KVR_SCALER_DIR"/pool-*/*.pid; do
        [ -e "$pf" ] && kill -KILL "$(cat "$pf")" 2>/dev/null
    done
    return 0
}
trap 'rc=$?; stop_workers; (exit $rc); kvr_cleanup' EXIT
pdir() { echo "$KVR_SCALER_DIR/pool-$(printf '%s/%s' default "$1" | cksum | cut -d' ' -f1)"; }
workers_of() { # live scaler-started workers of model $1
    local n=0 pf
    for pf in "$(pdir "$1")"/*.pid; do
        [ -e "$pf" ] && kill -0 "$(cat "$pf")" 2>/dev/null && n=$((n + 1))
    done
    echo $n
}
pool() { rd_q "$1" ".pools[] | select(.model == \"$2\") | .$3"; }
all_pool() {
    local i
    for i in 1 2 3; do [ "$(pool "${HP[$i]}" "$1" state)" = "$2" ] || return 1; done
}
for i in 1 2 3; do
    rd_start "r$i" "$i" "${HP[$i]}" "$KVR_TMP/r$i" --raft-addr "${RA[$i]}" --peers "$PEERS" \
        --cluster-secret-file "$KVR_TMP/secret" --heartbeat-misses 3 \
        --pools-file "$KVR_TMP/pools.json" --scaler "exec:$SRC/scripts/kvr-local-scaler" \
        --idle-after 600s --wake-timeout 30s --scaler-timeout 20s
done
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 20; done
[ -n "$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")" ] || kvr_fail "no leader"
kvr_wait_for 10 all_pool m1 sleeping || kvr_fail "pool m1 not sleeping: $(rd_q "${HP[1]}" .pools)"
kvr_wait_for 10 all_pool m2 sleeping || kvr_fail "pool m2 not sleeping: $(rd_q "${HP[1]}" .pools)"

# --- the routers' side alone: kvr.pools.list, and kvr.pools.set's errors (nothing changes)
NREQ="/usr/bin/python3 $HERE/nats_request.py $NATS_URL"
out=$($NREQ kvr.pools.list '{}') || kvr_fail "kvr.pools.list: $out"
kvr_assert_eq "$(jq -c '[.[] | [.namespace, .model, .target, .state, .live_workers]]' <<<"$out")" \
    '[["default","m1","m1-workers","sleeping",0],["default","m2","m2-workers","sleeping",0]]' "kvr.pools.list"
set_err() { # set_err PAYLOAD WANT_ERROR_SUBSTRING
    local o
    o=$($NREQ kvr.pools.set "$1") || kvr_fail "kvr.pools.set $1: $o"
    [ "$(jq -r .ok <<<"$o")" = false ] && [[ "$(jq -r .error <<<"$o")" == *"$2"* ]] ||
        kvr_fail "kvr.pools.set $1: want an error with '$2', got $o"
}
set_err 'not json' 'want {'
set_err '{"namespace":"default","model":"m1","state":"awake"}' 'want sleeping or waking'
set_err '{"namespace":"default","model":"m1","state":7}' 'want {'
set_err '{"namespace":"default","model":"m9","state":"waking"}' 'no such pool'
set_err '{"namespace":"other","model":"m1","state":"waking"}' 'no such pool'
set_err "{\"namespace\":\"default\",\"model\":\"m1\",\"state\":\"waking\",\"pad\":\"$(head -c 1100 /dev/zero | tr '\0' x)\"}" \
    'over 1024 bytes'
sleep 0.5
kvr_assert_eq "$(pool "${HP[2]}" m1 state)" sleeping "m1 after refused sets"
[ ! -e "$KVR_SCALER_DIR/calls.log" ] || kvr_fail "a refused set ran the scaler: $(cat "$KVR_SCALER_DIR/calls.log")"

fp=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fp --nats "$NATS_URL" --id 7 \
    --model-catalogue "$KVR_TMP/catalogue.json" --proxy-api-key-file "$KVR_TMP/proxy.key"
F=http://127.0.0.1:$fp
kvr_wait_http "$F/health" 10
# px METHOD PATH [BODY]: "STATUS BODY" with the key
px() {
    local a=(-s --max-time 10 -o "$KVR_TMP/px.out" -w '%{http_code}' -H "Authorization: Bearer $KEY")
    [ -n "${3:-}" ] && a+=(-H 'Content-Type: application/json' -d "$3")
    local st
    st=$(curl "${a[@]}" -X "$1" "$F$2")
    echo "$st $(cat "$KVR_TMP/px.out")"
}
expect() { # expect STATUS "STATUS BODY"
    [ "${2%% *}" = "$1" ] || kvr_fail "want $1, got: $2"
}
metric() { curl -s "$F/metrics" | awk -v k="$1" '$1==k {print $2}'; }

# --- auth: no key, a wrong key, a key in the wrong scheme
st=$(curl -s -o /dev/null -w '%{http_code}' "$F/proxy/models/available")
kvr_assert_eq "$st" 401 "no key"
st=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer wrong-$KEY" "$F/proxy/version")
kvr_assert_eq "$st" 401 "wrong key"
st=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Basic $KEY" -d '{"model_id":"model-a"}' \
    "$F/proxy/operations/start")
kvr_assert_eq "$st" 401 "wrong scheme"
kvr_assert_eq "$(workers_of m1)" 0 "no worker started by an unauthorized call"

# --- version, available
r=$(px GET /proxy/version)
expect 200 "$r"
kvr_assert_eq "$(jq -r .service <<<"${r#* }")" kvroute "version service"
r=$(px GET /proxy/models/available)
expect 200 "$r"
kvr_assert_eq "$(jq -c '[.models[] | [.id, .namespace, .model]]' <<<"${r#* }")" \
    '[["model-a","default","m1"],["model-b","default","m2"]]' "available"
kvr_assert_eq "$(jq -c '.models[0].engine_args' <<<"${r#* }")" '{"max_model_len":4096}' "engine_args"
r=$(px GET /proxy/models/running)
expect 200 "$r"
kvr_assert_eq "$(jq -c '.models' <<<"${r#* }")" '[]' "nothing running at first"

# --- unknown id, bad body
expect 404 "$(px POST /proxy/models/switch '{"model_id":"nope"}')"
expect 404 "$(px POST /proxy/operations/start '{"model_id":"nope"}')"
expect 400 "$(px POST /proxy/operations/stop '{"id":"model-a"}')"
expect 405 "$(px GET /proxy/operations/start)"

# --- start wakes a pool: a worker appears, running shows it
r=$(px POST /proxy/operations/start '{"model_id":"model-a"}')
expect 202 "$r"
kvr_assert_eq "$(jq -r .pool.state <<<"${r#* }")" waking "start: pool state"
kvr_assert_eq "$(jq -r .pool.mode <<<"${r#* }")" raft "start: agreed through Raft"
kvr_wait_for 20 all_pool m1 awake || kvr_fail "start did not wake m1: $(rd_q "${HP[1]}" .pools)"
kvr_assert_eq "$(workers_of m1)" 1 "m1 worker after start"
running_ids() { px GET /proxy/models/running | cut -d' ' -f2- | jq -c '[.models[].id]'; }
kvr_assert_eq "$(running_ids)" '["model-a"]' "running after start"
# a second start changes nothing
r=$(px POST /proxy/operations/start '{"model_id":"model-a"}')
expect 202 "$r"
kvr_assert_eq "$(jq -r .pool.unchanged <<<"${r#* }")" true "second start unchanged"

# --- switch to model-b with a model-a stream in flight: model-a sleeps (its worker stops
# once the stream is done: kvr-worker drains on SIGTERM), a request for m2 wakes it
/usr/bin/python3 "$HERE/hold_client.py" one "$F/v1/completions" \
    '{"model":"m1","prompt":"in flight across a switch","max_tokens":800,"stream":true}' \
    >"$KVR_TMP/inflight.json" &
ipid=$!
kvr_wait_for 5 bash -c "[ \"\$(curl -s 'http://127.0.0.1:${HP[1]}/v1/state' | jq '[.pools[] | select(.model == \"m1\")][0].bookings')\" = 1 ]" ||
    kvr_fail "the m1 stream was not booked"
r=$(px POST /proxy/models/switch '{"model_id":"model-b"}')
expect 202 "$r"
kvr_assert_eq "$(jq -c '[.stopped[] | [.model_id, .ok, .state]]' <<<"${r#* }")" \
    '[["model-a",true,"stopping"]]' "switch stopped model-a"
kvr_assert_eq "$(jq -r .state <<<"${r#* }")" sleeping "switch: target state"
wait $ipid || kvr_fail "in-flight stream client failed"
jq -e '.status == 200 and .done and .error == null and .events > 10' "$KVR_TMP/inflight.json" >/dev/null ||
    kvr_fail "the stream in flight across the switch did not complete: $(cat "$KVR_TMP/inflight.json")"
kvr_log "stream in flight across the switch: $(jq '.events' "$KVR_TMP/inflight.json") events, $(jq '.elapsed_ms | floor' "$KVR_TMP/inflight.json") ms"
kvr_wait_for 20 all_pool m1 sleeping || kvr_fail "switch: m1 did not sleep: $(rd_q "${HP[1]}" .pools)"
kvr_wait_for 10 bash -c "[ \"\$(ls $(pdir m1)/*.pid 2>/dev/null | wc -l)\" = 0 ]" ||
    kvr_fail "switch: m1 worker not stopped: $(cat "$KVR_SCALER_DIR/calls.log")"
kvr_assert_eq "$(workers_of m2)" 0 "switch does not wake the new model by itself"
out=$(curl -s --max-time 30 -D "$KVR_TMP/h.txt" -d '{"model":"m2","prompt":"after a switch","max_tokens":4}' \
    "$F/v1/completions")
jq -e '.choices[0].text' <<<"$out" >/dev/null || kvr_fail "request for m2 after the switch: $out"
grep -qi '^x-kvroute-cold-start: 1' "$KVR_TMP/h.txt" || kvr_fail "no cold start header: $(cat "$KVR_TMP/h.txt")"
kvr_assert_eq "$(workers_of m2)" 1 "m2 worker after the request"
kvr_wait_for 10 all_pool m2 awake || kvr_fail "m2 not awake everywhere"
kvr_assert_eq "$(running_ids)" '["model-b"]' "running after the switch"

# --- stop sleeps it
r=$(px POST /proxy/operations/stop '{"model_id":"model-b"}')
expect 202 "$r"
kvr_wait_for 20 all_pool m2 sleeping || kvr_fail "stop: m2 did not sleep: $(rd_q "${HP[1]}" .pools)"
kvr_wait_for 10 bash -c "[ \"\$(ls $KVR_SCALER_DIR/pool-*/*.pid 2>/dev/null | wc -l)\" = 0 ]" ||
    kvr_fail "stop: worker not stopped: $(cat "$KVR_SCALER_DIR/calls.log")"
kvr_assert_eq "$(running_ids)" '[]' "running after stop"

# --- metrics
kvr_assert_eq "$(metric 'kvr_frontend_proxy_requests_total{op="switch"}')" 2 "switch calls counted"
kvr_assert_eq "$(metric 'kvr_frontend_proxy_failures_total{op="switch"}')" 1 "switch failures (404)"
kvr_assert_eq "$(metric 'kvr_frontend_proxy_pool_sets_total{op="start"}')" 2 "kvr.pools.set sent by start"
kvr_pass
