/* fsm: kvroute's replicated state machine (DESIGN section 6), usable standalone.
 *
 * State: worker registry (sorted by worker id), bookings (request_id → worker, blocks, prefill
 * blocks outstanding, frontend_id, start_ms), frontend leases (frontend_id → last_seen_ms), and
 * per-worker active_blocks / active_prefill_blocks derived from the bookings.
 *
 * Commands are msgpack with a version byte first, encoded and decoded by cmd.h (included
 * here); the same bytes go into the Raft log. kvr_fsm_apply is total: it never fails, a malformed or rejected
 * command changes nothing and says why in the result's outcome. It is deterministic (time comes
 * from the command, never the clock; the route choice is kvr_cost_choose over the registry in
 * ascending worker id order) and idempotent per request_id: re-applying a ROUTE whose booking is
 * still live returns that booking with outcome KVR_OUT_DUPLICATE and changes nothing (but the
 * clock, below), except that a ROUTE with pin_worker set moves a live booking (and its load) to
 * that worker.
 *
 * Finished record (each request_id is booked at most once). Every FREE records its request_id
 * as finished, whether it freed a live booking or found none (a FREE that overtook its ROUTE).
 * A ROUTE for a recorded request_id books nothing and answers KVR_OUT_FINISHED: a late retry,
 * a reconcile re-proposal or a duplicate delivery applied after the FREE can no longer leave a
 * booking behind until EXPIRE. Only FREE records; bookings dropped by WORKER_DOWN,
 * FRONTEND_EXPIRE or EXPIRE are not recorded. The FSM has its own clock, clock_ms: the largest
 * time carried by any applied command (ROUTE now_ms, FRONTEND_SEEN/_EXPIRE now_ms, EXPIRE
 * before_ms), so every replica has the same clock after the same commands; a record carries
 * the clock at its FREE and is dropped once clock_ms >= its time + finished_ttl_ms (default
 * 600 s, the default max request age). Bound: at most max_finished records (default 2^18,
 * 24 bytes each in a FIFO ring plus a 4-byte index slot per 2^k >= 2 * max_finished: ~8 MiB at
 * the default, allocated at the first FREE). Past the bound the oldest record is dropped early
 * (kvr_fsm_finished_evicted counts these); a ROUTE for that request applied later books again,
 * as without the record, and that booking lasts until EXPIRE. At 1,000 requests/s the default
 * still remembers the last ~260 s, far beyond any retry window. A router whose clock runs far
 * ahead can make records expire early on every replica (never differently on different ones).
 * The record and clock_ms are in the snapshot (format version 2) and in the digest; all
 * replicas must use the same max_finished and finished_ttl_ms (like max_bookings).
 *
 * Registry slots (issue 18 defect 10): a WORKER_DOWN of an up worker stamps it with the next
 * value of a replicated down counter. A WORKER_UP for a new id when the registry holds
 * KVR_FSM_MAX_WORKERS removes the down worker with the smallest stamp (ties: smallest id) and
 * takes its place; live workers are never removed (then KVR_OUT_FULL). Stamps and counter are
 * in the snapshot (version 3) and the digest, so every replica frees the same slot.
 *
 * Memory: a kvr_fsm owns all its state; kvr_fsm_free releases it. A kvr_cmd decoded from bytes
 * borrows strings from those bytes and its candidates from caller storage.
 * Threads: none of its own; one thread at a time (the loop thread that owns it). */
#ifndef KVR_SYNC_FSM_H
#define KVR_SYNC_FSM_H

#include "cmd.h"
#include "cost.h"
#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVR_FSM_MAX_WORKERS 4096
#define KVR_FSM_MAX_FRONTENDS 4096
#define KVR_FSM_DEFAULT_MAX_BOOKINGS (1u << 20)
#define KVR_FSM_DEFAULT_MAX_FINISHED (1u << 18)
#define KVR_FSM_MAX_FINISHED_LIMIT (1u << 24) /* larger max_finished values are clamped */
#define KVR_FSM_DEFAULT_FINISHED_TTL_MS 600000u
#define KVR_FSM_MAX_POOLS 1024

