#!/bin/bash
# chaos_disk_full (issue 18, chaos case 3): every router keeps its Raft data and its LMDB
# index snapshot on a small tmpfs of its own (a private mount namespace). While requests flow
# the leader's tmpfs is filled to the last byte. Asserts: the full router logs a clear error
# naming the lack of space, does not crash (it keeps serving or steps down), no client request
# fails, the other two keep a leader; when the space is freed it rejoins (restarting itself in
# place while its Raft log is fenced after the failed write: sync/disklog.h, sync.h log_stuck_cb), bookings return to 0 and all
# digests converge.
# Figures: time to the error line and to a leader on the others, time to recover, requests.
source "$(dirname "$0")/../lib/testenv.sh"
kvr_test_init chaos_disk_full
source "$(dirname "$0")/chaos_lib.sh"
chaos_need
if [ "$(id -u)" -ne 0 ] || ! command -v unshare >/dev/null || ! command -v nsenter >/dev/null; then
    echo "SKIP: tmpfs mounts need root and util-linux"
    exit 77
fi
SIZE=${CHAOS_TMPFS_SIZE:-64m}
FULL_S=${CHAOS_FULL_S:-15}
for i in 1 2 3; do
    RDATA[$i]=$KVR_TMP/r$i
    RPREFIX[$i]="unshare -m --propagation private bash $HERE/tmpfs_exec.sh ${RDATA[$i]} $SIZE"
done
# --raft-log disk: the case is a Raft log that cannot be written (with the memory log, the
# default, only elections and the LMDB index snapshots write to the disk).
CHAOS_ROUTER_ARGS="--raft-log disk --snapshot-interval 2s --election-timeout 500ms --raft-snapshot-threshold 256"
chaos_cluster lo
L=$(chaos_leader 15) || kvr_fail "no leader"
in_ns() { nsenter -t "$(kvr_pid "router$1")" -m -- "${@:2}"; }
kvr_log "leader r$L; its data dir: $(in_ns "$L" df -h "${RDATA[$L]}" | tail -1)"

chaos_load_start load 3 --stream --max-tokens 8
ok0=$(fe_ok)
warm() { [ "$(fe_ok)" -ge $((ok0 + 20)) ]; }
kvr_wait_for 30 warm || kvr_fail "load did not get going"

lines0=$(wc -l <"$KVR_TMP/router$L.log")
t_fill=$(now_ms)
# Raft deletes old segments after each snapshot: top the filler up until the space is freed,
# so the disk stays full the whole time, as it would with something else writing to it.
fill() { in_ns "$L" bash -c "cat /dev/zero >>'${RDATA[$L]}/filler'" 2>/dev/null; }
fill
kvr_log "filled: $(in_ns "$L" df -h "${RDATA[$L]}" | tail -1)"
err_logged() { tail -n +"$lines0" "$KVR_TMP/router$L.log" | grep -iE 'no space|not enough space|ENOSPC|disk full|space left' >/dev/null; }
OTHERS=()
for i in 1 2 3; do [ "$i" != "$L" ] && OTHERS+=("$i"); done
t_err=
t_lead=
deadline=$((t_fill + FULL_S * 1000))
while [ "$(now_ms)" -lt "$deadline" ]; do
    [ -z "$t_err" ] && err_logged && t_err=$(now_ms)
    kvr_alive "router$L" || break
    fill
    sleep 0.2
done
NL=$(chaos_leader 5 0 "${OTHERS[@]}") && t_lead=$(now_ms)
kvr_log "after $FULL_S s full: $(chaos_table | tr '\n' ';')"
tail -n +"$lines0" "$KVR_TMP/router$L.log" | grep -E 'level=(error|warn)' | sort -u -k4 | head -5 >&2
chaos_check "the full router r$L logs an error naming the lack of space" test -n "$t_err"
chaos_check "the full router r$L is still running (no crash)" kvr_alive "router$L"
chaos_check "the other routers have a leader while r$L's disk is full" test -n "$t_lead"
# a leader that cannot write its log hands leadership to a router that can (sync/sync_batch.c)
chaos_check "leadership moved off the full router r$L (leader r${NL:-none})" test "${NL:-$L}" != "$L"

t_free=$(now_ms)
in_ns "$L" rm -f "${RDATA[$L]}/filler" 2>/dev/null
if ! kvr_alive "router$L"; then
    kvr_log "r$L died; restarting it on its data dir (as a supervisor would)"
    chaos_router_start "$L"
fi
rejoined() { chaos_leader 1 >/dev/null && [ "$(r_q "$L" .raft.degraded)" = false ]; }
chaos_wait 60 rejoined
chaos_check "r$L rejoins the group after the space is freed" rejoined
t_rec=$(now_ms)
sleep 2
sum=$(chaos_load_stop load 60)
kvr_log "load: $sum"
chaos_wait 30 chaos_converged
chaos_check "bookings 0 and digests equal after the load" chaos_converged
chaos_table >&2
chaos_figure "error_logged_ms=${t_err:+$((t_err - t_fill))} others_leader=${NL:-none}" \
    "recover_after_free_ms=$((t_rec - t_free)) full_router_alive=$(kvr_alive "router$L" && echo yes || echo no)" \
    "log_fenced=$(grep -c 'msg="raft log fenced: an append failed' "$KVR_TMP/router$L.log") restarts_in_place=$(grep -c 'msg="restarting in place"' "$KVR_TMP/router$L.log")" \
    "requests_ok=$(jq -r .ok <<<"$sum") requests_failed=$(jq -r .failed <<<"$sum") max_gap_s=$(jq -r .max_gap_s <<<"$sum")" \
    "bookings=$(r_q 1 .bookings),$(r_q 2 .bookings),$(r_q 3 .bookings) fsm_digest=$(r_q 1 .raft.fsm_digest) index_digest=$(r_q 1 .index.digest)"
chaos_check "no failed client request ($(jq -c .errors <<<"$sum"))" test "$(jq -r .failed <<<"$sum")" = 0
chaos_done
