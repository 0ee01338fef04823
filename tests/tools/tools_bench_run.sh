#!/usr/bin/env bash
# kvr-bench run against a real 3-router cluster with a short slice of the Mooncake trace and a
# leader kill + restart: 0 failures, every JSON field written, plots drawn; then kvrctl down
# leaves nothing running. Also: bad trace input gets a clear error.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/lib.sh"
tools_init tools_bench_run

BENCH=$KVR_BIN/kvr-bench
TRACE=$KVR_SRC/data/mooncake_conversation_trace.jsonl.gz
[ -x "$BENCH" ] || kvr_fail "$BENCH is not built"
[ -f "$TRACE" ] || kvr_fail "$TRACE missing"

# Bad input first (needs no cluster).
out=$("$BENCH" run --trace "$KVR_TMP/none.jsonl" --url http://127.0.0.1:1 --json "$KVR_TMP/x.json" 2>&1) &&
    kvr_fail "run with a missing trace succeeded"
grep -q "none.jsonl" <<<"$out" || kvr_fail "missing-trace error does not name the file: $out"
printf '{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [0]}\n{"timestamp": "x"}\n' >"$KVR_TMP/bad.jsonl"
out=$("$BENCH" run --trace "$KVR_TMP/bad.jsonl" --url http://127.0.0.1:1 --json "$KVR_TMP/x.json" 2>&1) &&
    kvr_fail "run with a malformed trace succeeded"
grep -q "bad.jsonl" <<<"$out" || kvr_fail "malformed-trace error does not name the file: $out"
"$BENCH" run --trace "$TRACE" --json "$KVR_TMP/x.json" >/dev/null 2>&1; kvr_assert_eq $? 2 "missing --url exit status"

# Connection failures are counted as such, not hidden.
dead=$(kvr_free_port)
"$BENCH" run --trace "$TRACE" --url "http://127.0.0.1:$dead" --max-requests 3 --quiet --json "$KVR_TMP/dead.json" >/dev/null 2>&1 &&
    kvr_fail "run against a dead URL exited 0"
kvr_assert_eq "$(jq '.failures.connect' "$KVR_TMP/dead.json")" 3 "connect failures counted"

for b in kvr-routerd kvr-worker kvr-frontend; do
    [ -x "$KVR_BIN/$b" ] || tools_skip "$b not built yet: cluster replay part skipped (bad-input part passed)"
done

D=$KVR_TMP/c
out=$("$KVRCTL" up --dir "$D" --routers 3 --workers 2 --frontends 1 --speedup 20 2>&1) || kvr_fail "kvrctl up failed: $out"
URL=$(cluster_url "$D" frontend 1)
"$BENCH" run --trace "$TRACE" --url "$URL" --cluster "$D" --speedup 20 --duration 12 --max-output 32 \
    --kill-router-at 4 --restart-after 2 --kill-role leader --plot-dir "$KVR_TMP/plots" \
    --json "$KVR_TMP/run.json" >&2
rc=$?
cat "$KVR_TMP/run.json" >&2
[ -s "$KVR_TMP/run.json" ] || kvr_fail "no JSON written"
J=$KVR_TMP/run.json
num() { jq -e "($1 | type) == \"number\"" "$J" >/dev/null || kvr_fail "field $1 is not a number"; }
for f in .requests .completed .failed .ttft_ms.p50 .ttft_ms.p90 .ttft_ms.p99 .itl_ms.p50 .itl_ms.p99 \
    .e2e_ms.p50 .e2e_ms.p99 .output_tokens_per_s .prefix_hit_rate .failover.killed_router \
    .failover.killed_at_s .failover.ready_after_restart_ms .failover.failed_during; do
    num "$f"
done
jq -e '.requests > 0 and .completed == .requests' "$J" >/dev/null || kvr_fail "not every request completed"
kvr_assert_eq "$(jq .failed "$J")" 0 "failed requests"
kvr_assert_eq "$(jq .failover.failed_during "$J")" 0 "failed during failover"
kvr_assert_eq "$(jq .failover.digests_equal "$J")" true "digests equal"
jq -e '.prefix_hit_rate >= 0 and .prefix_hit_rate <= 1 and .output_tokens_per_s > 0' "$J" >/dev/null ||
    kvr_fail "hit rate / throughput out of range"
jq -e '.ttft_ms.p50 <= .ttft_ms.p90 and .ttft_ms.p90 <= .ttft_ms.p99' "$J" >/dev/null || kvr_fail "TTFT percentiles not ordered"
kvr_assert_eq "$rc" 0 "kvr-bench run exit status"
for p in ttft_over_time.png ttft_cdf.png; do
    [ -s "$KVR_TMP/plots/$p" ] || kvr_fail "plot $p missing"
done

pids=$(cluster_pids "$D")
"$KVRCTL" down --dir "$D" >&2 || kvr_fail "kvrctl down failed"
for pid in $pids; do ! pid_running "$pid" || kvr_fail "pid $pid still running after down"; done
kvr_pass