typedef enum kvr_outcome {
    KVR_OUT_OK = 0,
    KVR_OUT_DUPLICATE = 1, /* ROUTE re-applied: the original booking is returned */
    KVR_OUT_INVALID = 2,   /* malformed command or field out of bounds */
    KVR_OUT_FULL = 3,      /* booking/worker/frontend table at its bound */
    KVR_OUT_NO_WORKER = 4, /* ROUTE: no live worker for this model/namespace */
    KVR_OUT_UNKNOWN = 5,   /* FREE/PREFILL_DONE/WORKER_DOWN/FRONTEND_EXPIRE of nothing known
                              (a FREE still records the request as finished) */
    KVR_OUT_FINISHED = 6,  /* ROUTE of a request already FREEd (in the finished record): nothing
                              booked, worker_id 0. Name "finished". */
} kvr_outcome;
const char *kvr_outcome_name(kvr_outcome o);

/* Disaggregation (issue 15 item 2): what a ROUTE with disagg set decided (kvr_route_cmd).
 * Decode candidates are the live workers of role decode or both, chosen by kvr_cost_choose
 * (their overlap and load). Then, uncached = tokens - decode overlap x block_size:
 *   FALLBACK  no live prefill worker (or no decode worker: then chosen as a plain ROUTE among
 *             prefill/both workers): the booked worker does everything;
 *   LOCAL     uncached <= max_local_prefill, or every role-prefill worker has
 *             max_prefill_queue or more bookings (outstanding prefills: PREFILL_DONE frees
 *             them): the decode worker prefills itself;
 *   REMOTE    else: the decode worker is booked with no prefill blocks, and the prefill worker
 *             gets a second booking under a request id derived from the request's
 *             (kvr_fsm_prefill_rid) with the uncached blocks on it as prefill. That booking is a
 *             booking like others (digest, snapshot, EXPIRE, WORKER_DOWN, FRONTEND_EXPIRE); the
 *             request's PREFILL_DONE and FREE free it. No state beyond bookings is added.
 * A DUPLICATE of a disaggregated ROUTE answers REMOTE with the prefill worker while its
 * prefill booking lives, else LOCAL. */
typedef enum kvr_disagg_path {
    KVR_DISAGG_NONE = 0, /* not asked for */
    KVR_DISAGG_REMOTE = 1,
    KVR_DISAGG_LOCAL = 2,
    KVR_DISAGG_FALLBACK = 3,
} kvr_disagg_path;
/* "remote" / "local" / "fallback"; "" for NONE. */
const char *kvr_disagg_path_name(kvr_disagg_path p);
/* The request id of the prefill booking of request rid (a keyed hash of it). */
void kvr_fsm_prefill_rid(const uint8_t *rid, uint8_t *out);

typedef struct kvr_fsm_result {
    kvr_outcome outcome;
    kvr_cmd_type type;
    uint64_t worker_id;      /* ROUTE: booked worker (also for DUPLICATE) */
    uint32_t overlap;        /* ROUTE: the booked worker's overlap */
    uint32_t request_blocks; /* ROUTE */
    double cost;             /* ROUTE: the booked worker's cost at decision time */
    uint32_t freed;          /* bookings freed (FREE, WORKER_DOWN, FRONTEND_EXPIRE, EXPIRE) */
    uint64_t down_seq;       /* WORKER_DOWN that took an up worker down: its new down stamp
                                (replicated, so the same on every replica); 0 otherwise */
    char url[KVR_FSM_URL_MAX + 1]; /* ROUTE: booked worker's url */
    /* ROUTE with no live worker in a scale-to-zero pool: the pool is waking (this command may
     * have started the wake). The router tells the frontend to hold the request. */
    bool pool_waking;
    /* ROUTE with disagg: the path taken and, for REMOTE, the prefill worker booked. */
    kvr_disagg_path path;
    uint64_t prefill_worker_id;
    uint32_t prefill_overlap;
    char prefill_url[KVR_FSM_URL_MAX + 1];
} kvr_fsm_result;

/* Approximate index hooks (kvr-routerd --index approx, issue 14 item 4). Called inside
 * kvr_fsm_apply, so on every replica at the same point of the log with the same arguments:
 * route_hook after a ROUTE that carries approx hashes booked a worker (outcome OK, a pinned
 * move included; not DUPLICATE), with the booked worker, its registry capacity (0 unknown)
 * and the FSM clock after the command (its own time, never the wall clock); worker_down_hook
 * after a WORKER_DOWN of a known worker. They must not call back into the FSM. They are NOT
 * part of the FSM's state: digest and snapshot ignore what they do. */
