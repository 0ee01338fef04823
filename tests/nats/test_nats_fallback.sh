#!/bin/bash
# nats_fallback: kvr_nats_publish_fallback against a real nats-server (test_nats_fallback.c
# says how): a message published where nobody subscribes reaches the fallback subject, one
# with a subscriber never does, and none is lost or doubled while the subscriber changes.
# Without the fallback (plain publish) the messages of the gap are lost: checked too.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init nats_fallback
kvr_need_bins test_nats_fallback
kvr_start_nats
out=$(timeout 60 "$KVR_BIN/test_nats_fallback" "$NATS_URL" 2>&1) || kvr_fail "fallback: $out"
kvr_log "fallback: $out"
if plain=$(timeout 60 "$KVR_BIN/test_nats_fallback" "$NATS_URL" plain 2>&1); then
    kvr_fail "plain publish lost nothing where nobody subscribed: the test cannot tell ($plain)"
fi
kvr_log "plain publish (expected to lose phase 2): $plain"
kvr_pass
