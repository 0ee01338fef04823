/* Randomized test: the index against a naive reference model (sorted arrays, linear scans)
 * over 100k random operations: stores (chained, unchained, with unknown parents, aliased
 * contents), removes (known and unknown), clears, worker removals, bounds; after every query
 * the find_matches results must agree, and entries + digest after every operation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "index.h"
#include "kvr_hash.h"

#define BS 2u
#define NODES 600
#define NWORKERS 6
#define MAXPATH 64

/* A tree of blocks: node n has a parent (or none) and its own tokens; its seq hash depends on
 * the whole path. "Twins" copy another node's parent and tokens: same seq, other ext hash. */
static int parent[NODES];
static uint32_t toks[NODES][BS];
static uint64_t seqh[NODES];
static uint64_t exth[NODES];

static uint64_t rng = 88172645463325252ULL;
static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}
static uint32_t rn(uint32_t n)
{
    return (uint32_t)(rnd() % n);
}

static void build_tree(void)
{
    for (int n = 0; n < NODES; n++) {
        if (n > 10 && rn(10) == 0) { /* twin of an earlier node */
            int t = (int)rn((uint32_t)n);
            parent[n] = parent[t];
            memcpy(toks[n], toks[t], sizeof toks[n]);
        } else {
            parent[n] = (n == 0 || rn(6) == 0) ? -1 : (int)rn((uint32_t)n);
            for (uint32_t k = 0; k < BS; k++)
                toks[n][k] = (uint32_t)rnd();
        }
        uint64_t local = kvr_hash_block(toks[n], BS);
        seqh[n] = parent[n] < 0 ? local : kvr_hash_chain(seqh[parent[n]], local);
        /* node 0's external hash is 0 (a legal value); a few are huge */
        exth[n] = n == 0 ? 0 : (n % 50 == 0 ? UINT64_MAX - (uint64_t)n : (uint64_t)n * 7919u);
    }
}

static int path_of(int n, int *out)
{
    int tmp[NODES], len = 0;
    for (int x = n; x >= 0; x = parent[x])
        tmp[len++] = x;
    for (int i = 0; i < len; i++)
        out[i] = tmp[len - 1 - i];
    return len;
}

/* ---- reference model: per worker a sorted array of (ext, seq) ------------------------------ */

typedef struct ref_pair {
    uint64_t ext, seq;
} ref_pair;

typedef struct ref_worker {
    bool live;
    uint64_t id;
    uint64_t bound;
    ref_pair p[NODES];
    int n;
} ref_worker;

static ref_worker ref[NWORKERS];
static const uint64_t WIDS[NWORKERS] = {0, 1, 2, 42, 1ULL << 40, UINT64_MAX};

static int ref_find(const ref_worker *w, uint64_t ext)
{
    int lo = 0, hi = w->n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (w->p[mid].ext < ext)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < w->n && w->p[lo].ext == ext ? lo : -1;
}

static void ref_put(ref_worker *w, uint64_t ext, uint64_t seq)
{
    int i = 0;
    while (i < w->n && w->p[i].ext < ext)
        i++;
    memmove(&w->p[i + 1], &w->p[i], (size_t)(w->n - i) * sizeof(ref_pair));
    w->p[i] = (ref_pair){ext, seq};
    w->n++;
}

static void ref_del(ref_worker *w, int i)
{
    memmove(&w->p[i], &w->p[i + 1], (size_t)(w->n - i - 1) * sizeof(ref_pair));
    w->n--;
}

static bool ref_has_seq(const ref_worker *w, uint64_t seq)
{
    for (int i = 0; i < w->n; i++)
        if (w->p[i].seq == seq)
            return true;
    return false;
}

/* entries and digest from scratch: distinct seqs per worker */
static void ref_totals(uint64_t *entries, uint64_t *digest)
{
    *entries = 0;
    *digest = 0;
    for (int k = 0; k < NWORKERS; k++) {
        const ref_worker *w = &ref[k];
        if (!w->live)
            continue;
        for (int i = 0; i < w->n; i++) {
            bool seen = false;
            for (int j = 0; j < i && !seen; j++)
                seen = w->p[j].seq == w->p[i].seq;
            if (!seen) {
                (*entries)++;
                *digest += kvr_index_pair_mix(w->id, w->p[i].seq);
            }
        }
    }
}

