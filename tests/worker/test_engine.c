/* Engine unit tests on the simulated clock: prefix reuse, LRU eviction, step timing,
 * preemption, cancellation, events. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine.h"
#include "kvr_hash.h"
#ifdef KVR_HAVE_INDEXER
#include "index.h"
#endif

static kvr_engine *mk(uint32_t B, uint32_t cap, uint32_t max_seqs, uint32_t max_batched,
                      double speedup)
{
    kvr_engine_config c;
    kvr_engine_config_default(&c);
    c.block_size = B;
    c.capacity_blocks = cap;
    c.max_num_seqs = max_seqs;
    c.max_batched_tokens = max_batched;
    c.speedup = speedup;
    c.seed = 7;
    kvr_engine *e = NULL;
    kvr_err err = {0};
    assert_int_equal(kvr_engine_new(&c, &e, &err), 0);
    return e;
}

/* Collected stored/removed external hashes of the events taken so far. */
typedef struct evlog {
    uint64_t stored[4096], removed[4096];
    size_t n_stored, n_removed, n_cleared;
} evlog;

static void drain(kvr_engine *e, evlog *l)
{
    kvr_kv_batch b;
    while (kvr_engine_take_events(e, 1u << 20, &b) > 0) {
        for (uint32_t i = 0; i < b.n_events; i++) {
            const kvr_kv_event *ev = &b.events[i];
            if (ev->type == KVR_KV_STORED) {
                assert_int_equal(ev->n_tokens, ev->n_hashes * ev->block_size);
                for (uint32_t j = 0; j < ev->n_hashes; j++)
                    l->stored[l->n_stored++] = ev->hashes[j];
            } else if (ev->type == KVR_KV_REMOVED) {
                for (uint32_t j = 0; j < ev->n_hashes; j++)
                    l->removed[l->n_removed++] = ev->hashes[j];
            } else {
                l->n_cleared++;
            }
        }
    }
}

/* Runs one request alone to completion; returns its cached tokens; checks its output. */
static uint32_t run1(kvr_engine *e, const uint32_t *p, uint32_t n, uint32_t max_tokens, evlog *l)
{
    kvr_engine_seq *s;
    int marker;
    assert_int_equal(kvr_engine_add(e, p, n, max_tokens, &marker, &s, NULL), 0);
    uint32_t want[256], got = 0, cached = UINT32_MAX;
    assert_true(max_tokens <= 256);
    kvr_engine_gen_tokens(7, p, n, want, max_tokens);
    bool done = false;
    for (int steps = 0; !done && steps < 10000; steps++) {
        const kvr_engine_output *o;
        size_t no;
        kvr_engine_step_info info;
        assert_int_equal(kvr_engine_step(e, &info, &o, &no), 0);
        for (size_t i = 0; i < no; i++) {
            assert_ptr_equal(o[i].data, &marker);
            assert_int_equal(o[i].index, got);
            assert_int_equal(o[i].token, want[got]);
            got++;
            cached = o[i].cached_tokens;
            assert_int_equal(o[i].prompt_tokens, n);
            done = o[i].finished;
        }
        if (l)
            drain(e, l);
    }
    assert_true(done);
    assert_int_equal(got, max_tokens);
    return cached;
}

static void fill(uint32_t *p, uint32_t n, uint32_t base)
{
    for (uint32_t i = 0; i < n; i++)
        p[i] = base + i * 7 + 1000;
}

static void test_prefix_reuse(void **st)
{
    (void)st;
    kvr_engine *e = mk(4, 64, 8, 64, 1.0);
    uint32_t a[10], c[10], d[8];
    fill(a, 10, 1);
    assert_int_equal(run1(e, a, 10, 1, NULL), 0);
    /* same prompt: both full blocks hit (at most n-1 = 9 tokens -> 2 blocks) */
    assert_int_equal(run1(e, a, 10, 1, NULL), 8);
    /* shares the first block only */
    memcpy(c, a, sizeof c);
    c[5] = 99999;
    assert_int_equal(run1(e, c, 10, 1, NULL), 4);
    /* exactly the first 8 tokens of a: the last block is recomputed (n-1 rule) */
    memcpy(d, a, sizeof d);
    assert_int_equal(run1(e, d, 8, 1, NULL), 4);
    kvr_engine_stats s;
    kvr_engine_get_stats(e, &s);
    assert_int_equal(s.prompt_tokens_total, 38);
    assert_int_equal(s.cached_tokens_total, 16);
    assert_int_equal(s.running + s.waiting + s.used_blocks, 0);
    kvr_engine_free(e);
}

