/* kv_event decoder/encoder: golden payloads written by gen_kv_golden.py (python3-msgpack),
 * every truncation, byte mutations, limits, round trips in all four formats.
 *
 * `test_common_kv_event --measure` prints decode throughput instead of running the tests. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>

#include <dirent.h>
#include <math.h>
#include <time.h>

#include "kv_check.h"
#include "kv_event.h"
#include "kvr_hash.h"
#include "kvr_mp.h"
#include "testutil.h"

#ifndef KVR_TEST_DATA_DIR
#error "KVR_TEST_DATA_DIR must be defined"
#endif
#define GOLDEN_DIR KVR_TEST_DATA_DIR "/golden"

static uint64_t rejected_total(const kvr_kv_decoder *d)
{
    uint64_t n = 0;
    for (int i = 0; i < KVR_KV_REJ__COUNT; i++)
        n += d->rejected[i];
    return n;
}

static uint64_t tok_u64(char **p)
{
    char *t = tu_tok(p);
    assert_non_null(t);
    char *end;
    errno = 0;
    unsigned long long v = strtoull(t, &end, 10);
    assert_true(*end == '\0' && errno == 0);
    return v;
}

static void expect_kw(char **p, const char *kw)
{
    char *t = tu_tok(p);
    assert_non_null(t);
    assert_string_equal(t, kw);
}

/* Checks a decoded batch against an .expect "ok" description. */
static void check_expect_ok(const char *name, char *p, const kvr_kv_batch *b)
{
    expect_kw(&p, "ts");
    double ts = strtod(tu_tok(&p), NULL);
    if (!(ts == b->ts))
        fail_msg("%s: ts %a, want %a", name, b->ts, ts);
    expect_kw(&p, "dp_rank");
    char *dp = tu_tok(&p);
    if (strcmp(dp, "none") == 0) {
        assert_false(b->has_dp_rank);
    } else {
        assert_true(b->has_dp_rank);
        assert_int_equal(b->dp_rank, strtoll(dp, NULL, 10));
    }
    expect_kw(&p, "events");
    uint64_t n = tok_u64(&p);
    assert_int_equal(b->n_events, n);
    for (uint32_t i = 0; i < n; i++) {
        const kvr_kv_event *ev = &b->events[i];
        expect_kw(&p, "event");
        char *kind = tu_tok(&p);
        kvr_kv_type want = strcmp(kind, "stored") == 0    ? KVR_KV_STORED
                           : strcmp(kind, "removed") == 0 ? KVR_KV_REMOVED
                                                          : KVR_KV_CLEARED;
        assert_int_equal(ev->type, want);
        if (want == KVR_KV_CLEARED) {
            assert_int_equal(ev->n_hashes, 0);
            assert_int_equal(ev->n_tokens, 0);
            continue;
        }
        expect_kw(&p, "hashes");
        uint64_t nh = tok_u64(&p);
        assert_int_equal(ev->n_hashes, nh);
        for (uint32_t j = 0; j < nh; j++) {
            uint64_t h = tok_u64(&p);
            if (ev->hashes[j] != h)
                fail_msg("%s: event %u hash %u: %llu, want %llu", name, i, j,
                         (unsigned long long)ev->hashes[j], (unsigned long long)h);
        }
        if (want == KVR_KV_REMOVED) {
            assert_int_equal(ev->n_tokens, 0);
            assert_false(ev->has_parent);
            continue;
        }
        expect_kw(&p, "parent");
        char *par = tu_tok(&p);
        if (strcmp(par, "none") == 0) {
            assert_false(ev->has_parent);
        } else {
            assert_true(ev->has_parent);
            assert_true(ev->parent == strtoull(par, NULL, 10));
        }
        expect_kw(&p, "block_size");
        assert_int_equal(ev->block_size, tok_u64(&p));
        expect_kw(&p, "lora");
        char *lora = tu_tok(&p);
        if (strcmp(lora, "none") == 0) {
            assert_false(ev->has_lora_id);
        } else {
            assert_true(ev->has_lora_id);
            assert_int_equal(ev->lora_id, strtoll(lora, NULL, 10));
        }
        expect_kw(&p, "tokens");
        uint64_t nt = tok_u64(&p);
        assert_int_equal(ev->n_tokens, nt);
        for (uint32_t j = 0; j < nt; j++)
            assert_int_equal(ev->tokens[j], tok_u64(&p));
    }
    assert_null(tu_tok(&p));
}

