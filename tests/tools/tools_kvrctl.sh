#!/usr/bin/env bash
# kvrctl up / status / kill / restart / transfer / down on a real cluster: nats-server plus whichever
# kvroute binaries are built (parts whose binary is missing are skipped and say so), haproxy
# in front of the workers. Checks cluster.json, logs, that processes outlive kvrctl, that kill
# really kills (leader/follower), that restart re-runs the same command, and that down leaves
# nothing running.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/lib.sh"
tools_init tools_kvrctl

D=$KVR_TMP/c
R=0 W=0 F=0 HA=()
if [ -x "$KVR_BIN/kvr-routerd" ]; then R=3; else kvr_log "SKIP part: kvr-routerd not built yet (no routers)"; fi
if [ -x "$KVR_BIN/kvr-worker" ]; then W=2; else kvr_log "SKIP part: kvr-worker not built yet (no workers, no haproxy)"; fi
if [ -x "$KVR_BIN/kvr-frontend" ]; then F=1; else kvr_log "SKIP part: kvr-frontend not built yet (no frontends)"; fi
[ $W -gt 0 ] && HA=(--haproxy)
total=$((1 + R + W + F + ${#HA[@]}))

out=$("$KVRCTL" up --dir "$D" --routers $R --workers $W --frontends $F "${HA[@]}" --speedup 10 2>&1) ||
    kvr_fail "kvrctl up failed: $out"
kvr_log "up: $out"

# cluster.json: one entry per process, each with pid, url, ports, argv, and its own log.
kvr_assert_eq "$(jq '.processes | length' "$D/cluster.json")" "$total" "processes in cluster.json"
for role in nats router worker frontend haproxy; do
    want=0
    case $role in nats) want=1 ;; router) want=$R ;; worker) want=$W ;; frontend) want=$F ;; haproxy) want=${#HA[@]} ;; esac
    kvr_assert_eq "$(jq --arg r $role '[.processes[] | select(.role == $r)] | length' "$D/cluster.json")" "$want" "$role count"
done
kvr_assert_eq "$(jq '[.processes[] | select((.pid > 0) and (.url | length > 0) and (.ports | length > 0) and (.argv | length > 0))] | length' "$D/cluster.json")" "$total" "complete entries"
while read -r role id pid; do
    pid_running "$pid" || kvr_fail "$role-$id (pid $pid) is not running after kvrctl exited"
    [ -s "$D/logs/$role-$id.log" ] || [ -f "$D/logs/$role-$id.log" ] || kvr_fail "no log file for $role-$id"
done < <(jq -r '.processes[] | "\(.role) \(.id) \(.pid)"' "$D/cluster.json")

# status: every process alive and ready.
st=$("$KVRCTL" status --dir "$D" --json) || kvr_fail "status failed"
kvr_assert_eq "$(echo "$st" | jq '[.processes[] | select(.alive and .ready)] | length')" "$total" "alive and ready in status"
"$KVRCTL" status --dir "$D" >&2
# The routers' admin token: generated in the cluster dir (0600); POSTs need it.
if [ "$R" -gt 0 ]; then
    kvr_assert_eq "$(stat -c %a "$D/admin-token")" 600 "admin-token mode"
    ru=$(jq -r '.processes[] | select(.role == "router" and .id == 1) | .url' "$D/cluster.json")
    kvr_assert_eq "$(curl -s -o /dev/null -w '%{http_code}' -X POST -d '{"token_ids":[1]}' "$ru/v1/match")" 401 "match without the token"
    kvr_assert_eq "$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $(cat "$D/admin-token")" -d '{"token_ids":[1]}' "$ru/v1/match")" 200 "match with the cluster's token"
fi

# A second `up` into a running cluster's dir is refused and touches nothing.
if "$KVRCTL" up --dir "$D" --routers 0 --workers 0 --frontends 0 >/dev/null 2>&1; then
    kvr_fail "second up into a running cluster's dir succeeded"
fi
# Restarting a running process is refused.
if "$KVRCTL" restart nats 0 --dir "$D" >/dev/null 2>&1; then
    kvr_fail "restart of a running nats succeeded"
fi

all_pids=$(cluster_pids "$D")

one_leader() {
    [ "$("$KVRCTL" status --dir "$D" --json | jq '[.processes[] | select(.role == "router" and .alive and .raft_role == "leader")] | length')" = 1 ]
}

