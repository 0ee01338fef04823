/* Golden vectors of the forward port's frames (sync/fwd_wire.h): what a follower sends the
 * leader and the leader answers. Replicas of different builds talk over this port during a
 * rolling upgrade, so these bytes may not change silently. The vectors were written with an
 * independent msgpack encoder (Python msgpack, use_single_float: kvr_mp writes a double that a
 * float32 holds exactly as float32) and match what sync_fwd.c sent before the codec moved out
 * of it (issue 11). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fwd_wire.h"
#include "kvr_err.h"

static const char *GOLD_REQ_1 = "00000008930101c403010203";           /* rpc 1, cmd 01 02 03 */
static const char *GOLD_REQ_2 = "0000000d9301cf0000000123456789c400"; /* rpc 2^32+, empty */
static const char *GOLD_REP_OK =
    "0000002e9b0207000101cf11223344556677880ccd012c00b4687474703a2f2f31302e302e302e373a38303030"
    "ca3fc00000";
static const char *GOLD_REP_ERR = "000000109b0208f7000000000000a0ca00000000"; /* EAGAIN, NULL */
/* a reply that says the pool is waking (scale-to-zero): the 12th field, only when true */
static const char *GOLD_REP_WAKING = "000000129c020a00010105030400a175ca3fc00000c3";
/* a reply from a router before the cost field: 10 elements */
static const char *GOLD_REP_OLD = "0000000c9a020900010105030400a175";

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

static kvr_fsm_result gold_result(void)
{
    kvr_fsm_result r;
    memset(&r, 0, sizeof r);
    r.outcome = (kvr_outcome)1;
    r.type = (kvr_cmd_type)1;
    r.worker_id = 0x1122334455667788ull;
    r.overlap = 12;
    r.request_blocks = 300;
    r.cost = 1.5;
    strcpy(r.url, "http://10.0.0.7:8000");
    return r;
}

static void test_encode_golden(void **state)
{
    (void)state;
    kvr_buf b;
    kvr_buf_init(&b);
    assert_int_equal(kvr_fwd_encode_req(&b, 1, "\x01\x02\x03", 3), 0);
    assert_hex(&b, GOLD_REQ_1);
    kvr_buf_reset(&b);
    assert_int_equal(kvr_fwd_encode_req(&b, 0x123456789ull, NULL, 0), 0);
    assert_hex(&b, GOLD_REQ_2);
    kvr_buf_reset(&b);
    kvr_fsm_result r = gold_result();
    assert_int_equal(kvr_fwd_encode_rep(&b, 7, 0, &r), 0);
    assert_hex(&b, GOLD_REP_OK);
    kvr_buf_reset(&b);
    assert_int_equal(kvr_fwd_encode_rep(&b, 8, KVR_EAGAIN, NULL), 0);
    assert_hex(&b, GOLD_REP_ERR);
    kvr_buf_reset(&b);
    memset(&r, 0, sizeof r);
    r.outcome = (kvr_outcome)1;
    r.type = (kvr_cmd_type)1;
    r.worker_id = 5;
    r.overlap = 3;
    r.request_blocks = 4;
    r.cost = 1.5;
    r.pool_waking = true;
    strcpy(r.url, "u");
    assert_int_equal(kvr_fwd_encode_rep(&b, 10, 0, &r), 0);
    assert_hex(&b, GOLD_REP_WAKING);
    kvr_buf_free(&b);
}

/* Decodes the whole frame at hex (one frame, nothing left over). */
static int decode_hex(const char *hex, kvr_fwd_msg *m)
{
    static uint8_t buf[4096];
    size_t n = unhex(hex, buf, sizeof buf);
    kvr_slice body;
    size_t used = 0;
    assert_int_equal(kvr_fwd_frame_next(buf, n, &body, &used), 1);
    assert_int_equal(used, n);
    return kvr_fwd_decode(body.base, body.len, m);
}

