#!/usr/bin/env bash
# Scale-to-zero pools (docs/DESIGN.md 13) with three routers in one Raft group and the local
# exec scaler (scripts/kvr-local-scaler starting and stopping real kvr-worker processes):
# - a pool with no worker registers as sleeping on every router; a route request wakes it
#   ("pool waking" reply), the leader's scaler starts one worker, its heartbeat makes the pool
#   awake everywhere and the request is booked;
# - idle for --idle-after with nothing in flight: the leader stops the worker (scaler called
#   with 0) and the pool sleeps on every router;
# - the leader SIGKILLed while a pool is waking (its scaler slow): the new leader finishes the
#   wake and exactly one worker serves (no duplicate scale-up);
# - a scaler that fails: the wake times out after --wake-timeout and the pool sleeps again.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_pools
kvr_need_bins kvr-routerd kvr-worker kvr-test-pub
kvr_start_nats
read -r A1 A2 A3 <<<"$(rd_raft_ports 3)"
[ -n "$A3" ] || kvr_fail "no free raft ports"
PEERS="1@$A1,2@$A2,3@$A3"
declare -A HP RA
HP[1]=$(kvr_free_port); HP[2]=$(kvr_free_port); HP[3]=$(kvr_free_port)
RA[1]=$A1; RA[2]=$A2; RA[3]=$A3
rd_secret "$KVR_TMP/secret"
SRC=$(cd "$(dirname "$0")/../.." && pwd)
cat >"$KVR_TMP/pools.json" <<'JSON'
{"pools": [{"namespace": "ns1", "model": "m1", "target": "m1-workers"},
           {"namespace": "ns1", "model": "broken", "target": "broken-workers"}]}
JSON
export KVR_SCALER_DIR="$KVR_TMP/scaler" KVR_SCALER_NATS="$NATS_URL" KVR_WORKER_BIN="$KVR_BIN/kvr-worker"
export KVR_SCALER_FAIL_MODELS=broken KVR_SCALER_ARGS="--block-size 64"
mkdir -p "$KVR_SCALER_DIR"
start() {
    rd_start "r$1" "$1" "${HP[$1]}" "$KVR_TMP/r$1" --raft-addr "${RA[$1]}" --peers "$PEERS" \
        --cluster-secret-file "$KVR_TMP/secret" --heartbeat-misses 3 \
        --pools-file "$KVR_TMP/pools.json" --scaler "exec:$SRC/scripts/kvr-local-scaler" \
        --idle-after 4s --wake-timeout 6s --scaler-timeout 20s
}
# the workers the scaler started are ours to clean up too: first the routers (no new scaler
# call), then each pool's lock (a call still running, e.g. the killed leader's, finishes and
# records its worker), then the workers
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
pool() { rd_q "$1" ".pools[] | select(.model == \"$2\") | .$3"; }
all_pool() {
    local i
    for i in 1 2 3; do [ "$(pool "${HP[$i]}" "$1" state)" = "$2" ] || return 1; done
}
route() { printf 'route m1 ns1 %s 128 %s\n' "$1" "$2" | "$PUB" --nats "$NATS_URL" | grep '^route'; }
workers_running() {
    local n=0 pf
    for pf in "$KVR_SCALER_DIR"/pool-*/*.pid; do
        [ -e "$pf" ] && kill -0 "$(cat "$pf")" 2>/dev/null && n=$((n + 1))
    done
    echo $n
}

for i in 1 2 3; do start $i; done
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 20; done
L=$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")
[ -n "$L" ] || kvr_fail "no leader"
kvr_wait_for 10 all_pool m1 sleeping || kvr_fail "pool m1 not sleeping everywhere: $(pool "${HP[1]}" m1 state)"

# --- wake on demand
out=$(route 11 wake-1)
case "$out" in *"ok=0 error=pool waking"*) ;; *) kvr_fail "first request: $out" ;; esac
kvr_wait_for 20 all_pool m1 awake || kvr_fail "pool did not wake: $(rd_q "${HP[1]}" .pools)"
kvr_wait_for 10 bash -c "printf 'route m1 ns1 12 128 wake-2\n' | '$PUB' --nats '$NATS_URL' | grep -q 'route ok=1'" ||
    kvr_fail "no route after the wake: $(route 12 wake-3)"
kvr_assert_eq "$(workers_running)" 1 "workers after the wake"
kvr_assert_eq "$(grep -c ' ns1 m1 1$' "$KVR_SCALER_DIR/calls.log")" 1 "scale-up calls"
kvr_assert_eq "$(pool "${HP[2]}" m1 wakes)" 1 "wakes counted in the replicated state"

# --- idle: stopped and asleep everywhere (the free of the booking above first)
printf 'rev wake-2 free\n' | "$PUB" --nats "$NATS_URL" >/dev/null 2>&1
kvr_wait_for 20 all_pool m1 sleeping || kvr_fail "idle pool did not sleep: $(rd_q "${HP[1]}" .pools)"
kvr_wait_for 10 bash -c "[ \"\$(ls $KVR_SCALER_DIR/pool-*/*.pid 2>/dev/null | wc -l)\" = 0 ]" ||
    kvr_fail "worker not stopped: $(cat "$KVR_SCALER_DIR/calls.log")"