typedef struct golden {
    char name[128];
    char *payload;
    size_t len;
    char *expect;
    bool ok;
} golden;

static golden *g_gold;
static size_t g_ngold;

static int cmp_gold(const void *a, const void *b)
{
    return strcmp(((const golden *)a)->name, ((const golden *)b)->name);
}

static int load_golden(void **state)
{
    DIR *dir = opendir(GOLDEN_DIR);
    if (dir == NULL)
        return -1;
    size_t cap = 0;
    for (struct dirent *de; (de = readdir(dir)) != NULL;) {
        size_t nl = strlen(de->d_name);
        if (nl < 8 || strcmp(de->d_name + nl - 7, ".expect") != 0 || nl - 7 >= 128)
            continue;
        if (g_ngold == cap) {
            cap = cap ? cap * 2 : 64;
            g_gold = realloc(g_gold, cap * sizeof *g_gold);
        }
        golden *g = &g_gold[g_ngold++];
        memset(g, 0, sizeof *g);
        memcpy(g->name, de->d_name, nl - 7);
        char path[512];
        snprintf(path, sizeof path, GOLDEN_DIR "/%s.expect", g->name);
        g->expect = tu_read_file(path, NULL);
        snprintf(path, sizeof path, GOLDEN_DIR "/%s.msgpack", g->name);
        g->payload = tu_read_file(path, &g->len);
        if (g->expect == NULL || g->payload == NULL)
            return -1;
        g->ok = strncmp(g->expect, "ok", 2) == 0;
    }
    closedir(dir);
    qsort(g_gold, g_ngold, sizeof *g_gold, cmp_gold);
    return 0;
}

static int free_golden(void **state)
{
    for (size_t i = 0; i < g_ngold; i++) {
        free(g_gold[i].payload);
        free(g_gold[i].expect);
    }
    free(g_gold);
    return 0;
}

static void test_golden(void **state)
{
    kvr_kv_decoder d;
    kvr_kv_decoder_init(&d, NULL);
    size_t n_ok = 0, n_bad = 0;
    for (size_t i = 0; i < g_ngold; i++) {
        golden *g = &g_gold[i];
        char *exp = strdup(g->expect);
        char *p = exp;
        kvr_kv_batch b;
        kvr_kv_reject reason = KVR_KV_REJ__COUNT;
        kvr_err err = {0};
        uint64_t before = rejected_total(&d), dec_before = d.decoded;
        int rv = kvr_kv_decode(&d, g->payload, g->len, &b, &reason, &err);
        char *kw = tu_tok(&p);
        if (strcmp(kw, "ok") == 0) {
            if (rv != 0)
                fail_msg("%s: rejected (%s): %s", g->name, kvr_kv_reject_name(reason), err.msg);
            assert_int_equal(reason, KVR_KV_REJ_NONE);
            assert_int_equal(d.decoded, dec_before + 1);
            check_expect_ok(g->name, p, &b);
            char why[512];
            if (kvc_roundtrip(&b, &d.limits, why, sizeof why) != 0)
                fail_msg("%s: %s", g->name, why);
            n_ok++;
        } else {
            assert_string_equal(kw, "reject");
            char *want = tu_tok(&p);
            if (rv == 0)
                fail_msg("%s: accepted, want reject %s", g->name, want);
            assert_true(rv < 0);
            if (strcmp(kvr_kv_reject_name(reason), want) != 0)
                fail_msg("%s: reason %s, want %s (%s)", g->name, kvr_kv_reject_name(reason),
                         want, err.msg);
            assert_int_equal(rejected_total(&d), before + 1);
            assert_int_equal(err.code, rv);
            assert_true(strlen(err.msg) > 0);
            assert_int_equal(b.n_events, 0); /* nothing partial */
            assert_null(b.events);
            char *kw2 = tu_tok(&p);
            if (kw2 != NULL) {
                assert_string_equal(kw2, "errcontains");
                char *sub = tu_line(&p);
                if (strstr(err.msg, sub) == NULL)
                    fail_msg("%s: error \"%s\" lacks \"%s\"", g->name, err.msg, sub);
            }
            n_bad++;
        }
        free(exp);
    }
    assert_true(n_ok >= 15);
    assert_true(n_bad >= 40);
    kvr_kv_decoder_free(&d);
}

