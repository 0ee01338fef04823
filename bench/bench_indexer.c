/* kvr-bench indexer: in-process benchmark of the prefix index (DESIGN section 10).
 *
 * 1. Replays a Mooncake trace through one simulated LRU KV cache per worker (requests assigned
 *    round-robin, or by first hash id with --assign prefix): a request's router blocks that are
 *    not cached are stored (one STORED event per run of new blocks, chained on the previous
 *    block's external hash), and the least recently used blocks are evicted to make room
 *    (one REMOVED event per request). Tokens are the trace generator's (trace.h), so seq hashes
 *    are real; external hashes are a content hash of (hash id, sub-block), the same on every
 *    worker, like an engine's.
 * 2. Events are built into a list (untimed), in chunks to bound memory, and each chunk is
 *    applied to the index under the clock: events_per_s, blocks_per_s.
 * 3. Every request's prompt seq hashes are computed (untimed), then find_matches is timed per
 *    call on the final index: find_matches_us{p50,p99}; plus 256-block queries.
 * 4. Snapshot of the final index: export (owner thread), write, read + import, digest check. */
#define _GNU_SOURCE
#include "kvr_bench.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "index.h"
#include "kvr_hash.h"
#include "kvr_log.h"
#include "snapshot.h"
#include "trace.h"

/* CPU time of this thread: on a shared machine the wall clock also counts preemption. */
static int64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* ---- simulated LRU cache of router blocks, all workers in one pool ------------------------- */

#define NIL UINT32_MAX

typedef struct lru_node {
    uint64_t key; /* (hash_id << 16) | sub-block */
    uint32_t prev, next;
    uint32_t worker;
} lru_node;

typedef struct lru {
    lru_node *nodes;
    uint32_t n_nodes, cap_nodes;
    uint32_t free_head;
    uint32_t *head, *tail; /* per worker: head = most recent */
    uint64_t *size;        /* per worker */
    uint64_t capacity;     /* per worker, router blocks */
    /* map (worker, key) -> node, open addressing, backward-shift deletion */
    uint32_t *slots;
    uint64_t mask;
} lru;

static inline uint64_t lru_hash(uint32_t w, uint64_t key)
{
    return mix64(key ^ ((uint64_t)w << 48) ^ 0x5555);
}

static int lru_init(lru *l, uint32_t workers, uint64_t capacity)
{
    memset(l, 0, sizeof *l);
    uint64_t total = (uint64_t)workers * capacity + 1;
    if (total >= NIL)
        return -1;
    l->cap_nodes = (uint32_t)total;
    uint64_t slots = 1;
    while (slots < total * 2)
        slots <<= 1;
    l->mask = slots - 1;
    l->nodes = calloc(total, sizeof *l->nodes);
    l->slots = malloc(slots * sizeof *l->slots);
    l->head = malloc(workers * sizeof *l->head);
    l->tail = malloc(workers * sizeof *l->tail);
    l->size = calloc(workers, sizeof *l->size);
    if (!l->nodes || !l->slots || !l->head || !l->tail || !l->size)
        return -1;
    memset(l->slots, 0xff, slots * sizeof *l->slots);
    for (uint32_t w = 0; w < workers; w++)
        l->head[w] = l->tail[w] = NIL;
    l->free_head = NIL;
    l->capacity = capacity;
    return 0;
}

static void lru_free(lru *l)
{
    free(l->nodes);
    free(l->slots);
    free(l->head);
    free(l->tail);
    free(l->size);
}

static uint32_t lru_find(const lru *l, uint32_t w, uint64_t key)
{
    for (uint64_t i = lru_hash(w, key) & l->mask;; i = (i + 1) & l->mask) {
        uint32_t n = l->slots[i];
        if (n == NIL)
            return NIL;
        if (l->nodes[n].key == key && l->nodes[n].worker == w)
            return n;
    }
}