grep -q ' ns1 m1 0$' "$KVR_SCALER_DIR/calls.log" || kvr_fail "no scale-down call"

# --- the leader dies while the pool is waking: the new one finishes, one worker only
echo 2 >"$KVR_SCALER_DIR/delay"
L=$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")
route 13 wake-4 >/dev/null
kvr_wait_for 5 bash -c "tail -n 1 '$KVR_SCALER_DIR/calls.log' | grep -q ' ns1 m1 1\$'" ||
    kvr_fail "no scale-up started"
kvr_kill9 "r$L"
rm -f "$KVR_SCALER_DIR/delay"
rest=()
for i in 1 2 3; do [ "$i" != "$L" ] && rest+=("${HP[$i]}"); done
new_leader() {
    local a b
    a=$(rd_q "${rest[0]}" .raft.leader) b=$(rd_q "${rest[1]}" .raft.leader)
    [ -n "$a" ] && [ "$a" != 0 ] && [ "$a" != null ] && [ "$a" != "$L" ] && [ "$a" = "$b" ]
}
kvr_wait_for 15 new_leader || kvr_fail "no new leader"
NL=$(rd_q "${rest[0]}" .raft.leader)
ok() { for p in "${rest[@]}"; do [ "$(pool "$p" m1 state)" = awake ] || return 1; done; }
kvr_wait_for 30 ok || kvr_fail "the new leader did not finish the wake: $(rd_q "${rest[0]}" .pools)"
sleep 1
kvr_assert_eq "$(workers_running)" 1 "workers after a wake across a leader change"

# --- a failing scaler: the wake times out and the pool sleeps again
out=$(printf 'route broken ns1 14 128 broken-1\n' | "$PUB" --nats "$NATS_URL" | grep '^route')
case "$out" in *"pool waking"*) ;; *) kvr_fail "broken pool request: $out" ;; esac
b_ok() { for p in "${rest[@]}"; do [ "$(pool "$p" broken state)" = sleeping ] || return 1; done; }
kvr_wait_for 20 b_ok || kvr_fail "failed wake did not time out: $(rd_q "${rest[0]}" .pools)"
# the scaler's own attempts (5, with backoff) outlast the wake timeout; then it is counted
failed() {
    local m
    m=$(rd_metric "${HP[$NL]}" 'kvr_routerd_scale_operations_total{result="failed"}')
    [ "${m:-0}" -ge 1 ]
}
kvr_wait_for 20 failed || kvr_fail "failed scale operations not counted"
stop_workers
kvr_pass
