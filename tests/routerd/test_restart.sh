#!/usr/bin/env bash
# Warm restart: SIGKILL a router, publish while it is down, restart: ready with the same digest
# as a router that never died, having replayed only the missed part. A corrupt snapshot is
# rebuilt from the stream to the same digest; a stale one (stream purged past it) is detected.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_restart
kvr_start_nats
rd_beat beat1 ns1 1
rd_beat beat2 ns1 2
P1=$(kvr_free_port)
P2=$(kvr_free_port)
rd_start r1 1 "$P1" "$KVR_TMP/r1" --snapshot-interval 1s
rd_start r2 2 "$P2" "$KVR_TMP/r2" --snapshot-interval 1s
kvr_wait_http "http://127.0.0.1:$P1/ready" 15
kvr_wait_http "http://127.0.0.1:$P2/ready" 15

batch() { # batch FIRST_PREFIX COUNT: stores on both workers in both encodings
    local p lines=()
    for ((p = $1; p < $1 + $2; p++)); do
        lines+=("store ns1 1 array int $p 0 3" "store ns1 2 map bytes $p 0 $((p % 4 + 1))"
            "store ns1 1 map int $p 3 2")
    done
    rd_pub "${lines[@]}"
}
seqA=$(batch 100 20)
rd_wait_seq "$P1" "$seqA"
rd_wait_seq "$P2" "$seqA"
# wait for r2 to snapshot seqA
kvr_wait_for 10 grep -q "snapshot written.*stream_seq=$seqA " "$KVR_TMP/r2.log" || kvr_fail "r2 never snapshotted seq $seqA"
kvr_kill9 r2
seqB=$(batch 200 15)
rd_wait_seq "$P1" "$seqB"
rd_start r2 2 "$P2" "$KVR_TMP/r2" --snapshot-interval 1s
kvr_wait_http "http://127.0.0.1:$P2/ready" 20
rd_wait_seq "$P2" "$seqB"
st=$(rd_state "$P2")
kvr_assert_eq "$(jq -r .ingest.snapshot_loaded <<<"$st")" true "warm start used the snapshot"
kvr_assert_eq "$(jq -r .ingest.snapshot_seq <<<"$st")" "$seqA" "snapshot sequence"
kvr_assert_eq "$(jq -r .ingest.start_seq <<<"$st")" $((seqA + 1)) "replay started after the snapshot"
kvr_assert_eq "$(jq -r .ingest.applied_msgs <<<"$st")" $((seqB - seqA)) "replayed only the missed part"
kvr_assert_eq "$(rd_q "$P2" .index.digest)" "$(rd_q "$P1" .index.digest)" "digest after warm restart"
kvr_assert_eq "$(rd_q "$P2" .index.entries)" "$(rd_q "$P1" .index.entries)" "entries after warm restart"
kvr_assert_eq "$(rd_match "$P2" 203 640)" "$(rd_match "$P1" 203 640)" "same matches"

# SIGTERM: final snapshot and a clean exit; then corrupt the snapshot file
kvr_term r2 10 || kvr_fail "r2 did not exit cleanly on SIGTERM"
grep -q "final=1" "$KVR_TMP/r2.log" || kvr_fail "no final snapshot on SIGTERM"
snap="$KVR_TMP/r2/index/index.mdb"
size=$(stat -c %s "$snap")
printf 'garbage!garbage!' | dd of="$snap" bs=1 seek=$((size / 2)) conv=notrunc status=none
rd_start r2 2 "$P2" "$KVR_TMP/r2" --snapshot-interval 1s
kvr_wait_http "http://127.0.0.1:$P2/ready" 20
grep -q "snapshot unusable" "$KVR_TMP/r2.log" || kvr_fail "corrupt snapshot not reported"
st=$(rd_state "$P2")
kvr_assert_eq "$(jq -r .ingest.snapshot_loaded <<<"$st")" false "corrupt snapshot not used"
kvr_assert_eq "$(jq -r .ingest.start_seq <<<"$st")" 1 "rebuilt from the stream start"
kvr_assert_eq "$(rd_q "$P2" .index.digest)" "$(rd_q "$P1" .index.digest)" "digest after rebuild"

# stale snapshot: the stream no longer holds the events right after it
kvr_term r2 10 || kvr_fail "r2 did not exit cleanly"
rd_pub "store ns1 1 array int 300 0 2" >/dev/null
rd_pub "purge KVR_EVENTS" >/dev/null
seqC=$(rd_pub "store ns1 2 array int 301 0 3")
rd_start r2 2 "$P2" "$KVR_TMP/r2" --snapshot-interval 1s
kvr_wait_http "http://127.0.0.1:$P2/ready" 20
rd_wait_seq "$P2" "$seqC"
grep -q "snapshot is stale" "$KVR_TMP/r2.log" || kvr_fail "stale snapshot not detected"
kvr_assert_eq "$(rd_q "$P2" .index.entries)" 3 "rebuilt from what the stream still holds"
kvr_assert_eq "$(rd_match "$P2" 301 192)" '{"2":3}' "events after the purge applied"
kvr_assert "r1 alive" kvr_alive r1
kvr_pass