static void list_unlink(lru *l, uint32_t n)
{
    lru_node *x = &l->nodes[n];
    if (x->prev != NIL)
        l->nodes[x->prev].next = x->next;
    else
        l->head[x->worker] = x->next;
    if (x->next != NIL)
        l->nodes[x->next].prev = x->prev;
    else
        l->tail[x->worker] = x->prev;
}

static void list_push_front(lru *l, uint32_t n)
{
    lru_node *x = &l->nodes[n];
    x->prev = NIL;
    x->next = l->head[x->worker];
    if (x->next != NIL)
        l->nodes[x->next].prev = n;
    else
        l->tail[x->worker] = n;
    l->head[x->worker] = n;
}

static void lru_touch(lru *l, uint32_t n)
{
    list_unlink(l, n);
    list_push_front(l, n);
}

static void lru_insert(lru *l, uint32_t w, uint64_t key)
{
    uint32_t n;
    if (l->free_head != NIL) {
        n = l->free_head;
        l->free_head = l->nodes[n].next;
    } else {
        n = l->n_nodes++;
    }
    l->nodes[n] = (lru_node){.key = key, .worker = w};
    uint64_t i = lru_hash(w, key) & l->mask;
    while (l->slots[i] != NIL)
        i = (i + 1) & l->mask;
    l->slots[i] = n;
    list_push_front(l, n);
    l->size[w]++;
}

/* Evicts worker w's least recently used block; returns its key. */
static uint64_t lru_evict(lru *l, uint32_t w)
{
    uint32_t n = l->tail[w];
    uint64_t key = l->nodes[n].key;
    list_unlink(l, n);
    uint64_t i = lru_hash(w, key) & l->mask;
    while (l->slots[i] != n)
        i = (i + 1) & l->mask;
    for (uint64_t j = i;;) {
        j = (j + 1) & l->mask;
        uint32_t m = l->slots[j];
        if (m == NIL)
            break;
        uint64_t h = lru_hash(l->nodes[m].worker, l->nodes[m].key) & l->mask;
        if ((i <= j) ? (h <= i || h > j) : (h <= i && h > j)) {
            l->slots[i] = m;
            i = j;
        }
    }
    l->slots[i] = NIL;
    l->nodes[n].next = l->free_head;
    l->free_head = n;
    l->size[w]--;
    return key;
}

/* ---- event list ------------------------------------------------------------------------ */

typedef struct bench_ev {
    uint32_t worker;
    kvr_kv_event ev; /* hashes/tokens stored as offsets until the chunk is applied */
} bench_ev;

typedef struct chunk {
    bench_ev *evs;
    size_t n, cap;
    uint64_t *hashes;
    size_t n_hashes, cap_hashes;
    uint32_t *tokens;
    size_t n_tokens, cap_tokens;
} chunk;

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t nc = *cap ? *cap : 1024;
    while (nc < need)
        nc *= 2;
    void *q = realloc(*p, nc * elem);
    if (!q)
        return -1;
    *p = q;
    *cap = nc;
    return 0;
}

static int samples_cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p)
{
    if (!n)
        return 0;
    size_t i = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
    return v[i];
}

typedef struct opts {
    const char *trace;
    const char *json;
    const char *snapdir;
    uint32_t workers;
    uint64_t capacity;
    uint32_t rbs, tbs;
    uint64_t queries;
    uint32_t scale;
    bool assign_prefix;
} opts;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvr-bench indexer --trace FILE --json OUT [--workers 8] [--capacity-blocks N]\n"
            "         [--router-block-size 64] [--trace-block-size 512] [--queries N] [--scale K]\n"
            "         [--assign rr|prefix] [--snapshot-dir DIR]\n"
            "  --assign           requests to workers round-robin, or by their first 4 hash ids\n"
            "  --capacity-blocks  per-worker simulated cache, router blocks (default 16384)\n"
            "  --queries          find_matches calls timed (default 20000; requests are reused)\n"
            "  --scale K          replay the trace K times with disjoint hash ids\n"
            "  --snapshot-dir     where the snapshot is written (default: a fresh temp dir,\n"
            "                     removed afterwards)\n");
}