typedef void (*kvr_fsm_route_hook)(void *data, uint64_t worker_id, uint32_t capacity_blocks,
                                   const kvr_route_cmd *rc, uint64_t clock_ms);
typedef void (*kvr_fsm_worker_down_hook)(void *data, uint64_t worker_id);

typedef struct kvr_fsm_options {
    uint32_t max_bookings;   /* 0 → KVR_FSM_DEFAULT_MAX_BOOKINGS */
    kvr_cost_params cost;    /* all zero → kvr_cost_params_default() (weight 1.0, temp 0) */
    uint32_t max_finished;   /* finished record bound; 0 → KVR_FSM_DEFAULT_MAX_FINISHED */
    uint32_t finished_ttl_ms; /* record lifetime in command time; 0 → 600000 */
    kvr_fsm_route_hook route_hook;             /* NULL: none (see above) */
    kvr_fsm_worker_down_hook worker_down_hook; /* NULL: none */
    void *hook_data;
} kvr_fsm_options;

typedef struct kvr_fsm kvr_fsm;

/* Copy of one registry entry (strings NUL-terminated), for /v1/state. */
typedef struct kvr_fsm_worker_view {
    uint64_t id;
    char ns[KVR_FSM_NS_MAX + 1];
    char model[KVR_FSM_MODEL_MAX + 1];
    char url[KVR_FSM_URL_MAX + 1];
    kvr_worker_role role;
    uint32_t block_size, capacity_blocks;
    bool up;
    uint64_t active_blocks, active_prefill_blocks;
    uint32_t bookings;
    uint64_t down_seq; /* replicated stamp of its last up->down transition (0: never down) */
} kvr_fsm_worker_view;

typedef struct kvr_fsm_booking_view {
    uint8_t request_id[KVR_REQUEST_ID_LEN];
    uint64_t worker_id, frontend_id, start_ms;
    uint32_t blocks, prefill_blocks, overlap;
    int64_t local_ms; /* not replicated: kvr_fsm_set_local_now when this replica booked it (0:
                         unknown, e.g. restored from a snapshot) */
} kvr_fsm_booking_view;

/* opts may be NULL. Returns NULL on allocation failure. */
kvr_fsm *kvr_fsm_new(const kvr_fsm_options *opts);
void kvr_fsm_free(kvr_fsm *f);

/* Applies one command. Total: always fills *res (outcome says what happened). */
void kvr_fsm_apply(kvr_fsm *f, const kvr_cmd *cmd, kvr_fsm_result *res);
/* Decodes then applies; undecodable bytes give outcome KVR_OUT_INVALID. */
void kvr_fsm_apply_bytes(kvr_fsm *f, const void *data, size_t len, kvr_fsm_result *res);

/* Order-independent 64-bit digest of bookings + registry + leases + finished record + clock:
 * two replicas that applied
 * the same commands have equal digests, whatever their memory layout. */
uint64_t kvr_fsm_digest(const kvr_fsm *f);
uint32_t kvr_fsm_booking_count(const kvr_fsm *f);
uint32_t kvr_fsm_worker_count(const kvr_fsm *f);
uint32_t kvr_fsm_frontend_count(const kvr_fsm *f);
/* Finished record: entries held, whether request_id is recorded, records dropped early because
 * the record was full (since this process created or restored the FSM; not replicated). */
uint32_t kvr_fsm_finished_count(const kvr_fsm *f);
bool kvr_fsm_finished_has(const kvr_fsm *f, const uint8_t request_id[KVR_REQUEST_ID_LEN]);
uint64_t kvr_fsm_finished_evicted(const kvr_fsm *f);
/* The FSM clock: the largest command time applied so far (ms). */
uint64_t kvr_fsm_clock_ms(const kvr_fsm *f);
/* Local, NOT replicated annotation: bookings made from now on carry local time now (the
 * caller's monotonic clock, ms) in kvr_fsm_booking_view.local_ms, so request age can be judged
 * on one clock (liveness.h). Changes no replicated state, digest or snapshot. */
void kvr_fsm_set_local_now(kvr_fsm *f, int64_t now);
/* Copies registry entry i (0 <= i < worker_count, ascending id). KVR_ENOTFOUND past the end. */
int kvr_fsm_worker_at(const kvr_fsm *f, uint32_t i, kvr_fsm_worker_view *out);
int kvr_fsm_worker_get(const kvr_fsm *f, uint64_t worker_id, kvr_fsm_worker_view *out);
int kvr_fsm_booking_get(const kvr_fsm *f, const uint8_t request_id[KVR_REQUEST_ID_LEN],
                        kvr_fsm_booking_view *out);
