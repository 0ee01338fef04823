#include "fsm_int.h"

#include "kvr_mp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

/* State: fsm_int.h. */

static uint64_t rid_hash(const uint8_t *rid)
{
    return XXH3_64bits(rid, KVR_REQUEST_ID_LEN);
}

kvr_fsm *kvr_fsm_new(const kvr_fsm_options *opts)
{
    kvr_fsm *f = calloc(1, sizeof *f);
    if (!f)
        return NULL;
    if (opts)
        f->opts = *opts;
    else
        f->opts.cost = kvr_cost_params_default();
    if (f->opts.max_bookings == 0)
        f->opts.max_bookings = KVR_FSM_DEFAULT_MAX_BOOKINGS;
    if (f->opts.cost.overlap_weight == 0 && f->opts.cost.temperature == 0)
        f->opts.cost = kvr_cost_params_default();
    if (f->opts.max_finished == 0)
        f->opts.max_finished = KVR_FSM_DEFAULT_MAX_FINISHED;
    if (f->opts.max_finished > KVR_FSM_MAX_FINISHED_LIMIT)
        f->opts.max_finished = KVR_FSM_MAX_FINISHED_LIMIT;
    if (f->opts.finished_ttl_ms == 0)
        f->opts.finished_ttl_ms = KVR_FSM_DEFAULT_FINISHED_TTL_MS;
    f->cap_slots = 1024;
    f->slots = calloc(f->cap_slots, sizeof *f->slots);
    f->scratch = malloc(KVR_FSM_MAX_WORKERS * sizeof *f->scratch);
    f->scratch_w = malloc(KVR_FSM_MAX_WORKERS * sizeof *f->scratch_w);
    if (!f->slots || !f->scratch || !f->scratch_w) {
        kvr_fsm_free(f);
        return NULL;
    }
    return f;
}

void fsm_clear(kvr_fsm *f)
{
    free(f->workers);
    free(f->slots);
    free(f->leases);
    free(f->fin);
    free(f->fin_idx);
    free(f->pools);
    f->pools = NULL;
    f->n_pools = f->cap_pools = 0;
    f->workers = NULL;
    f->slots = NULL;
    f->leases = NULL;
    f->fin = NULL;
    f->fin_idx = NULL;
    f->n_workers = f->cap_workers = f->cap_slots = f->n_bookings = f->n_leases = f->cap_leases = 0;
    f->fin_mask = f->fin_head = f->n_fin = 0;
    f->fin_evicted = f->clock_ms = f->fin_sum = 0;
    f->has_policy = false;
    memset(&f->policy, 0, sizeof f->policy);
    f->policy_set_by = 0;
}

void kvr_fsm_free(kvr_fsm *f)
{
    if (!f)
        return;
    fsm_clear(f);
    free(f->scratch);
    free(f->scratch_w);
    free(f);
}

/* --- workers --- */

long fsm_worker_find(const kvr_fsm *f, uint64_t id)
{
    uint32_t lo = 0, hi = f->n_workers;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (f->workers[mid].id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < f->n_workers && f->workers[lo].id == id)
        return lo;
    return -1 - (long)lo; /* insertion point encoded */
}

worker *fsm_worker_get(kvr_fsm *f, uint64_t id)
{
    long i = fsm_worker_find(f, id);
    return i >= 0 ? &f->workers[i] : NULL;
}


/* --- finished record --- */

static int fin_alloc(kvr_fsm *f)
{
    if (f->fin)
        return 0;
    uint32_t slots = 16;
    while (slots < 2 * f->opts.max_finished)
        slots *= 2;
    f->fin = malloc((size_t)f->opts.max_finished * sizeof *f->fin);
    f->fin_idx = calloc(slots, sizeof *f->fin_idx);
    if (!f->fin || !f->fin_idx) {
        free(f->fin);
        free(f->fin_idx);
        f->fin = NULL;
        f->fin_idx = NULL;
        return KVR_ENOMEM;
    }
    f->fin_mask = slots - 1;
    f->fin_head = f->n_fin = 0;
    return 0;
}

static uint64_t fin_rec_hash(const fin_rec *e)
{
    uint8_t buf[KVR_REQUEST_ID_LEN + 8];
    memcpy(buf, e->rid, KVR_REQUEST_ID_LEN);
    memcpy(buf + KVR_REQUEST_ID_LEN, &e->ms, 8);
    return XXH3_64bits_withSeed(buf, sizeof buf, 4);
}

