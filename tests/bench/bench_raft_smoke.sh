#!/usr/bin/env bash
# bench_raft_smoke: `kvr-bench raft` (process mode) for ~3 s per phase with small numbers:
# a 3-router Raft group, a 1-router local-mode cluster and 3 best-effort routers (all through
# kvrctl), then checks the JSON: fields present, decisions > 0, nothing failed, the Raft
# leader alone decided (asked on kvr.route.leader) and every local / best-effort router
# decided, digests equal (Raft, local), no booking left, stale decisions found and counted in
# best-effort mode, and no process of any cluster left running. Bad command lines exit 2.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init bench_raft_smoke

for b in kvr-bench kvrctl kvr-routerd kvr-worker; do
    if [ ! -x "$KVR_BIN/$b" ]; then
        echo "skipped: $KVR_BIN/$b not built"
        exit 77
    fi
done
command -v nats-server >/dev/null || { echo "skipped: no nats-server"; exit 77; }

DIR="$KVR_TMP/bench"
OUT="$KVR_TMP/raft.json"
BENCH_PID=

# On any exit: stop kvr-bench (it tears its clusters down itself), then make sure with kvrctl.
rb_down() {
    if [ -n "$BENCH_PID" ] && kill -0 "$BENCH_PID" 2>/dev/null; then
        kill -TERM "$BENCH_PID" 2>/dev/null
        local i
        for ((i = 0; i < 150; i++)); do
            kill -0 "$BENCH_PID" 2>/dev/null || break
            sleep 0.1
        done
    fi
    local d pid
    for d in "$DIR/raft" "$DIR/local" "$DIR/best_effort"; do
        [ -f "$d/cluster.json" ] || continue
        "$KVR_BIN/kvrctl" down --dir "$d" >/dev/null 2>&1
        # last resort (kvrctl down timed out): SIGKILL each recorded pid still ours (same start time)
        for pid in $(/usr/bin/python3 - "$d/cluster.json" <<'PY' 2>/dev/null
import json, sys
for p in json.load(open(sys.argv[1]))["processes"]:
    try:
        st = open("/proc/%d/stat" % p["pid"]).read()
    except OSError:
        continue
    if int(st[st.rindex(")") + 2:].split()[19]) == p.get("start_time"):
        print(p["pid"])
PY
        ); do
            kill -KILL "$pid" 2>/dev/null
        done
    done
    return 0
}
trap 'rc=$?; rb_down; (exit $rc); kvr_cleanup' EXIT

# bad command lines: clear error, exit 2, nothing started
for args in "--routers 0 --json $OUT" "--mode bogus --json $OUT" "--inflight x --json $OUT" "--free-after-ms -1 --json $OUT" "--duration 3"; do
    # shellcheck disable=SC2086
    "$KVR_BIN/kvr-bench" raft $args >"$KVR_TMP/bad.log" 2>&1
    kvr_assert_eq "$?" 2 "exit status of kvr-bench raft $args"
    grep -q "kvr-bench raft" "$KVR_TMP/bad.log" || kvr_fail "no error message for: $args"
done

kvr_log "kvr-bench raft: 3 routers + 1 local router + 3 best-effort routers, 3 s each"
"$KVR_BIN/kvr-bench" raft --routers 3 --workers 3 --inflight 8 --duration 3 \
    --dir "$DIR" --json "$OUT" >"$KVR_TMP/bench.out" 2>"$KVR_TMP/bench.err" &
BENCH_PID=$!
wait "$BENCH_PID"
rc=$?
BENCH_PID=
cat "$KVR_TMP/bench.out"
if [ "$rc" -ne 0 ]; then
    tail -n 40 "$KVR_TMP/bench.err" >&2
    kvr_fail "kvr-bench raft exited $rc"
fi
[ -s "$OUT" ] || kvr_fail "no JSON written"

/usr/bin/python3 - "$OUT" <<'PY' || kvr_fail "JSON checks failed"
import json, sys
j = json.load(open(sys.argv[1]))
def need(cond, what):
    if not cond:
        print("JSON check failed:", what, file=sys.stderr)
        sys.exit(1)
for k in ("decisions_per_s", "latency_us", "local_decisions_per_s",
          "best_effort_double_booking_rate", "raft", "local", "fsm_digest", "digests_equal"):
    need(k in j, "field %s present" % k)