static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-')
        return -1;
    *out = v;
    return 0;
}

int kvr_bench_indexer(int argc, char **argv)
{
    opts o = {.workers = 8, .capacity = 16384, .rbs = 64, .tbs = 512, .queries = 20000, .scale = 1};
    static const struct option lo[] = {
        {"trace", required_argument, 0, 't'},
        {"json", required_argument, 0, 'j'},
        {"workers", required_argument, 0, 'w'},
        {"capacity-blocks", required_argument, 0, 'c'},
        {"router-block-size", required_argument, 0, 'r'},
        {"trace-block-size", required_argument, 0, 'b'},
        {"queries", required_argument, 0, 'q'},
        {"scale", required_argument, 0, 'k'},
        {"assign", required_argument, 0, 'a'},
        {"snapshot-dir", required_argument, 0, 's'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        uint64_t v = 0;
        if (c != 't' && c != 'j' && c != 'a' && c != 's' && c != 'h' && c != '?' &&
            parse_u64(optarg, &v) != 0) {
            fprintf(stderr, "kvr-bench indexer: bad number '%s'\n", optarg);
            return 2;
        }
        switch (c) {
        case 't':
            o.trace = optarg;
            break;
        case 'j':
            o.json = optarg;
            break;
        case 's':
            o.snapdir = optarg;
            break;
        case 'w':
            o.workers = (uint32_t)(v > 1024 ? 0 : v);
            break;
        case 'c':
            o.capacity = v;
            break;
        case 'r':
            o.rbs = (uint32_t)(v > 65536 ? 0 : v);
            break;
        case 'b':
            o.tbs = (uint32_t)(v > 65536 ? 0 : v);
            break;
        case 'q':
            o.queries = v;
            break;
        case 'k':
            o.scale = (uint32_t)(v > 1000 ? 0 : v);
            break;
        case 'a':
            if (strcmp(optarg, "rr") == 0)
                o.assign_prefix = false;
            else if (strcmp(optarg, "prefix") == 0)
                o.assign_prefix = true;
            else {
                fprintf(stderr, "kvr-bench indexer: --assign rr|prefix\n");
                return 2;
            }
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!o.trace || !o.json || !o.workers || o.workers > 255 || !o.capacity || !o.rbs || !o.tbs ||
        o.tbs % o.rbs || o.tbs / o.rbs > 65535 || !o.scale || o.capacity > (1u << 26)) {
        fprintf(stderr, "kvr-bench indexer: need --trace and --json; workers 1..255, "
                        "trace block size a multiple of the router block size, capacity <= 2^26\n");
        usage(stderr);
        return 2;
    }
    kvr_log_setup("bench", "indexer", KVR_LOG_WARN);

    int ret = 1;
    kvr_err err = {0};
    kvr_trace tr = {0};
    kvr_index *idx = NULL, *idx2 = NULL;
    lru cache = {0};
    chunk ch = {0};
    uint32_t *tbuf = NULL, *ptoks = NULL;
    uint64_t *qseq = NULL, *qoff = NULL, *qlen = NULL;
    double *lat = NULL, *lat256 = NULL;
    kvr_index_image img = {0}, img2 = {0};
    char tmpdir[256] = "";
    uint64_t *req_keys = NULL;
    size_t req_keys_cap = 0;

    if (kvr_trace_load(o.trace, NULL, &tr, &err)) {
        fprintf(stderr, "kvr-bench indexer: %s\n", err.msg);
        return 1;
    }
    const uint32_t R = o.tbs / o.rbs; /* router blocks per trace block */
    const uint64_t id_stride = tr.max_hash_id + 1;
    if (id_stride * o.scale >= (1ULL << 40)) {
        fprintf(stderr, "kvr-bench indexer: hash ids too large to scale\n");
        goto out;
    }
    kvr_index_opts io = {.block_size = o.rbs,
                         .max_workers = o.workers > 64 ? o.workers : 64,
                         .default_capacity_blocks = o.capacity};
    if (kvr_index_create(&idx, &io, &err) || lru_init(&cache, o.workers, o.capacity)) {
        fprintf(stderr, "kvr-bench indexer: setup: %s\n", err.msg[0] ? err.msg : "out of memory");
        goto out;
    }
    for (uint32_t w = 0; w < o.workers; w++)
        kvr_index_set_worker_capacity(idx, w, o.capacity);
    tbuf = malloc(o.tbs * sizeof *tbuf);
    if (!tbuf)
        goto out;

    /* ---- 1+2: simulate, build events in chunks, apply each chunk under the clock -------- */
    const size_t CHUNK_TOKENS = 8u << 20; /* 32 MiB of tokens per chunk */
    uint64_t n_requests = (uint64_t)tr.n * o.scale;
    uint64_t apply_ns = 0, apply_cpu_ns = 0, n_events = 0, n_store_blocks = 0, n_remove_blocks = 0;
    uint64_t ev_stored = 0, ev_removed = 0, hit_blocks = 0, prompt_blocks = 0, failed = 0;
    for (uint64_t ri = 0; ri <= n_requests; ri++) {
        bool last = ri == n_requests;
        if (last || ch.n_tokens > CHUNK_TOKENS) {
            /* apply this chunk (pointers fixed up first: pools may have moved) */
            for (size_t i = 0; i < ch.n; i++) {
                ch.evs[i].ev.hashes = ch.hashes + (uintptr_t)ch.evs[i].ev.hashes;
                ch.evs[i].ev.tokens = ch.tokens + (uintptr_t)ch.evs[i].ev.tokens;
            }
            int64_t t0 = kvr_mono_ns(), c0 = thread_cpu_ns();
            for (size_t i = 0; i < ch.n; i++)
                if (kvr_index_apply(idx, ch.evs[i].worker, &ch.evs[i].ev, &err))
                    failed++;
            apply_ns += (uint64_t)(kvr_mono_ns() - t0);
            apply_cpu_ns += (uint64_t)(thread_cpu_ns() - c0);
            n_events += ch.n;
            ch.n = ch.n_hashes = ch.n_tokens = 0;
            if (last)
                break;
        }
        const kvr_trace_req *r = &tr.reqs[ri % tr.n];
        uint64_t id_base = (ri / tr.n) * id_stride;
        uint32_t w = (uint32_t)(ri % o.workers);
        if (o.assign_prefix) { /* hash of the first 4 ids: id 0 alone is everyone's prefix */
            uint64_t hsh = 0;
            for (uint32_t i = 0; i < r->n_hash_ids && i < 4; i++)
                hsh = mix64(hsh ^ (r->hash_ids[i] + id_base));
            w = (uint32_t)(hsh % o.workers);
        }
        uint64_t nb = r->input_length / o.rbs; /* full router blocks */
        if (nb > (uint64_t)r->n_hash_ids * R)
            nb = (uint64_t)r->n_hash_ids * R;
        if (nb > o.capacity)
            nb = o.capacity; /* a request larger than the cache stores what fits */
        if (grow((void **)&req_keys, &req_keys_cap, nb + 1, sizeof *req_keys))
            goto oom;
        prompt_blocks += nb;
        /* touch the cached prefix and anything cached later; collect what is missing */
        for (uint64_t b = 0; b < nb; b++) {
            uint64_t hid = r->hash_ids[b / R] + id_base;
            req_keys[b] = (hid << 16) | (b % R);
        }
        uint64_t missing = 0;
        for (uint64_t b = 0; b < nb; b++) {
            uint32_t n = lru_find(&cache, w, req_keys[b]);
            if (n != NIL) {
                lru_touch(&cache, n);
                if (missing == 0)
                    hit_blocks++; /* a prefix hit, as an engine would reuse it */
            } else {
                missing++;
            }
        }
        /* evict to make room: one REMOVED event */
        if (cache.size[w] + missing > cache.capacity) {
            uint64_t ev_n = cache.size[w] + missing - cache.capacity;
            if (grow((void **)&ch.evs, &ch.cap, ch.n + 1, sizeof *ch.evs) ||
                grow((void **)&ch.hashes, &ch.cap_hashes, ch.n_hashes + ev_n, sizeof *ch.hashes))
                goto oom;
            bench_ev *be = &ch.evs[ch.n++];
            memset(be, 0, sizeof *be);
            be->worker = w;
            be->ev.type = KVR_KV_REMOVED;
            be->ev.n_hashes = (uint32_t)ev_n;
            be->ev.hashes = (const uint64_t *)(uintptr_t)ch.n_hashes;
            for (uint64_t i = 0; i < ev_n; i++)
                ch.hashes[ch.n_hashes++] = mix64(lru_evict(&cache, w) ^ 0xe47e);
            ev_removed++;
            n_remove_blocks += ev_n;
        }
        /* store each run of missing blocks, chained on the block before it */
        uint64_t cur_tid = UINT64_MAX;
        for (uint64_t b = 0; b < nb;) {
            if (lru_find(&cache, w, req_keys[b]) != NIL) {
                b++;
                continue;
            }
            uint64_t e = b;
            while (e < nb && lru_find(&cache, w, req_keys[e]) == NIL)
                e++;
            uint64_t len = e - b;
            if (grow((void **)&ch.evs, &ch.cap, ch.n + 1, sizeof *ch.evs) ||
                grow((void **)&ch.hashes, &ch.cap_hashes, ch.n_hashes + len, sizeof *ch.hashes) ||
                grow((void **)&ch.tokens, &ch.cap_tokens, ch.n_tokens + len * o.rbs,
                     sizeof *ch.tokens))
                goto oom;
            bench_ev *be = &ch.evs[ch.n++];
            memset(be, 0, sizeof *be);
            be->worker = w;
            be->ev.type = KVR_KV_STORED;
            be->ev.block_size = o.rbs;
            be->ev.n_hashes = (uint32_t)len;
            be->ev.n_tokens = (uint32_t)(len * o.rbs);
            be->ev.hashes = (const uint64_t *)(uintptr_t)ch.n_hashes;
            be->ev.tokens = (const uint32_t *)(uintptr_t)ch.n_tokens;
            if (b > 0) {
                be->ev.has_parent = true;
                be->ev.parent = mix64(req_keys[b - 1] ^ 0xe47e);
            }
            for (uint64_t i = b; i < e; i++) {
                uint64_t tid = req_keys[i] >> 16;
                if (tid != cur_tid) {
                    kvr_trace_block_tokens(tid, o.tbs, tbuf);
                    cur_tid = tid;
                }
                memcpy(ch.tokens + ch.n_tokens, tbuf + (req_keys[i] & 0xffff) * o.rbs,
                       o.rbs * sizeof *tbuf);
                ch.n_tokens += o.rbs;
                ch.hashes[ch.n_hashes++] = mix64(req_keys[i] ^ 0xe47e);
                if (lru_find(&cache, w, req_keys[i]) == NIL) /* ids may repeat in a prompt */
                    lru_insert(&cache, w, req_keys[i]);
            }
            ev_stored++;
            n_store_blocks += len;
            b = e;
        }
    }
    free(req_keys);
    req_keys = NULL;

    kvr_index_stats st;
    kvr_index_stats_get(idx, &st);
    uint64_t cached = 0;
    for (uint32_t w = 0; w < o.workers; w++)
        cached += cache.size[w];
    double apply_s = (double)apply_ns / 1e9;
    double events_per_s = apply_s > 0 ? (double)n_events / apply_s : 0;
    double blocks_per_s = apply_s > 0 ? (double)(n_store_blocks + n_remove_blocks) / apply_s : 0;
    double stored_blocks_per_s = apply_s > 0 ? (double)n_store_blocks / apply_s : 0;
    double apply_cpu_s = (double)apply_cpu_ns / 1e9;
    double blocks_per_cpu_s =
        apply_cpu_s > 0 ? (double)(n_store_blocks + n_remove_blocks) / apply_cpu_s : 0;
    double bytes_per_block = st.entries ? (double)st.bytes / (double)st.entries : 0;
    bool consistent = st.entries == cached && failed == 0;

    /* ---- 3: queries on the final index -------------------------------------------------- */
    uint64_t nq = o.queries;
    size_t qpool = 0, qcap = 0;
    qoff = malloc((nq ? nq : 1) * sizeof *qoff);
    qlen = malloc((nq ? nq : 1) * sizeof *qlen);
    lat = malloc((nq ? nq : 1) * sizeof *lat);
    size_t maxin = 0;
    for (size_t i = 0; i < tr.n; i++)
        if (tr.reqs[i].input_length > maxin)
            maxin = tr.reqs[i].input_length;
    ptoks = malloc((maxin + 1) * sizeof *ptoks);
    if (!qoff || !qlen || !lat || !ptoks)
        goto oom;
    for (uint64_t q = 0; q < nq; q++) {
        /* requests spread over every replay of the trace */
        uint64_t ri = (q * 7919u) % n_requests;
        kvr_trace_req r = tr.reqs[ri % tr.n];
        uint64_t id_base = (ri / tr.n) * id_stride;
        uint64_t ids[4096];
        if (r.n_hash_ids > 4096)
            r.n_hash_ids = 4096;
        for (uint32_t i = 0; i < r.n_hash_ids; i++)
            ids[i] = r.hash_ids[i] + id_base;
        r.hash_ids = ids;
        size_t nt = kvr_trace_prompt(&r, ri, o.tbs, ptoks, maxin);
        size_t nb = nt / o.rbs;
        if (grow((void **)&qseq, &qcap, qpool + nb + 1, sizeof *qseq))
            goto oom;
        qoff[q] = qpool;
        qlen[q] = kvr_hash_seq(ptoks, nt, o.rbs, false, 0, qseq + qpool, nb);
        qpool += qlen[q];
    }
    kvr_index_match m[1024];
    uint64_t matched_q = 0, matched_depth = 0, qblocks = 0;
    for (uint64_t q = 0; q < nq; q++) {
        int64_t t0 = kvr_mono_ns();
        size_t n = kvr_index_find_matches(idx, qseq + qoff[q], qlen[q], m, 1024);
        int64_t t1 = kvr_mono_ns();
        lat[q] = (double)(t1 - t0) / 1000.0;
        qblocks += qlen[q];
        if (n) {
            matched_q++;
            uint32_t best = 0;
            for (size_t i = 0; i < n && i < 1024; i++)
                if (m[i].depth > best)
                    best = m[i].depth;
            matched_depth += best;
        }
    }
    /* 256-block queries: the first 256 blocks of queries that have that many */
    size_t n256 = 0;
    lat256 = malloc((nq ? nq : 1) * sizeof *lat256);
    if (!lat256)
        goto oom;
    uint64_t full256 = 0;
    for (uint64_t q = 0; q < nq; q++) {
        if (qlen[q] < 256)
            continue;
        int64_t t0 = kvr_mono_ns();
        size_t n = kvr_index_find_matches(idx, qseq + qoff[q], 256, m, 1024);
        int64_t t1 = kvr_mono_ns();
        lat256[n256++] = (double)(t1 - t0) / 1000.0;
        for (size_t i = 0; i < n && i < 1024; i++)
            if (m[i].depth == 256) {
                full256++;
                break;
            }
    }
    qsort(lat, nq, sizeof *lat, samples_cmp);
    qsort(lat256, n256, sizeof *lat256, samples_cmp);

    /* ---- 4: snapshot ---------------------------------------------------------------------- */
    const char *dir = o.snapdir;
    if (!dir) {
        const char *base = getenv("TMPDIR");
        snprintf(tmpdir, sizeof tmpdir, "%s/kvr-bench-indexer-XXXXXX", base ? base : "/tmp");
        if (!mkdtemp(tmpdir)) {
            fprintf(stderr, "kvr-bench indexer: mkdtemp: %s\n", strerror(errno));
            goto out;
        }
        dir = tmpdir;
    }
    int64_t t0 = kvr_mono_ns();
    if (kvr_index_export(idx, &img, &err))
        goto snapfail;
    int64_t t1 = kvr_mono_ns();
    kvr_snapshot_info si = {0};
    if (kvr_snapshot_write(&img, dir, &si, &err))
        goto snapfail;
    int64_t t2 = kvr_mono_ns();
    if (kvr_index_create(&idx2, &io, &err))
        goto snapfail;
    if (kvr_snapshot_read(dir, o.rbs, &img2, NULL, &err))
        goto snapfail;
    int64_t t3 = kvr_mono_ns();
    if (kvr_index_import(idx2, &img2, &err))
        goto snapfail;
    int64_t t4 = kvr_mono_ns();
    bool digests_equal = kvr_index_digest(idx2) == kvr_index_digest(idx);
    double export_ms = (double)(t1 - t0) / 1e6, write_ms = (double)(t2 - t1) / 1e6;
    double readfile_ms = (double)(t3 - t2) / 1e6, import_ms = (double)(t4 - t3) / 1e6;

    /* ---- report ------------------------------------------------------------------------------ */
    printf("kvr-bench indexer: %s, %" PRIu64 " requests (scale %u), %u workers, cache %" PRIu64
           " blocks/worker, block %u (trace %u), assign %s\n",
           o.trace, n_requests, o.scale, o.workers, o.capacity, o.rbs, o.tbs,
           o.assign_prefix ? "prefix" : "rr");
    printf("  %-28s %14" PRIu64 "  (%" PRIu64 " stored, %" PRIu64 " removed)\n", "events", n_events,
           ev_stored, ev_removed);
    printf("  %-28s %14" PRIu64 "  (%" PRIu64 " stored, %" PRIu64 " removed)\n", "blocks in events",
           n_store_blocks + n_remove_blocks, n_store_blocks, n_remove_blocks);
    printf("  %-28s %14.3f  (thread CPU %.3f: %.0f blocks per CPU second)\n", "apply time s",
           apply_s, apply_cpu_s, blocks_per_cpu_s);
    printf("  %-28s %14.0f\n", "events_per_s", events_per_s);
    printf("  %-28s %14.0f  (stored only: %.0f)\n", "blocks_per_s", blocks_per_s,
           stored_blocks_per_s);
    printf("  %-28s %14" PRIu64 "  (simulated caches hold %" PRIu64 ": %s)\n", "entries",
           st.entries, cached, consistent ? "consistent" : "MISMATCH");
    printf("  %-28s %14" PRIu64 "\n", "blocks (distinct seq)", st.blocks);
    printf("  %-28s %14" PRIu64 "\n", "bytes", st.bytes);
    printf("  %-28s %14.1f\n", "bytes_per_block", bytes_per_block);
    printf("  %-28s %14" PRIu64 "  (mean %.0f blocks, %" PRIu64 " matched, mean best depth %.1f)\n",
           "queries", nq, nq ? (double)qblocks / (double)nq : 0, matched_q,
           matched_q ? (double)matched_depth / (double)matched_q : 0);
    printf("  %-28s p50 %.2f  p99 %.2f  max %.2f\n", "find_matches_us", pct(lat, nq, 50),
           pct(lat, nq, 99), nq ? lat[nq - 1] : 0);
    printf("  %-28s p50 %.2f  p99 %.2f  (%zu queries, %" PRIu64 " matched all 256)\n",
           "find_matches_256_us", pct(lat256, n256, 50), pct(lat256, n256, 99), n256, full256);
    printf("  %-28s export %.1f  write %.1f  read %.1f  import %.1f  (%" PRIu64
           " bytes, digests %s)\n",
           "snapshot ms", export_ms, write_ms, readfile_ms, import_ms, si.file_bytes,
           digests_equal ? "equal" : "DIFFER");
    printf("  %-28s %14.1f %%\n", "simulated prefix hit rate",
           prompt_blocks ? 100.0 * (double)hit_blocks / (double)prompt_blocks : 0);

    FILE *jf = fopen(o.json, "w");
    if (!jf) {
        fprintf(stderr, "kvr-bench indexer: %s: %s\n", o.json, strerror(errno));
        goto out;
    }
    fprintf(jf,
            "{\"bench\":\"indexer\",\"trace\":\"%s\",\"requests\":%" PRIu64 ",\"scale\":%u,"
            "\"workers\":%u,\"capacity_blocks\":%" PRIu64 ",\"router_block_size\":%u,"
            "\"trace_block_size\":%u,\"assign\":\"%s\",\n"
            " \"events\":%" PRIu64 ",\"blocks_stored\":%" PRIu64 ",\"blocks_removed\":%" PRIu64
            ",\"apply_s\":%.6f,\"events_per_s\":%.0f,\"blocks_per_s\":%.0f,"
            "\"stored_blocks_per_s\":%.0f,\"apply_cpu_s\":%.6f,\"blocks_per_cpu_s\":%.0f,\n"
            " \"entries\":%" PRIu64 ",\"blocks\":%" PRIu64 ",\"bytes\":%" PRIu64
            ",\"bytes_per_block\":%.2f,\"consistent\":%s,\n"
            " \"queries\":%" PRIu64 ",\"query_blocks_mean\":%.1f,"
            "\"find_matches_us\":{\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f},\n"
            " \"find_matches_256_us\":{\"p50\":%.3f,\"p99\":%.3f,\"n\":%zu,\"full_depth\":%" PRIu64
            "},\n"
            " \"snapshot_export_ms\":%.2f,\"snapshot_write_ms\":%.2f,\"snapshot_read_ms\":%.2f,"
            "\"snapshot_file_read_ms\":%.2f,\"snapshot_import_ms\":%.2f,\"snapshot_bytes\":%" PRIu64
            ",\"digests_equal\":%s,\n"
            " \"simulated_hit_rate\":%.4f}\n",
            o.trace, n_requests, o.scale, o.workers, o.capacity, o.rbs, o.tbs,
            o.assign_prefix ? "prefix" : "rr", n_events, n_store_blocks, n_remove_blocks, apply_s,
            events_per_s, blocks_per_s, stored_blocks_per_s, apply_cpu_s, blocks_per_cpu_s,
            st.entries, st.blocks, st.bytes, bytes_per_block, consistent ? "true" : "false", nq,
            nq ? (double)qblocks / (double)nq : 0, pct(lat, nq, 50), pct(lat, nq, 99),
            nq ? lat[nq - 1] : 0, pct(lat256, n256, 50), pct(lat256, n256, 99), n256, full256,
            export_ms, write_ms, readfile_ms + import_ms, readfile_ms, import_ms, si.file_bytes,
            digests_equal ? "true" : "false",
            prompt_blocks ? (double)hit_blocks / (double)prompt_blocks : 0);
    fclose(jf);
    ret = consistent && digests_equal ? 0 : 1;
    goto out;
snapfail:
    fprintf(stderr, "kvr-bench indexer: snapshot: %s\n", err.msg);
    goto out;
oom:
    fprintf(stderr, "kvr-bench indexer: out of memory\n");
out:
    if (tmpdir[0]) {
        char p[320];
        snprintf(p, sizeof p, "%s/%s", tmpdir, KVR_SNAPSHOT_FILE);
        unlink(p);
        snprintf(p, sizeof p, "%s/%s", tmpdir, KVR_SNAPSHOT_TMP_FILE);
        unlink(p);
        rmdir(tmpdir);
    }
    free(req_keys);
    kvr_index_image_free(&img);
    kvr_index_image_free(&img2);
    kvr_index_destroy(idx);
    kvr_index_destroy(idx2);
    lru_free(&cache);
    free(ch.evs);
    free(ch.hashes);
    free(ch.tokens);
    free(tbuf);
    free(ptoks);
    free(qseq);
    free(qoff);
    free(qlen);
    free(lat);
    free(lat256);
    kvr_trace_free(&tr);
    return ret;
}