/* Index slot holding rid (h: its rid_hash, low 32 bits), or -1. The ring is read only when
 * the stored hash bits match: the ring and the index are far larger than the CPU caches
 * (6 + 4 MiB by default), and reading the ring for every occupied slot probed cost a cache
 * miss each (fin_slot was the largest user-space cost of a router under kvr-bench raft). */
static long fin_slot_h(const kvr_fsm *f, const uint8_t *rid, uint32_t h)
{
    if (!f->fin_idx)
        return -1;
    for (uint32_t i = h & f->fin_mask;; i = (i + 1) & f->fin_mask) {
        uint64_t v = f->fin_idx[i];
        if (v == 0)
            return -1;
        if ((uint32_t)(v >> 32) == h &&
            memcmp(f->fin[(uint32_t)v - 1].rid, rid, KVR_REQUEST_ID_LEN) == 0)
            return i;
    }
}

static long fin_slot(const kvr_fsm *f, const uint8_t *rid)
{
    return fin_slot_h(f, rid, (uint32_t)rid_hash(rid));
}

bool fsm_fin_has(const kvr_fsm *f, const uint8_t *rid)
{
    return fin_slot(f, rid) >= 0;
}

/* Drops the oldest record (the ring's head). */
static void fin_pop(kvr_fsm *f)
{
    uint32_t mask = f->fin_mask;
    long s = fin_slot(f, f->fin[f->fin_head].rid);
    if (s >= 0) {
        uint32_t hole = (uint32_t)s;
        f->fin_idx[hole] = 0;
        for (uint32_t j = (hole + 1) & mask; f->fin_idx[j]; j = (j + 1) & mask) {
            uint32_t home = (uint32_t)(f->fin_idx[j] >> 32) & mask;
            bool in_range = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
            if (!in_range) {
                f->fin_idx[hole] = f->fin_idx[j];
                f->fin_idx[j] = 0;
                hole = j;
            }
        }
    }
    f->fin_sum -= fin_rec_hash(&f->fin[f->fin_head]);
    f->fin_head = (f->fin_head + 1) % f->opts.max_finished;
    f->n_fin--;
}

/* Appends (rid, ms) as the newest record; when the ring is full the oldest is dropped first.
 * rid must not be recorded yet. */
int fsm_fin_add(kvr_fsm *f, const uint8_t *rid, uint64_t ms)
{
    int rc = fin_alloc(f);
    if (rc)
        return rc;
    if (f->n_fin == f->opts.max_finished) {
        fin_pop(f);
        f->fin_evicted++;
    }
    uint32_t pos = (uint32_t)(((uint64_t)f->fin_head + f->n_fin) % f->opts.max_finished);
    memcpy(f->fin[pos].rid, rid, KVR_REQUEST_ID_LEN);
    f->fin[pos].ms = ms;
    f->fin_sum += fin_rec_hash(&f->fin[pos]);
    uint32_t h = (uint32_t)rid_hash(rid);
    uint32_t i = h & f->fin_mask;
    while (f->fin_idx[i])
        i = (i + 1) & f->fin_mask;
    f->fin_idx[i] = (uint64_t)h << 32 | (pos + 1);
    f->n_fin++;
    return 0;
}

/* Advances the FSM clock to t (never backwards) and drops records older than the ttl. */
static void clock_advance(kvr_fsm *f, uint64_t t)
{
    if (t > f->clock_ms)
        f->clock_ms = t;
    uint64_t ttl = f->opts.finished_ttl_ms;
    if (f->clock_ms < ttl)
        return;
    uint64_t horizon = f->clock_ms - ttl; /* (no overflow, whatever times commands carry) */
    while (f->n_fin && f->fin[f->fin_head].ms <= horizon)
        fin_pop(f);
}

/* Records rid as finished now (if it is not already). */
static void fin_record(kvr_fsm *f, const uint8_t *rid)
{
    if (!fsm_fin_has(f, rid))
        (void)fsm_fin_add(f, rid, f->clock_ms); /* out of memory: the record is best effort */
}

/* --- bookings --- */

booking *fsm_booking_find(const kvr_fsm *f, const uint8_t *rid)
{
    uint32_t mask = f->cap_slots - 1;
    for (uint32_t i = (uint32_t)rid_hash(rid) & mask;; i = (i + 1) & mask) {
        booking *b = &f->slots[i];
        if (!b->used)
            return NULL;
        if (memcmp(b->rid, rid, KVR_REQUEST_ID_LEN) == 0)
            return b;
    }
}

