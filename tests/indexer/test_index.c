/* Unit tests of the prefix index (indexer/index.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "index.h"
#include "kvr_hash.h"

#define BS 4u

/* Tokens of "document" d, block j: distinct per (d, j). */
static void doc_tokens(uint32_t d, uint32_t j, uint32_t *out)
{
    for (uint32_t k = 0; k < BS; k++)
        out[k] = d * 100000u + j * 16u + k + 1;
}

typedef struct ev_buf {
    kvr_kv_event ev;
    uint64_t hashes[256];
    uint32_t tokens[256 * BS];
} ev_buf;

/* STORED of blocks [from, to) of document d with external hashes ext_base + j; parent is the
 * external hash of block from-1 when from > 0. */
static const kvr_kv_event *stored(ev_buf *b, uint32_t d, uint32_t from, uint32_t to,
                                  uint64_t ext_base)
{
    memset(&b->ev, 0, sizeof b->ev);
    b->ev.type = KVR_KV_STORED;
    b->ev.block_size = BS;
    b->ev.n_hashes = to - from;
    b->ev.n_tokens = (to - from) * BS;
    b->ev.hashes = b->hashes;
    b->ev.tokens = b->tokens;
    if (from > 0) {
        b->ev.has_parent = true;
        b->ev.parent = ext_base + from - 1;
    }
    for (uint32_t j = from; j < to; j++) {
        b->hashes[j - from] = ext_base + j;
        doc_tokens(d, j, b->tokens + (j - from) * BS);
    }
    return &b->ev;
}

static const kvr_kv_event *removed(ev_buf *b, const uint64_t *h, uint32_t n)
{
    memset(&b->ev, 0, sizeof b->ev);
    b->ev.type = KVR_KV_REMOVED;
    b->ev.n_hashes = n;
    memcpy(b->hashes, h, n * sizeof *h);
    b->ev.hashes = b->hashes;
    return &b->ev;
}

/* seq hashes of the first n blocks of document d. */
static void doc_seqs(uint32_t d, uint32_t n, uint64_t *out)
{
    uint32_t toks[256 * BS];
    for (uint32_t j = 0; j < n; j++)
        doc_tokens(d, j, toks + j * BS);
    assert_int_equal(kvr_hash_seq(toks, (size_t)n * BS, BS, false, 0, out, n), n);
}

static kvr_index *mk(uint32_t max_workers)
{
    kvr_index *idx = NULL;
    kvr_index_opts o = {.block_size = BS, .max_workers = max_workers};
    kvr_err err = {0};
    assert_int_equal(kvr_index_create(&idx, &o, &err), 0);
    return idx;
}

/* depth of worker w in a find_matches result, 0 when absent. */
static uint32_t depth_of(const kvr_index_match *m, size_t n, uint64_t w)
{
    for (size_t i = 0; i < n; i++)
        if (m[i].worker_id == w)
            return m[i].depth;
    return 0;
}

