/* Golden vectors of the Raft command codec (sync/cmd.h): the exact bytes every replica appends
 * to its log. A replica decodes the entries other routers wrote (and its own, after a restart),
 * so the encoding may change only with KVR_CMD_VERSION: these vectors pin it. They were
 * produced by the codec as it was before it moved out of fsm.c (issue 11). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cmd.h"

/* The commands the vectors encode. */
static const kvr_route_candidate GOLD_CAND[2] = {{7, 12}, {0x1122334455667788ull, 0}};

static int gold_cmd(int i, kvr_cmd *c)
{
    memset(c, 0, sizeof *c);
    switch (i) {
    case 0: /* ROUTE, choose by cost */
        c->type = KVR_CMD_ROUTE;
        for (int k = 0; k < 16; k++)
            c->u.route.request_id[k] = (uint8_t)(k + 1);
        c->u.route.frontend_id = 42;
        c->u.route.now_ms = 1765000000123ull;
        c->u.route.request_blocks = 300;
        c->u.route.model = kvr_slice_of("llama-3-8b");
        c->u.route.ns = kvr_slice_of("prod");
        c->u.route.candidates = GOLD_CAND;
        c->u.route.n_candidates = 2;
        return 0;
    case 1: /* ROUTE pinned, only the listed candidates */
        gold_cmd(0, c);
        c->u.route.pin_worker = 7;
        c->u.route.only_candidates = true;
        c->u.route.n_candidates = 1;
        return 0;
    case 2:
        c->type = KVR_CMD_PREFILL_DONE;
        memset(c->u.request_id, 0xa5, 16);
        return 0;
    case 3:
        c->type = KVR_CMD_FREE;
        memset(c->u.request_id, 0x5a, 16);
        return 0;
    case 4:
        c->type = KVR_CMD_WORKER_UP;
        c->u.worker = (kvr_worker_info){.id = 9,
                                        .ns = kvr_slice_of("prod"),
                                        .model = kvr_slice_of("llama-3-8b"),
                                        .url = kvr_slice_of("http://10.0.0.9:8000"),
                                        .role = KVR_ROLE_DECODE,
                                        .block_size = 64,
                                        .capacity_blocks = 70000};
        return 0;
    case 5:
        c->type = KVR_CMD_WORKER_DOWN;
        c->u.worker_id = 9;
        return 0;
    case 6:
        c->type = KVR_CMD_FRONTEND_SEEN;
        c->u.frontend.frontend_id = 42;
        c->u.frontend.now_ms = 1765000000456ull;
        return 0;
    case 7:
        c->type = KVR_CMD_FRONTEND_EXPIRE;
        c->u.frontend.frontend_id = 42;
        c->u.frontend.now_ms = 1765000010456ull;
        return 0;
    case 8:
        c->type = KVR_CMD_EXPIRE;
        c->u.before_ms = 1764999400000ull;
        return 0;
    case 9: /* added with scale-to-zero; its vector is python3-msgpack's encoding */
        c->type = KVR_CMD_POOL_SET;
        c->u.pool = (kvr_pool_cmd){.ns = kvr_slice_of("prod"),
                                   .model = kvr_slice_of("llama-3-8b"),
                                   .state = KVR_POOL_WAKING,
                                   .now_ms = 1765000000789ull};
        return 0;
    case 10: /* ROUTE_POLICY; its vector is hand-built with python3 (float32 when exact, as
                kvr_mp_write_double writes) and checked with python3-msgpack */
        c->type = KVR_CMD_ROUTE_POLICY;
        c->u.policy.set_by = 3;
        c->u.policy.cost =
            (kvr_cost_params){.overlap_weight = 1.0, .load_weight = 0.25, .tie_band = 0.01};
        return 0;
    default:
        return -1;
    }
}