static void test_generated_blocks_are_cached(void **st)
{
    (void)st;
    kvr_engine *e = mk(4, 64, 8, 64, 1.0);
    uint32_t p[6], gen[5], q[11];
    fill(p, 6, 3);
    evlog l = {0};
    assert_int_equal(run1(e, p, 6, 5, &l), 0);
    /* 6 prompt + 5 generated; the last token never gets KV -> 10 computed -> 2 full blocks,
     * the second holding prompt[4..6) + gen[0..2) */
    assert_int_equal(l.n_stored, 2);
    kvr_engine_gen_tokens(7, p, 6, gen, 5);
    memcpy(q, p, sizeof p);
    memcpy(q + 6, gen, 3 * sizeof(uint32_t));
    q[9] = 5;
    q[10] = 6;
    assert_int_equal(run1(e, q, 11, 1, NULL), 8);
    kvr_engine_free(e);
}

static bool contains(const uint64_t *a, size_t n, uint64_t h)
{
    for (size_t i = 0; i < n; i++)
        if (a[i] == h)
            return true;
    return false;
}

static void test_lru_eviction(void **st)
{
    (void)st;
    /* 6 blocks of 4; prompts of 9 tokens use 3 blocks, 2 of them full */
    kvr_engine *e = mk(4, 6, 8, 64, 1.0);
    uint32_t p1[9], p2[9], p3[9];
    fill(p1, 9, 100);
    fill(p2, 9, 200);
    fill(p3, 9, 300);
    evlog l1 = {0}, l2 = {0}, l3 = {0}, l4 = {0}, l5 = {0};
    assert_int_equal(run1(e, p1, 9, 1, &l1), 0);
    assert_int_equal(run1(e, p2, 9, 1, &l2), 0);
    assert_int_equal(l1.n_stored, 2);
    assert_int_equal(l2.n_stored, 2);
    /* LRU now p1b1, p1b0, p2b1, p2b0; touching p1 moves it behind p2 */
    assert_int_equal(run1(e, p1, 9, 1, &l3), 8);
    assert_int_equal(l3.n_stored + l3.n_removed, 0);
    /* p3 needs 3 blocks: 2 free + the least recently used unreferenced one, p2's tail */
    assert_int_equal(run1(e, p3, 9, 1, &l4), 0);
    assert_int_equal(l4.n_removed, 1);
    assert_int_equal(l4.removed[0], l2.stored[1]);
    assert_int_equal(l4.n_stored, 2);
    /* p2's head is still cached; p1 entirely */
    assert_int_equal(run1(e, p2, 9, 1, &l5), 4);
    /* p2 recomputes block 1 (needs one block: evicts the LRU head, p2b0? no: p2b0 is now
     * referenced; the head is p1b1) */
    assert_int_equal(l5.n_removed, 1);
    assert_int_equal(l5.removed[0], l1.stored[1]);
    assert_true(contains(l5.stored, l5.n_stored, l2.stored[1]));
    kvr_engine_stats s;
    kvr_engine_get_stats(e, &s);
    assert_int_equal(s.cached_blocks, 5);
    assert_int_equal(s.removed_blocks_total, 2);
    assert_int_equal(s.used_blocks, 0);
    kvr_engine_free(e);
}

static int64_t prefill_ns(double T, double speedup)
{
    return (int64_t)((4.21e-7 * T * T + 0.01518 * T + 16.5) * 1e6 / speedup + 0.5);
}
static int64_t decode_ns(double u, double speedup)
{
    return (int64_t)((-5.47 * u * u + 43.88 * u + 19.44) * 1e6 / speedup + 0.5);
}