static void slot_put(booking *slots, uint32_t cap, const booking *b)
{
    uint32_t mask = cap - 1;
    uint32_t i = (uint32_t)rid_hash(b->rid) & mask;
    while (slots[i].used)
        i = (i + 1) & mask;
    slots[i] = *b;
}

static int bookings_grow(kvr_fsm *f)
{
    uint32_t ncap = f->cap_slots * 2;
    booking *ns = calloc(ncap, sizeof *ns);
    if (!ns)
        return KVR_ENOMEM;
    for (uint32_t i = 0; i < f->cap_slots; i++)
        if (f->slots[i].used)
            slot_put(ns, ncap, &f->slots[i]);
    free(f->slots);
    f->slots = ns;
    f->cap_slots = ncap;
    return 0;
}

/* Inserts b (not present). Grows at 50% load. */
int fsm_booking_insert(kvr_fsm *f, const booking *b)
{
    if ((uint64_t)(f->n_bookings + 1) * 2 > f->cap_slots) {
        int rc = bookings_grow(f);
        if (rc)
            return rc;
    }
    slot_put(f->slots, f->cap_slots, b);
    f->n_bookings++;
    return 0;
}

static void load_sub(kvr_fsm *f, const booking *b)
{
    worker *w = fsm_worker_get(f, b->worker_id);
    if (!w)
        return;
    w->active_blocks -= b->blocks <= w->active_blocks ? b->blocks : w->active_blocks;
    w->active_prefill_blocks -= b->prefill_blocks <= w->active_prefill_blocks
                                    ? b->prefill_blocks
                                    : w->active_prefill_blocks;
    if (w->bookings)
        w->bookings--;
}

/* Removes the booking in slot i (backward-shift deletion keeps probe chains intact). */
static void booking_remove_slot(kvr_fsm *f, uint32_t i)
{
    uint32_t mask = f->cap_slots - 1;
    load_sub(f, &f->slots[i]);
    f->slots[i].used = 0;
    f->n_bookings--;
    uint32_t hole = i;
    for (uint32_t j = (i + 1) & mask; f->slots[j].used; j = (j + 1) & mask) {
        uint32_t home = (uint32_t)rid_hash(f->slots[j].rid) & mask;
        /* j may move to hole if home is not cyclically within (hole, j]. */
        bool in_range = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!in_range) {
            f->slots[hole] = f->slots[j];
            f->slots[j].used = 0;
            hole = j;
        }
    }
}

/* Frees every booking matching pred; returns the count. */
static uint32_t bookings_free_if(kvr_fsm *f, bool (*pred)(const booking *, uint64_t), uint64_t arg)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < f->cap_slots;) {
        if (f->slots[i].used && pred(&f->slots[i], arg)) {
            booking_remove_slot(f, i);
            n++;
            continue; /* the shift may have moved an unvisited booking into slot i */
        }
        i++;
    }
    return n;
}

static bool pred_worker(const booking *b, uint64_t id) { return b->worker_id == id; }
static bool pred_frontend(const booking *b, uint64_t id) { return b->frontend_id == id; }
static bool pred_older(const booking *b, uint64_t t) { return b->start_ms < t; }

/* ---------------------------------------------------------------------------------------- */
/* Apply */

void fsm_copy_slice(char *dst, size_t cap, kvr_slice s)
{
    size_t n = s.len < cap - 1 ? s.len : cap - 1;
    if (n)
        memcpy(dst, s.base, n);
    dst[n] = 0;
}

static bool slice_eq_str(kvr_slice s, const char *str)
{
    size_t n = strlen(str);
    return s.len == n && (n == 0 || memcmp(s.base, str, n) == 0);
}

static void fill_route_result(const kvr_fsm *f, const booking *b, kvr_fsm_result *res, double cost)
{
    res->worker_id = b->worker_id;
    res->overlap = b->overlap;
    res->request_blocks = b->blocks;
    res->cost = cost;
    long wi = fsm_worker_find(f, b->worker_id);
    if (wi >= 0)
        snprintf(res->url, sizeof res->url, "%s", f->workers[wi].url);
}

static int cand_cmp(const void *a, const void *b)
{
    uint64_t x = ((const kvr_route_candidate *)a)->worker_id;
    uint64_t y = ((const kvr_route_candidate *)b)->worker_id;
    return x < y ? -1 : x > y;
}