static void test_store_remove_match(void **state)
{
    (void)state;
    kvr_index *idx = mk(0);
    ev_buf b;
    kvr_err err = {0};
    assert_int_equal(kvr_index_apply(idx, 1, stored(&b, 7, 0, 4, 100), &err), 0);
    assert_int_equal(kvr_index_apply(idx, 2, stored(&b, 7, 0, 2, 900), &err), 0);
    assert_int_equal(kvr_index_apply(idx, 3, stored(&b, 8, 0, 1, 100), &err), 0);

    uint64_t q[6];
    doc_seqs(7, 4, q);
    q[4] = 12345; /* unknown tail */
    kvr_index_match m[8];
    size_t n = kvr_index_find_matches(idx, q, 5, m, 8);
    assert_int_equal(n, 2);
    assert_int_equal(depth_of(m, n, 1), 4);
    assert_int_equal(depth_of(m, n, 2), 2);
    n = kvr_index_find_matches(idx, q, 3, m, 8);
    assert_int_equal(depth_of(m, n, 1), 3);
    /* cap smaller than the number of matches: count still right, no overflow */
    assert_int_equal(kvr_index_find_matches(idx, q, 4, m, 1), 2);
    assert_int_equal(kvr_index_find_matches(idx, q, 0, m, 8), 0);
    uint64_t d8[1];
    doc_seqs(8, 1, d8);
    n = kvr_index_find_matches(idx, d8, 1, m, 8);
    assert_int_equal(n, 1);
    assert_int_equal(m[0].worker_id, 3);
    assert_int_equal(m[0].depth, 1);
    /* a query whose first block is unknown matches nobody, even if later blocks are known */
    uint64_t q2[2] = {999, q[1]};
    assert_int_equal(kvr_index_find_matches(idx, q2, 2, m, 8), 0);

    kvr_index_stats st;
    kvr_index_stats_get(idx, &st);
    assert_int_equal(st.entries, 7);
    assert_int_equal(st.blocks, 5);
    assert_int_equal(st.workers, 3);
    assert_int_equal(st.blocks_stored, 7);

    /* removing worker 1's third block cuts its depth to 2 */
    uint64_t h = 102;
    assert_int_equal(kvr_index_apply(idx, 1, removed(&b, &h, 1), &err), 0);
    n = kvr_index_find_matches(idx, q, 4, m, 8);
    assert_int_equal(depth_of(m, n, 1), 2);
    assert_int_equal(depth_of(m, n, 2), 2);
    kvr_index_stats_get(idx, &st);
    assert_int_equal(st.entries, 6);
    assert_int_equal(st.blocks_removed, 1);

    /* clear worker 2 only */
    kvr_kv_event clr = {.type = KVR_KV_CLEARED};
    assert_int_equal(kvr_index_apply(idx, 2, &clr, &err), 0);
    n = kvr_index_find_matches(idx, q, 4, m, 8);
    assert_int_equal(n, 1);
    assert_int_equal(depth_of(m, n, 1), 2);
    kvr_index_worker_info wi;
    assert_int_equal(kvr_index_worker(idx, 2, &wi), 0); /* still registered */
    assert_int_equal(wi.entries, 0);

    /* remove worker 3 entirely */
    assert_int_equal(kvr_index_remove_worker(idx, 3), 0);
    assert_int_equal(kvr_index_remove_worker(idx, 3), KVR_ENOTFOUND);
    assert_int_equal(kvr_index_find_matches(idx, d8, 1, m, 8), 0);
    kvr_index_worker_info ws[8];
    assert_int_equal(kvr_index_workers(idx, ws, 8), 2);
    kvr_index_destroy(idx);
}

static void test_parent_chaining(void **state)
{
    (void)state;
    kvr_index *idx = mk(0);
    ev_buf b;
    kvr_err err = {0};
    /* the same document in three events, each chained on the last block of the previous one */
    assert_int_equal(kvr_index_apply(idx, 5, stored(&b, 1, 0, 2, 50), &err), 0);
    assert_int_equal(kvr_index_apply(idx, 5, stored(&b, 1, 2, 3, 50), &err), 0);
    assert_int_equal(kvr_index_apply(idx, 5, stored(&b, 1, 3, 6, 50), &err), 0);
    uint64_t q[6];
    doc_seqs(1, 6, q);
    kvr_index_match m[4];
    size_t n = kvr_index_find_matches(idx, q, 6, m, 4);
    assert_int_equal(n, 1);
    assert_int_equal(m[0].depth, 6);
    /* same digest as one event with all six blocks */
    kvr_index *one = mk(0);
    assert_int_equal(kvr_index_apply(one, 5, stored(&b, 1, 0, 6, 50), &err), 0);
    assert_true(kvr_index_digest(one) == kvr_index_digest(idx));
    kvr_index_destroy(one);
    kvr_index_destroy(idx);
}

