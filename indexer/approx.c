/* kvr_approx: see approx.h. */
#include "approx.h"

#include "kvr_err.h"

#include <stdlib.h>
#include <string.h>

#define NIL UINT32_MAX

typedef struct ent {
    uint64_t seq;
    uint64_t ts;           /* last assumed, command time (monotone, see approx.h) */
    uint32_t slot;         /* worker slot */
    uint32_t gprev, gnext; /* global recency: head oldest */
    uint32_t wprev, wnext; /* its worker's recency: head oldest */
} ent;

typedef struct wslot {
    uint64_t id;
    uint64_t count;
    uint32_t head, tail;
    bool used;
} wslot;

struct kvr_approx {
    kvr_approx_opts o;
    ent *pool;
    uint32_t pool_cap, pool_used, free_head; /* free entries chained through gnext */
    uint32_t *tab;                           /* entry index + 1, 0 empty */
    uint32_t tab_mask;
    uint64_t n;
    uint32_t ghead, gtail;
    wslot *w;         /* KVR_APPROX_MAX_WORKERS */
    uint32_t n_slots; /* slots ever used (high-water mark) */
    uint64_t last_ts;
    uint64_t digest;
    kvr_approx_stats st;
};

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static inline uint32_t home(const kvr_approx *a, uint32_t slot, uint64_t seq)
{
    return (uint32_t)(mix64(seq ^ ((uint64_t)slot * 0x9E3779B97F4A7C15ULL)) & a->tab_mask);
}

static inline uint64_t ent_mix(const kvr_approx *a, const ent *e)
{
    return kvr_index_pair_mix(a->w[e->slot].id, e->seq ^ mix64(e->ts + 0x5bd1e995u));
}

int kvr_approx_create(kvr_approx **out, const kvr_approx_opts *opts)
{
    *out = NULL;
    kvr_approx *a = calloc(1, sizeof *a);
    if (!a)
        return KVR_ENOMEM;
    if (opts)
        a->o = *opts;
    if (!a->o.ttl_ms)
        a->o.ttl_ms = KVR_APPROX_DEFAULT_TTL_MS;
    if (!a->o.max_capacity_blocks)
        a->o.max_capacity_blocks = KVR_APPROX_DEFAULT_MAX_CAPACITY;
    if (!a->o.default_capacity_blocks)
        a->o.default_capacity_blocks = KVR_INDEX_DEFAULT_CAPACITY_BLOCKS;
    if (!a->o.max_entries)
        a->o.max_entries = KVR_APPROX_DEFAULT_MAX_ENTRIES;
    if (a->o.default_capacity_blocks > a->o.max_capacity_blocks)
        a->o.default_capacity_blocks = a->o.max_capacity_blocks;
    a->w = calloc(KVR_APPROX_MAX_WORKERS, sizeof *a->w);
    a->tab_mask = 1023;
    a->tab = calloc(a->tab_mask + 1, sizeof *a->tab);
    if (!a->w || !a->tab) {
        kvr_approx_destroy(a);
        return KVR_ENOMEM;
    }
    a->ghead = a->gtail = NIL;
    a->free_head = NIL;
    *out = a;
    return 0;
}

void kvr_approx_destroy(kvr_approx *a)
{
    if (!a)
        return;
    free(a->pool);
    free(a->tab);
    free(a->w);
    free(a);
}

uint64_t kvr_approx_ttl_ms(const kvr_approx *a)
{
    return a->o.ttl_ms;
}

uint64_t kvr_approx_default_capacity(const kvr_approx *a)
{
    return a->o.default_capacity_blocks;
}

/* ---- table ---------------------------------------------------------------------------- */

/* Table position of (slot, seq), or the empty position where it would go (*found false). */
static uint32_t tab_find(const kvr_approx *a, uint32_t slot, uint64_t seq, bool *found)
{
    for (uint32_t i = home(a, slot, seq);; i = (i + 1) & a->tab_mask) {
        uint32_t v = a->tab[i];
        if (!v) {
            *found = false;
            return i;
        }
        const ent *e = &a->pool[v - 1];
        if (e->seq == seq && e->slot == slot) {
            *found = true;
            return i;
        }
    }
}

static void tab_delete_at(kvr_approx *a, uint32_t hole)
{
    uint32_t mask = a->tab_mask;
    a->tab[hole] = 0;
    for (uint32_t j = (hole + 1) & mask; a->tab[j]; j = (j + 1) & mask) {
        const ent *e = &a->pool[a->tab[j] - 1];
        uint32_t h = home(a, e->slot, e->seq);
        bool in_range = hole <= j ? (h > hole && h <= j) : (h > hole || h <= j);
        if (!in_range) {
            a->tab[hole] = a->tab[j];
            a->tab[j] = 0;
            hole = j;
        }
    }
}