/* Calls fn for every live booking (unspecified order); stops when fn returns non-zero. */
void kvr_fsm_foreach_booking(const kvr_fsm *f, int (*fn)(const kvr_fsm_booking_view *, void *),
                             void *data);
int kvr_fsm_frontend_last_seen(const kvr_fsm *f, uint64_t frontend_id, uint64_t *last_seen_ms);
/* Lease i (0 <= i < frontend_count). KVR_ENOTFOUND past the end. */
int kvr_fsm_frontend_at(const kvr_fsm *f, uint32_t i, uint64_t *frontend_id, uint64_t *last_seen_ms);

/* Pools (scale-to-zero, DESIGN section 13): (namespace, model) → state (awake, waking,
 * sleeping, stopping), last request time and since when in this state, all in command time.
 * POOL_SET creates, changes or (state REMOVED) deletes a pool; at most KVR_FSM_MAX_POOLS
 * (then KVR_OUT_FULL). A ROUTE of a pool's model and namespace sets its last request time;
 * one that finds no live worker while the pool sleeps, is stopping, or is awake with no worker
 * left moves it to waking (the wake is the route's own replicated consequence, so every
 * replica agrees on it and a leader change loses nothing) and says pool_waking; one that books
 * a worker while the pool is not awake makes it awake. The leader drives the rest
 * (routerd/pools.c). Pools are in the snapshot (version 4) and the digest. */
typedef struct kvr_fsm_pool_view {
    char ns[KVR_FSM_NS_MAX + 1];
    char model[KVR_FSM_MODEL_MAX + 1];
    kvr_pool_state state;
    uint64_t last_request_ms, state_since_ms;
    uint32_t wakes;
} kvr_fsm_pool_view;
uint32_t kvr_fsm_pool_count(const kvr_fsm *f);
/* Pool i (0 <= i < pool_count, sorted by namespace then model). KVR_ENOTFOUND past the end. */
int kvr_fsm_pool_at(const kvr_fsm *f, uint32_t i, kvr_fsm_pool_view *out);
int kvr_fsm_pool_get(const kvr_fsm *f, const char *ns, const char *model, kvr_fsm_pool_view *out);

/* Route policy: the route cost's weights as replicated configuration (DESIGN section 6). A
 * ROUTE_POLICY command (cmd.h) replaces them, in log order; a ROUTE decides with its own
 * weights when it carries them (has_cost: every ROUTE of a log written before this command
 * existed keeps deciding as it did), else with the policy once one was applied, else with
 * the options' weights (kvr_fsm_options.cost: then replicas with different options would
 * decide differently, which is why a router carries its weights until it has seen a policy
 * applied). Policy and proposer are in the digest and the snapshot (version 5; older ones load
 * with none). Returns whether a policy was applied; *cost and *set_by (either may be NULL)
 * get it. */
bool kvr_fsm_policy(const kvr_fsm *f, kvr_cost_params *cost, uint64_t *set_by);

/* Snapshot: "KVRS" magic, format version (5), msgpack body [workers, bookings, leases,
 * clock_ms, finished [[request_id, ms]...] oldest first, down_counter, pools, policy (nil or
 * [set_by, overlap_weight, load_weight, queue_weight, overflow_weight, tie_band, temperature])],
 * each worker [id, ns, model, url, role, up, block_size, capacity_blocks, down_seq], XXH3-64
 * checksum of all before it. Versions 3 and 4 (no pools, no policy) restore too. Version 2 (no
 * down_seq, no down_counter: every down worker restores with stamp 0) and version 1 (also no clock,
 * no record: clock 0, empty record) still restore; other versions are refused with
 * KVR_EUNSUPPORTED. Bookings' local_ms is not in it (restored as 0). Appends to out. */
int kvr_fsm_snapshot(const kvr_fsm *f, kvr_buf *out, kvr_err *err);
/* Replaces f's state with a snapshot's. On any error (bad magic/version/checksum/contents)
 * f is left unchanged and err says why. */
int kvr_fsm_restore(kvr_fsm *f, const void *data, size_t len, kvr_err *err);
/* A deep copy (via snapshot/restore). NULL on failure. */
kvr_fsm *kvr_fsm_clone(const kvr_fsm *f);

#endif
