# rd_lib.sh: helpers for routerd integration tests (source after tests/lib/testenv.sh).
PUB="$KVR_BIN/kvr-test-pub"

# rd_start NAME ID PORT DATA_DIR [EXTRA ARGS...]: start kvr-routerd on 127.0.0.1:PORT.
rd_start() {
    local name=$1 id=$2 port=$3 dir=$4
    shift 4
    kvr_spawn "$name" "$KVR_BIN/kvr-routerd" --id "$id" --nats "$NATS_URL" \
        --http "127.0.0.1:$port" --data-dir "$dir" "$@"
}

# rd_state PORT: GET /v1/state
rd_state() { curl -s --max-time 2 "http://127.0.0.1:$1/v1/state"; }
# rd_q PORT JQ: a field of /v1/state
rd_q() { rd_state "$1" | jq -r "$2"; }
# rd_match PORT PREFIX NTOKENS: the overlaps object of /v1/match, compact, keys sorted
rd_match() {
    "$PUB" tokens "$2" "$3" | curl -s --max-time 2 -X POST --data @- "http://127.0.0.1:$1/v1/match" |
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