static void test_unknown_parent_and_block_size(void **state)
{
    (void)state;
    kvr_index *idx = mk(0);
    ev_buf b;
    kvr_err err = {0};
    /* parent 50+2 was never stored by worker 5 */
    assert_int_equal(kvr_index_apply(idx, 5, stored(&b, 1, 3, 5, 50), &err), KVR_ENOTFOUND);
    assert_non_null(strstr(err.msg, "unknown parent"));
    /* known to another worker does not count */
    assert_int_equal(kvr_index_apply(idx, 6, stored(&b, 1, 0, 3, 50), &err), 0);
    assert_int_equal(kvr_index_apply(idx, 5, stored(&b, 1, 3, 5, 50), &err), KVR_ENOTFOUND);
    const kvr_kv_event *e = stored(&b, 2, 0, 1, 10);
    b.ev.block_size = BS * 2;
    b.ev.n_tokens = 0;
    (void)e;
    assert_int_equal(kvr_index_apply(idx, 5, &b.ev, &err), KVR_EINVAL);
    assert_non_null(strstr(err.msg, "block size"));
    stored(&b, 2, 0, 2, 10);
    b.ev.n_tokens = BS; /* fewer tokens than blocks need */
    assert_int_equal(kvr_index_apply(idx, 5, &b.ev, &err), KVR_EINVAL);
    kvr_index_stats st;
    kvr_index_stats_get(idx, &st);
    assert_int_equal(st.dropped_unknown_parent, 2);
    assert_int_equal(st.dropped_block_size, 1);
    assert_int_equal(st.dropped_invalid, 1);
    assert_int_equal(st.entries, 3); /* only worker 6's */
    kvr_index_destroy(idx);
}

static void test_duplicates_idempotent(void **state)
{
    (void)state;
    kvr_index *idx = mk(0);
    ev_buf b;
    kvr_err err = {0};
    assert_int_equal(kvr_index_apply(idx, 1, stored(&b, 3, 0, 5, 10), &err), 0);
    uint64_t d1 = kvr_index_digest(idx);
    kvr_index_stats s1, s2;
    kvr_index_stats_get(idx, &s1);
    assert_int_equal(kvr_index_apply(idx, 1, stored(&b, 3, 0, 5, 10), &err), 0);
    assert_int_equal(kvr_index_apply(idx, 1, stored(&b, 3, 2, 4, 10), &err), 0);
    kvr_index_stats_get(idx, &s2);
    assert_true(kvr_index_digest(idx) == d1);
    assert_int_equal(s2.entries, s1.entries);
    assert_int_equal(s2.bytes, s1.bytes);
    assert_int_equal(s2.blocks_duplicate, 7);
    uint64_t h[2] = {12, 12};
    assert_int_equal(kvr_index_apply(idx, 1, removed(&b, h, 2), &err), 0);
    assert_int_equal(kvr_index_apply(idx, 1, removed(&b, h, 1), &err), 0);
    assert_int_equal(kvr_index_apply(idx, 77, removed(&b, h, 1), &err), 0); /* unknown worker */
    kvr_index_stats_get(idx, &s2);
    assert_int_equal(s2.entries, 4);
    assert_int_equal(s2.unknown_removes, 3);
    assert_int_equal(s2.workers, 1);
    kvr_index_destroy(idx);
}

/* Two external hashes of one worker for the same content: the entry stays until both go. */
static void test_alias_and_rewrite(void **state)
{
    (void)state;
    kvr_index *idx = mk(0);
    ev_buf b;
    kvr_err err = {0};
    assert_int_equal(kvr_index_apply(idx, 1, stored(&b, 3, 0, 2, 10), &err), 0);
    assert_int_equal(kvr_index_apply(idx, 1, stored(&b, 3, 0, 2, 20), &err), 0);
    kvr_index_stats st;
    kvr_index_stats_get(idx, &st);
    assert_int_equal(st.entries, 2);
    assert_int_equal(st.ext_hashes, 4);
    uint64_t q[2];
    doc_seqs(3, 2, q);
    kvr_index_match m[2];
    uint64_t h[2] = {10, 11};
    assert_int_equal(kvr_index_apply(idx, 1, removed(&b, h, 2), &err), 0);
    assert_int_equal(kvr_index_find_matches(idx, q, 2, m, 2), 1);
    assert_int_equal(m[0].depth, 2);
    h[0] = 20;
    h[1] = 21;
    assert_int_equal(kvr_index_apply(idx, 1, removed(&b, h, 2), &err), 0);
    assert_int_equal(kvr_index_find_matches(idx, q, 2, m, 2), 0);
    assert_true(kvr_index_digest(idx) == 0);

    /* an external hash stored again with other tokens now means the new content */
    assert_int_equal(kvr_index_apply(idx, 1, stored(&b, 3, 0, 1, 10), &err), 0);
    assert_int_equal(kvr_index_apply(idx, 1, stored(&b, 4, 0, 1, 10), &err), 0);
    uint64_t q4[1];
    doc_seqs(4, 1, q4);
    assert_int_equal(kvr_index_find_matches(idx, q, 1, m, 2), 0);
    assert_int_equal(kvr_index_find_matches(idx, q4, 1, m, 2), 1);
    kvr_index_stats_get(idx, &st);
    assert_int_equal(st.entries, 1);
    assert_true(kvr_index_digest(idx) == kvr_index_pair_mix(1, q4[0]));
    kvr_index_destroy(idx);
}

