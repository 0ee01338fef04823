#!/usr/bin/env bash
# Bounded work per request on a real router (issue 18, defect 3): /v1/match token arrays are
# parsed as a stream into a bounded array (--max-request-tokens), the body limit follows from
# it (413 before reading, by Content-Length or by chunk header), and a 16 MiB request costs the
# router neither memory nor loop time (/health answers while it is sent; peak RSS stays small).
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/../routerd/rd_lib.sh"
kvr_test_init http_router_body
kvr_start_nats
P=$(kvr_free_port)
rd_token >/dev/null # POSTs need the admin token (RD_AUTH)
kvr_spawn r1 "$KVR_BIN/kvr-routerd" --id 1 --nats "$NATS_URL" --http "127.0.0.1:$P" \
    --data-dir "$KVR_TMP/r1" --max-request-tokens 1000 --admin-token-file "$(rd_token)"
kvr_wait_http "http://127.0.0.1:$P/ready" 15
URL="http://127.0.0.1:$P/v1/match"

toks() { # toks N [SEP]: {"token_ids":[0,1,...N-1]}
    python3 -c "import sys; n=int(sys.argv[1]); s=sys.argv[2]
sys.stdout.write('{\"model\":\"m\\\\u00e9\",\"x\":{\"y\":[1,2.5e3,null,true,\"z\"]},\"token_ids\":[' + s.join(str(i) for i in range(n)) + ']}')" "$1" "${2:-,}"
}
post() { curl -s --max-time 20 -o "$KVR_TMP/out" -w '%{http_code}' -X POST "${RD_AUTH[@]}" "$@" "$URL"; }

toks 1000 >"$KVR_TMP/ok.json"
kvr_assert_eq "$(post --data-binary @"$KVR_TMP/ok.json")" 200 "1000 tokens"
kvr_assert_eq "$(jq -c '[.block_size,.blocks]' "$KVR_TMP/out")" '[64,15]' "full blocks of 1000 tokens"
toks 1000 ' ,  ' >"$KVR_TMP/ws.json"
kvr_assert_eq "$(post --data-binary @"$KVR_TMP/ws.json")" 200 "1000 tokens with whitespace"

toks 1001 >"$KVR_TMP/over.json"
kvr_assert_eq "$(post --data-binary @"$KVR_TMP/over.json")" 400 "1001 tokens"
grep -q 'more than 1000 token_ids' "$KVR_TMP/out" || kvr_fail "message: $(cat "$KVR_TMP/out")"
for bad in '{"token_ids":[1,-2]}' '{"token_ids":[4294967296]}' '{"token_ids":[1.5]}' \
    '{"token_ids":"x"}' '{"token_ids":[1],"token_ids":[2]}' '{"token_ids":[1]} x' '[1]' \
    '{"model":1,"token_ids":[1]}' '{"token_ids":[1' '{"x":[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]],"token_ids":[1]}'; do
    kvr_assert_eq "$(post --data-binary "$bad")" 400 "bad body $bad"
done

# Far over the limit: refused from the headers, whole or chunked, and cheap.
python3 -c "import sys; sys.stdout.write('{\"token_ids\":[' + ','.join(['0']*(8<<20)) + ']}')" >"$KVR_TMP/big.json"
pid=$(kvr_pid r1)
rss0=$(awk '/VmHWM/{print $2}' /proc/"$pid"/status)
t0=$(date +%s%N)
kvr_assert_eq "$(post --data-binary @"$KVR_TMP/big.json")" 413 "16 MiB body"
kvr_assert_eq "$(post -H 'Transfer-Encoding: chunked' --data-binary @"$KVR_TMP/big.json")" 413 \
    "16 MiB chunked body"
ms=$((($(date +%s%N) - t0) / 1000000))
rss1=$(awk '/VmHWM/{print $2}' /proc/"$pid"/status)
kvr_log "two 16 MiB requests: ${ms} ms, peak RSS ${rss0} -> ${rss1} kB"
[ "$ms" -lt 5000 ] || kvr_fail "16 MiB requests took ${ms} ms"
[ $((rss1 - rss0)) -lt 32768 ] || kvr_fail "peak RSS grew from ${rss0} to ${rss1} kB"
# Just under the body limit but over the token bound: refused when the array crosses it.
python3 -c "import sys; sys.stdout.write('{\"token_ids\":[' + ','.join(['0']*40000) + ']}')" >"$KVR_TMP/many.json"
kvr_assert_eq "$(post --data-binary @"$KVR_TMP/many.json")" 400 "40000 tokens in 80 KB"
kvr_assert_eq "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$P/health")" 200 "health"
kvr_assert_eq "$(post --data-binary @"$KVR_TMP/ok.json")" 200 "still serving"

# Defect 14: a NATS route request claiming ~2^32 tokens wrapped the block count; it is refused.
rd_beat beat1 ns1 1
kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:$P/v1/state | jq '.workers | length')\" -ge 1 ]" ||
    kvr_fail "worker 1 not seen"
route=$(printf 'route m1 ns1 7 320 rid-big 4294967295\n' | "$PUB" --nats "$NATS_URL" | grep '^route')
case "$route" in "route ok=0 error=too many tokens"*) ;; *) kvr_fail "2^32-1 tokens: $route" ;; esac
route=$(printf 'route m1 ns1 7 320 rid-ok\n' | "$PUB" --nats "$NATS_URL" | grep '^route')
case "$route" in "route ok=1 worker=1 "*) ;; *) kvr_fail "normal route: $route" ;; esac
kvr_pass
