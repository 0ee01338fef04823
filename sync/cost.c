#include "cost.h"

#include <math.h>
#include <string.h>
#include <xxhash.h>

double kvr_cost_eval(const kvr_cost_worker *w, uint32_t request_blocks,
                     const kvr_cost_params *params)
{
    kvr_cost_params def = kvr_cost_params_default();
    const kvr_cost_params *p = params ? params : &def;
    uint32_t ov = w->overlap < request_blocks ? w->overlap : request_blocks;
    /* In doubles: integers up to 2^53 are exact, and the weighted sum cannot wrap. The terms
     * are added in one fixed order so every replica rounds the same way. */
    double new_blocks = (double)(request_blocks - ov);
    double prefill = new_blocks + (double)w->active_prefill_blocks;
    double c = p->overlap_weight * prefill + p->load_weight * (double)w->active_blocks + new_blocks;
    if (p->queue_weight > 0)
        c += p->queue_weight * (double)w->bookings;
    if (p->overflow_weight > 0 && w->capacity_blocks > 0) {
        double need = (double)w->active_blocks + new_blocks - (double)w->capacity_blocks;
        if (need > 0)
            c += p->overflow_weight * need;
    }
    return c;
}

double kvr_cost_of(const kvr_cost_worker *w, uint32_t request_blocks, double overlap_weight)
{
    kvr_cost_params p = kvr_cost_params_default();
    p.overlap_weight = overlap_weight;
    return kvr_cost_eval(w, request_blocks, &p);
}

/* A finite weight >= 0, else the default: a bad flag or a zeroed field cannot make the
 * decision NaN. */
static double sane(double v, double def)
{
    return v >= 0 && !isinf(v) ? v : def;
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
    kvr_cost_params p = params ? *params : def;
    /* NaN, negative or infinite weights fall back to the default */
    p.overlap_weight = sane(p.overlap_weight, def.overlap_weight);
    p.load_weight = sane(p.load_weight, def.load_weight);
    p.queue_weight = sane(p.queue_weight, def.queue_weight);
    p.overflow_weight = sane(p.overflow_weight, def.overflow_weight);
    p.tie_band = sane(p.tie_band, def.tie_band);

    size_t best = 0;
    double best_c = kvr_cost_eval(&workers[0], request_blocks, &p);
    double min_c = best_c, max_c = best_c;
    for (size_t i = 1; i < n; i++) {
        double c = kvr_cost_eval(&workers[i], request_blocks, &p);
        if (better(request_id, &workers[i], c, &workers[best], best_c)) {
            best = i;
            best_c = c;
        }
        if (c < min_c)
            min_c = c;
        if (c > max_c)
            max_c = c;
    }

    if (p.tie_band > 0 && n > 1) {
        /* Near-equal workers: the band is relative to the best cost plus the request's own
         * size, so an idle pool (every cost about request_blocks) still has a band. The
         * lowest hash of (request id, worker id) among them wins; its cost is recomputed, not
         * remembered, so nothing is allocated. */
        double band = p.tie_band * (best_c + (double)request_blocks);
        uint64_t best_h = kvr_cost_tiebreak(request_id, workers[best].worker_id);
        size_t pick = best;
        for (size_t i = 0; i < n; i++) {
            if (i == best)
                continue;
            double c = kvr_cost_eval(&workers[i], request_blocks, &p);
            if (c - best_c > band)
                continue;
            uint64_t h = kvr_cost_tiebreak(request_id, workers[i].worker_id);
            if (h < best_h || (h == best_h && workers[i].worker_id < workers[pick].worker_id)) {
                best_h = h;
                pick = i;
            }
        }
        if (pick != best) {
            best = pick;
            best_c = kvr_cost_eval(&workers[best], request_blocks, &p);
        }
    }

    double t = p.temperature;
    if (t > 0 && !isinf(t) && n > 1 && max_c > min_c) {
        /* Dynamo-style softmax over min-max normalised costs; two passes (sum, then walk)
         * so nothing is allocated. */
        double range = max_c - min_c, sum = 0;
        for (size_t i = 0; i < n; i++)
            sum += exp(-((kvr_cost_eval(&workers[i], request_blocks, &p) - min_c) / range) / t);
        uint64_t seed = XXH3_64bits_withSeed(request_id, KVR_REQUEST_ID_LEN, 0x6b7672ull);
        double u = (double)(splitmix64(&seed) >> 11) * (1.0 / 9007199254740992.0) * sum;
        double acc = 0;
        for (size_t i = 0; i < n; i++) {
            double c = kvr_cost_eval(&workers[i], request_blocks, &p);
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
