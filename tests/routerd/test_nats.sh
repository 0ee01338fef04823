#!/usr/bin/env bash
# kvr_nats against a real nats-server -js: pub/sub with backpressure, async request/reply,
# no-responders, timeouts, JetStream stream + ordered consumer, close.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init routerd_nats
kvr_start_nats
"$KVR_BIN/test_routerd_nats" "$NATS_URL" || kvr_fail "test_routerd_nats failed"
kvr_pass