static const uint64_t DEFAULT_CAP = 15, FACTOR = 2;

static void run_random(uint32_t max_workers, int ops)
{
    build_tree();
    memset(ref, 0, sizeof ref);
    for (int k = 0; k < NWORKERS; k++) {
        ref[k].id = WIDS[k];
        ref[k].bound = DEFAULT_CAP * FACTOR;
    }
    kvr_index *idx = NULL;
    kvr_index_opts o = {.block_size = BS,
                        .max_workers = max_workers,
                        .bound_factor = FACTOR,
                        .default_capacity_blocks = DEFAULT_CAP};
    kvr_err err = {0};
    assert_int_equal(kvr_index_create(&idx, &o, &err), 0);
    /* With room for more than 64 workers, 64 idle ones take the low slots: the test's workers
     * then live in the second mask word (masks widen on demand). */
    for (uint64_t d = 0; max_workers > 64 && d < 64; d++)
        assert_int_equal(kvr_index_set_worker_capacity(idx, 1000000 + d, 1), 0);
    kvr_index_stats st;
    kvr_index_stats_get(idx, &st);
    uint64_t base_bytes = st.bytes;

    uint64_t hashes[MAXPATH];
    uint32_t tokens[MAXPATH * BS];
    int path[NODES];
    uint64_t queries = 0, matched_workers = 0, drops = 0;
    for (int op = 0; op < ops; op++) {
        int k = (int)rn(NWORKERS);
        ref_worker *w = &ref[k];
        uint32_t r = rn(1000);
        if (r < 450) { /* store a stretch of a path */
            int len = path_of((int)rn(NODES), path);
            int start = (int)rn((uint32_t)len);
            int end = start + 1 + (int)rn((uint32_t)(len - start));
            if (end - start > MAXPATH)
                end = start + MAXPATH;
            kvr_kv_event ev = {
                .type = KVR_KV_STORED, .block_size = BS, .hashes = hashes, .tokens = tokens};
            ev.n_hashes = (uint32_t)(end - start);
            ev.n_tokens = ev.n_hashes * BS;
            if (start > 0) {
                ev.has_parent = true;
                ev.parent = exth[path[start - 1]];
            }
            for (int i = start; i < end; i++) {
                hashes[i - start] = exth[path[i]];
                memcpy(tokens + (i - start) * BS, toks[path[i]], sizeof toks[0]);
            }
            int rc = kvr_index_apply(idx, w->id, &ev, &err);
            /* model */
            int expect = 0;
            w->live = true; /* any store registers the worker, even a dropped one */
            if (ev.has_parent) {
                int pi = ref_find(w, ev.parent);
                /* the parent's seq must be the one the chain expects for the model to agree:
                 * a worker holding that ext with the seq of the same node is the only case */
                if (pi < 0)
                    expect = KVR_ENOTFOUND;
                else
                    assert_true(w->p[pi].seq == seqh[path[start - 1]]);
            }
            if (!expect) {
                for (int i = start; i < end; i++) {
                    int at = ref_find(w, exth[path[i]]);
                    if (at >= 0) {
                        assert_true(w->p[at].seq == seqh[path[i]]);
                        continue;
                    }
                    if ((uint64_t)w->n >= w->bound) {
                        expect = KVR_ELIMIT;
                        break;
                    }
                    ref_put(w, exth[path[i]], seqh[path[i]]);
                }
            }
            assert_int_equal(rc, expect);
            if (rc)
                drops++;
        } else if (r < 750) { /* remove some held and some unknown hashes */
            uint32_t n = 1 + rn(4);
            for (uint32_t i = 0; i < n; i++) {
                if (w->n && rn(4) != 0)
                    hashes[i] = w->p[rn((uint32_t)w->n)].ext;
                else
                    hashes[i] = rnd() | 1;
            }
            kvr_kv_event ev = {.type = KVR_KV_REMOVED, .n_hashes = n, .hashes = hashes};
            assert_int_equal(kvr_index_apply(idx, w->id, &ev, &err), 0);
            if (w->live)
                for (uint32_t i = 0; i < n; i++) {
                    int at = ref_find(w, hashes[i]);
                    if (at >= 0)
                        ref_del(w, at);
                }
        } else if (r < 760) { /* clear */
            kvr_kv_event ev = {.type = KVR_KV_CLEARED};
            assert_int_equal(kvr_index_apply(idx, w->id, &ev, &err), 0);
            w->n = 0;
        } else if (r < 765) { /* worker leaves */
            assert_int_equal(kvr_index_remove_worker(idx, w->id), w->live ? 0 : KVR_ENOTFOUND);
            w->live = false;
            w->n = 0;
            w->bound = DEFAULT_CAP * FACTOR;
        } else if (r < 770) { /* capacity announced: bound changes (no eviction) */
            uint64_t cap = rn(3) == 0 ? 0 : 5 + rn(60);
            assert_int_equal(kvr_index_set_worker_capacity(idx, w->id, cap), 0);
            w->live = true;
            w->bound = (cap ? cap : DEFAULT_CAP) * FACTOR;
        } else { /* query a path, maybe with an unknown tail */
            int len = path_of((int)rn(NODES), path);
            uint64_t q[NODES + 1];
            for (int i = 0; i < len; i++)
                q[i] = seqh[path[i]];
            int qn = len;
            if (rn(3) == 0)
                q[qn++] = rnd();
            kvr_index_match m[16];
            size_t n = kvr_index_find_matches(idx, q, (size_t)qn, m, 16);
            size_t expect_n = 0;
            for (int kk = 0; kk < NWORKERS; kk++) {
                const ref_worker *x = &ref[kk];
                uint32_t d = 0;
                if (x->live)
                    while ((int)d < qn && ref_has_seq(x, q[d]))
                        d++;
                uint32_t got = 0;
                for (size_t i = 0; i < n; i++)
                    if (m[i].worker_id == x->id)
                        got = m[i].depth;
                if (got != d)
                    fail_msg("op %d: worker %llu depth %u, reference %u", op,
                             (unsigned long long)x->id, got, d);
                if (d)
                    expect_n++;
            }
            assert_int_equal(n, expect_n);
            queries++;
            matched_workers += n;
        }
        if (op % 97 == 0 || op == ops - 1) {
            uint64_t e, dg;
            ref_totals(&e, &dg);
            kvr_index_stats_get(idx, &st);
            if (st.entries != e || kvr_index_digest(idx) != dg)
                fail_msg("op %d: entries %llu/%llu digest %016llx/%016llx", op,
                         (unsigned long long)st.entries, (unsigned long long)e,
                         (unsigned long long)kvr_index_digest(idx), (unsigned long long)dg);
        }
    }
    /* the test must have exercised what it claims */
    kvr_index_stats_get(idx, &st);
    print_message("queries %llu matched %llu unknown_parent %llu over_bound %llu unknown_removes "
                  "%llu dup %llu\n",
                  (unsigned long long)queries, (unsigned long long)matched_workers,
                  (unsigned long long)st.dropped_unknown_parent,
                  (unsigned long long)st.dropped_over_bound, (unsigned long long)st.unknown_removes,
                  (unsigned long long)st.blocks_duplicate);
    assert_true(queries > (uint64_t)ops / 10);
    assert_true(matched_workers > queries / 4);
    assert_true(st.dropped_unknown_parent > 100);
    assert_true(st.dropped_over_bound > (uint64_t)ops / 1000);
    assert_true(st.unknown_removes > 100);
    assert_true(st.blocks_duplicate > 100);
    assert_true(drops > 100);
    /* snapshot image round trip of the final state */
    kvr_index_image img;
    assert_int_equal(kvr_index_export(idx, &img, &err), 0);
    kvr_index *c = NULL;
    assert_int_equal(kvr_index_create(&c, &o, &err), 0);
    assert_int_equal(kvr_index_import(c, &img, &err), 0);
    assert_true(kvr_index_digest(c) == kvr_index_digest(idx));
    kvr_index_image_free(&img);
    kvr_index_destroy(c);
    /* and everything goes away */
    for (int k = 0; k < NWORKERS; k++)
        kvr_index_remove_worker(idx, WIDS[k]);
    kvr_index_stats_get(idx, &st);
    assert_int_equal(st.entries, 0);
    assert_int_equal(st.bytes, base_bytes);
    kvr_index_destroy(idx);
}

static void test_random_one_word(void **state)
{
    (void)state;
    run_random(0, 100000);
}

static void test_random_multi_word(void **state)
{
    (void)state;
    rng = 0x1234567887654321ULL;
    run_random(130, 30000);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_one_word),
        cmocka_unit_test(test_random_multi_word),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