static uint32_t overlap_of(const kvr_route_candidate *c, uint32_t n, uint64_t id)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (c[mid].worker_id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && c[lo].worker_id == id ? c[lo].overlap : 0;
}

static bool cand_listed(const kvr_route_candidate *c, uint32_t n, uint64_t id)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (c[mid].worker_id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && c[lo].worker_id == id;
}

/* The approximate index's hook (fsm.h): worker w now holds the request's blocks. */
static void approx_hook(const kvr_fsm *f, const worker *w, const kvr_route_cmd *rc)
{
    if (f->opts.route_hook && rc->n_approx_hashes)
        f->opts.route_hook(f->opts.hook_data, w->id, w->capacity_blocks, rc, f->clock_ms);
}

void kvr_fsm_prefill_rid(const uint8_t *rid, uint8_t *out)
{
    /* a keyed 128-bit hash: a request id can neither equal nor be made to equal the prefill
     * id of another request in practice */
    XXH128_hash_t h = XXH3_128bits_withSeed(rid, KVR_REQUEST_ID_LEN, 0x70726566696c6cull);
    for (int k = 0; k < 8; k++) {
        out[k] = (uint8_t)(h.low64 >> (8 * k));
        out[8 + k] = (uint8_t)(h.high64 >> (8 * k));
    }
}

const char *kvr_disagg_path_name(kvr_disagg_path p)
{
    static const char *names[] = {"", "remote", "local", "fallback"};
    return (unsigned)p < sizeof names / sizeof *names ? names[p] : "";
}

/* Removes the prefill booking of request rid, if any. */
static void prefill_booking_free(kvr_fsm *f, const uint8_t *rid)
{
    uint8_t prid[KVR_REQUEST_ID_LEN];
    kvr_fsm_prefill_rid(rid, prid);
    booking *pb = fsm_booking_find(f, prid);
    if (pb)
        booking_remove_slot(f, (uint32_t)(pb - f->slots));
}

/* A DUPLICATE (or pinned move) of a disaggregated ROUTE: REMOTE while its prefill booking
 * lives, else LOCAL. */
static void fill_prefill_result(const kvr_fsm *f, const kvr_route_cmd *rc, kvr_fsm_result *res)
{
    if (!rc->disagg)
        return;
    uint8_t prid[KVR_REQUEST_ID_LEN];
    kvr_fsm_prefill_rid(rc->request_id, prid);
    const booking *pb = fsm_booking_find(f, prid);
    res->path = pb ? KVR_DISAGG_REMOTE : KVR_DISAGG_LOCAL;
    if (!pb)
        return;
    res->prefill_worker_id = pb->worker_id;
    res->prefill_overlap = pb->overlap;
    long wi = fsm_worker_find(f, pb->worker_id);
    if (wi >= 0)
        snprintf(res->prefill_url, sizeof res->prefill_url, "%s", f->workers[wi].url);
}

/* Fills f->scratch / f->scratch_w with the live workers of the request's model and namespace
 * whose role is in role_mask (bit 1 << role) and that pass the request's pin and candidate
 * filters, in ascending id order. Returns their count. */
static size_t gather(kvr_fsm *f, const kvr_route_cmd *rc, const kvr_route_candidate *cand,
                     uint32_t nc, unsigned role_mask)
{
    size_t n = 0;
    for (uint32_t i = 0; i < f->n_workers; i++) {
        worker *w = &f->workers[i];
        if (!w->up || !slice_eq_str(rc->model, w->model) || !slice_eq_str(rc->ns, w->ns))
            continue;
        if (!(role_mask & (1u << w->role)))
            continue;
        if (rc->pin_worker && w->id != rc->pin_worker)
            continue;
        if (rc->only_candidates && !cand_listed(cand, nc, w->id))
            continue;
        f->scratch[n] = (kvr_cost_worker){w->id, overlap_of(cand, nc, w->id), w->active_blocks,
                                          w->active_prefill_blocks, w->bookings,
                                          w->capacity_blocks};
        f->scratch_w[n] = w;
        n++;
    }
    return n;
}

#define ROLES_PREFILL_CAPABLE ((1u << KVR_ROLE_BOTH) | (1u << KVR_ROLE_PREFILL))
#define ROLES_DECODE_CAPABLE ((1u << KVR_ROLE_BOTH) | (1u << KVR_ROLE_DECODE))

