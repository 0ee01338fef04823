/* liveness: the leader's worker-liveness policy, decided on one monotonic clock (issue 18,
 * defect 5), the worker counterpart of lease.h.
 *
 * Why: the replicated worker registry says which workers are up, but nothing in it says when a
 * worker was last heard. Before, every router proposed WORKER_DOWN for the workers it stopped
 * hearing, and a worker that died while no router ran (or that only the LMDB snapshot and the
 * Raft log still knew) was never declared down by anyone: it stayed up in the registry and was
 * routed to for good. Here one owner, the Raft leader, decides: a worker that is up in the
 * replicated registry and that this node has not heard for ttl on its monotonic clock, counted
 * from the latest of its last beat, the moment this node took office as leader, and the last
 * hold (a time no beat could be heard: NATS down, a loop stall), is due for WORKER_DOWN. A new
 * leader, which may not have heard the beats its predecessor heard, so gives every worker one
 * full ttl. Wall clocks play no part.
 *
 * Single-router (local) and best-effort modes use the same tracker on their own FSM, with
 * "leader" true from start.
 *
 * Threads: a plain data structure; the caller's loop thread. Memory: fixed size (sorted array
 * of KVR_FSM_MAX_WORKERS entries), no allocation. */
#ifndef KVR_SYNC_LIVENESS_H
#define KVR_SYNC_LIVENESS_H

#include "fsm.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct kvr_live_entry {
    uint64_t id;
    int64_t heard_ms;    /* monotonic; last beat this node heard */
    int64_t proposed_ms; /* monotonic; last WORKER_DOWN this node proposed for it (0: none) */
} kvr_live_entry;

typedef struct kvr_live_tracker {
    kvr_live_entry e[KVR_FSM_MAX_WORKERS]; /* sorted by id */
    uint32_t n;
    int64_t office_ms;   /* monotonic time this node became leader (0: not leader) */
    int64_t hold_ms;     /* monotonic time until which no beat could have been heard */
    int64_t last_due_ms; /* last kvr_live_due call: a long gap means this loop stalled */
} kvr_live_tracker;

/* kvr_live_due calls further apart than this mean the caller's loop did not run (a stall):
 * no beat could be read meanwhile, so that call holds (kvr_live_hold) instead of judging.
 * Callers call it at least every second. */
#define KVR_LIVE_STALL_MS 2500

/* Minimum gap between two WORKER_DOWN proposals for the same worker (one may be in flight). */
#define KVR_LIVE_REPROPOSE_MS 1000

void kvr_live_init(kvr_live_tracker *t);
/* A valid beat from worker id heard at monotonic now. When the table is full the entry heard
 * longest ago is forgotten (a worker without an entry counts from office/hold only). */
void kvr_live_heard(kvr_live_tracker *t, uint64_t id, int64_t now);
/* Forgets what was heard from id (a refused worker: it no longer counts as heard). */
void kvr_live_forget(kvr_live_tracker *t, uint64_t id);
/* Leadership changes: leader true at the moment this node takes office. */
void kvr_live_set_leader(kvr_live_tracker *t, bool leader, int64_t now);
/* No beat could be heard until now (NATS was down, the loop stalled): silence before now
 * says nothing, every worker gets a full ttl from now. */
void kvr_live_hold(kvr_live_tracker *t, int64_t now);
/* Workers up in fsm's registry silent for more than ttl_ms (see above); writes up to max ids
 * (ascending), returns how many, marks them proposed. 0 when not leader. Also forgets entries
 * of workers neither up in the registry nor heard for 10 ttl (keeps the table small). */
uint32_t kvr_live_due(kvr_live_tracker *t, const kvr_fsm *fsm, int64_t now, uint32_t ttl_ms,
                      uint64_t *ids, uint32_t max);

/* Request age on one monotonic clock (the booking-age half of issue 18 defect 14). A booking
 * is over age when now - max(its local apply time on this node, since) > max_age_ms (since:
 * the time this node took office). Bookings are stamped start_ms by whichever router proposed
 * them, on its wall clock, so EXPIRE{before_ms} cannot be computed from a wall clock without
 * trusting every router's clock. Returns true and *before_ms when an EXPIRE{*before_ms} frees
 * at least one over-age booking and no booking that is not over age: before_ms is the smallest
 * start_ms of the young bookings (a booking stamped by a router whose clock runs behind may
 * delay an older one's expiry by that clock's lag, never make a young one expire early). */
bool kvr_live_expire_due(const kvr_fsm *fsm, int64_t now, int64_t since, uint32_t max_age_ms,
                         uint64_t *before_ms);

#endif
