#!/usr/bin/env bash
# nats-server killed and restarted under a running router (same port, same store): the router
# reconnects, re-creates its consumer from the last applied sequence + 1 and catches up.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_nats_restart
kvr_start_nats
rd_beat beat1 ns1 1
P1=$(kvr_free_port)
rd_start r1 1 "$P1" "$KVR_TMP/r1" --heartbeat-misses 30
kvr_wait_http "http://127.0.0.1:$P1/ready" 15
seq=$(rd_pub "store ns1 1 array int 5 0 2" "store ns1 1 map bytes 6 0 3")
rd_wait_seq "$P1" "$seq"
for round in 1 2; do
    kvr_kill9 nats
    sleep 1
    kvr_start_nats
    # publish as soon as the server is back; the router has to notice and catch up
    seq=$(rd_pub "store ns1 1 array int $((10 + round)) 0 2" "store ns1 1 map int $((20 + round)) 0 1")
    [ -n "$seq" ] || kvr_fail "publish after restart failed"
    rd_wait_seq "$P1" "$seq" 30
done
kvr_assert_eq "$(rd_match "$P1" 12 128)" '{"1":2}' "events published after the restart applied"
kvr_assert_eq "$(rd_match "$P1" 6 192)" '{"1":3}' "events from before the restart kept"
kvr_assert_eq "$(rd_q "$P1" .index.stream_seq)" "$seq" "caught up"
reconnects=$(rd_metric "$P1" kvr_routerd_nats_reconnects_total)
[ "${reconnects:-0}" -ge 2 ] || kvr_fail "reconnects metric: ${reconnects:-none}"
# routing still works over the new connection
out=$(printf 'route m1 ns1 12 128 rq-after\n' | "$PUB" --nats "$NATS_URL" | grep '^route')
case "$out" in "route ok=1 worker=1 overlap=2 "*) ;; *) kvr_fail "route after reconnect: $out" ;; esac
kvr_pass
