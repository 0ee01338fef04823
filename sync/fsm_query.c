/* fsm_query: read-only views of the state machine (digest, counters, registry, bookings,
 * leases) for /v1/state, metrics and the tests. */
#include "fsm_int.h"

#include <string.h>
#include <xxhash.h>

/* ---------------------------------------------------------------------------------------- */
/* Inspection */

static uint64_t booking_digest(const booking *b)
{
    uint8_t buf[16 + 8 * 3 + 4 * 3];
    memcpy(buf, b->rid, 16);
    memcpy(buf + 16, &b->worker_id, 8);
    memcpy(buf + 24, &b->frontend_id, 8);
    memcpy(buf + 32, &b->start_ms, 8);
    memcpy(buf + 40, &b->blocks, 4);
    memcpy(buf + 44, &b->prefill_blocks, 4);
    memcpy(buf + 48, &b->overlap, 4);
    return XXH3_64bits_withSeed(buf, sizeof buf, 1);
}

static uint64_t worker_digest(const worker *w)
{
    struct {
        uint64_t id, active, prefill, down_seq;
        uint32_t role, up, block_size, capacity;
        char ns[KVR_FSM_NS_MAX + 1], model[KVR_FSM_MODEL_MAX + 1], url[KVR_FSM_URL_MAX + 1];
    } k;
    memset(&k, 0, sizeof k); /* padding and string tails are hashed: zero them */
    k.id = w->id;
    k.active = w->active_blocks;
    k.prefill = w->active_prefill_blocks;
    k.role = w->role;
    k.up = w->up;
    k.down_seq = w->down_seq;
    k.block_size = w->block_size;
    k.capacity = w->capacity_blocks;
    strcpy(k.ns, w->ns);
    strcpy(k.model, w->model);
    strcpy(k.url, w->url);
    return XXH3_64bits_withSeed(&k, sizeof k, 2);
}

uint64_t kvr_fsm_digest(const kvr_fsm *f)
{
    /* A sum of per-record hashes: independent of table layout and insertion order. */
    uint64_t d = 0x6b7672737461ull;
    for (uint32_t i = 0; i < f->cap_slots; i++)
        if (f->slots[i].used)
            d += booking_digest(&f->slots[i]);
    for (uint32_t i = 0; i < f->n_workers; i++)
        d += worker_digest(&f->workers[i]);
    for (uint32_t i = 0; i < f->n_leases; i++)
        d += XXH3_64bits_withSeed(&f->leases[i], sizeof f->leases[i], 3);
    /* The finished record and the clock decide future outcomes: part of the state. */
    d += f->fin_sum; /* kept up to date by fsm_fin_add / fin_pop (fsm.c) */
    d += XXH3_64bits_withSeed(&f->clock_ms, sizeof f->clock_ms, 5);
    d += XXH3_64bits_withSeed(&f->down_counter, sizeof f->down_counter, 6);
    d += fsm_pools_digest(f);
    if (f->has_policy) { /* it decides future ROUTEs: part of the state */
        const double w[6] = {f->policy.overlap_weight, f->policy.load_weight,
                             f->policy.queue_weight,   f->policy.overflow_weight,
                             f->policy.tie_band,       f->policy.temperature};
        uint8_t buf[8 + sizeof w];
        memcpy(buf, &f->policy_set_by, 8);
        memcpy(buf + 8, w, sizeof w);
        d += XXH3_64bits_withSeed(buf, sizeof buf, 8);
    }
    return XXH3_64bits(&d, sizeof d);
}

