# chaos_lib.sh: a real kvroute cluster for the chaos tests (source after tests/lib/testenv.sh).
# nats-server -js, kvr-routerd x3 in one Raft group, kvr-worker x2, kvr-frontend (kv mode).
#
#   chaos_cluster netns   each router in its own network namespace on a bridge in a hub
#                         namespace that holds nats-server, the workers, the frontend and the
#                         test's clients (kvr_netns_*; addresses 10.201.0.x, fixed ports)
#   chaos_cluster lo      everything on 127.0.0.1 with free ports
# Before chaos_cluster: RPREFIX[i] (words put before kvr-routerd, e.g. env LD_PRELOAD=...),
# RDATA[i] (data dir), CHAOS_ROUTER_ARGS (extra router flags).
# Then: cx CMD (runs CMD where the clients live), r_state/r_q I, chaos_leader, chaos_converged.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/../routerd/rd_lib.sh"
PY=/usr/bin/python3
declare -A RPREFIX=() RDATA=() RURL=() RADDR=() RHTTP=() WURL=() WPORT=()
CHAOS_ROUTER_ARGS=${CHAOS_ROUTER_ARGS:-}
CHAOS_MODE=lo

chaos_need() {
    local b
    kvr_need_bins kvr-worker kvr-frontend kvr-routerd kvr-test-pub
    [ -f "$KVR_TESTS_DIR/../sync/sync.c" ] || { echo "SKIP: no Raft sync module"; exit 77; }
}

# cx CMD...: run CMD in the clients' place (the hub namespace, or here).
cx() {
    if [ "$CHAOS_MODE" = netns ]; then kvr_netns_exec hub "$@"; else "$@"; fi
}

r_state() { cx curl -s --max-time 2 "${RURL[$1]}/v1/state"; }
r_q() { r_state "$1" | jq -r "$2" 2>/dev/null; }

chaos_router_start() {
    local i=$1
    mkdir -p "${RDATA[$i]}"
    # shellcheck disable=SC2086 # RPREFIX and CHAOS_ROUTER_ARGS are word lists by design
    if [ "$CHAOS_MODE" = netns ]; then
        kvr_netns_spawn "router$i" "r$i" ${RPREFIX[$i]:-} "$KVR_BIN/kvr-routerd" --id "$i" \
            --nats "$NATS_R" --http "${RHTTP[$i]}" --data-dir "${RDATA[$i]}" \
            --raft-addr "${RADDR[$i]}" --peers "$PEERS" --cluster-secret-file "$(kvr_cluster_secret)" $CHAOS_ROUTER_ARGS
    else
        kvr_spawn "router$i" ${RPREFIX[$i]:-} "$KVR_BIN/kvr-routerd" --id "$i" \
            --nats "$NATS_URL" --http "${RHTTP[$i]}" --data-dir "${RDATA[$i]}" \
            --raft-addr "${RADDR[$i]}" --peers "$PEERS" --cluster-secret-file "$(kvr_cluster_secret)" $CHAOS_ROUTER_ARGS
    fi
}