static void test_decode_golden(void **state)
{
    (void)state;
    kvr_fwd_msg m;
    assert_int_equal(decode_hex(GOLD_REQ_1, &m), 0);
    assert_int_equal(m.kind, KVR_FWD_REQ);
    assert_int_equal(m.rpc, 1);
    assert_int_equal(m.cmd.len, 3);
    assert_memory_equal(m.cmd.base, "\x01\x02\x03", 3);
    assert_int_equal(decode_hex(GOLD_REQ_2, &m), 0);
    assert_true(m.rpc == 0x123456789ull);
    assert_int_equal(m.cmd.len, 0);

    assert_int_equal(decode_hex(GOLD_REP_OK, &m), 0);
    kvr_fsm_result g = gold_result();
    assert_int_equal(m.kind, KVR_FWD_REP);
    assert_int_equal(m.rpc, 7);
    assert_int_equal(m.status, 0);
    assert_int_equal(m.res.outcome, g.outcome);
    assert_int_equal(m.res.type, g.type);
    assert_true(m.res.worker_id == g.worker_id);
    assert_int_equal(m.res.overlap, 12);
    assert_int_equal(m.res.request_blocks, 300);
    assert_int_equal(m.res.freed, 0);
    assert_true(m.res.cost == 1.5);
    assert_string_equal(m.res.url, g.url);

    assert_int_equal(decode_hex(GOLD_REP_ERR, &m), 0);
    assert_int_equal(m.rpc, 8);
    assert_int_equal(m.status, KVR_EAGAIN);

    assert_int_equal(decode_hex(GOLD_REP_WAKING, &m), 0);
    assert_int_equal(m.rpc, 10);
    assert_true(m.res.pool_waking);
    assert_true(m.res.cost == 1.5);
    assert_int_equal(decode_hex(GOLD_REP_OK, &m), 0);
    assert_false(m.res.pool_waking);

    assert_int_equal(decode_hex(GOLD_REP_OLD, &m), 0);
    assert_int_equal(m.rpc, 9);
    assert_int_equal(m.res.worker_id, 5);
    assert_true(m.res.cost == 0);
    assert_string_equal(m.res.url, "u");
}

/* The length prefix is judged before the body arrives; partial frames wait. */
static void test_framing(void **state)
{
    (void)state;
    uint8_t buf[64];
    size_t n = unhex(GOLD_REQ_1, buf, sizeof buf);
    kvr_slice body;
    size_t used;
    for (size_t k = 0; k < n; k++)
        assert_int_equal(kvr_fwd_frame_next(buf, k, &body, &used), 0);
    /* 64 KiB + 1 announced, only the prefix here: refused at once */
    const uint8_t big[4] = {0x00, 0x01, 0x00, 0x01};
    assert_int_equal(kvr_fwd_frame_next(big, 4, &body, &used), KVR_ELIMIT);
    assert_int_equal(used, KVR_FWD_MAX_FRAME + 1);
    const uint8_t max[4] = {0x00, 0x01, 0x00, 0x00};
    assert_int_equal(kvr_fwd_frame_next(max, 4, &body, &used), 0); /* allowed, incomplete */
    /* two frames back to back */
    uint8_t two[128];
    memcpy(two, buf, n);
    memcpy(two + n, buf, n);
    assert_int_equal(kvr_fwd_frame_next(two, 2 * n, &body, &used), 1);
    assert_int_equal(used, n);
}

static void test_encode_bounds(void **state)
{
    (void)state;
    kvr_buf b;
    kvr_buf_init(&b);
    assert_int_equal(kvr_fwd_encode_req(&b, 1, "x", 1), 0);
    size_t before = b.len;
    static char cmd[KVR_FWD_MAX_FRAME];
    assert_int_equal(kvr_fwd_encode_req(&b, 2, cmd, sizeof cmd), KVR_ELIMIT);
    assert_int_equal(b.len, before); /* nothing half-written */
    kvr_buf_free(&b);
}

