#include "fsm.h"

#include "kvr_mp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

/* ---------------------------------------------------------------------------------------- */
/* State */

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
     * open-addressing index over it (ring position + 1; 0 = empty; linear probing,
     * backward-shift deletion), fin_mask + 1 >= 2 * max_finished slots. */
    fin_rec *fin;
    uint32_t *fin_idx;
    uint32_t fin_mask, fin_head, n_fin;
    uint64_t fin_evicted; /* records dropped before their time because the ring was full */
    uint64_t fin_sum;     /* sum of fin_rec_hash over the records (their share of the digest) */
    uint64_t clock_ms;    /* max time carried by any applied command: the FSM's only clock */
    uint64_t down_counter; /* WORKER_DOWNs applied to an up worker: orders down workers for
                              slot reuse, replicated (snapshot v3, digest) */
    int64_t local_now;     /* NOT replicated (kvr_fsm_set_local_now): stamps new bookings */
};

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

static void fsm_clear(kvr_fsm *f)
{
    free(f->workers);
    free(f->slots);
    free(f->leases);
    free(f->fin);
    free(f->fin_idx);
    f->workers = NULL;
    f->slots = NULL;
    f->leases = NULL;
    f->fin = NULL;
    f->fin_idx = NULL;
    f->n_workers = f->cap_workers = f->cap_slots = f->n_bookings = f->n_leases = f->cap_leases = 0;
    f->fin_mask = f->fin_head = f->n_fin = 0;
    f->fin_evicted = f->clock_ms = f->fin_sum = 0;
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

static long worker_find(const kvr_fsm *f, uint64_t id)
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

static worker *worker_get(kvr_fsm *f, uint64_t id)
{
    long i = worker_find(f, id);
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

/* Index slot holding rid, or -1. */
static long fin_slot(const kvr_fsm *f, const uint8_t *rid)
{
    if (!f->fin_idx)
        return -1;
    for (uint32_t i = (uint32_t)rid_hash(rid) & f->fin_mask;; i = (i + 1) & f->fin_mask) {
        uint32_t v = f->fin_idx[i];
        if (v == 0)
            return -1;
        if (memcmp(f->fin[v - 1].rid, rid, KVR_REQUEST_ID_LEN) == 0)
            return i;
    }
}

static bool fin_has(const kvr_fsm *f, const uint8_t *rid)
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
            uint32_t home = (uint32_t)rid_hash(f->fin[f->fin_idx[j] - 1].rid) & mask;
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
static int fin_add(kvr_fsm *f, const uint8_t *rid, uint64_t ms)
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
    uint32_t i = (uint32_t)rid_hash(rid) & f->fin_mask;
    while (f->fin_idx[i])
        i = (i + 1) & f->fin_mask;
    f->fin_idx[i] = pos + 1;
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
    if (!fin_has(f, rid))
        (void)fin_add(f, rid, f->clock_ms); /* out of memory: the record is best effort */
}

/* --- bookings --- */

static booking *booking_find(const kvr_fsm *f, const uint8_t *rid)
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
static int booking_insert(kvr_fsm *f, const booking *b)
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
    worker *w = worker_get(f, b->worker_id);
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

static void copy_slice(char *dst, size_t cap, kvr_slice s)
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
    long wi = worker_find(f, b->worker_id);
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

static void apply_route(kvr_fsm *f, const kvr_route_cmd *rc, kvr_fsm_result *res)
{
    if (rc->n_candidates > KVR_FSM_MAX_CANDIDATES || (rc->n_candidates && !rc->candidates) ||
        rc->model.len > KVR_FSM_MODEL_MAX || rc->ns.len > KVR_FSM_NS_MAX) {
        res->outcome = KVR_OUT_INVALID;
        return;
    }
    clock_advance(f, rc->now_ms);
    if (fin_has(f, rc->request_id)) {
        /* Late ROUTE of a finished request (retry, re-proposal, duplicate delivery, or a
         * reconcile ROUTE overtaken by its FREE): book nothing. */
        res->outcome = KVR_OUT_FINISHED;
        return;
    }
    booking *old = booking_find(f, rc->request_id);
    if (old) {
        worker *pw = rc->pin_worker && old->worker_id != rc->pin_worker
                         ? worker_get(f, rc->pin_worker)
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
            return;
        }
        res->outcome = KVR_OUT_DUPLICATE;
        fill_route_result(f, old, res, 0);
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

    size_t n = 0;
    for (uint32_t i = 0; i < f->n_workers; i++) {
        worker *w = &f->workers[i];
        if (!w->up || !slice_eq_str(rc->model, w->model) || !slice_eq_str(rc->ns, w->ns))
            continue;
        if (w->role == KVR_ROLE_DECODE)
            continue; /* a decode-only worker cannot take a fresh prompt */
        if (rc->pin_worker && w->id != rc->pin_worker)
            continue;
        if (rc->only_candidates && !cand_listed(cand, nc, w->id))
            continue;
        f->scratch[n] = (kvr_cost_worker){w->id, overlap_of(cand, nc, w->id), w->active_blocks,
                                          w->active_prefill_blocks};
        f->scratch_w[n] = w;
        n++;
    }
    double cost = 0;
    long k = kvr_cost_choose(rc->request_id, rc->request_blocks, f->scratch, n, &f->opts.cost, &cost);
    if (k < 0) {
        res->outcome = KVR_OUT_NO_WORKER;
        return;
    }
    worker *w = f->scratch_w[k];
    uint32_t ov = f->scratch[k].overlap;
    if (ov > rc->request_blocks)
        ov = rc->request_blocks;
    booking b = {0};
    memcpy(b.rid, rc->request_id, KVR_REQUEST_ID_LEN);
    b.worker_id = w->id;
    b.frontend_id = rc->frontend_id;
    b.start_ms = rc->now_ms;
    b.blocks = rc->request_blocks;
    b.prefill_blocks = rc->request_blocks - ov;
    b.overlap = ov;
    b.used = 1;
    b.local_ms = f->local_now;
    if (booking_insert(f, &b) != 0) {
        res->outcome = KVR_OUT_FULL; /* out of memory: refuse rather than crash */
        return;
    }
    w->active_blocks += b.blocks;
    w->active_prefill_blocks += b.prefill_blocks;
    w->bookings++;
    res->outcome = KVR_OUT_OK;
    fill_route_result(f, &b, res, cost);
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
    long i = worker_find(f, wi->id);
    worker *w;
    if (i >= 0) {
        w = &f->workers[i];
    } else {
        if (f->n_workers >= KVR_FSM_MAX_WORKERS) {
            if (!worker_reuse_slot(f)) {
                res->outcome = KVR_OUT_FULL;
                return;
            }
            i = worker_find(f, wi->id); /* the array shifted */
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
    copy_slice(w->ns, sizeof w->ns, wi->ns);
    copy_slice(w->model, sizeof w->model, wi->model);
    copy_slice(w->url, sizeof w->url, wi->url);
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
        return;
    case KVR_CMD_PREFILL_DONE: {
        booking *b = booking_find(f, cmd->u.request_id);
        if (!b) {
            res->outcome = KVR_OUT_UNKNOWN;
            return;
        }
        worker *w = worker_get(f, b->worker_id);
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
        booking *b = booking_find(f, cmd->u.request_id);
        if (!b) {
            res->outcome = KVR_OUT_UNKNOWN;
            return;
        }
        res->worker_id = b->worker_id;
        booking_remove_slot(f, (uint32_t)(b - f->slots));
        res->outcome = KVR_OUT_OK;
        res->freed = 1;
        return;
    }
    case KVR_CMD_WORKER_UP:
        apply_worker_up(f, &cmd->u.worker, res);
        return;
    case KVR_CMD_WORKER_DOWN: {
        worker *w = worker_get(f, cmd->u.worker_id);
        res->worker_id = cmd->u.worker_id;
        if (!w) {
            res->outcome = KVR_OUT_UNKNOWN;
            return;
        }
        if (w->up) {
            w->down_seq = ++f->down_counter;
            res->down_seq = w->down_seq;
        }
        w->up = false;
        res->freed = bookings_free_if(f, pred_worker, w->id);
        w = worker_get(f, cmd->u.worker_id);
        w->active_blocks = w->active_prefill_blocks = 0;
        w->bookings = 0;
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

/* ---------------------------------------------------------------------------------------- */
/* Encoding */

#define CK(expr)                                                                                   \
    do {                                                                                           \
        if ((rc = (expr)) != 0)                                                                    \
            goto fail;                                                                             \
    } while (0)

int kvr_cmd_encode(const kvr_cmd *cmd, kvr_buf *out, kvr_err *err)
{
    int rc = 0;
    size_t start = out->len;
    uint8_t ver = KVR_CMD_VERSION;
    CK(kvr_buf_append(out, &ver, 1));
    switch (cmd->type) {
    case KVR_CMD_ROUTE: {
        const kvr_route_cmd *r = &cmd->u.route;
        if (r->n_candidates > KVR_FSM_MAX_CANDIDATES || r->model.len > KVR_FSM_MODEL_MAX ||
            r->ns.len > KVR_FSM_NS_MAX) {
            out->len = start;
            return kvr_err_set(err, KVR_EINVAL, "encoding ROUTE: field over its bound");
        }
        CK(kvr_mp_write_array(out, r->only_candidates ? 10 : 9));
        CK(kvr_mp_write_uint(out, KVR_CMD_ROUTE));
        CK(kvr_mp_write_bin(out, r->request_id, KVR_REQUEST_ID_LEN));
        CK(kvr_mp_write_uint(out, r->frontend_id));
        CK(kvr_mp_write_uint(out, r->now_ms));
        CK(kvr_mp_write_uint(out, r->request_blocks));
        CK(kvr_mp_write_str(out, r->model.base, r->model.len));
        CK(kvr_mp_write_str(out, r->ns.base, r->ns.len));
        CK(kvr_mp_write_uint(out, r->pin_worker));
        CK(kvr_mp_write_array(out, r->n_candidates));
        for (uint32_t i = 0; i < r->n_candidates; i++) {
            CK(kvr_mp_write_array(out, 2));
            CK(kvr_mp_write_uint(out, r->candidates[i].worker_id));
            CK(kvr_mp_write_uint(out, r->candidates[i].overlap));
        }
        if (r->only_candidates)
            CK(kvr_mp_write_bool(out, true));
        break;
    }
    case KVR_CMD_PREFILL_DONE:
    case KVR_CMD_FREE:
        CK(kvr_mp_write_array(out, 2));
        CK(kvr_mp_write_uint(out, cmd->type));
        CK(kvr_mp_write_bin(out, cmd->u.request_id, KVR_REQUEST_ID_LEN));
        break;
    case KVR_CMD_WORKER_UP: {
        const kvr_worker_info *w = &cmd->u.worker;
        if (w->ns.len > KVR_FSM_NS_MAX || w->model.len > KVR_FSM_MODEL_MAX ||
            w->url.len > KVR_FSM_URL_MAX) {
            out->len = start;
            return kvr_err_set(err, KVR_EINVAL, "encoding WORKER_UP: field over its bound");
        }
        CK(kvr_mp_write_array(out, 8));
        CK(kvr_mp_write_uint(out, KVR_CMD_WORKER_UP));
        CK(kvr_mp_write_uint(out, w->id));
        CK(kvr_mp_write_str(out, w->ns.base, w->ns.len));
        CK(kvr_mp_write_str(out, w->model.base, w->model.len));
        CK(kvr_mp_write_str(out, w->url.base, w->url.len));
        CK(kvr_mp_write_uint(out, (uint64_t)w->role));
        CK(kvr_mp_write_uint(out, w->block_size));
        CK(kvr_mp_write_uint(out, w->capacity_blocks));
        break;
    }
    case KVR_CMD_WORKER_DOWN:
        CK(kvr_mp_write_array(out, 2));
        CK(kvr_mp_write_uint(out, KVR_CMD_WORKER_DOWN));
        CK(kvr_mp_write_uint(out, cmd->u.worker_id));
        break;
    case KVR_CMD_FRONTEND_SEEN:
    case KVR_CMD_FRONTEND_EXPIRE:
        CK(kvr_mp_write_array(out, 3));
        CK(kvr_mp_write_uint(out, cmd->type));
        CK(kvr_mp_write_uint(out, cmd->u.frontend.frontend_id));
        CK(kvr_mp_write_uint(out, cmd->u.frontend.now_ms));
        break;
    case KVR_CMD_EXPIRE:
        CK(kvr_mp_write_array(out, 2));
        CK(kvr_mp_write_uint(out, KVR_CMD_EXPIRE));
        CK(kvr_mp_write_uint(out, cmd->u.before_ms));
        break;
    default:
        out->len = start;
        return kvr_err_set(err, KVR_EINVAL, "encoding command: unknown type %d", (int)cmd->type);
    }
    return 0;
fail:
    out->len = start;
    return kvr_err_set(err, rc, "encoding %s: %s", kvr_cmd_type_name(cmd->type), kvr_strerror(rc));
}

static int rd_u32(kvr_mp_reader *r, uint32_t *v)
{
    uint64_t x;
    int rc = kvr_mp_read_uint(r, &x);
    if (rc)
        return rc;
    if (x > UINT32_MAX)
        return KVR_ELIMIT;
    *v = (uint32_t)x;
    return 0;
}

static int rd_rid(kvr_mp_reader *r, uint8_t *rid)
{
    kvr_slice s;
    int rc = kvr_mp_read_bytes(r, &s);
    if (rc)
        return rc;
    if (s.len != KVR_REQUEST_ID_LEN)
        return KVR_EINVAL;
    memcpy(rid, s.base, KVR_REQUEST_ID_LEN);
    return 0;
}

int kvr_cmd_decode(const void *data, size_t len, kvr_cmd *cmd, kvr_route_candidate *cand,
                   kvr_err *err)
{
    int rc = 0;
    memset(cmd, 0, sizeof *cmd);
    if (len < 1)
        return kvr_err_set(err, KVR_ETRUNC, "decoding command: empty");
    if (((const uint8_t *)data)[0] != KVR_CMD_VERSION)
        return kvr_err_set(err, KVR_EUNSUPPORTED, "decoding command: version %u, want %u",
                           ((const uint8_t *)data)[0], KVR_CMD_VERSION);
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, (const uint8_t *)data + 1, len - 1);
    uint32_t n;
    uint64_t type = 0;
    CK(kvr_mp_read_array(&r, &n));
    if (n < 1) {
        rc = KVR_EINVAL;
        goto fail;
    }
    CK(kvr_mp_read_uint(&r, &type));
    cmd->type = (kvr_cmd_type)(type <= KVR_CMD_EXPIRE ? type : 0);
#define NEED(k)                                                                                    \
    do {                                                                                           \
        if (n < (k)) {                                                                             \
            rc = KVR_EINVAL;                                                                       \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)
    switch (type) {
    case KVR_CMD_ROUTE: {
        kvr_route_cmd *rt = &cmd->u.route;
        NEED(9);
        CK(rd_rid(&r, rt->request_id));
        CK(kvr_mp_read_uint(&r, &rt->frontend_id));
        CK(kvr_mp_read_uint(&r, &rt->now_ms));
        CK(rd_u32(&r, &rt->request_blocks));
        CK(kvr_mp_read_str(&r, &rt->model));
        CK(kvr_mp_read_str(&r, &rt->ns));
        CK(kvr_mp_read_uint(&r, &rt->pin_worker));
        uint32_t nc;
        CK(kvr_mp_read_array(&r, &nc));
        if (nc > KVR_FSM_MAX_CANDIDATES || rt->model.len > KVR_FSM_MODEL_MAX ||
            rt->ns.len > KVR_FSM_NS_MAX) {
            rc = KVR_ELIMIT;
            goto fail;
        }
        for (uint32_t i = 0; i < nc; i++) {
            uint32_t m;
            CK(kvr_mp_read_array(&r, &m));
            if (m < 2) {
                rc = KVR_EINVAL;
                goto fail;
            }
            CK(kvr_mp_read_uint(&r, &cand[i].worker_id));
            CK(rd_u32(&r, &cand[i].overlap));
            for (uint32_t j = 2; j < m; j++)
                CK(kvr_mp_skip(&r));
        }
        rt->candidates = cand;
        rt->n_candidates = nc;
        n -= 9;
        if (n > 0) { /* optional 10th field: only_candidates */
            CK(kvr_mp_read_bool(&r, &rt->only_candidates));
            n--;
        }
        break;
    }
    case KVR_CMD_PREFILL_DONE:
    case KVR_CMD_FREE:
        NEED(2);
        CK(rd_rid(&r, cmd->u.request_id));
        n -= 2;
        break;
    case KVR_CMD_WORKER_UP: {
        kvr_worker_info *w = &cmd->u.worker;
        uint32_t role;
        NEED(8);
        CK(kvr_mp_read_uint(&r, &w->id));
        CK(kvr_mp_read_str(&r, &w->ns));
        CK(kvr_mp_read_str(&r, &w->model));
        CK(kvr_mp_read_str(&r, &w->url));
        CK(rd_u32(&r, &role));
        CK(rd_u32(&r, &w->block_size));
        CK(rd_u32(&r, &w->capacity_blocks));
        if (role > KVR_ROLE_DECODE || w->id == 0 || w->ns.len > KVR_FSM_NS_MAX ||
            w->model.len > KVR_FSM_MODEL_MAX || w->url.len > KVR_FSM_URL_MAX) {
            rc = KVR_EINVAL;
            goto fail;
        }
        w->role = (kvr_worker_role)role;
        n -= 8;
        break;
    }
    case KVR_CMD_WORKER_DOWN:
        NEED(2);
        CK(kvr_mp_read_uint(&r, &cmd->u.worker_id));
        n -= 2;
        break;
    case KVR_CMD_FRONTEND_SEEN:
    case KVR_CMD_FRONTEND_EXPIRE:
        NEED(3);
        CK(kvr_mp_read_uint(&r, &cmd->u.frontend.frontend_id));
        CK(kvr_mp_read_uint(&r, &cmd->u.frontend.now_ms));
        n -= 3;
        break;
    case KVR_CMD_EXPIRE:
        NEED(2);
        CK(kvr_mp_read_uint(&r, &cmd->u.before_ms));
        n -= 2;
        break;
    default:
        rc = KVR_EINVAL;
        goto fail;
    }
#undef NEED
    /* Fields appended by later minor revisions are skipped. */
    while (n--)
        CK(kvr_mp_skip(&r));
    return 0;
fail:
    cmd->type = KVR_CMD_NONE;
    return kvr_err_set(err, rc, "decoding command (type %llu): %s", (unsigned long long)type,
                       kvr_strerror(rc));
}

const uint8_t *kvr_cmd_request_id(const kvr_cmd *cmd)
{
    switch (cmd->type) {
    case KVR_CMD_ROUTE:
        return cmd->u.route.request_id;
    case KVR_CMD_PREFILL_DONE:
    case KVR_CMD_FREE:
        return cmd->u.request_id;
    default:
        return NULL;
    }
}

const char *kvr_cmd_type_name(kvr_cmd_type t)
{
    static const char *names[] = {"NONE", "ROUTE", "PREFILL_DONE", "FREE", "WORKER_UP",
                                  "WORKER_DOWN", "FRONTEND_SEEN", "FRONTEND_EXPIRE", "EXPIRE"};
    return (unsigned)t < sizeof names / sizeof *names ? names[t] : "UNKNOWN";
}

const char *kvr_outcome_name(kvr_outcome o)
{
    static const char *names[] = {"ok",        "duplicate", "invalid", "full",
                                  "no_worker", "unknown",   "finished"};
    return (unsigned)o < sizeof names / sizeof *names ? names[o] : "?";
}

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
    d += f->fin_sum; /* kept up to date by fin_add / fin_pop */
    d += XXH3_64bits_withSeed(&f->clock_ms, sizeof f->clock_ms, 5);
    d += XXH3_64bits_withSeed(&f->down_counter, sizeof f->down_counter, 6);
    return XXH3_64bits(&d, sizeof d);
}

uint32_t kvr_fsm_booking_count(const kvr_fsm *f) { return f->n_bookings; }
uint32_t kvr_fsm_worker_count(const kvr_fsm *f) { return f->n_workers; }
uint32_t kvr_fsm_frontend_count(const kvr_fsm *f) { return f->n_leases; }
uint32_t kvr_fsm_finished_count(const kvr_fsm *f) { return f->n_fin; }
uint64_t kvr_fsm_finished_evicted(const kvr_fsm *f) { return f->fin_evicted; }
uint64_t kvr_fsm_clock_ms(const kvr_fsm *f) { return f->clock_ms; }
void kvr_fsm_set_local_now(kvr_fsm *f, int64_t now) { f->local_now = now; }
bool kvr_fsm_finished_has(const kvr_fsm *f, const uint8_t request_id[KVR_REQUEST_ID_LEN])
{
    return fin_has(f, request_id);
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
    long i = worker_find(f, id);
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
    booking *b = booking_find(f, rid);
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

/* ---------------------------------------------------------------------------------------- */
/* Snapshot */

#define SNAP_MAGIC "KVRS"
/* 2: + clock_ms and the finished record. 3: + each worker's down_seq (9th field) and the
 * down counter (6th element), which decide slot reuse. 1 and 2 are still loaded. */
#define SNAP_VERSION 3
#define SNAP_VERSION_MIN 1

int kvr_fsm_snapshot(const kvr_fsm *f, kvr_buf *out, kvr_err *err)
{
    int rc = 0;
    size_t start = out->len;
    CK(kvr_buf_append(out, SNAP_MAGIC, 4));
    uint8_t ver = SNAP_VERSION;
    CK(kvr_buf_append(out, &ver, 1));
    CK(kvr_mp_write_array(out, 6));
    CK(kvr_mp_write_array(out, f->n_workers));
    for (uint32_t i = 0; i < f->n_workers; i++) {
        const worker *w = &f->workers[i];
        CK(kvr_mp_write_array(out, 9));
        CK(kvr_mp_write_uint(out, w->id));
        CK(kvr_mp_write_cstr(out, w->ns));
        CK(kvr_mp_write_cstr(out, w->model));
        CK(kvr_mp_write_cstr(out, w->url));
        CK(kvr_mp_write_uint(out, w->role));
        CK(kvr_mp_write_bool(out, w->up));
        CK(kvr_mp_write_uint(out, w->block_size));
        CK(kvr_mp_write_uint(out, w->capacity_blocks));
        CK(kvr_mp_write_uint(out, w->down_seq));
    }
    CK(kvr_mp_write_array(out, f->n_bookings));
    for (uint32_t i = 0; i < f->cap_slots; i++) {
        const booking *b = &f->slots[i];
        if (!b->used)
            continue;
        CK(kvr_mp_write_array(out, 7));
        CK(kvr_mp_write_bin(out, b->rid, 16));
        CK(kvr_mp_write_uint(out, b->worker_id));
        CK(kvr_mp_write_uint(out, b->frontend_id));
        CK(kvr_mp_write_uint(out, b->start_ms));
        CK(kvr_mp_write_uint(out, b->blocks));
        CK(kvr_mp_write_uint(out, b->prefill_blocks));
        CK(kvr_mp_write_uint(out, b->overlap));
    }
    CK(kvr_mp_write_array(out, f->n_leases));
    for (uint32_t i = 0; i < f->n_leases; i++) {
        CK(kvr_mp_write_array(out, 2));
        CK(kvr_mp_write_uint(out, f->leases[i].frontend_id));
        CK(kvr_mp_write_uint(out, f->leases[i].last_seen_ms));
    }
    CK(kvr_mp_write_uint(out, f->clock_ms));
    CK(kvr_mp_write_array(out, f->n_fin)); /* oldest first */
    for (uint32_t i = 0; i < f->n_fin; i++) {
        const fin_rec *e = &f->fin[(uint32_t)(((uint64_t)f->fin_head + i) % f->opts.max_finished)];
        CK(kvr_mp_write_array(out, 2));
        CK(kvr_mp_write_bin(out, e->rid, KVR_REQUEST_ID_LEN));
        CK(kvr_mp_write_uint(out, e->ms));
    }
    CK(kvr_mp_write_uint(out, f->down_counter));
    uint64_t sum = XXH3_64bits(out->base + start, out->len - start);
    uint8_t le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (uint8_t)(sum >> (8 * i));
    CK(kvr_buf_append(out, le, 8));
    return 0;
fail:
    out->len = start;
    return kvr_err_set(err, rc, "writing fsm snapshot: %s", kvr_strerror(rc));
}

static int rd_str_into(kvr_mp_reader *r, char *dst, size_t cap)
{
    kvr_slice s;
    int rc = kvr_mp_read_str(r, &s);
    if (rc)
        return rc;
    if (s.len >= cap)
        return KVR_ELIMIT;
    copy_slice(dst, cap, s);
    return 0;
}

int kvr_fsm_restore(kvr_fsm *f, const void *data, size_t len, kvr_err *err)
{
    int rc = 0;
    const uint8_t *p = data;
    kvr_fsm *nf = NULL;
    if (len < 4 + 1 + 8 || memcmp(p, SNAP_MAGIC, 4) != 0)
        return kvr_err_set(err, KVR_ECORRUPT, "restoring fsm snapshot: bad magic or too short (%zu bytes)", len);
    if (p[4] < SNAP_VERSION_MIN || p[4] > SNAP_VERSION)
        return kvr_err_set(err, KVR_EUNSUPPORTED, "restoring fsm snapshot: version %u, want %u..%u",
                           p[4], SNAP_VERSION_MIN, SNAP_VERSION);
    unsigned version = p[4];
    uint64_t want = 0;
    for (int i = 0; i < 8; i++)
        want |= (uint64_t)p[len - 8 + i] << (8 * i);
    if (XXH3_64bits(p, len - 8) != want)
        return kvr_err_set(err, KVR_ECORRUPT, "restoring fsm snapshot: checksum mismatch");

    nf = kvr_fsm_new(&f->opts);
    if (!nf)
        return kvr_err_set(err, KVR_ENOMEM, "restoring fsm snapshot: out of memory");
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, p + 5, len - 5 - 8);
    uint32_t n, m;
    CK(kvr_mp_read_array(&r, &n));
    if (n < (version >= 3 ? 6u : version >= 2 ? 5u : 3u)) {
        rc = KVR_EINVAL;
        goto fail;
    }
    CK(kvr_mp_read_array(&r, &n));
    if (n > KVR_FSM_MAX_WORKERS) {
        rc = KVR_ELIMIT;
        goto fail;
    }
    if (n) {
        nf->workers = calloc(n, sizeof *nf->workers);
        if (!nf->workers) {
            rc = KVR_ENOMEM;
            goto fail;
        }
        nf->cap_workers = n;
    }
    for (uint32_t i = 0; i < n; i++) {
        worker *w = &nf->workers[i];
        uint32_t role;
        CK(kvr_mp_read_array(&r, &m));
        if (m < 8) {
            rc = KVR_EINVAL;
            goto fail;
        }
        CK(kvr_mp_read_uint(&r, &w->id));
        CK(rd_str_into(&r, w->ns, sizeof w->ns));
        CK(rd_str_into(&r, w->model, sizeof w->model));
        CK(rd_str_into(&r, w->url, sizeof w->url));
        CK(rd_u32(&r, &role));
        CK(kvr_mp_read_bool(&r, &w->up));
        CK(rd_u32(&r, &w->block_size));
        CK(rd_u32(&r, &w->capacity_blocks));
        if (role > KVR_ROLE_DECODE || (i > 0 && w->id <= nf->workers[i - 1].id)) {
            rc = KVR_EINVAL;
            goto fail;
        }
        w->role = (uint8_t)role;
        uint32_t j = 8;
        if (version >= 3 && m > 8) {
            CK(kvr_mp_read_uint(&r, &w->down_seq));
            j = 9;
        }
        if (w->up)
            w->down_seq = 0;
        for (; j < m; j++)
            CK(kvr_mp_skip(&r));
        nf->n_workers = i + 1;
    }
    CK(kvr_mp_read_array(&r, &n));
    if (n > nf->opts.max_bookings) {
        rc = KVR_ELIMIT;
        goto fail;
    }
    for (uint32_t i = 0; i < n; i++) {
        booking b = {0};
        kvr_slice rid;
        CK(kvr_mp_read_array(&r, &m));
        if (m < 7) {
            rc = KVR_EINVAL;
            goto fail;
        }
        CK(kvr_mp_read_bin(&r, &rid));
        if (rid.len != 16) {
            rc = KVR_EINVAL;
            goto fail;
        }
        memcpy(b.rid, rid.base, 16);
        CK(kvr_mp_read_uint(&r, &b.worker_id));
        CK(kvr_mp_read_uint(&r, &b.frontend_id));
        CK(kvr_mp_read_uint(&r, &b.start_ms));
        CK(rd_u32(&r, &b.blocks));
        CK(rd_u32(&r, &b.prefill_blocks));
        CK(rd_u32(&r, &b.overlap));
        for (uint32_t j = 7; j < m; j++)
            CK(kvr_mp_skip(&r));
        b.used = 1;
        if (booking_find(nf, b.rid)) {
            rc = KVR_EINVAL;
            goto fail;
        }
        CK(booking_insert(nf, &b));
        worker *w = worker_get(nf, b.worker_id);
        if (w) {
            w->active_blocks += b.blocks;
            w->active_prefill_blocks += b.prefill_blocks;
            w->bookings++;
        }
    }
    CK(kvr_mp_read_array(&r, &n));
    if (n > KVR_FSM_MAX_FRONTENDS) {
        rc = KVR_ELIMIT;
        goto fail;
    }
    if (n) {
        nf->leases = calloc(n, sizeof *nf->leases);
        if (!nf->leases) {
            rc = KVR_ENOMEM;
            goto fail;
        }
        nf->cap_leases = n;
    }
    for (uint32_t i = 0; i < n; i++) {
        CK(kvr_mp_read_array(&r, &m));
        if (m < 2) {
            rc = KVR_EINVAL;
            goto fail;
        }
        CK(kvr_mp_read_uint(&r, &nf->leases[i].frontend_id));
        CK(kvr_mp_read_uint(&r, &nf->leases[i].last_seen_ms));
        for (uint32_t j = 2; j < m; j++)
            CK(kvr_mp_skip(&r));
        nf->n_leases = i + 1;
    }
    if (version >= 2) {
        /* Version 1 has neither: it loads with clock 0 and an empty record. */
        CK(kvr_mp_read_uint(&r, &nf->clock_ms));
        CK(kvr_mp_read_array(&r, &n));
        if (n > KVR_FSM_MAX_FINISHED_LIMIT) {
            rc = KVR_ELIMIT;
            goto fail;
        }
        uint64_t prev = 0;
        for (uint32_t i = 0; i < n; i++) {
            kvr_slice rid;
            uint64_t ms;
            CK(kvr_mp_read_array(&r, &m));
            if (m < 2) {
                rc = KVR_EINVAL;
                goto fail;
            }
            CK(kvr_mp_read_bin(&r, &rid));
            CK(kvr_mp_read_uint(&r, &ms));
            for (uint32_t j = 2; j < m; j++)
                CK(kvr_mp_skip(&r));
            /* oldest first, never after the clock, each request once and not live */
            const uint8_t *rb = (const uint8_t *)rid.base;
            if (rid.len != KVR_REQUEST_ID_LEN || ms < prev || ms > nf->clock_ms ||
                fin_has(nf, rb) || booking_find(nf, rb)) {
                rc = KVR_EINVAL;
                goto fail;
            }
            prev = ms;
            /* More records than this FSM's bound: the oldest are dropped, as when applying. */
            CK(fin_add(nf, rb, ms));
        }
    }
    if (version >= 3) {
        CK(kvr_mp_read_uint(&r, &nf->down_counter));
        for (uint32_t i = 0; i < nf->n_workers; i++)
            if (nf->workers[i].down_seq > nf->down_counter) {
                rc = KVR_EINVAL;
                goto fail;
            }
    }
    /* Older versions: every down worker has down_seq 0 (reuse goes by id among them). */
    /* Success: move nf's state into f. */
    fsm_clear(f);
    f->workers = nf->workers;
    f->n_workers = nf->n_workers;
    f->cap_workers = nf->cap_workers;
    f->slots = nf->slots;
    f->cap_slots = nf->cap_slots;
    f->n_bookings = nf->n_bookings;
    f->leases = nf->leases;
    f->n_leases = nf->n_leases;
    f->cap_leases = nf->cap_leases;
    f->fin = nf->fin;
    f->fin_idx = nf->fin_idx;
    f->fin_mask = nf->fin_mask;
    f->fin_head = nf->fin_head;
    f->n_fin = nf->n_fin;
    f->fin_evicted = nf->fin_evicted;
    f->fin_sum = nf->fin_sum;
    f->clock_ms = nf->clock_ms;
    f->down_counter = nf->down_counter;
    nf->workers = NULL;
    nf->slots = NULL;
    nf->leases = NULL;
    nf->fin = NULL;
    nf->fin_idx = NULL;
    kvr_fsm_free(nf);
    return 0;
fail:
    kvr_fsm_free(nf);
    return kvr_err_set(err, rc ? rc : KVR_EINVAL, "restoring fsm snapshot: %s", kvr_strerror(rc));
}

kvr_fsm *kvr_fsm_clone(const kvr_fsm *f)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_fsm *c = kvr_fsm_new(&f->opts);
    if (!c || kvr_fsm_snapshot(f, &b, NULL) != 0 || kvr_fsm_restore(c, b.base, b.len, NULL) != 0) {
        kvr_fsm_free(c);
        c = NULL;
    }
    kvr_buf_free(&b);
    return c;
}