chaos_cluster() {
    CHAOS_MODE=$1
    local i
    if [ "$CHAOS_MODE" = netns ]; then
        kvr_netns_init 10.201.0
        for i in 1 2 3; do kvr_netns_add "r$i" $((10 + i)); done
        NATS_DIR="$KVR_TMP/nats"
        mkdir -p "$NATS_DIR/js"
        cat >"$NATS_DIR/nats.conf" <<CONF
listen: 0.0.0.0:4222
jetstream { store_dir: "$NATS_DIR/js", max_memory_store: 256MB, max_file_store: 2GB }
max_payload: 8MB
CONF
        kvr_netns_spawn nats hub nats-server -c "$NATS_DIR/nats.conf"
        NATS_URL=nats://127.0.0.1:4222
        NATS_R=nats://${KVR_NS_IP[hub]}:4222
        kvr_wait_for 10 cx bash -c 'exec 3<>/dev/tcp/127.0.0.1/4222' || kvr_fail "nats-server did not listen"
        PEERS=""
        for i in 1 2 3; do
            RADDR[$i]=${KVR_NS_IP[r$i]}:7000
            RHTTP[$i]=${KVR_NS_IP[r$i]}:8080
            PEERS+="${PEERS:+,}$i@${RADDR[$i]}"
        done
        for i in 1 2; do WPORT[$i]=$((9000 + i)); done
        FPORT=8000
    else
        kvr_start_nats
        local a
        read -r -a a <<<"$(rd_raft_ports 3)"
        [ "${#a[@]}" = 3 ] || kvr_fail "no free raft ports"
        PEERS=""
        for i in 1 2 3; do
            RADDR[$i]=${a[$((i - 1))]}
            RHTTP[$i]=127.0.0.1:$(kvr_free_port)
            PEERS+="${PEERS:+,}$i@${RADDR[$i]}"
        done
        for i in 1 2; do WPORT[$i]=$(kvr_free_port); done
        FPORT=$(kvr_free_port)
    fi
    for i in 1 2 3; do
        RURL[$i]=http://${RHTTP[$i]}
        : "${RDATA[$i]:=$KVR_TMP/r$i}"
        chaos_router_start "$i"
    done
    for i in 1 2; do chaos_worker_start "$i"; done
    chaos_spawn fe "$KVR_BIN/kvr-frontend" --listen "127.0.0.1:$FPORT" --nats "$NATS_URL" --id 5 \
        --router-mode kv --route-timeout 200ms --route-tries 3
    F=http://127.0.0.1:$FPORT
    for i in 1 2 3; do cx_wait_http "${RURL[$i]}/ready" 30; done
    cx_wait_http "$F/health" 10
    chaos_leader 15 >/dev/null || kvr_fail "no Raft leader"
    kvr_wait_for 20 chaos_workers_up 2 1 2 3 || kvr_fail "routers never saw both workers up"
    fworkers() { cx curl -s "$F/metrics" | awk '/^kvr_frontend_live_workers / {exit !($2==2)}'; }
    kvr_wait_for 10 fworkers || kvr_fail "frontend never saw both workers"
}

chaos_spawn() { # NAME CMD...: a client-side process (hub namespace, or here)
    local name=$1
    shift
    if [ "$CHAOS_MODE" = netns ]; then kvr_netns_spawn "$name" hub "$@"; else kvr_spawn "$name" "$@"; fi
}

chaos_worker_start() {
    chaos_spawn "worker$1" "$KVR_BIN/kvr-worker" --listen "127.0.0.1:${WPORT[$1]}" --nats "$NATS_URL" \
        --namespace default --model m1 --id "$1" --speedup 10
    WURL[$1]=http://127.0.0.1:${WPORT[$1]}
}

cx_wait_http() {
    local url=$1 t=${2:-10} i code=
    for ((i = 0; i < t * 10; i++)); do
        code=$(cx curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null)
        [ "$code" = 200 ] && return 0
        sleep 0.1
    done
    kvr_fail "timed out waiting for $url (last: $code)"
}

# chaos_workers_up N ROUTERS...: every listed router sees N workers up
chaos_workers_up() {
    local n=$1 i
    shift
    for i in "$@"; do
        [ "$(r_state "$i" | jq '[.workers[] | select(.up)] | length' 2>/dev/null)" = "$n" ] || return 1
    done
}