static void test_step_timing(void **st)
{
    (void)st;
    /* 1000-token prompt, chunks of 512, block 64, 100 blocks, speedup 2 */
    kvr_engine *e = mk(64, 100, 8, 512, 2.0);
    uint32_t p[1000];
    fill(p, 1000, 9);
    kvr_engine_seq *s;
    assert_int_equal(kvr_engine_add(e, p, 1000, 3, NULL, &s, NULL), 0);
    kvr_engine_step_info in;
    const kvr_engine_output *o;
    size_t no;
    int64_t t0 = kvr_engine_now_ns(e);
    assert_int_equal(kvr_engine_step(e, &in, &o, &no), 0);
    assert_int_equal(in.prefill_tokens, 512);
    assert_int_equal(in.decode_seqs, 0);
    assert_int_equal(in.dur_ns, prefill_ns(512, 2.0));
    assert_int_equal(no, 0);
    assert_int_equal(kvr_engine_step(e, &in, &o, &no), 0);
    assert_int_equal(in.prefill_tokens, 488);
    assert_int_equal(in.dur_ns, prefill_ns(488, 2.0));
    assert_int_equal(no, 1); /* first token after the last chunk */
    assert_int_equal(kvr_engine_step(e, &in, &o, &no), 0);
    assert_int_equal(in.prefill_tokens, 0);
    assert_int_equal(in.decode_seqs, 1);
    /* 1001 tokens computed -> 16 blocks of 100 referenced */
    assert_true(in.kv_util > 0.1599 && in.kv_util < 0.1601);
    assert_int_equal(in.dur_ns, decode_ns(0.16, 2.0));
    assert_int_equal(kvr_engine_step(e, &in, &o, &no), 0);
    assert_int_equal(no, 1);
    assert_true(o[0].finished);
    assert_int_equal(kvr_engine_now_ns(e) - t0, prefill_ns(512, 2.0) + prefill_ns(488, 2.0) +
                                                   decode_ns(0.16, 2.0) + decode_ns(0.16, 2.0));
    /* idle: nothing happens, the clock can be moved */
    assert_false(kvr_engine_has_work(e));
    assert_int_equal(kvr_engine_step(e, &in, NULL, NULL), 0);
    assert_int_equal(in.dur_ns, 0);
    kvr_engine_idle_until(e, 5000000000);
    assert_int_equal(kvr_engine_now_ns(e), 5000000000);
    /* a mixed step: a decode and a prefill together cost both */
    kvr_engine_seq *a, *b;
    uint32_t q[100];
    fill(q, 100, 77);
    assert_int_equal(kvr_engine_add(e, q, 100, 5, NULL, &a, NULL), 0);
    assert_int_equal(kvr_engine_step(e, &in, NULL, NULL), 0); /* a's prefill */
    q[0] = 1;
    assert_int_equal(kvr_engine_add(e, q, 100, 5, NULL, &b, NULL), 0);
    assert_int_equal(kvr_engine_step(e, &in, NULL, NULL), 0);
    assert_int_equal(in.decode_seqs, 1);
    assert_int_equal(in.prefill_tokens, 100);
    assert_int_equal(in.dur_ns, prefill_ns(100, 2.0) + decode_ns(in.kv_util, 2.0));
    kvr_engine_free(e);
}

static void test_batching_limits_and_preemption(void **st)
{
    (void)st;
    /* 9 blocks of 4; 3 sequences of 8 prompt + 12 output need 5 blocks each at the end */
    kvr_engine *e = mk(4, 9, 2, 64, 1.0);
    uint32_t p[3][8];
    kvr_engine_seq *s[3];
    int tag[3];
    uint32_t got[3] = {0};
    bool done[3] = {0};
    uint32_t want[3][12];
    for (int i = 0; i < 3; i++) {
        fill(p[i], 8, 1000 * (i + 1));
        kvr_engine_gen_tokens(7, p[i], 8, want[i], 12);
        assert_int_equal(kvr_engine_add(e, p[i], 8, 12, &tag[i], &s[i], NULL), 0);
    }
    uint32_t max_running = 0;
    for (int steps = 0; steps < 1000 && !(done[0] && done[1] && done[2]); steps++) {
        const kvr_engine_output *o;
        size_t no;
        kvr_engine_step_info in;
        assert_int_equal(kvr_engine_step(e, &in, &o, &no), 0);
        kvr_engine_stats stt;
        kvr_engine_get_stats(e, &stt);
        assert_true(stt.used_blocks <= 9);
        if (stt.running > max_running)
            max_running = stt.running;
        for (size_t k = 0; k < no; k++) {
            int i = (int *)o[k].data - tag;
            assert_int_equal(o[k].token, want[i][got[i]]);
            got[i]++;
            if (o[k].finished)
                done[i] = true;
        }
    }
    assert_true(done[0] && done[1] && done[2]);
    assert_int_equal(max_running, 2); /* max-num-seqs */
    kvr_engine_stats stt;
    kvr_engine_get_stats(e, &stt);
    assert_true(stt.preemptions > 0); /* 2 x 5 blocks > 9 */
    assert_int_equal(stt.used_blocks, 0);
    assert_int_equal(stt.finished_total, 3);
    kvr_engine_free(e);
}

