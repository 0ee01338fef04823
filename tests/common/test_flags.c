/* kvr_flags: typed flags, sizes and durations (one parser for every binary's command line). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kvr_flags.h"

#include <string.h>

static void test_sizes(void **state)
{
    (void)state;
    int64_t v = -1;
    assert_int_equal(kvr_parse_size("512", &v), 0);
    assert_int_equal(v, 512);
    assert_int_equal(kvr_parse_size("4MiB", &v), 0);
    assert_int_equal(v, 4 << 20);
    assert_int_equal(kvr_parse_size("64k", &v), 0);
    assert_int_equal(v, 65536);
    assert_int_equal(kvr_parse_size("1.5 GB", &v), 0);
    assert_int_equal(v, 3ll << 29);
    assert_int_equal(kvr_parse_size("2TiB", &v), 0);
    assert_int_equal(v, 2ll << 40);
    assert_int_equal(kvr_parse_size("0", &v), 0);
    assert_int_equal(v, 0);
    const char *bad[] = {"", "MiB", "-1", "4 XB", "4MiBs", "nan", "inf", "1e300", "2000TiB"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        v = 7;
        if (kvr_parse_size(bad[i], &v) != KVR_EINVAL)
            fail_msg("'%s' accepted as %lld", bad[i], (long long)v);
        assert_int_equal(v, 7); /* untouched on error */
    }
}

static void test_size_flag(void **state)
{
    (void)state;
    int64_t body = 4 << 20;
    kvr_flag flags[] = {{"max-body", KVR_FLAG_SIZE, &body, "limit", false}};
    char *ok[] = {"--max-body", "16MiB"};
    kvr_err err = {0};
    assert_int_equal(kvr_flags_parse(flags, 1, 2, ok, NULL, 0, NULL, &err), 0);
    assert_int_equal(body, 16 << 20);
    assert_true(flags[0].set);
    char *bad[] = {"--max-body=lots"};
    assert_int_equal(kvr_flags_parse(flags, 1, 1, bad, NULL, 0, NULL, &err), KVR_EINVAL);
    assert_non_null(strstr(err.msg, "--max-body"));
    assert_non_null(strstr(err.msg, "not a size"));
}

static void test_durations(void **state)
{
    (void)state;
    int64_t ms = 0;
    assert_int_equal(kvr_parse_duration_ms("250ms", &ms), 0);
    assert_int_equal(ms, 250);
    assert_int_equal(kvr_parse_duration_ms("10", &ms), 0); /* bare number: seconds */
    assert_int_equal(ms, 10000);
    assert_int_equal(kvr_parse_duration_ms("500us", &ms), 0); /* rounded up to 1 ms */
    assert_int_equal(ms, 1);
    assert_int_equal(kvr_parse_duration_ms("soon", &ms), KVR_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_size_flag),
        cmocka_unit_test(test_durations),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
