#!/bin/bash
# chaos_leader_partition (issue 18, chaos case 1): three routers, each in its own network
# namespace; while frontend requests flow, the Raft leader is cut off from both followers
# (packets dropped both ways; it still reaches NATS), then healed. Asserts: every client
# request succeeds (both workers stay healthy), the followers elect a new leader, the old
# leader rejoins under it after healing, bookings return to 0 once the load stops (no leak
# from decisions taken on either side), and all booking and index digests converge.
# Figures: time to a new leader, time from healing to rejoin and to convergence, requests.
# CHAOS_PARTITION_S (default 10) is how long the partition lasts.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init chaos_leader_partition
source "$(dirname "$0")/chaos_lib.sh"
chaos_need
PART_S=${CHAOS_PARTITION_S:-10}
CHAOS_ROUTER_ARGS="--snapshot-interval 2s --election-timeout 500ms"
chaos_cluster netns
L=$(chaos_leader 15) || kvr_fail "no leader"
FOL=()
for i in 1 2 3; do [ "$i" != "$L" ] && FOL+=("$i"); done
kvr_log "leader r$L, followers r${FOL[0]} r${FOL[1]}"

chaos_load_start load 4 --stream --max-tokens 8
ok0=$(fe_ok)
warm() { [ "$(fe_ok)" -ge $((ok0 + 20)) ]; }
kvr_wait_for 30 warm || kvr_fail "load did not get going: $(fe_ok) ok"

t_cut=$(now_ms)
for f in "${FOL[@]}"; do kvr_netns_cut "r$L" "r$f"; done
NL=$(chaos_leader 15 "$L" "${FOL[@]}") || kvr_fail "followers elected no new leader: $(chaos_table)"
t_new=$(now_ms)
kvr_log "new leader r$NL after $((t_new - t_cut)) ms"
# the old leader must notice it has no quorum (steps down or answers degraded)
stepped() { [ "$(r_q "$L" .raft.role)" != leader ] || [ "$(r_q "$L" .raft.degraded)" = true ]; }
kvr_wait_for 10 stepped || kvr_fail "partitioned leader r$L neither stepped down nor degraded: $(chaos_table "$L")"
ok_mid=$(fe_ok)
deadline=$((t_cut + PART_S * 1000))
while [ "$(now_ms)" -lt "$deadline" ]; do sleep 0.5; done
[ "$(fe_ok)" -gt "$ok_mid" ] || kvr_fail "no request succeeded during the partition"
# bookings the majority still holds at the end of the partition, against requests in flight
MAJ_B=0
for i in "${FOL[@]}"; do b=$(r_q "$i" .bookings); [ "${b:-0}" -gt "$MAJ_B" ] && MAJ_B=$b; done
kvr_log "partition held $PART_S s; $(chaos_table | tr '\n' ';')"

# the cut-off router lost the quorum it had while the majority kept one: it left the queue
# groups (its decisions would not reach the majority); the majority never left them
OUT_PART=$(r_q "$L" .raft.in_queue_groups)
MAJ_LEFT=0
for i in "${FOL[@]}"; do MAJ_LEFT=$((MAJ_LEFT + $(r_q "$i" .raft.queue_groups_left))); done
t_heal=$(now_ms)
for f in "${FOL[@]}"; do kvr_netns_heal "r$L" "r$f"; done
RL=$(chaos_leader 20) || kvr_fail "old leader did not rejoin: $(chaos_table)"
t_rejoin=$(now_ms)
kvr_log "after healing all agree on leader r$RL in $((t_rejoin - t_heal)) ms"
sleep 2
sum=$(chaos_load_stop load 90)
kvr_log "load: $sum"
t_stop=$(now_ms)
chaos_wait 30 chaos_converged || kvr_fail "no convergence after the load: $(chaos_table | tr '\n' ';')"
t_conv=$(now_ms)
chaos_table >&2
chaos_figure "new_leader_ms=$((t_new - t_cut)) rejoin_ms=$((t_rejoin - t_heal))" \
    "converge_after_load_ms=$((t_conv - t_stop)) converge_after_heal_ms=$((t_conv - t_heal))" \
    "requests_ok=$(jq -r .ok <<<"$sum") requests_failed=$(jq -r .failed <<<"$sum")" \
    "max_gap_s=$(jq -r .max_gap_s <<<"$sum") bookings_left=0 majority_bookings_in_partition=$MAJ_B" \
    "fsm_digest=$(r_q 1 .raft.fsm_digest) index_digest=$(r_q 1 .index.digest)"
chaos_check "no failed client request ($(jq -c .errors <<<"$sum"))" test "$(jq -r .failed <<<"$sum")" = 0
# The partitioned router still reads NATS: frees it takes for the majority's bookings must not
# leave those bookings on the majority (a leak for as long as the partition lasts).
chaos_check "majority holds $MAJ_B bookings with 4 requests in flight (leak during the partition)" \
    test "$MAJ_B" -le 10
chaos_check "partitioned r$L still in the queue groups during the partition" test "$OUT_PART" = false
chaos_check "the majority left the queue groups $MAJ_LEFT time(s)" test "$MAJ_LEFT" = 0
for i in 1 2 3; do
    chaos_check "r$i back in the queue groups after healing" test "$(r_q "$i" .raft.in_queue_groups)" = true
done
chaos_done