static void test_every_truncation(void **state)
{
    kvr_kv_decoder d;
    kvr_kv_decoder_init(&d, NULL);
    size_t tried = 0;
    for (size_t i = 0; i < g_ngold; i++) {
        golden *g = &g_gold[i];
        if (!g->ok)
            continue;
        for (size_t n = 0; n < g->len; n++) {
            /* a fresh heap copy of exactly n bytes, so ASan sees any read past the end */
            char *cut = malloc(n ? n : 1);
            memcpy(cut, g->payload, n);
            kvr_kv_batch b;
            kvr_kv_reject reason;
            kvr_err err = {0};
            uint64_t before = rejected_total(&d);
            int rv = kvr_kv_decode(&d, cut, n, &b, &reason, &err);
            if (rv == 0)
                fail_msg("%s: prefix of %zu/%zu bytes accepted", g->name, n, g->len);
            assert_int_equal(rv, KVR_ETRUNC);
            if (reason != KVR_KV_REJ_TRUNCATED)
                fail_msg("%s: prefix %zu: reason %s (%s)", g->name, n,
                         kvr_kv_reject_name(reason), err.msg);
            assert_int_equal(rejected_total(&d), before + 1);
            assert_true(err.msg[0] != '\0');
            free(cut);
            tried++;
        }
    }
    assert_true(tried > 1000);
    kvr_kv_decoder_free(&d);
}

/* Every byte of every valid payload replaced by bytes of other types: never a crash, and
 * each outcome is either a full batch (which must round-trip) or exactly one counted
 * rejection. Run under ASan (make test-asan) this is a small deterministic fuzzer. */
static void test_mutations(void **state)
{
    static const uint8_t subst[] = {0x00, 0x7f, 0x80, 0x90, 0x9f, 0xa0, 0xc0, 0xc1, 0xc2,
                                    0xc4, 0xca, 0xcb, 0xcf, 0xd3, 0xd9, 0xdc, 0xdd, 0xde,
                                    0xdf, 0xe0, 0xff, 0x91};
    kvr_kv_decoder d;
    kvr_kv_limits lim = kvr_kv_limits_default();
    lim.max_events = 64;
    lim.max_hashes = 256;
    lim.max_tokens = 4096;
    kvr_kv_decoder_init(&d, &lim);
    uint64_t accepted = 0, rejected = 0;
    for (size_t i = 0; i < g_ngold; i++) {
        golden *g = &g_gold[i];
        if (!g->ok || g->len > 2048)
            continue;
        char *m = malloc(g->len);
        for (size_t off = 0; off < g->len; off++) {
            for (size_t s = 0; s < sizeof subst; s++) {
                memcpy(m, g->payload, g->len);
                if ((uint8_t)m[off] == subst[s])
                    continue;
                m[off] = (char)subst[s];
                kvr_kv_batch b;
                kvr_kv_reject reason;
                uint64_t before = rejected_total(&d);
                if (kvr_kv_decode(&d, m, g->len, &b, &reason, NULL) == 0) {
                    accepted++;
                    char why[512];
                    if (kvc_roundtrip(&b, &d.limits, why, sizeof why) != 0)
                        fail_msg("%s: byte %zu := %02x: %s", g->name, off, subst[s], why);
                } else {
                    rejected++;
                    assert_int_equal(rejected_total(&d), before + 1);
                    assert_true(reason > KVR_KV_REJ_NONE && reason < KVR_KV_REJ__COUNT);
                }
            }
        }
        free(m);
    }
    assert_true(rejected > 1000);
    assert_true(accepted > 10);
    kvr_kv_decoder_free(&d);
}