static int tab_grow(kvr_approx *a)
{
    uint32_t ncap = (a->tab_mask + 1) * 2;
    if (ncap == 0)
        return KVR_ENOMEM;
    uint32_t *nt = calloc(ncap, sizeof *nt);
    if (!nt)
        return KVR_ENOMEM;
    uint32_t *old = a->tab;
    uint32_t old_cap = a->tab_mask + 1;
    a->tab = nt;
    a->tab_mask = ncap - 1;
    for (uint32_t i = 0; i < old_cap; i++) {
        if (!old[i])
            continue;
        const ent *e = &a->pool[old[i] - 1];
        uint32_t p = home(a, e->slot, e->seq);
        while (nt[p])
            p = (p + 1) & a->tab_mask;
        nt[p] = old[i];
    }
    free(old);
    return 0;
}

/* ---- lists ---------------------------------------------------------------------------- */

static void g_unlink(kvr_approx *a, uint32_t i)
{
    ent *e = &a->pool[i];
    if (e->gprev != NIL)
        a->pool[e->gprev].gnext = e->gnext;
    else
        a->ghead = e->gnext;
    if (e->gnext != NIL)
        a->pool[e->gnext].gprev = e->gprev;
    else
        a->gtail = e->gprev;
}

static void g_append(kvr_approx *a, uint32_t i)
{
    ent *e = &a->pool[i];
    e->gprev = a->gtail;
    e->gnext = NIL;
    if (a->gtail != NIL)
        a->pool[a->gtail].gnext = i;
    else
        a->ghead = i;
    a->gtail = i;
}

static void w_unlink(kvr_approx *a, uint32_t i)
{
    ent *e = &a->pool[i];
    wslot *w = &a->w[e->slot];
    if (e->wprev != NIL)
        a->pool[e->wprev].wnext = e->wnext;
    else
        w->head = e->wnext;
    if (e->wnext != NIL)
        a->pool[e->wnext].wprev = e->wprev;
    else
        w->tail = e->wprev;
}

static void w_append(kvr_approx *a, uint32_t i)
{
    ent *e = &a->pool[i];
    wslot *w = &a->w[e->slot];
    e->wprev = w->tail;
    e->wnext = NIL;
    if (w->tail != NIL)
        a->pool[w->tail].wnext = i;
    else
        w->head = i;
    w->tail = i;
}

/* Removes entry i from everything and returns it to the free list. */
static void ent_drop(kvr_approx *a, uint32_t i)
{
    ent *e = &a->pool[i];
    bool found;
    uint32_t p = tab_find(a, e->slot, e->seq, &found);
    if (found)
        tab_delete_at(a, p);
    a->digest -= ent_mix(a, e);
    g_unlink(a, i);
    w_unlink(a, i);
    a->w[e->slot].count--;
    a->n--;
    e->gnext = a->free_head;
    a->free_head = i;
}

static int ent_alloc(kvr_approx *a, uint32_t *out)
{
    if (a->free_head != NIL) {
        *out = a->free_head;
        a->free_head = a->pool[*out].gnext;
        return 0;
    }
    if (a->pool_used == a->pool_cap) {
        uint64_t nc = a->pool_cap ? (uint64_t)a->pool_cap * 2 : 1024;
        if (nc >= NIL)
            return KVR_ENOMEM;
        ent *np = realloc(a->pool, nc * sizeof *np);
        if (!np)
            return KVR_ENOMEM;
        a->pool = np;
        a->pool_cap = (uint32_t)nc;
    }
    *out = a->pool_used++;
    return 0;
}

/* ---- operations ------------------------------------------------------------------------ */

static long slot_of(const kvr_approx *a, uint64_t id)
{
    for (uint32_t i = 0; i < a->n_slots; i++)
        if (a->w[i].used && a->w[i].id == id)
            return i;
    return -1;
}

static long slot_get(kvr_approx *a, uint64_t id)
{
    long s = slot_of(a, id);
    if (s >= 0)
        return s;
    /* lowest free slot: slot numbers never reach the digest, only ids do */
    for (uint32_t i = 0; i < KVR_APPROX_MAX_WORKERS; i++) {
        if (!a->w[i].used) {
            a->w[i] = (wslot){.id = id, .head = NIL, .tail = NIL, .used = true};
            if (i >= a->n_slots)
                a->n_slots = i + 1;
            return i;
        }
    }
    return -1;
}

size_t kvr_approx_expire(kvr_approx *a, uint64_t now_ms)
{
    if (now_ms < a->o.ttl_ms)
        return 0;
    uint64_t horizon = now_ms - a->o.ttl_ms;
    size_t k = 0;
    while (a->ghead != NIL && a->pool[a->ghead].ts <= horizon) {
        ent_drop(a, a->ghead);
        k++;
    }
    a->st.expired += k;
    return k;
}