static const char *const GOLDEN[] = {
    /* 0 ROUTE */ "019901c4100102030405060708090a0b0c0d0e0f102acf0000019af232b27bcd012caa6c6c616d61"
                  "2d332d3862a470726f64009292070c92cf112233445566778800",
    /* 1 ROUTE */
    "019a01c4100102030405060708090a0b0c0d0e0f102acf0000019af232b27bcd012caa6c6c616d612d332d3862a470"
    "726f64079192070cc3",
    /* 2 PREFILL_DONE */ "019202c410a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5",
    /* 3 FREE */ "019203c4105a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a",
    /* 4 WORKER_UP */
    "01980409a470726f64aa6c6c616d612d332d3862b4687474703a2f2f31302e302e302e393a383030300240ce000111"
    "70",
    /* 5 WORKER_DOWN */ "01920509",
    /* 6 FRONTEND_SEEN */ "0193062acf0000019af232b3c8",
    /* 7 FRONTEND_EXPIRE */ "0193072acf0000019af232dad8",
    /* 8 EXPIRE */ "019208cf0000019af2298a40",
    /* 9 POOL_SET */ "019509a470726f64aa6c6c616d612d332d386202cf0000019af232b515",
    /* 10 ROUTE_POLICY */
    "01980a03ca3f800000ca3e800000ca00000000ca00000000cb3f847ae147ae147bca00000000",
};
#define N_GOLDEN (sizeof GOLDEN / sizeof *GOLDEN)

static size_t unhex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = strlen(hex) / 2;
    assert_true(n <= cap);
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        assert_int_equal(sscanf(hex + 2 * i, "%2x", &v), 1);
        out[i] = (uint8_t)v;
    }
    return n;
}

static void tohex(const uint8_t *p, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++)
        sprintf(out + 2 * i, "%02x", (unsigned)p[i]);
    out[2 * n] = 0;
}

static void test_encode_golden(void **state)
{
    (void)state;
    kvr_cmd c;
    size_t i = 0;
    for (; gold_cmd((int)i, &c) == 0; i++) {
        assert_true(i < N_GOLDEN);
        kvr_buf b;
        kvr_buf_init(&b);
        assert_int_equal(kvr_cmd_encode(&c, &b, NULL), 0);
        char hex[512];
        assert_true(b.len * 2 < sizeof hex);
        tohex((const uint8_t *)b.base, b.len, hex);
        if (strcmp(hex, GOLDEN[i]) != 0)
            fail_msg("command %zu (%s): encoded %s, golden %s", i, kvr_cmd_type_name(c.type), hex,
                     GOLDEN[i]);
        kvr_buf_free(&b);
    }
    assert_int_equal(i, N_GOLDEN);
}