static void test_limits(void **state)
{
    kvr_kv_limits lim = kvr_kv_limits_default();
    lim.max_events = 2;
    lim.max_hashes = 3;
    lim.max_tokens = 8;
    lim.max_block_size = 4;
    lim.max_hash_bytes = 16;
    lim.max_payload_bytes = 200;
    kvr_kv_decoder d;
    kvr_kv_decoder_init(&d, &lim);
    kvr_buf buf;
    kvr_buf_init(&buf);
    uint64_t hs[4] = {1, 2, 3, 4};
    uint32_t toks[16] = {0};
    kvr_kv_event ev = {.type = KVR_KV_STORED, .n_hashes = 2, .hashes = hs, .n_tokens = 8,
                       .tokens = toks, .block_size = 4};
    kvr_kv_event evs[3] = {ev, ev, ev};
    kvr_kv_batch b = {.ts = 1, .n_events = 2, .events = evs};
    kvr_kv_batch out;
    kvr_kv_reject reason;
    kvr_err err;

    assert_int_equal(kvr_kv_encode(&buf, &b, KVR_KV_FORMAT_ARRAY, KVR_KV_HASH_INT), 0);
    assert_int_equal(kvr_kv_decode(&d, buf.base, buf.len, &out, &reason, &err), 0);

#define EXPECT_LIMIT(substr)                                                               \
    do {                                                                                   \
        kvr_buf_reset(&buf);                                                               \
        assert_int_equal(kvr_kv_encode(&buf, &b, KVR_KV_FORMAT_ARRAY, KVR_KV_HASH_INT), 0); \
        assert_int_equal(kvr_kv_decode(&d, buf.base, buf.len, &out, &reason, &err),         \
                         KVR_ELIMIT);                                                      \
        assert_int_equal(reason, KVR_KV_REJ_LIMIT);                                        \
        if (strstr(err.msg, substr) == NULL)                                               \
            fail_msg("error \"%s\" lacks \"%s\"", err.msg, substr);                        \
    } while (0)

    b.n_events = 3;
    EXPECT_LIMIT("events: 3 events, limit 2");
    b.n_events = 1;
    evs[0].n_hashes = 4;
    evs[0].block_size = 2;
    EXPECT_LIMIT("block_hashes: 4 hashes, limit 3");
    evs[0].n_hashes = 3;
    evs[0].block_size = 4;
    evs[0].n_tokens = 12;
    EXPECT_LIMIT("token_ids: 12 tokens, limit 8");
    evs[0].n_hashes = 1;
    evs[0].block_size = 8;
    evs[0].n_tokens = 8;
    EXPECT_LIMIT("block_size: 8, limit 4");
    evs[0].block_size = 4;
    evs[0].n_tokens = 4;
    kvr_buf_reset(&buf);
    assert_int_equal(kvr_kv_encode(&buf, &b, KVR_KV_FORMAT_MAP, KVR_KV_HASH_BYTES), 0);
    assert_int_equal(kvr_kv_decode(&d, buf.base, buf.len, &out, &reason, &err), KVR_ELIMIT);
    assert_non_null(strstr(err.msg, "32-byte hash, limit 16"));
    /* payload bound is checked before anything else */
    char big[201] = {0};
    assert_int_equal(kvr_kv_decode(&d, big, sizeof big, &out, &reason, &err), KVR_ELIMIT);
    assert_non_null(strstr(err.msg, "payload of 201 bytes"));
    assert_int_equal(d.rejected[KVR_KV_REJ_LIMIT], 6);
    assert_int_equal(d.decoded, 1);
    kvr_buf_free(&buf);
    kvr_kv_decoder_free(&d);
}

