#!/usr/bin/env bash
# The index is a function of the KV stream alone (issue 18, defect 5): a worker restarts, and
# its new incarnation's AllBlocksCleared and first events reach the stream before its first
# heartbeat with the new started_ms. Router 1 applies them live, then hears that heartbeat;
# router 2 starts afterwards and replays the stream. Both must end with the same index (the
# new incarnation's entries). Before, a router cleared a worker's entries when it heard a
# new started_ms: router 1 dropped the new incarnation's entries, router 2 kept them.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_index_stream
kvr_start_nats
rd_beat beat1 ns1 1 64 1000
P1=$(kvr_free_port)
P2=$(kvr_free_port)
rd_start r1 1 "$P1" "$KVR_TMP/r1"
kvr_wait_http "http://127.0.0.1:$P1/ready" 15
kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:$P1/v1/state | jq -r '.workers[] | select(.id==1) | .started_ms')\" = 1000 ]" ||
    kvr_fail "router 1 never heard worker 1"
seq=$(rd_pub "store ns1 1 array int 7 0 4")
rd_wait_seq "$P1" "$seq"
kvr_assert_eq "$(rd_match "$P1" 7 320)" '{"1":4}' "first incarnation's entries"

# the restart: the new incarnation clears and stores (prefix 8) before its first beat
kvr_kill9 beat1
seq=$(rd_pub "clear ns1 1 array" "store ns1 1 array int 8 0 3")
rd_wait_seq "$P1" "$seq"
rd_beat beat1 ns1 1 64 2000
kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:$P1/v1/state | jq -r '.workers[] | select(.id==1) | .started_ms')\" = 2000 ]" ||
    kvr_fail "router 1 never heard the restart"
sleep 0.5

# router 2 replays the stream with the worker already restarted
rd_start r2 2 "$P2" "$KVR_TMP/r2"
kvr_wait_http "http://127.0.0.1:$P2/ready" 15
rd_wait_seq "$P2" "$seq"
kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:$P2/v1/state | jq -r '.workers[] | select(.id==1) | .started_ms')\" = 2000 ]" ||
    kvr_fail "router 2 never heard worker 1"
sleep 0.5
m1=$(rd_match "$P1" 8 256) m2=$(rd_match "$P2" 8 256)
kvr_log "router 1: $m1 $(rd_q "$P1" .index.entries) entries; router 2: $m2 $(rd_q "$P2" .index.entries) entries"
kvr_assert_eq "$m1" '{"1":3}' "router 1 keeps the new incarnation's entries"
kvr_assert_eq "$m2" '{"1":3}' "router 2 (replayed) has them too"
kvr_assert_eq "$(rd_match "$P1" 7 320)" '{}' "router 1: the first incarnation's entries cleared by the stream"
kvr_assert_eq "$(rd_q "$P1" .index.digest)" "$(rd_q "$P2" .index.digest)" "same digest"
kvr_pass
