#!/usr/bin/env bash
# bench_epp_smoke: `kvr-bench epp` for 2 s with small numbers (3 routers in Raft, 2 workers,
# 300 requests/s open loop, 50 held streams), then checks the JSON: every request answered
# with no error, latencies and per-stream figures measured; a second run in closed loop with
# --epp-args "--max-pending-picks 1" must see 429s (kvr-epp's shedding through real routers).
# kvr-epp and every cluster process are gone afterwards; a bad command line exits 2.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init bench_epp_smoke

for b in kvr-bench kvrctl kvr-routerd kvr-worker kvr-epp; do
    [ -x "$KVR_BIN/$b" ] || { echo "skipped: $KVR_BIN/$b not built"; exit 77; }
done
command -v nats-server >/dev/null || { echo "skipped: no nats-server"; exit 77; }

BENCH_PID=
bd_down() {
    if [ -n "$BENCH_PID" ] && kill -0 "$BENCH_PID" 2>/dev/null; then
        kill -TERM "$BENCH_PID" 2>/dev/null # it stops kvr-epp and runs kvrctl down itself
        for ((i = 0; i < 150; i++)); do kill -0 "$BENCH_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    for d in "$KVR_TMP"/run*; do
        [ -f "$d/cluster.json" ] && "$KVR_BIN/kvrctl" down --dir "$d" >/dev/null 2>&1
    done
    return 0
}
trap 'rc=$?; bd_down; (exit $rc); kvr_cleanup' EXIT

"$KVR_BIN/kvr-bench" epp --conns 0 >"$KVR_TMP/bad.log" 2>&1
kvr_assert_eq "$?" 2 "exit status of kvr-bench epp --conns 0"
grep -q "kvr-bench epp" "$KVR_TMP/bad.log" || kvr_fail "no error message for --conns 0"

run() { # NAME ARGS…: runs the bench into $KVR_TMP/NAME, JSON in $KVR_TMP/NAME.json
    local name=$1
    shift
    "$KVR_BIN/kvr-bench" epp --routers 3 --workers 2 --duration 2 --warmup 0.5 \
        --dir "$KVR_TMP/$name" --json "$KVR_TMP/$name.json" "$@" \
        >"$KVR_TMP/$name.out" 2>"$KVR_TMP/$name.err" &
    BENCH_PID=$!
    wait "$BENCH_PID"
    local rc=$?
    BENCH_PID=
    cat "$KVR_TMP/$name.out"
    if [ "$rc" -ne 0 ]; then
        tail -n 30 "$KVR_TMP/$name.err" >&2
        kvr_fail "kvr-bench epp $* exited $rc"
    fi
    local pid
    pid=$(sed -n 's/^== kvr-epp pid \([0-9]*\),.*/\1/p' "$KVR_TMP/$name.err")
    [ -n "$pid" ] || kvr_fail "no kvr-epp pid in the bench's log"
    if [ -d "/proc/$pid" ] && grep -q kvr-epp "/proc/$pid/cmdline" 2>/dev/null; then
        kvr_fail "kvr-epp (pid $pid) left running"
    fi
    grep -q "nothing left running" "$KVR_TMP/$name.err" || kvr_fail "kvrctl down did not report a clean stop"
}

run run1 --rate 300 --hold 50
/usr/bin/python3 - "$KVR_TMP/run1.json" <<'PY' || kvr_fail "JSON checks failed (open loop)"
import json, sys
j = json.load(open(sys.argv[1]))
def need(c, what):
    if not c:
        print("JSON check failed:", what, j, file=sys.stderr)
        sys.exit(1)
need(j["bench"] == "epp" and j["routers"] == 3, "bench, routers")
need(540 <= j["requests_ok"] <= 600, "~600 requests answered (got %d)" % j["requests_ok"])
need(all(v == 0 for v in j["errors"].values()), "no errors")
need(j["unfinished"] == 0 and j["not_sent"] == 0, "nothing unfinished or unsent")
c, s = j["pick_client_ms"], j["pick_server_ms"]
need(0 < c["p50"] <= c["p99"] <= c["max"], "client pick quantiles")
need(0 < s["p50"] <= s["p99"], "kvr-epp pick quantiles")
r = j["route_ms"]  # the routers' part: answered kvr.route requests, inside the pick
need(0 < r["p50"] <= r["p99"] and 0 < r["mean"], "route quantiles")
need(j["cpu_us_per_request"] > 0, "CPU per request")
need(j["held_streams"] == 50 and j["rss_held_kb"] > 0 and j["rss_idle_kb"] > 0, "RSS figures")
print("JSON ok: %.0f/s, pick p50 %.3f ms (kvr-epp %.3f), %.0f us CPU/request" %
      (j["rps"], c["p50"], s["p50"], j["cpu_us_per_request"]))
PY

run run2 --concurrency 32 --hold 0 --epp-args "--max-pending-picks 1"
/usr/bin/python3 - "$KVR_TMP/run2.json" <<'PY' || kvr_fail "JSON checks failed (shedding)"
import json, sys
j = json.load(open(sys.argv[1]))
e = j["errors"]
if not (e["immediate_429"] > 0 and j["requests_ok"] > 0):
    print("want 429s and answers with --max-pending-picks 1:", j, file=sys.stderr)
    sys.exit(1)
if any(v for k, v in e.items() if k != "immediate_429"):
    print("errors other than 429:", e, file=sys.stderr)
    sys.exit(1)
print("shedding ok: %d answered, %d shed with 429" % (j["requests_ok"], e["immediate_429"]))
PY
kvr_pass
