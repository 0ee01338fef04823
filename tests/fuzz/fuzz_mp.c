/* libFuzzer target for the kvr_mp cursor: walks arbitrary bytes value by value twice, once
 * with kvr_mp_skip and once with the typed readers (recursing into containers), and checks
 * that they agree, that errors leave the cursor unmoved, that no count exceeds the bytes
 * left, and that every value read re-encodes (smallest encoding) to something that reads back
 * the same. Any violation aborts. */
#include "kvr_err.h"
#include "kvr_mp.h"
#include "fuzz_check.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static kvr_buf g_w; /* writer scratch, reused */

static kvr_mp_reader reread(void)
{
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, g_w.base, g_w.len);
    return r;
}

/* Reads one value with the typed readers. Returns what kvr_mp_skip would. */
static int walk(kvr_mp_reader *r, int depth)
{
    const uint8_t *start = r->p;
    kvr_mp_type t = kvr_mp_peek(r);
    int rv;
    kvr_buf_reset(&g_w);
    switch (t) {
    case KVR_MP_NIL:
        rv = kvr_mp_read_nil(r);
        break;
    case KVR_MP_BOOL: {
        bool v;
        rv = kvr_mp_read_bool(r, &v);
        if (rv == 0) {
            CHECK(kvr_mp_write_bool(&g_w, v) == 0);
            kvr_mp_reader q = reread();
            bool w;
            CHECK(kvr_mp_read_bool(&q, &w) == 0 && w == v);
        }
        break;
    }
    case KVR_MP_UINT: {
        uint64_t v;
        rv = kvr_mp_read_uint(r, &v);
        if (rv == 0) {
            CHECK((size_t)(r->p - start) >= 1);
            CHECK(kvr_mp_write_uint(&g_w, v) == 0);
            CHECK(g_w.len <= (size_t)(r->p - start)); /* smallest encoding */
            kvr_mp_reader q = reread();
            uint64_t w;
            CHECK(kvr_mp_read_uint(&q, &w) == 0 && w == v && kvr_mp_remaining(&q) == 0);
        }
        break;
    }
    case KVR_MP_INT: {
        int64_t v;
        rv = kvr_mp_read_int(r, &v);
        if (rv == 0) {
            CHECK(v < 0);
            CHECK(kvr_mp_write_int(&g_w, v) == 0);
            CHECK(g_w.len <= (size_t)(r->p - start));
            kvr_mp_reader q = reread();
            int64_t w;
            CHECK(kvr_mp_read_int(&q, &w) == 0 && w == v);
        }
        break;
    }
    case KVR_MP_FLOAT: {
        double v;
        rv = kvr_mp_read_double(r, &v);
        if (rv == 0) {
            CHECK(kvr_mp_write_double(&g_w, v) == 0);
            kvr_mp_reader q = reread();
            double w;
            CHECK(kvr_mp_read_double(&q, &w) == 0);
            CHECK(memcmp(&v, &w, sizeof v) == 0 || (isnan(v) && isnan(w)));
        }
        break;
    }
    case KVR_MP_STR:
    case KVR_MP_BIN: {
        kvr_slice s;
        rv = t == KVR_MP_STR ? kvr_mp_read_str(r, &s) : kvr_mp_read_bin(r, &s);
        if (rv == 0) {
            CHECK((const uint8_t *)s.base >= start && (const uint8_t *)s.base + s.len == r->p);
            CHECK((t == KVR_MP_STR ? kvr_mp_write_str(&g_w, s.base, s.len)
                                   : kvr_mp_write_bin(&g_w, s.base, s.len)) == 0);
            CHECK(g_w.len <= (size_t)(r->p - start));
            kvr_mp_reader q = reread();
            kvr_slice s2;
            CHECK(kvr_mp_read_bytes(&q, &s2) == 0 && kvr_slice_eq(s, s2));
        }
        break;
    }
    case KVR_MP_ARRAY:
    case KVR_MP_MAP: {
        uint32_t n;
        bool map = t == KVR_MP_MAP;
        rv = map ? kvr_mp_read_map(r, &n) : kvr_mp_read_array(r, &n);
        if (rv != 0)
            break;
        CHECK((uint64_t)n * (map ? 2 : 1) <= kvr_mp_remaining(r));
        CHECK((map ? kvr_mp_write_map(&g_w, n) : kvr_mp_write_array(&g_w, n)) == 0);
        size_t hdr = g_w.len;
        CHECK(hdr <= (size_t)(r->p - start));
        for (uint64_t i = 0; i < (uint64_t)n * (map ? 2 : 1); i++)
            CHECK(kvr_mp_write_nil(&g_w) == 0);
        kvr_mp_reader q = reread();
        uint32_t n2;
        CHECK((map ? kvr_mp_read_map(&q, &n2) : kvr_mp_read_array(&q, &n2)) == 0 && n2 == n);
        CHECK(kvr_mp_remaining(&q) == g_w.len - hdr);
        if (n > 0 && depth == KVR_MP_MAX_DEPTH) {
            rv = KVR_ELIMIT;
            break;
        }
        uint64_t items = (uint64_t)n * (map ? 2 : 1);
        for (uint64_t i = 0; i < items && rv == 0; i++)
            rv = walk(r, depth + 1);
        break;
    }
    case KVR_MP_EXT:
        rv = kvr_mp_skip(r);
        break;
    default:
        rv = kvr_mp_remaining(r) == 0 ? KVR_ETRUNC : KVR_ETYPE;
        break;
    }
    if (rv != 0)
        r->p = start;
    CHECK(r->p <= r->end);
    return rv;
}

