/* Unit tests for the kvr_mp cursor reader and writer. Byte sequences are written out by hand
 * from the msgpack spec, not produced by our own writer, so reader and writer check each
 * other against an independent reference. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvr_err.h"
#include "kvr_mp.h"

#define RD(name, ...)                                                                      \
    static const uint8_t name##_bytes[] = {__VA_ARGS__};                                  \
    kvr_mp_reader name;                                                                    \
    kvr_mp_reader_init(&name, name##_bytes, sizeof name##_bytes)

static void test_peek_types(void **state)
{
    static const struct {
        uint8_t b[3];
        size_t n;
        kvr_mp_type t;
    } cases[] = {
        {{0x00}, 1, KVR_MP_UINT},       {{0x7f}, 1, KVR_MP_UINT},
        {{0x80}, 1, KVR_MP_MAP},        {{0x8f}, 1, KVR_MP_MAP},
        {{0x90}, 1, KVR_MP_ARRAY},      {{0x9f}, 1, KVR_MP_ARRAY},
        {{0xa0}, 1, KVR_MP_STR},        {{0xbf}, 1, KVR_MP_STR},
        {{0xc0}, 1, KVR_MP_NIL},        {{0xc1}, 1, KVR_MP_INVALID},
        {{0xc2}, 1, KVR_MP_BOOL},       {{0xc3}, 1, KVR_MP_BOOL},
        {{0xc4}, 1, KVR_MP_BIN},        {{0xc6}, 1, KVR_MP_BIN},
        {{0xc7}, 1, KVR_MP_EXT},        {{0xd8}, 1, KVR_MP_EXT},
        {{0xca}, 1, KVR_MP_FLOAT},      {{0xcb}, 1, KVR_MP_FLOAT},
        {{0xcc}, 1, KVR_MP_UINT},       {{0xcf}, 1, KVR_MP_UINT},
        {{0xd0, 0x05}, 2, KVR_MP_UINT}, {{0xd0, 0xff}, 2, KVR_MP_INT},
        {{0xd3, 0x80}, 2, KVR_MP_INT},  {{0xd9}, 1, KVR_MP_STR},
        {{0xdb}, 1, KVR_MP_STR},        {{0xdc}, 1, KVR_MP_ARRAY},
        {{0xdd}, 1, KVR_MP_ARRAY},      {{0xde}, 1, KVR_MP_MAP},
        {{0xdf}, 1, KVR_MP_MAP},        {{0xe0}, 1, KVR_MP_INT},
        {{0xff}, 1, KVR_MP_INT},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kvr_mp_reader r;
        kvr_mp_reader_init(&r, cases[i].b, cases[i].n);
        assert_int_equal(kvr_mp_peek(&r), cases[i].t);
    }
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, "", 0);
    assert_int_equal(kvr_mp_peek(&r), KVR_MP_INVALID);
}

static void test_read_uint_all_widths(void **state)
{
    RD(r, 0x05, 0xcc, 0xff, 0xcd, 0x12, 0x34, 0xce, 0xde, 0xad, 0xbe, 0xef, 0xcf, 0xff, 0xff,
       0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xd0, 0x7f, 0xd3, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
       0x00, 0x01);
    uint64_t v;
    assert_int_equal(kvr_mp_read_uint(&r, &v), 0);
    assert_int_equal(v, 5);
    assert_int_equal(kvr_mp_read_uint(&r, &v), 0);
    assert_int_equal(v, 255);
    assert_int_equal(kvr_mp_read_uint(&r, &v), 0);
    assert_int_equal(v, 0x1234);
    assert_int_equal(kvr_mp_read_uint(&r, &v), 0);
    assert_int_equal(v, 0xdeadbeef);
    assert_int_equal(kvr_mp_read_uint(&r, &v), 0);
    assert_true(v == UINT64_MAX);
    assert_int_equal(kvr_mp_read_uint(&r, &v), 0);
    assert_int_equal(v, 127);
    assert_int_equal(kvr_mp_read_uint(&r, &v), 0);
    assert_int_equal(v, 1);
    assert_int_equal(kvr_mp_remaining(&r), 0);
    assert_int_equal(kvr_mp_read_uint(&r, &v), KVR_ETRUNC);
}

static void test_read_uint_refuses_negative_without_moving(void **state)
{
    RD(r, 0xff, 0xd0, 0x80);
    uint64_t v = 77;
    assert_int_equal(kvr_mp_read_uint(&r, &v), KVR_ETYPE);
    assert_int_equal(kvr_mp_remaining(&r), 3);
    assert_int_equal(v, 77);
    int64_t s;
    assert_int_equal(kvr_mp_read_int(&r, &s), 0);
    assert_int_equal(s, -1);
    assert_int_equal(kvr_mp_read_uint(&r, &v), KVR_ETYPE);
    assert_int_equal(kvr_mp_remaining(&r), 2);
    assert_int_equal(kvr_mp_read_int(&r, &s), 0);
    assert_int_equal(s, -128);
}

static void test_read_int_widths_and_range(void **state)
{
    RD(r, 0xe0, 0xd1, 0x80, 0x00, 0xd2, 0x80, 0x00, 0x00, 0x00, 0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0,
       0xcf, 0x80, 0, 0, 0, 0, 0, 0, 0);
    int64_t s;
    assert_int_equal(kvr_mp_read_int(&r, &s), 0);
    assert_int_equal(s, -32);
    assert_int_equal(kvr_mp_read_int(&r, &s), 0);
    assert_int_equal(s, INT16_MIN);
    assert_int_equal(kvr_mp_read_int(&r, &s), 0);
    assert_int_equal(s, INT32_MIN);
    assert_int_equal(kvr_mp_read_int(&r, &s), 0);
    assert_true(s == INT64_MIN);
    /* 2^63 as uint64 does not fit int64 */
    size_t left = kvr_mp_remaining(&r);
    assert_int_equal(kvr_mp_read_int(&r, &s), KVR_ETYPE);
    assert_int_equal(kvr_mp_remaining(&r), left);
    uint64_t u;
    assert_int_equal(kvr_mp_read_u64bits(&r, &u), 0);
    assert_true(u == (uint64_t)1 << 63);
}

