#!/usr/bin/env bash
# Defect 12 (issue 18): a router started before nats-server must become ready once the server
# comes up, and ingest the events published after it: its JetStream stream set-up is retried
# until it succeeds (the retry timer's callback used to be handed the timer, not the router).
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_nats_late
# the port the server will listen on, chosen now; nothing listens there yet
KVR_NATS_PORT=$(kvr_free_port)
NATS_URL="nats://127.0.0.1:$KVR_NATS_PORT"
P1=$(kvr_free_port)
rd_start r1 1 "$P1" "$KVR_TMP/r1" --heartbeat-misses 30
kvr_wait_http "http://127.0.0.1:$P1/health" 15
# the first stream set-up times out (JetStream requests wait 5 s), then the retry timer fires
# 1 s later: start the server only once a retry must have run
failed() { grep -q 'ensuring stream failed' "$KVR_TMP/r1.log"; }
kvr_wait_for 20 failed || kvr_fail "stream set-up never failed without a server"
sleep 2
kvr_alive r1 || kvr_fail "router exited while nats-server was down"
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$P1/ready")
[ "$code" = 200 ] && kvr_fail "router ready without a stream"
kvr_start_nats
rd_beat beat1 ns1 1
kvr_wait_http "http://127.0.0.1:$P1/ready" 30
seq=$(rd_pub "store ns1 1 array int 5 0 2" "store ns1 1 map bytes 6 0 3")
[ -n "$seq" ] || kvr_fail "publish failed"
rd_wait_seq "$P1" "$seq" 20
kvr_assert_eq "$(rd_match "$P1" 6 192)" '{"1":3}' "events published after the late start applied"
kvr_alive r1 || kvr_fail "router died"
kvr_pass
