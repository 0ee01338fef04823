#!/usr/bin/env bash
# kvrctl up --nats URL (an external NATS) and kvr-bench worker take the --nats-* credential
# flags every binary takes (net/kvr_nats_flags.h) and give them to every process they start,
# against a nats-server that requires a user and password:
#  1. kvrctl up --nats URL --nats-user U --nats-password-file F: no nats-server of its own,
#     routers, workers and frontend connect (kvrctl up waits for the routers to know the
#     workers, which only NATS tells them), a request is served; the password is in no
#     command line, cluster.json or log; a wrong password fails up;
#  2. kvr-bench worker --nats URL with the same flags: its worker connects as that user (the
#     server's closed-connection list), and without them the server refuses it.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/lib.sh"
tools_init tools_kvrctl_nats_auth
kvr_need_bins kvr-routerd kvr-worker kvr-frontend kvr-bench

SECRET=pw-kvrctl-$$-secret
MON=$(kvr_free_port)
KVR_NATS_EXTRA_CONF="http: 127.0.0.1:$MON
authorization { users = [ { user: \"alice\", password: \"$SECRET\" } ] }" kvr_start_nats
printf '%s\n' "$SECRET" >"$KVR_TMP/pw"
printf 'not-the-password\n' >"$KVR_TMP/badpw"
chmod 600 "$KVR_TMP/pw" "$KVR_TMP/badpw"

# --- 1. kvrctl up on the external NATS
D=$KVR_TMP/c
out=$("$KVRCTL" up --dir "$D" --routers 2 --workers 2 --frontends 1 --speedup 10 --timeout 40 \
    --nats "$NATS_URL" --nats-user alice --nats-password-file "$KVR_TMP/pw" 2>&1) ||
    kvr_fail "kvrctl up with credentials failed: $out"
kvr_log "up: $out"
kvr_assert_eq "$(jq '[.processes[] | select(.role == "nats")] | length' "$D/cluster.json")" 0 \
    "no nats-server of its own"
kvr_assert_eq "$(jq '[.processes[] | select(.argv | index("--nats-user"))] | length' "$D/cluster.json")" 5 \
    "every process got --nats-user"
f=$(jq -r '.processes[] | select(.role == "frontend") | .url' "$D/cluster.json")
r=$(curl -s --max-time 20 -d '{"model":"sim","prompt":"through an authenticated NATS","max_tokens":4}' "$f/v1/completions")
kvr_assert_eq "$(jq -r .usage.completion_tokens <<<"$r")" 4 "a request through the frontend"
if grep -rq -- "$SECRET" "$D"; then
    kvr_fail "the password is in $(grep -rl -- "$SECRET" "$D" | head -3)"
fi
for pid in $(jq -r '.processes[].pid' "$D/cluster.json"); do
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$SECRET" && kvr_fail "pid $pid has the password on its command line"
done
"$KVRCTL" down --dir "$D" --timeout 10 >/dev/null 2>&1 || kvr_fail "kvrctl down"

# the flags are really used: a wrong password and the routers never learn the workers
start=$(date +%s)
if out=$("$KVRCTL" up --dir "$KVR_TMP/bad" --routers 1 --workers 1 --frontends 0 --timeout 8 \
    --nats "$NATS_URL" --nats-user alice --nats-password-file "$KVR_TMP/badpw" 2>&1); then
    kvr_fail "kvrctl up succeeded with a wrong NATS password"
fi
kvr_log "wrong password: up failed after $(($(date +%s) - start)) s"
# and a credential flag kvrctl cannot use fails at once
if out=$("$KVRCTL" up --dir "$KVR_TMP/bad2" --routers 1 --workers 0 --frontends 0 \
    --nats "$NATS_URL" --nats-user alice --nats-token-file "$KVR_TMP/pw" 2>&1); then
    kvr_fail "kvrctl up accepted two NATS authentication methods"
fi
grep -q "one of --nats-user" <<<"$out" || kvr_fail "no clear error for two methods: $out"

# --- 2. kvr-bench worker
alice_closed() { curl -s "http://127.0.0.1:$MON/connz?state=closed&auth=true&limit=1000" |
    jq '[.connections[] | select(.authorized_user == "alice")] | length'; }
# bench: its verdict (the worker's clock on this machine) is not what is tested here, only that
# it took the flags (exit 2 on a bad command line) and ran; a failed verdict keeps its logs
bench() {
    local o rc
    o=$("$KVR_BIN/kvr-bench" worker --streams 4 --duration 2 --speedup 100 --max-tokens 16 \
        --prompt-tokens 64 --shared-prefix 0 --no-pin --nats "$NATS_URL" "$@" 2>&1)
    rc=$?
    local kept
    kept=$(sed -n 's/.*logs kept in \(\/tmp\/kvr-bench-worker\.[A-Za-z0-9]*\).*/\1/p' <<<"$o")
    [ -n "$kept" ] && rm -rf "$kept"
    [ "$rc" -le 1 ] && grep -q "verdict:" <<<"$o" || kvr_fail "kvr-bench worker $*: rc $rc: $o"
}
before=$(alice_closed)
bench --nats-user alice --nats-password-file "$KVR_TMP/pw"
after=$(alice_closed)
kvr_log "bench worker: closed connections as alice $before -> $after"
[ "$after" -gt "$before" ] || kvr_fail "the bench's worker never connected as alice ($before -> $after)"
errs0=$(grep -c "authentication error\|Authorization Violation" "$KVR_TMP/nats.log")
bench
errs1=$(grep -c "authentication error\|Authorization Violation" "$KVR_TMP/nats.log")
kvr_log "without credentials: the server logged $((errs1 - errs0)) refusals"
[ "$errs1" -gt "$errs0" ] || kvr_fail "a worker without credentials was not refused"
kvr_pass