static void apply_route(kvr_fsm *f, const kvr_route_cmd *rc, kvr_fsm_result *res)
{
    if (rc->n_candidates > KVR_FSM_MAX_CANDIDATES || (rc->n_candidates && !rc->candidates) ||
        rc->model.len > KVR_FSM_MODEL_MAX || rc->ns.len > KVR_FSM_NS_MAX) {
        res->outcome = KVR_OUT_INVALID;
        return;
    }
    clock_advance(f, rc->now_ms);
    if (fsm_fin_has(f, rc->request_id)) {
        /* Late ROUTE of a finished request (retry, re-proposal, duplicate delivery, or a
         * reconcile ROUTE overtaken by its FREE): book nothing. */
        res->outcome = KVR_OUT_FINISHED;
        return;
    }
    booking *old = fsm_booking_find(f, rc->request_id);
    if (old) {
        worker *pw = rc->pin_worker && old->worker_id != rc->pin_worker
                         ? fsm_worker_get(f, rc->pin_worker)
                         : NULL;
        if (pw && pw->up) {
            /* Pinned re-proposal of a booking made elsewhere (degraded-mode reconcile): the
             * request runs on the pinned worker, so its load moves there. */
            load_sub(f, old);
            old->worker_id = pw->id;
            pw->active_blocks += old->blocks;
            pw->active_prefill_blocks += old->prefill_blocks;
            pw->bookings++;
            res->outcome = KVR_OUT_OK;
            fill_route_result(f, old, res, 0);
            fill_prefill_result(f, rc, res);
            approx_hook(f, pw, rc);
            return;
        }
        res->outcome = KVR_OUT_DUPLICATE;
        fill_route_result(f, old, res, 0);
        fill_prefill_result(f, rc, res);
        return;
    }
    if (f->n_bookings >= f->opts.max_bookings) {
        res->outcome = KVR_OUT_FULL;
        return;
    }
    /* Sorted copy of the candidates for binary search (stack: bounded by MAX_CANDIDATES). */
    kvr_route_candidate cand[KVR_FSM_MAX_CANDIDATES];
    uint32_t nc = rc->n_candidates;
    if (nc)
        memcpy(cand, rc->candidates, nc * sizeof *cand);
    qsort(cand, nc, sizeof *cand, cand_cmp);

    /* A plain ROUTE goes to a worker that can take a fresh prompt (a decode-only worker
     * cannot), unless pinned: a pin names where the request already runs. A disaggregated one
     * goes to a decode-capable worker, or as a plain one when there is none. */
    unsigned roles = rc->pin_worker ? ~0u : ROLES_PREFILL_CAPABLE;
    size_t n = 0;
    if (rc->disagg && !rc->pin_worker) {
        n = gather(f, rc, cand, nc, ROLES_DECODE_CAPABLE);
        res->path = KVR_DISAGG_LOCAL;
    }
    if (n == 0) {
        n = gather(f, rc, cand, nc, roles);
        if (rc->disagg)
            res->path = KVR_DISAGG_FALLBACK;
    }
    double cost = 0;
    /* the proposing router's weights when the command carries them (cmd.h), so replicas with
     * other flags still decide alike; else the replicated policy ("Route policy", fsm.h) */
    const kvr_cost_params *cp = rc->has_cost    ? &rc->cost
                                : f->has_policy ? &f->policy
                                                : &f->opts.cost;
    long k = kvr_cost_choose(rc->request_id, rc->request_blocks, f->scratch, n, cp, &cost);
    if (k < 0) {
        res->outcome = KVR_OUT_NO_WORKER;
        res->path = KVR_DISAGG_NONE;
        return;
    }
    worker *w = f->scratch_w[k];
    uint32_t ov = f->scratch[k].overlap;
    if (ov > rc->request_blocks)
        ov = rc->request_blocks;

    /* The prefill leg (fsm.h "Disaggregation"): everything below reads replicated state and
     * the command only. */
    booking pb = {0};
    worker *pfw = NULL;
    if (res->path == KVR_DISAGG_LOCAL) {
        uint64_t cached = (uint64_t)ov * rc->block_size;
        uint64_t uncached = rc->tokens > cached ? rc->tokens - cached : 0;
        size_t np = gather(f, rc, cand, nc, 1u << KVR_ROLE_PREFILL);
        /* The prefill queue is the pool's (Dynamo's rule: one queue all prefill workers take
         * from): only the workers under max_prefill_queue compete, and the prefill stays local
         * when every one is at it — not when the cheapest one alone is, while another sits
         * idle (that kept most long prompts on the decode workers under load). */
        size_t nq = 0;
        for (size_t i = 0; i < np; i++) {
            if (f->scratch_w[i]->bookings >= rc->max_prefill_queue)
                continue;
            f->scratch[nq] = f->scratch[i];
            f->scratch_w[nq] = f->scratch_w[i];
            nq++;
        }
        uint8_t prid[KVR_REQUEST_ID_LEN];
        kvr_fsm_prefill_rid(rc->request_id, prid);
        double pcost = 0;
        long pk = nq ? kvr_cost_choose(prid, rc->request_blocks, f->scratch, nq, cp, &pcost) : -1;
        if (np == 0) {
            res->path = KVR_DISAGG_FALLBACK;
        } else if (pk >= 0 && uncached > rc->max_local_prefill &&
                   f->n_bookings + 2 <= f->opts.max_bookings) {
            /* (a booking table one short of full keeps the prefill local, not refused) */
            pfw = f->scratch_w[pk];
            uint32_t pov = f->scratch[pk].overlap;
            if (pov > rc->request_blocks)
                pov = rc->request_blocks;
            memcpy(pb.rid, prid, KVR_REQUEST_ID_LEN);
            pb.worker_id = pfw->id;
            pb.frontend_id = rc->frontend_id;
            pb.start_ms = rc->now_ms;
            pb.blocks = rc->request_blocks;
            pb.prefill_blocks = rc->request_blocks - pov;
            pb.overlap = pov;
            pb.used = 1;
            pb.local_ms = f->local_now;
            res->path = KVR_DISAGG_REMOTE;
        }
    }
    booking b = {0};
    memcpy(b.rid, rc->request_id, KVR_REQUEST_ID_LEN);
    b.worker_id = w->id;
    b.frontend_id = rc->frontend_id;
    b.start_ms = rc->now_ms;
    b.blocks = rc->request_blocks;
    /* a remote prefill leaves the decode worker nothing to prefill */
    b.prefill_blocks = pfw ? 0 : rc->request_blocks - ov;
    b.overlap = ov;
    b.used = 1;
    b.local_ms = f->local_now;
    if (fsm_booking_insert(f, &b) != 0) {
        res->outcome = KVR_OUT_FULL; /* out of memory: refuse rather than crash */
        res->path = KVR_DISAGG_NONE;
        return;
    }
    w->active_blocks += b.blocks;
    w->active_prefill_blocks += b.prefill_blocks;
    w->bookings++;
    if (pfw && fsm_booking_insert(f, &pb) != 0) {
        /* out of memory for the second booking: the decode worker prefills itself */
        booking *db = fsm_booking_find(f, rc->request_id);
        db->prefill_blocks = rc->request_blocks - ov;
        w->active_prefill_blocks += db->prefill_blocks;
        pfw = NULL;
        res->path = KVR_DISAGG_LOCAL;
    }
    if (pfw) {
        pfw->active_blocks += pb.blocks;
        pfw->active_prefill_blocks += pb.prefill_blocks;
        pfw->bookings++;
        res->prefill_worker_id = pfw->id;
        res->prefill_overlap = pb.overlap;
        snprintf(res->prefill_url, sizeof res->prefill_url, "%s", pfw->url);
    }
    res->outcome = KVR_OUT_OK;
    fill_route_result(f, &b, res, cost);
    approx_hook(f, w, rc);
    if (pfw)
        approx_hook(f, pfw, rc);
}

