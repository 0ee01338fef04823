#!/bin/bash
# chaos_data_dir_lost: under load (--raft-log disk), the data dirs of the leader and of one
# follower are removed. Their Raft log and term can no longer be written; the leader's
# appends fail (disklog fences its log; it hands leadership over), the election that follows
# asks the follower to store a new term, which fails. Asserts: no router crashes, no client
# request fails, and a router logged the mute (termguard: a term or vote it could not store
# silences it). canonical/raft 0.15 itself, on that failure, left its state half candidate
# and crashed at the next change (convertClearFollower freeing a garbage pointer): 4 of 15
# runs of this scenario killed a router before sync/termguard.c.
# Figures: which routers muted or fenced, requests.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init chaos_data_dir_lost
source "$(dirname "$0")/chaos_lib.sh"
chaos_need
for i in 1 2 3; do RDATA[$i]=$KVR_TMP/r$i; done
CHAOS_ROUTER_ARGS="--raft-log disk --snapshot-interval 2s --election-timeout 500ms --raft-snapshot-threshold 256"
chaos_cluster lo
L=$(chaos_leader 15) || kvr_fail "no leader"
FO=$((L % 3 + 1))
chaos_load_start load 3 --stream --max-tokens 8
ok0=$(fe_ok)
warm() { [ "$(fe_ok)" -ge $((ok0 + 20)) ]; }
kvr_wait_for 30 warm || kvr_fail "load did not get going"

kvr_log "removing the data dirs of r$L (leader) and r$FO"
rm -rf "${RDATA[$L]}" "${RDATA[$FO]}"
dead=
for _ in $(seq 1 40); do
    sleep 0.25
    for i in 1 2 3; do kvr_alive "router$i" || dead="$dead r$i"; done
    [ -n "$dead" ] && break
done
chaos_table >&2 || true
sum=$(chaos_load_stop load 60)
kvr_log "load: $sum"
muted=$(grep -l 'msg="raft term or vote could not be stored' "$KVR_TMP"/router?.log 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')
fenced=$(grep -l 'msg="raft log fenced: an append failed' "$KVR_TMP"/router?.log 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')
chaos_figure "removed=r$L,r$FO muted=${muted:-none} fenced=${fenced:-none} dead=${dead:-none}" \
    "requests_ok=$(jq -r .ok <<<"$sum") requests_failed=$(jq -r .failed <<<"$sum") max_gap_s=$(jq -r .max_gap_s <<<"$sum")"
chaos_check "no router crashed (${dead:-none})" test -z "$dead"
chaos_check "a router whose term could not be stored muted itself (${muted:-none})" test -n "$muted"
chaos_check "no failed client request ($(jq -c .errors <<<"$sum"))" test "$(jq -r .failed <<<"$sum")" = 0
chaos_done
