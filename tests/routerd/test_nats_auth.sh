#!/usr/bin/env bash
# kvr_nats authentication against real nats-servers: user/password and token, given in the URL
# or as options; each check covers both connections a kvr_nats makes (the loop-native core
# client, and cnats for JetStream); refused credentials never connect.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init routerd_nats_auth
T="$KVR_BIN/test_routerd_nats"

KVR_NATS_EXTRA_CONF='authorization { users = [ { user: "alice", password: "s3cret" } ] }' kvr_start_nats users
port=$KVR_NATS_PORT
"$T" "nats://alice:s3cret@127.0.0.1:$port" connect || kvr_fail "user/password in the URL"
"$T" "nats://127.0.0.1:$port" connect user=alice:s3cret || kvr_fail "user/password as options"
"$T" "nats://alice:wrong@127.0.0.1:$port" noconnect || kvr_fail "a wrong password connected"
"$T" "nats://127.0.0.1:$port" noconnect || kvr_fail "no credentials connected"

unset KVR_NATS_PORT
KVR_NATS_EXTRA_CONF='authorization { token: "t0ken" }' kvr_start_nats token
port=$KVR_NATS_PORT
"$T" "nats://t0ken@127.0.0.1:$port" connect || kvr_fail "token in the URL"
"$T" "nats://127.0.0.1:$port" connect token=t0ken || kvr_fail "token as an option"
"$T" "nats://127.0.0.1:$port" noconnect token=nope || kvr_fail "a wrong token connected"
kvr_pass