need(j["mode"] == "process", "mode process")
need(j["routers"] == 3, "3 routers")
need(isinstance(j["decisions_per_s"], (int, float)) and j["decisions_per_s"] > 0, "decisions_per_s > 0")
need(isinstance(j["local_decisions_per_s"], (int, float)) and j["local_decisions_per_s"] > 0, "local_decisions_per_s > 0")
need(j["latency_us"]["p50"] > 0 and j["latency_us"]["p99"] >= j["latency_us"]["p50"], "latency p50/p99")
need(0 < j["best_effort_double_booking_rate"] < 1, "measured double booking rate in (0,1)")
need(j["best_effort_decisions"] == j["best_effort"]["answered"], "every best-effort answer analysed")
need(j["best_effort_stale"] > 0, "best-effort routers decided on stale load at least once")
need(0 <= j["best_effort_simulation"]["rate"] <= 1, "simulated rate in [0,1]")
need(j["digests_equal"] is True and len(j["fsm_digest"]) == 16, "raft digests equal")
for name, n in (("raft", 3), ("local", 1), ("best_effort", 3)):
    p = j[name]
    need(p["ran"] is True, name + " ran")
    need(p["decisions"] > 0, name + " decisions > 0")
    for k in ("failed", "timeouts", "no_responders", "closed", "free_errors"):
        need(p[k] == 0, "%s %s == 0 (got %s)" % (name, k, p[k]))
    need(p["frees_published"] == p["answered"], name + " every answer freed")
    need(p["bookings_left"] == 0, name + " no booking left")
    if name != "best_effort":  # best-effort replicas need not agree: that is the point
        need(p["digests_equal"] is True, name + " digests equal")
    need(p["down_ok"] is True, name + " torn down")
    need(len(p["per_router"]) == n, name + " per-router entries")
    ids = sorted(r["id"] for r in p["per_router"])
    need(ids == list(range(1, n + 1)), name + " router ids")
    total = sum(r["decisions"]["raft"] + r["decisions"]["local"] for r in p["per_router"])
    need(total == p["answered"], "%s: routers' metric deltas (%d) == answers (%d)" % (name, total, p["answered"]))
    for r in p["per_router"]:
        d = r["decisions"]["raft"] + r["decisions"]["local"]
        if name == "raft":  # asked on kvr.route.leader first, as frontends do: the leader decides
            need(p["leader_first"] is True and p["leader_fallbacks"] == 0, "raft: leader first")
            need((d > 0) == (r["role"] == "leader"),
                 "raft: router %d (%s) decided %d: only the leader should" % (r["id"], r["role"], d))
        else:
            need(d > 0, "%s: router %d decided" % (name, r["id"]))
        need(r["client_answers"] == r["decisions"]["raft"] + r["decisions"]["local"],
             "%s: router %d client count matches its metrics" % (name, r["id"]))
need(j["raft"]["answers_by_mode"]["raft"] > 0, "raft answers in raft mode")
need(j["local"]["answers_by_mode"]["raft"] == 0, "local cluster never answers raft")
need(j["best_effort"]["answers_by_mode"]["raft"] == 0, "best-effort cluster never answers raft")
print("JSON ok: raft %.0f/s p99 %d us, local %.0f/s, best-effort stale %.3f" % (j["decisions_per_s"],
      j["latency_us"]["p99"], j["local_decisions_per_s"], j["best_effort_double_booking_rate"]))
PY

# nothing of any cluster is left running
for d in "$DIR/raft" "$DIR/local" "$DIR/best_effort"; do
    [ -f "$d/cluster.json" ] || kvr_fail "no $d/cluster.json"
    for ps in $(/usr/bin/python3 -c 'import json,sys; print(" ".join("%d:%d" % (p["pid"], p["start_time"]) for p in json.load(open(sys.argv[1]))["processes"]))' "$d/cluster.json"); do
        pid=${ps%%:*} start=${ps#*:}
        # Ours only while its start time (field 22 of /proc/<pid>/stat) is the one the launcher
        # recorded: on a busy CI machine near pid_max the number is soon reused (seen once,
        # a short-lived stranger under pid 30952). A process the bench sent SIGTERM may need a
        # moment to finish exiting on a loaded machine: wait up to 5 s, then it is a leak.
        alive() {
            local f
            f=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
            set -- $f "$2"
            [ "$1" != Z ] && [ "$1" != X ] && [ "${20}" = "${!#}" ]
        }
        for ((k = 0; k < 50; k++)); do alive "$pid" "$start" || break; sleep 0.1; done
        if alive "$pid" "$start"; then
            kvr_fail "process $pid of $d still running ($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-120))"
        fi
    done
done
kvr_pass
