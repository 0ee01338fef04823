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
kvr_log "fallback: $(grep "^sent=" <<<"$out")"
if plain=$(timeout 60 "$KVR_BIN/test_nats_fallback" "$NATS_URL" plain 2>&1); then
    kvr_fail "plain publish lost nothing where nobody subscribed: the test cannot tell ($plain)"
fi
kvr_log "plain publish (expected to lose phase 2): $(grep "^sent=" <<<"$plain")"
# a publisher whose permissions predate the subject: the server refuses t.lead with an -ERR
# (no 503); everything must still reach the fallback
url1=$NATS_URL
KVR_NATS_PORT='' KVR_NATS_EXTRA_CONF='authorization { users = [
  { user: pub, password: pw, permissions: { publish: { allow: ["t.any"] }, subscribe: { allow: ["_INBOX.>"] } } },
  { user: any, password: pw } ] }' kvr_start_nats nats2
port2=${NATS_URL##*:}
out=$(timeout 60 "$KVR_BIN/test_nats_fallback" "nats://any:pw@127.0.0.1:$port2" denied \
    "nats://pub:pw@127.0.0.1:$port2" 2>&1) || kvr_fail "denied: $out"
kvr_log "denied: $(grep '^denied:' <<<"$out")"
grep -q 'may not publish on a subject' <<<"$out" || kvr_fail "no warning about the refused subject: $out"
NATS_URL=$url1
kvr_pass
