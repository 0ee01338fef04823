/* Golden vectors of the liveness beats (proto/beat_msg.h): the frontend lease (subject and
 * payload) and the quorum beacon. Frontends and routers of different builds read each other's
 * beats, so the bytes may not change silently. The lease payloads were written by Python
 * msgpack and match what fe_loop.c sent before the codec moved out of it (issue 11); the
 * beacon is the router id as decimal text, as bookings_raft.c wrote it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "beat_msg.h"
#include "kvr_err.h"

static const char *GOLD_LEASE =
    "83ab66726f6e74656e645f69642aa574735f6d73cf0000019af232b27ba661637469766503";
static const char *GOLD_LEASE_MIN = "83ab66726f6e74656e645f696401a574735f6d7300a661637469766500";

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

static void assert_hex(const kvr_buf *b, const char *gold)
{
    char hex[512];
    assert_true(b->len * 2 < sizeof hex);
    for (size_t i = 0; i < b->len; i++)
        sprintf(hex + 2 * i, "%02x", (unsigned)(uint8_t)b->base[i]);
    hex[2 * b->len] = 0;
    if (strcmp(hex, gold) != 0)
        fail_msg("encoded %s, golden %s", hex, gold);
}

static void test_lease_golden(void **state)
{
    (void)state;
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_lease l = {.frontend_id = 42, .ts_ms = 1765000000123ull, .active = 3};
    assert_int_equal(kvr_lease_encode(&b, &l), 0);
    assert_hex(&b, GOLD_LEASE);
    kvr_buf_reset(&b);
    l = (kvr_lease){.frontend_id = 1};
    assert_int_equal(kvr_lease_encode(&b, &l), 0);
    assert_hex(&b, GOLD_LEASE_MIN);
    kvr_buf_free(&b);

    uint8_t buf[256];
    size_t n = unhex(GOLD_LEASE, buf, sizeof buf);
    kvr_lease d;
    assert_int_equal(kvr_lease_decode(buf, n, &d), 0);
    assert_int_equal(d.has, KVR_LEASE_FRONTEND_ID | KVR_LEASE_TS | KVR_LEASE_ACTIVE);
    assert_int_equal(d.frontend_id, 42);
    assert_true(d.ts_ms == 1765000000123ull);
    assert_int_equal(d.active, 3);
    for (size_t k = 0; k < n; k++)
        assert_int_not_equal(kvr_lease_decode(buf, k, &d), 0); /* every truncation */
    buf[n] = 0xc0;                                             /* trailing byte */
    assert_int_equal(kvr_lease_decode(buf, n + 1, &d), KVR_EINVAL);
    /* an unknown key is skipped; a known key of another type is refused */
    const uint8_t extra[] = {0x81, 0xa1, 'x', 0x92, 0x01, 0x02};
    assert_int_equal(kvr_lease_decode(extra, sizeof extra, &d), 0);
    assert_int_equal(d.has, 0);
    const uint8_t bad[] = {0x81, 0xa6, 'a', 'c', 't', 'i', 'v', 'e', 0xa1, 'x'};
    assert_int_not_equal(kvr_lease_decode(bad, sizeof bad, &d), 0);
    static uint8_t big[KVR_LEASE_MAX_BYTES + 1];
    memcpy(big, extra, sizeof extra);
    assert_int_equal(kvr_lease_decode(big, sizeof big, &d), KVR_ELIMIT);
}

static void test_lease_subject(void **state)
{
    (void)state;
    char s[64];
    assert_int_equal(kvr_lease_subject(s, sizeof s, 42), 0);
    assert_string_equal(s, "kvr.frontends.42");
    assert_int_equal(kvr_lease_subject(s, 16, 42), KVR_ELIMIT); /* 16 bytes + NUL */
    uint64_t id = 0;
    assert_int_equal(kvr_lease_subject_id("kvr.frontends.42", &id), 0);
    assert_int_equal(id, 42);
    assert_int_equal(kvr_lease_subject_id("kvr.frontends.18446744073709551615", &id), 0);
    assert_true(id == UINT64_MAX);
    static const char *const bad[] = {
        "kvr.frontends.0",  "kvr.frontends.",
        "kvr.frontends.-1", "kvr.frontends.+1",
        "kvr.frontends. 1", "kvr.frontends.1x",
        "kvrfrontends",     "kvr.frontends.18446744073709551616",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(kvr_lease_subject_id(bad[i], &id), KVR_EINVAL);
}

static void test_beacon(void **state)
{
    (void)state;
    char b[KVR_BEACON_MAX];
    assert_int_equal(kvr_quorum_beacon_encode(b, sizeof b, 3), 1);
    assert_memory_equal(b, "3", 1);
    assert_int_equal(kvr_quorum_beacon_encode(b, sizeof b, 4294967295u), 10);
    assert_memory_equal(b, "4294967295", 10);
    assert_int_equal(kvr_quorum_beacon_encode(b, sizeof b, 0), KVR_EINVAL);
    assert_int_equal(kvr_quorum_beacon_encode(b, sizeof b, 1000000000000000ull), KVR_ELIMIT);
    assert_int_equal(kvr_quorum_beacon_encode(b, 1, 12), KVR_ELIMIT);
    uint64_t id;
    assert_int_equal(kvr_quorum_beacon_decode("3", 1, &id), 0);
    assert_int_equal(id, 3);
    assert_int_equal(kvr_quorum_beacon_decode("999999999999999", 15, &id), 0);
    static const char *const bad[] = {"", "0", "-1", "+1", " 1", "1 ", "1x", "1000000000000000"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(kvr_quorum_beacon_decode(bad[i], strlen(bad[i]), &id), KVR_EINVAL);
    assert_int_equal(kvr_quorum_beacon_decode("1\0", 2, &id), KVR_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lease_golden),
        cmocka_unit_test(test_lease_subject),
        cmocka_unit_test(test_beacon),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
