/* Tests of the pooled-cache ceiling simulator (launcher/ceiling.h) on traces built in memory,
 * one trace block per worker block, so every expected figure can be counted by hand. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "ceiling.h"

#define B 16

/* A trace of requests whose hash ids are rows of ids (0-terminated), each id one block. */
static void make(kvr_trace *t, kvr_trace_req *reqs, const uint64_t ids[][8], int n)
{
    *t = (kvr_trace){.n = (size_t)n, .reqs = reqs};
    for (int i = 0; i < n; i++) {
        uint32_t k = 0;
        while (k < 8 && ids[i][k])
            k++;
        reqs[i] = (kvr_trace_req){.timestamp_ms = i * 1000,
                                  .input_length = k * B,
                                  .output_length = 1,
                                  .n_hash_ids = k,
                                  .hash_ids = ids[i]};
    }
}

static kvr_ceiling_result run(const kvr_trace *t, uint64_t capacity)
{
    kvr_ceiling_cfg c = {.block_size = B, .capacity_blocks = capacity, .trace_block_size = B};
    kvr_ceiling_result r;
    kvr_err err = {0};
    assert_int_equal(kvr_ceiling_run(t, t->n, &c, &r, &err), 0);
    return r;
}

/* The same prompt twice: the second reuses all but its last block, as an engine would (it
 * must compute at least one token). */
static void test_repeat(void **state)
{
    (void)state;
    static const uint64_t ids[][8] = {{1, 2, 3, 4}, {1, 2, 3, 4}};
    kvr_trace_req reqs[2];
    kvr_trace t;
    make(&t, reqs, ids, 2);
    kvr_ceiling_result r = run(&t, 0);
    assert_true(r.prompt_tokens == 8 * B);
    assert_true(r.cached_tokens == 3 * B);
    assert_true(r.hit_rate == 3.0 / 8.0);
    r = run(&t, 4);
    assert_true(r.cached_tokens == 3 * B);
    assert_int_equal(r.evictions, 0);
}

/* A cache too small for two prompts forgets the first; an infinite one does not. */
static void test_capacity(void **state)
{
    (void)state;
    static const uint64_t ids[][8] = {{1, 2, 3, 4}, {5, 6, 7, 8}, {1, 2, 3, 4}};
    kvr_trace_req reqs[3];
    kvr_trace t;
    make(&t, reqs, ids, 3);
    kvr_ceiling_result r = run(&t, 4);
    assert_true(r.cached_tokens == 0);
    assert_true(r.evictions >= 4);
    r = run(&t, 0);
    assert_true(r.cached_tokens == 3 * B);
}

/* Eviction takes a prompt's tail first (the head stays useful to every later prompt that
 * shares it): with room for 6 blocks, one more evicts block 4, not block 1. */
static void test_tail_first(void **state)
{
    (void)state;
    static const uint64_t ids[][8] = {{1, 2, 3, 4}, {5, 6}, {7}, {1, 2, 3, 9}};
    kvr_trace_req reqs[4];
    kvr_trace t;
    make(&t, reqs, ids, 4);
    kvr_ceiling_result r = run(&t, 6);
    assert_int_equal(r.evictions, 1 + 1); /* block 4 for 7, then one for 9 */
    assert_true(r.cached_tokens == 3 * B);
}

/* A shared head with different tails: prefix matching stops at the first unknown block. */
static void test_prefix_only(void **state)
{
    (void)state;
    static const uint64_t ids[][8] = {{1, 2, 3, 4}, {1, 9, 3, 4}};
    kvr_trace_req reqs[2];
    kvr_trace t;
    make(&t, reqs, ids, 2);
    assert_true(run(&t, 0).cached_tokens == 1 * B);
}

static void test_slice_and_errors(void **state)
{
    (void)state;
    static const uint64_t ids[][8] = {{1}, {2}, {3}, {4}};
    kvr_trace_req reqs[4];
    kvr_trace t;
    make(&t, reqs, ids, 4); /* at 0, 1, 2, 3 s */
    assert_int_equal(kvr_trace_slice(&t, 1, 2.5, 0), 3);
    assert_int_equal(kvr_trace_slice(&t, 2, 1.0, 0), 2);
    assert_int_equal(kvr_trace_slice(&t, 1, 0, 2), 2);
    assert_int_equal(kvr_trace_slice(&t, 1, 0, 0), 4);
    kvr_ceiling_cfg c = {.block_size = 0};
    kvr_ceiling_result r;
    kvr_err err = {0};
    assert_int_equal(kvr_ceiling_run(&t, 4, &c, &r, &err), KVR_EINVAL);
    c.block_size = B;
    assert_int_equal(kvr_ceiling_run(&t, 5, &c, &r, &err), KVR_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_repeat),      cmocka_unit_test(test_capacity),
        cmocka_unit_test(test_tail_first),  cmocka_unit_test(test_prefix_only),
        cmocka_unit_test(test_slice_and_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
