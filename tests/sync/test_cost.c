#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

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
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