/* Builds a deterministic batch with every feature, in caller-provided storage. */
static void make_batch(kvr_kv_batch *b, kvr_kv_event *evs, uint64_t *hs, uint32_t *toks,
                       uint32_t n_events, uint32_t blocks, uint32_t bs, uint64_t seed)
{
    uint64_t x = seed;
    for (uint32_t i = 0; i < n_events; i++) {
        kvr_kv_event *e = &evs[i];
        memset(e, 0, sizeof *e);
        e->type = i % 7 == 5 ? KVR_KV_REMOVED : i % 11 == 10 ? KVR_KV_CLEARED : KVR_KV_STORED;
        if (e->type == KVR_KV_CLEARED)
            continue;
        e->n_hashes = blocks;
        e->hashes = hs + (size_t)i * blocks;
        for (uint32_t j = 0; j < blocks; j++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            hs[(size_t)i * blocks + j] = j % 3 == 0 ? x : j % 3 == 1 ? x >> 40 : (uint64_t)-(int64_t)(x >> 60) ;
        }
        if (e->type == KVR_KV_REMOVED)
            continue;
        e->has_parent = i % 2 == 1;
        e->parent = x ^ 0x5555;
        e->block_size = bs;
        e->n_tokens = blocks * bs;
        e->tokens = toks + (size_t)i * blocks * bs;
        for (uint32_t j = 0; j < e->n_tokens; j++)
            toks[(size_t)i * blocks * bs + j] = (uint32_t)(x >> 32) + j * 31;
        e->has_lora_id = i % 3 == 2;
        e->lora_id = (int64_t)i - 100;
    }
    memset(b, 0, sizeof *b);
    b->ts = 1700000000.123456;
    b->has_dp_rank = seed % 2 == 0;
    b->dp_rank = (int64_t)seed;
    b->n_events = n_events;
    b->events = evs;
}

static void test_roundtrip_four_formats(void **state)
{
    enum { NE = 40, NB = 5, BS = 16 };
    static kvr_kv_event evs[NE];
    static uint64_t hs[NE * NB];
    static uint32_t toks[NE * NB * BS];
    for (uint64_t seed = 1; seed <= 4; seed++) {
        kvr_kv_batch b;
        make_batch(&b, evs, hs, toks, NE, NB, BS, seed);
        char why[512];
        if (kvc_roundtrip(&b, &(kvr_kv_limits){kvr_kv_limits_default().max_payload_bytes,
                                               65536, 65536, 4u << 20, 4096, 256},
                          why, sizeof why) != 0)
            fail_msg("seed %llu: %s", (unsigned long long)seed, why);
    }
    /* explicit check of what bytes format means: ids are kvr_hash_bytes(expansion) */
    kvr_kv_batch b;
    make_batch(&b, evs, hs, toks, 3, 2, 4, 7);
    kvr_buf buf;
    kvr_buf_init(&buf);
    assert_int_equal(kvr_kv_encode(&buf, &b, KVR_KV_FORMAT_MAP, KVR_KV_HASH_BYTES), 0);
    kvr_kv_decoder d;
    kvr_kv_decoder_init(&d, NULL);
    kvr_kv_batch out;
    assert_int_equal(kvr_kv_decode(&d, buf.base, buf.len, &out, NULL, NULL), 0);
    uint8_t x[32];
    kvr_kv_hash_to_bytes(hs[0], x);
    assert_true(out.events[0].hashes[0] == kvr_hash_bytes(x, 32));
    assert_true(out.events[0].hashes[0] == kvr_kv_hash_bytes_id(hs[0]));
    kvr_buf_free(&buf);
    kvr_kv_decoder_free(&d);
}

