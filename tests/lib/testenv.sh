# testenv.sh — shared harness for kvroute's multi-process integration tests (bash).
#
#   source "$(dirname "$0")/../lib/testenv.sh"
#   kvr_test_init my_test_name          # temp dir, EXIT trap that kills everything we started
#   kvr_start_nats                      # nats-server -js on an OS-chosen port; sets NATS_URL
#   kvr_start_nats_cluster 3            # or a 3-node JetStream cluster; sets NATS_URLS
#   port=$(kvr_free_port)
#   kvr_spawn worker1 "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$port --nats "$NATS_URL" ...
#   kvr_wait_http "http://127.0.0.1:$port/health" 10
#   kvr_kill9 worker1                   # SIGKILL, like a crash
#   kvr_assert_eq "$got" "$want" "what"
#   kvr_pass                            # prints "1 passed, 0 failed" and exits 0
#
# Every spawned process runs in its own process group under setsid; the EXIT trap sends
# SIGKILL to each group, so nothing is left behind when a test fails or times out (ctest's
# TIMEOUT sends SIGTERM to bash, which runs the trap). Logs go to $KVR_TMP/<name>.log and the
# last lines of each are printed when a test fails.
#
# Environment: KVR_BIN (directory of the built binaries; default: build/bin next to tests/),
# KVR_KEEP_TMP=1 keeps the temp dir.

set -u
set -o pipefail

KVR_TESTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${KVR_BIN:=$(cd "$KVR_TESTS_DIR/.." && pwd)/build/bin}"
KVR_NAMES=()
declare -A KVR_PIDS=()
KVR_FAILED=0

kvr_log() { printf '[%s] %s\n' "$(date +%H:%M:%S.%3N)" "$*" >&2; }

kvr_cleanup() {
    local rc=$?
    local name
    for name in "${KVR_NAMES[@]}"; do
        local pid=${KVR_PIDS[$name]:-}
        [ -n "$pid" ] && kill -KILL -- "-$pid" 2>/dev/null
    done
    for name in "${KVR_NAMES[@]}"; do
        local pid=${KVR_PIDS[$name]:-}
        [ -n "$pid" ] && wait "$pid" 2>/dev/null
    done
    if [ $rc -ne 0 ] || [ $KVR_FAILED -ne 0 ]; then
        for name in "${KVR_NAMES[@]}"; do
            if [ -f "$KVR_TMP/$name.log" ]; then
                # warnings first: a chatty log's tail (stats lines) can hide why it failed
                echo "----- warnings and errors in $name.log (last 25) -----" >&2
                grep -E 'level=(warn|error)|ERROR|AddressSanitizer|runtime error' \
                    "$KVR_TMP/$name.log" | tail -n 25 | cut -c1-400 >&2
                echo "----- last lines of $name.log -----" >&2
                tail -n 25 "$KVR_TMP/$name.log" >&2
            fi
        done
    fi
    if [ "${KVR_KEEP_TMP:-0}" = 1 ]; then
        echo "kept $KVR_TMP" >&2
    else
        rm -rf "$KVR_TMP"
    fi
    exit $rc
}

kvr_test_init() {
    KVR_TEST_NAME=$1
    KVR_TMP=$(mktemp -d "${TMPDIR:-/tmp}/kvr-$1.XXXXXX")
    trap kvr_cleanup EXIT
    trap 'exit 143' TERM INT
}

# A free TCP port on 127.0.0.1, chosen by the OS (bind to port 0, read it, close).
# A port the OS calls free, and that no test on this machine was handed in the last 15 min:
# tests running side by side (ctest -j) ask the OS at different times, and the OS hands out a
# port again as soon as its first owner has closed its probe socket, so two tests could start
# servers on one port seconds apart (seen in CI: a router's HTTP port taken by another test's).
# The hand-outs are kept in a small file under a lock.
kvr_free_port() {
    /usr/bin/python3 - <<'PY'
import fcntl, os, socket, time
path = os.path.join(os.environ.get("TMPDIR") or "/tmp", "kvr-test-ports")
now = time.time()
with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    recent = {}
    for line in f:
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            try:
                t = float(parts[1])
            except ValueError:
                continue
            if now - t < 900:
                recent[int(parts[0])] = t
    for _ in range(200):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in recent:
            break
    recent[port] = now
    f.seek(0)
    f.truncate()
    f.writelines("%d %.0f\n" % (p, t) for p, t in recent.items())
print(port)
PY
}

