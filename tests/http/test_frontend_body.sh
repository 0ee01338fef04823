#!/usr/bin/env bash
# Bounded work per request on a real frontend (issue 18, defect 3): the default body limit is
# refused from the headers (413), and even with a big --max-body a body of millions of tiny
# JSON values (a token-array prompt far over the bound) is refused before a cJSON tree is
# built: fast, and without the ~40x-the-body peak RSS it used to cost.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init http_frontend_body
kvr_start_nats
P1=$(kvr_free_port)
P2=$(kvr_free_port)
kvr_spawn fe1 "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$P1 --nats "$NATS_URL" --id 7 \
    --router-mode round-robin
kvr_spawn fe2 "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$P2 --nats "$NATS_URL" --id 8 \
    --router-mode round-robin --max-body 16MiB
kvr_wait_http "http://127.0.0.1:$P1/health" 10
kvr_wait_http "http://127.0.0.1:$P2/health" 10

python3 -c "import sys; sys.stdout.write('{\"model\":\"m1\",\"prompt\":[' + ','.join(['1']*(7<<20)) + ']}')" >"$KVR_TMP/toks.json"
post() { curl -s --max-time 30 -o "$KVR_TMP/out" -w '%{http_code}' -X POST \
    -H 'Content-Type: application/json' --data-binary @"$KVR_TMP/toks.json" "$1/v1/completions"; }

kvr_assert_eq "$(post "http://127.0.0.1:$P1")" 413 "14 MiB body, default --max-body"
pid=$(kvr_pid fe2)
rss0=$(awk '/VmHWM/{print $2}' /proc/"$pid"/status)
t0=$(date +%s%N)
kvr_assert_eq "$(post "http://127.0.0.1:$P2")" 400 "7Mi-token prompt under --max-body 16MiB"
ms=$((($(date +%s%N) - t0) / 1000000))
rss1=$(awk '/VmHWM/{print $2}' /proc/"$pid"/status)
grep -q 'too many JSON values' "$KVR_TMP/out" || kvr_fail "message: $(cat "$KVR_TMP/out")"
kvr_log "7Mi-token prompt: ${ms} ms, peak RSS ${rss0} -> ${rss1} kB"
[ "$ms" -lt 3000 ] || kvr_fail "took ${ms} ms"
[ $((rss1 - rss0)) -lt 65536 ] || kvr_fail "peak RSS grew from ${rss0} to ${rss1} kB"
kvr_assert_eq "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$P2/health")" 200 "health"
kvr_pass
