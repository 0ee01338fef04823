/* kvr_mp: zero-allocation msgpack cursor (see kvr_mp.h).
 *
 * Every reader function decodes into locals first and moves r->p only on success, so any
 * error (truncation, wrong type, limit) leaves the cursor where it was. */
#include "kvr_mp.h"

#include "kvr_err.h"

#include <string.h>

static inline uint16_t be16(const uint8_t *p)
{
    return (uint16_t)((uint16_t)p[0] << 8 | p[1]);
}
static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t be64(const uint8_t *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

kvr_mp_type kvr_mp_peek(const kvr_mp_reader *r)
{
    if (r->p >= r->end)
        return KVR_MP_INVALID;
    uint8_t c = r->p[0];
    if (c <= 0x7f)
        return KVR_MP_UINT;
    if (c <= 0x8f)
        return KVR_MP_MAP;
    if (c <= 0x9f)
        return KVR_MP_ARRAY;
    if (c <= 0xbf)
        return KVR_MP_STR;
    if (c >= 0xe0)
        return KVR_MP_INT;
    size_t left = kvr_mp_remaining(r);
    switch (c) {
    case 0xc0:
        return KVR_MP_NIL;
    case 0xc2:
    case 0xc3:
        return KVR_MP_BOOL;
    case 0xc4:
    case 0xc5:
    case 0xc6:
        return KVR_MP_BIN;
    case 0xc7:
    case 0xc8:
    case 0xc9:
    case 0xd4:
    case 0xd5:
    case 0xd6:
    case 0xd7:
    case 0xd8:
        return KVR_MP_EXT;
    case 0xca:
    case 0xcb:
        return KVR_MP_FLOAT;
    case 0xcc:
    case 0xcd:
    case 0xce:
    case 0xcf:
        return KVR_MP_UINT;
    case 0xd0:
    case 0xd1:
    case 0xd2:
    case 0xd3:
        /* Signed encodings of non-negative values are UINT. The sign lives in the first
         * payload byte; when it is missing the read will report truncation anyway. */
        if (left < 2)
            return KVR_MP_INT;
        return (r->p[1] & 0x80) ? KVR_MP_INT : KVR_MP_UINT;
    case 0xd9:
    case 0xda:
    case 0xdb:
        return KVR_MP_STR;
    case 0xdc:
    case 0xdd:
        return KVR_MP_ARRAY;
    case 0xde:
    case 0xdf:
        return KVR_MP_MAP;
    default: /* 0xc1 */
        return KVR_MP_INVALID;
    }
}

int kvr_mp_read_nil(kvr_mp_reader *r)
{
    if (r->p >= r->end)
        return KVR_ETRUNC;
    if (r->p[0] != 0xc0)
        return KVR_ETYPE;
    r->p++;
    return 0;
}

int kvr_mp_read_bool(kvr_mp_reader *r, bool *v)
{
    if (r->p >= r->end)
        return KVR_ETRUNC;
    if (r->p[0] != 0xc2 && r->p[0] != 0xc3)
        return KVR_ETYPE;
    *v = r->p[0] == 0xc3;
    r->p++;
    return 0;
}

/* Decodes any integer at the cursor: *bits is its 64-bit pattern, *neg whether it is
 * negative, *size the bytes it occupies. Does not move the cursor. */
static int peek_integer(const kvr_mp_reader *r, uint64_t *bits, bool *neg, size_t *size)
{
    if (r->p >= r->end)
        return KVR_ETRUNC;
    const uint8_t *p = r->p;
    size_t left = kvr_mp_remaining(r);
    uint8_t c = p[0];
    if (c <= 0x7f) {
        *bits = c;
        *neg = false;
        *size = 1;
        return 0;
    }
    if (c >= 0xe0) {
        *bits = (uint64_t)(int64_t)(int8_t)c;
        *neg = true;
        *size = 1;
        return 0;
    }
    size_t n;
    switch (c) {
    case 0xcc:
    case 0xd0:
        n = 1;
        break;
    case 0xcd:
    case 0xd1:
        n = 2;
        break;
    case 0xce:
    case 0xd2:
        n = 4;
        break;
    case 0xcf:
    case 0xd3:
        n = 8;
        break;
    default:
        return KVR_ETYPE;
    }
    if (left < 1 + n)
        return KVR_ETRUNC;
    bool is_signed = c >= 0xd0;
    uint64_t u;
    int64_t s;
    switch (n) {
    case 1:
        u = p[1];
        s = (int8_t)p[1];
        break;
    case 2:
        u = be16(p + 1);
        s = (int16_t)be16(p + 1);
        break;
    case 4:
        u = be32(p + 1);
        s = (int32_t)be32(p + 1);
        break;
    default:
        u = be64(p + 1);
        s = (int64_t)u;
        break;
    }
    if (is_signed) {
        *bits = (uint64_t)s;
        *neg = s < 0;
    } else {
        *bits = u;
        *neg = false;
    }
    *size = 1 + n;
    return 0;
}

int kvr_mp_read_uint(kvr_mp_reader *r, uint64_t *v)
{
    uint64_t bits;
    bool neg;
    size_t size;
    int rv = peek_integer(r, &bits, &neg, &size);
    if (rv != 0)
        return rv;
    if (neg)
        return KVR_ETYPE;
    *v = bits;
    r->p += size;
    return 0;
}

int kvr_mp_read_int(kvr_mp_reader *r, int64_t *v)
{
    uint64_t bits;
    bool neg;
    size_t size;
    int rv = peek_integer(r, &bits, &neg, &size);
    if (rv != 0)
        return rv;
    if (!neg && bits > (uint64_t)INT64_MAX)
        return KVR_ETYPE; /* a uint64 that does not fit int64 */
    *v = (int64_t)bits;
    r->p += size;
    return 0;
}

int kvr_mp_read_u64bits(kvr_mp_reader *r, uint64_t *v)
{
    uint64_t bits;
    bool neg;
    size_t size;
    int rv = peek_integer(r, &bits, &neg, &size);
    if (rv != 0)
        return rv;
    *v = bits;
    r->p += size;
    return 0;
}

int kvr_mp_read_double(kvr_mp_reader *r, double *v)
{
    if (r->p >= r->end)
        return KVR_ETRUNC;
    uint8_t c = r->p[0];
    size_t left = kvr_mp_remaining(r);
    if (c == 0xca) {
        if (left < 5)
            return KVR_ETRUNC;
        uint32_t u = be32(r->p + 1);
        float f;
        memcpy(&f, &u, sizeof f);
        *v = f;
        r->p += 5;
        return 0;
    }
    if (c == 0xcb) {
        if (left < 9)
            return KVR_ETRUNC;
        uint64_t u = be64(r->p + 1);
        double d;
        memcpy(&d, &u, sizeof d);
        *v = d;
        r->p += 9;
        return 0;
    }
    uint64_t bits;
    bool neg;
    size_t size;
    int rv = peek_integer(r, &bits, &neg, &size);
    if (rv != 0)
        return rv;
    *v = neg ? (double)(int64_t)bits : (double)bits;
    r->p += size;
    return 0;
}

/* Header of a str (want_str) or bin at the cursor: *hdr bytes of header, *len payload bytes.
 * ETYPE for anything else. Does not check the payload against the bytes left. */
static int peek_strbin(const kvr_mp_reader *r, bool want_str, bool want_bin, size_t *hdr,
                       size_t *len)
{
    if (r->p >= r->end)
        return KVR_ETRUNC;
    const uint8_t *p = r->p;
    size_t left = kvr_mp_remaining(r);
    uint8_t c = p[0];
    if (want_str && c >= 0xa0 && c <= 0xbf) {
        *hdr = 1;
        *len = c & 0x1f;
        return 0;
    }
    size_t n;
    if (want_str && c >= 0xd9 && c <= 0xdb)
        n = (size_t)1 << (c - 0xd9);
    else if (want_bin && c >= 0xc4 && c <= 0xc6)
        n = (size_t)1 << (c - 0xc4);
    else
        return KVR_ETYPE;
    if (left < 1 + n)
        return KVR_ETRUNC;
    *hdr = 1 + n;
    *len = n == 1 ? p[1] : n == 2 ? be16(p + 1) : be32(p + 1);
    return 0;
}

static int read_strbin(kvr_mp_reader *r, bool want_str, bool want_bin, kvr_slice *s)
{
    size_t hdr, len;
    int rv = peek_strbin(r, want_str, want_bin, &hdr, &len);
    if (rv != 0)
        return rv;
    if (len > kvr_mp_remaining(r) - hdr)
        return KVR_ETRUNC;
    s->base = (const char *)r->p + hdr;
    s->len = len;
    r->p += hdr + len;
    return 0;
}

int kvr_mp_read_str(kvr_mp_reader *r, kvr_slice *s)
{
    return read_strbin(r, true, false, s);
}

int kvr_mp_read_bin(kvr_mp_reader *r, kvr_slice *s)
{
    return read_strbin(r, false, true, s);
}

int kvr_mp_read_bytes(kvr_mp_reader *r, kvr_slice *s)
{
    return read_strbin(r, true, true, s);
}

/* Container header: *hdr bytes, *n elements (pairs for maps). */
static int peek_container(const kvr_mp_reader *r, bool map, size_t *hdr, uint32_t *n)
{
    if (r->p >= r->end)
        return KVR_ETRUNC;
    const uint8_t *p = r->p;
    size_t left = kvr_mp_remaining(r);
    uint8_t c = p[0];
    uint8_t fix = map ? 0x80 : 0x90, b16 = map ? 0xde : 0xdc;
    if ((c & 0xf0) == fix) {
        *hdr = 1;
        *n = c & 0x0f;
        return 0;
    }
    if (c == b16) {
        if (left < 3)
            return KVR_ETRUNC;
        *hdr = 3;
        *n = be16(p + 1);
        return 0;
    }
    if (c == b16 + 1) {
        if (left < 5)
            return KVR_ETRUNC;
        *hdr = 5;
        *n = be32(p + 1);
        return 0;
    }
    return KVR_ETYPE;
}

static int read_container(kvr_mp_reader *r, bool map, uint32_t *n)
{
    size_t hdr;
    uint32_t cnt;
    int rv = peek_container(r, map, &hdr, &cnt);
    if (rv != 0)
        return rv;
    /* Every element takes at least one byte (a map pair two), so a count beyond that is
     * impossible and must not be trusted by anyone sizing memory from it. */
    uint64_t min_bytes = map ? 2 * (uint64_t)cnt : cnt;
    if (min_bytes > kvr_mp_remaining(r) - hdr)
        return KVR_ELIMIT;
    *n = cnt;
    r->p += hdr;
    return 0;
}

int kvr_mp_read_array(kvr_mp_reader *r, uint32_t *n)
{
    return read_container(r, false, n);
}

int kvr_mp_read_map(kvr_mp_reader *r, uint32_t *n)
{
    return read_container(r, true, n);
}

/* Skips one value that is not a container; ETYPE if it is one. */
static int skip_scalar(kvr_mp_reader *r)
{
    if (r->p >= r->end)
        return KVR_ETRUNC;
    const uint8_t *p = r->p;
    size_t left = kvr_mp_remaining(r);
    uint8_t c = p[0];
    uint64_t need; /* total bytes of the value */
    if (c <= 0x7f || c >= 0xe0 || c == 0xc0 || c == 0xc2 || c == 0xc3) {
        need = 1;
    } else if (c >= 0xa0 && c <= 0xbf) {
        need = 1 + (uint64_t)(c & 0x1f);
    } else {
        switch (c) {
        case 0xcc:
        case 0xd0:
            need = 2;
            break;
        case 0xcd:
        case 0xd1:
            need = 3;
            break;
        case 0xce:
        case 0xd2:
        case 0xca:
            need = 5;
            break;
        case 0xcf:
        case 0xd3:
        case 0xcb:
            need = 9;
            break;
        case 0xd4:
            need = 3;
            break;
        case 0xd5:
            need = 4;
            break;
        case 0xd6:
            need = 6;
            break;
        case 0xd7:
            need = 10;
            break;
        case 0xd8:
            need = 18;
            break;
        case 0xc4:
        case 0xd9:
            if (left < 2)
                return KVR_ETRUNC;
            need = 2 + (uint64_t)p[1];
            break;
        case 0xc5:
        case 0xda:
            if (left < 3)
                return KVR_ETRUNC;
            need = 3 + (uint64_t)be16(p + 1);
            break;
        case 0xc6:
        case 0xdb:
            if (left < 5)
                return KVR_ETRUNC;
            need = 5 + (uint64_t)be32(p + 1);
            break;
        case 0xc7: /* ext8: len, type, data */
            if (left < 2)
                return KVR_ETRUNC;
            need = 3 + (uint64_t)p[1];
            break;
        case 0xc8:
            if (left < 3)
                return KVR_ETRUNC;
            need = 4 + (uint64_t)be16(p + 1);
            break;
        case 0xc9:
            if (left < 5)
                return KVR_ETRUNC;
            need = 6 + (uint64_t)be32(p + 1);
            break;
        case 0xc1:
            return KVR_ETYPE; /* never valid */
        default:
            return KVR_ETYPE; /* array or map */
        }
    }
    if (need > left)
        return KVR_ETRUNC;
    r->p += need;
    return 0;
}

int kvr_mp_skip(kvr_mp_reader *r)
{
    /* Iterative: stack[i] counts the values still to skip at depth i (map pairs count 2). */
    uint64_t stack[KVR_MP_MAX_DEPTH + 1];
    int depth = 0;
    const uint8_t *start = r->p;
    stack[0] = 1;
    int rv = 0;
    while (depth >= 0) {
        if (stack[depth] == 0) {
            depth--;
            continue;
        }
        stack[depth]--;
        kvr_mp_type t = kvr_mp_peek(r);
        if (t == KVR_MP_ARRAY || t == KVR_MP_MAP) {
            uint32_t n;
            rv = read_container(r, t == KVR_MP_MAP, &n);
            if (rv != 0)
                goto fail;
            if (n == 0)
                continue;
            if (depth == KVR_MP_MAX_DEPTH) {
                rv = KVR_ELIMIT;
                goto fail;
            }
            stack[++depth] = t == KVR_MP_MAP ? 2 * (uint64_t)n : n;
        } else {
            rv = skip_scalar(r);
            if (rv != 0)
                goto fail;
        }
    }
    return 0;
fail:
    r->p = start;
    return rv;
}

/* ---- writer ---- */

static int put(kvr_buf *b, const uint8_t *p, size_t n)
{
    return kvr_buf_append(b, p, n);
}

static int put_tag_be(kvr_buf *b, uint8_t tag, uint64_t v, size_t n)
{
    uint8_t tmp[9];
    tmp[0] = tag;
    for (size_t i = 0; i < n; i++)
        tmp[1 + i] = (uint8_t)(v >> (8 * (n - 1 - i)));
    return put(b, tmp, 1 + n);
}

int kvr_mp_write_nil(kvr_buf *b)
{
    uint8_t c = 0xc0;
    return put(b, &c, 1);
}

int kvr_mp_write_bool(kvr_buf *b, bool v)
{
    uint8_t c = v ? 0xc3 : 0xc2;
    return put(b, &c, 1);
}

int kvr_mp_write_uint(kvr_buf *b, uint64_t v)
{
    if (v <= 0x7f) {
        uint8_t c = (uint8_t)v;
        return put(b, &c, 1);
    }
    if (v <= UINT8_MAX)
        return put_tag_be(b, 0xcc, v, 1);
    if (v <= UINT16_MAX)
        return put_tag_be(b, 0xcd, v, 2);
    if (v <= UINT32_MAX)
        return put_tag_be(b, 0xce, v, 4);
    return put_tag_be(b, 0xcf, v, 8);
}

int kvr_mp_write_int(kvr_buf *b, int64_t v)
{
    if (v >= 0)
        return kvr_mp_write_uint(b, (uint64_t)v);
    if (v >= -32) {
        uint8_t c = (uint8_t)(int8_t)v;
        return put(b, &c, 1);
    }
    if (v >= INT8_MIN)
        return put_tag_be(b, 0xd0, (uint64_t)v, 1);
    if (v >= INT16_MIN)
        return put_tag_be(b, 0xd1, (uint64_t)v, 2);
    if (v >= INT32_MIN)
        return put_tag_be(b, 0xd2, (uint64_t)v, 4);
    return put_tag_be(b, 0xd3, (uint64_t)v, 8);
}

int kvr_mp_write_double(kvr_buf *b, double v)
{
    /* float32 when it holds v exactly (NaN never compares equal, so it stays float64). */
    float f = (float)v;
    if ((double)f == v) {
        uint32_t u;
        memcpy(&u, &f, sizeof u);
        return put_tag_be(b, 0xca, u, 4);
    }
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    return put_tag_be(b, 0xcb, u, 8);
}

static int write_len_hdr(kvr_buf *b, size_t len, uint8_t t8, uint8_t t16, uint8_t t32)
{
    if (len > UINT32_MAX)
        return KVR_ELIMIT;
    if (len <= UINT8_MAX && t8 != 0)
        return put_tag_be(b, t8, len, 1);
    if (len <= UINT16_MAX)
        return put_tag_be(b, t16, len, 2);
    return put_tag_be(b, t32, len, 4);
}

int kvr_mp_write_str(kvr_buf *b, const char *s, size_t len)
{
    /* Reserve header + payload first so a failed write appends nothing. */
    if (len > UINT32_MAX)
        return KVR_ELIMIT;
    int rv = kvr_buf_reserve(b, 5 + len);
    if (rv != 0)
        return rv;
    if (len <= 31) {
        uint8_t c = (uint8_t)(0xa0 | len);
        rv = put(b, &c, 1);
    } else {
        rv = write_len_hdr(b, len, 0xd9, 0xda, 0xdb);
    }
    if (rv != 0)
        return rv;
    return kvr_buf_append(b, s, len);
}

int kvr_mp_write_cstr(kvr_buf *b, const char *s)
{
    return kvr_mp_write_str(b, s, strlen(s));
}

int kvr_mp_write_bin(kvr_buf *b, const void *data, size_t len)
{
    if (len > UINT32_MAX)
        return KVR_ELIMIT;
    int rv = kvr_buf_reserve(b, 5 + len);
    if (rv != 0)
        return rv;
    rv = write_len_hdr(b, len, 0xc4, 0xc5, 0xc6);
    if (rv != 0)
        return rv;
    return kvr_buf_append(b, data, len);
}

int kvr_mp_write_array(kvr_buf *b, uint32_t n)
{
    if (n <= 15) {
        uint8_t c = (uint8_t)(0x90 | n);
        return put(b, &c, 1);
    }
    return write_len_hdr(b, n, 0, 0xdc, 0xdd);
}

int kvr_mp_write_map(kvr_buf *b, uint32_t n)
{
    if (n <= 15) {
        uint8_t c = (uint8_t)(0x80 | n);
        return put(b, &c, 1);
    }
    return write_len_hdr(b, n, 0, 0xde, 0xdf);
}