static void test_cancel_frees(void **st)
{
    (void)st;
    kvr_engine *e = mk(4, 16, 4, 64, 1.0);
    uint32_t p[9];
    fill(p, 9, 5);
    kvr_engine_seq *a, *b;
    assert_int_equal(kvr_engine_add(e, p, 9, 20, NULL, &a, NULL), 0);
    p[0] = 4;
    assert_int_equal(kvr_engine_add(e, p, 9, 20, NULL, &b, NULL), 0);
    kvr_engine_step_info in;
    assert_int_equal(kvr_engine_step(e, &in, NULL, NULL), 0);
    assert_int_equal(kvr_engine_step(e, &in, NULL, NULL), 0);
    kvr_engine_stats s;
    kvr_engine_get_stats(e, &s);
    assert_int_equal(s.running, 2);
    assert_int_equal(s.used_blocks, 6);
    kvr_engine_cancel(e, a);
    kvr_engine_get_stats(e, &s);
    assert_int_equal(s.running, 1);
    assert_int_equal(s.used_blocks, 3);
    kvr_engine_cancel(e, b);
    kvr_engine_get_stats(e, &s);
    assert_int_equal(s.used_blocks, 0);
    assert_int_equal(s.cached_blocks, 4); /* freed, still reusable */
    assert_false(kvr_engine_has_work(e));
    /* bad input */
    kvr_engine_seq *x;
    kvr_err err = {0};
    assert_int_equal(kvr_engine_add(e, p, 9, 0, NULL, &x, &err), KVR_EINVAL);
    assert_int_equal(kvr_engine_add(e, p, 0, 1, NULL, &x, &err), KVR_EINVAL);
    assert_int_equal(kvr_engine_add(e, p, 9, 100, NULL, &x, &err), KVR_ELIMIT); /* > 16 blocks */
    kvr_engine_free(e);
}

/* Rebuild the cache from events the way a router does (ext -> seq map, chained from the
 * parent's seq) and compare with the engine's cache. */
typedef struct map {
    uint64_t ext[8192], seq[8192];
    size_t n;
} map;
static int map_find(const map *m, uint64_t ext)
{
    for (size_t i = 0; i < m->n; i++)
        if (m->ext[i] == ext)
            return (int)i;
    return -1;
}
static void apply(map *m, const kvr_kv_batch *b)
{
    for (uint32_t i = 0; i < b->n_events; i++) {
        const kvr_kv_event *ev = &b->events[i];
        if (ev->type == KVR_KV_CLEARED) {
            m->n = 0;
        } else if (ev->type == KVR_KV_REMOVED) {
            for (uint32_t j = 0; j < ev->n_hashes; j++) {
                int k = map_find(m, ev->hashes[j]);
                assert_true(k >= 0);
                m->ext[k] = m->ext[m->n - 1];
                m->seq[k] = m->seq[m->n - 1];
                m->n--;
            }
        } else {
            uint64_t seqs[1024];
            uint64_t parent = 0;
            if (ev->has_parent) {
                int k = map_find(m, ev->parent);
                assert_true(k >= 0);
                parent = m->seq[k];
            }
            size_t n = kvr_hash_seq(ev->tokens, ev->n_tokens, ev->block_size, ev->has_parent,
                                    parent, seqs, 1024);
            assert_int_equal(n, ev->n_hashes);
            for (uint32_t j = 0; j < ev->n_hashes; j++) {
                assert_true(map_find(m, ev->hashes[j]) < 0);
                m->ext[m->n] = ev->hashes[j];
                m->seq[m->n++] = seqs[j];
            }
        }
    }
}
static void check_block(void *arg, uint64_t ext, uint64_t seq, bool hp, uint64_t pe, uint32_t r)
{
    (void)hp;
    (void)pe;
    (void)r;
    map *m = arg;
    int k = map_find(m, ext);
    assert_true(k >= 0);
    assert_int_equal(m->seq[k], seq);
}