/* Zero is an ordinary hash value for external hashes, seq hashes and worker ids. */
static void test_zero_values(void **state)
{
    (void)state;
    kvr_index *idx = mk(0);
    ev_buf b;
    kvr_err err = {0};
    assert_int_equal(kvr_index_apply(idx, 0, stored(&b, 3, 0, 3, 0), &err), 0); /* ext 0,1,2 */
    uint64_t q[3];
    doc_seqs(3, 3, q);
    kvr_index_match m[2];
    assert_int_equal(kvr_index_find_matches(idx, q, 3, m, 2), 1);
    assert_int_equal(m[0].worker_id, 0);
    assert_int_equal(m[0].depth, 3);
    uint64_t h = 0;
    assert_int_equal(kvr_index_apply(idx, 0, removed(&b, &h, 1), &err), 0);
    assert_int_equal(kvr_index_find_matches(idx, q, 3, m, 2), 0);
    kvr_index_stats st;
    kvr_index_stats_get(idx, &st);
    assert_int_equal(st.entries, 2);
    kvr_index_destroy(idx);
}

static void test_digest_order_independent(void **state)
{
    (void)state;
    kvr_index *a = mk(0), *c = mk(0);
    ev_buf b;
    kvr_err err = {0};
    /* a: docs 0..9 to workers in order; c: reverse order, with detours that cancel out */
    for (uint32_t d = 0; d < 10; d++)
        assert_int_equal(kvr_index_apply(a, d % 3, stored(&b, d, 0, 3 + d % 4, 1000 * d), &err), 0);
    for (int d = 9; d >= 0; d--) {
        assert_int_equal(kvr_index_apply(c, 99, stored(&b, 50, 0, 3, 7), &err), 0);
        assert_int_equal(kvr_index_apply(c, (uint32_t)d % 3,
                                         stored(&b, (uint32_t)d, 0, 3 + d % 4, 1000u * d), &err),
                         0);
    }
    assert_int_equal(kvr_index_remove_worker(c, 99), 0);
    assert_true(kvr_index_digest(a) == kvr_index_digest(c));
    assert_true(kvr_index_digest(a) != 0);
    /* any change changes it; undoing the change restores it */
    uint64_t d0 = kvr_index_digest(a);
    uint64_t h = 1000 * 5 + 3; /* doc 5 went to worker 2 with blocks 0..3 */
    assert_int_equal(kvr_index_apply(a, 2, removed(&b, &h, 1), &err), 0);
    assert_true(kvr_index_digest(a) != d0);
    assert_int_equal(kvr_index_apply(a, 2, stored(&b, 5, 3, 4, 5000), &err), 0);
    assert_true(kvr_index_digest(a) == d0);
    /* the same block on another worker is a different entry */
    assert_int_equal(kvr_index_apply(a, 0, stored(&b, 5, 0, 1, 5000), &err), 0);
    assert_true(kvr_index_digest(a) != d0);
    kvr_index_destroy(a);
    kvr_index_destroy(c);
}

static void test_memory_baseline(void **state)
{
    (void)state;
    kvr_index *idx = mk(0);
    kvr_index_stats st;
    kvr_index_stats_get(idx, &st);
    uint64_t base = st.bytes;
    assert_true(base > 0);
    ev_buf b;
    kvr_err err = {0};
    for (uint32_t d = 0; d < 400; d++)
        assert_int_equal(kvr_index_apply(idx, d % 5, stored(&b, d, 0, 100, 1000 * d), &err), 0);
    kvr_index_stats_get(idx, &st);
    assert_int_equal(st.entries, 40000);
    assert_true(st.bytes > base + 40000 * 16);
    /* bytes per entry stays well within the 96-byte budget */
    assert_true((st.bytes - base) / st.entries <= 96);
    /* remove half by events, clear one worker, remove the rest */
    for (uint32_t d = 0; d < 400; d += 2) {
        uint64_t h[100];
        for (uint32_t j = 0; j < 100; j++)
            h[j] = 1000 * d + j;
        assert_int_equal(kvr_index_apply(idx, d % 5, removed(&b, h, 100), &err), 0);
    }
    kvr_kv_event clr = {.type = KVR_KV_CLEARED};
    assert_int_equal(kvr_index_apply(idx, 1, &clr, &err), 0);
    for (uint64_t w = 0; w < 5; w++)
        assert_int_equal(kvr_index_remove_worker(idx, w), 0);
    kvr_index_stats_get(idx, &st);
    assert_int_equal(st.entries, 0);
    assert_int_equal(st.blocks, 0);
    assert_int_equal(st.bytes, base);
    assert_true(kvr_index_digest(idx) == 0);
    kvr_index_destroy(idx);
}

