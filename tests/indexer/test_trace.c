/* Tests of the Mooncake trace reader and prompt generator (launcher/trace.h). argv[1], when
 * given, is the repository's sample trace (data/mooncake_conversation_trace.jsonl.gz). */
#define _DEFAULT_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <unistd.h>
#include <zlib.h>

#include "trace.h"

static const char *g_sample;
static char g_path[256];

static int setup(void **state)
{
    (void)state;
    const char *base = getenv("TMPDIR");
    snprintf(g_path, sizeof g_path, "%s/kvr-trace-test-XXXXXX", base ? base : "/tmp");
    int fd = mkstemp(g_path);
    if (fd < 0)
        return -1;
    close(fd);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    unlink(g_path);
    return 0;
}

static void put(const char *text, bool gz)
{
    if (gz) {
        gzFile f = gzopen(g_path, "wb");
        assert_non_null(f);
        assert_int_equal(gzwrite(f, text, (unsigned)strlen(text)), (int)strlen(text));
        gzclose(f);
    } else {
        FILE *f = fopen(g_path, "wb");
        assert_non_null(f);
        fputs(text, f);
        fclose(f);
    }
}

static void test_load_plain_and_gz(void **state)
{
    (void)state;
    const char *text = "{\"timestamp\": 0, \"input_length\": 1000, \"output_length\": 5, "
                       "\"hash_ids\": [0, 1]}\n"
                       "\n"
                       "{\"timestamp\": 27, \"input_length\": 600, \"output_length\": 7, "
                       "\"hash_ids\": [0, 9], \"extra\": {\"x\": 1}}"; /* no final newline */
    for (int gz = 0; gz < 2; gz++) {
        put(text, gz);
        kvr_trace t;
        kvr_err err = {0};
        assert_int_equal(kvr_trace_load(g_path, NULL, &t, &err), 0);
        assert_int_equal(t.n, 2);
        assert_int_equal(t.reqs[1].timestamp_ms, 27);
        assert_int_equal(t.reqs[1].input_length, 600);
        assert_int_equal(t.reqs[1].output_length, 7);
        assert_int_equal(t.reqs[1].n_hash_ids, 2);
        assert_int_equal(t.reqs[1].hash_ids[1], 9);
        assert_int_equal(t.max_hash_id, 9);
        kvr_trace_free(&t);
    }
}

static void test_bad_input(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        int code;
        const char *msg;
    } cases[] = {
        {"{\"timestamp\":0,\"input_length\":5,\"hash_ids\":[1]}\nnot json\n", KVR_EINVAL, ":2"},
        {"{\"timestamp\":0,\"input_length\":5,\"hash_ids\":[-1]}\n", KVR_EINVAL, "hash_ids[0]"},
        {"{\"timestamp\":0,\"input_length\":5,\"hash_ids\":[1.5]}\n", KVR_EINVAL, "hash_ids[0]"},
        {"{\"timestamp\":0,\"input_length\":5,\"hash_ids\":\"x\"}\n", KVR_EINVAL, "hash_ids"},
        {"{\"timestamp\":0,\"hash_ids\":[]}\n", KVR_EINVAL, "input_length"},
        {"{\"timestamp\":0,\"input_length\":5e12,\"hash_ids\":[]}\n", KVR_EINVAL, "input_length"},
        {"[1,2,3]\n", KVR_EINVAL, "object"},
        {"{\"timestamp\":0,\"input_length\":5,\"hash_ids\":[1,2,3,4,5]}\n", KVR_ELIMIT, "hash_ids"},
        {"{\"timestamp\":0,\"input_length\":5,\"hash_ids\":[1],\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxx"
         "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}\n",
         KVR_ELIMIT, "longer"},
    };
    kvr_trace_limits lim = kvr_trace_limits_default();
    lim.max_hash_ids = 4;
    lim.max_line_bytes = 100;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        put(cases[i].text, false);
        kvr_trace t;
        kvr_err err = {0};
        int rc = kvr_trace_load(g_path, &lim, &t, &err);
        if (rc != cases[i].code || !strstr(err.msg, cases[i].msg))
            fail_msg("case %zu: rc %d msg '%s'", i, rc, err.msg);
        assert_int_equal(t.n, 0);
        assert_null(t.reqs);
    }
    lim = kvr_trace_limits_default();
    lim.max_requests = 1;
    put("{\"timestamp\":0,\"input_length\":5,\"hash_ids\":[1]}\n"
        "{\"timestamp\":0,\"input_length\":5,\"hash_ids\":[1]}\n",
        false);
    kvr_trace t;
    kvr_err err = {0};
    assert_int_equal(kvr_trace_load(g_path, &lim, &t, &err), KVR_ELIMIT);
    assert_int_equal(kvr_trace_load("/nonexistent/trace.jsonl", NULL, &t, &err), KVR_ENOTFOUND);
}