/* Every vector decodes to the command it was made from, and encodes back to the same bytes. */
static void test_decode_golden(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_GOLDEN; i++) {
        uint8_t bytes[256];
        size_t n = unhex(GOLDEN[i], bytes, sizeof bytes);
        kvr_cmd want, got;
        kvr_route_candidate cand[KVR_FSM_MAX_CANDIDATES];
        assert_int_equal(gold_cmd((int)i, &want), 0);
        kvr_err e = {0};
        assert_int_equal(kvr_cmd_decode(bytes, n, &got, cand, &e), 0);
        assert_int_equal(got.type, want.type);
        switch (got.type) {
        case KVR_CMD_ROUTE: {
            const kvr_route_cmd *g = &got.u.route, *w = &want.u.route;
            assert_memory_equal(g->request_id, w->request_id, KVR_REQUEST_ID_LEN);
            assert_true(g->frontend_id == w->frontend_id && g->now_ms == w->now_ms);
            assert_int_equal(g->request_blocks, w->request_blocks);
            assert_true(kvr_slice_eq(g->model, w->model) && kvr_slice_eq(g->ns, w->ns));
            assert_true(g->pin_worker == w->pin_worker);
            assert_int_equal(g->only_candidates, w->only_candidates);
            assert_int_equal(g->n_candidates, w->n_candidates);
            for (uint32_t k = 0; k < g->n_candidates; k++) {
                assert_true(g->candidates[k].worker_id == w->candidates[k].worker_id);
                assert_int_equal(g->candidates[k].overlap, w->candidates[k].overlap);
            }
            break;
        }
        case KVR_CMD_PREFILL_DONE:
        case KVR_CMD_FREE:
            assert_memory_equal(got.u.request_id, want.u.request_id, KVR_REQUEST_ID_LEN);
            assert_ptr_equal(kvr_cmd_request_id(&got), got.u.request_id);
            break;
        case KVR_CMD_WORKER_UP: {
            const kvr_worker_info *g = &got.u.worker, *w = &want.u.worker;
            assert_true(g->id == w->id && g->role == w->role);
            assert_true(kvr_slice_eq(g->ns, w->ns) && kvr_slice_eq(g->model, w->model) &&
                        kvr_slice_eq(g->url, w->url));
            assert_int_equal(g->block_size, w->block_size);
            assert_int_equal(g->capacity_blocks, w->capacity_blocks);
            break;
        }
        case KVR_CMD_WORKER_DOWN:
            assert_true(got.u.worker_id == want.u.worker_id);
            break;
        case KVR_CMD_FRONTEND_SEEN:
        case KVR_CMD_FRONTEND_EXPIRE:
            assert_true(got.u.frontend.frontend_id == want.u.frontend.frontend_id);
            assert_true(got.u.frontend.now_ms == want.u.frontend.now_ms);
            break;
        case KVR_CMD_EXPIRE:
            assert_true(got.u.before_ms == want.u.before_ms);
            break;
        case KVR_CMD_POOL_SET:
            assert_true(kvr_slice_eq(got.u.pool.ns, want.u.pool.ns) &&
                        kvr_slice_eq(got.u.pool.model, want.u.pool.model));
            assert_true(got.u.pool.state == want.u.pool.state &&
                        got.u.pool.now_ms == want.u.pool.now_ms);
            break;
        case KVR_CMD_ROUTE_POLICY:
            assert_true(got.u.policy.set_by == want.u.policy.set_by);
            assert_memory_equal(&got.u.policy.cost, &want.u.policy.cost, sizeof want.u.policy.cost);
            break;
        default:
            fail_msg("vector %zu: unexpected type %d", i, (int)got.type);
        }
        kvr_buf b;
        kvr_buf_init(&b);
        assert_int_equal(kvr_cmd_encode(&got, &b, NULL), 0);
        assert_int_equal(b.len, n);
        assert_memory_equal(b.base, bytes, n);
        kvr_buf_free(&b);
    }
}

/* Another version, nothing, and every strict prefix of a vector are refused (never applied as
 * a shorter command). */
static void test_decode_rejects(void **state)
{
    (void)state;
    kvr_cmd got;
    kvr_route_candidate cand[KVR_FSM_MAX_CANDIDATES];
    kvr_err e = {0};
    assert_int_equal(kvr_cmd_decode("", 0, &got, cand, &e), KVR_ETRUNC);
    for (size_t i = 0; i < N_GOLDEN; i++) {
        uint8_t bytes[256];
        size_t n = unhex(GOLDEN[i], bytes, sizeof bytes);
        for (size_t len = 1; len < n; len++)
            if (kvr_cmd_decode(bytes, len, &got, cand, &e) == 0)
                fail_msg("vector %zu: its %zu-byte prefix (of %zu) decoded", i, len, n);
        bytes[0] = KVR_CMD_VERSION + 1;
        assert_int_equal(kvr_cmd_decode(bytes, n, &got, cand, &e), KVR_EUNSUPPORTED);
    }
}

/* A name with a NUL inside (namespace, model, url) is refused: the FSM keeps names as C
 * strings (a POOL_SET with model "\0" was applied, then its snapshot refused: fuzz_sync). */
