# nats_lib.sh: helpers for the NATS chaos cases (source after tests/lib/testenv.sh).
kvr_need_bins kvr-worker kvr-frontend kvr-routerd

# nc_state PORT: a router's /v1/state; nc_q PORT JQ: one field of it
nc_state() { curl -s --max-time 2 "http://127.0.0.1:$1/v1/state"; }
nc_q() { nc_state "$1" | jq -r "$2"; }
nc_now_ms() { echo $(($(date +%s%N) / 1000000)); }

# nc_load_start URL SECONDS [PARALLEL]: requests through the frontend in the background, each
# with its own prompt prefix (new KV blocks on the workers, so KV events flow); one status per
# line in $KVR_TMP/load.codes. nc_load_wait waits for it to end.
nc_load_start() {
    local url=$1 secs=$2 par=${3:-4}
    : >"$KVR_TMP/load.codes"
    (
        end=$(($(date +%s) + secs))
        i=0
        while [ "$(date +%s)" -lt "$end" ]; do
            seq $((i + 1)) $((i + par)) | xargs -P "$par" -I{} curl -s -o /dev/null \
                -w '%{http_code}\n' --max-time 20 \
                -d "{\"model\":\"m1\",\"prompt\":\"request {} of the chaos load: some words to fill more than one block of sixty-four byte tokens, and then some more words so that two blocks are stored\",\"max_tokens\":4}" \
                "$url/v1/completions" >>"$KVR_TMP/load.codes"
            i=$((i + par))
        done
    ) &
    NC_LOAD_PID=$!
}
nc_load_wait() { wait "$NC_LOAD_PID"; }
# nc_load_report: "N requests, M not 200" and returns 1 if any failed
nc_load_report() {
    local n bad
    n=$(wc -l <"$KVR_TMP/load.codes")
    bad=$(grep -vc '^200$' "$KVR_TMP/load.codes")
    kvr_log "load: $n requests, $bad not 200 ($(sort "$KVR_TMP/load.codes" | uniq -c | tr '\n' ' '))"
    [ "$bad" = 0 ]
}

# nc_stream_leader MONPORT: server name of KVR_EVENTS' leader, from a node's /jsz
nc_stream_leader() {
    curl -s --max-time 2 "http://127.0.0.1:$1/jsz?streams=true&config=true" |
        jq -r '.account_details[0].stream_detail[] | select(.name == "KVR_EVENTS") | .cluster.leader'
}
# nc_js_request URL SUBJECT: one NATS request (empty payload) over a raw socket; prints the reply
nc_js_request() {
    /usr/bin/python3 - "$1" "$2" <<'PY'
import socket, sys
host, port = sys.argv[1].split("//")[1].split(":")
s = socket.create_connection((host, int(port)), timeout=5)
s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB _INBOX.nclib 1\r\n'
          b'PUB ' + sys.argv[2].encode() + b' _INBOX.nclib 0\r\n\r\n')
buf = b""
while b"\r\nMSG " not in b"\r\n" + buf:
    d = s.recv(65536)
    if not d:
        sys.exit(1)
    buf += d
    if buf.startswith(b"PING"):
        s.sendall(b"PONG\r\n")
i = (b"\r\n" + buf).index(b"\r\nMSG ")
hdr_end = buf.index(b"\r\n", i)
n = int(buf[i:hdr_end].split()[-1])
while len(buf) < hdr_end + 2 + n:
    buf += s.recv(65536)
print(buf[hdr_end + 2:hdr_end + 2 + n].decode())
PY
}
# nc_move_stream_leader WANT MONPORT URL: step KVR_EVENTS' leader down until server WANT leads
nc_move_stream_leader() {
    local want=$1 mon=$2 url=$3 k cur
    for ((k = 0; k < 12; k++)); do
        cur=$(nc_stream_leader "$mon")
        [ "$cur" = "$want" ] && return 0
        nc_js_request "$url" '$JS.API.STREAM.LEADER.STEPDOWN.KVR_EVENTS' >/dev/null
        kvr_wait_for 10 bash -c "l=\$(curl -s 'http://127.0.0.1:$mon/jsz?streams=true&config=true' | jq -r '.account_details[0].stream_detail[] | select(.name == \"KVR_EVENTS\") | .cluster.leader'); [ -n \"\$l\" ] && [ \"\$l\" != null ] && [ \"\$l\" != '$cur' ]"
    done
    [ "$(nc_stream_leader "$mon")" = "$want" ]
}