static void test_read_u64bits_negative_pattern(void **state)
{
    RD(r, 0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0xf0);
    uint64_t u;
    assert_int_equal(kvr_mp_read_u64bits(&r, &u), 0);
    assert_true(u == UINT64_MAX - 1);
    assert_int_equal(kvr_mp_read_u64bits(&r, &u), 0);
    assert_true(u == (uint64_t)(int64_t)-16);
}

static void test_integer_truncation_every_width(void **state)
{
    static const uint8_t tags[] = {0xcc, 0xcd, 0xce, 0xcf, 0xd0, 0xd1, 0xd2, 0xd3};
    static const size_t widths[] = {1, 2, 4, 8, 1, 2, 4, 8};
    uint8_t buf[9] = {0};
    for (size_t i = 0; i < sizeof tags; i++) {
        buf[0] = tags[i];
        for (size_t n = 1; n <= widths[i]; n++) {
            kvr_mp_reader r;
            kvr_mp_reader_init(&r, buf, n);
            uint64_t u;
            int64_t s;
            double d;
            assert_int_equal(kvr_mp_read_u64bits(&r, &u), KVR_ETRUNC);
            assert_int_equal(kvr_mp_read_int(&r, &s), KVR_ETRUNC);
            assert_int_equal(kvr_mp_read_double(&r, &d), KVR_ETRUNC);
            assert_int_equal(kvr_mp_skip(&r), KVR_ETRUNC);
            assert_int_equal(kvr_mp_remaining(&r), n);
        }
    }
}