static void test_decode_rejects_nul_in_names(void **state)
{
    (void)state;
    static const int vectors[] = {0, 4, 9}; /* ROUTE, WORKER_UP, POOL_SET */
    kvr_route_candidate cand[KVR_FSM_MAX_CANDIDATES];
    for (size_t v = 0; v < sizeof vectors / sizeof vectors[0]; v++) {
        for (int field = 0; field < 3; field++) {
            kvr_cmd c, got;
            assert_int_equal(gold_cmd(vectors[v], &c), 0);
            kvr_slice *name = NULL;
            if (c.type == KVR_CMD_ROUTE)
                name = field == 0 ? &c.u.route.model : field == 1 ? &c.u.route.ns : NULL;
            else if (c.type == KVR_CMD_WORKER_UP)
                name = field == 0   ? &c.u.worker.model
                       : field == 1 ? &c.u.worker.ns
                                    : &c.u.worker.url;
            else
                name = field == 0 ? &c.u.pool.model : field == 1 ? &c.u.pool.ns : NULL;
            if (!name)
                continue;
            *name = (kvr_slice){"ab\0cd", 5};
            kvr_buf b;
            kvr_buf_init(&b);
            assert_int_equal(kvr_cmd_encode(&c, &b, NULL), 0);
            kvr_err e = {0};
            if (kvr_cmd_decode(b.base, b.len, &got, cand, &e) != KVR_EINVAL)
                fail_msg("vector %d field %d: a name with a NUL decoded", vectors[v], field);
            *name = (kvr_slice){"\0", 1};
            kvr_buf_reset(&b);
            assert_int_equal(kvr_cmd_encode(&c, &b, NULL), 0);
            assert_int_equal(kvr_cmd_decode(b.base, b.len, &got, cand, &e), KVR_EINVAL);
            kvr_buf_free(&b);
        }
    }
}

/* The head of every vector names its type; anything else is KVR_CMD_NONE. */
static void test_peek_type(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_GOLDEN; i++) {
        uint8_t bytes[256];
        size_t n = unhex(GOLDEN[i], bytes, sizeof bytes);
        kvr_cmd want;
        assert_int_equal(gold_cmd((int)i, &want), 0);
        assert_int_equal(kvr_cmd_peek_type(bytes, n), want.type);
        assert_int_equal(kvr_cmd_peek_type(bytes, 2), KVR_CMD_NONE);
    }
    const uint8_t not_fixarray[] = {KVR_CMD_VERSION, 0xdc, KVR_CMD_FREE};
    const uint8_t unknown_type[] = {KVR_CMD_VERSION, 0x92, KVR_CMD_TYPE_MAX + 1};
    assert_int_equal(kvr_cmd_peek_type(not_fixarray, 3), KVR_CMD_NONE);
    assert_int_equal(kvr_cmd_peek_type(unknown_type, 3), KVR_CMD_NONE);
    assert_int_equal(kvr_cmd_peek_type("", 0), KVR_CMD_NONE);
}

/* ROUTE's optional 12th field (disaggregation, issue 15): written only when disagg is set,
 * after the 10th and an empty 11th; read back as written; a short array is refused. */