# chaos_leader SECONDS [NOT [ROUTERS...]]: the leader id every listed router (default all)
# agrees on, other than NOT; prints it.
chaos_leader() {
    local t=$1 not=${2:-0} k i l first
    shift 2 2>/dev/null || shift $#
    local rs=("$@")
    [ ${#rs[@]} -eq 0 ] && rs=(1 2 3)
    for ((k = 0; k < t * 10; k++)); do
        first=$(r_q "${rs[0]}" .raft.leader)
        if [ -n "$first" ] && [ "$first" != 0 ] && [ "$first" != null ] && [ "$first" != "$not" ]; then
            l=ok
            for i in "${rs[@]}"; do [ "$(r_q "$i" .raft.leader)" = "$first" ] || l=; done
            [ -n "$l" ] && { echo "$first"; return 0; }
        fi
        sleep 0.1
    done
    return 1
}

# One line per router: id leader degraded bookings fsm_digest index_digest stream_seq
chaos_table() {
    local i rs=("$@")
    [ ${#rs[@]} -eq 0 ] && rs=(1 2 3)
    for i in "${rs[@]}"; do
        r_state "$i" | jq -r '"r\(.router_id) leader=\(.raft.leader) role=\(.raft.role) term=\(.raft.term) commit=\(.raft.commit_index) applied=\(.raft.applied_index) degraded=\(.raft.degraded) bookings=\(.bookings) fsm=\(.raft.fsm_digest) index=\(.index.digest) seq=\(.index.stream_seq)"' 2>/dev/null ||
            echo "r$i unreachable"
    done
}

# chaos_converged ROUTERS...: same booking digest, index digest and stream sequence, no
# bookings, not degraded, on every listed router (default all three).
chaos_converged() {
    local rs=("$@") i s f0= x0= q0=
    [ ${#rs[@]} -eq 0 ] && rs=(1 2 3)
    for i in "${rs[@]}"; do
        s=$(r_state "$i") || return 1
        [ "$(jq -r .bookings <<<"$s")" = 0 ] || return 1
        [ "$(jq -r .raft.degraded <<<"$s")" = false ] || return 1
        local f x q
        f=$(jq -r .raft.fsm_digest <<<"$s"); x=$(jq -r .index.digest <<<"$s"); q=$(jq -r .index.stream_seq <<<"$s")
        [ -n "$f" ] && [ "$f" != null ] || return 1
        if [ -z "$f0" ]; then f0=$f; x0=$x; q0=$q; continue; fi
        [ "$f" = "$f0" ] && [ "$x" = "$x0" ] && [ "$q" = "$q0" ] || return 1
    done
}

# chaos_load_start NAME CONC [load.py options]: closed-loop requests to the frontend
chaos_load_start() {
    local name=$1 conc=$2
    shift 2
    rm -f "$KVR_TMP/$name.stop" "$KVR_TMP/$name.json"
    chaos_spawn "$name" "$PY" "$HERE/load.py" "$F/v1/completions" "$conc" "$KVR_TMP/$name.stop" \
        "$KVR_TMP/$name.json" "$@"
}

# chaos_load_stop NAME [SECONDS]: stop and print the summary JSON
chaos_load_stop() {
    local name=$1 t=${2:-60}
    touch "$KVR_TMP/$name.stop"
    kvr_wait_for "$t" test -f "$KVR_TMP/$name.json" || kvr_fail "load $name did not finish in $t s"
    cat "$KVR_TMP/$name.json"
}

now_ms() { date +%s%3N; }

# chaos_figure KEY=VALUE...: one "figure:" line on stdout for the lead to quote
chaos_figure() { echo "figure[$KVR_TEST_NAME]: $*"; }

# fe_metric NAME: sum of the frontend's metric lines whose key is NAME or starts NAME{
fe_metric() {
    cx curl -s --max-time 2 "$F/metrics" |
        awk -v k="$1" '$1 == k || index($1, k "{") == 1 {s += $2} END {printf "%d\n", s}'
}
fe_ok() { fe_metric 'kvr_frontend_responses_total{status="200"}'; }

# chaos_check WHAT CMD...: a soft assertion: a failure is logged and remembered, and the case
# goes on so that every figure and every other failed assertion is still reported;
# chaos_done then fails the test naming them all.
CHAOS_FAILS=()
chaos_check() {
    local what=$1
    shift
    if ! "$@"; then
        CHAOS_FAILS+=("$what")
        kvr_log "ASSERTION FAILED [$KVR_TEST_NAME]: $what"
    fi
}
chaos_done() {
    ((${#CHAOS_FAILS[@]} == 0)) || kvr_fail "${#CHAOS_FAILS[@]} assertion(s) failed: $(printf '%s; ' "${CHAOS_FAILS[@]}")"
    kvr_pass
}

# chaos_wait SECONDS CMD...: like kvr_wait_for, but bounded by the wall clock (a check that
# queries three routers can itself take seconds when one of them is stalled).
chaos_wait() {
    local end=$(($(now_ms) + $1 * 1000))
    shift
    while :; do
        "$@" >/dev/null 2>&1 && return 0
        [ "$(now_ms)" -ge "$end" ] && return 1
        sleep 0.2
    done
}

# chaos_stream NAME BODY: one streamed request in the background (fe_client.py sse); its JSON
# summary goes to $KVR_TMP/NAME.json and the time it ended (ms) to $KVR_TMP/NAME.end.
chaos_stream() {
    chaos_spawn "$1" bash -c "'$PY' '$HERE/../frontend/fe_client.py' sse '$F/v1/completions' '$2' \
        >'$KVR_TMP/$1.json' 2>&1; date +%s%3N >'$KVR_TMP/$1.end'"
}
# w_metric I NAME: a worker's metric value
w_metric() { cx curl -s --max-time 2 "${WURL[$1]}/metrics" | awk -v k="$2" '$1 == k {printf "%d\n", $2; exit}'; }
