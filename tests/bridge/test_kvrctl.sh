#!/usr/bin/env bash
# bridge_kvrctl: `kvrctl up --bridge` runs each worker as a vLLM stand-in (--kv-events zmq, no
# NATS) with a kvr-bridge beside it; 3 routers (Raft) and a frontend. The same prompt sent three
# times through the frontend lands on one worker with prefix hits (the routers learnt its blocks
# from the bridge), every router's index digest is the same and not empty, and down stops all.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/../tools/lib.sh"
tools_init bridge_kvrctl
kvr_need_bins kvr-routerd kvr-worker kvr-frontend kvr-bridge
D=$KVR_TMP/c
out=$("$KVRCTL" up --dir "$D" --routers 3 --workers 2 --frontends 1 --bridge --speedup 20 2>&1) ||
    kvr_fail "kvrctl up --bridge failed: $out"
kvr_assert_eq "$(jq '[.processes[] | select(.role == "bridge")] | length' "$D/cluster.json")" 2 "bridges"
for w in 1 2; do
    argv=$(jq -c --argjson w $w '.processes[] | select(.role == "worker" and .id == $w) | .argv' "$D/cluster.json")
    jq -e 'index("--kv-events") != null and index("zmq") != null and index("--nats") == null' <<<"$argv" >/dev/null ||
        kvr_fail "worker $w not started as a ZMQ engine: $argv"
done
F=$(jq -r '.processes[] | select(.role == "frontend") | .url' "$D/cluster.json")
P=$(printf 'the quick brown fox jumps over the lazy dog %.0s' $(seq 1 20))
for k in 1 2 3; do
    curl -sf --max-time 20 "$F/v1/completions" -H 'Content-Type: application/json' \
        -d "{\"model\":\"sim\",\"prompt\":\"$P\",\"max_tokens\":4}" >/dev/null || kvr_fail "request $k failed"
    sleep 0.5 # the worker's events reach the routers before the next request routes
done
cached() { curl -s "$1/metrics" | awk '$1 == "kvr_worker_cached_tokens_total" {print $2}'; }
hits=()
for u in $(jq -r '.processes[] | select(.role == "worker") | .url' "$D/cluster.json"); do hits+=("$(cached "$u")"); done
kvr_log "cached tokens per worker: ${hits[*]}"
# 880 prompt tokens, blocks of 64: the 2nd and 3rd requests hit 13 blocks each on the same worker
[ "${hits[0]}" -ge 1664 ] || [ "${hits[1]}" -ge 1664 ] || kvr_fail "repeats not routed to the worker holding the prefix: ${hits[*]}"
st=$("$KVRCTL" status --dir "$D" --json) || kvr_fail "status failed"
digests=$(jq -r '[.processes[] | select(.role == "router") | .digest] | unique | join(" ")' <<<"$st")
[ "$(wc -w <<<"$digests")" = 1 ] && [ "$digests" != 0000000000000000 ] && [ "$digests" != null ] ||
    kvr_fail "router digests: '$digests' ($st)"
"$KVRCTL" down --dir "$D" || kvr_fail "down failed"
kvr_assert_eq "$("$KVRCTL" status --dir "$D" --json | jq '[.processes[] | select(.alive)] | length')" 0 "alive after down"
kvr_pass