static void test_route_disagg_field(void **state)
{
    (void)state;
    kvr_cmd c = {.type = KVR_CMD_ROUTE};
    kvr_route_cmd *r = &c.u.route;
    memset(r->request_id, 7, KVR_REQUEST_ID_LEN);
    r->now_ms = 5;
    r->request_blocks = 3;
    r->model = kvr_slice_of("m");
    r->ns = kvr_slice_of("ns");
    kvr_buf plain, dg;
    kvr_buf_init(&plain);
    kvr_buf_init(&dg);
    assert_int_equal(kvr_cmd_encode(&c, &plain, NULL), 0);
    r->disagg = true;
    r->tokens = 4000;
    r->block_size = 64;
    r->max_local_prefill = 1000;
    r->max_prefill_queue = 2;
    assert_int_equal(kvr_cmd_encode(&c, &dg, NULL), 0);
    /* the plain encoding is a 9-element array; the disaggregated one adds false, an empty
     * bin and [4000, 64, 1000, 2] */
    assert_int_equal(((uint8_t *)plain.base)[1], 0x99);
    assert_int_equal(((uint8_t *)dg.base)[1], 0x9c);
    const uint8_t tail[] = {0xc2, 0xc4, 0x00, 0x94, 0xcd, 0x0f, 0xa0, 0x40, 0xcd, 0x03, 0xe8, 0x02};
    assert_int_equal(dg.len, plain.len + sizeof tail);
    assert_memory_equal(dg.base + 2, plain.base + 2, plain.len - 2);
    assert_memory_equal(dg.base + plain.len, tail, sizeof tail);
    kvr_cmd got;
    kvr_route_candidate cand[KVR_FSM_MAX_CANDIDATES];
    assert_int_equal(kvr_cmd_decode(dg.base, dg.len, &got, cand, NULL), 0);
    assert_true(got.u.route.disagg && !got.u.route.only_candidates);
    assert_int_equal(got.u.route.n_approx_hashes, 0);
    assert_int_equal(got.u.route.tokens, 4000);
    assert_int_equal(got.u.route.block_size, 64);
    assert_int_equal(got.u.route.max_local_prefill, 1000);
    assert_int_equal(got.u.route.max_prefill_queue, 2);
    assert_int_equal(kvr_cmd_decode(plain.base, plain.len, &got, cand, NULL), 0);
    assert_false(got.u.route.disagg);
    /* [4000, 64, 1000] (3 elements) is refused */
    dg.base[plain.len + 3] = 0x93;
    dg.len--;
    assert_int_not_equal(kvr_cmd_decode(dg.base, dg.len, &got, cand, NULL), 0);
    kvr_buf_free(&plain);
    kvr_buf_free(&dg);
}

/* ROUTE's optional 13th field (the cost's weights, issue 14): written only when has_cost is
 * set, after false, an empty bin and nil (no disaggregation) or the 12th; read back exactly;
 * a short array is refused. */
static void test_route_cost_field(void **state)
{
    (void)state;
    kvr_cmd c = {.type = KVR_CMD_ROUTE};
    kvr_route_cmd *r = &c.u.route;
    memset(r->request_id, 7, KVR_REQUEST_ID_LEN);
    r->now_ms = 5;
    r->request_blocks = 3;
    r->model = kvr_slice_of("m");
    r->ns = kvr_slice_of("ns");
    kvr_buf plain, wc;
    kvr_buf_init(&plain);
    kvr_buf_init(&wc);
    assert_int_equal(kvr_cmd_encode(&c, &plain, NULL), 0);
    r->has_cost = true;
    r->cost = (kvr_cost_params){.overlap_weight = 4,
                                .temperature = 0,
                                .load_weight = 0.5,
                                .queue_weight = 16,
                                .overflow_weight = 1.0 / 3,
                                .tie_band = 0.01};
    assert_int_equal(kvr_cmd_encode(&c, &wc, NULL), 0);
    assert_int_equal(((uint8_t *)wc.base)[1], 0x9d);
    /* false, empty bin, nil, then a 6-array */
    const uint8_t head[] = {0xc2, 0xc4, 0x00, 0xc0, 0x96};
    assert_memory_equal(wc.base + plain.len, head, sizeof head);
    kvr_cmd got;
    kvr_route_candidate cand[KVR_FSM_MAX_CANDIDATES];
    assert_int_equal(kvr_cmd_decode(wc.base, wc.len, &got, cand, NULL), 0);
    assert_true(got.u.route.has_cost && !got.u.route.disagg);
    assert_memory_equal(&got.u.route.cost, &r->cost, sizeof r->cost);
    /* with the 12th field too */
    r->disagg = true;
    r->tokens = 4000;
    r->block_size = 64;
    kvr_buf_reset(&wc);
    assert_int_equal(kvr_cmd_encode(&c, &wc, NULL), 0);
    assert_int_equal(kvr_cmd_decode(wc.base, wc.len, &got, cand, NULL), 0);
    assert_true(got.u.route.has_cost && got.u.route.disagg);
    assert_int_equal(got.u.route.tokens, 4000);
    assert_memory_equal(&got.u.route.cost, &r->cost, sizeof r->cost);
    /* the plain command has none */
    assert_int_equal(kvr_cmd_decode(plain.base, plain.len, &got, cand, NULL), 0);
    assert_false(got.u.route.has_cost);
    /* a 5-element weight array is refused */
    r->disagg = false;
    kvr_buf_reset(&wc);
    assert_int_equal(kvr_cmd_encode(&c, &wc, NULL), 0);
    wc.base[plain.len + 4] = 0x95;
    assert_int_not_equal(kvr_cmd_decode(wc.base, wc.len, &got, cand, NULL), 0);
    kvr_buf_free(&plain);
    kvr_buf_free(&wc);
}