static void test_read_double(void **state)
{
    /* 1.5 as float32: 3fc00000; 0.1 as float64: 3fb999999999999a; int -3 */
    RD(r, 0xca, 0x3f, 0xc0, 0x00, 0x00, 0xcb, 0x3f, 0xb9, 0x99, 0x99, 0x99, 0x99, 0x99, 0x9a,
       0xfd, 0xcd, 0x01, 0x00, 0xa1, 'x', 0xcb, 0x00);
    double d;
    assert_int_equal(kvr_mp_read_double(&r, &d), 0);
    assert_true(d == 1.5);
    assert_int_equal(kvr_mp_read_double(&r, &d), 0);
    assert_true(d == 0.1);
    assert_int_equal(kvr_mp_read_double(&r, &d), 0);
    assert_true(d == -3.0);
    assert_int_equal(kvr_mp_read_double(&r, &d), 0);
    assert_true(d == 256.0);
    assert_int_equal(kvr_mp_read_double(&r, &d), KVR_ETYPE);
    kvr_slice s;
    assert_int_equal(kvr_mp_read_str(&r, &s), 0);
    assert_int_equal(kvr_mp_read_double(&r, &d), KVR_ETRUNC);
    assert_int_equal(kvr_mp_remaining(&r), 2);
}

static void test_nil_bool(void **state)
{
    RD(r, 0xc0, 0xc2, 0xc3, 0x01);
    bool b;
    assert_int_equal(kvr_mp_read_bool(&r, &b), KVR_ETYPE);
    assert_int_equal(kvr_mp_read_nil(&r), 0);
    assert_int_equal(kvr_mp_read_nil(&r), KVR_ETYPE);
    assert_int_equal(kvr_mp_read_bool(&r, &b), 0);
    assert_false(b);
    assert_int_equal(kvr_mp_read_bool(&r, &b), 0);
    assert_true(b);
    assert_int_equal(kvr_mp_read_bool(&r, &b), KVR_ETYPE);
    uint64_t u;
    assert_int_equal(kvr_mp_read_uint(&r, &u), 0);
    assert_int_equal(kvr_mp_read_nil(&r), KVR_ETRUNC);
    assert_int_equal(kvr_mp_read_bool(&r, &b), KVR_ETRUNC);
}

static void test_str_bin(void **state)
{
    RD(r, 0xa3, 'a', 'b', 'c', 0xd9, 0x02, 'h', 'i', 0xc4, 0x03, 1, 2, 3, 0xc5, 0x00, 0x01, 9,
       0xda, 0x00, 0x00, 0xa5, 'x');
    kvr_slice s;
    assert_int_equal(kvr_mp_read_bin(&r, &s), KVR_ETYPE);
    assert_int_equal(kvr_mp_read_str(&r, &s), 0);
    assert_true(kvr_slice_eq_cstr(s, "abc"));
    assert_int_equal(kvr_mp_read_bytes(&r, &s), 0);
    assert_true(kvr_slice_eq_cstr(s, "hi"));
    assert_int_equal(kvr_mp_read_str(&r, &s), KVR_ETYPE);
    assert_int_equal(kvr_mp_read_bin(&r, &s), 0);
    assert_int_equal(s.len, 3);
    assert_int_equal((uint8_t)s.base[2], 3);
    assert_int_equal(kvr_mp_read_bytes(&r, &s), 0);
    assert_int_equal(s.len, 1);
    assert_int_equal(kvr_mp_read_str(&r, &s), 0);
    assert_int_equal(s.len, 0);
    /* fixstr claiming 5 bytes with 1 left */
    assert_int_equal(kvr_mp_read_str(&r, &s), KVR_ETRUNC);
    assert_int_equal(kvr_mp_remaining(&r), 2);
}

static void test_str32_huge_length_is_truncation(void **state)
{
    RD(r, 0xdb, 0xff, 0xff, 0xff, 0xff, 'a');
    kvr_slice s;
    assert_int_equal(kvr_mp_read_str(&r, &s), KVR_ETRUNC);
    assert_int_equal(kvr_mp_skip(&r), KVR_ETRUNC);
    RD(b, 0xc6, 0x7f, 0xff, 0xff, 0xff);
    assert_int_equal(kvr_mp_read_bin(&b, &s), KVR_ETRUNC);
    assert_int_equal(kvr_mp_remaining(&b), 5);
}

