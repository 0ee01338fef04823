#!/usr/bin/env bash
# The loop-native client follows the cluster: given only server A of a two-server cluster, it
# adds B from INFO connect_urls, and when A is SIGKILLed it reconnects to B (kvr_nats' core
# connection; the request after the failover goes through B).
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init nats_discover
T="$KVR_BIN/test_routerd_nats"
ca=$(kvr_free_port) cb=$(kvr_free_port) pa=$(kvr_free_port) pb=$(kvr_free_port)
for n in a b; do
    mkdir -p "$KVR_TMP/$n"
    [ $n = a ] && { p=$pa; c=$ca; } || { p=$pb; c=$cb; }
    cat >"$KVR_TMP/$n/nats.conf" <<CONF
listen: 127.0.0.1:$p
server_name: $n
cluster { name: kvr, listen: 127.0.0.1:$c, routes: ["nats://127.0.0.1:$ca", "nats://127.0.0.1:$cb"] }
CONF
    kvr_spawn "nats$n" nats-server -c "$KVR_TMP/$n/nats.conf"
done
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
kvr_wait_for 10 up $pa || kvr_fail "server a"
kvr_wait_for 10 up $pb || kvr_fail "server b"
"$T" "nats://127.0.0.1:$pa" discover >"$KVR_TMP/client.out" 2>&1 &
client=$!
seen() { grep -q "nats server discovered.*server=127.0.0.1:$pb" "$KVR_TMP/client.out"; }
kvr_wait_for 20 seen || { cat "$KVR_TMP/client.out" >&2; kvr_fail "B never learned from connect_urls"; }
kill -KILL "$(kvr_pid natsa)"
wait $client || { cat "$KVR_TMP/client.out" >&2; kvr_fail "no failover to the discovered server"; }
grep -q "nats reconnected.*server=127.0.0.1:$pb" "$KVR_TMP/client.out" || kvr_fail "reconnected, but not to B"
kvr_pass