if [ $R -gt 0 ]; then
    kvr_wait_for 20 one_leader || kvr_fail "no single leader among the routers"
    leader=$("$KVRCTL" status --dir "$D" --json | jq '.processes[] | select(.role == "router" and .raft_role == "leader") | .id')
    killed=$("$KVRCTL" kill router leader --dir "$D") || kvr_fail "kill router leader failed"
    kvr_assert_eq "$killed" "$leader" "kill router leader printed the leader's id"
    kpid=$(cluster_pid "$D" router "$killed")
    ! pid_running "$kpid" || kvr_fail "router-$killed (pid $kpid) still running after kill"
    kvr_wait_for 20 one_leader || kvr_fail "no new leader after killing router-$killed"
    out=$("$KVRCTL" restart router "$killed" --dir "$D" 2>&1) || kvr_fail "restart router $killed: $out"
    kvr_log "$out"
    npid=$(cluster_pid "$D" router "$killed")
    [ "$npid" != "$kpid" ] && pid_running "$npid" || kvr_fail "router-$killed not running after restart"
    kvr_assert_eq "$(jq -c --argjson i "$killed" '.processes[] | select(.role == "router" and .id == $i) | .argv' "$D/cluster.json" | grep -c -- "--data-dir")" 1 "restart kept the command line"
    all_pids="$all_pids $npid"

    follower=$("$KVRCTL" kill router follower --dir "$D") || kvr_fail "kill router follower failed"
    role_now=$("$KVRCTL" status --dir "$D" --json | jq -r --argjson i "$follower" '.processes[] | select(.role == "router" and .id == $i) | .alive')
    kvr_assert_eq "$role_now" false "killed follower is dead"
    out=$("$KVRCTL" restart router "$follower" --dir "$D" 2>&1) || kvr_fail "restart router $follower: $out"
    all_pids="$all_pids $(cluster_pid "$D" router "$follower")"
    kvr_wait_for 20 one_leader || kvr_fail "no single leader after restarts"
    # planned hand-over: kvrctl transfer (POST /admin/raft/transfer with D/admin-token)
    lead() { "$KVRCTL" status --dir "$D" --json | jq '.processes[] | select(.role == "router" and .alive and .raft_role == "leader") | .id'; }
    before=$(lead)
    moved=$("$KVRCTL" transfer --dir "$D") || kvr_fail "kvrctl transfer failed"
    [ -n "$moved" ] && [ "$moved" != "$before" ] || kvr_fail "transfer: leader $before, printed '$moved'"
    kvr_wait_for 10 one_leader || kvr_fail "no single leader after the transfer"
    kvr_assert_eq "$(lead)" "$moved" "the leader kvrctl transfer printed"
    back=$("$KVRCTL" transfer "$before" --dir "$D") || kvr_fail "kvrctl transfer $before failed"
    kvr_assert_eq "$back" "$before" "transfer to a named router"
    kvr_wait_for 10 one_leader || kvr_fail "no single leader after the second transfer"
    kvr_assert_eq "$(lead)" "$before" "leader after transfer $before"
    if "$KVRCTL" transfer 99 --dir "$D" >/dev/null 2>&1; then kvr_fail "transfer to router 99 succeeded"; fi
    kvr_log "kvrctl transfer: $before -> $moved -> $back"
else
    # Without routers, exercise kill/restart on nats itself.
    k=$("$KVRCTL" kill nats 0 --dir "$D") || kvr_fail "kill nats 0 failed"
    kvr_assert_eq "$k" 0 "kill printed the id"
    "$KVRCTL" restart nats 0 --dir "$D" >/dev/null || kvr_fail "restart nats 0 failed"
    all_pids="$all_pids $(cluster_pid "$D" nats 0)"
fi

# Killing something that is not there fails clearly.
if "$KVRCTL" kill router 99 --dir "$D" >/dev/null 2>&1; then kvr_fail "kill router 99 succeeded"; fi

out=$("$KVRCTL" down --dir "$D" 2>&1) || kvr_fail "down failed: $out"
kvr_log "$out"
for pid in $all_pids; do
    ! pid_running "$pid" || kvr_fail "pid $pid still running after down"
done
kvr_assert_eq "$("$KVRCTL" status --dir "$D" --json | jq '[.processes[] | select(.alive)] | length')" 0 "alive after down"
kvr_pass
