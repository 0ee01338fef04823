#!/usr/bin/env bash
# --nats with several URLs (a cluster): the first one dead. Both of the router's connections
# (the core one and cnats' JetStream one) must move on to the next URL: the router becomes
# ready and ingests events. (cnats read the comma-separated list as one bad URL, so the
# JetStream connection never connected and the router never became ready.)
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_nats_urls
kvr_start_nats
DEAD=$(kvr_free_port)
GOOD=$NATS_URL
NATS_URL="nats://127.0.0.1:$DEAD, $GOOD"
rd_beat beat1 ns1 1
P1=$(kvr_free_port)
rd_start r1 1 "$P1" "$KVR_TMP/r1" --heartbeat-misses 30
NATS_URL=$GOOD
kvr_wait_http "http://127.0.0.1:$P1/ready" 20
seq=$(rd_pub "store ns1 1 array int 5 0 2")
[ -n "$seq" ] || kvr_fail "publish failed"
rd_wait_seq "$P1" "$seq" 20
kvr_assert_eq "$(rd_match "$P1" 5 128)" '{"1":2}' "events applied"
kvr_pass