static void test_decode_malformed(void **state)
{
    (void)state;
    kvr_fwd_msg m;
    uint8_t buf[256];
    /* not an array */
    assert_int_equal(kvr_fwd_decode("\x01", 1, &m), KVR_EINVAL);
    assert_int_equal(m.kind, 0);
    /* unknown kind */
    assert_int_equal(kvr_fwd_decode("\x93\x03\x01\xc4\x00", 5, &m), KVR_EINVAL);
    assert_int_equal(m.kind, 0);
    /* a request that is too short keeps its kind (the caller logs which) */
    assert_int_equal(kvr_fwd_decode("\x92\x01\x01", 3, &m), KVR_EINVAL);
    assert_int_equal(m.kind, KVR_FWD_REQ);
    /* every truncation of a good reply is refused */
    size_t n = unhex(GOLD_REP_OK, buf, sizeof buf);
    for (size_t k = 4; k < n; k++)
        assert_int_equal(kvr_fwd_decode(buf + 4, k - 4, &m), KVR_EINVAL);
    /* a url over KVR_FSM_URL_MAX */
    kvr_buf b;
    kvr_buf_init(&b);
    char url[KVR_FSM_URL_MAX + 2];
    memset(url, 'a', sizeof url - 1);
    url[sizeof url - 1] = 0;
    /* hand-built: [2, 1, 0, 0, 0, 0, 0, 0, 0, str(KVR_FSM_URL_MAX + 1)] */
    uint8_t hdr[] = {0x9a,
                     0x02,
                     0x01,
                     0x00,
                     0x00,
                     0x00,
                     0x00,
                     0x00,
                     0x00,
                     0x00,
                     0xda,
                     (uint8_t)((KVR_FSM_URL_MAX + 1) >> 8),
                     (uint8_t)(KVR_FSM_URL_MAX + 1)};
    assert_int_equal(kvr_buf_append(&b, hdr, sizeof hdr), 0);
    assert_int_equal(kvr_buf_append(&b, url, KVR_FSM_URL_MAX + 1), 0);
    assert_int_equal(kvr_fwd_decode(b.base, b.len, &m), KVR_EINVAL);
    assert_int_equal(m.kind, KVR_FWD_REP);
    kvr_buf_free(&b);
}

/* A disaggregated ROUTE's reply (fields 12-15): the 12th is written (false), then path, prefill
 * worker and its url; they decode to themselves. Replies without a path keep their bytes
 * (GOLD_REP_OK above). */
static void test_rep_disagg(void **state)
{
    (void)state;
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_fsm_result r = gold_result();
    r.path = KVR_DISAGG_REMOTE;
    r.prefill_worker_id = 42;
    strcpy(r.prefill_url, "http://10.0.0.9:8001");
    assert_int_equal(kvr_fwd_encode_rep(&b, 11, 0, &r), 0);
    assert_int_equal((uint8_t)b.base[4], 0x9f); /* a 15-element array */
    kvr_slice body;
    size_t used = 0;
    assert_int_equal(kvr_fwd_frame_next(b.base, b.len, &body, &used), 1);
    kvr_fwd_msg m;
    assert_int_equal(kvr_fwd_decode(body.base, body.len, &m), 0);
    assert_int_equal(m.res.path, KVR_DISAGG_REMOTE);
    assert_true(m.res.prefill_worker_id == 42);
    assert_string_equal(m.res.prefill_url, "http://10.0.0.9:8001");
    assert_false(m.res.pool_waking);
    assert_string_equal(m.res.url, r.url);
    /* a path out of range is refused */
    uint8_t *pp = memchr(body.base + 20, KVR_DISAGG_REMOTE, body.len - 20);
    while (pp && !(pp[1] == 42)) /* the path byte is followed by the worker id 42 */
        pp = memchr(pp + 1, KVR_DISAGG_REMOTE, (size_t)((const uint8_t *)body.base + body.len - pp - 1));
    assert_non_null(pp);
    *pp = 9;
    assert_int_equal(kvr_fwd_decode(body.base, body.len, &m), KVR_EINVAL);
    kvr_buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_golden),    cmocka_unit_test(test_decode_golden),
        cmocka_unit_test(test_rep_disagg),
        cmocka_unit_test(test_framing),          cmocka_unit_test(test_encode_bounds),
        cmocka_unit_test(test_decode_malformed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
