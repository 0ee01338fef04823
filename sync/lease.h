/* lease: the leader's frontend-lease policy, decided on one monotonic clock (defects 13, 14).
 *
 * Why not the times in the replicated lease table: those are wall-clock times written by
 * whichever router proposed FRONTEND_SEEN, compared with the wall clock of whichever router
 * runs the expiry. A 10 s step of one router's wall clock (NTP, an operator) then expired every
 * lease at once, freeing every client's bookings. Here the proposer measures silence as a
 * duration on its own monotonic clock, which never steps: a lease expires when this node has
 * heard nothing from the frontend for ttl, counted from the later of its last beat and the
 * moment this node took office as leader (so a new leader, which may not have heard the beats
 * its predecessor heard, gives every lease one full ttl). Wall-clock time in the commands is a
 * label only. The replicated table decides nothing but which leases exist.
 *
 * Threads: a plain data structure; the caller's loop thread. Memory: fixed size, no
 * allocation. */
#ifndef KVR_SYNC_LEASE_H
#define KVR_SYNC_LEASE_H

#include "fsm.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct kvr_lease_entry {
    uint64_t id;
    int64_t heard_ms;    /* monotonic; last beat this node heard */
    int64_t proposed_ms; /* monotonic; last SEEN/EXPIRE this node proposed for it (0: none) */
} kvr_lease_entry;

typedef struct kvr_lease_tracker {
    kvr_lease_entry e[KVR_FSM_MAX_FRONTENDS];
    uint32_t n;
    int64_t office_ms; /* monotonic time this node became leader (0: not leader) */
} kvr_lease_tracker;

/* Minimum gap between two proposals for the same frontend while the first may still be in
 * flight (one Raft round trip is far shorter). */
#define KVR_LEASE_REPROPOSE_MS 1000

/* A beat from frontend id heard at monotonic now. Returns true when the caller, being leader,
 * should propose FRONTEND_SEEN: the replicated table lacks the lease (new frontend, or one
 * expired and back) and no proposal for it is in flight. */
bool kvr_lease_heard(kvr_lease_tracker *t, const kvr_fsm *fsm, uint64_t id, int64_t now,
                     bool leader);
/* Leadership changes: leader true at the moment this node takes office. */
void kvr_lease_set_leader(kvr_lease_tracker *t, bool leader, int64_t now);
/* Leases in the replicated table silent for more than ttl_ms on this node's monotonic clock
 * (see above); writes up to max ids, returns how many, marks them proposed. */
uint32_t kvr_lease_due(kvr_lease_tracker *t, const kvr_fsm *fsm, int64_t now, uint32_t ttl_ms,
                       uint64_t *ids, uint32_t max);

#endif