static void test_events_rebuild_cache(void **st)
{
    (void)st;
    kvr_engine *e = mk(4, 40, 4, 32, 1.0);
    map *m = calloc(1, sizeof *m), *m2 = calloc(1, sizeof *m2);
    uint32_t seed = 1;
    for (int round = 0; round < 60; round++) {
        /* prompts drawn from a few shared prefixes, varied tails */
        uint32_t p[40];
        uint32_t n = 5 + (seed = seed * 1103515245 + 12345) % 30;
        uint32_t fam = (seed >> 8) % 3;
        for (uint32_t i = 0; i < n; i++)
            p[i] = i < 12 ? fam * 100 + i : (seed >> 4) + i;
        kvr_engine_seq *s;
        assert_int_equal(kvr_engine_add(e, p, n, 1 + (seed >> 16) % 9, NULL, &s, NULL), 0);
        for (int k = 0; k < 3; k++) {
            assert_int_equal(kvr_engine_step(e, NULL, NULL, NULL), 0);
            kvr_kv_batch b;
            while (kvr_engine_take_events(e, 64, &b) > 0)
                apply(m, &b);
        }
    }
    while (kvr_engine_has_work(e)) {
        assert_int_equal(kvr_engine_step(e, NULL, NULL, NULL), 0);
        kvr_kv_batch b;
        while (kvr_engine_take_events(e, 64, &b) > 0)
            apply(m, &b);
    }
    kvr_engine_stats s;
    kvr_engine_get_stats(e, &s);
    assert_true(s.removed_blocks_total > 0);
    assert_int_equal(m->n, s.cached_blocks);
    kvr_engine_foreach_cached(e, check_block, m);
    /* a consumer that saw nothing rebuilds the same from a resync */
    m2->n = 99;
    assert_int_equal(kvr_engine_queue_resync(e), 0);
    kvr_kv_batch b;
    while (kvr_engine_take_events(e, 64, &b) > 0)
        apply(m2, &b);
    assert_int_equal(m2->n, s.cached_blocks);
    kvr_engine_foreach_cached(e, check_block, m2);
    free(m);
    free(m2);
    kvr_engine_free(e);
}

#ifdef KVR_HAVE_INDEXER
/* The engine's events, encoded in each wire form, decoded with the project's codec and
 * applied to the project's indexer, rebuild exactly the engine's cache: the index digest
 * equals the digest of (worker, seq) over the engine's cached blocks. */
typedef struct dig {
    uint64_t worker, sum, n;
} dig;
static void dig_block(void *arg, uint64_t ext, uint64_t seq, bool hp, uint64_t pe, uint32_t r)
{
    (void)ext;
    (void)hp;
    (void)pe;
    (void)r;
    dig *d = arg;
    d->sum += kvr_index_pair_mix(d->worker, seq);
    d->n++;
}

static void pump(kvr_engine *e, kvr_index *idx, kvr_kv_decoder *dec, kvr_kv_format f,
                 kvr_kv_hash_format hf)
{
    kvr_kv_batch b;
    while (kvr_engine_take_events(e, 50, &b) > 0) {
        kvr_buf wire;
        kvr_buf_init(&wire);
        assert_int_equal(kvr_kv_encode(&wire, &b, f, hf), 0);
        kvr_kv_batch got;
        kvr_err err = {0};
        assert_int_equal(kvr_kv_decode(dec, wire.base, wire.len, &got, NULL, &err), 0);
        assert_int_equal(got.n_events, b.n_events);
        assert_int_equal(kvr_index_apply_batch(idx, 42, got.events, got.n_events, &err), 0);
        kvr_buf_free(&wire);
    }
}