uint32_t fsm_worker_mark_down(kvr_fsm *f, uint64_t id, uint64_t *down_seq)
{
    worker *w = fsm_worker_get(f, id);
    if (!w)
        return 0;
    if (w->up) {
        w->down_seq = ++f->down_counter;
        if (down_seq)
            *down_seq = w->down_seq;
    }
    w->up = false;
    uint32_t freed = bookings_free_if(f, pred_worker, id);
    w = fsm_worker_get(f, id);
    w->active_blocks = w->active_prefill_blocks = 0;
    w->bookings = 0;
    if (f->opts.worker_down_hook)
        f->opts.worker_down_hook(f->opts.hook_data, id);
    return freed;
}

/* Registry full: removes the down worker that went down first (smallest down_seq, then
 * smallest id). Only replicated state decides, so every replica frees the same slot. A down
 * worker holds no bookings (WORKER_DOWN freed them; a ROUTE never books a down worker). Returns
 * false when every registered worker is up. */
static bool worker_reuse_slot(kvr_fsm *f)
{
    long best = -1;
    for (uint32_t i = 0; i < f->n_workers; i++) {
        const worker *w = &f->workers[i];
        if (!w->up && w->bookings == 0 &&
            (best < 0 || w->down_seq < f->workers[best].down_seq))
            best = i;
    }
    if (best < 0)
        return false;
    memmove(&f->workers[best], &f->workers[best + 1],
            (f->n_workers - (uint32_t)best - 1) * sizeof *f->workers);
    f->n_workers--;
    return true;
}

