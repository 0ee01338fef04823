/* The prefix index: see index.h for the model, threading and bound policy. */
#include "index.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "kvr_hash.h"

#define MIN_CAP 16u
#define MAX_MASK_WORDS (KVR_INDEX_MAX_WORKERS_LIMIT / 64u)
#define HASH_CHUNK 64u /* seq hashes computed per step of a STORED event */

/* GCC 12 at -O2 deletes __builtin_prefetch calls (ipa-pure-const/DCE treat them as dead, checked
 * with objdump): on x86-64 the instruction is written out by hand. */
#if defined(__x86_64__)
#define PREFETCH(p) __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)(p)))
#else
#define PREFETCH(p) __builtin_prefetch(p)
#endif

static inline uint64_t worker_mix(uint64_t worker_id)
{
    return kvr_mix64(worker_id ^ 0x6b767220776f726bULL);
}

uint64_t kvr_index_pair_mix(uint64_t worker_id, uint64_t seq_hash)
{
    return kvr_mix64(seq_hash ^ worker_mix(worker_id));
}

/* Keys are hashed again before probing: seq hashes are already uniform, but external hashes
 * may be small consecutive integers. Fibonacci hashing keeps the top bits. */
static inline uint64_t home_of(uint64_t key, unsigned shift)
{
    return (key * 0x9E3779B97F4A7C15ULL) >> shift;
}

static inline unsigned log2u64(uint64_t pow2)
{
    return 63u - (unsigned)__builtin_clzll(pow2);
}

/* ---- accounted allocation --------------------------------------------------------------- */

/* Big tables are mapped directly and marked for transparent huge pages: the hot paths are
 * random probes into tables of tens of MiB, where 4 KiB pages would add a TLB miss to nearly
 * every cache miss. Accounted size is the mapped size (rounded to whole pages). */
#define BIG_ALLOC (2u << 20)
#define PAGE_ROUND(x) (((x) + 4095u) & ~(size_t)4095u)

