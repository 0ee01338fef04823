#!/bin/bash
# frontend_pools: rolling update across namespaces. --namespace-prefix P with P-aaaa1111
# (3 workers) and P-bbbb2222 (1 worker): traffic splits about 3:1 (pool chosen with probability
# proportional to live instances); when the first pool is gone, everything goes to the second
# with no configuration change. Workers of namespace "Q" are never used.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init frontend_pools
kvr_need_bins kvr-worker kvr-frontend
kvr_start_nats
declare -A WPORT
spawn_worker() { # id ns
    local p
    p=$(kvr_free_port)
    WPORT[$1]=$p
    kvr_spawn "worker$1" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$p --nats "$NATS_URL" \
        --namespace "$2" --model m1 --id "$1" --speedup 100
}
spawn_worker 1 P-aaaa1111
spawn_worker 2 P-aaaa1111
spawn_worker 3 P-aaaa1111
spawn_worker 4 P-bbbb2222
spawn_worker 5 Q
fport=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fport --nats "$NATS_URL" --id 3 \
    --namespace-prefix P --router-mode least-loaded
F=http://127.0.0.1:$fport
kvr_wait_http "$F/health" 10
for i in 1 2 3 4 5; do kvr_wait_http "http://127.0.0.1:${WPORT[$i]}/health" 10; done
live_is() { curl -s "$F/metrics" | awk -v n="$1" '/^kvr_frontend_live_workers / {f=1; ok=($2+0==n)} END {exit !(f && ok)}'; }
live4() { live_is 4; }
kvr_wait_for 10 live4 || kvr_fail "frontend never saw exactly 4 workers: $(curl -s "$F/metrics" | grep live_workers)"

PROMPT="rolling update probe prompt"
served() { # worker id → requests it accepted
    curl -s "http://127.0.0.1:${WPORT[$1]}/metrics" | awk '/^kvr_worker_requests_total/ {printf "%d\n", $2}'
}
send() { # N requests, 8 at a time; prints the number of 200s
    seq "$1" | xargs -P 8 -I{} curl -s -o /dev/null -w '%{http_code}\n' \
        -d "{\"model\":\"m1\",\"prompt\":\"$PROMPT\",\"max_tokens\":1}" "$F/v1/completions" | grep -c '^200$'
}
N=240
ok=$(send $N)
kvr_assert_eq "$ok" $N "all requests served"
a=$(( $(served 1) + $(served 2) + $(served 3) ))
b=$(served 4)
q=$(served 5)
kvr_log "split: pool a=$a pool b=$b Q=$q"
kvr_assert_eq $((a + b)) $N "every request served by pool a or b"
kvr_assert_eq "$q" 0 "namespace Q never used"
# expected a = 180 (3:1); 4.5 sigma ≈ 30
[ "$a" -ge 150 ] && [ "$a" -le 210 ] || kvr_fail "split not ~3:1: a=$a b=$b"

# the old pool goes away: everything moves to P-bbbb2222
kvr_kill9 worker1
kvr_kill9 worker2
kvr_kill9 worker3
live1() { live_is 1; }
kvr_wait_for 10 live1 || kvr_fail "dead workers never expired"
b0=$(served 4)
ok=$(send 60)
kvr_assert_eq "$ok" 60 "served after the old pool left"
kvr_assert_eq $(( $(served 4) - b0 )) 60 "all traffic on the new pool"
kvr_pass