static void apply_worker_up(kvr_fsm *f, const kvr_worker_info *wi, kvr_fsm_result *res)
{
    if (wi->id == 0 || wi->ns.len > KVR_FSM_NS_MAX || wi->model.len > KVR_FSM_MODEL_MAX ||
        wi->url.len > KVR_FSM_URL_MAX || (unsigned)wi->role > KVR_ROLE_DECODE) {
        res->outcome = KVR_OUT_INVALID;
        return;
    }
    long i = fsm_worker_find(f, wi->id);
    worker *w;
    if (i >= 0) {
        w = &f->workers[i];
    } else {
        if (f->n_workers >= KVR_FSM_MAX_WORKERS) {
            if (!worker_reuse_slot(f)) {
                res->outcome = KVR_OUT_FULL;
                return;
            }
            i = fsm_worker_find(f, wi->id); /* the array shifted */
        }
        if (f->n_workers == f->cap_workers) {
            uint32_t nc = f->cap_workers ? f->cap_workers * 2 : 16;
            worker *nw = realloc(f->workers, nc * sizeof *nw);
            if (!nw) {
                res->outcome = KVR_OUT_FULL;
                return;
            }
            f->workers = nw;
            f->cap_workers = nc;
        }
        uint32_t at = (uint32_t)(-1 - i);
        memmove(&f->workers[at + 1], &f->workers[at], (f->n_workers - at) * sizeof *w);
        f->n_workers++;
        w = &f->workers[at];
        memset(w, 0, sizeof *w);
        w->id = wi->id;
    }
    fsm_copy_slice(w->ns, sizeof w->ns, wi->ns);
    fsm_copy_slice(w->model, sizeof w->model, wi->model);
    fsm_copy_slice(w->url, sizeof w->url, wi->url);
    w->role = (uint8_t)wi->role;
    w->block_size = wi->block_size;
    w->capacity_blocks = wi->capacity_blocks;
    w->up = true;
    w->down_seq = 0;
    res->outcome = KVR_OUT_OK;
    res->worker_id = w->id;
}

static void apply_frontend_seen(kvr_fsm *f, uint64_t id, uint64_t now, kvr_fsm_result *res)
{
    for (uint32_t i = 0; i < f->n_leases; i++) {
        if (f->leases[i].frontend_id == id) {
            if (now > f->leases[i].last_seen_ms)
                f->leases[i].last_seen_ms = now;
            res->outcome = KVR_OUT_OK;
            return;
        }
    }
    if (f->n_leases >= KVR_FSM_MAX_FRONTENDS) {
        res->outcome = KVR_OUT_FULL;
        return;
    }
    if (f->n_leases == f->cap_leases) {
        uint32_t nc = f->cap_leases ? f->cap_leases * 2 : 16;
        lease *nl = realloc(f->leases, nc * sizeof *nl);
        if (!nl) {
            res->outcome = KVR_OUT_FULL;
            return;
        }
        f->leases = nl;
        f->cap_leases = nc;
    }
    f->leases[f->n_leases++] = (lease){id, now};
    res->outcome = KVR_OUT_OK;
}

static void apply_frontend_expire(kvr_fsm *f, uint64_t id, kvr_fsm_result *res)
{
    bool known = false;
    for (uint32_t i = 0; i < f->n_leases; i++) {
        if (f->leases[i].frontend_id == id) {
            /* keep insertion order stable: shift down */
            memmove(&f->leases[i], &f->leases[i + 1], (f->n_leases - i - 1) * sizeof *f->leases);
            f->n_leases--;
            known = true;
            break;
        }
    }
    res->freed = bookings_free_if(f, pred_frontend, id);
    res->outcome = known || res->freed ? KVR_OUT_OK : KVR_OUT_UNKNOWN;
}

