#!/usr/bin/env bash
# The scale-to-zero scalers (scaler/scaler.h) against real processes: the exec back end runs
# real scripts (success, retried failures, a hang killed with what it started); the kubernetes
# back end PATCHes a stand-in API server over HTTPS with a CA made here, which checks the
# bearer token, path, content type and body of every request, and injects 401, 404, 409, 5xx,
# a rotated token and a hang.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init scaler
kvr_need_bins kvr-test-scale
CLI="$KVR_BIN/kvr-test-scale"
T=$KVR_TMP
HERE=$(cd "$(dirname "$0")" && pwd)

# ---- exec ----
cat >"$T/ok.sh" <<SH
#!/bin/sh
echo "\$1 \$2 \$3" >>"$T/exec.log"
SH
cat >"$T/flaky.sh" <<SH
#!/bin/sh
n=\$(cat "$T/flaky.n" 2>/dev/null || echo 0); n=\$((n + 1)); echo \$n >"$T/flaky.n"
[ \$n -ge 3 ] || exit 7
echo "\$1 \$2 \$3" >>"$T/exec.log"
SH
cat >"$T/hang.sh" <<SH
#!/bin/sh
sleep 300 &
echo \$! >>"$T/hang.pids"
wait
SH
chmod +x "$T"/*.sh

out=$("$CLI" exec "$T/ok.sh" ns1:m1:pool-a:3) || kvr_fail "exec ok: $out"
kvr_assert_eq "$(cat "$T/exec.log")" "ns1 m1 3" "exec arguments"
grep -q "stats ok=1 failed=0 retries=0 attempts=1" <<<"$out" || kvr_fail "exec stats: $out"

out=$("$CLI" exec "$T/flaky.sh" --backoff-ms 20 ns1:m1:pool-a:0) || kvr_fail "exec flaky: $out"
grep -q "stats ok=1 failed=0 retries=2 attempts=3" <<<"$out" || kvr_fail "exec retries: $out"
kvr_assert_eq "$(tail -1 "$T/exec.log")" "ns1 m1 0" "exec arguments after retries"

t0=${EPOCHREALTIME/./}
out=$("$CLI" exec "$T/hang.sh" --timeout-ms 300 --attempts 2 --backoff-ms 20 ns1:m1:p:1) &&
    kvr_fail "a hanging scaler succeeded: $out"
el=$(((${EPOCHREALTIME/./} - t0) / 1000))
((el < 3000)) || kvr_fail "hang: took $el ms for 2 attempts of 300 ms"
grep -q "status=-8 error=.*timed out after 300 ms" <<<"$out" || kvr_fail "hang result: $out"
grep -q "attempts=2" <<<"$out" || kvr_fail "hang attempts: $out"
# the scaler's children went with it (the whole process group is killed)
sleep 0.2
while read -r p; do
    # a killed child can stay a zombie until its new parent reaps it: dead all the same
    st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)
    [ -z "$st" ] || [ "$st" = Z ] || kvr_fail "the hung scaler's child $p is still running ($st)"
done <"$T/hang.pids"

out=$("$CLI" exec "$T/missing.sh" --attempts 2 --backoff-ms 10 ns1:m1:p:1) &&
    kvr_fail "a missing command succeeded"
grep -q "cannot run" <<<"$out" || kvr_fail "missing command: $out"

# closing the scaler fails what is pending, kills the child, and returns
out=$("$CLI" exec "$T/hang.sh" --timeout-ms 60000 --close-after-ms 200 ns1:m1:p:1) &&
    kvr_fail "closed op succeeded"
grep -q "status=-10" <<<"$out" || kvr_fail "close: $out"

# ---- kubernetes ----
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=test-ca" \
    -keyout "$T/ca.key" -out "$T/ca.crt" 2>/dev/null || kvr_fail "CA"
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$T/srv.key" \
    -out "$T/srv.csr" 2>/dev/null || kvr_fail "server csr"
printf 'subjectAltName=IP:127.0.0.1\n' >"$T/san.ext"
openssl x509 -req -in "$T/srv.csr" -CA "$T/ca.crt" -CAkey "$T/ca.key" -CAcreateserial \
    -days 1 -extfile "$T/san.ext" -out "$T/srv.crt" 2>/dev/null || kvr_fail "server cert"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=other-ca" \
    -keyout "$T/other.key" -out "$T/other.crt" 2>/dev/null || kvr_fail "other CA"

# kube_case NAME PLAN: starts the stand-in with PLAN; sets URL and LOG
kube_case() {
    local name=$1 plan=$2
    LOG="$T/$name.jsonl"
    head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$T/token"
    rm -f "$T/$name.port"
    kvr_spawn "kube-$name" /usr/bin/python3 "$HERE/fake_kube.py" "$T/$name.port" "$T/srv.crt" \
        "$T/srv.key" "$T/token" "$LOG" "$plan"
    kvr_wait_for 10 test -s "$T/$name.port" || kvr_fail "stand-in API server did not start"
    URL="https://127.0.0.1:$(cat "$T/$name.port")"
}
kube() { "$CLI" kube "$URL" "$T/token" "$T/ca.crt" kvr-system "$@"; }

kube_case ok 200
out=$(kube pool:m:vllm-llama:4) || kvr_fail "kube ok: $out"
rec=$(head -1 "$LOG")
kvr_assert_eq "$(jq -r .path <<<"$rec")" "/apis/apps/v1/namespaces/kvr-system/deployments/vllm-llama/scale" "path"
kvr_assert_eq "$(jq -r .ctype <<<"$rec")" "application/merge-patch+json" "content type"
kvr_assert_eq "$(jq -r .auth_ok <<<"$rec")" "true" "bearer token"
kvr_assert_eq "$(jq -c '.body | fromjson' <<<"$rec")" '{"spec":{"replicas":4}}' "body"
# to zero: the API omits spec.replicas 0 in its answer
out=$(kube pool:m:vllm-llama:0) || kvr_fail "kube to zero: $out"
# kubectl's kind/NAME: a StatefulSet pool (vllm-bridge.yaml's engines) and an explicit Deployment
: >"$LOG"
out=$(kube pool:m:statefulset/vllm-llama:2) || kvr_fail "kube statefulset: $out"
out=$(kube pool:m:deployment/vllm-llama:1) || kvr_fail "kube deployment/: $out"
kvr_assert_eq "$(jq -r .path "$LOG" | tr '\n' ' ')" \
    "/apis/apps/v1/namespaces/kvr-system/statefulsets/vllm-llama/scale /apis/apps/v1/namespaces/kvr-system/deployments/vllm-llama/scale " \
    "kind/NAME paths"

kube_case retry 503,409,500,200
out=$(kube --backoff-ms 20 pool:m:d1:2) || kvr_fail "kube retries: $out"
grep -q "stats ok=1 failed=0 retries=3 attempts=4" <<<"$out" || kvr_fail "kube retry stats: $out"
kvr_assert_eq "$(wc -l <"$LOG")" 4 "PATCHes with retries"

kube_case rotate rotate,200
out=$(kube --backoff-ms 5000 pool:m:d1:1) || kvr_fail "token rotation: $out"
grep -q "retries=0 attempts=2" <<<"$out" || kvr_fail "rotation re-read at once: $out"
kvr_assert_eq "$(tail -1 "$LOG" | jq -r .auth_ok)" true "the re-read token was sent"

kube_case unauth 401
out=$(kube --backoff-ms 20 pool:m:d1:1) && kvr_fail "401 succeeded"
grep -q "attempts=2" <<<"$out" || kvr_fail "401: one re-read, then fail: $out"
grep -q "HTTP 401" <<<"$out" || kvr_fail "401 message: $out"

kube_case notfound 404
out=$(kube --backoff-ms 20 pool:m:d1:1) && kvr_fail "404 succeeded"
grep -q "attempts=1" <<<"$out" || kvr_fail "404 is not retried: $out"

kube_case badca 200
out=$("$CLI" kube "$URL" "$T/token" "$T/other.crt" kvr-system --attempts 2 --backoff-ms 20 p:m:d1:1) &&
    kvr_fail "a server the CA did not sign was trusted"
[ ! -s "$LOG" ] || kvr_fail "a request reached a server the CA did not sign"

kube_case hang hang
t0=${EPOCHREALTIME/./}
out=$(kube --timeout-ms 300 --attempts 2 --backoff-ms 20 pool:m:d1:1) && kvr_fail "hang succeeded"
el=$(((${EPOCHREALTIME/./} - t0) / 1000))
((el < 3000)) || kvr_fail "kube hang: $el ms"
grep -q "status=-8" <<<"$out" || kvr_fail "kube hang status: $out"

# names that would leave the scale path are refused before any request
kube_case names 200
out=$(kube pool:m:../../secrets:1) && kvr_fail "a path in the target was accepted"
grep -q "refused at start" <<<"$out" || kvr_fail "bad name: $out"
out=$(kube pool:m:daemonset/vllm:1) && kvr_fail "a DaemonSet target was accepted (no scale subresource)"
out=$(kube pool:m:statefulset/../x:1) && kvr_fail "a path after the kind was accepted"
[ ! -s "$LOG" ] || kvr_fail "a request was sent for a bad name"
kvr_pass
