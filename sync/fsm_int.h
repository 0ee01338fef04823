/* fsm_int: the state machine's private state and the helpers its files share (fsm.c: apply,
 * fsm_query.c: views and digest, fsm_snapshot.c: snapshot and restore). Include only from
 * those files. */
#ifndef KVR_SYNC_FSM_INT_H
#define KVR_SYNC_FSM_INT_H

#include "fsm.h"


typedef struct worker {
    uint64_t id;
    char ns[KVR_FSM_NS_MAX + 1];
    char model[KVR_FSM_MODEL_MAX + 1];
    char url[KVR_FSM_URL_MAX + 1];
    uint8_t role;
    bool up;
    uint32_t block_size, capacity_blocks;
    uint64_t active_blocks, active_prefill_blocks;
    uint32_t bookings;
    uint64_t down_seq; /* !up: value of kvr_fsm.down_counter when it went down (slot reuse) */
} worker;

typedef struct booking {
    uint8_t rid[KVR_REQUEST_ID_LEN];
    uint64_t worker_id, frontend_id, start_ms;
    uint32_t blocks, prefill_blocks, overlap;
    uint8_t used;
    int64_t local_ms; /* NOT replicated: this node's kvr_fsm_set_local_now when it was booked */
} booking;

typedef struct lease {
    uint64_t frontend_id, last_seen_ms;
} lease;

/* One recently finished request (see "Finished record" in fsm.h). */
typedef struct fin_rec {
    uint8_t rid[KVR_REQUEST_ID_LEN];
    uint64_t ms;
} fin_rec;

/* A scale-to-zero pool (fsm.h "Pools"). */
typedef struct pool {
    char ns[KVR_FSM_NS_MAX + 1];
    char model[KVR_FSM_MODEL_MAX + 1];
    uint8_t state; /* kvr_pool_state, never REMOVED */
    uint64_t last_request_ms, state_since_ms;
    uint32_t wakes; /* sleeping/stopping -> waking transitions */
} pool;

struct kvr_fsm {
    kvr_fsm_options opts;
    worker *workers; /* sorted by id */
    uint32_t n_workers, cap_workers;
    booking *slots; /* open addressing, linear probing, backward-shift deletion */
    uint32_t cap_slots, n_bookings;
    lease *leases; /* insertion order */
    uint32_t n_leases, cap_leases;
    kvr_cost_worker *scratch; /* KVR_FSM_MAX_WORKERS entries */
    worker **scratch_w;
    /* Finished record: FIFO ring of opts.max_finished entries (allocated on first use) and an
     * open-addressing index over it (low 32 bits: ring position + 1, 0 = empty; high 32 bits:
     * the low 32 bits of the record's rid_hash, so a probe compares them before it touches
     * the ring, and deletion finds a record's home slot without hashing it again; linear
     * probing, backward-shift deletion), fin_mask + 1 >= 2 * max_finished slots. */
    fin_rec *fin;
    uint64_t *fin_idx;
    uint32_t fin_mask, fin_head, n_fin;
    uint64_t fin_evicted; /* records dropped before their time because the ring was full */
    uint64_t fin_sum;     /* sum of fin_rec_hash over the records (their share of the digest) */
    uint64_t clock_ms;    /* max time carried by any applied command: the FSM's only clock */
    uint64_t down_counter; /* WORKER_DOWNs applied to an up worker: orders down workers for
                              slot reuse, replicated (snapshot v3, digest) */
    int64_t local_now;     /* NOT replicated (kvr_fsm_set_local_now): stamps new bookings */
    pool *pools;           /* sorted by (ns, model) */
    uint32_t n_pools, cap_pools;
    /* The replicated route policy (fsm.h "Route policy"): valid weights when has_policy. */
    bool has_policy;
    kvr_cost_params policy;
    uint64_t policy_set_by;
};

/* Registry: index of worker id, else -1 - insertion point; the worker or NULL. */
long fsm_worker_find(const kvr_fsm *f, uint64_t id);
worker *fsm_worker_get(kvr_fsm *f, uint64_t id);
/* Bookings: the live booking of request id rid or NULL; inserts b (a copy), growing the table. */
booking *fsm_booking_find(const kvr_fsm *f, const uint8_t *rid);
int fsm_booking_insert(kvr_fsm *f, const booking *b);
/* Finished record ("Finished record" in fsm.h). */
bool fsm_fin_has(const kvr_fsm *f, const uint8_t *rid);
int fsm_fin_add(kvr_fsm *f, const uint8_t *rid, uint64_t ms);
/* WORKER_DOWN of worker id (which exists): stamps an up worker's down order (*down_seq, may be
 * NULL), frees its bookings (returned). */
uint32_t fsm_worker_mark_down(kvr_fsm *f, uint64_t id, uint64_t *down_seq);
/* Pools (fsm_pools.c): POOL_SET, and what a ROUTE's outcome does to its pool. */
void fsm_apply_pool_set(kvr_fsm *f, const kvr_pool_cmd *pc, kvr_fsm_result *res);
void fsm_pool_after_route(kvr_fsm *f, const kvr_route_cmd *rc, kvr_fsm_result *res);
uint64_t fsm_pools_digest(const kvr_fsm *f);
/* Frees every table and zeroes the counters (the options and scratch stay). */
void fsm_clear(kvr_fsm *f);
/* Copies s into dst[cap] NUL-terminated, truncated to cap - 1. */
void fsm_copy_slice(char *dst, size_t cap, kvr_slice s);

#endif