uint32_t kvr_fsm_booking_count(const kvr_fsm *f) { return f->n_bookings; }
uint32_t kvr_fsm_worker_count(const kvr_fsm *f) { return f->n_workers; }
uint32_t kvr_fsm_frontend_count(const kvr_fsm *f) { return f->n_leases; }
uint32_t kvr_fsm_finished_count(const kvr_fsm *f) { return f->n_fin; }
uint64_t kvr_fsm_finished_evicted(const kvr_fsm *f) { return f->fin_evicted; }
uint64_t kvr_fsm_clock_ms(const kvr_fsm *f) { return f->clock_ms; }
bool kvr_fsm_policy(const kvr_fsm *f, kvr_cost_params *cost, uint64_t *set_by)
{
    if (f->has_policy && cost)
        *cost = f->policy;
    if (f->has_policy && set_by)
        *set_by = f->policy_set_by;
    return f->has_policy;
}
void kvr_fsm_set_local_now(kvr_fsm *f, int64_t now) { f->local_now = now; }
bool kvr_fsm_finished_has(const kvr_fsm *f, const uint8_t request_id[KVR_REQUEST_ID_LEN])
{
    return fsm_fin_has(f, request_id);
}

static void worker_view(const worker *w, kvr_fsm_worker_view *o)
{
    memset(o, 0, sizeof *o);
    o->id = w->id;
    memcpy(o->ns, w->ns, sizeof o->ns);
    memcpy(o->model, w->model, sizeof o->model);
    memcpy(o->url, w->url, sizeof o->url);
    o->role = (kvr_worker_role)w->role;
    o->block_size = w->block_size;
    o->capacity_blocks = w->capacity_blocks;
    o->up = w->up;
    o->active_blocks = w->active_blocks;
    o->active_prefill_blocks = w->active_prefill_blocks;
    o->bookings = w->bookings;
    o->down_seq = w->down_seq;
}

int kvr_fsm_worker_at(const kvr_fsm *f, uint32_t i, kvr_fsm_worker_view *out)
{
    if (i >= f->n_workers)
        return KVR_ENOTFOUND;
    worker_view(&f->workers[i], out);
    return 0;
}

int kvr_fsm_worker_get(const kvr_fsm *f, uint64_t id, kvr_fsm_worker_view *out)
{
    long i = fsm_worker_find(f, id);
    if (i < 0)
        return KVR_ENOTFOUND;
    worker_view(&f->workers[i], out);
    return 0;
}

static void booking_view(const booking *b, kvr_fsm_booking_view *o)
{
    memcpy(o->request_id, b->rid, 16);
    o->worker_id = b->worker_id;
    o->frontend_id = b->frontend_id;
    o->start_ms = b->start_ms;
    o->blocks = b->blocks;
    o->prefill_blocks = b->prefill_blocks;
    o->overlap = b->overlap;
    o->local_ms = b->local_ms;
}

int kvr_fsm_booking_get(const kvr_fsm *f, const uint8_t rid[KVR_REQUEST_ID_LEN],
                        kvr_fsm_booking_view *out)
{
    booking *b = fsm_booking_find(f, rid);
    if (!b)
        return KVR_ENOTFOUND;
    booking_view(b, out);
    return 0;
}

void kvr_fsm_foreach_booking(const kvr_fsm *f, int (*fn)(const kvr_fsm_booking_view *, void *),
                             void *data)
{
    kvr_fsm_booking_view v;
    for (uint32_t i = 0; i < f->cap_slots; i++) {
        if (!f->slots[i].used)
            continue;
        booking_view(&f->slots[i], &v);
        if (fn(&v, data))
            return;
    }
}

int kvr_fsm_frontend_last_seen(const kvr_fsm *f, uint64_t id, uint64_t *last)
{
    for (uint32_t i = 0; i < f->n_leases; i++)
        if (f->leases[i].frontend_id == id) {
            *last = f->leases[i].last_seen_ms;
            return 0;
        }
    return KVR_ENOTFOUND;
}

int kvr_fsm_frontend_at(const kvr_fsm *f, uint32_t i, uint64_t *id, uint64_t *last)
{
    if (i >= f->n_leases)
        return KVR_ENOTFOUND;
    *id = f->leases[i].frontend_id;
    *last = f->leases[i].last_seen_ms;
    return 0;
}