static void test_array_map_headers(void **state)
{
    RD(r, 0x92, 0x01, 0x02, 0xdc, 0x00, 0x01, 0xc0, 0x81, 0xa1, 'k', 0x01, 0xdf, 0, 0, 0, 0);
    uint32_t n;
    assert_int_equal(kvr_mp_read_map(&r, &n), KVR_ETYPE);
    assert_int_equal(kvr_mp_read_array(&r, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(kvr_mp_skip(&r), 0);
    assert_int_equal(kvr_mp_skip(&r), 0);
    assert_int_equal(kvr_mp_read_array(&r, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(kvr_mp_read_nil(&r), 0);
    assert_int_equal(kvr_mp_read_array(&r, &n), KVR_ETYPE);
    assert_int_equal(kvr_mp_read_map(&r, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(kvr_mp_skip(&r), 0);
    assert_int_equal(kvr_mp_skip(&r), 0);
    assert_int_equal(kvr_mp_read_map(&r, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(kvr_mp_remaining(&r), 0);
}

static void test_count_over_remaining_is_refused(void **state)
{
    /* array32 claiming 100 M elements: refused before anyone sizes memory from it */
    RD(r, 0xdd, 0x05, 0xf5, 0xe1, 0x00);
    uint32_t n = 0;
    assert_int_equal(kvr_mp_read_array(&r, &n), KVR_ELIMIT);
    assert_int_equal(n, 0);
    assert_int_equal(kvr_mp_remaining(&r), 5);
    assert_int_equal(kvr_mp_skip(&r), KVR_ELIMIT);
    assert_int_equal(kvr_mp_remaining(&r), 5);
    /* map of 2 pairs needs at least 4 bytes; 3 are left */
    RD(m, 0x82, 0x01, 0x02, 0x03);
    assert_int_equal(kvr_mp_read_map(&m, &n), KVR_ELIMIT);
    /* exactly enough */
    RD(a, 0x93, 0x01, 0x02, 0x03);
    assert_int_equal(kvr_mp_read_array(&a, &n), 0);
    assert_int_equal(n, 3);
    /* truncated headers */
    RD(t, 0xdc, 0x00);
    assert_int_equal(kvr_mp_read_array(&t, &n), KVR_ETRUNC);
    RD(t2, 0xdf, 0x00, 0x00);
    assert_int_equal(kvr_mp_read_map(&t2, &n), KVR_ETRUNC);
}

static void test_skip_all_types(void **state)
{
    /* one of each: nil, true, fixint, negfixint, u16, i64, f32, f64, fixstr, str8, bin8,
     * fixext1, fixext16, ext8, ext16, nested map {"a":[1,{}]} */
    RD(r, 0xc0, 0xc3, 0x05, 0xff, 0xcd, 1, 2, 0xd3, 0, 0, 0, 0, 0, 0, 0, 1, 0xca, 0, 0, 0, 0, 0xcb,
       0, 0, 0, 0, 0, 0, 0, 0, 0xa2, 'o', 'k', 0xd9, 1, 'z', 0xc4, 2, 7, 7, 0xd4, 1, 9, 0xd8, 1, 0,
       0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xc7, 2, 5, 1, 1, 0xc8, 0, 1, 5, 1, 0x81,
       0xa1, 'a', 0x92, 0x01, 0x80, 0x2a);
    int n = 0;
    while (kvr_mp_peek(&r) != KVR_MP_INVALID && kvr_mp_remaining(&r) > 1) {
        assert_int_equal(kvr_mp_skip(&r), 0);
        n++;
    }
    assert_int_equal(n, 16);
    uint64_t v;
    assert_int_equal(kvr_mp_read_uint(&r, &v), 0);
    assert_int_equal(v, 42);
}

static void test_skip_invalid_byte(void **state)
{
    RD(r, 0x92, 0x01, 0xc1);
    assert_int_equal(kvr_mp_skip(&r), KVR_ETYPE);
    assert_int_equal(kvr_mp_remaining(&r), 3);
}

static void nest(uint8_t *buf, size_t depth)
{
    for (size_t i = 0; i < depth; i++)
        buf[i] = 0x91;
    buf[depth] = 0x00;
}

static void test_skip_depth_bound(void **state)
{
    uint8_t buf[1001];
    kvr_mp_reader r;
    nest(buf, KVR_MP_MAX_DEPTH);
    kvr_mp_reader_init(&r, buf, KVR_MP_MAX_DEPTH + 1);
    assert_int_equal(kvr_mp_skip(&r), 0);
    assert_int_equal(kvr_mp_remaining(&r), 0);

    nest(buf, KVR_MP_MAX_DEPTH + 1);
    kvr_mp_reader_init(&r, buf, KVR_MP_MAX_DEPTH + 2);
    assert_int_equal(kvr_mp_skip(&r), KVR_ELIMIT);
    assert_int_equal(kvr_mp_remaining(&r), KVR_MP_MAX_DEPTH + 2);

    nest(buf, 1000);
    kvr_mp_reader_init(&r, buf, 1001);
    assert_int_equal(kvr_mp_skip(&r), KVR_ELIMIT);
    assert_int_equal(kvr_mp_remaining(&r), 1001);

    /* many siblings at depth 1 are not depth */
    uint8_t wide[3 + 1000];
    wide[0] = 0xdc;
    wide[1] = 1000 >> 8;
    wide[2] = 1000 & 0xff;
    for (int i = 0; i < 1000; i++)
        wide[3 + i] = 0x90;
    kvr_mp_reader_init(&r, wide, sizeof wide);
    assert_int_equal(kvr_mp_skip(&r), 0);
    assert_int_equal(kvr_mp_remaining(&r), 0);
}

static void test_skip_truncated_nested_restores(void **state)
{
    RD(r, 0x93, 0x01, 0x92, 0x02);
    assert_int_equal(kvr_mp_skip(&r), KVR_ELIMIT); /* outer needs 3 bytes, has 3: inner fails */
    assert_int_equal(kvr_mp_remaining(&r), 4);
    RD(r2, 0x92, 0x01, 0xa3, 'a');
    assert_int_equal(kvr_mp_skip(&r2), KVR_ETRUNC);
    assert_int_equal(kvr_mp_remaining(&r2), 4);
}

/* ---- writer ---- */

static void expect_bytes(kvr_buf *b, const uint8_t *want, size_t n)
{
    assert_int_equal(b->len, n);
    assert_memory_equal(b->base, want, n);
    kvr_buf_reset(b);
}
#define EXPECT(b, ...)                                                                     \
    do {                                                                                   \
        static const uint8_t w_[] = {__VA_ARGS__};                                         \
        expect_bytes((b), w_, sizeof w_);                                                  \
    } while (0)

static void test_write_uint_smallest(void **state)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_mp_write_uint(&b, 0);
    EXPECT(&b, 0x00);
    kvr_mp_write_uint(&b, 127);
    EXPECT(&b, 0x7f);
    kvr_mp_write_uint(&b, 128);
    EXPECT(&b, 0xcc, 0x80);
    kvr_mp_write_uint(&b, 256);
    EXPECT(&b, 0xcd, 0x01, 0x00);
    kvr_mp_write_uint(&b, 65536);
    EXPECT(&b, 0xce, 0x00, 0x01, 0x00, 0x00);
    kvr_mp_write_uint(&b, (uint64_t)1 << 32);
    EXPECT(&b, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0);
    kvr_buf_free(&b);
}

static void test_write_int_smallest(void **state)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_mp_write_int(&b, 5);
    EXPECT(&b, 0x05);
    kvr_mp_write_int(&b, -1);
    EXPECT(&b, 0xff);
    kvr_mp_write_int(&b, -32);
    EXPECT(&b, 0xe0);
    kvr_mp_write_int(&b, -33);
    EXPECT(&b, 0xd0, 0xdf);
    kvr_mp_write_int(&b, -129);
    EXPECT(&b, 0xd1, 0xff, 0x7f);
    kvr_mp_write_int(&b, -32769);
    EXPECT(&b, 0xd2, 0xff, 0xff, 0x7f, 0xff);
    kvr_mp_write_int(&b, INT64_MIN);
    EXPECT(&b, 0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0);
    kvr_buf_free(&b);
}

static void test_write_other(void **state)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_mp_write_nil(&b);
    kvr_mp_write_bool(&b, true);
    kvr_mp_write_bool(&b, false);
    EXPECT(&b, 0xc0, 0xc3, 0xc2);
    kvr_mp_write_double(&b, 1.5);
    EXPECT(&b, 0xca, 0x3f, 0xc0, 0x00, 0x00);
    kvr_mp_write_double(&b, 0.1);
    EXPECT(&b, 0xcb, 0x3f, 0xb9, 0x99, 0x99, 0x99, 0x99, 0x99, 0x9a);
    kvr_mp_write_cstr(&b, "abc");
    EXPECT(&b, 0xa3, 'a', 'b', 'c');
    char s32[32];
    memset(s32, 'q', sizeof s32);
    kvr_mp_write_str(&b, s32, 32);
    assert_int_equal(b.len, 34);
    assert_int_equal((uint8_t)b.base[0], 0xd9);
    assert_int_equal((uint8_t)b.base[1], 32);
    kvr_buf_reset(&b);
    kvr_mp_write_bin(&b, "\x01\x02", 2);
    EXPECT(&b, 0xc4, 0x02, 0x01, 0x02);
    kvr_mp_write_array(&b, 15);
    kvr_mp_write_array(&b, 16);
    kvr_mp_write_array(&b, 70000);
    EXPECT(&b, 0x9f, 0xdc, 0x00, 0x10, 0xdd, 0x00, 0x01, 0x11, 0x70);
    kvr_mp_write_map(&b, 2);
    kvr_mp_write_map(&b, 300);
    EXPECT(&b, 0x82, 0xde, 0x01, 0x2c);
    kvr_buf_free(&b);
}

static void test_write_read_roundtrip_ints(void **state)
{
    static const int64_t vals[] = {0,    1,     31,    32,     127,       128,       255,
                                   256,  65535, 65536, -1,     -32,       -33,       -128,
                                   -129, -32768, -32769, INT32_MIN, (int64_t)INT32_MIN - 1,
                                   INT64_MIN, INT64_MAX};
    kvr_buf b;
    kvr_buf_init(&b);
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++)
        assert_int_equal(kvr_mp_write_int(&b, vals[i]), 0);
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, b.base, b.len);
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        assert_int_equal(kvr_mp_peek(&r), vals[i] < 0 ? KVR_MP_INT : KVR_MP_UINT);
        int64_t v;
        assert_int_equal(kvr_mp_read_int(&r, &v), 0);
        assert_true(v == vals[i]);
    }
    assert_int_equal(kvr_mp_remaining(&r), 0);
    kvr_buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_peek_types),
        cmocka_unit_test(test_read_uint_all_widths),
        cmocka_unit_test(test_read_uint_refuses_negative_without_moving),
        cmocka_unit_test(test_read_int_widths_and_range),
        cmocka_unit_test(test_read_u64bits_negative_pattern),
        cmocka_unit_test(test_integer_truncation_every_width),
        cmocka_unit_test(test_read_double),
        cmocka_unit_test(test_nil_bool),
        cmocka_unit_test(test_str_bin),
        cmocka_unit_test(test_str32_huge_length_is_truncation),
        cmocka_unit_test(test_array_map_headers),
        cmocka_unit_test(test_count_over_remaining_is_refused),
        cmocka_unit_test(test_skip_all_types),
        cmocka_unit_test(test_skip_invalid_byte),
        cmocka_unit_test(test_skip_depth_bound),
        cmocka_unit_test(test_skip_truncated_nested_restores),
        cmocka_unit_test(test_write_uint_smallest),
        cmocka_unit_test(test_write_int_smallest),
        cmocka_unit_test(test_write_other),
        cmocka_unit_test(test_write_read_roundtrip_ints),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