static void test_encoder_map_keys_and_omissions(void **state)
{
    uint64_t hs[1] = {9};
    uint32_t t[2] = {1, 2};
    kvr_kv_event ev = {.type = KVR_KV_STORED, .n_hashes = 1, .hashes = hs, .n_tokens = 2,
                       .tokens = t, .block_size = 2};
    kvr_kv_batch b = {.ts = 0.5, .n_events = 1, .events = &ev};
    kvr_buf buf;
    kvr_buf_init(&buf);
    assert_int_equal(kvr_kv_encode(&buf, &b, KVR_KV_FORMAT_MAP, KVR_KV_HASH_INT), 0);
    /* walk it with the cursor: {"ts", "events": [{type, block_hashes, parent_block_hash,
     * token_ids, block_size}]} with no data_parallel_rank and no lora_id */
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, buf.base, buf.len);
    uint32_t n;
    kvr_slice k;
    assert_int_equal(kvr_mp_read_map(&r, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(kvr_mp_read_str(&r, &k), 0);
    assert_true(kvr_slice_eq_cstr(k, "ts"));
    assert_int_equal(kvr_mp_skip(&r), 0);
    assert_int_equal(kvr_mp_read_str(&r, &k), 0);
    assert_true(kvr_slice_eq_cstr(k, "events"));
    assert_int_equal(kvr_mp_read_array(&r, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(kvr_mp_read_map(&r, &n), 0);
    assert_int_equal(n, 5);
    static const char *keys[] = {"type", "block_hashes", "parent_block_hash", "token_ids",
                                 "block_size"};
    for (int i = 0; i < 5; i++) {
        assert_int_equal(kvr_mp_read_str(&r, &k), 0);
        assert_true(kvr_slice_eq_cstr(k, keys[i]));
        if (i == 2)
            assert_int_equal(kvr_mp_read_nil(&r), 0);
        else
            assert_int_equal(kvr_mp_skip(&r), 0);
    }
    assert_int_equal(kvr_mp_remaining(&r), 0);

    /* unknown type: EINVAL, nothing appended */
    size_t len = buf.len;
    ev.type = (kvr_kv_type)9;
    assert_int_equal(kvr_kv_encode(&buf, &b, KVR_KV_FORMAT_ARRAY, KVR_KV_HASH_INT), KVR_EINVAL);
    assert_int_equal(buf.len, len);
    kvr_buf_free(&buf);
}

/* Scratch is reused: a big batch, a failure, a small batch, then the big one again. */
static void test_scratch_reuse(void **state)
{
    enum { NE = 64, NB = 16, BS = 16 };
    static kvr_kv_event evs[NE];
    static uint64_t hs[NE * NB];
    static uint32_t toks[NE * NB * BS];
    kvr_kv_batch big, small;
    kvr_buf bb, sb;
    kvr_buf_init(&bb);
    kvr_buf_init(&sb);
    make_batch(&big, evs, hs, toks, NE, NB, BS, 3);
    assert_int_equal(kvr_kv_encode(&bb, &big, KVR_KV_FORMAT_ARRAY, KVR_KV_HASH_INT), 0);
    make_batch(&small, evs, hs, toks, 2, 1, 4, 5);
    assert_int_equal(kvr_kv_encode(&sb, &small, KVR_KV_FORMAT_MAP, KVR_KV_HASH_BYTES), 0);
    make_batch(&big, evs, hs, toks, NE, NB, BS, 3);
    kvr_kv_decoder d;
    kvr_kv_decoder_init(&d, NULL);
    kvr_kv_batch out;
    assert_int_equal(kvr_kv_decode(&d, bb.base, bb.len, &out, NULL, NULL), 0);
    char why[256];
    assert_int_equal(kvc_batch_equal(&big, &out, KVR_KV_HASH_INT, why, sizeof why), 0);
    assert_int_equal(kvr_kv_decode(&d, bb.base, bb.len - 1, &out, NULL, NULL), KVR_ETRUNC);
    assert_int_equal(out.n_events, 0);
    assert_int_equal(kvr_kv_decode(&d, sb.base, sb.len, &out, NULL, NULL), 0);
    assert_int_equal(out.n_events, 2);
    assert_int_equal(kvr_kv_decode(&d, bb.base, bb.len, &out, NULL, NULL), 0);
    assert_int_equal(kvc_batch_equal(&big, &out, KVR_KV_HASH_INT, why, sizeof why), 0);
    assert_int_equal(d.decoded, 3);
    assert_int_equal(d.rejected[KVR_KV_REJ_TRUNCATED], 1);
    kvr_kv_decoder_free(&d);
    kvr_kv_decoder_free(&d); /* idempotent */
    kvr_buf_free(&bb);
    kvr_buf_free(&sb);
}

static void test_reject_names(void **state)
{
    assert_string_equal(kvr_kv_reject_name(KVR_KV_REJ_NONE), "none");
    assert_string_equal(kvr_kv_reject_name(KVR_KV_REJ_TRUNCATED), "truncated");
    assert_string_equal(kvr_kv_reject_name(KVR_KV_REJ_TRAILING), "trailing");
    assert_non_null(kvr_kv_reject_name((kvr_kv_reject)99));
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Decode throughput of a 64-event x 16-block (block_size 16) batch, each encoding. */
static int measure(void)
{
    enum { NE = 64, NB = 16, BS = 16 };
    static kvr_kv_event evs[NE];
    static uint64_t hs[NE * NB];
    static uint32_t toks[NE * NB * BS];
    kvr_kv_batch b;
    make_batch(&b, evs, hs, toks, NE, NB, BS, 2);
    for (uint32_t i = 0; i < NE; i++) /* all BlockStored with 16 blocks */
        if (evs[i].type != KVR_KV_STORED) {
            evs[i] = evs[0];
        }
    uint64_t blocks = (uint64_t)NE * NB;
    kvr_kv_decoder d;
    kvr_kv_decoder_init(&d, NULL);
    for (int f = 0; f < 2; f++) {
        for (int h = 0; h < 2; h++) {
            kvr_buf buf;
            kvr_buf_init(&buf);
            if (kvr_kv_encode(&buf, &b, (kvr_kv_format)f, (kvr_kv_hash_format)h) != 0)
                return 1;
            kvr_kv_batch out;
            uint64_t iters = 0;
            double t0 = now_s(), t1;
            do {
                for (int k = 0; k < 50; k++)
                    if (kvr_kv_decode(&d, buf.base, buf.len, &out, NULL, NULL) != 0)
                        return 1;
                iters += 50;
                t1 = now_s();
            } while (t1 - t0 < 1.0);
            double secs = t1 - t0;
            printf("kv_event decode %-5s/%-5s payload=%zu B events=%d blocks=%llu: "
                   "%.1f MB/s, %.2f M blocks/s, %.1f us/batch\n",
                   f ? "map" : "array", h ? "bytes" : "int", buf.len, NE,
                   (unsigned long long)blocks, (double)buf.len * iters / secs / 1e6,
                   (double)blocks * iters / secs / 1e6, secs / iters * 1e6);
            kvr_buf_free(&buf);
        }
    }
    kvr_kv_decoder_free(&d);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--measure") == 0)
        return measure();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden),
        cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_mutations),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_roundtrip_four_formats),
        cmocka_unit_test(test_encoder_map_keys_and_omissions),
        cmocka_unit_test(test_scratch_reuse),
        cmocka_unit_test(test_reject_names),
    };
    return cmocka_run_group_tests(tests, load_golden, free_golden);
}
