#!/bin/bash
# nats_drain: kvr_nats_drain against a real nats-server (test_nats_drain.c says how): a
# subscriber that leaves a queue group mid-stream loses none of the messages the server had
# already routed to it. Figure: messages each subscriber got, where A left.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init nats_drain
kvr_need_bins test_nats_drain
kvr_start_nats
out=$(timeout 60 "$KVR_BIN/test_nats_drain" "$NATS_URL" 2>&1) || kvr_fail "drain: $out"
kvr_log "drain: $out"
kvr_pass
