#!/usr/bin/env bash
# kvr_nats against a real nats-server -js: core pub/sub, async request/reply, no-responders,
# timeouts (the loop-native core client); JetStream stream + ordered consumer, its messages
# handed from cnats' thread to the loop with backpressure and none lost; close.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init routerd_nats
kvr_start_nats
"$KVR_BIN/test_routerd_nats" "$NATS_URL" || kvr_fail "test_routerd_nats failed"
kvr_pass