static void test_events_rebuild_indexer(void **st)
{
    (void)st;
    for (int form = 0; form < 4; form++) {
        kvr_kv_format f = form & 1 ? KVR_KV_FORMAT_MAP : KVR_KV_FORMAT_ARRAY;
        kvr_kv_hash_format hf = form & 2 ? KVR_KV_HASH_BYTES : KVR_KV_HASH_INT;
        kvr_engine *e = mk(4, 48, 4, 32, 1.0);
        kvr_index *idx;
        kvr_index_opts io = {.block_size = 4};
        assert_int_equal(kvr_index_create(&idx, &io, NULL), 0);
        kvr_kv_decoder dec;
        kvr_kv_decoder_init(&dec, NULL);
        uint32_t seed = 11 + form;
        for (int round = 0; round < 80; round++) {
            uint32_t p[48];
            uint32_t n = 3 + (seed = seed * 1103515245 + 12345) % 40;
            uint32_t fam = (seed >> 8) % 4;
            for (uint32_t i = 0; i < n; i++)
                p[i] = i < 16 ? fam * 1000 + i : (seed >> 4) + i;
            kvr_engine_seq *s;
            assert_int_equal(kvr_engine_add(e, p, n, 1 + (seed >> 16) % 7, NULL, &s, NULL), 0);
            if (round % 7 == 3) { /* a cancelled request in the middle of its prefill */
                assert_int_equal(kvr_engine_step(e, NULL, NULL, NULL), 0);
                kvr_engine_cancel(e, s);
            }
            for (int k = 0; k < 2; k++) {
                assert_int_equal(kvr_engine_step(e, NULL, NULL, NULL), 0);
                pump(e, idx, &dec, f, hf);
            }
        }
        while (kvr_engine_has_work(e)) {
            assert_int_equal(kvr_engine_step(e, NULL, NULL, NULL), 0);
            pump(e, idx, &dec, f, hf);
        }
        kvr_engine_stats es;
        kvr_engine_get_stats(e, &es);
        assert_true(es.removed_blocks_total > 10);
        dig d = {.worker = 42};
        kvr_engine_foreach_cached(e, dig_block, &d);
        kvr_index_stats is;
        kvr_index_stats_get(idx, &is);
        assert_int_equal(is.entries, d.n);
        assert_int_equal(is.dropped_unknown_parent, 0);
        assert_int_equal(kvr_index_digest(idx), d.sum);
        /* a resync (AllBlocksCleared + the cache) leaves the same index */
        assert_int_equal(kvr_engine_queue_resync(e), 0);
        pump(e, idx, &dec, f, hf);
        assert_int_equal(kvr_index_digest(idx), d.sum);
        kvr_kv_decoder_free(&dec);
        kvr_index_destroy(idx);
        kvr_engine_free(e);
    }
}
#endif

static void test_long_chain_events_are_bounded(void **st)
{
    (void)st;
    /* 40000 tokens in blocks of 16: one prefill chunk of 8192 stores 512 blocks per step;
     * a resync re-sends the whole 2500-block chain; no event may exceed the bound and the
     * chain must still rebuild from the events */
    kvr_engine *e = mk(16, 4096, 4, 8192, 1.0);
    uint32_t *p = malloc(40000 * sizeof *p);
    fill(p, 40000, 3);
    kvr_engine_seq *s;
    assert_int_equal(kvr_engine_add(e, p, 40000, 1, NULL, &s, NULL), 0);
    map *m = calloc(1, sizeof *m);
    for (int round = 0; round < 2; round++) {
        while (kvr_engine_has_work(e))
            assert_int_equal(kvr_engine_step(e, NULL, NULL, NULL), 0);
        if (round == 1)
            assert_int_equal(kvr_engine_queue_resync(e), 0);
        kvr_kv_batch b;
        size_t events = 0;
        while (kvr_engine_take_events(e, 65536, &b) > 0) {
            for (uint32_t i = 0; i < b.n_events; i++)
                assert_true(b.events[i].n_tokens <= KVR_ENGINE_EVENT_MAX_TOKENS);
            events += b.n_events;
            apply(m, &b);
        }
        assert_true(events >= 2500 * 16 / KVR_ENGINE_EVENT_MAX_TOKENS);
        assert_int_equal(m->n, 2500); /* every full block of the prompt was computed */
    }
    kvr_engine_foreach_cached(e, check_block, m);
    free(m);
    free(p);
    kvr_engine_free(e);
}