static void test_bound(void **state)
{
    (void)state;
    kvr_index *idx = NULL;
    kvr_index_opts o = {.block_size = BS, .bound_factor = 4, .default_capacity_blocks = 5};
    kvr_err err = {0};
    assert_int_equal(kvr_index_create(&idx, &o, &err), 0);
    ev_buf b;
    /* unknown capacity: default 5 x 4 = 20 */
    assert_int_equal(kvr_index_apply(idx, 1, stored(&b, 1, 0, 30, 0), &err), KVR_ELIMIT);
    kvr_index_worker_info wi;
    assert_int_equal(kvr_index_worker(idx, 1, &wi), 0);
    assert_int_equal(wi.bound, 20);
    assert_int_equal(wi.entries, 20);
    kvr_index_stats st;
    kvr_index_stats_get(idx, &st);
    assert_int_equal(st.dropped_over_bound, 10);
    /* the oldest (the prefix) are kept: depth 20 */
    uint64_t q[30];
    doc_seqs(1, 30, q);
    kvr_index_match m[2];
    assert_int_equal(kvr_index_find_matches(idx, q, 30, m, 2), 1);
    assert_int_equal(m[0].depth, 20);
    /* an announced capacity raises the bound */
    assert_int_equal(kvr_index_set_worker_capacity(idx, 1, 10), 0);
    assert_int_equal(kvr_index_apply(idx, 1, stored(&b, 1, 20, 30, 0), &err), 0);
    assert_int_equal(kvr_index_find_matches(idx, q, 30, m, 2), 1);
    assert_int_equal(m[0].depth, 30);
    /* duplicates at the bound are still fine; other workers are unaffected */
    assert_int_equal(kvr_index_set_worker_capacity(idx, 1, 1), 0);
    assert_int_equal(kvr_index_apply(idx, 1, stored(&b, 1, 0, 30, 0), &err), 0);
    assert_int_equal(kvr_index_apply(idx, 1, stored(&b, 2, 0, 1, 500), &err), KVR_ELIMIT);
    assert_int_equal(kvr_index_apply(idx, 2, stored(&b, 2, 0, 1, 500), &err), 0);
    kvr_index_stats_get(idx, &st);
    assert_int_equal(st.dropped_over_bound, 11);
    assert_int_equal(st.entries, 31);
    kvr_index_destroy(idx);
}

static void test_worker_slots(void **state)
{
    (void)state;
    ev_buf b;
    kvr_err err = {0};
    kvr_index *idx = mk(2);
    assert_int_equal(kvr_index_apply(idx, 10, stored(&b, 1, 0, 2, 0), &err), 0);
    assert_int_equal(kvr_index_apply(idx, 11, stored(&b, 1, 0, 2, 0), &err), 0);
    assert_int_equal(kvr_index_apply(idx, 12, stored(&b, 1, 0, 2, 0), &err), KVR_ELIMIT);
    assert_int_equal(kvr_index_remove_worker(idx, 10), 0);
    assert_int_equal(kvr_index_apply(idx, 12, stored(&b, 1, 0, 2, 0), &err), 0);
    kvr_index_stats st;
    kvr_index_stats_get(idx, &st);
    assert_int_equal(st.dropped_no_slot, 1);
    kvr_index_destroy(idx);

    /* more than 64 workers: multi-word masks */
    idx = mk(200);
    for (uint64_t w = 0; w < 200; w++)
        assert_int_equal(
            kvr_index_apply(idx, 1000 + w, stored(&b, 9, 0, (uint32_t)(w % 7) + 1, w), &err), 0);
    uint64_t q[7];
    doc_seqs(9, 7, q);
    kvr_index_match m[256];
    size_t n = kvr_index_find_matches(idx, q, 7, m, 256);
    assert_int_equal(n, 200);
    for (uint64_t w = 0; w < 200; w++)
        assert_int_equal(depth_of(m, n, 1000 + w), w % 7 + 1);
    kvr_index_stats st2;
    kvr_index_stats_get(idx, &st2);
    assert_int_equal(st2.blocks, 7);
    kvr_index_destroy(idx);

    kvr_index_opts bad = {.max_workers = KVR_INDEX_MAX_WORKERS_LIMIT + 1};
    assert_int_equal(kvr_index_create(&idx, &bad, &err), KVR_EINVAL);
}