/* Every typed reader on a value of another type must say ETYPE and not move. */
static void wrong_types(const kvr_mp_reader *r)
{
    kvr_mp_type t = kvr_mp_peek(r);
    kvr_mp_reader c = *r;
    uint64_t u;
    int64_t i;
    double dv;
    bool b;
    kvr_slice s;
    uint32_t n;
    int rv;
#define TRYT(cond, call)                                                                   \
    do {                                                                                   \
        c = *r;                                                                            \
        rv = (call);                                                                       \
        if (cond)                                                                          \
            CHECK(rv == KVR_ETYPE || rv == KVR_ETRUNC);                                    \
        if (rv != 0)                                                                       \
            CHECK(c.p == r->p);                                                            \
    } while (0)
    TRYT(t != KVR_MP_NIL, kvr_mp_read_nil(&c));
    TRYT(t != KVR_MP_BOOL, kvr_mp_read_bool(&c, &b));
    TRYT(t != KVR_MP_UINT, kvr_mp_read_uint(&c, &u));
    TRYT(t != KVR_MP_UINT && t != KVR_MP_INT, kvr_mp_read_int(&c, &i));
    TRYT(t != KVR_MP_UINT && t != KVR_MP_INT, kvr_mp_read_u64bits(&c, &u));
    TRYT(t != KVR_MP_UINT && t != KVR_MP_INT && t != KVR_MP_FLOAT, kvr_mp_read_double(&c, &dv));
    TRYT(t != KVR_MP_STR, kvr_mp_read_str(&c, &s));
    TRYT(t != KVR_MP_BIN, kvr_mp_read_bin(&c, &s));
    TRYT(t != KVR_MP_STR && t != KVR_MP_BIN, kvr_mp_read_bytes(&c, &s));
    TRYT(t != KVR_MP_ARRAY, kvr_mp_read_array(&c, &n));
    TRYT(t != KVR_MP_MAP, kvr_mp_read_map(&c, &n));
#undef TRYT
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kvr_mp_reader a, b;
    kvr_mp_reader_init(&a, data, size);
    kvr_mp_reader_init(&b, data, size);
    /* wrong_types is costly per value: check it on the first values only, so long inputs
     * of tiny values still run at a useful rate. */
    for (int i = 0; kvr_mp_remaining(&a) > 0; i++) {
        if (i < 64)
            wrong_types(&a);
        const uint8_t *before = a.p;
        int ra = kvr_mp_skip(&a);
        int rb = walk(&b, 0);
        CHECK(ra == rb);
        CHECK(a.p == b.p);
        if (ra != 0) {
            CHECK(a.p == before);
            break;
        }
        CHECK(a.p > before);
    }
    return 0;
}