/* LoRA: the same prompt under an adapter and under the base model shares no block (ext and
 * seq hashes apart); the adapter's own repeat hits; its BlockStored events name it, and the
 * seq hashes are kvroute's under the adapter's seed (what the router's index computes). */
typedef struct lora_seen {
    uint64_t seqs[64];
    size_t n;
} lora_seen;

static void lora_block(void *arg, uint64_t ext, uint64_t seq, bool hp, uint64_t pe, uint32_t r)
{
    (void)ext, (void)hp, (void)pe, (void)r;
    lora_seen *ls = arg;
    if (ls->n < 64)
        ls->seqs[ls->n++] = seq;
}

static void test_lora_blocks_apart(void **st)
{
    (void)st;
    static const char *const names[] = {"sql-lora", "chat-lora"};
    kvr_engine_config c;
    kvr_engine_config_default(&c);
    c.block_size = 4;
    c.capacity_blocks = 64;
    c.seed = 7;
    c.loras = names;
    c.n_loras = 2;
    kvr_engine *e = NULL;
    assert_int_equal(kvr_engine_new(&c, &e, NULL), 0);
    uint32_t a[9];
    fill(a, 9, 5);
    /* base model first, then the same prompt under sql-lora: no hit */
    assert_int_equal(run1(e, a, 9, 1, NULL), 0);
    kvr_engine_seq *s;
    assert_int_equal(kvr_engine_add_lora(e, a, 9, 1, 1, NULL, &s, NULL), 0);
    uint32_t cached = UINT32_MAX;
    bool saw_lora_event = false;
    while (kvr_engine_has_work(e)) {
        const kvr_engine_output *o;
        size_t no;
        kvr_engine_step_info info;
        assert_int_equal(kvr_engine_step(e, &info, &o, &no), 0);
        for (size_t i = 0; i < no; i++)
            if (o[i].index == 0)
                cached = o[i].cached_tokens;
        kvr_kv_batch b;
        while (kvr_engine_take_events(e, 1u << 20, &b) > 0)
            for (uint32_t i = 0; i < b.n_events; i++)
                if (b.events[i].type == KVR_KV_STORED && b.events[i].lora_name.len) {
                    assert_true(kvr_slice_eq_cstr(b.events[i].lora_name, "sql-lora"));
                    assert_false(b.events[i].has_parent); /* its own root */
                    saw_lora_event = true;
                }
    }
    assert_int_equal(cached, 0);
    assert_true(saw_lora_event);
    /* the adapter's repeat hits its own blocks (2 full blocks of the 8 reusable tokens) */
    assert_int_equal(kvr_engine_add_lora(e, a, 9, 1, 1, NULL, &s, NULL), 0);
    cached = UINT32_MAX;
    while (kvr_engine_has_work(e)) {
        const kvr_engine_output *o;
        size_t no;
        kvr_engine_step_info info;
        assert_int_equal(kvr_engine_step(e, &info, &o, &no), 0);
        for (size_t i = 0; i < no; i++)
            if (o[i].index == 0)
                cached = o[i].cached_tokens;
    }
    assert_int_equal(cached, 8);
    /* the cache holds both families' seq hashes: base and the adapter's seeded ones */
    uint64_t base[2], lora[2];
    kvr_hash_seq(a, 8, 4, false, 0, base, 2);
    kvr_hash_seq_seeded(a, 8, 4, false, 0, kvr_hash_lora_seed("sql-lora", 8), lora, 2);
    assert_true(base[0] != lora[0] && base[1] != lora[1]);
    lora_seen ls = {0};
    kvr_engine_foreach_cached(e, lora_block, &ls);
    for (int k = 0; k < 2; k++) {
        assert_true(contains(ls.seqs, ls.n, base[k]));
        assert_true(contains(ls.seqs, ls.n, lora[k]));
    }
    /* an unknown adapter index is refused */
    assert_int_equal(kvr_engine_add_lora(e, a, 9, 1, 3, NULL, &s, NULL), KVR_EINVAL);
    kvr_engine_free(e);
}

