#!/usr/bin/env bash
# A restarted router whose forward port (Raft port + 1) or Raft port is still held for a moment
# waits for it with backoff (up to 10 s) instead of exiting (issue 18, defect 14).
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_raft_port_busy
[ -x "$KVR_BIN/kvr-routerd" ] || kvr_fail "no kvr-routerd"
kvr_start_nats
read -r A1 <<<"$(rd_raft_ports 1)"
[ -n "$A1" ] || kvr_fail "no free raft port"
P=${A1##*:}
HP=$(kvr_free_port)
hold() { # hold PORT SECONDS: listen on 127.0.0.1:PORT for SECONDS, print "held" once bound
    /usr/bin/python3 -c '
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1); print("held", flush=True)
time.sleep(float(sys.argv[2]))' "$1" "$2"
}
for port in $((P + 1)) "$P"; do
    rm -rf "$KVR_TMP/r1"
    hold "$port" 2 >"$KVR_TMP/hold.out" &
    HOLD=$!
    kvr_wait_for 5 grep -q held "$KVR_TMP/hold.out" || kvr_fail "could not hold port $port"
    rd_start r1 1 "$HP" "$KVR_TMP/r1" --raft-addr "$A1" --peers "1@$A1"
    kvr_wait_http "http://127.0.0.1:$HP/ready" 20 || kvr_fail "router did not start while port $port was briefly busy"
    grep -q "port busy, waiting" "$KVR_TMP/r1.log" || kvr_fail "no log line about waiting for port $port"
    [ "$(rd_q "$HP" .raft.leader)" = 1 ] || kvr_fail "single router is not its own leader"
    wait "$HOLD"
    kvr_term r1 10 >/dev/null
    : >"$KVR_TMP/r1.log"
done
kvr_pass