static void *acc_calloc(uint64_t *bytes, size_t n, size_t size)
{
    if (n && size > SIZE_MAX / n)
        return NULL;
    size_t len = n * size;
    if (len >= BIG_ALLOC) {
        void *p =
            mmap(NULL, PAGE_ROUND(len), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return NULL;
#ifdef MADV_HUGEPAGE
        (void)madvise(p, PAGE_ROUND(len), MADV_HUGEPAGE);
#endif
        *bytes += PAGE_ROUND(len);
        return p;
    }
    void *p = calloc(n, size);
    if (p)
        *bytes += len;
    return p;
}

static void acc_free(uint64_t *bytes, void *p, size_t n, size_t size)
{
    if (!p)
        return;
    size_t len = n * size;
    if (len >= BIG_ALLOC) {
        munmap(p, PAGE_ROUND(len));
        *bytes -= PAGE_ROUND(len);
        return;
    }
    *bytes -= len;
    free(p);
}

/* ---- u64 -> u64 map (external -> seq, seq -> alias count, worker id -> slot) -------------
 * Open addressing, linear probing, backward-shift deletion (no tombstones). Key 0 marks an
 * empty slot; a real key 0 lives in the side fields. */

typedef struct u64map {
    uint64_t *kv; /* 2*cap words: key, value */
    uint64_t cap; /* 0 or a power of two */
    uint64_t count;
    unsigned shift;
    bool has_zero;
    uint64_t zero_val;
} u64map;

static void u64map_free(u64map *m, uint64_t *bytes)
{
    acc_free(bytes, m->kv, m->cap * 2, sizeof(uint64_t));
    memset(m, 0, sizeof *m);
}

static inline uint64_t *u64map_find(const u64map *m, uint64_t key)
{
    if (key == 0)
        return m->has_zero ? (uint64_t *)&m->zero_val : NULL;
    if (!m->cap)
        return NULL;
    uint64_t mask = m->cap - 1;
    for (uint64_t i = home_of(key, m->shift);; i = (i + 1) & mask) {
        uint64_t k = m->kv[2 * i];
        if (k == key)
            return &m->kv[2 * i + 1];
        if (k == 0)
            return NULL;
    }
}

static inline void u64map_prefetch(const u64map *m, uint64_t key)
{
    if (m->cap) {
        const uint64_t *p = &m->kv[2 * home_of(key, m->shift)];
        PREFETCH(p);
        /* Probes and backward-shift deletion run past the home slot: fetch the next line too
         * when the home slot is in the second half of its line. Memory parallelism is the
         * limit here (fill buffers), so no more than that. Never faults past the end. */
        if ((uintptr_t)p & 32)
            PREFETCH((const void *)((uintptr_t)p + 64));
    }
}

static int u64map_resize(u64map *m, uint64_t ncap, uint64_t *bytes)
{
    uint64_t *nkv = NULL;
    if (ncap) {
        nkv = acc_calloc(bytes, ncap * 2, sizeof(uint64_t));
        if (!nkv)
            return KVR_ENOMEM;
        unsigned nshift = 64 - log2u64(ncap);
        for (uint64_t i = 0; i < m->cap; i++) {
            uint64_t k = m->kv[2 * i];
            if (!k)
                continue;
            uint64_t j = home_of(k, nshift);
            while (nkv[2 * j])
                j = (j + 1) & (ncap - 1);
            nkv[2 * j] = k;
            nkv[2 * j + 1] = m->kv[2 * i + 1];
        }
        m->shift = nshift;
    }
    acc_free(bytes, m->kv, m->cap * 2, sizeof(uint64_t));
    m->kv = nkv;
    m->cap = ncap;
    return 0;
}

/* Smallest power-of-two capacity that holds n keys under the 3/4 load bound. */
static uint64_t cap_for(uint64_t n)
{
    uint64_t cap = MIN_CAP;
    while (n * 4 > cap * 3)
        cap *= 2;
    return cap;
}

/* Inserts key (must be absent). Returns 0 or KVR_ENOMEM (map unchanged). */
static int u64map_insert(u64map *m, uint64_t key, uint64_t val, uint64_t *bytes)
{
    if (key == 0) {
        m->has_zero = true;
        m->zero_val = val;
        m->count++;
        return 0;
    }
    uint64_t nonzero = m->count - (m->has_zero ? 1 : 0);
    if ((nonzero + 1) * 4 > m->cap * 3) {
        int rc = u64map_resize(m, m->cap ? m->cap * 2 : MIN_CAP, bytes);
        if (rc)
            return rc;
    }
    uint64_t mask = m->cap - 1;
    uint64_t i = home_of(key, m->shift);
    while (m->kv[2 * i])
        i = (i + 1) & mask;
    m->kv[2 * i] = key;
    m->kv[2 * i + 1] = val;
    m->count++;
    return 0;
}

static void u64map_maybe_shrink(u64map *m, uint64_t *bytes)
{
    uint64_t nonzero = m->count - (m->has_zero ? 1 : 0);
    if (nonzero == 0 && m->cap) {
        acc_free(bytes, m->kv, m->cap * 2, sizeof(uint64_t));
        m->kv = NULL;
        m->cap = 0;
    } else if (m->cap > MIN_CAP && nonzero * 8 < m->cap) {
        /* Best effort: if the smaller table cannot be allocated, keep the big one. */
        (void)u64map_resize(m, m->cap / 2, bytes);
    }
}

/* Deletes key if present; returns whether it was. */
static bool u64map_delete(u64map *m, uint64_t key, uint64_t *bytes)
{
    if (key == 0) {
        if (!m->has_zero)
            return false;
        m->has_zero = false;
        m->count--;
        return true;
    }
    if (!m->cap)
        return false;
    uint64_t mask = m->cap - 1;
    uint64_t i = home_of(key, m->shift);
    for (;; i = (i + 1) & mask) {
        uint64_t k = m->kv[2 * i];
        if (k == key)
            break;
        if (k == 0)
            return false;
    }
    /* Backward shift: pull later members of the cluster into the hole when their home allows. */
    for (uint64_t j = i;;) {
        j = (j + 1) & mask;
        uint64_t k = m->kv[2 * j];
        if (k == 0)
            break;
        uint64_t h = home_of(k, m->shift);
        bool movable = (i <= j) ? (h <= i || h > j) : (h <= i && h > j);
        if (movable) {
            m->kv[2 * i] = k;
            m->kv[2 * i + 1] = m->kv[2 * j + 1];
            i = j;
        }
    }
    m->kv[2 * i] = 0;
    m->kv[2 * i + 1] = 0;
    m->count--;
    u64map_maybe_shrink(m, bytes);
    return true;
}

/* ---- block table: seq -> mask of worker slots (W words) -------------------------------- */

typedef struct blockmap {
    uint64_t *s;  /* cap slots of (1 + W) words: seq, mask[W] */
    uint64_t cap; /* 0 or a power of two */
    uint64_t count;
    unsigned shift;
    unsigned stride; /* 1 + W */
    bool has_zero;
    uint64_t zero_mask[MAX_MASK_WORDS];
} blockmap;

static void blockmap_free(blockmap *m, uint64_t *bytes)
{
    acc_free(bytes, m->s, m->cap * m->stride, sizeof(uint64_t));
    m->s = NULL;
    m->cap = 0;
    m->count = 0;
    m->has_zero = false;
    memset(m->zero_mask, 0, sizeof m->zero_mask);
}

static inline const uint64_t *blockmap_find(const blockmap *m, uint64_t key)
{
    if (key == 0)
        return m->has_zero ? m->zero_mask : NULL;
    if (!m->cap)
        return NULL;
    uint64_t mask = m->cap - 1;
    for (uint64_t i = home_of(key, m->shift);; i = (i + 1) & mask) {
        const uint64_t *slot = m->s + i * m->stride;
        if (slot[0] == key)
            return slot + 1;
        if (slot[0] == 0)
            return NULL;
    }
}

static inline void blockmap_prefetch(const blockmap *m, uint64_t key)
{
    if (m->cap) {
        const uint64_t *p = m->s + home_of(key, m->shift) * m->stride;
        PREFETCH(p);
        if (((uintptr_t)p & 63) + (uintptr_t)m->stride * 8 * 2 > 64) /* as u64map_prefetch */
            PREFETCH((const void *)((uintptr_t)p + 64));
    }
}

static int blockmap_resize(blockmap *m, uint64_t ncap, uint64_t *bytes)
{
    unsigned st = m->stride;
    uint64_t *ns = NULL;
    if (ncap) {
        ns = acc_calloc(bytes, ncap * st, sizeof(uint64_t));
        if (!ns)
            return KVR_ENOMEM;
        unsigned nshift = 64 - log2u64(ncap);
        for (uint64_t i = 0; i < m->cap; i++) {
            const uint64_t *slot = m->s + i * st;
            if (!slot[0])
                continue;
            uint64_t j = home_of(slot[0], nshift);
            while (ns[j * st])
                j = (j + 1) & (ncap - 1);
            memcpy(ns + j * st, slot, st * sizeof(uint64_t));
        }
        m->shift = nshift;
    }
    acc_free(bytes, m->s, m->cap * st, sizeof(uint64_t));
    m->s = ns;
    m->cap = ncap;
    return 0;
}

/* Returns the mask of key, inserting a zero mask when absent (*created set); NULL on ENOMEM.
 * The pointer is valid until the next insert or delete. */
static uint64_t *blockmap_upsert(blockmap *m, uint64_t key, bool *created, uint64_t *bytes)
{
    *created = false;
    if (key == 0) {
        if (!m->has_zero) {
            m->has_zero = true;
            m->count++;
            *created = true;
        }
        return m->zero_mask;
    }
    uint64_t mask, i;
    if (m->cap) {
        mask = m->cap - 1;
        for (i = home_of(key, m->shift);; i = (i + 1) & mask) {
            uint64_t *slot = m->s + i * m->stride;
            if (slot[0] == key)
                return slot + 1;
            if (slot[0] == 0)
                break;
        }
    }
    uint64_t nonzero = m->count - (m->has_zero ? 1 : 0);
    if ((nonzero + 1) * 4 > m->cap * 3) {
        if (blockmap_resize(m, m->cap ? m->cap * 2 : MIN_CAP, bytes))
            return NULL;
    }
    mask = m->cap - 1;
    i = home_of(key, m->shift);
    while (m->s[i * m->stride])
        i = (i + 1) & mask;
    uint64_t *slot = m->s + i * m->stride;
    slot[0] = key; /* the mask words are already zero */
    m->count++;
    *created = true;
    return slot + 1;
}

static void blockmap_delete(blockmap *m, uint64_t key, uint64_t *bytes)
{
    unsigned st = m->stride;
    if (key == 0) {
        if (m->has_zero) {
            m->has_zero = false;
            memset(m->zero_mask, 0, sizeof m->zero_mask);
            m->count--;
        }
        return;
    }
    if (!m->cap)
        return;
    uint64_t mask = m->cap - 1;
    uint64_t i = home_of(key, m->shift);
    for (;; i = (i + 1) & mask) {
        uint64_t k = m->s[i * st];
        if (k == key)
            break;
        if (k == 0)
            return;
    }
    for (uint64_t j = i;;) {
        j = (j + 1) & mask;
        uint64_t k = m->s[j * st];
        if (k == 0)
            break;
        uint64_t h = home_of(k, m->shift);
        bool movable = (i <= j) ? (h <= i || h > j) : (h <= i && h > j);
        if (movable) {
            memcpy(m->s + i * st, m->s + j * st, st * sizeof(uint64_t));
            i = j;
        }
    }
    memset(m->s + i * st, 0, st * sizeof(uint64_t));
    m->count--;
    uint64_t nonzero = m->count - (m->has_zero ? 1 : 0);
    if (nonzero == 0) {
        acc_free(bytes, m->s, m->cap * st, sizeof(uint64_t));
        m->s = NULL;
        m->cap = 0;
    } else if (m->cap > MIN_CAP && nonzero * 8 < m->cap) {
        (void)blockmap_resize(m, m->cap / 2, bytes);
    }
}

/* Widens every mask to `words` words (new words zero). O(table); only when a worker is given
 * a slot beyond the current width, so the table costs 16 bytes a slot until there are more
 * than 64 workers at once. Returns 0 or KVR_ENOMEM (table unchanged). */
static int blockmap_widen(blockmap *m, unsigned words, uint64_t *bytes)
{
    unsigned ost = m->stride, nst = 1 + words;
    if (nst <= ost)
        return 0;
    if (m->cap) {
        uint64_t *ns = acc_calloc(bytes, m->cap * nst, sizeof(uint64_t));
        if (!ns)
            return KVR_ENOMEM;
        for (uint64_t i = 0; i < m->cap; i++)
            memcpy(ns + i * nst, m->s + i * ost, ost * sizeof(uint64_t));
        acc_free(bytes, m->s, m->cap * ost, sizeof(uint64_t));
        m->s = ns;
    }
    m->stride = nst;
    return 0;
}

/* ---- the index -------------------------------------------------------------------------- */

typedef struct worker {
    bool used;
    uint64_t id;
    uint64_t idmix;
    uint64_t capacity; /* 0 = unknown */
    uint64_t bound;
    uint64_t entries;
    uint64_t last_event_seq;
    u64map ext;   /* external -> seq */
    u64map alias; /* seq -> number of EXTRA external hashes of this worker mapping to it */
} worker;

/* Everything an import replaces. */
typedef struct content {
    uint64_t bytes; /* heap bytes owned by this content */
    blockmap blocks;
    worker *workers; /* max_workers slots */
    u64map by_id;    /* worker id -> slot */
    uint32_t n_workers;
    uint64_t entries;
    uint64_t ext_hashes;
    uint64_t digest;
    uint64_t stream_seq;
} content;

struct kvr_index {
    kvr_index_opts opts;
    content c;
    kvr_index_stats st; /* event counters; content-derived fields filled on read */
};

static int content_init(content *c, const kvr_index_opts *o)
{
    memset(c, 0, sizeof *c);
    c->blocks.stride = 2; /* one mask word until a worker gets slot 64 */
    c->workers = acc_calloc(&c->bytes, o->max_workers, sizeof(worker));
    return c->workers ? 0 : KVR_ENOMEM;
}

static void content_free(content *c, const kvr_index_opts *o)
{
    if (c->workers) {
        for (uint32_t s = 0; s < o->max_workers; s++) {
            u64map_free(&c->workers[s].ext, &c->bytes);
            u64map_free(&c->workers[s].alias, &c->bytes);
        }
        acc_free(&c->bytes, c->workers, o->max_workers, sizeof(worker));
        c->workers = NULL;
    }
    blockmap_free(&c->blocks, &c->bytes);
    u64map_free(&c->by_id, &c->bytes);
}

int kvr_index_create(kvr_index **out, const kvr_index_opts *opts, kvr_err *err)
{
    kvr_index_opts o = opts ? *opts : (kvr_index_opts){0};
    if (!o.block_size)
        o.block_size = KVR_INDEX_DEFAULT_BLOCK_SIZE;
    if (!o.max_workers)
        o.max_workers = 64;
    if (!o.bound_factor)
        o.bound_factor = KVR_INDEX_DEFAULT_BOUND_FACTOR;
    if (!o.default_capacity_blocks)
        o.default_capacity_blocks = KVR_INDEX_DEFAULT_CAPACITY_BLOCKS;
    if (o.max_workers > KVR_INDEX_MAX_WORKERS_LIMIT)
        return kvr_err_set(err, KVR_EINVAL, "index: max_workers %u over the limit %u",
                           o.max_workers, KVR_INDEX_MAX_WORKERS_LIMIT);
    if (o.block_size > (1u << 20))
        return kvr_err_set(err, KVR_EINVAL, "index: block size %u too large", o.block_size);
    kvr_index *idx = calloc(1, sizeof *idx);
    if (!idx)
        return kvr_err_set(err, KVR_ENOMEM, "index: out of memory");
    idx->opts = o;
    if (content_init(&idx->c, &o)) {
        free(idx);
        return kvr_err_set(err, KVR_ENOMEM, "index: out of memory");
    }
    *out = idx;
    return 0;
}

void kvr_index_destroy(kvr_index *idx)
{
    if (!idx)
        return;
    content_free(&idx->c, &idx->opts);
    free(idx);
}

uint32_t kvr_index_block_size(const kvr_index *idx)
{
    return idx->opts.block_size;
}

static uint64_t bound_of(const kvr_index *idx, uint64_t capacity)
{
    uint64_t cap = capacity ? capacity : idx->opts.default_capacity_blocks;
    if (cap > UINT64_MAX / idx->opts.bound_factor)
        return UINT64_MAX;
    return cap * idx->opts.bound_factor;
}

static worker *find_worker(const kvr_index *idx, uint64_t id)
{
    const uint64_t *s = u64map_find(&idx->c.by_id, id);
    return s ? &idx->c.workers[*s] : NULL;
}

static int get_or_add_worker(kvr_index *idx, content *c, uint64_t id, worker **out)
{
    const uint64_t *s = u64map_find(&c->by_id, id);
    if (s) {
        *out = &c->workers[*s];
        return 0;
    }
    if (c->n_workers >= idx->opts.max_workers)
        return KVR_ELIMIT;
    uint32_t slot = 0;
    while (c->workers[slot].used)
        slot++;
    if (blockmap_widen(&c->blocks, slot / 64 + 1, &c->bytes))
        return KVR_ENOMEM;
    if (u64map_insert(&c->by_id, id, slot, &c->bytes))
        return KVR_ENOMEM;
    worker *w = &c->workers[slot];
    memset(w, 0, sizeof *w);
    w->used = true;
    w->id = id;
    w->idmix = worker_mix(id);
    w->bound = bound_of(idx, 0);
    c->n_workers++;
    *out = w;
    return 0;
}

static inline uint32_t slot_of(const content *c, const worker *w)
{
    return (uint32_t)(w - c->workers);
}

/* Adds (w, seq); an existing pair gains an alias. Returns 0 or KVR_ENOMEM (unchanged). */
static int entry_add(content *c, worker *w, uint64_t seq)
{
    uint32_t s = slot_of(c, w);
    bool created;
    uint64_t *mask = blockmap_upsert(&c->blocks, seq, &created, &c->bytes);
    if (!mask)
        return KVR_ENOMEM;
    uint64_t bit = 1ULL << (s & 63);
    if (mask[s >> 6] & bit) {
        uint64_t *n = u64map_find(&w->alias, seq);
        if (n)
            (*n)++;
        else if (u64map_insert(&w->alias, seq, 1, &c->bytes))
            return KVR_ENOMEM;
        return 0;
    }
    mask[s >> 6] |= bit;
    c->entries++;
    w->entries++;
    c->digest += kvr_mix64(seq ^ w->idmix);
    return 0;
}

static void entry_del(content *c, worker *w, uint64_t seq)
{
    uint64_t *n = u64map_find(&w->alias, seq);
    if (n) {
        if (--(*n) == 0)
            u64map_delete(&w->alias, seq, &c->bytes);
        return;
    }
    uint32_t s = slot_of(c, w);
    uint64_t *mask = (uint64_t *)blockmap_find(&c->blocks, seq);
    uint64_t bit = 1ULL << (s & 63);
    if (!mask || !(mask[s >> 6] & bit))
        return; /* unreachable while the maps are consistent */
    mask[s >> 6] &= ~bit;
    c->entries--;
    w->entries--;
    c->digest -= kvr_mix64(seq ^ w->idmix);
    for (unsigned k = 0; k < c->blocks.stride - 1; k++)
        if (mask[k])
            return;
    blockmap_delete(&c->blocks, seq, &c->bytes);
}

/* Drops all of w's entries (aliases included), keeps w registered. */
static void worker_clear(content *c, worker *w)
{
    uint32_t s = slot_of(c, w);
    uint64_t bit = 1ULL << (s & 63);
    u64map_free(&w->alias, &c->bytes);
    const u64map *m = &w->ext;
    for (uint64_t i = 0; i <= m->cap; i++) {
        uint64_t seq;
        if (i == m->cap) {
            if (!m->has_zero)
                break;
            seq = m->zero_val;
        } else {
            if (!m->kv[2 * i])
                continue;
            seq = m->kv[2 * i + 1];
        }
        uint64_t *mask = (uint64_t *)blockmap_find(&c->blocks, seq);
        if (!mask || !(mask[s >> 6] & bit))
            continue; /* an alias already handled */
        mask[s >> 6] &= ~bit;
        c->entries--;
        c->digest -= kvr_mix64(seq ^ w->idmix);
        bool empty = true;
        for (unsigned k = 0; k < c->blocks.stride - 1; k++)
            if (mask[k])
                empty = false;
        if (empty)
            blockmap_delete(&c->blocks, seq, &c->bytes);
    }
    c->ext_hashes -= w->ext.count;
    u64map_free(&w->ext, &c->bytes);
    w->entries = 0;
}

static int apply_stored(kvr_index *idx, worker *w, const kvr_kv_event *ev, kvr_err *err)
{
    content *c = &idx->c;
    uint32_t bs = idx->opts.block_size;
    uint64_t prev = 0;
    bool chained = false;
    if (ev->has_parent) {
        const uint64_t *p = u64map_find(&w->ext, ev->parent);
        if (!p) {
            idx->st.dropped_unknown_parent++;
            return kvr_err_set(err, KVR_ENOTFOUND,
                               "worker %" PRIu64 ": stored event with unknown parent %016" PRIx64
                               " dropped",
                               w->id, ev->parent);
        }
        prev = *p;
        chained = true;
    }
    idx->st.stores++;
    /* an adapter's blocks are its own: the same tokens under a LoRA hash apart */
    uint64_t seed = kvr_hash_lora_seed(ev->lora_name.base, ev->lora_name.len);
    uint64_t seqs[HASH_CHUNK];
    for (uint32_t i = 0; i < ev->n_hashes; i += HASH_CHUNK) {
        uint32_t m = ev->n_hashes - i < HASH_CHUNK ? ev->n_hashes - i : HASH_CHUNK;
        kvr_hash_seq_seeded(ev->tokens + (size_t)i * bs, (size_t)m * bs, bs, chained, prev, seed,
                            seqs, m);
        prev = seqs[m - 1];
        chained = true;
        /* The lookups below are independent cache misses: start them all at once. */
        for (uint32_t j = 0; j < m; j++) {
            u64map_prefetch(&w->ext, ev->hashes[i + j]);
            blockmap_prefetch(&c->blocks, seqs[j]);
        }
        for (uint32_t j = 0; j < m; j++) {
            uint64_t ext = ev->hashes[i + j], seq = seqs[j];
            uint64_t *cur = u64map_find(&w->ext, ext);
            if (cur) {
                if (*cur == seq) {
                    idx->st.blocks_duplicate++;
                    continue;
                }
                /* Same external hash, new content: the engine's word wins. */
                if (entry_add(c, w, seq))
                    goto nomem;
                entry_del(c, w, *cur);
                *cur = seq;
                idx->st.blocks_stored++;
                continue;
            }
            if (w->ext.count >= w->bound) {
                uint64_t left = ev->n_hashes - (i + j);
                idx->st.dropped_over_bound += left;
                return kvr_err_set(err, KVR_ELIMIT,
                                   "worker %" PRIu64 ": over its bound of %" PRIu64
                                   " blocks, %" PRIu64 " block(s) refused",
                                   w->id, w->bound, left);
            }
            if (u64map_insert(&w->ext, ext, seq, &c->bytes))
                goto nomem;
            if (entry_add(c, w, seq)) {
                u64map_delete(&w->ext, ext, &c->bytes);
                goto nomem;
            }
            c->ext_hashes++;
            idx->st.blocks_stored++;
        }
    }
    return 0;
nomem:
    return kvr_err_set(err, KVR_ENOMEM, "worker %" PRIu64 ": out of memory storing blocks", w->id);
}

int kvr_index_apply(kvr_index *idx, uint64_t worker_id, const kvr_kv_event *ev, kvr_err *err)
{
    content *c = &idx->c;
    idx->st.events_applied++;
    worker *w;
    int rc;
    switch (ev->type) {
    case KVR_KV_STORED:
        if (ev->block_size != idx->opts.block_size) {
            idx->st.dropped_block_size++;
            return kvr_err_set(err, KVR_EINVAL,
                               "worker %" PRIu64 ": block size %u differs from the router's %u",
                               worker_id, ev->block_size, idx->opts.block_size);
        }
        if ((uint64_t)ev->n_tokens < (uint64_t)ev->n_hashes * ev->block_size ||
            (ev->n_hashes && (!ev->hashes || !ev->tokens))) {
            idx->st.dropped_invalid++;
            return kvr_err_set(err, KVR_EINVAL,
                               "worker %" PRIu64 ": stored event has %u tokens for %u blocks of %u",
                               worker_id, ev->n_tokens, ev->n_hashes, ev->block_size);
        }
        rc = get_or_add_worker(idx, c, worker_id, &w);
        if (rc) {
            if (rc == KVR_ELIMIT)
                idx->st.dropped_no_slot++;
            return kvr_err_set(err, rc, "worker %" PRIu64 ": %s", worker_id,
                               rc == KVR_ELIMIT ? "no free worker slot" : "out of memory");
        }
        if (ev->n_hashes == 0) {
            idx->st.stores++;
            return 0;
        }
        return apply_stored(idx, w, ev, err);
    case KVR_KV_REMOVED:
        idx->st.removes++;
        if (ev->n_hashes && !ev->hashes)
            return kvr_err_set(err, KVR_EINVAL, "removed event without hashes");
        w = find_worker(idx, worker_id);
        if (!w) {
            idx->st.unknown_removes += ev->n_hashes;
            return 0;
        }
        for (uint32_t i0 = 0; i0 < ev->n_hashes; i0 += 32) {
            uint32_t m = ev->n_hashes - i0 < 32 ? ev->n_hashes - i0 : 32;
            /* Two passes so the block-table misses overlap: find the seqs, prefetch their
             * slots, then delete. */
            for (uint32_t j = 0; j < m; j++)
                u64map_prefetch(&w->ext, ev->hashes[i0 + j]);
            for (uint32_t j = 0; j < m; j++) {
                const uint64_t *cur = u64map_find(&w->ext, ev->hashes[i0 + j]);
                if (cur)
                    blockmap_prefetch(&c->blocks, *cur);
            }
            for (uint32_t j = 0; j < m; j++) {
                uint64_t *cur = u64map_find(&w->ext, ev->hashes[i0 + j]);
                if (!cur) {
                    idx->st.unknown_removes++;
                    continue;
                }
                uint64_t seq = *cur;
                u64map_delete(&w->ext, ev->hashes[i0 + j], &c->bytes);
                c->ext_hashes--;
                entry_del(c, w, seq);
                idx->st.blocks_removed++;
            }
        }
        return 0;
    case KVR_KV_CLEARED:
        idx->st.clears++;
        w = find_worker(idx, worker_id);
        if (w)
            worker_clear(c, w);
        return 0;
    }
    return kvr_err_set(err, KVR_EINVAL, "unknown event type %d", (int)ev->type);
}

size_t kvr_index_apply_batch(kvr_index *idx, uint64_t worker_id, const kvr_kv_event *evs, size_t n,
                             kvr_err *err)
{
    size_t failed = 0;
    for (size_t i = 0; i < n; i++)
        if (kvr_index_apply(idx, worker_id, &evs[i], err))
            failed++;
    return failed;
}

int kvr_index_set_worker_capacity(kvr_index *idx, uint64_t worker_id, uint64_t capacity_blocks)
{
    worker *w;
    int rc = get_or_add_worker(idx, &idx->c, worker_id, &w);
    if (rc)
        return rc;
    w->capacity = capacity_blocks;
    w->bound = bound_of(idx, capacity_blocks);
    return 0;
}

int kvr_index_set_worker_cursor(kvr_index *idx, uint64_t worker_id, uint64_t last_event_seq)
{
    worker *w;
    int rc = get_or_add_worker(idx, &idx->c, worker_id, &w);
    if (rc)
        return rc;
    w->last_event_seq = last_event_seq;
    return 0;
}

int kvr_index_clear_worker(kvr_index *idx, uint64_t worker_id)
{
    worker *w = find_worker(idx, worker_id);
    if (!w)
        return KVR_ENOTFOUND;
    worker_clear(&idx->c, w);
    return 0;
}

int kvr_index_remove_worker(kvr_index *idx, uint64_t worker_id)
{
    content *c = &idx->c;
    worker *w = find_worker(idx, worker_id);
    if (!w)
        return KVR_ENOTFOUND;
    worker_clear(c, w);
    u64map_delete(&c->by_id, worker_id, &c->bytes);
    memset(w, 0, sizeof *w);
    c->n_workers--;
    return 0;
}

static void worker_info(const kvr_index *idx, const worker *w, kvr_index_worker_info *o)
{
    (void)idx;
    o->worker_id = w->id;
    o->capacity_blocks = w->capacity;
    o->bound = w->bound;
    o->entries = w->entries;
    o->ext_hashes = w->ext.count;
    o->last_event_seq = w->last_event_seq;
}

size_t kvr_index_workers(const kvr_index *idx, kvr_index_worker_info *out, size_t cap)
{
    size_t n = 0;
    for (uint32_t s = 0; s < idx->opts.max_workers; s++) {
        if (!idx->c.workers[s].used)
            continue;
        if (n < cap)
            worker_info(idx, &idx->c.workers[s], &out[n]);
        n++;
    }
    return n;
}

int kvr_index_worker(const kvr_index *idx, uint64_t worker_id, kvr_index_worker_info *out)
{
    const worker *w = find_worker(idx, worker_id);
    if (!w)
        return KVR_ENOTFOUND;
    worker_info(idx, w, out);
    return 0;
}

static inline size_t emit(const content *c, uint64_t bits, unsigned word, uint32_t depth,
                          kvr_index_match *out, size_t cap, size_t n)
{
    while (bits) {
        unsigned b = (unsigned)__builtin_ctzll(bits);
        bits &= bits - 1;
        if (n < cap) {
            out[n].worker_id = c->workers[word * 64 + b].id;
            out[n].depth = depth;
        }
        n++;
    }
    return n;
}

#define PREFETCH_AHEAD 8

size_t kvr_index_find_matches(const kvr_index *idx, const uint64_t *seq_hashes, size_t n,
                              kvr_index_match *out, size_t cap)
{
    const content *c = &idx->c;
    const blockmap *bm = &c->blocks;
    if (n == 0 || bm->count == 0)
        return 0;
    if (n > UINT32_MAX)
        n = UINT32_MAX;
    size_t found = 0;
    for (size_t k = 1; k < PREFETCH_AHEAD && k < n; k++)
        blockmap_prefetch(bm, seq_hashes[k]);
    if (bm->stride == 2) {
        const uint64_t *m0 = blockmap_find(bm, seq_hashes[0]);
        uint64_t live = m0 ? m0[0] : 0;
        size_t i = 1;
        for (; live && i < n; i++) {
            if (i + PREFETCH_AHEAD < n)
                blockmap_prefetch(bm, seq_hashes[i + PREFETCH_AHEAD]);
            const uint64_t *m = blockmap_find(bm, seq_hashes[i]);
            uint64_t keep = m ? live & m[0] : 0;
            if (keep != live)
                found = emit(c, live & ~keep, 0, (uint32_t)i, out, cap, found);
            live = keep;
        }
        if (live)
            found = emit(c, live, 0, (uint32_t)n, out, cap, found);
        return found;
    }
    unsigned W = bm->stride - 1;
    uint64_t live[MAX_MASK_WORDS];
    uint64_t any = 0;
    const uint64_t *m0 = blockmap_find(bm, seq_hashes[0]);
    for (unsigned k = 0; k < W; k++) {
        live[k] = m0 ? m0[k] : 0;
        any |= live[k];
    }
    size_t i = 1;
    for (; any && i < n; i++) {
        if (i + PREFETCH_AHEAD < n)
            blockmap_prefetch(bm, seq_hashes[i + PREFETCH_AHEAD]);
        const uint64_t *m = blockmap_find(bm, seq_hashes[i]);
        any = 0;
        for (unsigned k = 0; k < W; k++) {
            uint64_t keep = m ? live[k] & m[k] : 0;
            if (keep != live[k])
                found = emit(c, live[k] & ~keep, k, (uint32_t)i, out, cap, found);
            live[k] = keep;
            any |= keep;
        }
    }
    if (any)
        for (unsigned k = 0; k < W; k++)
            found = emit(c, live[k], k, (uint32_t)n, out, cap, found);
    return found;
}

uint64_t kvr_index_digest(const kvr_index *idx)
{
    return idx->c.digest;
}

void kvr_index_stats_get(const kvr_index *idx, kvr_index_stats *out)
{
    *out = idx->st;
    out->entries = idx->c.entries;
    out->blocks = idx->c.blocks.count;
    out->workers = idx->c.n_workers;
    out->ext_hashes = idx->c.ext_hashes;
    out->bytes = sizeof(kvr_index) + idx->c.bytes;
}

void kvr_index_set_stream_seq(kvr_index *idx, uint64_t seq)
{
    idx->c.stream_seq = seq;
}

uint64_t kvr_index_stream_seq(const kvr_index *idx)
{
    return idx->c.stream_seq;
}

/* ---- image ------------------------------------------------------------------------------ */

void kvr_index_image_free(kvr_index_image *img)
{
    if (!img)
        return;
    free(img->workers);
    free(img->pairs);
    memset(img, 0, sizeof *img);
}

int kvr_index_export(const kvr_index *idx, kvr_index_image *img, kvr_err *err)
{
    const content *c = &idx->c;
    memset(img, 0, sizeof *img);
    img->format = KVR_INDEX_IMAGE_FORMAT;
    img->block_size = idx->opts.block_size;
    img->stream_seq = c->stream_seq;
    img->entries = c->entries;
    img->digest = c->digest;
    img->n_workers = c->n_workers;
    img->n_pairs = c->ext_hashes;
    img->workers = calloc(c->n_workers ? c->n_workers : 1, sizeof *img->workers);
    img->pairs = malloc((c->ext_hashes ? c->ext_hashes : 1) * 2 * sizeof(uint64_t));
    if (!img->workers || !img->pairs) {
        kvr_index_image_free(img);
        return kvr_err_set(err, KVR_ENOMEM, "exporting the index: out of memory");
    }
    uint64_t np = 0;
    uint32_t nw = 0;
    for (uint32_t s = 0; s < idx->opts.max_workers; s++) {
        const worker *w = &c->workers[s];
        if (!w->used)
            continue;
        kvr_index_image_worker *iw = &img->workers[nw++];
        iw->worker_id = w->id;
        iw->capacity_blocks = w->capacity;
        iw->last_event_seq = w->last_event_seq;
        iw->first_pair = np;
        const u64map *m = &w->ext;
        uint64_t *dst = img->pairs + 2 * np;
        for (uint64_t i = 0; i < m->cap; i++) {
            if (m->kv[2 * i]) {
                dst[0] = m->kv[2 * i];
                dst[1] = m->kv[2 * i + 1];
                dst += 2;
            }
        }
        if (m->has_zero) {
            dst[0] = 0;
            dst[1] = m->zero_val;
        }
        iw->n_pairs = m->count;
        np += m->count;
    }
    return 0;
}

int kvr_index_import(kvr_index *idx, const kvr_index_image *img, kvr_err *err)
{
    if (img->format != KVR_INDEX_IMAGE_FORMAT)
        return kvr_err_set(err, KVR_EUNSUPPORTED, "image format %u, expected %u", img->format,
                           KVR_INDEX_IMAGE_FORMAT);
    if (img->block_size != idx->opts.block_size)
        return kvr_err_set(err, KVR_EUNSUPPORTED,
                           "image block size %u differs from the router's %u", img->block_size,
                           idx->opts.block_size);
    if (img->n_workers > idx->opts.max_workers)
        return kvr_err_set(err, KVR_ELIMIT, "image has %u workers, this index holds at most %u",
                           img->n_workers, idx->opts.max_workers);
    if ((img->n_workers && !img->workers) || (img->n_pairs && !img->pairs))
        return kvr_err_set(err, KVR_EINVAL, "image without arrays");
    content nc;
    int rc = content_init(&nc, &idx->opts);
    if (rc)
        return kvr_err_set(err, rc, "importing the index: out of memory");
    /* Size the tables once (bounded by the image's own arrays, which exist), instead of
     * growing through every power of two. */
    if (img->entries <= img->n_pairs && img->entries &&
        blockmap_resize(&nc.blocks, cap_for(img->entries), &nc.bytes))
        goto nomem;
    uint64_t next = 0;
    for (uint32_t k = 0; k < img->n_workers; k++) {
        const kvr_index_image_worker *iw = &img->workers[k];
        if (iw->first_pair != next || iw->n_pairs > img->n_pairs - next) {
            rc = kvr_err_set(err, KVR_ECORRUPT, "image worker %" PRIu64 ": bad pair range",
                             iw->worker_id);
            goto fail;
        }
        next += iw->n_pairs;
        if (u64map_find(&nc.by_id, iw->worker_id)) {
            rc = kvr_err_set(err, KVR_ECORRUPT, "image: worker %" PRIu64 " twice", iw->worker_id);
            goto fail;
        }
        worker *w;
        if ((rc = get_or_add_worker(idx, &nc, iw->worker_id, &w)))
            goto nomem;
        w->capacity = iw->capacity_blocks;
        w->bound = bound_of(idx, iw->capacity_blocks);
        w->last_event_seq = iw->last_event_seq;
        const uint64_t *p = img->pairs + 2 * iw->first_pair;
        if (iw->n_pairs && u64map_resize(&w->ext, cap_for(iw->n_pairs), &nc.bytes))
            goto nomem;
        for (uint64_t i = 0; i < iw->n_pairs; i++, p += 2) {
            if (i + 16 < iw->n_pairs) {
                u64map_prefetch(&w->ext, p[32]);
                blockmap_prefetch(&nc.blocks, p[33]);
            }
            if (u64map_find(&w->ext, p[0])) {
                rc = kvr_err_set(err, KVR_ECORRUPT,
                                 "image worker %" PRIu64 ": external hash %016" PRIx64 " twice",
                                 iw->worker_id, p[0]);
                goto fail;
            }
            if ((rc = u64map_insert(&w->ext, p[0], p[1], &nc.bytes)))
                goto nomem;
            if ((rc = entry_add(&nc, w, p[1]))) {
                u64map_delete(&w->ext, p[0], &nc.bytes);
                goto nomem;
            }
            nc.ext_hashes++;
        }
    }
    if (next != img->n_pairs) {
        rc = kvr_err_set(err, KVR_ECORRUPT, "image: %" PRIu64 " pairs, workers cover %" PRIu64,
                         img->n_pairs, next);
        goto fail;
    }
    if (nc.entries != img->entries || nc.digest != img->digest) {
        rc = kvr_err_set(err, KVR_ECORRUPT,
                         "image: rebuilt %" PRIu64 " entries digest %016" PRIx64
                         ", image says %" PRIu64 " digest %016" PRIx64,
                         nc.entries, nc.digest, img->entries, img->digest);
        goto fail;
    }
    nc.stream_seq = img->stream_seq;
    content old = idx->c;
    idx->c = nc;
    content_free(&old, &idx->opts);
    return 0;
nomem:
    rc = kvr_err_set(err, KVR_ENOMEM, "importing the index: out of memory");
fail:
    content_free(&nc, &idx->opts);
    return rc;
}