/* ROUTE_POLICY: every weight out of the flags' range is refused by the encoder and the
 * decoder alike (NaN, infinities, negatives, overlap_weight 0), as is a short array or a
 * weight that is no number; integers are numbers too, and later fields are skipped. */
static void test_policy_refusals(void **state)
{
    (void)state;
    kvr_cmd c = {.type = KVR_CMD_ROUTE_POLICY}, got;
    kvr_route_candidate cand[KVR_FSM_MAX_CANDIDATES];
    kvr_buf b;
    kvr_buf_init(&b);
    c.u.policy.set_by = 2;
    c.u.policy.cost = (kvr_cost_params){.overlap_weight = 2, .load_weight = 0.5};
    assert_int_equal(kvr_cmd_encode(&c, &b, NULL), 0);
    assert_int_equal(kvr_cmd_decode(b.base, b.len, &got, cand, NULL), 0);
    assert_int_equal(got.type, KVR_CMD_ROUTE_POLICY);
    assert_memory_equal(&got.u.policy.cost, &c.u.policy.cost, sizeof c.u.policy.cost);
    assert_null(kvr_cmd_request_id(&got));
    assert_string_equal(kvr_cmd_type_name(KVR_CMD_ROUTE_POLICY), "ROUTE_POLICY");

    /* each weight in turn set to each bad value: refused by the encoder (nothing appended) */
    const double bad[] = {NAN, INFINITY, -INFINITY, -1, -1e-300};
    for (int f = 0; f < 6; f++) {
        for (size_t k = 0; k < sizeof bad / sizeof *bad; k++) {
            kvr_cmd x = c;
            double *w[6] = {&x.u.policy.cost.overlap_weight, &x.u.policy.cost.load_weight,
                            &x.u.policy.cost.queue_weight,   &x.u.policy.cost.overflow_weight,
                            &x.u.policy.cost.tie_band,       &x.u.policy.cost.temperature};
            *w[f] = bad[k];
            kvr_buf_reset(&b);
            kvr_err e = {0};
            assert_int_equal(kvr_cmd_encode(&x, &b, &e), KVR_EINVAL);
            assert_int_equal(b.len, 0);
        }
    }
    kvr_cmd z = c;
    z.u.policy.cost.overlap_weight = 0; /* > 0, like --overlap-weight */
    assert_int_equal(kvr_cmd_encode(&z, &b, NULL), KVR_EINVAL);

    /* and by the decoder, from bytes another encoder could write: [10, 1, w...] */
    static const char *const bad_hex[] = {
        "01980a01cb7ff8000000000000ca3f80000000000000", /* overlap NaN (float64) */
        "01980a01ca7f800000ca3f80000000000000",         /* overlap +inf (float32) */
        "01980a0100ca3f80000000000000",                 /* overlap 0 (int) */
        "01980a0101ff00000000",                         /* load -1 (int) */
        "01980a01ca3f80000000000000cbfff0000000000000", /* temperature -inf */
        "01970a010100000000",                           /* 7 elements: one weight short */
        "01980a0101a17800000000",                       /* load is a string */
        "01980a0101c000000000",                         /* load is nil */
        "01980aff010000000000",                         /* set_by negative */
    };
    for (size_t i = 0; i < sizeof bad_hex / sizeof *bad_hex; i++) {
        uint8_t bytes[64];
        size_t n = unhex(bad_hex[i], bytes, sizeof bytes);
        kvr_err e = {0};
        if (kvr_cmd_decode(bytes, n, &got, cand, &e) == 0)
            fail_msg("malformed ROUTE_POLICY %zu (%s) decoded", i, bad_hex[i]);
        assert_int_equal(got.type, KVR_CMD_NONE);
    }
    /* integers are weights; a 9th field (a later revision's) is skipped */
    uint8_t ok[32];
    size_t n = unhex("01990a0702030000000005", ok, sizeof ok);
    assert_int_equal(kvr_cmd_decode(ok, n, &got, cand, NULL), 0);
    assert_true(got.u.policy.set_by == 7);
    assert_true(got.u.policy.cost.overlap_weight == 2 && got.u.policy.cost.load_weight == 3);
    assert_true(got.u.policy.cost.temperature == 0);
    kvr_buf_free(&b);
}

