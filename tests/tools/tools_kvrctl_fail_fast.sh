#!/usr/bin/env bash
# kvrctl up fails fast, names the process, its port and its last log lines, and tears down
# what it started; bad command lines get clear errors.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/lib.sh"
tools_init tools_kvrctl_fail_fast

# 1. nats-server cannot bind its port (something else holds it): kvrctl names nats-0.
port=$(kvr_free_port)
kvr_spawn holder python3 -c "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',$port)); s.listen(); time.sleep(300)"
kvr_wait_for 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" || kvr_fail "port holder did not listen"
D=$KVR_TMP/c1
start=$(date +%s)
if out=$("$KVRCTL" up --dir "$D" --routers 0 --workers 0 --frontends 0 --base-port "$port" --timeout 20 2>&1); then
    kvr_fail "up succeeded although port $port is taken"
fi
kvr_log "up said: $out"
[ $(($(date +%s) - start)) -lt 15 ] || kvr_fail "up did not fail fast"
grep -q "nats-0" <<<"$out" || kvr_fail "error does not name nats-0"
grep -q "port $port" <<<"$out" || kvr_fail "error does not name port $port"
grep -q "last lines" <<<"$out" || kvr_fail "error does not show the log"
for pid in $(cluster_pids "$D"); do ! pid_running "$pid" || kvr_fail "pid $pid left running"; done

# 2. A worker that refuses its arguments: named, and nats torn down.
if [ -x "$KVR_BIN/kvr-worker" ]; then
    D=$KVR_TMP/c2
    if out=$("$KVRCTL" up --dir "$D" --routers 0 --workers 1 --frontends 0 --worker-args "--no-such-flag" --timeout 20 2>&1); then
        kvr_fail "up succeeded with a bad worker flag"
    fi
    grep -q "worker-1" <<<"$out" || kvr_fail "error does not name worker-1: $out"
    for pid in $(cluster_pids "$D"); do ! pid_running "$pid" || kvr_fail "pid $pid left running"; done
else
    kvr_log "SKIP part: kvr-worker not built yet (bad-worker-flag case)"
fi

# 3. Bad command lines.
"$KVRCTL" up --routers x >/dev/null 2>&1; kvr_assert_eq $? 2 "bad --routers exit status"
"$KVRCTL" frobnicate >/dev/null 2>&1; kvr_assert_eq $? 2 "unknown command exit status"
if "$KVRCTL" status --dir "$KVR_TMP/nope" >/dev/null 2>&1; then kvr_fail "status of a missing dir succeeded"; fi
echo '{"processes": 5}' >"$KVR_TMP/bad.json" && mkdir -p "$KVR_TMP/c3" && mv "$KVR_TMP/bad.json" "$KVR_TMP/c3/cluster.json"
out=$("$KVRCTL" down --dir "$KVR_TMP/c3" 2>&1) && kvr_fail "down accepted a malformed cluster.json"
grep -q "processes" <<<"$out" || kvr_fail "malformed cluster.json error is unclear: $out"
kvr_pass