# kvr_spawn NAME CMD ARGS... : start in its own process group; logs to $KVR_TMP/NAME.log.
kvr_spawn() {
    local name=$1
    shift
    setsid "$@" >>"$KVR_TMP/$name.log" 2>&1 &
    KVR_PIDS[$name]=$!
    local n
    for n in "${KVR_NAMES[@]}"; do [ "$n" = "$name" ] && return 0; done
    KVR_NAMES+=("$name")
}

kvr_pid() { echo "${KVR_PIDS[$1]}"; }

kvr_alive() { kill -0 "${KVR_PIDS[$1]}" 2>/dev/null; }

# SIGKILL a spawned process group and reap it.
kvr_kill9() {
    local pid=${KVR_PIDS[$1]}
    kill -KILL -- "-$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}

# SIGTERM and wait up to $2 seconds (default 10); returns the exit status, 124 on timeout.
kvr_term() {
    local pid=${KVR_PIDS[$1]} t=${2:-10} i
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < t * 10; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null
            return $?
        fi
        sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 124
}

# Start nats-server with JetStream on an OS-chosen client port; sets NATS_URL and NATS_DIR.
# kvr_start_nats [NAME] (default "nats"); calling again with the same NAME restarts it on the
# same port and store (for "NATS restarted under the router" tests). KVR_NATS_EXTRA_CONF is
# appended to its configuration (e.g. an authorization block); unset KVR_NATS_PORT first to
# start a second server on another port.
kvr_start_nats() {
    local name=${1:-nats}
    NATS_DIR="$KVR_TMP/$name"
    mkdir -p "$NATS_DIR/js"
    if [ -z "${KVR_NATS_PORT:-}" ]; then
        KVR_NATS_PORT=$(kvr_free_port)
    fi
    cat >"$NATS_DIR/nats.conf" <<CONF
listen: 127.0.0.1:$KVR_NATS_PORT
jetstream {
  store_dir: "$NATS_DIR/js"
  max_memory_store: 256MB
  max_file_store: 2GB
}
max_payload: 8MB
${KVR_NATS_EXTRA_CONF:-}
CONF
    kvr_spawn "$name" nats-server -c "$NATS_DIR/nats.conf"
    NATS_URL="nats://127.0.0.1:$KVR_NATS_PORT"
    local i
    for ((i = 0; i < 100; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$KVR_NATS_PORT") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    kvr_fail "nats-server did not listen on $KVR_NATS_PORT"
}

# kvr_start_nats_cluster [N] (default 3): N nats-servers with JetStream, clustered over
# loopback routes (cluster "kvr", every port chosen free), named nats1..nN, each with its own
# store and a monitoring port. Sets NATS_URLS (every client URL, comma-separated, for
# --nats), NATS_NODE_URL[i] and NATS_NODE_MON[i] (i = 1..N). Returns once every node answers
# /healthz, i.e. JetStream has a meta leader and every node is current.
# kvr_restart_nats_node I restarts node I on the same ports and store.
declare -A NATS_NODE_URL=() NATS_NODE_MON=() NATS_NODE_CPORT=() NATS_NODE_RPORT=()
KVR_NATS_NODES=0
kvr_start_nats_cluster() {
    local n=${1:-3} i routes=""
    KVR_NATS_NODES=$n
    for ((i = 1; i <= n; i++)); do
        local cp mp rp
        cp=$(kvr_free_port)
        mp=$(kvr_free_port)
        rp=$(kvr_free_port)
        NATS_NODE_CPORT[$i]=$cp
        NATS_NODE_URL[$i]="nats://127.0.0.1:$cp"
        NATS_NODE_MON[$i]=$mp
        NATS_NODE_RPORT[$i]=$rp
        routes+="${routes:+, }\"nats-route://127.0.0.1:$rp\""
    done
    NATS_URLS=""
    for ((i = 1; i <= n; i++)); do
        local dir="$KVR_TMP/nats$i"
        mkdir -p "$dir/js"
        cat >"$dir/nats.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:${NATS_NODE_CPORT[$i]}
http: 127.0.0.1:${NATS_NODE_MON[$i]}
jetstream {
  store_dir: "$dir/js"
  max_memory_store: 256MB
  max_file_store: 2GB
}
max_payload: 8MB
cluster {
  name: kvr
  listen: 127.0.0.1:${NATS_NODE_RPORT[$i]}
  routes: [ $routes ]
}
${KVR_NATS_EXTRA_CONF:-}
CONF
        NATS_URLS+="${NATS_URLS:+,}${NATS_NODE_URL[$i]}"
    done
    for ((i = 1; i <= n; i++)); do
        kvr_spawn "nats$i" nats-server -c "$KVR_TMP/nats$i/nats.conf"
    done
    for ((i = 1; i <= n; i++)); do
        kvr_wait_nats_node "$i" 30 || kvr_fail "nats node $i not healthy"
    done
}
# kvr_wait_nats_node I [SECONDS]: until node I answers /healthz with 200 (JetStream current).
kvr_wait_nats_node() {
    local i=$1 t=${2:-30} k
    for ((k = 0; k < t * 10; k++)); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 \
            "http://127.0.0.1:${NATS_NODE_MON[$i]}/healthz")" = 200 ] && return 0
        sleep 0.1
    done
    return 1
}

kvr_restart_nats_node() {
    kvr_spawn "nats$1" nats-server -c "$KVR_TMP/nats$1/nats.conf"
    kvr_wait_nats_node "$1" 30 || kvr_fail "nats node $1 not healthy after restart"
}

# kvr_wait_http URL [SECONDS] [EXPECTED_STATUS]: poll until the URL answers the status (200).
# kvr_cluster_secret: writes a fresh router peer secret (mode 600) to $KVR_TMP/cluster.secret
# once and prints its path; every multi-router group needs one (docs/SECURITY.md 3).
kvr_cluster_secret() {
    local f="$KVR_TMP/cluster.secret"
    [ -s "$f" ] || (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$f")
    echo "$f"
}

kvr_wait_http() {
    local url=$1 t=${2:-10} want=${3:-200} code end
    end=$((${EPOCHREALTIME/./} + t * 1000000))
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null)
        [ "$code" = "$want" ] && return 0
        ((${EPOCHREALTIME/./} < end)) || break
        sleep 0.1
    done
    kvr_fail "timed out waiting for $url to answer $want (last: $code)"
}

# kvr_need_bins NAME...: skip the test (exit 77, ctest's SKIP_RETURN_CODE) unless every binary
# is built in $KVR_BIN.
kvr_need_bins() {
    local b
    for b in "$@"; do
        [ -x "$KVR_BIN/$b" ] || { echo "SKIP: $b not built"; exit 77; }
    done
}

# kvr_wait_for SECONDS CMD...: poll until CMD succeeds.
# Bounded by the clock, not by a count of tries: a CMD that itself takes seconds (a curl to a
# hung server) must not stretch the wait past SECONDS.
kvr_wait_for() {
    local t=$1 end
    shift
    end=$((${EPOCHREALTIME/./} + t * 1000000))
    while :; do
        "$@" >/dev/null 2>&1 && return 0
        ((${EPOCHREALTIME/./} < end)) || return 1
        sleep 0.1
    done
}

kvr_fail() {
    KVR_FAILED=1
    kvr_log "FAIL [$KVR_TEST_NAME]: $*"
    echo "0 passed, 1 failed"
    exit 1
}

kvr_assert_eq() {
    [ "$1" = "$2" ] || kvr_fail "${3:-value}: got '$1', want '$2'"
}

kvr_assert() {
    local what=$1
    shift
    "$@" || kvr_fail "$what"
}

kvr_pass() {
    kvr_log "PASS [$KVR_TEST_NAME]"
    echo "1 passed, 0 failed"
    exit 0
}

# ---- Network namespaces (chaos tests; needs root and iproute2) --------------------------------
#   kvr_netns_init 10.201.0      # hub namespace with a bridge at 10.201.0.1/24; cleanup on exit
#   kvr_netns_add r1 11          # namespace for role r1 at 10.201.0.11 on the hub's bridge
#   kvr_netns_spawn router1 r1 "$KVR_BIN/kvr-routerd" ...   # kvr_spawn inside a namespace
#   kvr_netns_exec hub curl ...  # run a command inside a namespace ("hub" is the hub)
#   kvr_netns_cut r1 r2 / kvr_netns_heal r1 r2   # drop / restore traffic between two roles
# Every link is created inside the test's own namespaces (the veth pair in the hub, its peer
# moved straight into the role's namespace), so the root namespace's links, addresses and
# routes are never touched. Names are kvrc-<pid>-<role>: parallel runs never collide, and
# namespaces left by a run that was SIGKILLed (its pid gone) are removed by the next init.
declare -A KVR_NS=() KVR_NS_IP=()
KVR_NS_ROLES=()

kvr_netns_name() { echo "kvrc-$$-$1"; }

# Kills every process still inside our namespaces, deletes them, then runs the usual cleanup
# with the test's exit status (kvr_cleanup reads it from $?).
kvr_netns_cleanup() {
    local rc=$? role ns pid
    for role in "${KVR_NS_ROLES[@]}"; do
        ns=${KVR_NS[$role]}
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    done
    for role in "${KVR_NS_ROLES[@]}"; do
        ns=${KVR_NS[$role]}
        ip netns del "$ns" 2>/dev/null
    done
    (exit $rc)
    kvr_cleanup
}

# Removes kvrc-<pid>-* namespaces whose test process no longer exists.
kvr_netns_reap_stale() {
    local ns pid
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        case "$ns" in kvrc-[0-9]*-*) ;; *) continue ;; esac
        pid=${ns#kvrc-}
        pid=${pid%%-*}
        kill -0 "$pid" 2>/dev/null && continue
        local p
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null && kvr_log "removed stale namespace $ns"
    done
}

# kvr_netns_init PREFIX: the hub namespace "hub" with bridge br0 at PREFIX.1/24. Exits 77
# (skipped) when namespaces cannot be made here (not root, no iproute2).
kvr_netns_init() {
    KVR_NS_PREFIX=$1
    if [ "$(id -u)" -ne 0 ] || ! command -v ip >/dev/null; then
        echo "SKIP: network namespaces need root and iproute2"
        exit 77
    fi
    kvr_netns_reap_stale
    trap kvr_netns_cleanup EXIT
    local ns
    ns=$(kvr_netns_name hub)
    KVR_NS[hub]=$ns
    KVR_NS_IP[hub]=$KVR_NS_PREFIX.1
    KVR_NS_ROLES+=(hub)
    ip netns add "$ns" || kvr_fail "ip netns add $ns"
    ip -n "$ns" link set lo up &&
        ip -n "$ns" link add br0 type bridge &&
        ip -n "$ns" addr add "$KVR_NS_PREFIX.1/24" dev br0 &&
        ip -n "$ns" link set br0 up || kvr_fail "hub bridge in $ns"
}

# kvr_netns_add ROLE HOSTNUM: a namespace for ROLE at PREFIX.HOSTNUM, linked to the hub bridge
# by a veth pair (hub side "v-ROLE", role side "eth0").
kvr_netns_add() {
    local role=$1 host=$2 ns hub=${KVR_NS[hub]}
    ns=$(kvr_netns_name "$role")
    KVR_NS[$role]=$ns
    KVR_NS_IP[$role]=$KVR_NS_PREFIX.$host
    KVR_NS_ROLES+=("$role")
    ip netns add "$ns" || kvr_fail "ip netns add $ns"
    ip -n "$ns" link set lo up &&
        ip -n "$hub" link add "v-$role" type veth peer name eth0 netns "$ns" &&
        ip -n "$hub" link set "v-$role" master br0 up &&
        ip -n "$ns" addr add "$KVR_NS_PREFIX.$host/24" dev eth0 &&
        ip -n "$ns" link set eth0 up || kvr_fail "veth for $role"
}

kvr_netns_exec() {
    local ns=${KVR_NS[$1]}
    shift
    ip netns exec "$ns" "$@"
}

# kvr_netns_spawn NAME ROLE CMD ARGS...: kvr_spawn inside ROLE's namespace (ip netns exec
# execs CMD, so the recorded pid is the process itself).
kvr_netns_spawn() {
    local name=$1 ns=${KVR_NS[$2]}
    shift 2
    kvr_spawn "$name" ip netns exec "$ns" "$@"
}

# kvr_netns_cut A B: silently drop every packet between roles A and B (a blackhole route for
# the other's address in each namespace: timeouts, not resets, like a real partition).
kvr_netns_cut() {
    ip -n "${KVR_NS[$1]}" route add blackhole "${KVR_NS_IP[$2]}/32" &&
        ip -n "${KVR_NS[$2]}" route add blackhole "${KVR_NS_IP[$1]}/32" || kvr_fail "cut $1 $2"
}

kvr_netns_heal() {
    ip -n "${KVR_NS[$1]}" route del blackhole "${KVR_NS_IP[$2]}/32" &&
        ip -n "${KVR_NS[$2]}" route del blackhole "${KVR_NS_IP[$1]}/32" || kvr_fail "heal $1 $2"
}
