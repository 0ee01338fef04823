#!/usr/bin/env bash
# kvrctl up's cluster modes with real processes:
# - --prefill-workers 1 --decode-workers 1 (issue 15): the workers run with their roles and a
#   shared KV secret; a long prompt through the frontend goes the remote path (prefill leg on
#   the prefill worker, its blocks pulled by the decoder) and completes;
# - --workers 0 --scale-to-zero --idle-after 3s (issue 16): the pool starts asleep, a request
#   through the frontend waits for the wake (x-kvroute-cold-start) and completes, the pool
#   sleeps again when idle with no worker left, and kvrctl down leaves nothing running.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/lib.sh"
tools_init tools_kvrctl_modes
kvr_need_bins kvr-routerd kvr-worker kvr-frontend kvr-local-scaler

fe_url() { jq -r '.processes[] | select(.role == "frontend") | .url' "$1/cluster.json"; }
router_url() { jq -r '.processes[] | select(.role == "router" and .id == 1) | .url' "$1/cluster.json"; }
long_body() {
    /usr/bin/python3 -c 'import json; print(json.dumps({"model": "sim", "prompt": "hello world " * 900, "max_tokens": 4}))'
}

# --- disaggregated workers
D=$KVR_TMP/dg
out=$("$KVRCTL" up --dir "$D" --routers 1 --workers 0 --prefill-workers 1 --decode-workers 1 \
    --frontends 1 --speedup 10 2>&1) || kvr_fail "kvrctl up (disagg) failed: $out"
kvr_assert_eq "$(jq '[.processes[] | select(.role == "worker") | .argv | index("prefill")] | map(select(. != null)) | length' "$D/cluster.json")" 1 "prefill workers"
kvr_assert_eq "$(jq '[.processes[] | select(.role == "worker") | .argv | index("decode")] | map(select(. != null)) | length' "$D/cluster.json")" 1 "decode workers"
[ "$(stat -c %a "$D/kv-secret")" = 600 ] || kvr_fail "kv-secret is not mode 600"
FE=$(fe_url "$D")
ans=$(long_body | curl -s -m 30 "$FE/v1/completions" -H 'content-type: application/json' --data @-)
kvr_assert_eq "$(jq -r '.choices[0].finish_reason' <<<"$ans")" length "long prompt answered: $ans"
remote=$(curl -s "$FE/metrics" | awk '$1 == "kvr_frontend_disagg_requests_total{path=\"remote\"}" {print $2}')
kvr_assert_eq "${remote:-0}" 1 "the long prompt took the remote path"
"$KVRCTL" down --dir "$D" >/dev/null 2>&1 || kvr_fail "kvrctl down (disagg)"

# --- scale to zero
D=$KVR_TMP/s2z
out=$("$KVRCTL" up --dir "$D" --routers 1 --workers 0 --frontends 1 --speedup 10 \
    --scale-to-zero --idle-after 3s 2>&1) || kvr_fail "kvrctl up (scale-to-zero) failed: $out"
RT=$(router_url "$D") FE=$(fe_url "$D")
state() { curl -s "$RT/v1/state" | jq -r '.pools[0].state'; }
kvr_wait_for 10 bash -c "[ \"\$(curl -s $RT/v1/state | jq -r '.pools[0].state')\" = sleeping ]" ||
    kvr_fail "pool not asleep at start: $(state)"
hdrs=$(curl -s -m 60 -D - -o "$KVR_TMP/cold.json" "$FE/v1/completions" \
    -H 'content-type: application/json' -d '{"model":"sim","prompt":"hi there","max_tokens":3}')
grep -qi '^x-kvroute-cold-start: 1' <<<"$hdrs" || kvr_fail "no cold-start header: $hdrs"
kvr_assert_eq "$(jq -r '.choices[0].finish_reason' "$KVR_TMP/cold.json")" length "cold request answered"
kvr_assert_eq "$(ls "$D"/scaler/pool-*/*.pid 2>/dev/null | wc -l)" 1 "workers the scaler started"
kvr_wait_for 30 bash -c "[ \"\$(curl -s $RT/v1/state | jq -r '.pools[0].state')\" = sleeping ]" ||
    kvr_fail "pool did not sleep when idle: $(state)"
kvr_wait_for 10 bash -c "[ \"\$(ls $D/scaler/pool-*/*.pid 2>/dev/null | wc -l)\" = 0 ]" ||
    kvr_fail "worker left after the pool slept"
"$KVRCTL" down --dir "$D" >/dev/null 2>&1 || kvr_fail "kvrctl down (scale-to-zero)"
kvr_pass