static void test_export_import(void **state)
{
    (void)state;
    kvr_index *a = mk(0);
    ev_buf b;
    kvr_err err = {0};
    for (uint32_t d = 0; d < 50; d++)
        assert_int_equal(kvr_index_apply(a, d % 4, stored(&b, d % 20, 0, 10, 100 * (d % 20)), &err),
                         0);
    assert_int_equal(kvr_index_apply(a, 0, stored(&b, 3, 0, 2, 0), &err), 0); /* ext 0 */
    assert_int_equal(kvr_index_set_worker_capacity(a, 2, 777), 0);
    assert_int_equal(kvr_index_set_worker_cursor(a, 3, 4242), 0);
    kvr_index_set_stream_seq(a, 99);
    kvr_index_image img;
    assert_int_equal(kvr_index_export(a, &img, &err), 0);
    kvr_index *c = mk(0);
    assert_int_equal(kvr_index_apply(c, 9, stored(&b, 1, 0, 3, 0), &err), 0);
    assert_int_equal(kvr_index_import(c, &img, &err), 0);
    assert_true(kvr_index_digest(c) == kvr_index_digest(a));
    kvr_index_stats sa, sc;
    kvr_index_stats_get(a, &sa);
    kvr_index_stats_get(c, &sc);
    assert_int_equal(sa.entries, sc.entries);
    assert_int_equal(sa.blocks, sc.blocks);
    assert_int_equal(sa.ext_hashes, sc.ext_hashes);
    assert_int_equal(sc.workers, 4);
    assert_int_equal(kvr_index_stream_seq(c), 99);
    kvr_index_worker_info wi;
    assert_int_equal(kvr_index_worker(c, 2, &wi), 0);
    assert_int_equal(wi.capacity_blocks, 777);
    assert_int_equal(kvr_index_worker(c, 3, &wi), 0);
    assert_int_equal(wi.last_event_seq, 4242);
    assert_int_equal(kvr_index_worker(c, 9, &wi), KVR_ENOTFOUND);

    /* a tampered image is refused and leaves the index untouched */
    uint64_t before = kvr_index_digest(c);
    img.pairs[1] ^= 1;
    assert_int_equal(kvr_index_import(c, &img, &err), KVR_ECORRUPT);
    img.pairs[1] ^= 1;
    img.workers[0].n_pairs += 1;
    assert_int_equal(kvr_index_import(c, &img, &err), KVR_ECORRUPT);
    img.workers[0].n_pairs -= 1;
    img.block_size = BS + 1;
    assert_int_equal(kvr_index_import(c, &img, &err), KVR_EUNSUPPORTED);
    img.block_size = BS;
    assert_true(kvr_index_digest(c) == before);
    kvr_index_stats_get(c, &sc);
    assert_int_equal(sa.bytes, sc.bytes);
    kvr_index_image_free(&img);
    kvr_index_destroy(a);
    kvr_index_destroy(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_store_remove_match),
        cmocka_unit_test(test_parent_chaining),
        cmocka_unit_test(test_unknown_parent_and_block_size),
        cmocka_unit_test(test_duplicates_idempotent),
        cmocka_unit_test(test_alias_and_rewrite),
        cmocka_unit_test(test_zero_values),
        cmocka_unit_test(test_digest_order_independent),
        cmocka_unit_test(test_memory_baseline),
        cmocka_unit_test(test_bound),
        cmocka_unit_test(test_worker_slots),
        cmocka_unit_test(test_export_import),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
