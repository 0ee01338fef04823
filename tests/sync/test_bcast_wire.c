/* Golden vectors of the best-effort booking broadcast (sync/bcast_wire.h) on kvr.route.bcast:
 * routers of different builds read each other's broadcasts, so the bytes may not change
 * silently. The command inside is pinned by sync_cmd's vectors (the FREE and the pinned ROUTE
 * here are its vectors 3 and 1); the envelope was written with Python msgpack and matches what
 * bookings_best_effort.c sent before the codec moved out of it (issue 11). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "bcast_wire.h"

static const char *GOLD_FREE = "9207c415019203c4105a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
static const char *GOLD_ROUTE =
    "92cf1122334455667788c438019a01c4100102030405060708090a0b0c0d0e0f102acf0000019af232b27bcd01"
    "2caa6c6c616d612d332d3862a470726f64079192070cc3";

static const kvr_route_candidate CAND[1] = {{7, 12}};

static void gold_route(kvr_cmd *c)
{
    memset(c, 0, sizeof *c);
    c->type = KVR_CMD_ROUTE;
    for (int k = 0; k < 16; k++)
        c->u.route.request_id[k] = (uint8_t)(k + 1);
    c->u.route.frontend_id = 42;
    c->u.route.now_ms = 1765000000123ull;
    c->u.route.request_blocks = 300;
    c->u.route.model = kvr_slice_of("llama-3-8b");
    c->u.route.ns = kvr_slice_of("prod");
    c->u.route.pin_worker = 7;
    c->u.route.only_candidates = true;
    c->u.route.candidates = CAND;
    c->u.route.n_candidates = 1;
}

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
    char hex[1024];
    assert_true(b->len * 2 < sizeof hex);
    for (size_t i = 0; i < b->len; i++)
        sprintf(hex + 2 * i, "%02x", (unsigned)(uint8_t)b->base[i]);
    hex[2 * b->len] = 0;
    if (strcmp(hex, gold) != 0)
        fail_msg("encoded %s, golden %s", hex, gold);
}

static void test_encode_golden(void **state)
{
    (void)state;
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_cmd c;
    memset(&c, 0, sizeof c);
    c.type = KVR_CMD_FREE;
    memset(c.u.request_id, 0x5a, 16);
    assert_int_equal(kvr_bcast_encode(&b, 7, &c), 0);
    assert_hex(&b, GOLD_FREE);
    kvr_buf_reset(&b);
    gold_route(&c);
    assert_int_equal(kvr_bcast_encode(&b, 0x1122334455667788ull, &c), 0);
    assert_hex(&b, GOLD_ROUTE);
    /* a command over its bounds is refused and nothing is appended */
    size_t before = b.len;
    c.u.route.ns =
        kvr_slice_of("a-namespace-name-that-is-much-longer-than-the-sixty-three-bytes-allowed");
    assert_int_not_equal(kvr_bcast_encode(&b, 1, &c), 0);
    assert_int_equal(b.len, before);
    kvr_buf_free(&b);
}

static void test_decode_golden(void **state)
{
    (void)state;
    uint8_t buf[256];
    kvr_route_candidate cand[KVR_FSM_MAX_CANDIDATES];
    kvr_cmd c;
    uint64_t from;
    size_t n = unhex(GOLD_FREE, buf, sizeof buf);
    assert_int_equal(kvr_bcast_decode(buf, n, &from, &c, cand), 0);
    assert_int_equal(from, 7);
    assert_int_equal(c.type, KVR_CMD_FREE);
    assert_int_equal(c.u.request_id[15], 0x5a);
    n = unhex(GOLD_ROUTE, buf, sizeof buf);
    assert_int_equal(kvr_bcast_decode(buf, n, &from, &c, cand), 0);
    assert_true(from == 0x1122334455667788ull);
    assert_int_equal(c.type, KVR_CMD_ROUTE);
    assert_int_equal(c.u.route.pin_worker, 7);
    assert_int_equal(c.u.route.n_candidates, 1);
    assert_int_equal(c.u.route.candidates[0].overlap, 12);
    assert_true(c.u.route.only_candidates);
    assert_int_equal(c.u.route.ns.len, 4);
    /* every truncation is refused */
    for (size_t k = 0; k < n; k++)
        assert_int_not_equal(kvr_bcast_decode(buf, k, &from, &c, cand), 0);
}

static void test_decode_malformed(void **state)
{
    (void)state;
    kvr_route_candidate cand[KVR_FSM_MAX_CANDIDATES];
    kvr_cmd c;
    uint64_t from;
    uint8_t buf[256];
    size_t n = unhex(GOLD_FREE, buf, sizeof buf);
    /* three elements (the frame is exactly two) */
    buf[0] = 0x93;
    assert_int_equal(kvr_bcast_decode(buf, n, &from, &c, cand), KVR_EINVAL);
    /* the command as str, not bin */
    n = unhex(GOLD_FREE, buf, sizeof buf);
    buf[2] = 0xd9;
    assert_int_equal(kvr_bcast_decode(buf, n, &from, &c, cand), KVR_EINVAL);
    /* over the bound: refused before it is read */
    static uint8_t big[KVR_BCAST_MAX_BYTES + 1];
    memcpy(big, buf, n);
    assert_int_equal(kvr_bcast_decode(big, sizeof big, &from, &c, cand), KVR_ELIMIT);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_golden),
        cmocka_unit_test(test_decode_golden),
        cmocka_unit_test(test_decode_malformed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