/* Disaggregation (issue 15): a prefill engine holds a finished prompt's full blocks against
 * eviction; a decode engine imports the same prompt's blocks (BlockStored, the same ext hashes)
 * and its request then hits them, computing only the tail. */
static void test_hold_and_import(void **st)
{
    (void)st;
    kvr_engine *p = mk(4, 8, 8, 64, 1.0), *d = mk(4, 64, 8, 64, 1.0);
    uint32_t a[14], b[16], blocks[8];
    fill(a, 14, 1);
    fill(b, 16, 500);
    evlog *lp = calloc(1, sizeof *lp), *ld = calloc(1, sizeof *ld);
    assert_int_equal(run1(p, a, 14, 1, lp), 0);
    uint64_t ext[3];
    kvr_engine_prompt_ext(p, a, 14, 0, 3, ext);
    assert_int_equal(kvr_engine_cached_blocks(p, a, 14, 0), 3);
    /* hold: 3 full blocks referenced, out of the free and evictable pools until unhold */
    assert_int_equal(kvr_engine_hold_prompt(p, a, 14, 0, 8, false, blocks), 3);
    for (int i = 0; i < 3; i++)
        assert_int_equal(kvr_engine_block_ext(p, blocks[i]), ext[i]);
    kvr_engine_stats s;
    kvr_engine_get_stats(p, &s);
    assert_int_equal(s.used_blocks, 3);
    assert_int_equal(s.free_blocks, 5); /* held: neither free nor evictable */
    run1(p, b, 16, 1, lp);
    assert_int_equal(kvr_engine_cached_blocks(p, a, 14, 0), 3);
    for (size_t i = 0; i < lp->n_removed; i++)
        assert_false(contains(ext, 3, lp->removed[i]));
    kvr_engine_unhold(p, blocks, 3);
    kvr_engine_get_stats(p, &s);
    assert_int_equal(s.used_blocks, 0);
    assert_int_equal(s.free_blocks, 8);
    /* import on the decoder: the same ext hashes are announced, referenced until unhold */
    uint32_t imp[8];
    assert_int_equal(kvr_engine_hold_prompt(d, a, 14, 0, 3, false, imp), 0); /* not cached */
    assert_int_equal(kvr_engine_hold_prompt(d, a, 14, 0, 3, true, imp), 3);
    drain(d, ld);
    assert_int_equal(ld->n_stored, 3);
    for (int i = 0; i < 3; i++)
        assert_int_equal(ld->stored[i], ext[i]);
    /* the request computes only the tail: 12 of 14 tokens hit (at most n-1 = 13 -> 3 blocks) */
    assert_int_equal(run1(d, a, 14, 2, ld), 12);
    kvr_engine_unhold(d, imp, 3);
    kvr_engine_get_stats(d, &s);
    assert_int_equal(s.used_blocks + s.running + s.waiting, 0);
    assert_int_equal(s.cached_blocks, 3); /* the imported ones (15 computed tokens: no 4th) */
    /* a second import of a cached prefix takes references only: no new BlockStored */
    size_t before = ld->n_stored;
    assert_int_equal(kvr_engine_hold_prompt(d, a, 14, 0, 3, true, imp), 3);
    drain(d, ld);
    assert_int_equal(ld->n_stored, before);
    kvr_engine_unhold(d, imp, 3);
    free(lp);
    free(ld);
    kvr_engine_free(p);
    kvr_engine_free(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prefix_reuse),
        cmocka_unit_test(test_lora_blocks_apart),
        cmocka_unit_test(test_generated_blocks_are_cached),
        cmocka_unit_test(test_lru_eviction),
        cmocka_unit_test(test_step_timing),
        cmocka_unit_test(test_batching_limits_and_preemption),
        cmocka_unit_test(test_cancel_frees),
        cmocka_unit_test(test_hold_and_import),
        cmocka_unit_test(test_events_rebuild_cache),
        cmocka_unit_test(test_long_chain_events_are_bounded),
#ifdef KVR_HAVE_INDEXER
        cmocka_unit_test(test_events_rebuild_indexer),
#endif
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
