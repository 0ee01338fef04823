#!/bin/bash
# frontend_tokenize_auth (docs/SECURITY.md 4): POST /tokenize and /detokenize sit behind the
# frontend's API key like the generate endpoints: no Authorization, a wrong key, another scheme
# and an empty bearer all get 401 with OpenAI's invalid_api_key error and no tokens; the right
# key gets 200. A real kvr-frontend process (byte tokenizer: no model files needed).
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init frontend_tokenize_auth
[ -x "$KVR_BIN/kvr-frontend" ] || { echo "SKIP: kvr-frontend not built"; exit 77; }
port=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$port --id 1 --router-mode round-robin \
    --api-key tok-secret-key
kvr_wait_http "http://127.0.0.1:$port/health" 10
F=http://127.0.0.1:$port
n=0
check() { # check PATH BODY WANT_STATUS [AUTH_HEADER]
    local path=$1 body=$2 want=$3 auth=${4:-}
    local args=(-sS -o "$KVR_TMP/out" -w '%{http_code}' -X POST -H 'Content-Type: application/json'
        --data "$body" "$F$path")
    [ -n "$auth" ] && args+=(-H "$auth")
    local got
    got=$(curl "${args[@]}")
    [ "$got" = "$want" ] || kvr_fail "$path with '${auth:-no Authorization}': HTTP $got, want $want: $(cat "$KVR_TMP/out")"
    if [ "$want" = 401 ]; then
        grep -q '"invalid_api_key"' "$KVR_TMP/out" || kvr_fail "$path 401 without invalid_api_key: $(cat "$KVR_TMP/out")"
        ! grep -q '"tokens"\|"prompt"' "$KVR_TMP/out" || kvr_fail "$path 401 leaked a result: $(cat "$KVR_TMP/out")"
    fi
    n=$((n + 1))
}
for ep in "/tokenize:{\"model\":\"m\",\"prompt\":\"secret text\"}" \
          "/tokenize:{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}" \
          "/detokenize:{\"model\":\"m\",\"tokens\":[104,105]}"; do
    path=${ep%%:*} body=${ep#*:}
    check "$path" "$body" 401
    check "$path" "$body" 401 "Authorization: Bearer wrong-key"
    check "$path" "$body" 401 "Authorization: Bearer tok-secret-ke"
    check "$path" "$body" 401 "Authorization: Basic tok-secret-key"
    check "$path" "$body" 401 "Authorization: Bearer "
    check "$path" "$body" 200 "Authorization: Bearer tok-secret-key"
done
echo "checked $n requests"
kvr_pass
