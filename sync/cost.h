/* cost: the pure route decision of DESIGN section 6 (Dynamo's cost function, plus the load
 * terms of issue 14).
 *
 * For every live worker w of the requested model/namespace (overlap 0 when the router's
 * index had no match for it), with new(w) = request_blocks - overlap(w):
 *
 *   cost(w) = overlap_weight * (new(w) + active_prefill_blocks(w))
 *           + load_weight * active_blocks(w) + new(w)
 *           + queue_weight * bookings(w)
 *           + overflow_weight * max(0, active_blocks(w) + new(w) - capacity_blocks(w))
 *
 * (the last term only when capacity_blocks(w) > 0: the blocks this request would push out
 * of a worker whose KV cache its outstanding requests already fill, i.e. preemption or the
 * eviction of the prefixes the next requests would have hit). With the defaults
 * (load_weight 1, queue_weight 0, overflow_weight 0) it is Dynamo's formula.
 * overlap is clamped to request_blocks, so the subtraction never wraps. Lower cost wins; ties
 * go to fewer active blocks, then to the lower XXH3-64(request_id || LE64(worker_id)), then to
 * the lower worker_id. With tie_band > 0 every worker whose cost is within
 * tie_band * (min cost + request_blocks) of the minimum counts as tied with the best one, and the
 * lowest XXH3-64(request_id || LE64(worker_id)) among them wins: near-equal workers share the
 * load by request id instead of the same one always winning. With temperature > 0 a worker
 * is sampled with probability proportional to exp(-normalised_cost / temperature), drawn
 * from a PRNG seeded from request_id only.
 *
 * Pure and deterministic: no clock, no global state, no allocation. Any thread. */
#ifndef KVR_SYNC_COST_H
#define KVR_SYNC_COST_H

#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVR_REQUEST_ID_LEN 16

typedef struct kvr_cost_worker {
    uint64_t worker_id;
    uint32_t overlap;               /* blocks of the request this worker already caches */
    uint64_t active_blocks;         /* blocks booked on this worker (all outstanding requests) */
    uint64_t active_prefill_blocks; /* blocks still waiting for prefill on this worker */
    uint32_t bookings;              /* outstanding requests booked on it (queue depth) */
    uint64_t capacity_blocks;       /* its KV cache size in blocks (heartbeat); 0 unknown */
} kvr_cost_worker;

/* Every weight must be finite and >= 0: kvr_cost_choose replaces any other value by the
 * field's default. They are part of the replicated decision: every router of a Raft group
 * must run the same ones (/v1/state shows them). */
typedef struct kvr_cost_params {
    double overlap_weight;  /* default 1.0 */
    double temperature;     /* 0 = argmin (default) */
    double load_weight;     /* per active block; default 1.0 */
    double queue_weight;    /* per outstanding booking, in blocks; default 0 */
    double overflow_weight; /* per block beyond the worker's capacity; default 0 */
    double tie_band;        /* near-equal band, a fraction (see above); default 0 */
} kvr_cost_params;

static inline kvr_cost_params kvr_cost_params_default(void)
{
    return (kvr_cost_params){1.0, 0.0, 1.0, 0.0, 0.0, 0.0};
}

/* The one range check of a set of weights, shared by kvr-routerd's flags, the ROUTE_POLICY
 * command (cmd.h) and the FSM snapshot: every weight finite, overlap_weight > 0, the others
 * >= 0. */
static inline bool kvr_cost_params_valid(const kvr_cost_params *p)
{
    return p->overlap_weight > 0 && p->load_weight >= 0 && p->queue_weight >= 0 &&
           p->overflow_weight >= 0 && p->tie_band >= 0 && p->temperature >= 0 &&
           isfinite(p->overlap_weight) && isfinite(p->load_weight) && isfinite(p->queue_weight) &&
           isfinite(p->overflow_weight) && isfinite(p->tie_band) && isfinite(p->temperature);
}

/* Whether two sets of weights are the same (field by field; valid ones hold no NaN). */
static inline bool kvr_cost_params_equal(const kvr_cost_params *a, const kvr_cost_params *b)
{
    return a->overlap_weight == b->overlap_weight && a->load_weight == b->load_weight &&
           a->queue_weight == b->queue_weight && a->overflow_weight == b->overflow_weight &&
           a->tie_band == b->tie_band && a->temperature == b->temperature;
}

/* Cost of one worker with the default load terms and this overlap weight (see above). */
double kvr_cost_of(const kvr_cost_worker *w, uint32_t request_blocks, double overlap_weight);

/* Cost of one worker under params (NULL: defaults), weights taken as given (see above). */
double kvr_cost_eval(const kvr_cost_worker *w, uint32_t request_blocks,
                     const kvr_cost_params *params);

/* XXH3-64 of request_id (16 bytes) || LE64(worker_id): the last-resort tie-breaker. */
uint64_t kvr_cost_tiebreak(const uint8_t request_id[KVR_REQUEST_ID_LEN], uint64_t worker_id);

/* Chooses a worker among workers[0..n). With temperature > 0 the result depends on the order
 * of `workers`: pass them in a canonical order (the FSM passes ascending worker_id).
 * Returns the index of the chosen worker, or -1 when n == 0. *cost_out (may be NULL) gets the
 * chosen worker's cost. */
long kvr_cost_choose(const uint8_t request_id[KVR_REQUEST_ID_LEN], uint32_t request_blocks,
                     const kvr_cost_worker *workers, size_t n, const kvr_cost_params *params,
                     double *cost_out);

#endif
