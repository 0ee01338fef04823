#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cmd.h"
#include "fsm.h"
#include "kvr_mp.h"
#include <xxhash.h>
#include "sync_test_util.h"

static char urls[64][64];

static void add_workers(kvr_fsm *f, int n)
{
    for (int i = 1; i <= n; i++) {
        kvr_cmd c = tu_worker_up((uint64_t)i, "m", "ns", urls[i], sizeof urls[i]);
        kvr_fsm_result r;
        kvr_fsm_apply(f, &c, &r);
        assert_int_equal(r.outcome, KVR_OUT_OK);
    }
}

/* Applies cmd through its encoding (the path the Raft log takes). */
static void apply_enc(kvr_fsm *f, const kvr_cmd *c, kvr_fsm_result *r)
{
    kvr_buf b;
    kvr_buf_init(&b);
    assert_int_equal(kvr_cmd_encode(c, &b, NULL), 0);
    kvr_fsm_apply_bytes(f, b.base, b.len, r);
    kvr_buf_free(&b);
}

static void test_route_books_least_cost(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_workers(f, 3);
    kvr_route_candidate cand[] = {{2, 5}};
    kvr_cmd c = tu_route(1, 7, 1000, 8, cand, 1);
    kvr_fsm_result r;
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(r.worker_id, 2);
    assert_int_equal(r.overlap, 5);
    assert_string_equal(r.url, "http://127.0.0.1:9002");
    kvr_fsm_worker_view v;
    assert_int_equal(kvr_fsm_worker_get(f, 2, &v), 0);
    assert_int_equal(v.active_blocks, 8);
    assert_int_equal(v.active_prefill_blocks, 3);
    /* next request with no overlap avoids the loaded worker 2 */
    kvr_cmd c2 = tu_route(2, 7, 1001, 8, NULL, 0);
    apply_enc(f, &c2, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_true(r.worker_id == 1 || r.worker_id == 3);
    /* other model: no worker */
    kvr_cmd c3 = tu_route(3, 7, 1002, 8, NULL, 0);
    c3.u.route.model = kvr_slice_of("other");
    apply_enc(f, &c3, &r);
    assert_int_equal(r.outcome, KVR_OUT_NO_WORKER);
    assert_int_equal(kvr_fsm_booking_count(f), 2);
    kvr_fsm_free(f);
}


/* The FSM hands each worker's booking count and registry capacity to the cost (issue 14's
 * queue and overflow terms): with either weight the choice changes, on every replica alike. */
static void test_route_queue_and_capacity_terms(void **state)
{
    (void)state;
    kvr_fsm_options o = {0};
    o.cost = kvr_cost_params_default();
    o.cost.queue_weight = 100;
    kvr_fsm *f = kvr_fsm_new(&o);
    kvr_fsm *plain = kvr_fsm_new(NULL);
    add_workers(f, 2);
    add_workers(plain, 2);
    kvr_fsm_result r;
    /* worker 1: three 1-block requests; worker 2: one 3-block request (pinned) */
    for (uint64_t i = 0; i < 4; i++) {
        kvr_cmd c = tu_route(100 + i, 7, 1000, i < 3 ? 1 : 3, NULL, 0);
        c.u.route.pin_worker = i < 3 ? 1 : 2;
        apply_enc(f, &c, &r);
        assert_int_equal(r.worker_id, c.u.route.pin_worker);
        apply_enc(plain, &c, &r);
    }
    /* equal blocks: the plain cost lets the hash pick, the queue weight always worker 2 */
    int plain_w1 = 0;
    for (uint64_t i = 0; i < 40; i++) {
        kvr_cmd c = tu_route(200 + i, 7, 1001, 4, NULL, 0);
        apply_enc(plain, &c, &r);
        plain_w1 += r.worker_id == 1;
        kvr_cmd fr = tu_req(KVR_CMD_FREE, 200 + i);
        apply_enc(plain, &fr, &r);
        apply_enc(f, &c, &r);
        assert_int_equal(r.worker_id, 2);
        apply_enc(f, &fr, &r);
    }
    assert_true(plain_w1 > 0);
    kvr_fsm_free(f);
    kvr_fsm_free(plain);

    /* capacity: worker 1 (10 blocks, 8 booked) is less loaded than worker 2 (1000 blocks,
     * 9 booked), but a 6-block request would overflow it */
    o.cost = kvr_cost_params_default();
    o.cost.overflow_weight = 10;
    f = kvr_fsm_new(&o);
    plain = kvr_fsm_new(NULL);
    for (uint64_t id = 1; id <= 2; id++) {
        kvr_cmd c = tu_worker_up(id, "m", "ns", urls[id], sizeof urls[id]);
        c.u.worker.capacity_blocks = id == 1 ? 10 : 1000;
        apply_enc(f, &c, &r);
        apply_enc(plain, &c, &r);
    }
    for (uint64_t id = 1; id <= 2; id++) {
        kvr_cmd c = tu_route(300 + id, 7, 1000, id == 1 ? 8 : 9, NULL, 0);
        c.u.route.pin_worker = id;
        apply_enc(f, &c, &r);
        apply_enc(plain, &c, &r);
    }
    kvr_cmd c = tu_route(400, 7, 1001, 6, NULL, 0);
    apply_enc(plain, &c, &r);
    assert_int_equal(r.worker_id, 1);
    apply_enc(f, &c, &r);
    assert_int_equal(r.worker_id, 2);
    kvr_fsm_free(f);
    kvr_fsm_free(plain);
}


/* A ROUTE carrying weights (cmd.h has_cost) is decided with them, not with the FSM's options:
 * a replica started with other flags books the same worker. */
static void test_route_command_weights(void **state)
{
    (void)state;
    kvr_fsm_options o = {0};
    o.cost = kvr_cost_params_default();
    o.cost.load_weight = 100;
    kvr_fsm *a = kvr_fsm_new(NULL), *b = kvr_fsm_new(&o);
    add_workers(a, 2);
    add_workers(b, 2);
    kvr_fsm_result ra, rb;
    /* worker 1 holds 8 active blocks (pinned), none left to prefill */
    kvr_cmd p = tu_route(1, 7, 1000, 8, NULL, 0);
    p.u.route.pin_worker = 1;
    apply_enc(a, &p, &ra);
    apply_enc(b, &p, &rb);
    kvr_cmd pd = tu_req(KVR_CMD_PREFILL_DONE, 1); /* its prefill is done: decode load only */
    apply_enc(a, &pd, &ra);
    apply_enc(b, &pd, &rb);
    /* worker 1 caches 6 of 8 blocks: weights (1, load 1) pick it (2+8+2 = 12 < 8+0+8 = 16);
     * load weight 100 (b's options) would not */
    kvr_route_candidate cand[] = {{1, 6}};
    kvr_cmd c = tu_route(2, 7, 1001, 8, cand, 1);
    c.u.route.has_cost = true;
    c.u.route.cost = kvr_cost_params_default();
    apply_enc(a, &c, &ra);
    apply_enc(b, &c, &rb);
    assert_int_equal(ra.worker_id, 1);
    assert_int_equal(rb.worker_id, 1);
    assert_true(kvr_fsm_digest(a) == kvr_fsm_digest(b));
    /* without weights in the command b's options decide */
    kvr_cmd d = tu_route(3, 7, 1002, 8, cand, 1);
    apply_enc(b, &d, &rb);
    assert_int_equal(rb.worker_id, 2);
    kvr_fsm_free(a);
    kvr_fsm_free(b);
}

static void test_idempotent(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_workers(f, 4);
    kvr_cmd c = tu_route(42, 1, 5, 10, NULL, 0);
    kvr_fsm_result r1, r2;
    apply_enc(f, &c, &r1);
    assert_int_equal(r1.outcome, KVR_OUT_OK);
    uint64_t d = kvr_fsm_digest(f);
    /* re-applied with other candidates: same booking, nothing changes */
    kvr_route_candidate cand[] = {{4, 10}};
    c.u.route.candidates = cand;
    c.u.route.n_candidates = 1;
    apply_enc(f, &c, &r2);
    assert_int_equal(r2.outcome, KVR_OUT_DUPLICATE);
    assert_int_equal(r2.worker_id, r1.worker_id);
    assert_string_equal(r2.url, r1.url);
    assert_true(kvr_fsm_digest(f) == d);
    assert_int_equal(kvr_fsm_booking_count(f), 1);
    /* PREFILL_DONE then FREE; a second FREE is unknown and harmless */
    kvr_cmd p = tu_req(KVR_CMD_PREFILL_DONE, 42);
    apply_enc(f, &p, &r2);
    assert_int_equal(r2.outcome, KVR_OUT_OK);
    kvr_fsm_worker_view v;
    kvr_fsm_worker_get(f, r1.worker_id, &v);
    assert_int_equal(v.active_prefill_blocks, 0);
    assert_int_equal(v.active_blocks, 10);
    kvr_cmd fr = tu_req(KVR_CMD_FREE, 42);
    apply_enc(f, &fr, &r2);
    assert_int_equal(r2.outcome, KVR_OUT_OK);
    assert_int_equal(r2.freed, 1);
    apply_enc(f, &fr, &r2);
    assert_int_equal(r2.outcome, KVR_OUT_UNKNOWN);
    kvr_fsm_worker_get(f, r1.worker_id, &v);
    assert_int_equal(v.active_blocks, 0);
    assert_int_equal(kvr_fsm_booking_count(f), 0);
    kvr_fsm_free(f);
}

/* A random command sequence, applied to two FSMs (one directly, one through encode/decode and
 * with a snapshot/restore half-way), must give equal digests; the digest changes with state. */
static void run_random(kvr_fsm *f, unsigned seed, int n, int snap_at)
{
    srand(seed);
    for (int i = 0; i < n; i++) {
        if (i == snap_at) {
            kvr_buf b;
            kvr_buf_init(&b);
            assert_int_equal(kvr_fsm_snapshot(f, &b, NULL), 0);
            kvr_fsm *g = kvr_fsm_new(NULL);
            assert_int_equal(kvr_fsm_restore(g, b.base, b.len, NULL), 0);
            assert_true(kvr_fsm_digest(g) == kvr_fsm_digest(f));
            assert_int_equal(kvr_fsm_restore(f, b.base, b.len, NULL), 0);
            kvr_fsm_free(g);
            kvr_buf_free(&b);
        }
        int k = rand() % 100;
        kvr_cmd c;
        kvr_route_candidate cand[3];
        kvr_fsm_result r;
        uint64_t req = (uint64_t)(rand() % 300);
        if (k < 55) {
            for (int j = 0; j < 3; j++)
                cand[j] = (kvr_route_candidate){(uint64_t)(rand() % 8 + 1), (uint32_t)(rand() % 20)};
            c = tu_route(req, (uint64_t)(rand() % 4), (uint64_t)i, (uint32_t)(rand() % 20 + 1), cand, 3);
        } else if (k < 70) {
            c = tu_req(KVR_CMD_PREFILL_DONE, req);
        } else if (k < 88) {
            c = tu_req(KVR_CMD_FREE, req);
        } else if (k < 91) {
            c = (kvr_cmd){.type = KVR_CMD_WORKER_DOWN, .u.worker_id = (uint64_t)(rand() % 8 + 1)};
        } else if (k < 94) {
            uint64_t id = (uint64_t)(rand() % 8 + 1);
            c = tu_worker_up(id, "m", "ns", urls[id], sizeof urls[id]);
        } else if (k < 97) {
            c = (kvr_cmd){.type = KVR_CMD_FRONTEND_SEEN};
            c.u.frontend.frontend_id = (uint64_t)(rand() % 4);
            c.u.frontend.now_ms = (uint64_t)i;
        } else if (k < 99) {
            c = (kvr_cmd){.type = KVR_CMD_FRONTEND_EXPIRE};
            c.u.frontend.frontend_id = (uint64_t)(rand() % 4);
        } else {
            c = (kvr_cmd){.type = KVR_CMD_EXPIRE, .u.before_ms = (uint64_t)(i > 50 ? i - 50 : 0)};
        }
        if (i % 2)
            kvr_fsm_apply(f, &c, &r);
        else
            apply_enc(f, &c, &r);
        assert_true(r.outcome != KVR_OUT_INVALID && r.outcome != KVR_OUT_FULL);
    }
}

static int check_load(const kvr_fsm_booking_view *b, void *data)
{
    uint64_t *sum = data;
    sum[b->worker_id] += b->blocks;
    sum[16 + b->worker_id] += b->prefill_blocks;
    return 0;
}

static void test_determinism(void **state)
{
    (void)state;
    for (unsigned seed = 1; seed <= 5; seed++) {
        kvr_fsm *a = kvr_fsm_new(NULL), *b = kvr_fsm_new(NULL);
        add_workers(a, 8);
        add_workers(b, 8);
        uint64_t d0 = kvr_fsm_digest(a);
        run_random(a, seed, 3000, -1);
        run_random(b, seed, 3000, 1234);
        assert_true(kvr_fsm_digest(a) == kvr_fsm_digest(b));
        assert_true(kvr_fsm_digest(a) != d0);
        assert_int_equal(kvr_fsm_booking_count(a), kvr_fsm_booking_count(b));
        /* derived loads equal the sum of live bookings */
        uint64_t sum[32] = {0};
        kvr_fsm_foreach_booking(a, check_load, sum);
        for (uint32_t i = 0; i < kvr_fsm_worker_count(a); i++) {
            kvr_fsm_worker_view v;
            kvr_fsm_worker_at(a, i, &v);
            assert_int_equal(v.active_blocks, sum[v.id]);
            assert_int_equal(v.active_prefill_blocks, sum[16 + v.id]);
        }
        kvr_fsm *c = kvr_fsm_clone(a);
        assert_non_null(c);
        assert_true(kvr_fsm_digest(c) == kvr_fsm_digest(a));
        kvr_fsm_free(a);
        kvr_fsm_free(b);
        kvr_fsm_free(c);
    }
}

static void test_expiry_and_leases(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_workers(f, 2);
    kvr_fsm_result r;
    for (uint64_t i = 0; i < 100; i++) {
        kvr_cmd c = tu_route(i, i % 2 ? 11 : 22, 1000 + i, 4, NULL, 0);
        apply_enc(f, &c, &r);
        assert_int_equal(r.outcome, KVR_OUT_OK);
    }
    kvr_cmd s = {.type = KVR_CMD_FRONTEND_SEEN};
    s.u.frontend.frontend_id = 11;
    s.u.frontend.now_ms = 5000;
    apply_enc(f, &s, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    uint64_t seen = 0;
    assert_int_equal(kvr_fsm_frontend_last_seen(f, 11, &seen), 0);
    assert_int_equal(seen, 5000);
    /* EXPIRE frees bookings older than before_ms: 1000..1019 */
    kvr_cmd e = {.type = KVR_CMD_EXPIRE, .u.before_ms = 1020};
    apply_enc(f, &e, &r);
    assert_int_equal(r.freed, 20);
    assert_int_equal(kvr_fsm_booking_count(f), 80);
    /* FRONTEND_EXPIRE frees all of frontend 11's (odd ids 21..99 = 40) and drops its lease */
    kvr_cmd x = {.type = KVR_CMD_FRONTEND_EXPIRE};
    x.u.frontend.frontend_id = 11;
    apply_enc(f, &x, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(r.freed, 40);
    assert_int_equal(kvr_fsm_booking_count(f), 40);
    assert_int_equal(kvr_fsm_frontend_last_seen(f, 11, &seen), KVR_ENOTFOUND);
    kvr_fsm_booking_view bv;
    uint8_t rid[16];
    tu_rid(rid, 98);
    assert_int_equal(kvr_fsm_booking_get(f, rid, &bv), 0);
    tu_rid(rid, 99);
    assert_int_equal(kvr_fsm_booking_get(f, rid, &bv), KVR_ENOTFOUND);
    /* WORKER_DOWN frees its bookings and takes it out of the candidates */
    kvr_cmd d = {.type = KVR_CMD_WORKER_DOWN, .u.worker_id = 1};
    apply_enc(f, &d, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    kvr_fsm_worker_view v;
    kvr_fsm_worker_get(f, 1, &v);
    assert_false(v.up);
    assert_int_equal(v.active_blocks, 0);
    assert_int_equal(kvr_fsm_booking_count(f), 40 - r.freed);
    for (uint64_t i = 500; i < 520; i++) {
        kvr_cmd c = tu_route(i, 22, 9000, 4, (kvr_route_candidate[]){{1, 4}}, 1);
        apply_enc(f, &c, &r);
        assert_int_equal(r.worker_id, 2);
    }
    kvr_fsm_free(f);
}

static void test_full(void **state)
{
    (void)state;
    kvr_fsm_options o = {.max_bookings = 10};
    kvr_fsm *f = kvr_fsm_new(&o);
    add_workers(f, 1);
    kvr_fsm_result r;
    for (uint64_t i = 0; i < 12; i++) {
        kvr_cmd c = tu_route(i, 1, 1, 1, NULL, 0);
        kvr_fsm_apply(f, &c, &r);
        assert_int_equal(r.outcome, i < 10 ? KVR_OUT_OK : KVR_OUT_FULL);
    }
    /* a duplicate of a live booking still answers when full */
    kvr_cmd c = tu_route(3, 1, 1, 1, NULL, 0);
    kvr_fsm_apply(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_DUPLICATE);
    kvr_fsm_free(f);
}

static void test_malformed(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_workers(f, 2);
    uint64_t d = kvr_fsm_digest(f);
    kvr_fsm_result r;
    /* valid command, then every truncation and single-byte corruption */
    kvr_route_candidate cand[] = {{1, 3}, {2, 1}};
    kvr_cmd c = tu_route(9, 1, 1, 4, cand, 2);
    kvr_buf b;
    kvr_buf_init(&b);
    assert_int_equal(kvr_cmd_encode(&c, &b, NULL), 0);
    for (size_t n = 0; n < b.len; n++) {
        kvr_fsm_apply_bytes(f, b.base, n, &r);
        assert_int_equal(r.outcome, KVR_OUT_INVALID);
    }
    assert_true(kvr_fsm_digest(f) == d);
    char *m = malloc(b.len);
    for (size_t i = 0; i < b.len; i++) {
        for (int x = 1; x < 256; x += 37) {
            memcpy(m, b.base, b.len);
            m[i] ^= (char)x;
            kvr_fsm_apply_bytes(f, m, b.len, &r); /* must not crash; any outcome */
            if (r.outcome == KVR_OUT_OK) {
                kvr_cmd fr = {.type = KVR_CMD_FREE};
                kvr_cmd dc;
                kvr_route_candidate cc[KVR_FSM_MAX_CANDIDATES];
                assert_int_equal(kvr_cmd_decode(m, b.len, &dc, cc, NULL), 0);
                memcpy(fr.u.request_id, dc.u.route.request_id, 16);
                kvr_fsm_apply(f, &fr, &r);
            }
        }
    }
    free(m);
    /* Booked-then-freed requests are gone, their load with them; their FREEs left finished
     * records (and maybe moved the clock), so the digest is compared from here on. */
    assert_int_equal(kvr_fsm_booking_count(f), 0);
    for (uint64_t w = 1; w <= 2; w++) {
        kvr_fsm_worker_view v;
        assert_int_equal(kvr_fsm_worker_get(f, w, &v), 0);
        assert_int_equal(v.active_blocks, 0);
        assert_int_equal(v.active_prefill_blocks, 0);
    }
    d = kvr_fsm_digest(f);
    /* wrong version byte */
    b.base[0] = 9;
    kvr_err e;
    kvr_cmd dc;
    kvr_route_candidate cc[KVR_FSM_MAX_CANDIDATES];
    assert_int_equal(kvr_cmd_decode(b.base, b.len, &dc, cc, &e), KVR_EUNSUPPORTED);
    kvr_buf_free(&b);
    /* hostile header: array32 claiming 100 M candidates */
    const uint8_t bad[] = {1, 0x99, 1, 0xc4, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                           1, 1, 1, 0xa1, 'm', 0xa2, 'n', 's', 0, 0xdd, 0x05, 0xf5, 0xe1, 0x00};
    kvr_fsm_apply_bytes(f, bad, sizeof bad, &r);
    assert_int_equal(r.outcome, KVR_OUT_INVALID);
    /* in-memory command with out-of-bounds fields */
    kvr_cmd big = tu_route(77, 1, 1, 1, NULL, KVR_FSM_MAX_CANDIDATES + 1);
    kvr_fsm_apply(f, &big, &r);
    assert_int_equal(r.outcome, KVR_OUT_INVALID);
    kvr_cmd bad_type = {.type = (kvr_cmd_type)99};
    kvr_fsm_apply(f, &bad_type, &r);
    assert_int_equal(r.outcome, KVR_OUT_INVALID);
    assert_true(kvr_fsm_digest(f) == d);
    assert_int_equal(kvr_fsm_booking_count(f), 0);
    kvr_fsm_free(f);
}

static void test_snapshot_corrupt(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_workers(f, 3);
    kvr_fsm_result r;
    for (uint64_t i = 0; i < 50; i++) {
        kvr_cmd c = tu_route(i, 1, i, 3, NULL, 0);
        kvr_fsm_apply(f, &c, &r);
    }
    kvr_buf b;
    kvr_buf_init(&b);
    assert_int_equal(kvr_fsm_snapshot(f, &b, NULL), 0);
    kvr_fsm *g = kvr_fsm_new(NULL);
    add_workers(g, 1);
    uint64_t dg = kvr_fsm_digest(g);
    kvr_err e;
    for (size_t i = 0; i < b.len; i += 7) {
        b.base[i] ^= 0x40;
        assert_true(kvr_fsm_restore(g, b.base, b.len, &e) < 0);
        b.base[i] ^= 0x40;
    }
    assert_true(kvr_fsm_restore(g, b.base, b.len - 1, &e) < 0);
    assert_true(kvr_fsm_digest(g) == dg); /* untouched after failures */
    assert_int_equal(kvr_fsm_restore(g, b.base, b.len, &e), 0);
    assert_true(kvr_fsm_digest(g) == kvr_fsm_digest(f));
    assert_int_equal(kvr_fsm_booking_count(g), 50);
    kvr_buf_free(&b);
    kvr_fsm_free(f);
    kvr_fsm_free(g);
}

static void test_pinned_route_moves(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_workers(f, 3);
    kvr_fsm_result r;
    kvr_route_candidate cand[] = {{1, 6}};
    kvr_cmd c = tu_route(5, 1, 1, 8, cand, 1);
    kvr_fsm_apply(f, &c, &r);
    assert_int_equal(r.worker_id, 1);
    /* pinned re-proposal on another worker moves booking and load */
    c.u.route.pin_worker = 3;
    kvr_fsm_apply(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(r.worker_id, 3);
    kvr_fsm_worker_view v1, v3;
    kvr_fsm_worker_get(f, 1, &v1);
    kvr_fsm_worker_get(f, 3, &v3);
    assert_int_equal(v1.active_blocks, 0);
    assert_int_equal(v3.active_blocks, 8);
    assert_int_equal(v3.active_prefill_blocks, 2);
    /* same pin again: a plain duplicate */
    kvr_fsm_apply(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_DUPLICATE);
    /* a new pinned request books the pinned worker even if another is cheaper */
    kvr_cmd d = tu_route(6, 1, 1, 8, cand, 1);
    d.u.route.pin_worker = 2;
    kvr_fsm_apply(f, &d, &r);
    assert_int_equal(r.worker_id, 2);
    assert_int_equal(kvr_fsm_booking_count(f), 2);
    kvr_fsm_free(f);
}


/* --- finished record --- */

static uint64_t worker_active(const kvr_fsm *f, uint64_t id)
{
    kvr_fsm_worker_view v;
    assert_int_equal(kvr_fsm_worker_get(f, id, &v), 0);
    return v.active_blocks;
}

static uint64_t total_active(const kvr_fsm *f)
{
    uint64_t t = 0;
    kvr_fsm_worker_view v;
    for (uint32_t i = 0; kvr_fsm_worker_at(f, i, &v) == 0; i++)
        t += v.active_blocks + v.active_prefill_blocks;
    return t;
}

static void test_route_after_free(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_workers(f, 3);
    kvr_fsm_result r;
    kvr_cmd c = tu_route(11, 1, 1000, 8, NULL, 0);
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    uint64_t w = r.worker_id;
    kvr_cmd fr = tu_req(KVR_CMD_FREE, 11);
    apply_enc(f, &fr, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_true(kvr_fsm_finished_has(f, c.u.route.request_id));
    assert_int_equal(kvr_fsm_finished_count(f), 1);
    uint64_t d = kvr_fsm_digest(f);
    /* the follower's late retry (same bytes), and one with a later time and other candidates */
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_FINISHED);
    assert_int_equal(r.worker_id, 0);
    assert_string_equal(kvr_outcome_name(r.outcome), "finished");
    assert_true(kvr_fsm_digest(f) == d); /* same time: nothing at all changed */
    kvr_route_candidate cand[] = {{w, 8}};
    kvr_cmd c2 = tu_route(11, 1, 2000, 8, cand, 1);
    apply_enc(f, &c2, &r);
    assert_int_equal(r.outcome, KVR_OUT_FINISHED);
    /* a pinned re-proposal (reconcile) of the finished request books nothing either */
    c2.u.route.pin_worker = w;
    kvr_fsm_apply(f, &c2, &r);
    assert_int_equal(r.outcome, KVR_OUT_FINISHED);
    assert_int_equal(kvr_fsm_booking_count(f), 0);
    assert_int_equal(worker_active(f, w), 0);
    assert_int_equal(total_active(f), 0);
    /* PREFILL_DONE and a second FREE of it: unknown, harmless, recorded once */
    kvr_cmd pd = tu_req(KVR_CMD_PREFILL_DONE, 11);
    apply_enc(f, &pd, &r);
    assert_int_equal(r.outcome, KVR_OUT_UNKNOWN);
    apply_enc(f, &fr, &r);
    assert_int_equal(r.outcome, KVR_OUT_UNKNOWN);
    assert_int_equal(kvr_fsm_finished_count(f), 1);
    /* other requests still book */
    kvr_cmd c3 = tu_route(12, 1, 2001, 8, NULL, 0);
    apply_enc(f, &c3, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    kvr_fsm_free(f);
}

static void test_free_before_route(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_workers(f, 2);
    kvr_fsm_result r;
    /* the FREE overtook its ROUTE (reconcile order, or a frontend freeing after a timeout) */
    kvr_cmd fr = tu_req(KVR_CMD_FREE, 21);
    apply_enc(f, &fr, &r);
    assert_int_equal(r.outcome, KVR_OUT_UNKNOWN);
    assert_int_equal(r.freed, 0);
    assert_int_equal(kvr_fsm_finished_count(f), 1);
    kvr_cmd c = tu_route(21, 1, 500, 6, NULL, 0);
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_FINISHED);
    c.u.route.pin_worker = 2;
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_FINISHED);
    assert_int_equal(kvr_fsm_booking_count(f), 0);
    assert_int_equal(total_active(f), 0);
    kvr_fsm_free(f);
}

static void test_duplicate_while_active(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_workers(f, 4);
    kvr_fsm_result r1, r2;
    kvr_cmd c = tu_route(31, 1, 100, 10, NULL, 0);
    apply_enc(f, &c, &r1);
    assert_int_equal(r1.outcome, KVR_OUT_OK);
    for (int i = 0; i < 3; i++) {
        kvr_cmd again = tu_route(31, 2, 100 + (uint64_t)i, 10, NULL, 0);
        apply_enc(f, &again, &r2);
        assert_int_equal(r2.outcome, KVR_OUT_DUPLICATE);
        assert_int_equal(r2.worker_id, r1.worker_id);
        assert_string_equal(r2.url, r1.url);
    }
    assert_int_equal(kvr_fsm_booking_count(f), 1);
    assert_int_equal(worker_active(f, r1.worker_id), 10);
    assert_int_equal(total_active(f), 10 + 10); /* blocks + prefill blocks (no overlap) */
    assert_int_equal(kvr_fsm_finished_count(f), 0);
    kvr_fsm_free(f);
}

static void test_record_pruned_by_command_time(void **state)
{
    (void)state;
    kvr_fsm_options o = {.finished_ttl_ms = 1000};
    kvr_fsm *f = kvr_fsm_new(&o);
    add_workers(f, 2);
    kvr_fsm_result r;
    kvr_cmd c = tu_route(41, 1, 10000, 4, NULL, 0);
    apply_enc(f, &c, &r);
    kvr_cmd fr = tu_req(KVR_CMD_FREE, 41);
    apply_enc(f, &fr, &r); /* recorded at clock 10000 */
    kvr_cmd fr2 = tu_req(KVR_CMD_FREE, 42);
    kvr_cmd seen = {.type = KVR_CMD_FRONTEND_SEEN};
    seen.u.frontend.frontend_id = 1;
    seen.u.frontend.now_ms = 10500;
    apply_enc(f, &seen, &r);
    apply_enc(f, &fr2, &r); /* recorded at clock 10500 */
    assert_int_equal(kvr_fsm_clock_ms(f), 10500);
    assert_int_equal(kvr_fsm_finished_count(f), 2);
    /* a command carrying an older time does not move the clock back, nor prune */
    kvr_cmd old = tu_route(43, 1, 9000, 4, NULL, 0);
    apply_enc(f, &old, &r);
    assert_int_equal(kvr_fsm_clock_ms(f), 10500);
    assert_int_equal(kvr_fsm_finished_count(f), 2);
    /* EXPIRE's before_ms is a command time too: 10999 keeps both */
    kvr_cmd ex = {.type = KVR_CMD_EXPIRE, .u.before_ms = 10999};
    apply_enc(f, &ex, &r);
    assert_int_equal(kvr_fsm_finished_count(f), 2);
    /* at 11000 the first record (10000 + 1000) is gone: the retry books again */
    kvr_cmd late = tu_route(41, 1, 11000, 4, NULL, 0);
    apply_enc(f, &late, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(kvr_fsm_finished_count(f), 1);
    assert_true(kvr_fsm_finished_has(f, fr2.u.request_id));
    kvr_cmd late2 = tu_route(42, 1, 11000, 4, NULL, 0);
    apply_enc(f, &late2, &r);
    assert_int_equal(r.outcome, KVR_OUT_FINISHED);
    seen.u.frontend.now_ms = 11500;
    apply_enc(f, &seen, &r);
    assert_int_equal(kvr_fsm_finished_count(f), 0);
    assert_int_equal(kvr_fsm_finished_evicted(f), 0);
    /* a command time near the end of the range neither wraps nor empties the record */
    kvr_cmd fr3 = tu_req(KVR_CMD_FREE, 44);
    apply_enc(f, &fr3, &r);
    seen.u.frontend.now_ms = UINT64_MAX - 10;
    apply_enc(f, &seen, &r);
    assert_int_equal(kvr_fsm_finished_count(f), 0); /* 11500 is long gone */
    apply_enc(f, &fr3, &r);
    apply_enc(f, &seen, &r);
    assert_int_equal(kvr_fsm_finished_count(f), 1);
    kvr_cmd late3 = tu_route(44, 1, 5, 4, NULL, 0);
    apply_enc(f, &late3, &r);
    assert_int_equal(r.outcome, KVR_OUT_FINISHED);
    kvr_fsm_free(f);
}

static void test_record_bound(void **state)
{
    (void)state;
    kvr_fsm_options o = {.max_finished = 100};
    kvr_fsm *f = kvr_fsm_new(&o);
    add_workers(f, 2);
    kvr_fsm_result r;
    for (uint64_t i = 0; i < 250; i++) {
        kvr_cmd c = tu_route(1000 + i, 1, 1 + i, 2, NULL, 0);
        apply_enc(f, &c, &r);
        assert_int_equal(r.outcome, KVR_OUT_OK);
        kvr_cmd fr = tu_req(KVR_CMD_FREE, 1000 + i);
        apply_enc(f, &fr, &r);
        assert_int_equal(r.outcome, KVR_OUT_OK);
        assert_true(kvr_fsm_finished_count(f) <= 100);
    }
    /* the newest 100 are remembered, the oldest 150 were dropped early (FIFO) */
    assert_int_equal(kvr_fsm_finished_count(f), 100);
    assert_int_equal(kvr_fsm_finished_evicted(f), 150);
    for (uint64_t i = 0; i < 250; i++) {
        kvr_cmd c = tu_route(1000 + i, 1, 1000, 2, NULL, 0);
        assert_int_equal(kvr_fsm_finished_has(f, c.u.route.request_id), i >= 150);
    }
    /* past the bound a very late ROUTE books again (as without the record) */
    kvr_cmd c = tu_route(1000, 1, 1000, 2, NULL, 0);
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    kvr_cmd c2 = tu_route(1000 + 249, 1, 1000, 2, NULL, 0);
    apply_enc(f, &c2, &r);
    assert_int_equal(r.outcome, KVR_OUT_FINISHED);
    /* the index survives heavy churn: every remembered id is found, no dropped one is */
    for (uint64_t i = 0; i < 5000; i++) {
        kvr_cmd fr = tu_req(KVR_CMD_FREE, 100000 + i);
        apply_enc(f, &fr, &r);
    }
    assert_int_equal(kvr_fsm_finished_count(f), 100);
    for (uint64_t i = 0; i < 5000; i++) {
        kvr_cmd q = tu_req(KVR_CMD_FREE, 100000 + i);
        assert_int_equal(kvr_fsm_finished_has(f, q.u.request_id), i >= 4900);
    }
    kvr_fsm_free(f);
}

static void test_snapshot_with_record(void **state)
{
    (void)state;
    kvr_fsm_options o = {.max_finished = 64, .finished_ttl_ms = 5000};
    kvr_fsm *f = kvr_fsm_new(&o);
    add_workers(f, 3);
    kvr_fsm_result r;
    for (uint64_t i = 0; i < 100; i++) {
        kvr_cmd c = tu_route(i, 1, 100 * i, 3, NULL, 0);
        apply_enc(f, &c, &r);
        if (i % 3) {
            kvr_cmd fr = tu_req(KVR_CMD_FREE, i);
            apply_enc(f, &fr, &r);
        }
    }
    kvr_cmd fr = tu_req(KVR_CMD_FREE, 5000); /* an overtaking FREE */
    apply_enc(f, &fr, &r);
    assert_true(kvr_fsm_finished_count(f) > 0);
    kvr_buf b;
    kvr_buf_init(&b);
    assert_int_equal(kvr_fsm_snapshot(f, &b, NULL), 0);
    assert_int_equal((uint8_t)b.base[4], 5);
    kvr_fsm *g = kvr_fsm_new(&o);
    assert_int_equal(kvr_fsm_restore(g, b.base, b.len, NULL), 0);
    assert_true(kvr_fsm_digest(g) == kvr_fsm_digest(f));
    assert_int_equal(kvr_fsm_finished_count(g), kvr_fsm_finished_count(f));
    assert_int_equal(kvr_fsm_clock_ms(g), kvr_fsm_clock_ms(f));
    /* both go on identically: pruning and refusals after the restore match */
    for (uint64_t i = 0; i < 100; i++) {
        kvr_fsm_result rf, rg;
        kvr_cmd c = tu_route(i, 1, 9900 + 10 * i, 3, NULL, 0);
        apply_enc(f, &c, &rf);
        apply_enc(g, &c, &rg);
        assert_int_equal(rf.outcome, rg.outcome);
        assert_int_equal(rf.worker_id, rg.worker_id);
        assert_true(kvr_fsm_digest(g) == kvr_fsm_digest(f));
    }
    kvr_cmd c5000 = tu_route(5000, 1, 10000, 3, NULL, 0);
    apply_enc(g, &c5000, &r);
    assert_int_equal(r.outcome, KVR_OUT_FINISHED);
    /* a digest differs when only the record differs */
    kvr_fsm *h = kvr_fsm_clone(f);
    assert_non_null(h);
    assert_true(kvr_fsm_digest(h) == kvr_fsm_digest(f));
    kvr_cmd extra = tu_req(KVR_CMD_FREE, 777777);
    apply_enc(h, &extra, &r);
    assert_true(kvr_fsm_digest(h) != kvr_fsm_digest(f));
    kvr_fsm_free(h);
    kvr_fsm_free(g);
    kvr_buf_free(&b);
    kvr_fsm_free(f);
}

/* Builds a version-1 snapshot body by hand (no clock, no record) with one booking. */
static void test_snapshot_v1_loads(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_workers(f, 1);
    kvr_fsm_result r;
    kvr_cmd c = tu_route(61, 1, 1234, 5, NULL, 0);
    apply_enc(f, &c, &r);
    kvr_buf v2;
    kvr_buf_init(&v2);
    assert_int_equal(kvr_fsm_snapshot(f, &v2, NULL), 0);
    /* v5 body = fixarray(8) ... clock uint, fixarray(0), down counter, pools fixarray(0),
     * policy nil; v1 = fixarray(3) without the tail (its workers' 9th field, down_seq 0, is
     * skipped as an unknown extra) */
    assert_int_equal((uint8_t)v2.base[5], 0x98);
    /* tail: clock 1234 (0xcd 0x04 0xd2), empty record 0x90, down counter 0, no pools 0x90, no
     * policy 0xc0, 8 checksum bytes */
    size_t body_end = v2.len - 8;
    assert_int_equal((uint8_t)v2.base[body_end - 1], 0xc0);
    assert_int_equal((uint8_t)v2.base[body_end - 2], 0x90);
    assert_int_equal((uint8_t)v2.base[body_end - 3], 0x00);
    assert_int_equal((uint8_t)v2.base[body_end - 4], 0x90);
    assert_int_equal((uint8_t)v2.base[body_end - 7], 0xcd);
    kvr_buf v1;
    kvr_buf_init(&v1);
    assert_int_equal(kvr_buf_append(&v1, v2.base, body_end - 7), 0);
    v1.base[4] = 1;
    v1.base[5] = (char)0x93;
    uint64_t sum = XXH3_64bits(v1.base, v1.len);
    uint8_t le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (uint8_t)(sum >> (8 * i));
    assert_int_equal(kvr_buf_append(&v1, le, 8), 0);
    kvr_fsm *g = kvr_fsm_new(NULL);
    kvr_err e;
    assert_int_equal(kvr_fsm_restore(g, v1.base, v1.len, &e), 0);
    assert_int_equal(kvr_fsm_booking_count(g), 1);
    assert_int_equal(kvr_fsm_finished_count(g), 0);
    assert_int_equal(kvr_fsm_clock_ms(g), 0);
    assert_int_equal(worker_active(g, 1), 5);
    /* a v1 body labelled 2 is refused (too few sections), and so is version 6 */
    v1.base[4] = 2;
    v1.len -= 8;
    sum = XXH3_64bits(v1.base, v1.len);
    for (int i = 0; i < 8; i++)
        le[i] = (uint8_t)(sum >> (8 * i));
    assert_int_equal(kvr_buf_append(&v1, le, 8), 0);
    uint64_t dg = kvr_fsm_digest(g);
    assert_true(kvr_fsm_restore(g, v1.base, v1.len, &e) < 0);
    v2.base[4] = 6;
    assert_int_equal(kvr_fsm_restore(g, v2.base, v2.len, &e), KVR_EUNSUPPORTED);
    assert_true(kvr_fsm_digest(g) == dg);
    kvr_buf_free(&v1);
    kvr_buf_free(&v2);
    kvr_fsm_free(g);
    kvr_fsm_free(f);
}

/* Replicas that apply the same commands in the same order (each through its own path: direct,
 * encoded, restored from a snapshot midway) agree on every outcome and digest, with late
 * retries, overtaking FREEs and duplicates mixed in. */
static void test_record_digest_across_replicas(void **state)
{
    (void)state;
    kvr_fsm_options o = {.max_finished = 50, .finished_ttl_ms = 300};
    kvr_fsm *a = kvr_fsm_new(&o), *b = kvr_fsm_new(&o), *c = kvr_fsm_new(&o);
    add_workers(a, 4);
    add_workers(b, 4);
    add_workers(c, 4);
    srand(7);
    for (int i = 0; i < 3000; i++) {
        if (i == 1500) {
            kvr_fsm *n = kvr_fsm_clone(c);
            assert_non_null(n);
            kvr_fsm_free(c);
            c = n;
        }
        uint64_t req = (uint64_t)(rand() % 120);
        kvr_cmd cmd;
        int k = rand() % 10;
        if (k < 5)
            cmd = tu_route(req, 1, (uint64_t)i, (uint32_t)(rand() % 9 + 1), NULL, 0);
        else if (k < 9)
            cmd = tu_req(KVR_CMD_FREE, req);
        else
            cmd = tu_req(KVR_CMD_PREFILL_DONE, req);
        kvr_fsm_result ra, rb, rc;
        kvr_fsm_apply(a, &cmd, &ra);
        apply_enc(b, &cmd, &rb);
        apply_enc(c, &cmd, &rc);
        assert_int_equal(ra.outcome, rb.outcome);
        assert_int_equal(ra.outcome, rc.outcome);
        assert_int_equal(ra.worker_id, rc.worker_id);
        /* invariant: a recorded request is never booked */
        if (cmd.type == KVR_CMD_ROUTE && ra.outcome == KVR_OUT_FINISHED)
            assert_int_equal(kvr_fsm_booking_get(a, cmd.u.route.request_id, &(kvr_fsm_booking_view){0}),
                             KVR_ENOTFOUND);
    }
    assert_true(kvr_fsm_digest(a) == kvr_fsm_digest(b));
    assert_true(kvr_fsm_digest(a) == kvr_fsm_digest(c));
    uint64_t sum[32] = {0};
    kvr_fsm_foreach_booking(a, check_load, sum);
    for (uint64_t w = 1; w <= 4; w++)
        assert_int_equal(worker_active(a, w), sum[w]);
    kvr_fsm_free(a);
    kvr_fsm_free(b);
    kvr_fsm_free(c);
}

/* Defect 10 (FSM half): WORKER_DOWN'ed workers' registry slots are reused. 5,000 one-shot
 * workers (up, then down) come and go, far more than KVR_FSM_MAX_WORKERS; a real new worker is
 * still registered and routed to. Replicas that reach the same point through different paths
 * (direct, encoded, restored from a snapshot midway) hold the same registry. */
static void test_worker_slots_reused(void **state)
{
    (void)state;
    kvr_fsm *a = kvr_fsm_new(NULL), *b = kvr_fsm_new(NULL);
    char url[64];
    for (uint64_t i = 0; i < 5000; i++) {
        uint64_t id = 1000000 + i * 7919; /* not in id order of arrival */
        kvr_cmd up = tu_worker_up(id, "m", "ns", url, sizeof url);
        kvr_cmd down = {.type = KVR_CMD_WORKER_DOWN, .u.worker_id = id};
        kvr_fsm_result ra, rb;
        kvr_fsm_apply(a, &up, &ra);
        apply_enc(b, &up, &rb);
        assert_int_equal(ra.outcome, KVR_OUT_OK);
        assert_int_equal(rb.outcome, KVR_OUT_OK);
        kvr_fsm_apply(a, &down, &ra);
        apply_enc(b, &down, &rb);
        assert_int_equal(ra.outcome, KVR_OUT_OK);
        if (i == 2500) {
            kvr_fsm *n = kvr_fsm_clone(b);
            assert_non_null(n);
            kvr_fsm_free(b);
            b = n;
        }
    }
    assert_true(kvr_fsm_worker_count(a) <= KVR_FSM_MAX_WORKERS);
    assert_true(kvr_fsm_digest(a) == kvr_fsm_digest(b));
    /* the oldest down workers went first: the first one-shot worker is gone, the last kept */
    kvr_fsm_worker_view v;
    assert_int_equal(kvr_fsm_worker_get(a, 1000000, &v), KVR_ENOTFOUND);
    assert_int_equal(kvr_fsm_worker_get(a, 1000000 + 4999ull * 7919, &v), 0);
    assert_false(v.up);
    /* a real worker arrives and is routed to */
    kvr_cmd up = tu_worker_up(5, "m", "ns", url, sizeof url);
    kvr_fsm_result r;
    kvr_fsm_apply(a, &up, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    kvr_cmd rt = tu_route(1, 1, 10, 4, NULL, 0);
    kvr_fsm_apply(a, &rt, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(r.worker_id, 5);
    /* a full registry of live workers still refuses a new one (live workers are never evicted) */
    kvr_fsm *c = kvr_fsm_new(NULL);
    for (uint64_t i = 1; i <= KVR_FSM_MAX_WORKERS; i++) {
        kvr_cmd u = tu_worker_up(i, "m", "ns", url, sizeof url);
        kvr_fsm_apply(c, &u, &r);
        assert_int_equal(r.outcome, KVR_OUT_OK);
    }
    up = tu_worker_up(KVR_FSM_MAX_WORKERS + 1, "m", "ns", url, sizeof url);
    kvr_fsm_apply(c, &up, &r);
    assert_int_equal(r.outcome, KVR_OUT_FULL);
    kvr_fsm_free(a);
    kvr_fsm_free(b);
    kvr_fsm_free(c);
}

/* Writes a version-2 snapshot the way the previous code did (workers with 8 fields, 5
 * sections, no down counter): n_workers workers 1..n, all down but worker 1, one booking. */
static void write_v2(kvr_buf *out, uint32_t n_workers)
{
    kvr_buf_append(out, "KVRS", 4);
    uint8_t ver = 2;
    kvr_buf_append(out, &ver, 1);
    kvr_mp_write_array(out, 5);
    kvr_mp_write_array(out, n_workers);
    for (uint32_t i = 1; i <= n_workers; i++) {
        char url[64];
        snprintf(url, sizeof url, "http://127.0.0.1:%u", 9000 + i);
        kvr_mp_write_array(out, 8);
        kvr_mp_write_uint(out, i);
        kvr_mp_write_cstr(out, "ns");
        kvr_mp_write_cstr(out, "m");
        kvr_mp_write_cstr(out, url);
        kvr_mp_write_uint(out, KVR_ROLE_BOTH);
        kvr_mp_write_bool(out, i == 1);
        kvr_mp_write_uint(out, 64);
        kvr_mp_write_uint(out, 16384);
    }
    uint8_t rid[16];
    tu_rid(rid, 42);
    kvr_mp_write_array(out, 1);
    kvr_mp_write_array(out, 7);
    kvr_mp_write_bin(out, rid, 16);
    kvr_mp_write_uint(out, 1);
    kvr_mp_write_uint(out, 1);
    kvr_mp_write_uint(out, 500);
    kvr_mp_write_uint(out, 3);
    kvr_mp_write_uint(out, 3);
    kvr_mp_write_uint(out, 0);
    kvr_mp_write_array(out, 0); /* leases */
    kvr_mp_write_uint(out, 500); /* clock */
    kvr_mp_write_array(out, 0); /* finished record */
    uint64_t sum = XXH3_64bits(out->base, out->len);
    uint8_t le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (uint8_t)(sum >> (8 * i));
    kvr_buf_append(out, le, 8);
}

/* The previous snapshot format (2) still loads; its down workers all count as gone down at
 * the same time, so a full registry reuses the lowest id first, the same on every replica; a
 * snapshot written after that (version 3) carries the order on. */
static void test_snapshot_v2_loads(void **state)
{
    (void)state;
    kvr_buf v2;
    kvr_buf_init(&v2);
    write_v2(&v2, KVR_FSM_MAX_WORKERS);
    kvr_fsm *a = kvr_fsm_new(NULL), *b = kvr_fsm_new(NULL);
    kvr_err e;
    assert_int_equal(kvr_fsm_restore(a, v2.base, v2.len, &e), 0);
    assert_int_equal(kvr_fsm_restore(b, v2.base, v2.len, &e), 0);
    assert_int_equal(kvr_fsm_worker_count(a), KVR_FSM_MAX_WORKERS);
    assert_int_equal(kvr_fsm_booking_count(a), 1);
    assert_int_equal(worker_active(a, 1), 3);
    assert_int_equal(kvr_fsm_clock_ms(a), 500);
    char url[64];
    kvr_fsm_result r;
    /* b goes through a v3 snapshot between the two commands */
    kvr_cmd down = {.type = KVR_CMD_WORKER_DOWN, .u.worker_id = 1};
    kvr_fsm_apply(a, &down, &r);
    apply_enc(b, &down, &r);
    kvr_fsm *b2 = kvr_fsm_clone(b);
    assert_non_null(b2);
    kvr_fsm_free(b);
    b = b2;
    for (uint64_t id = 10001; id <= 10003; id++) {
        kvr_cmd up = tu_worker_up(id, "m", "ns", url, sizeof url);
        kvr_fsm_apply(a, &up, &r);
        assert_int_equal(r.outcome, KVR_OUT_OK);
        apply_enc(b, &up, &r);
        assert_int_equal(r.outcome, KVR_OUT_OK);
    }
    kvr_fsm_worker_view v;
    /* workers 2, 3, 4 (down in the v2 snapshot, lowest ids) made room; worker 1, which went
     * down after the load, is younger in down order and stays */
    for (uint64_t id = 2; id <= 4; id++)
        assert_int_equal(kvr_fsm_worker_get(a, id, &v), KVR_ENOTFOUND);
    assert_int_equal(kvr_fsm_worker_get(a, 1, &v), 0);
    assert_int_equal(kvr_fsm_worker_get(a, 5, &v), 0);
    assert_true(kvr_fsm_digest(a) == kvr_fsm_digest(b));
    kvr_buf v3;
    kvr_buf_init(&v3);
    assert_int_equal(kvr_fsm_snapshot(a, &v3, NULL), 0);
    assert_int_equal((uint8_t)v3.base[4], 5);
    kvr_fsm *c = kvr_fsm_new(NULL);
    assert_int_equal(kvr_fsm_restore(c, v3.base, v3.len, &e), 0);
    assert_true(kvr_fsm_digest(c) == kvr_fsm_digest(a));
    kvr_buf_free(&v2);
    kvr_buf_free(&v3);
    kvr_fsm_free(a);
    kvr_fsm_free(b);
    kvr_fsm_free(c);
}

/* only_candidates: the router restricts a request to the listed workers (those serving its
 * LoRA adapter, or with a matching model card), overlap 0 included; the field survives the
 * codec and an unset flag encodes as the old 9-field ROUTE. */
static void test_only_candidates(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_workers(f, 4);
    /* worker 2 is loaded, so a free choice would avoid it */
    kvr_cmd load = tu_route(100, 1, 10, 50, NULL, 0);
    load.u.route.pin_worker = 2;
    kvr_fsm_result r;
    apply_enc(f, &load, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(r.worker_id, 2);
    kvr_route_candidate cand[] = {{2, 0}, {3, 0}};
    for (int i = 0; i < 8; i++) {
        kvr_cmd c = tu_route(200 + (uint64_t)i, 1, 11, 4, cand, 2);
        c.u.route.only_candidates = true;
        kvr_buf b;
        kvr_buf_init(&b);
        assert_int_equal(kvr_cmd_encode(&c, &b, NULL), 0);
        kvr_cmd d;
        kvr_route_candidate dc[KVR_FSM_MAX_CANDIDATES];
        assert_int_equal(kvr_cmd_decode(b.base, b.len, &d, dc, NULL), 0);
        assert_true(d.u.route.only_candidates);
        kvr_fsm_apply_bytes(f, b.base, b.len, &r);
        kvr_buf_free(&b);
        assert_int_equal(r.outcome, KVR_OUT_OK);
        assert_true(r.worker_id == 2 || r.worker_id == 3);
    }
    /* no listed worker is up (or of the model): no worker, rather than any other */
    kvr_route_candidate none[] = {{9, 3}};
    kvr_cmd c = tu_route(300, 1, 12, 4, none, 1);
    c.u.route.only_candidates = true;
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_NO_WORKER);
    /* unset: the 9-field encoding, decoded as false */
    kvr_cmd u = tu_route(301, 1, 12, 4, none, 1);
    kvr_buf b;
    kvr_buf_init(&b);
    assert_int_equal(kvr_cmd_encode(&u, &b, NULL), 0);
    assert_int_equal((uint8_t)b.base[1], 0x99); /* version byte, then fixarray of 9 */
    kvr_cmd d;
    kvr_route_candidate dc[KVR_FSM_MAX_CANDIDATES];
    assert_int_equal(kvr_cmd_decode(b.base, b.len, &d, dc, NULL), 0);
    assert_false(d.u.route.only_candidates);
    kvr_buf_free(&b);
    kvr_fsm_free(f);
}

static kvr_cmd pool_set(const char *ns, const char *model, kvr_pool_state st, uint64_t now)
{
    kvr_cmd c = {.type = KVR_CMD_POOL_SET};
    c.u.pool = (kvr_pool_cmd){kvr_slice_of(ns), kvr_slice_of(model), st, now};
    return c;
}

/* Scale-to-zero pools: a ROUTE that finds no worker wakes a sleeping pool (once), says so, and
 * the first booked ROUTE makes it awake; REMOVED deletes; snapshot v4 keeps them; replicas
 * that apply the same commands agree. */
static void test_pools(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    kvr_fsm_result r;
    kvr_cmd c = pool_set("ns", "m", KVR_POOL_SLEEPING, 500);
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    c = pool_set("ns", "other", KVR_POOL_AWAKE, 500);
    apply_enc(f, &c, &r);
    assert_int_equal(kvr_fsm_pool_count(f), 2);
    /* a route of a model without a pool changes nothing and is not "waking" */
    kvr_cmd rt = tu_route(1, 7, 1000, 8, NULL, 0);
    rt.u.route.model = kvr_slice_of("nopool");
    apply_enc(f, &rt, &r);
    assert_int_equal(r.outcome, KVR_OUT_NO_WORKER);
    assert_false(r.pool_waking);
    /* the sleeping pool wakes on its first request, once */
    for (int i = 0; i < 3; i++) {
        rt = tu_route((uint8_t)(2 + i), 7, 1000 + (uint64_t)i, 8, NULL, 0);
        apply_enc(f, &rt, &r);
        assert_int_equal(r.outcome, KVR_OUT_NO_WORKER);
        assert_true(r.pool_waking);
    }
    kvr_fsm_pool_view v;
    assert_int_equal(kvr_fsm_pool_get(f, "ns", "m", &v), 0);
    assert_int_equal(v.state, KVR_POOL_WAKING);
    assert_int_equal(v.wakes, 1);
    assert_int_equal(v.state_since_ms, 1000);
    assert_int_equal(v.last_request_ms, 1002);
    /* a snapshot taken now restores the same pools and digest */
    kvr_buf b;
    kvr_buf_init(&b);
    assert_int_equal(kvr_fsm_snapshot(f, &b, NULL), 0);
    kvr_fsm *g = kvr_fsm_new(NULL);
    assert_int_equal(kvr_fsm_restore(g, b.base, b.len, NULL), 0);
    assert_true(kvr_fsm_digest(g) == kvr_fsm_digest(f));
    assert_int_equal(kvr_fsm_pool_count(g), 2);
    assert_int_equal(kvr_fsm_pool_at(g, 0, &v), 0);
    assert_string_equal(v.model, "m"); /* sorted: "m" < "other" */
    assert_int_equal(v.state, KVR_POOL_WAKING);
    /* a worker comes up; the next request books it and the pool is awake, on both */
    add_workers(f, 1);
    add_workers(g, 1);
    rt = tu_route(9, 7, 2000, 8, NULL, 0);
    apply_enc(f, &rt, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_false(r.pool_waking);
    kvr_fsm_apply(g, &rt, &r);
    assert_true(kvr_fsm_digest(g) == kvr_fsm_digest(f));
    assert_int_equal(kvr_fsm_pool_get(f, "ns", "m", &v), 0);
    assert_int_equal(v.state, KVR_POOL_AWAKE);
    assert_int_equal(v.state_since_ms, 2000);
    /* the leader stops it; a request during the stop with its worker still up books and
     * makes it awake again (the stop is cancelled by demand) */
    c = pool_set("ns", "m", KVR_POOL_STOPPING, 3000);
    apply_enc(f, &c, &r);
    rt = tu_route(10, 7, 3001, 8, NULL, 0);
    apply_enc(f, &rt, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(kvr_fsm_pool_get(f, "ns", "m", &v), 0);
    assert_int_equal(v.state, KVR_POOL_AWAKE);
    assert_int_equal(v.wakes, 1);
    /* bad names and states are refused; REMOVED deletes; removing nothing is UNKNOWN */
    c = pool_set("ns", "", KVR_POOL_AWAKE, 3002);
    kvr_fsm_apply(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_INVALID);
    c = pool_set("ns", "m", (kvr_pool_state)9, 3002);
    kvr_fsm_apply(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_INVALID);
    c = pool_set("ns", "other", KVR_POOL_REMOVED, 3003);
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_UNKNOWN);
    assert_int_equal(kvr_fsm_pool_count(f), 1);
    /* a corrupted pool section (unsorted) is refused: swap the two pools' order by hand is
     * hard; instead an unknown state in an otherwise valid snapshot */
    kvr_buf_reset(&b);
    c = pool_set("ns", "zz", KVR_POOL_SLEEPING, 3004);
    apply_enc(f, &c, &r);
    assert_int_equal(kvr_fsm_snapshot(f, &b, NULL), 0);
    kvr_fsm *h = kvr_fsm_new(NULL);
    assert_int_equal(kvr_fsm_restore(h, b.base, b.len, NULL), 0);
    assert_true(kvr_fsm_digest(h) == kvr_fsm_digest(f));
    kvr_fsm_free(h);
    kvr_buf_free(&b);
    kvr_fsm_free(g);
    kvr_fsm_free(f);
}

/* --index approx hooks (fsm.h): a ROUTE carrying hashes calls route_hook with the booked
 * worker, its capacity, the hashes (through the codec) and the FSM clock; a duplicate, a
 * ROUTE without hashes and a refused one do not; WORKER_DOWN calls worker_down_hook. */
typedef struct hook_rec {
    int routes, downs;
    uint64_t worker, clock, down;
    uint32_t n, cap;
    uint64_t h0, hlast;
} hook_rec;
static void rec_route(void *data, uint64_t worker_id, uint32_t cap, const kvr_route_cmd *rc,
                      uint64_t clock_ms)
{
    hook_rec *h = data;
    h->routes++;
    h->worker = worker_id;
    h->cap = cap;
    h->clock = clock_ms;
    h->n = rc->n_approx_hashes;
    h->h0 = kvr_route_cmd_approx_hash(rc, 0);
    h->hlast = kvr_route_cmd_approx_hash(rc, rc->n_approx_hashes - 1);
}
static void rec_down(void *data, uint64_t worker_id)
{
    hook_rec *h = data;
    h->downs++;
    h->down = worker_id;
}

static void test_approx_hooks(void **state)
{
    (void)state;
    hook_rec h = {0};
    kvr_fsm_options o = {.route_hook = rec_route, .worker_down_hook = rec_down, .hook_data = &h};
    kvr_fsm *f = kvr_fsm_new(&o);
    add_workers(f, 2);
    uint8_t wire[8 * 3];
    uint64_t hs[3] = {0x0102030405060708ull, 42, 0xfedcba9876543210ull};
    for (int i = 0; i < 3; i++)
        for (int k = 0; k < 8; k++)
            wire[8 * i + k] = (uint8_t)(hs[i] >> (8 * k));
    kvr_cmd c = tu_route(1, 1, 5000, 3, NULL, 0);
    c.u.route.approx_hashes = wire;
    c.u.route.n_approx_hashes = 3;
    kvr_fsm_result r;
    apply_enc(f, &c, &r); /* through kvr_cmd_encode / decode */
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(h.routes, 1);
    assert_int_equal(h.worker, r.worker_id);
    assert_int_equal(h.clock, 5000);
    assert_int_equal(h.n, 3);
    assert_true(h.h0 == hs[0] && h.hlast == hs[2]);
    apply_enc(f, &c, &r); /* duplicate */
    assert_int_equal(r.outcome, KVR_OUT_DUPLICATE);
    assert_int_equal(h.routes, 1);
    kvr_cmd plain = tu_route(2, 1, 5001, 3, NULL, 0);
    apply_enc(f, &plain, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(h.routes, 1);
    /* over the bound: refused by the encoder and the decoder */
    kvr_cmd big = tu_route(3, 1, 5002, 3, NULL, 0);
    static uint8_t bigwire[8 * (KVR_CMD_MAX_APPROX_HASHES + 1)];
    big.u.route.approx_hashes = bigwire;
    big.u.route.n_approx_hashes = KVR_CMD_MAX_APPROX_HASHES + 1;
    kvr_buf b;
    kvr_buf_init(&b);
    assert_int_equal(kvr_cmd_encode(&big, &b, NULL), KVR_EINVAL);
    big.u.route.n_approx_hashes = KVR_CMD_MAX_APPROX_HASHES;
    assert_int_equal(kvr_cmd_encode(&big, &b, NULL), 0);
    assert_true(b.len <= KVR_CMD_MAX_BYTES);
    kvr_buf_free(&b);
    kvr_cmd d = {.type = KVR_CMD_WORKER_DOWN, .u.worker_id = 2};
    apply_enc(f, &d, &r);
    assert_int_equal(h.downs, 1);
    assert_int_equal(h.down, 2);
    kvr_fsm_free(f);
}

/* Disaggregation (issue 15 item 2): workers 1, 2 prefill; 3, 4 decode. */
static void add_role(kvr_fsm *f, uint64_t id, kvr_worker_role role)
{
    kvr_cmd c = tu_worker_up(id, "m", "ns", urls[id], sizeof urls[id]);
    c.u.worker.role = role;
    kvr_fsm_result r;
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
}

static kvr_cmd disagg_route(uint64_t n, uint32_t tokens, const kvr_route_candidate *cand,
                            uint32_t nc)
{
    kvr_cmd c = tu_route(n, 7, 1000 + n, (tokens + 63) / 64, cand, nc);
    c.u.route.disagg = true;
    c.u.route.tokens = tokens;
    c.u.route.block_size = 64;
    c.u.route.max_local_prefill = 1000;
    c.u.route.max_prefill_queue = 2;
    return c;
}

static void test_disagg_pair(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_role(f, 1, KVR_ROLE_PREFILL);
    add_role(f, 2, KVR_ROLE_PREFILL);
    add_role(f, 3, KVR_ROLE_DECODE);
    add_role(f, 4, KVR_ROLE_DECODE);
    kvr_fsm_result r;
    kvr_fsm_worker_view v;

    /* short prompt: local on a decode worker, nothing on a prefill worker */
    kvr_cmd c = disagg_route(1, 640, NULL, 0);
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(r.path, KVR_DISAGG_LOCAL);
    assert_true(r.worker_id == 3 || r.worker_id == 4);
    assert_int_equal(r.prefill_worker_id, 0);
    assert_int_equal(kvr_fsm_booking_count(f), 1);
    assert_int_equal(kvr_fsm_worker_get(f, r.worker_id, &v), 0);
    assert_int_equal(v.active_prefill_blocks, 10);

    /* long prompt, prefill worker 2 holds 20 of its 32 blocks: remote, prefill on 2 (overlap)
     * and decode on the other decode worker (less loaded) */
    uint64_t first_decode = r.worker_id;
    kvr_route_candidate cand[] = {{2, 20}};
    c = disagg_route(2, 2048, cand, 1);
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(r.path, KVR_DISAGG_REMOTE);
    assert_int_equal(r.prefill_worker_id, 2);
    assert_int_equal(r.prefill_overlap, 20);
    assert_string_equal(r.prefill_url, "http://127.0.0.1:9002");
    assert_true(r.worker_id != first_decode && (r.worker_id == 3 || r.worker_id == 4));
    uint64_t dec2 = r.worker_id;
    assert_int_equal(kvr_fsm_booking_count(f), 3);
    assert_int_equal(kvr_fsm_worker_get(f, 2, &v), 0);
    assert_int_equal(v.bookings, 1);
    assert_int_equal(v.active_blocks, 32);
    assert_int_equal(v.active_prefill_blocks, 12);
    assert_int_equal(kvr_fsm_worker_get(f, dec2, &v), 0);
    assert_int_equal(v.active_prefill_blocks, 0); /* the decoder prefills nothing */
    assert_int_equal(v.active_blocks, 32);

    /* duplicate: the same pair */
    kvr_fsm_result d;
    apply_enc(f, &c, &d);
    assert_int_equal(d.outcome, KVR_OUT_DUPLICATE);
    assert_int_equal(d.path, KVR_DISAGG_REMOTE);
    assert_int_equal(d.prefill_worker_id, 2);
    assert_int_equal(d.worker_id, dec2);

    /* a cached prompt is short enough to stay local: 2048 tokens, 16 blocks cached on 3 */
    kvr_route_candidate cand3[] = {{3, 28}};
    c = disagg_route(3, 2048, cand3, 1);
    apply_enc(f, &c, &r);
    assert_int_equal(r.path, KVR_DISAGG_LOCAL);
    assert_int_equal(r.worker_id, 3);

    /* PREFILL_DONE frees the prefill booking; FREE frees the rest */
    kvr_cmd pd = tu_req(KVR_CMD_PREFILL_DONE, 2);
    apply_enc(f, &pd, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(kvr_fsm_worker_get(f, 2, &v), 0);
    assert_int_equal(v.bookings, 0);
    assert_int_equal(v.active_blocks, 0);
    for (uint64_t n = 1; n <= 3; n++) {
        kvr_cmd fr = tu_req(KVR_CMD_FREE, n);
        apply_enc(f, &fr, &r);
        assert_int_equal(r.outcome, KVR_OUT_OK);
    }
    assert_int_equal(kvr_fsm_booking_count(f), 0);

    /* FREE without PREFILL_DONE frees both bookings */
    c = disagg_route(4, 4096, NULL, 0);
    apply_enc(f, &c, &r);
    assert_int_equal(r.path, KVR_DISAGG_REMOTE);
    assert_int_equal(kvr_fsm_booking_count(f), 2);
    kvr_cmd fr = tu_req(KVR_CMD_FREE, 4);
    apply_enc(f, &fr, &r);
    assert_int_equal(kvr_fsm_booking_count(f), 0);
    for (uint64_t id = 1; id <= 4; id++) {
        assert_int_equal(kvr_fsm_worker_get(f, id, &v), 0);
        assert_int_equal(v.bookings, 0);
        assert_int_equal(v.active_blocks, 0);
        assert_int_equal(v.active_prefill_blocks, 0);
    }
    /* a pair expires like any booking (both have the request's start time) */
    c = disagg_route(5, 4096, NULL, 0);
    apply_enc(f, &c, &r);
    assert_int_equal(r.path, KVR_DISAGG_REMOTE);
    kvr_cmd ex = {.type = KVR_CMD_EXPIRE, .u.before_ms = 1000 + 5 + 1};
    apply_enc(f, &ex, &r);
    assert_int_equal(r.freed, 2);
    assert_int_equal(kvr_fsm_booking_count(f), 0);
    kvr_fsm_free(f);
}

static void test_disagg_conditions(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_role(f, 1, KVR_ROLE_PREFILL);
    add_role(f, 3, KVR_ROLE_DECODE);
    kvr_fsm_result r;
    /* the prefill queue: 2 outstanding prefills on the only prefill worker → local */
    for (uint64_t n = 1; n <= 2; n++) {
        kvr_cmd c = disagg_route(n, 4096, NULL, 0);
        apply_enc(f, &c, &r);
        assert_int_equal(r.path, KVR_DISAGG_REMOTE);
        assert_int_equal(r.prefill_worker_id, 1);
    }
    kvr_cmd c = disagg_route(3, 4096, NULL, 0);
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(r.path, KVR_DISAGG_LOCAL);
    assert_int_equal(r.worker_id, 3);
    /* one prefill done: the queue has room again */
    kvr_cmd pd = tu_req(KVR_CMD_PREFILL_DONE, 1);
    apply_enc(f, &pd, &r);
    c = disagg_route(4, 4096, NULL, 0);
    apply_enc(f, &c, &r);
    assert_int_equal(r.path, KVR_DISAGG_REMOTE);
    /* the threshold is the command's: max_local_prefill 5000 keeps 4096 tokens local */
    c = disagg_route(5, 4096, NULL, 0);
    c.u.route.max_local_prefill = 5000;
    c.u.route.max_prefill_queue = 100;
    apply_enc(f, &c, &r);
    assert_int_equal(r.path, KVR_DISAGG_LOCAL);
    /* the prefill worker goes down: its bookings go, the decode ones stay; no prefill worker
     * left → fallback (aggregated on the decode worker) */
    kvr_cmd down = {.type = KVR_CMD_WORKER_DOWN, .u.worker_id = 1};
    apply_enc(f, &down, &r);
    assert_int_equal(r.freed, 2);
    c = disagg_route(6, 4096, NULL, 0);
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(r.path, KVR_DISAGG_FALLBACK);
    assert_int_equal(r.worker_id, 3);
    assert_int_equal(r.prefill_worker_id, 0);
    /* no decode worker: a disaggregated ROUTE falls back to a prefill-capable worker */
    kvr_cmd down3 = {.type = KVR_CMD_WORKER_DOWN, .u.worker_id = 3};
    apply_enc(f, &down3, &r);
    add_role(f, 1, KVR_ROLE_PREFILL);
    c = disagg_route(7, 4096, NULL, 0);
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(r.path, KVR_DISAGG_FALLBACK);
    assert_int_equal(r.worker_id, 1);
    /* a plain ROUTE reports no path and still skips decode-only workers */
    add_role(f, 3, KVR_ROLE_DECODE);
    kvr_cmd p = tu_route(8, 7, 2000, 4, NULL, 0);
    apply_enc(f, &p, &r);
    assert_int_equal(r.path, KVR_DISAGG_NONE);
    assert_int_equal(r.worker_id, 1);
    kvr_fsm_free(f);
}

/* The prefill queue is the pool's: the prefill worker the cost prefers (its overlap) being at
 * max_prefill_queue sends the prefill to another prefill worker with room, not back to the
 * decode worker; only when every prefill worker is at it does the prefill stay local. */
static void test_disagg_queue_pool(void **state)
{
    (void)state;
    kvr_fsm *f = kvr_fsm_new(NULL);
    add_role(f, 1, KVR_ROLE_PREFILL);
    add_role(f, 2, KVR_ROLE_PREFILL);
    add_role(f, 3, KVR_ROLE_DECODE);
    kvr_fsm_result r;
    kvr_route_candidate on1[] = {{1, 60}};
    for (uint64_t n = 1; n <= 2; n++) { /* worker 1 holds the prompt: both go there */
        kvr_cmd c = disagg_route(n, 4096, on1, 1);
        apply_enc(f, &c, &r);
        assert_int_equal(r.path, KVR_DISAGG_REMOTE);
        assert_int_equal(r.prefill_worker_id, 1);
    }
    /* worker 1 is at the queue limit, worker 2 is idle: remote on 2 */
    kvr_cmd c = disagg_route(3, 4096, on1, 1);
    apply_enc(f, &c, &r);
    assert_int_equal(r.outcome, KVR_OUT_OK);
    assert_int_equal(r.path, KVR_DISAGG_REMOTE);
    assert_int_equal(r.prefill_worker_id, 2);
    c = disagg_route(4, 4096, on1, 1);
    apply_enc(f, &c, &r);
    assert_int_equal(r.path, KVR_DISAGG_REMOTE);
    assert_int_equal(r.prefill_worker_id, 2);
    /* both at the limit: local on the decode worker */
    c = disagg_route(5, 4096, on1, 1);
    apply_enc(f, &c, &r);
    assert_int_equal(r.path, KVR_DISAGG_LOCAL);
    assert_int_equal(r.worker_id, 3);
    assert_int_equal(r.prefill_worker_id, 0);
    kvr_fsm_free(f);
}

/* Two replicas applying the same disaggregated commands book the same pairs and end with the
 * same digest; a snapshot restores the prefill bookings. */
static void test_disagg_replicas(void **state)
{
    (void)state;
    kvr_fsm *a = kvr_fsm_new(NULL), *b = kvr_fsm_new(NULL);
    for (int k = 0; k < 2; k++) {
        kvr_fsm *f = k ? b : a;
        add_role(f, 1, KVR_ROLE_PREFILL);
        add_role(f, 2, KVR_ROLE_PREFILL);
        add_role(f, 3, KVR_ROLE_DECODE);
        add_role(f, 4, KVR_ROLE_BOTH);
    }
    for (uint64_t n = 1; n <= 40; n++) {
        kvr_route_candidate cand[] = {{n % 4 + 1, (uint32_t)(n % 9)}};
        kvr_cmd c = disagg_route(n, (uint32_t)(n * 211 % 3000), cand, 1);
        kvr_fsm_result ra, rb;
        apply_enc(a, &c, &ra);
        apply_enc(b, &c, &rb);
        assert_int_equal(ra.outcome, rb.outcome);
        assert_int_equal(ra.path, rb.path);
        assert_int_equal(ra.worker_id, rb.worker_id);
        assert_int_equal(ra.prefill_worker_id, rb.prefill_worker_id);
        if (n % 3 == 0) {
            kvr_cmd fr = tu_req(n % 2 ? KVR_CMD_FREE : KVR_CMD_PREFILL_DONE, n - 1);
            apply_enc(a, &fr, &ra);
            apply_enc(b, &fr, &rb);
        }
    }
    assert_int_equal(kvr_fsm_digest(a), kvr_fsm_digest(b));
    kvr_fsm_free(a);
    kvr_fsm_free(b);
}

static kvr_cmd policy_cmd(uint64_t set_by, double load_weight)
{
    kvr_cmd c = {.type = KVR_CMD_ROUTE_POLICY};
    c.u.policy.set_by = set_by;
    c.u.policy.cost = kvr_cost_params_default();
    c.u.policy.cost.load_weight = load_weight;
    return c;
}

/* Rewrites a snapshot's trailing checksum after the test edited its body. */
static void snap_resum(kvr_buf *s)
{
    uint64_t sum = XXH3_64bits(s->base, s->len - 8);
    for (int i = 0; i < 8; i++)
        s->base[s->len - 8 + i] = (char)(uint8_t)(sum >> (8 * i));
}

/* Two replicas whose options differ (load weight 1 and 100) and the setup of
 * test_route_command_weights: worker 1 holds 8 decode blocks; a request that worker 1 caches 6
 * of 8 blocks of goes to worker 1 with load weight 1 and to worker 2 with load weight 100. */
static void policy_pair(kvr_fsm **a, kvr_fsm **b)
{
    kvr_fsm_options o = {0};
    o.cost = kvr_cost_params_default();
    o.cost.load_weight = 100;
    *a = kvr_fsm_new(NULL);
    *b = kvr_fsm_new(&o);
    add_workers(*a, 2);
    add_workers(*b, 2);
    kvr_fsm_result r;
    kvr_cmd p = tu_route(1, 7, 1000, 8, NULL, 0);
    p.u.route.pin_worker = 1;
    kvr_cmd pd = tu_req(KVR_CMD_PREFILL_DONE, 1);
    apply_enc(*a, &p, &r);
    apply_enc(*a, &pd, &r);
    apply_enc(*b, &p, &r);
    apply_enc(*b, &pd, &r);
}

/* ROUTE_POLICY (fsm.h "Route policy"): applied in log order, it decides the ROUTEs that carry
 * no weights on every replica whatever its options; a ROUTE's own weights still win (old
 * log entries decide as they did); it is in the digest and survives a snapshot; weights out
 * of range change nothing. */
static void test_route_policy(void **state)
{
    (void)state;
    kvr_fsm *a, *b;
    policy_pair(&a, &b);
    kvr_fsm_result ra, rb;
    kvr_route_candidate cand[] = {{1, 6}};
    assert_false(kvr_fsm_policy(a, NULL, NULL));
    uint64_t d0 = kvr_fsm_digest(a);
    assert_true(d0 == kvr_fsm_digest(b));

    /* the policy (load weight 1, set by router 3) */
    kvr_cmd pol = policy_cmd(3, 1);
    apply_enc(a, &pol, &ra);
    apply_enc(b, &pol, &rb);
    assert_int_equal(ra.outcome, KVR_OUT_OK);
    assert_int_equal(rb.type, KVR_CMD_ROUTE_POLICY);
    kvr_cost_params got;
    uint64_t by = 0;
    assert_true(kvr_fsm_policy(b, &got, &by));
    assert_true(by == 3);
    assert_memory_equal(&got, &pol.u.policy.cost, sizeof got);
    assert_true(kvr_fsm_digest(a) != d0);
    assert_true(kvr_fsm_digest(a) == kvr_fsm_digest(b));

    /* a ROUTE without weights: the policy decides on both (b's options would send it to 2) */
    kvr_cmd c = tu_route(2, 7, 1001, 8, cand, 1);
    apply_enc(a, &c, &ra);
    apply_enc(b, &c, &rb);
    assert_int_equal(ra.worker_id, 1);
    assert_int_equal(rb.worker_id, 1);
    /* a ROUTE with its own weights (load 100): those decide, on both */
    kvr_cmd w = tu_route(3, 7, 1002, 8, cand, 1);
    w.u.route.has_cost = true;
    w.u.route.cost = kvr_cost_params_default();
    w.u.route.cost.load_weight = 100;
    apply_enc(a, &w, &ra);
    apply_enc(b, &w, &rb);
    assert_int_equal(ra.worker_id, 2);
    assert_int_equal(rb.worker_id, 2);
    assert_true(kvr_fsm_digest(a) == kvr_fsm_digest(b));

    /* out of range (not through the codec, which refuses it): INVALID, nothing changes */
    uint64_t d1 = kvr_fsm_digest(a);
    kvr_cmd badp = policy_cmd(9, -1);
    kvr_fsm_apply(a, &badp, &ra);
    assert_int_equal(ra.outcome, KVR_OUT_INVALID);
    badp.u.policy.cost.load_weight = 1;
    badp.u.policy.cost.overlap_weight = 0;
    kvr_fsm_apply(a, &badp, &ra);
    assert_int_equal(ra.outcome, KVR_OUT_INVALID);
    assert_true(kvr_fsm_digest(a) == d1);
    assert_true(kvr_fsm_policy(a, NULL, &by) && by == 3);

    /* the same weights set by another router is another state */
    kvr_fsm *a2 = kvr_fsm_clone(a);
    assert_non_null(a2);
    kvr_cmd pol4 = policy_cmd(4, 1);
    kvr_fsm_apply(a2, &pol4, &ra);
    assert_true(kvr_fsm_digest(a2) != kvr_fsm_digest(a));
    kvr_fsm_free(a2);

    /* snapshot (version 5) into a replica with the load-100 options: policy, digest and the
     * next decision carry over */
    kvr_buf s;
    kvr_buf_init(&s);
    assert_int_equal(kvr_fsm_snapshot(a, &s, NULL), 0);
    assert_int_equal((uint8_t)s.base[4], 5);
    kvr_fsm_options o = {0};
    o.cost = kvr_cost_params_default();
    o.cost.load_weight = 100;
    kvr_fsm *c2 = kvr_fsm_new(&o);
    kvr_err e = {0};
    assert_int_equal(kvr_fsm_restore(c2, s.base, s.len, &e), 0);
    assert_true(kvr_fsm_policy(c2, &got, &by) && by == 3);
    assert_true(got.load_weight == 1);
    assert_true(kvr_fsm_digest(c2) == kvr_fsm_digest(a));
    kvr_cmd n = tu_route(4, 7, 1003, 8, cand, 1);
    apply_enc(a, &n, &ra);
    apply_enc(c2, &n, &rb);
    assert_true(ra.worker_id == rb.worker_id);
    assert_true(kvr_fsm_digest(c2) == kvr_fsm_digest(a));

    /* a later policy replaces it, in order: the same request goes to worker 1 under load
     * weight 0 (W1 2+4+0+2 = 8 < W2 8+8+0+8 = 24) and to worker 2 under load weight 100 */
    kvr_cmd pol0 = policy_cmd(1, 0), pol100 = policy_cmd(1, 100);
    kvr_cmd c5 = tu_route(5, 7, 1004, 8, cand, 1);
    kvr_fsm *a3 = kvr_fsm_clone(a);
    assert_non_null(a3);
    apply_enc(a3, &pol0, &ra);
    apply_enc(a3, &c5, &ra);
    assert_int_equal(ra.worker_id, 1);
    kvr_fsm_free(a3);
    apply_enc(a, &pol100, &ra);
    apply_enc(a, &c5, &ra);
    assert_int_equal(ra.worker_id, 2);
    assert_true(kvr_fsm_policy(a, &got, &by) && by == 1 && got.load_weight == 100);

    /* a snapshot whose policy holds a weight out of range is refused, f unchanged */
    size_t at = s.len - 8 - (1 + 1 + 6 * 5); /* [7-array, set_by 3, 6 x float32] before the sum */
    assert_int_equal((uint8_t)s.base[at], 0x97);
    assert_int_equal((uint8_t)s.base[at + 2], 0xca); /* overlap_weight 1.0 as float32 */
    memset(s.base + at + 3, 0, 4);                   /* -> 0.0 */
    snap_resum(&s);
    uint64_t dc = kvr_fsm_digest(c2);
    assert_int_not_equal(kvr_fsm_restore(c2, s.base, s.len, &e), 0);
    assert_true(kvr_fsm_digest(c2) == dc);
    kvr_buf_free(&s);
    kvr_fsm_free(a);
    kvr_fsm_free(b);
    kvr_fsm_free(c2);
}

/* A version-4 snapshot (written before ROUTE_POLICY: 7 sections) still loads, with no policy:
 * ROUTEs without weights go by the options again, and restoring it drops a policy the FSM
 * had. Built from a version-5 snapshot of a state without policy: the same bytes but the
 * version, the section count and the trailing nil. */
static void test_snapshot_v4_loads(void **state)
{
    (void)state;
    kvr_fsm *a, *b;
    policy_pair(&a, &b);
    kvr_buf s;
    kvr_buf_init(&s);
    assert_int_equal(kvr_fsm_snapshot(a, &s, NULL), 0);
    assert_int_equal((uint8_t)s.base[4], 5);
    assert_int_equal((uint8_t)s.base[5], 0x98);
    assert_int_equal((uint8_t)s.base[s.len - 9], 0xc0); /* no policy: nil */
    s.base[4] = 4;
    s.base[5] = (char)0x97;
    memmove(s.base + s.len - 9, s.base + s.len - 8, 8);
    s.len--;
    snap_resum(&s);
    /* b has a policy; the v4 snapshot replaces its whole state, policy included */
    kvr_cmd pol = policy_cmd(2, 1);
    kvr_fsm_result r;
    apply_enc(b, &pol, &r);
    assert_true(kvr_fsm_policy(b, NULL, NULL));
    kvr_err e = {0};
    assert_int_equal(kvr_fsm_restore(b, s.base, s.len, &e), 0);
    assert_false(kvr_fsm_policy(b, NULL, NULL));
    assert_int_equal(kvr_fsm_booking_count(b), 1);
    /* b's options (load 100) decide again: worker 2, where a (load 1) picks worker 1 */
    kvr_route_candidate cand[] = {{1, 6}};
    kvr_cmd c = tu_route(2, 7, 1001, 8, cand, 1);
    kvr_fsm_result ra;
    apply_enc(a, &c, &ra);
    apply_enc(b, &c, &r);
    assert_int_equal(ra.worker_id, 1);
    assert_int_equal(r.worker_id, 2);
    /* and a v5 snapshot with no policy round-trips to the same digest */
    kvr_buf s5;
    kvr_buf_init(&s5);
    assert_int_equal(kvr_fsm_snapshot(b, &s5, NULL), 0);
    kvr_fsm *c2 = kvr_fsm_new(NULL);
    assert_int_equal(kvr_fsm_restore(c2, s5.base, s5.len, &e), 0);
    assert_true(kvr_fsm_digest(c2) == kvr_fsm_digest(b));
    assert_false(kvr_fsm_policy(c2, NULL, NULL));
    kvr_buf_free(&s);
    kvr_buf_free(&s5);
    kvr_fsm_free(a);
    kvr_fsm_free(b);
    kvr_fsm_free(c2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_route_books_least_cost),
        cmocka_unit_test(test_route_queue_and_capacity_terms),
        cmocka_unit_test(test_route_command_weights),
        cmocka_unit_test(test_idempotent),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_expiry_and_leases),
        cmocka_unit_test(test_full),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_snapshot_corrupt),
        cmocka_unit_test(test_pinned_route_moves),
        cmocka_unit_test(test_route_after_free),
        cmocka_unit_test(test_free_before_route),
        cmocka_unit_test(test_duplicate_while_active),
        cmocka_unit_test(test_record_pruned_by_command_time),
        cmocka_unit_test(test_record_bound),
        cmocka_unit_test(test_snapshot_with_record),
        cmocka_unit_test(test_snapshot_v1_loads),
        cmocka_unit_test(test_record_digest_across_replicas),
        cmocka_unit_test(test_worker_slots_reused),
        cmocka_unit_test(test_snapshot_v2_loads),
        cmocka_unit_test(test_only_candidates),
        cmocka_unit_test(test_pools),
        cmocka_unit_test(test_approx_hooks),
        cmocka_unit_test(test_disagg_pair),
        cmocka_unit_test(test_disagg_conditions),
        cmocka_unit_test(test_disagg_queue_pool),
        cmocka_unit_test(test_disagg_replicas),
        cmocka_unit_test(test_route_policy),
        cmocka_unit_test(test_snapshot_v4_loads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