/* What the replicated policy saves: one ROUTE as kvr-routerd writes it (two candidates, no
 * approximate hashes, no disaggregation) with its router's weights and without. The sizes are
 * printed for the record (docs/DESIGN.md section 6). */
static void test_route_size_with_policy(void **state)
{
    (void)state;
    kvr_cmd c;
    assert_int_equal(gold_cmd(0, &c), 0);
    kvr_buf with, without;
    kvr_buf_init(&with);
    kvr_buf_init(&without);
    assert_int_equal(kvr_cmd_encode(&c, &without, NULL), 0);
    /* kvr-routerd's defaults (load_weight 0.25): every weight exact in float32 */
    c.u.route.has_cost = true;
    c.u.route.cost = (kvr_cost_params){.overlap_weight = 1, .load_weight = 0.25};
    assert_int_equal(kvr_cmd_encode(&c, &with, NULL), 0);
    size_t dflt = with.len;
    /* weights that need float64 (a tie band of 0.01, a load weight of 0.1) */
    c.u.route.cost.tie_band = 0.01;
    c.u.route.cost.load_weight = 0.1;
    kvr_buf_reset(&with);
    assert_int_equal(kvr_cmd_encode(&c, &with, NULL), 0);
    print_message("ROUTE bytes: %zu without weights, %zu with the default weights (+%zu), %zu "
                  "with two float64 weights (+%zu)\n",
                  without.len, dflt, dflt - without.len, with.len, with.len - without.len);
    /* false, empty bin, nil, 6-array header, 6 x float32 */
    assert_int_equal(dflt - without.len, 5 + 6 * 5);
    assert_int_equal(with.len - without.len, 5 + 4 * 5 + 2 * 9);
    kvr_buf_free(&with);
    kvr_buf_free(&without);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_golden),
        cmocka_unit_test(test_decode_golden),
        cmocka_unit_test(test_decode_rejects),
        cmocka_unit_test(test_decode_rejects_nul_in_names),
        cmocka_unit_test(test_peek_type),
        cmocka_unit_test(test_route_disagg_field),
        cmocka_unit_test(test_route_cost_field),
        cmocka_unit_test(test_policy_refusals),
        cmocka_unit_test(test_route_size_with_policy),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
