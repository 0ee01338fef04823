#!/usr/bin/env bash
# bench_ceiling: `kvr-bench ceiling` on the shipped trace gives ordered, plausible figures: a
# pooled cache never beats an infinite one and a bigger pool never does worse. (A tiny pool
# still hits: every prompt of this trace starts with the same 8 blocks, which stay cached.) (The simulator's exact counts are unit-tested in
# tests/indexer/test_ceiling.c; this checks the subcommand end to end.)
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init bench_ceiling
kvr_need_bins kvr-bench
TRACE="$(dirname "$0")/../../data/mooncake_conversation_trace.jsonl.gz"
c() { "$KVR_BIN/kvr-bench" ceiling --trace "$TRACE" --max-requests 400 "$@"; }
small=$(c --workers 1 --capacity-blocks 8) || kvr_fail "kvr-bench ceiling failed"
mid=$(c --workers 2 --capacity-blocks 2048) || kvr_fail "kvr-bench ceiling failed"
big=$(c --workers 8 --capacity-blocks 16384) || kvr_fail "kvr-bench ceiling failed"
kvr_log "small $small"
kvr_log "mid $mid"
kvr_log "big $big"
kvr_assert_eq "$(jq .requests <<<"$big")" 400 "requests in the slice"
jq -en --argjson s "$small" --argjson m "$mid" --argjson b "$big" '
    $s.pooled_ceiling_hit_rate <= $m.pooled_ceiling_hit_rate
    and $m.pooled_ceiling_hit_rate > 0 and $m.pooled_ceiling_hit_rate < $b.pooled_ceiling_hit_rate
    and $b.pooled_ceiling_hit_rate <= $b.infinite_hit_rate and $b.infinite_hit_rate < 1
    and $m.infinite_hit_rate == $b.infinite_hit_rate' >/dev/null ||
    kvr_fail "figures out of order"
"$KVR_BIN/kvr-bench" ceiling --trace "$TRACE" --block-size 0 >/dev/null 2>&1 &&
    kvr_fail "block size 0 accepted"
kvr_pass
