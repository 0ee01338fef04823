#include "cost.h"

#include <math.h>
#include <string.h>
#include <xxhash.h>

double kvr_cost_of(const kvr_cost_worker *w, uint32_t request_blocks, double overlap_weight)
{
    uint32_t ov = w->overlap < request_blocks ? w->overlap : request_blocks;
    /* In doubles: integers up to 2^53 are exact, and the weighted sum cannot wrap. */
    double new_blocks = (double)(request_blocks - ov);
    double prefill = new_blocks + (double)w->active_prefill_blocks;
    return overlap_weight * prefill + (double)w->active_blocks + new_blocks;
}

uint64_t kvr_cost_tiebreak(const uint8_t request_id[KVR_REQUEST_ID_LEN], uint64_t worker_id)
{
    uint8_t b[KVR_REQUEST_ID_LEN + 8];
    memcpy(b, request_id, KVR_REQUEST_ID_LEN);
    for (int i = 0; i < 8; i++)
        b[KVR_REQUEST_ID_LEN + i] = (uint8_t)(worker_id >> (8 * i));
    return XXH3_64bits(b, sizeof b);
}

/* Strict "a is better than b" for argmin, a total order over distinct worker ids. */
static int better(const uint8_t *rid, const kvr_cost_worker *a, double ca,
                  const kvr_cost_worker *b, double cb)
{
    if (ca != cb)
        return ca < cb;
    if (a->active_blocks != b->active_blocks)
        return a->active_blocks < b->active_blocks;
    uint64_t ha = kvr_cost_tiebreak(rid, a->worker_id), hb = kvr_cost_tiebreak(rid, b->worker_id);
    if (ha != hb)
        return ha < hb;
    return a->worker_id < b->worker_id;
}

/* splitmix64: tiny, well-mixed, and fully determined by its seed. */
static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

long kvr_cost_choose(const uint8_t request_id[KVR_REQUEST_ID_LEN], uint32_t request_blocks,
                     const kvr_cost_worker *workers, size_t n, const kvr_cost_params *params,
                     double *cost_out)
{
    if (n == 0)
        return -1;
    kvr_cost_params def = kvr_cost_params_default();
    if (!params)
        params = &def;
    double w = params->overlap_weight;
    if (!(w >= 0) || isinf(w)) /* NaN, negative or infinite weights fall back to the default */
        w = 1.0;

    size_t best = 0;
    double best_c = kvr_cost_of(&workers[0], request_blocks, w);
    double min_c = best_c, max_c = best_c;
    for (size_t i = 1; i < n; i++) {
        double c = kvr_cost_of(&workers[i], request_blocks, w);
        if (better(request_id, &workers[i], c, &workers[best], best_c)) {
            best = i;
            best_c = c;
        }
        if (c < min_c)
            min_c = c;
        if (c > max_c)
            max_c = c;
    }

    double t = params->temperature;
    if (t > 0 && !isinf(t) && n > 1 && max_c > min_c) {
        /* Dynamo-style softmax over min-max normalised costs; two passes (sum, then walk)
         * so nothing is allocated. */
        double range = max_c - min_c, sum = 0;
        for (size_t i = 0; i < n; i++)
            sum += exp(-((kvr_cost_of(&workers[i], request_blocks, w) - min_c) / range) / t);
        uint64_t seed = XXH3_64bits_withSeed(request_id, KVR_REQUEST_ID_LEN, 0x6b7672ull);
        double u = (double)(splitmix64(&seed) >> 11) * (1.0 / 9007199254740992.0) * sum;
        double acc = 0;
        for (size_t i = 0; i < n; i++) {
            double c = kvr_cost_of(&workers[i], request_blocks, w);
            acc += exp(-((c - min_c) / range) / t);
            if (u < acc) {
                if (cost_out)
                    *cost_out = c;
                return (long)i;
            }
        }
        /* Rounding left u at the very top: fall through to the argmin. */
    }
    if (cost_out)
        *cost_out = best_c;
    return (long)best;
}
