#!/bin/bash
# chaos_follower_partition (issue 18, chaos case 2): a follower is cut off from both other
# routers for CHAOS_FOLLOWER_S seconds (60 in CI) while frontend requests keep flowing, then
# healed. The Raft snapshot threshold is low, so the leader has compacted the entries the
# follower missed and the catch-up goes through a snapshot. Asserts: no client request fails,
# the leader stays the leader, the follower catches up with the leader's commit index, then
# bookings return to 0 and booking and index digests are equal on all three (nothing lost).
# Figures: time to catch up after healing, requests ok/failed, digests.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init chaos_follower_partition
source "$(dirname "$0")/chaos_lib.sh"
chaos_need
PART_S=${CHAOS_FOLLOWER_S:-60}
CHAOS_ROUTER_ARGS="--snapshot-interval 2s --election-timeout 500ms --raft-snapshot-threshold 64"
chaos_cluster netns
L=$(chaos_leader 15) || kvr_fail "no leader"
P=1
[ "$L" = 1 ] && P=2
O=$((6 - L - P))
kvr_log "leader r$L; partitioning follower r$P for $PART_S s"

chaos_load_start load 3 --stream --max-tokens 8
ok0=$(fe_ok)
warm() { [ "$(fe_ok)" -ge $((ok0 + 20)) ]; }
kvr_wait_for 30 warm || kvr_fail "load did not get going: $(fe_ok) ok"

ci0=$(r_q "$L" .raft.commit_index)
t_cut=$(now_ms)
kvr_netns_cut "r$P" "r$L"
kvr_netns_cut "r$P" "r$O"
deadline=$((t_cut + PART_S * 1000))
while [ "$(now_ms)" -lt "$deadline" ]; do sleep 1; done
ci1=$(r_q "$L" .raft.commit_index)
behind=$((ci1 - $(r_q "$P" .raft.applied_index)))
# bookings the majority still holds at the end of the partition, against requests in flight
MAJ_B=0
for i in "$L" "$O"; do b=$(r_q "$i" .bookings); [ "${b:-0}" -gt "$MAJ_B" ] && MAJ_B=$b; done
kvr_log "after $PART_S s: leader commit $ci0 -> $ci1, r$P is $behind entries behind; $(chaos_table | tr '\n' ';')"
[ "$(chaos_leader 5 0 "$L" "$O")" = "$L" ] || kvr_fail "the majority lost its leader: $(chaos_table)"
[ "$behind" -gt 64 ] || kvr_fail "too little traffic to need a snapshot ($behind entries)"

# the cut-off router lost the quorum it had while the majority kept one: it left the queue
# groups (its decisions would not reach the majority); the majority never left them
OUT_PART=$(r_q "$P" .raft.in_queue_groups)
MAJ_LEFT=0
for i in "$L" "$O"; do MAJ_LEFT=$((MAJ_LEFT + $(r_q "$i" .raft.queue_groups_left))); done
t_heal=$(now_ms)
kvr_netns_heal "r$P" "r$L"
kvr_netns_heal "r$P" "r$O"
caught_up() {
    [ "$(r_q "$P" .raft.leader)" = "$L" ] && [ "$(r_q "$P" .raft.applied_index)" -ge "$ci1" ] 2>/dev/null
}
chaos_wait 60 caught_up || kvr_fail "r$P did not catch up with commit index $ci1: $(chaos_table | tr '\n' ';')"
t_caught=$(now_ms)
kvr_log "r$P caught up in $((t_caught - t_heal)) ms"
sleep 2
sum=$(chaos_load_stop load 60)
kvr_log "load: $sum"
t_stop=$(now_ms)
chaos_wait 30 chaos_converged || kvr_fail "no convergence after the load: $(chaos_table | tr '\n' ';')"
t_conv=$(now_ms)
chaos_table >&2
chaos_figure "partition_s=$PART_S entries_behind=$behind catch_up_ms=$((t_caught - t_heal))" \
    "converge_after_load_ms=$((t_conv - t_stop))" \
    "requests_ok=$(jq -r .ok <<<"$sum") requests_failed=$(jq -r .failed <<<"$sum")" \
    "max_gap_s=$(jq -r .max_gap_s <<<"$sum") bookings_left=0 majority_bookings_in_partition=$MAJ_B" \
    "fsm_digest=$(r_q 1 .raft.fsm_digest) index_digest=$(r_q 1 .index.digest)"
chaos_check "no failed client request ($(jq -c .errors <<<"$sum"))" test "$(jq -r .failed <<<"$sum")" = 0
# The partitioned router still reads NATS: frees it takes for the majority's bookings must not
# leave those bookings on the majority (a leak for as long as the partition lasts).
chaos_check "majority holds $MAJ_B bookings with 3 requests in flight (leak during the partition)" \
    test "$MAJ_B" -le 8
chaos_check "partitioned r$P still in the queue groups during the partition" test "$OUT_PART" = false
chaos_check "the majority left the queue groups $MAJ_LEFT time(s)" test "$MAJ_LEFT" = 0
for i in 1 2 3; do
    chaos_check "r$i back in the queue groups after healing" test "$(r_q "$i" .raft.in_queue_groups)" = true
done
chaos_done
