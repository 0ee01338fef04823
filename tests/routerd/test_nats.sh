#!/usr/bin/env bash
# kvr_nats against a real nats-server -js: pub/sub with backpressure, async request/reply,
# no-responders, timeouts, JetStream stream + ordered consumer, close; with the loop-native core
# client, with cnats threads (as TLS uses), and one of each.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init routerd_nats
kvr_start_nats
for mode in native threaded mixed; do
    "$KVR_BIN/test_routerd_nats" "$NATS_URL" "$mode" || kvr_fail "test_routerd_nats $mode failed"
done
kvr_pass