int kvr_approx_assume(kvr_approx *a, uint64_t worker_id, uint64_t capacity_blocks,
                      const uint64_t *seq, size_t n, uint64_t now_ms)
{
    if (now_ms < a->last_ts)
        now_ms = a->last_ts; /* keeps the recency list sorted by time */
    a->last_ts = now_ms;
    kvr_approx_expire(a, now_ms);
    if (n == 0)
        return 0;
    uint64_t cap = capacity_blocks ? capacity_blocks : a->o.default_capacity_blocks;
    if (cap > a->o.max_capacity_blocks)
        cap = a->o.max_capacity_blocks;
    if (n > cap)
        n = (size_t)cap;
    long s = slot_get(a, worker_id);
    if (s < 0) {
        a->st.refused++;
        return KVR_ELIMIT;
    }
    uint32_t slot = (uint32_t)s;
    int rc = 0;
    /* last block first: the request's root ends up the most recently used */
    for (size_t k = n; k-- > 0;) {
        bool found;
        uint32_t p = tab_find(a, slot, seq[k], &found);
        uint32_t i;
        if (found) {
            i = a->tab[p] - 1;
            ent *e = &a->pool[i];
            a->digest -= ent_mix(a, e);
            e->ts = now_ms;
            a->digest += ent_mix(a, e);
            g_unlink(a, i);
            w_unlink(a, i);
            g_append(a, i);
            w_append(a, i);
            a->st.refreshed++;
            continue;
        }
        if ((a->n + 1) * 2 > (uint64_t)a->tab_mask + 1) {
            if ((rc = tab_grow(a)) != 0)
                break;
            p = tab_find(a, slot, seq[k], &found);
        }
        if ((rc = ent_alloc(a, &i)) != 0)
            break;
        ent *e = &a->pool[i];
        *e = (ent){.seq = seq[k], .ts = now_ms, .slot = slot};
        a->tab[p] = i + 1;
        g_append(a, i);
        w_append(a, i);
        a->w[slot].count++;
        a->n++;
        a->digest += ent_mix(a, e);
        a->st.inserted++;
    }
    /* capacity: least recently used first */
    wslot *w = &a->w[slot];
    while (w->count > cap) {
        ent_drop(a, w->head);
        a->st.evicted++;
    }
    while (a->n > a->o.max_entries) { /* the oldest of any worker */
        ent_drop(a, a->ghead);
        a->st.evicted++;
    }
    if (rc)
        a->st.refused++;
    return rc;
}

size_t kvr_approx_remove_worker(kvr_approx *a, uint64_t worker_id)
{
    long s = slot_of(a, worker_id);
    if (s < 0)
        return 0;
    size_t k = 0;
    while (a->w[s].head != NIL) {
        ent_drop(a, a->w[s].head);
        k++;
    }
    a->w[s].used = false;
    a->st.removed += k;
    return k;
}

uint64_t kvr_approx_worker_entries(const kvr_approx *a, uint64_t worker_id)
{
    long s = slot_of(a, worker_id);
    return s < 0 ? 0 : a->w[s].count;
}

size_t kvr_approx_find_matches(const kvr_approx *a, const uint64_t *seq, size_t n, uint64_t now_ms,
                               kvr_index_match *out, size_t cap)
{
    if (n == 0 || a->n == 0)
        return 0;
    uint64_t horizon = now_ms > a->o.ttl_ms ? now_ms - a->o.ttl_ms : 0;
    uint32_t live[KVR_APPROX_MAX_WORKERS];
    uint32_t nl = 0;
    for (uint32_t i = 0; i < a->n_slots; i++)
        if (a->w[i].used && a->w[i].count)
            live[nl++] = i;
    uint32_t depth[KVR_APPROX_MAX_WORKERS] = {0};
    size_t found_n = 0;
    for (size_t k = 0; k < n && nl; k++) {
        uint32_t keep = 0;
        for (uint32_t j = 0; j < nl; j++) {
            bool found;
            uint32_t p = tab_find(a, live[j], seq[k], &found);
            if (found && (!now_ms || a->pool[a->tab[p] - 1].ts > horizon)) {
                depth[live[j]]++;
                live[keep++] = live[j];
            }
        }
        nl = keep;
    }
    for (uint32_t i = 0; i < a->n_slots; i++) {
        if (!depth[i])
            continue;
        if (found_n < cap)
            out[found_n] = (kvr_index_match){a->w[i].id, depth[i]};
        found_n++;
    }
    return found_n;
}

uint64_t kvr_approx_digest(const kvr_approx *a)
{
    return a->digest;
}

void kvr_approx_stats_get(const kvr_approx *a, kvr_approx_stats *out)
{
    *out = a->st;
    out->entries = a->n;
    uint64_t workers = 0;
    for (uint32_t i = 0; i < a->n_slots; i++)
        workers += a->w[i].used;
    out->workers = workers;
    out->bytes = sizeof *a + (uint64_t)a->pool_cap * sizeof *a->pool +
                 ((uint64_t)a->tab_mask + 1) * sizeof *a->tab +
                 KVR_APPROX_MAX_WORKERS * sizeof *a->w;
}
