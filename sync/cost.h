/* cost: the pure route decision of DESIGN section 6 (Dynamo's cost function).
 *
 * For every live worker w of the requested model/namespace (overlap 0 when the router's
 * index had no match for it):
 *
 *   cost(w) = overlap_weight * (request_blocks - overlap(w) + active_prefill_blocks(w))
 *           + active_blocks(w) + request_blocks - overlap(w)
 *
 * overlap is clamped to request_blocks, so the subtraction never wraps. Lower cost wins; ties
 * go to fewer active blocks, then to the lower XXH3-64(request_id || LE64(worker_id)), then to
 * the lower worker_id. With temperature > 0 a worker is sampled with probability proportional
 * to exp(-normalised_cost / temperature), drawn from a PRNG seeded from request_id only.
 *
 * Pure and deterministic: no clock, no global state, no allocation. Any thread. */
#ifndef KVR_SYNC_COST_H
#define KVR_SYNC_COST_H

#include <stddef.h>
#include <stdint.h>

#define KVR_REQUEST_ID_LEN 16

typedef struct kvr_cost_worker {
    uint64_t worker_id;
    uint32_t overlap;               /* blocks of the request this worker already caches */
    uint64_t active_blocks;         /* blocks booked on this worker (all outstanding requests) */
    uint64_t active_prefill_blocks; /* blocks still waiting for prefill on this worker */
} kvr_cost_worker;

typedef struct kvr_cost_params {
    double overlap_weight; /* default 1.0 */
    double temperature;    /* 0 = argmin (default) */
} kvr_cost_params;

static inline kvr_cost_params kvr_cost_params_default(void)
{
    return (kvr_cost_params){1.0, 0.0};
}

/* Cost of one worker (see above). */
double kvr_cost_of(const kvr_cost_worker *w, uint32_t request_blocks, double overlap_weight);

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
