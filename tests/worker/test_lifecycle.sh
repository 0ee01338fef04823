#!/usr/bin/env bash
# worker_lifecycle: a disconnected client frees its sequence and KV references; SIGTERM drains
# running streams to their end (new requests get 503) and exits 0; a restarted worker
# announces a new started_ms.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init worker_lifecycle
kvr_start_nats
PROBE="$KVR_BIN/kvr-worker-probe"
port=$(kvr_free_port)
W="http://127.0.0.1:$port"
args=(--listen "127.0.0.1:$port" --nats "$NATS_URL" --namespace lc --model sim --id 5 --block-size 16 --speedup 1)
kvr_spawn worker "$KVR_BIN/kvr-worker" "${args[@]}"
kvr_wait_http "$W/health" 10
metric() { curl -s "$W/metrics" | awk -v n="$1" '$1 == n {print $2}'; }

# --- cancellation: a long stream whose client goes away after ~0.5 s (about 25 tokens)
prompt=$(jq -cn '[range(0;200) | . + 400]')
curl -s -N --max-time 0.6 "$W/v1/completions" -d "{\"prompt\":$prompt,\"max_tokens\":5000,\"stream\":true}" >"$KVR_TMP/cut.txt"
grep -q '"token_ids"' "$KVR_TMP/cut.txt" || kvr_fail "no tokens before the disconnect"
cancelled() { [ "$(metric kvr_worker_requests_cancelled_total)" = 1 ]; }
kvr_wait_for 5 cancelled || kvr_fail "disconnect did not cancel the request"
kvr_assert_eq "$(metric kvr_worker_running_seqs)" 0 "running after cancel"
kvr_assert_eq "$(metric kvr_worker_kv_blocks_used)" 0 "KV blocks referenced after cancel"
[ "$(metric kvr_worker_kv_blocks_cached)" -ge 12 ] || kvr_fail "the cancelled prompt's blocks should stay cached"

# --- restart announces a new started_ms
hb1=$("$PROBE" heartbeat --nats "$NATS_URL" --subject kvr.workers.lc.5 | jq -r .started_ms)
kvr_kill9 worker
kvr_spawn worker "$KVR_BIN/kvr-worker" "${args[@]}"
kvr_wait_http "$W/health" 10
hb2=$("$PROBE" heartbeat --nats "$NATS_URL" --subject kvr.workers.lc.5 | jq -r .started_ms)
[ "$hb2" -gt "$hb1" ] || kvr_fail "started_ms did not change across a restart ($hb1 -> $hb2)"

# --- SIGTERM drains: a 200-token stream (~5 s at speedup 1) started before the signal ends
# normally with [DONE]; requests during the drain get 503; the process exits 0. The stream is
# long so the drain checks run while it lasts even on a loaded machine (with 60 tokens, 1.5 s,
# a loaded run once found the worker already gone: health '000').
curl -s -N --max-time 30 "$W/v1/completions" -d '{"prompt":"drain me please","max_tokens":200,"stream":true}' >"$KVR_TMP/drain.txt" &
cpid=$!
streaming() { grep -q '^data: {' "$KVR_TMP/drain.txt"; }
kvr_wait_for 10 streaming || kvr_fail "the stream to drain never started"
kill -TERM "$(kvr_pid worker)"
draining() { [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$W/health")" = 503 ]; }
kvr_wait_for 5 draining || kvr_fail "worker did not start draining on SIGTERM"
kvr_assert_eq "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$W/v1/completions" -d '{"prompt":"late"}')" 503 "request during drain"
kvr_assert_eq "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$W/health")" 503 "health during drain"
wait $cpid
tail -c 14 "$KVR_TMP/drain.txt" | cmp -s - <(printf 'data: [DONE]\n\n') || kvr_fail "drained stream did not end with [DONE]"
n=$(sed -n 's/^data: //p' "$KVR_TMP/drain.txt" | grep -v '^\[DONE\]$' | jq -s '[.[] | .choices[0].token_ids[]] | length')
kvr_assert_eq "$n" 200 "tokens of the drained stream"
pid=$(kvr_pid worker)
exited() { ! kill -0 "$pid" 2>/dev/null; }
kvr_wait_for 5 exited || kvr_fail "worker still running 5 s after its drain"
wait "$pid"
kvr_assert_eq "$?" 0 "exit status after drain"
kvr_pass
