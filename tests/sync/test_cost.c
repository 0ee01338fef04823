#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>
#include <math.h>

#include "cost.h"

static const uint8_t RID[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

static void test_formula(void **state)
{
    (void)state;
    kvr_cost_worker w = {.worker_id = 1, .overlap = 3, .active_blocks = 10, .active_prefill_blocks = 4};
    /* 1.0*(8-3+4) + 10 + 8-3 = 24 */
    assert_true(kvr_cost_of(&w, 8, 1.0) == 24.0);
    /* 2.0*(9) + 15 = 33 */
    assert_true(kvr_cost_of(&w, 8, 2.0) == 33.0);
    /* overlap larger than the request is clamped: no unsigned wrap */
    w.overlap = 100;
    assert_true(kvr_cost_of(&w, 8, 1.0) == 14.0);
}

static void test_argmin_prefers_overlap(void **state)
{
    (void)state;
    kvr_cost_worker ws[3] = {
        {.worker_id = 1, .overlap = 0},
        {.worker_id = 2, .overlap = 6},
        {.worker_id = 3, .overlap = 2},
    };
    assert_int_equal(kvr_cost_choose(RID, 8, ws, 3, NULL, NULL), 1);
    /* load outweighs overlap */
    ws[1].active_blocks = 100;
    double c = -1;
    assert_int_equal(kvr_cost_choose(RID, 8, ws, 3, NULL, &c), 2);
    assert_true(c == 12.0);
    assert_int_equal(kvr_cost_choose(RID, 8, ws, 0, NULL, NULL), -1);
}

static void test_ties(void **state)
{
    (void)state;
    /* equal cost, fewer active blocks wins: w1 cost 1*(8+0)+4+8=20, w2 cost 1*(8+4)+0+8=20 */
    kvr_cost_worker ws[2] = {
        {.worker_id = 1, .active_blocks = 4},
        {.worker_id = 2, .active_prefill_blocks = 4},
    };
    assert_int_equal(kvr_cost_choose(RID, 8, ws, 2, NULL, NULL), 1);
    /* full tie: hash decides, independent of input order */
    kvr_cost_worker a[2] = {{.worker_id = 7}, {.worker_id = 9}};
    kvr_cost_worker b[2] = {{.worker_id = 9}, {.worker_id = 7}};
    long ia = kvr_cost_choose(RID, 8, a, 2, NULL, NULL);
    long ib = kvr_cost_choose(RID, 8, b, 2, NULL, NULL);
    assert_int_equal(a[ia].worker_id, b[ib].worker_id);
    uint64_t expect = kvr_cost_tiebreak(RID, 7) < kvr_cost_tiebreak(RID, 9) ? 7 : 9;
    assert_int_equal(a[ia].worker_id, expect);
    /* different request ids spread full ties over both workers */
    int seen7 = 0, seen9 = 0;
    for (int i = 0; i < 64; i++) {
        uint8_t rid[16] = {0};
        rid[0] = (uint8_t)i;
        long k = kvr_cost_choose(rid, 8, a, 2, NULL, NULL);
        if (a[k].worker_id == 7)
            seen7++;
        else
            seen9++;
    }
    assert_true(seen7 > 0 && seen9 > 0);
}

/* The load terms of issue 14: each one, set alone, changes a choice the defaults make (so
 * each test fails with its term removed from kvr_cost_eval). */
static void test_load_weight(void **state)
{
    (void)state;
    kvr_cost_params p = kvr_cost_params_default();
    kvr_cost_worker w = {.worker_id = 1, .overlap = 3, .active_blocks = 10,
                         .active_prefill_blocks = 4, .bookings = 2, .capacity_blocks = 12};
    /* defaults: the old formula, bookings and capacity ignored */
    assert_true(kvr_cost_eval(&w, 8, &p) == 24.0);
    assert_true(kvr_cost_eval(&w, 8, NULL) == 24.0);
    p.load_weight = 0.5; /* 1*(5+4) + 0.5*10 + 5 */
    assert_true(kvr_cost_eval(&w, 8, &p) == 19.0);
    /* worker 1 caches 6 of 8 blocks but carries 20 active blocks: by default the idle worker
     * 2 wins (1*2+20+2 = 24 > 1*8+0+8 = 16); at load weight 0.25 the cached one does
     * (2+5+2 = 9 < 16) */
    kvr_cost_worker ws[2] = {{.worker_id = 1, .overlap = 6, .active_blocks = 20},
                             {.worker_id = 2}};
    assert_int_equal(kvr_cost_choose(RID, 8, ws, 2, NULL, NULL), 1);
    p.load_weight = 0.25;
    assert_int_equal(kvr_cost_choose(RID, 8, ws, 2, &p, NULL), 0);
}

static void test_queue_weight(void **state)
{
    (void)state;
    kvr_cost_params p = kvr_cost_params_default();
    /* same blocks, but worker 1 has them in 6 small requests, worker 2 in 1: the default
     * cost cannot tell them apart (fewer active blocks, then the hash decide), a queue
     * weight sends the request to the shorter queue */
    kvr_cost_worker ws[2] = {{.worker_id = 1, .active_blocks = 12, .bookings = 6},
                             {.worker_id = 2, .active_blocks = 12, .bookings = 1}};
    kvr_cost_worker w1 = ws[0];
    p.queue_weight = 4; /* 8 + 12 + 8 + 4*6 */
    assert_true(kvr_cost_eval(&w1, 8, &p) == 52.0);
    uint8_t rid[16] = {0};
    for (int i = 0; i < 32; i++) {
        rid[0] = (uint8_t)i;
        assert_int_equal(kvr_cost_choose(rid, 8, ws, 2, &p, NULL), 1);
    }
    /* worker 1 caching the whole request: 0+12+0+4*6 = 36, still above 8+12+8+4*1 = 32 */
    ws[0].overlap = 8;
    assert_int_equal(kvr_cost_choose(RID, 8, ws, 2, &p, NULL), 1);
    p.queue_weight = 1; /* a lighter weight yields to the overlap: 12+6 = 18 < 8+12+8+1 = 29 */
    assert_int_equal(kvr_cost_choose(RID, 8, ws, 2, &p, NULL), 0);
}

static void test_overflow_weight(void **state)
{
    (void)state;
    kvr_cost_params p = kvr_cost_params_default();
    p.overflow_weight = 10;
    /* worker 1: 90 of 100 blocks booked, the request needs 20 new: 10 beyond capacity */
    kvr_cost_worker w = {.worker_id = 1, .active_blocks = 90, .capacity_blocks = 100};
    assert_true(kvr_cost_eval(&w, 20, &p) == 20.0 + 90 + 20 + 10 * 10);
    /* capacity unknown (0): no term */
    w.capacity_blocks = 0;
    assert_true(kvr_cost_eval(&w, 20, &p) == 130.0);
    /* room enough: no term */
    w.capacity_blocks = 110;
    assert_true(kvr_cost_eval(&w, 20, &p) == 130.0);
    /* the small worker with a little less load loses to the big one once it would overflow */
    kvr_cost_worker ws[2] = {{.worker_id = 1, .active_blocks = 90, .capacity_blocks = 100},
                             {.worker_id = 2, .active_blocks = 95, .capacity_blocks = 1000}};
    assert_int_equal(kvr_cost_choose(RID, 20, ws, 2, NULL, NULL), 0);
    assert_int_equal(kvr_cost_choose(RID, 20, ws, 2, &p, NULL), 1);
}

static void test_tie_band(void **state)
{
    (void)state;
    kvr_cost_params p = kvr_cost_params_default();
    /* four near-equal workers (active 0..3 blocks): without a band the least loaded always
     * wins; with one, request ids spread over all four, each id always to the same worker,
     * whatever the input order */
    kvr_cost_worker ws[4] = {{.worker_id = 1, .active_blocks = 0},
                             {.worker_id = 2, .active_blocks = 1},
                             {.worker_id = 3, .active_blocks = 2},
                             {.worker_id = 4, .active_blocks = 3}};
    kvr_cost_worker rev[4] = {ws[3], ws[2], ws[1], ws[0]};
    p.tie_band = 0.1; /* band 0.1 * (16 + 8) = 2.4: workers 1-3 */
    int counts[5] = {0};
    for (int i = 0; i < 300; i++) {
        uint8_t rid[16] = {0};
        rid[5] = (uint8_t)i;
        rid[6] = (uint8_t)(i >> 8);
        assert_int_equal(kvr_cost_choose(rid, 8, ws, 4, NULL, NULL), 0);
        long k = kvr_cost_choose(rid, 8, ws, 4, &p, NULL);
        long kr = kvr_cost_choose(rid, 8, rev, 4, &p, NULL);
        assert_true(k >= 0 && k < 3);
        assert_int_equal(ws[k].worker_id, rev[kr].worker_id);
        /* the lowest hash in the band */
        uint64_t hk = kvr_cost_tiebreak(rid, ws[k].worker_id);
        for (int j = 0; j < 3; j++)
            assert_true(hk <= kvr_cost_tiebreak(rid, ws[j].worker_id));
        counts[ws[k].worker_id]++;
    }
    assert_true(counts[1] > 50 && counts[2] > 50 && counts[3] > 50);
    assert_int_equal(counts[4], 0);
    /* the cost reported is the chosen worker's */
    double c = 0;
    uint8_t rid[16] = {0};
    for (int i = 0; i < 300; i++) {
        rid[5] = (uint8_t)i;
        long k = kvr_cost_choose(rid, 8, ws, 4, &p, &c);
        assert_true(c == kvr_cost_eval(&ws[k], 8, &p));
    }
    /* a clearly better worker (overlap) is never given up for the band */
    ws[3].overlap = 8;
    for (int i = 0; i < 100; i++) {
        rid[5] = (uint8_t)i;
        assert_int_equal(kvr_cost_choose(rid, 8, ws, 4, &p, NULL), 3);
    }
}

static void test_bad_weights(void **state)
{
    (void)state;
    kvr_cost_worker ws[2] = {{.worker_id = 1, .overlap = 6, .active_blocks = 20},
                             {.worker_id = 2}};
    kvr_cost_params p = kvr_cost_params_default();
    p.load_weight = -1;
    p.queue_weight = NAN;
    p.tie_band = INFINITY;
    p.overflow_weight = -0.5;
    /* every bad weight falls back to its default: the default choice */
    assert_int_equal(kvr_cost_choose(RID, 8, ws, 2, &p, NULL),
                     kvr_cost_choose(RID, 8, ws, 2, NULL, NULL));
}

static void test_temperature(void **state)
{
    (void)state;
    kvr_cost_worker ws[4] = {
        {.worker_id = 1, .overlap = 8}, {.worker_id = 2, .overlap = 4},
        {.worker_id = 3, .active_blocks = 8}, {.worker_id = 4, .overlap = 2},
    };
    kvr_cost_params p = kvr_cost_params_default();
    p.temperature = 1.0;
    int counts[4] = {0};
    for (int i = 0; i < 400; i++) {
        uint8_t rid[16] = {0};
        rid[3] = (uint8_t)i;
        rid[4] = (uint8_t)(i >> 8);
        long k = kvr_cost_choose(rid, 8, ws, 4, &p, NULL);
        assert_true(k >= 0 && k < 4);
        /* same request id → same choice */
        assert_int_equal(kvr_cost_choose(rid, 8, ws, 4, &p, NULL), k);
        counts[k]++;
    }
    /* sampling spreads, but the cheapest is the most likely */
    assert_true(counts[0] > counts[2]);
    assert_true(counts[1] > 0 && counts[2] > 0);
    /* temperature 0 is the argmin */
    p.temperature = 0;
    assert_int_equal(kvr_cost_choose(RID, 8, ws, 4, &p, NULL), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_formula),
        cmocka_unit_test(test_argmin_prefers_overlap),
        cmocka_unit_test(test_ties),
        cmocka_unit_test(test_temperature),
        cmocka_unit_test(test_load_weight),
        cmocka_unit_test(test_queue_weight),
        cmocka_unit_test(test_overflow_weight),
        cmocka_unit_test(test_tie_band),
        cmocka_unit_test(test_bad_weights),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