void kvr_fsm_apply(kvr_fsm *f, const kvr_cmd *cmd, kvr_fsm_result *res)
{
    memset(res, 0, sizeof *res);
    res->type = cmd->type;
    switch (cmd->type) {
    case KVR_CMD_ROUTE:
        apply_route(f, &cmd->u.route, res);
        fsm_pool_after_route(f, &cmd->u.route, res);
        return;
    case KVR_CMD_POOL_SET:
        clock_advance(f, cmd->u.pool.now_ms);
        fsm_apply_pool_set(f, &cmd->u.pool, res);
        return;
    case KVR_CMD_ROUTE_POLICY:
        /* total like every apply: weights the decoder would refuse change nothing */
        if (!kvr_cost_params_valid(&cmd->u.policy.cost)) {
            res->outcome = KVR_OUT_INVALID;
            return;
        }
        f->has_policy = true;
        f->policy = cmd->u.policy.cost;
        f->policy_set_by = cmd->u.policy.set_by;
        res->outcome = KVR_OUT_OK;
        return;
    case KVR_CMD_PREFILL_DONE: {
        prefill_booking_free(f, cmd->u.request_id); /* the prefill worker's part is done */
        booking *b = fsm_booking_find(f, cmd->u.request_id);
        if (!b) {
            res->outcome = KVR_OUT_UNKNOWN;
            return;
        }
        worker *w = fsm_worker_get(f, b->worker_id);
        if (w)
            w->active_prefill_blocks -= b->prefill_blocks <= w->active_prefill_blocks
                                            ? b->prefill_blocks
                                            : w->active_prefill_blocks;
        b->prefill_blocks = 0;
        res->outcome = KVR_OUT_OK;
        res->worker_id = b->worker_id;
        return;
    }
    case KVR_CMD_FREE: {
        /* Either way the request is recorded as finished, so a ROUTE for it applied later
         * (including one that this FREE overtook) books nothing. */
        fin_record(f, cmd->u.request_id);
        booking *b = fsm_booking_find(f, cmd->u.request_id);
        if (!b) {
            prefill_booking_free(f, cmd->u.request_id);
            res->outcome = KVR_OUT_UNKNOWN;
            return;
        }
        res->worker_id = b->worker_id;
        booking_remove_slot(f, (uint32_t)(b - f->slots));
        prefill_booking_free(f, cmd->u.request_id); /* after: the removal may move slots */
        res->outcome = KVR_OUT_OK;
        res->freed = 1;
        return;
    }
    case KVR_CMD_WORKER_UP:
        apply_worker_up(f, &cmd->u.worker, res);
        return;
    case KVR_CMD_WORKER_DOWN: {
        res->worker_id = cmd->u.worker_id;
        if (!fsm_worker_get(f, cmd->u.worker_id)) {
            res->outcome = KVR_OUT_UNKNOWN;
            return;
        }
        res->freed = fsm_worker_mark_down(f, cmd->u.worker_id, &res->down_seq);
        res->outcome = KVR_OUT_OK;
        return;
    }
    case KVR_CMD_FRONTEND_SEEN:
        clock_advance(f, cmd->u.frontend.now_ms);
        apply_frontend_seen(f, cmd->u.frontend.frontend_id, cmd->u.frontend.now_ms, res);
        return;
    case KVR_CMD_FRONTEND_EXPIRE:
        clock_advance(f, cmd->u.frontend.now_ms);
        apply_frontend_expire(f, cmd->u.frontend.frontend_id, res);
        return;
    case KVR_CMD_EXPIRE:
        clock_advance(f, cmd->u.before_ms);
        res->freed = bookings_free_if(f, pred_older, cmd->u.before_ms);
        res->outcome = KVR_OUT_OK;
        return;
    default:
        res->outcome = KVR_OUT_INVALID;
        return;
    }
}

void kvr_fsm_apply_bytes(kvr_fsm *f, const void *data, size_t len, kvr_fsm_result *res)
{
    kvr_cmd cmd;
    kvr_route_candidate cand[KVR_FSM_MAX_CANDIDATES];
    if (kvr_cmd_decode(data, len, &cmd, cand, NULL) != 0) {
        memset(res, 0, sizeof *res);
        res->outcome = KVR_OUT_INVALID;
        return;
    }
    kvr_fsm_apply(f, &cmd, res);
}

const char *kvr_outcome_name(kvr_outcome o)
{
    static const char *names[] = {"ok",        "duplicate", "invalid", "full",
                                  "no_worker", "unknown",   "finished"};
    return (unsigned)o < sizeof names / sizeof *names ? names[o] : "?";
}
