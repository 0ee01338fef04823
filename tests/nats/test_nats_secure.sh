#!/usr/bin/env bash
# kvr_nats against real nats-servers with NKEY, creds (operator/JWT), TLS and mutual TLS; each
# check covers both connections a kvr_nats makes (the loop-native core client answers a
# request, cnats' JetStream connection gets a JetStream API answer); wrong credentials, an
# unknown CA, a certificate for another host and a plaintext client never connect. Keys, JWTs and
# certificates are made here (nkeys.py with python3-cryptography, openssl).
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init nats_secure
T="$KVR_BIN/test_routerd_nats"
K="$KVR_TMP/keys"
mkdir -p "$K"
NK="python3 $(dirname "$0")/nkeys.py"

both() { # both connect|noconnect URL OPTS... : the core and the JetStream connection
    local want=$1 url=$2
    shift 2
    "$T" "$url" "$want" "$@" || kvr_fail "$want $url $*"
}

# --- NKEY: the server knows alice's public key; bob's seed is refused
$NK user "$K" alice && $NK user "$K" bob
KVR_NATS_EXTRA_CONF="authorization { users = [ { nkey: $(cat "$K/alice.pub") } ] }" kvr_start_nats nkey
both connect "$NATS_URL" "nkey=$K/alice.seed"
both noconnect "$NATS_URL" "nkey=$K/bob.seed"
"$T" "$NATS_URL" noconnect || kvr_fail "no credentials connected to an nkey server"

# --- creds: operator mode, one account; a user JWT signed by that account connects, the same
# JWT with another user's seed does not
$NK operator "$K" && $NK creds "$K" carol && $NK creds "$K" dave
sed -n '/BEGIN NATS USER JWT/,/END NATS USER JWT/p' "$K/carol.creds" >"$K/mixed.creds"
sed -n '/BEGIN USER NKEY SEED/,/END USER NKEY SEED/p' "$K/dave.creds" >>"$K/mixed.creds"
unset KVR_NATS_PORT
KVR_NATS_EXTRA_CONF="operator: \"$K/op.jwt\"
$(cat "$K/resolver.conf")" kvr_start_nats creds
both connect "$NATS_URL" "creds=$K/carol.creds"
both noconnect "$NATS_URL" "creds=$K/mixed.creds"
"$T" "$NATS_URL" noconnect nkey="$K/alice.seed" || kvr_fail "a bare nkey connected in operator mode"

# --- TLS: a CA, a server certificate for 127.0.0.1 only, a client certificate; another CA
mkcert() { # mkcert NAME CA SUBJECT_ALT_NAME|-
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
        -keyout "$K/$1.key" -out "$K/$1.csr" 2>/dev/null
    local ext="$K/$1.ext"
    echo "basicConstraints=CA:FALSE" >"$ext"
    [ "$3" != - ] && echo "subjectAltName=$3" >>"$ext"
    openssl x509 -req -in "$K/$1.csr" -CA "$K/$2.crt" -CAkey "$K/$2.key" -CAcreateserial \
        -days 2 -extfile "$ext" -out "$K/$1.crt" 2>/dev/null || kvr_fail "openssl: $1"
}
for ca in ca evilca; do
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=$ca" -keyout "$K/$ca.key" -out "$K/$ca.crt" 2>/dev/null || kvr_fail "openssl ca"
done
mkcert server ca "IP:127.0.0.1"
mkcert client ca -
mkcert evilclient evilca -

unset KVR_NATS_PORT
KVR_NATS_EXTRA_CONF="tls { cert_file: \"$K/server.crt\", key_file: \"$K/server.key\" }" \
    kvr_start_nats tls
port=$KVR_NATS_PORT
both connect "nats://127.0.0.1:$port" "ca=$K/ca.crt"
both connect "tls://127.0.0.1:$port" "ca=$K/ca.crt"
both noconnect "nats://127.0.0.1:$port" "ca=$K/evilca.crt"
# the certificate names 127.0.0.1, not localhost: the host name check must refuse it
"$T" "tls://localhost:$port" noconnect "ca=$K/ca.crt" || kvr_fail "native: a certificate for another host was accepted"
# a plaintext client is refused by a TLS-only server
both noconnect "nats://127.0.0.1:$port"

# --- mutual TLS plus a user: the server verifies client certificates
unset KVR_NATS_PORT
KVR_NATS_EXTRA_CONF="tls { cert_file: \"$K/server.crt\", key_file: \"$K/server.key\", ca_file: \"$K/ca.crt\", verify: true }
authorization { users = [ { user: \"erin\", password: \"pw-erin\" } ] }" kvr_start_nats mtls
port=$KVR_NATS_PORT
both connect "nats://127.0.0.1:$port" "user=erin:pw-erin" "ca=$K/ca.crt" "cert=$K/client.crt" "key=$K/client.key"
both noconnect "nats://127.0.0.1:$port" "user=erin:pw-erin" "ca=$K/ca.crt"
both noconnect "nats://127.0.0.1:$port" "user=erin:pw-erin" "ca=$K/ca.crt" "cert=$K/evilclient.crt" "key=$K/evilclient.key"
both noconnect "nats://127.0.0.1:$port" "user=erin:wrong" "ca=$K/ca.crt" "cert=$K/client.crt" "key=$K/client.key"
kvr_pass
