# Helpers for the tools_* tests (sourced after tests/lib/testenv.sh).
#
# kvrctl starts every process in its own session, so testenv's process-group reaping does not
# see them: tools_init installs an EXIT trap that runs `kvrctl down` and then SIGKILLs every pid
# recorded in any cluster.json under $KVR_TMP, before testenv's own cleanup.

: "${KVR_SRC:=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
KVRCTL=$KVR_BIN/kvrctl

tools_cleanup() {
    local rc=$?
    local f pid
    for f in "$KVR_TMP"/*/cluster.json; do
        [ -f "$f" ] || continue
        "$KVRCTL" down --dir "$(dirname "$f")" --timeout 3 >/dev/null 2>&1
        for pid in $(jq -r '.processes[].pid' "$f" 2>/dev/null); do
            kill -KILL -- "-$pid" 2>/dev/null
            kill -KILL "$pid" 2>/dev/null
        done
    done
    (exit $rc)
    kvr_cleanup
}

tools_init() {
    kvr_test_init "$1"
    trap tools_cleanup EXIT
    [ -x "$KVRCTL" ] || kvr_fail "$KVRCTL is not built"
    command -v jq >/dev/null || kvr_fail "jq is not installed (scripts/setup installs it)"
}

tools_skip() {
    kvr_log "SKIP [$KVR_TEST_NAME]: $*"
    echo "0 passed, 0 failed, 1 skipped"
    exit 77
}

# A pid is running when /proc/<pid>/stat exists and it is not a zombie (PID 1 here may not
# reap orphans, so a dead daemon can linger as a zombie). Given as <pid>:<start_time> (what
# cluster_pids prints), it must also still have the start time the launcher recorded (field 22
# of /proc/<pid>/stat): on a busy machine a pid number is soon reused by a stranger.
pid_running() {
    local pid=${1%%:*} want= f
    [ "$pid" != "$1" ] && want=${1#*:}
    f=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null) || return 1
    set -- $f
    [ -n "$1" ] && [ "$1" != Z ] && [ "$1" != X ] && { [ -z "$want" ] || [ "${20}" = "$want" ]; }
}

# All processes recorded in a cluster.json, as <pid>:<start_time> for pid_running.
cluster_pids() { jq -r '.processes[] | "\(.pid):\(.start_time)"' "$1/cluster.json"; }
cluster_url() { jq -r --arg r "$2" --argjson i "$3" '.processes[] | select(.role == $r and .id == $i) | .url' "$1/cluster.json"; }
cluster_pid() { jq -r --arg r "$2" --argjson i "$3" '.processes[] | select(.role == $r and .id == $i) | .pid' "$1/cluster.json"; }
