# rd_lib.sh: helpers for routerd integration tests (source after tests/lib/testenv.sh).
PUB="$KVR_BIN/kvr-test-pub"

# rd_token: path of the test's router admin token file (created on first use; every router
# rd_start starts takes it, and RD_AUTH holds the matching curl header arguments).
rd_token() {
    if [ ! -s "$KVR_TMP/admin-token" ]; then
        (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$KVR_TMP/admin-token")
    fi
    RD_AUTH=(-H "Authorization: Bearer $(cat "$KVR_TMP/admin-token")")
    echo "$KVR_TMP/admin-token"
}
# rd_post PORT PATH [CURL ARGS...]: an authorized POST to a router (body from the args)
rd_post() {
    local port=$1 path=$2
    shift 2
    rd_token >/dev/null
    curl -s --max-time 5 -X POST "${RD_AUTH[@]}" "$@" "http://127.0.0.1:$port$path"
}

# rd_start NAME ID PORT DATA_DIR [EXTRA ARGS...]: start kvr-routerd on 127.0.0.1:PORT.
rd_start() {
    local name=$1 id=$2 port=$3 dir=$4
    shift 4
    kvr_spawn "$name" "$KVR_BIN/kvr-routerd" --id "$id" --nats "$NATS_URL" \
        --http "127.0.0.1:$port" --data-dir "$dir" --admin-token-file "$(rd_token)" "$@"
}

# rd_state PORT: GET /v1/state
rd_state() { curl -s --max-time 2 "http://127.0.0.1:$1/v1/state"; }
# rd_q PORT JQ: a field of /v1/state
rd_q() { rd_state "$1" | jq -r "$2"; }
# rd_match PORT PREFIX NTOKENS: the overlaps object of /v1/match, compact, keys sorted
rd_match() {
    "$PUB" tokens "$2" "$3" | rd_post "$1" /v1/match --data @- |
        jq -cS .overlaps
}
# rd_pub SCRIPT...: publish script lines through JetStream; prints the last stream sequence
rd_pub() { printf '%s\n' "$@" | "$PUB" --nats "$NATS_URL" | sed -n 's/^last_seq=//p'; }
# rd_wait_seq PORT SEQ [SECONDS]: until the router's index covers stream sequence SEQ
rd_wait_seq() {
    local port=$1 want=$2 t=${3:-20} i got=
    for ((i = 0; i < t * 10; i++)); do
        got=$(rd_q "$port" .index.stream_seq 2>/dev/null)
        [ -n "$got" ] && [ "$got" != null ] && [ "$got" -ge "$want" ] && return 0
        sleep 0.1
    done
    kvr_fail "router on $port did not reach stream seq $want (at '$got')"
}
# rd_beat NAME NS W [BS] [STARTED_MS]: a background heartbeat loop (100 ms period)
rd_beat() {
    kvr_spawn "$1" "$PUB" --nats "$NATS_URL" beat-loop "$2" "$3" m1 "http://127.0.0.1:1/w$3" \
        "${4:-64}" "${5:-1000}" 100
}
# rd_metric PORT NAME: value of a metric line (first match, full line key)
rd_metric() {
    curl -s --max-time 2 "http://127.0.0.1:$1/metrics" | awk -v k="$2" '$1 == k {print $2; exit}'
}
# rd_raft_ports N: N "host:port" Raft addresses below the ephemeral range (32768+), each with
# port+1 free too (kvr_sync's forwarding port), derived from the test name and our pid.
rd_raft_ports() {
    /usr/bin/python3 - "$1" "$KVR_TEST_NAME" "$$" <<'PY'
import socket, sys, zlib
n, name, pid = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
base = 20000 + (zlib.crc32(name.encode()) + pid * 7) % 1200 * 10
out = []
p = base
while len(out) < n and p < 32700:
    if free(p) and free(p + 1):
        out.append("127.0.0.1:%d" % p)
    p += 2
print(" ".join(out))
PY
}

# rd_port_avoiding ADDR...: a free port from the OS that is none of the given raft addresses
# ports nor the port after each (the router's forward port), which the routers bind only later
rd_port_avoiding() {
    local p a ok
    while :; do
        p=$(kvr_free_port)
        ok=1
        for a in "$@"; do
            [ "$p" = "${a##*:}" ] || [ "$p" = "$((${a##*:} + 1))" ] && ok=0
        done
        [ $ok = 1 ] && { echo "$p"; return; }
    done
}
# rd_secret FILE: a fresh 32-byte hex secret (cluster secret), readable by us only.
rd_secret() { (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$1"); }

# rd_common_leader PORT...: waits up to 10 s until every router (HTTP ports) names the same
# Raft leader and prints its id; prints nothing if they never agree.
rd_common_leader() {
    local k l p ok
    for ((k = 0; k < 200; k++)); do
        l=$(rd_q "$1" .raft.leader 2>/dev/null)
        if [ -n "$l" ] && [ "$l" != 0 ] && [ "$l" != null ]; then
            ok=1
            for p in "${@:2}"; do [ "$(rd_q "$p" .raft.leader)" = "$l" ] || ok=0; done
            [ $ok = 1 ] && { echo "$l"; return 0; }
        fi
        sleep 0.05
    done
}

# rd_wait_workers_up PORT N SECONDS: the router on PORT lists N workers up.
rd_wait_workers_up() {
    kvr_wait_for "$3" bash -c "[ \"\$(curl -s http://127.0.0.1:$1/v1/state | jq '[.workers[] | select(.up)] | length')\" = $2 ]"
}