static void test_tokens(void **state)
{
    (void)state;
    /* deterministic, in range, different across ids and positions */
    uint32_t a[512], b[512];
    kvr_trace_block_tokens(42, 512, a);
    kvr_trace_block_tokens(42, 512, b);
    assert_memory_equal(a, b, sizeof a);
    kvr_trace_block_tokens(43, 512, b);
    int same = 0;
    for (int k = 0; k < 512; k++) {
        assert_true(a[k] >= KVR_TRACE_TOKEN_MIN && a[k] < KVR_TRACE_VOCAB);
        assert_int_equal(a[k], kvr_trace_token(42, (uint32_t)k));
        same += a[k] == b[k];
    }
    assert_true(same < 5);

    /* prompts: equal hash-id prefixes give equal token prefixes; trimmed to input_length;
     * tokens past the hashed blocks are request-unique */
    uint64_t ids1[3] = {7, 8, 9}, ids2[2] = {7, 8};
    kvr_trace_req r1 = {.input_length = 1300, .n_hash_ids = 3, .hash_ids = ids1};
    kvr_trace_req r2 = {.input_length = 1500, .n_hash_ids = 2, .hash_ids = ids2};
    static uint32_t p1[2000], p2[2000], p3[2000];
    assert_int_equal(kvr_trace_prompt(&r1, 0, 512, p1, 2000), 1300);
    assert_int_equal(kvr_trace_prompt(&r2, 1, 512, p2, 2000), 1500);
    assert_memory_equal(p1, p2, 1024 * sizeof(uint32_t));
    assert_int_equal(p1[1024], kvr_trace_token(9, 0));
    assert_int_not_equal(memcmp(p1 + 1024, p2 + 1024, 276 * sizeof(uint32_t)), 0);
    assert_int_equal(kvr_trace_prompt(&r2, 2, 512, p3, 2000), 1500);
    assert_memory_equal(p2, p3, 1024 * sizeof(uint32_t));
    assert_int_not_equal(memcmp(p2 + 1024, p3 + 1024, 476 * sizeof(uint32_t)), 0);
    assert_int_equal(kvr_trace_prompt(&r2, 1, 512, p3, 100), 100); /* bounded by max_out */
    assert_memory_equal(p2, p3, 100 * sizeof(uint32_t));
    /* another block size changes the layout but stays deterministic */
    assert_int_equal(kvr_trace_prompt(&r1, 0, 64, p3, 2000), 1300);
    assert_int_equal(p3[64], kvr_trace_token(8, 0));
}

static void test_sample_trace(void **state)
{
    (void)state;
    if (!g_sample) {
        print_message("no sample trace given: skipped\n");
        skip();
    }
    kvr_trace t;
    kvr_err err = {0};
    assert_int_equal(kvr_trace_load(g_sample, NULL, &t, &err), 0);
    /* figures from data/README.md */
    assert_int_equal(t.n, 12031);
    assert_int_equal(t.n_ids, 288500);
    for (size_t i = 0; i < t.n; i++) {
        const kvr_trace_req *r = &t.reqs[i];
        assert_int_equal(r->n_hash_ids, (r->input_length + 511) / 512);
        if (i)
            assert_true(r->timestamp_ms >= t.reqs[i - 1].timestamp_ms);
    }
    kvr_trace_free(&t);
}

int main(int argc, char **argv)
{
    g_sample = argc > 1 ? argv[1] : NULL;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_load_plain_and_gz, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_input, setup, teardown),
        cmocka_unit_test(test_tokens),
        cmocka_unit_test(test_sample_trace),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
