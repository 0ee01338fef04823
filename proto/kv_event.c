/* kv_event: vLLM KV-event batch decoder (see kv_event.h, DESIGN section 3); the encoder is
 * kv_event_enc.c.
 *
 * The decoder walks the payload once with the kvr_mp cursor. Hashes and tokens of all events
 * go to two shared scratch arrays, event after event, so an event's slice starts where the
 * previous one's ended; pointers are set only once the whole batch has been accepted (the
 * arrays may move while they grow). Every count has been checked against the bytes left by
 * the cursor and against the limits before any array grows. */
#include "kv_event.h"

#include "kvr_hash.h"
#include "kvr_mp.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

kvr_kv_limits kvr_kv_limits_default(void)
{
    return (kvr_kv_limits){
        .max_payload_bytes = 8u << 20,
        .max_events = 65536,
        .max_hashes = 65536,
        .max_tokens = 4u << 20,
        .max_block_size = 4096,
        .max_hash_bytes = 256,
    };
}

const char *kvr_kv_reject_name(kvr_kv_reject r)
{
    switch (r) {
    case KVR_KV_REJ_NONE: return "none";
    case KVR_KV_REJ_TRUNCATED: return "truncated";
    case KVR_KV_REJ_TYPE: return "type";
    case KVR_KV_REJ_LIMIT: return "limit";
    case KVR_KV_REJ_UNKNOWN: return "unknown";
    case KVR_KV_REJ_INVALID: return "invalid";
    case KVR_KV_REJ_TRAILING: return "trailing";
    default: return "unknown_reason";
    }
}

void kvr_kv_decoder_init(kvr_kv_decoder *d, const kvr_kv_limits *limits)
{
    memset(d, 0, sizeof *d);
    d->limits = limits ? *limits : kvr_kv_limits_default();
}

void kvr_kv_decoder_free(kvr_kv_decoder *d)
{
    free(d->events);
    free(d->hashes);
    free(d->tokens);
    d->events = NULL;
    d->hashes = NULL;
    d->tokens = NULL;
    d->events_cap = 0;
    d->hashes_cap = 0;
    d->tokens_cap = 0;
}

/* ---- decoder ---- */

typedef struct dec {
    kvr_kv_decoder *d;
    kvr_mp_reader r;
    const uint8_t *start;
    long ev;          /* index of the event being decoded, -1 at batch level */
    size_t n_hashes;  /* scratch hashes used so far */
    size_t n_tokens;  /* scratch tokens used so far */
    kvr_kv_reject reason;
    kvr_err *err;
} dec;

static const char *mp_type_name(kvr_mp_type t)
{
    switch (t) {
    case KVR_MP_NIL: return "nil";
    case KVR_MP_BOOL: return "bool";
    case KVR_MP_UINT: return "uint";
    case KVR_MP_INT: return "negative int";
    case KVR_MP_FLOAT: return "float";
    case KVR_MP_STR: return "str";
    case KVR_MP_BIN: return "bin";
    case KVR_MP_ARRAY: return "array";
    case KVR_MP_MAP: return "map";
    case KVR_MP_EXT: return "ext";
    default: return "invalid byte";
    }
}

static int code_of(kvr_kv_reject reason)
{
    switch (reason) {
    case KVR_KV_REJ_TRUNCATED: return KVR_ETRUNC;
    case KVR_KV_REJ_TYPE: return KVR_ETYPE;
    case KVR_KV_REJ_LIMIT: return KVR_ELIMIT;
    case KVR_KV_REJ_UNKNOWN: return KVR_EUNSUPPORTED;
    default: return KVR_EINVAL;
    }
}

/* Records the first failure: reason, and "event N: <what>" (or "batch: <what>") in err. */
__attribute__((format(printf, 3, 4))) static int fail(dec *c, kvr_kv_reject reason,
                                                      const char *fmt, ...)
{
    c->reason = reason;
    int code = code_of(reason);
    if (c->err != NULL) {
        char what[KVR_ERR_MSG_MAX];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(what, sizeof what, fmt, ap);
        va_end(ap);
        size_t off = (size_t)(c->r.p - c->start);
        if (c->ev >= 0)
            kvr_err_set(c->err, code, "event %ld: %s (at byte %zu)", c->ev, what, off);
        else
            kvr_err_set(c->err, code, "batch: %s (at byte %zu)", what, off);
    }
    return code;
}

/* Count claimed by the array/map header at r when it claims more elements than bytes are
 * left after the header; 0 otherwise (no such header, or the problem is further in). */
static uint64_t claimed_count(const kvr_mp_reader *r, const char **what, size_t *after)
{
    size_t left = kvr_mp_remaining(r);
    if (left == 0)
        return 0;
    const uint8_t *p = r->p;
    uint8_t b = p[0];
    bool map = (b & 0xf0) == 0x80 || b == 0xde || b == 0xdf;
    uint64_t n;
    size_t hdr;
    if ((b & 0xe0) == 0x80) {
        n = b & 0x0f;
        hdr = 1;
    } else if ((b == 0xdc || b == 0xde) && left >= 3) {
        n = (uint64_t)p[1] << 8 | p[2];
        hdr = 3;
    } else if ((b == 0xdd || b == 0xdf) && left >= 5) {
        n = (uint64_t)p[1] << 24 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 8 | p[4];
        hdr = 5;
    } else {
        return 0;
    }
    *what = map ? "map" : "array";
    *after = left - hdr;
    return n * (map ? 2 : 1) > left - hdr ? n : 0;
}

/* kvr_mp_skip says KVR_ELIMIT both for nesting deeper than KVR_MP_MAX_DEPTH and for a count
 * beyond the bytes left somewhere inside. Tell them apart by walking the value with a single
 * pending-values counter (no stack, so no depth bound): if that walk completes, the value is
 * whole and only too deep. */
static bool value_is_whole(const kvr_mp_reader *r0)
{
    kvr_mp_reader r = *r0;
    uint64_t pending = 1; /* never exceeds the bytes left: every value takes one */
    while (pending > 0) {
        pending--;
        kvr_mp_type t = kvr_mp_peek(&r);
        uint32_t n;
        if (t == KVR_MP_ARRAY || t == KVR_MP_MAP) {
            if ((t == KVR_MP_MAP ? kvr_mp_read_map(&r, &n) : kvr_mp_read_array(&r, &n)) != 0)
                return false;
            pending += t == KVR_MP_MAP ? 2 * (uint64_t)n : n;
        } else if (kvr_mp_skip(&r) != 0) {
            return false;
        }
    }
    return true;
}

/* Turns a kvr_mp error at the cursor into a rejection naming the field. A count that claims
 * more elements than bytes are left is reported as truncation: that is what a cut payload
 * looks like. */
static int mp_fail(dec *c, int rv, const char *field)
{
    if (rv == KVR_ELIMIT) {
        const char *what = "array";
        size_t after = 0;
        uint64_t n = claimed_count(&c->r, &what, &after);
        size_t left = kvr_mp_remaining(&c->r);
        if (n > 0)
            return fail(c, KVR_KV_REJ_TRUNCATED,
                        "%s: truncated (%s of %llu elements, %zu bytes left)", field, what,
                        (unsigned long long)n, after);
        if (value_is_whole(&c->r))
            return fail(c, KVR_KV_REJ_LIMIT, "%s: nested deeper than %d levels", field,
                        KVR_MP_MAX_DEPTH);
        return fail(c, KVR_KV_REJ_TRUNCATED, "%s: truncated (a count inside claims more "
                    "than the %zu bytes left)", field, left);
    }
    switch (rv) {
    case KVR_ETRUNC:
        return fail(c, KVR_KV_REJ_TRUNCATED, "%s: truncated", field);
    case KVR_ETYPE:
        return fail(c, KVR_KV_REJ_TYPE, "%s: wrong type (%s)", field,
                    mp_type_name(kvr_mp_peek(&c->r)));
    default:
        return fail(c, KVR_KV_REJ_INVALID, "%s: %s", field, kvr_strerror(rv));
    }
}

/* kvr_mp_peek says INVALID both for 0xc1 and for end of input; tell them apart. */
static int type_fail(dec *c, const char *field)
{
    return mp_fail(c, kvr_mp_remaining(&c->r) == 0 ? KVR_ETRUNC : KVR_ETYPE, field);
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t nc = *cap ? *cap : 64;
    while (nc < need) {
        if (nc > SIZE_MAX / 2)
            return KVR_ENOMEM;
        nc *= 2;
    }
    if (nc > SIZE_MAX / elem)
        return KVR_ENOMEM;
    void *q = realloc(*p, nc * elem);
    if (q == NULL)
        return KVR_ENOMEM;
    *p = q;
    *cap = nc;
    return 0;
}

static int skip_n(dec *c, uint64_t n, const char *field)
{
    for (uint64_t i = 0; i < n; i++) {
        int rv = kvr_mp_skip(&c->r);
        if (rv != 0)
            return mp_fail(c, rv, field);
    }
    return 0;
}

/* mp_fail/type_fail for element idx of a list field ("block_hashes[3]"), or for the field
 * itself when idx < 0. Formats the name only on the failure path. */
static void field_name(char *name, size_t cap, const char *field, long idx)
{
    if (idx >= 0)
        snprintf(name, cap, "%s[%ld]", field, idx);
    else
        snprintf(name, cap, "%s", field);
}

static int field_fail(dec *c, int rv, const char *field, long idx)
{
    char name[64];
    field_name(name, sizeof name, field, idx);
    if (rv == KVR_ETYPE)
        return type_fail(c, name);
    return mp_fail(c, rv, name);
}

/* One block hash: int (u64 or negative i64 as its bit pattern) or str/bin bytes. */
static int read_hash(dec *c, uint64_t *out, const char *field, long idx)
{
    kvr_mp_type t = kvr_mp_peek(&c->r);
    int rv;
    if (t == KVR_MP_UINT || t == KVR_MP_INT) {
        rv = kvr_mp_read_u64bits(&c->r, out);
        return rv ? field_fail(c, rv, field, idx) : 0;
    }
    if (t == KVR_MP_STR || t == KVR_MP_BIN) {
        kvr_slice s;
        rv = kvr_mp_read_bytes(&c->r, &s);
        if (rv != 0)
            return field_fail(c, rv, field, idx);
        if (s.len > c->d->limits.max_hash_bytes) {
            char name[64];
            field_name(name, sizeof name, field, idx);
            return fail(c, KVR_KV_REJ_LIMIT, "%s: %zu-byte hash, limit %u", name, s.len,
                        c->d->limits.max_hash_bytes);
        }
        *out = kvr_hash_bytes(s.base, s.len);
        return 0;
    }
    return field_fail(c, KVR_ETYPE, field, idx);
}

static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int read_hash_list(dec *c, kvr_kv_event *ev)
{
    kvr_kv_decoder *d = c->d;
    uint32_t m;
    int rv = kvr_mp_read_array(&c->r, &m);
    if (rv != 0)
        return mp_fail(c, rv, "block_hashes");
    if (m > d->limits.max_hashes)
        return fail(c, KVR_KV_REJ_LIMIT, "block_hashes: %u hashes, limit %u", m,
                    d->limits.max_hashes);
    if (grow((void **)&d->hashes, &d->hashes_cap, c->n_hashes + m, sizeof *d->hashes) != 0)
        return fail(c, KVR_KV_REJ_LIMIT, "block_hashes: out of memory for %u hashes", m);
    for (uint32_t i = 0; i < m; i++) {
        const uint8_t *p = c->r.p;
        if (c->r.end - p >= 9 && p[0] == 0xcf) { /* fast path: uint64, the usual int hash */
            d->hashes[c->n_hashes + i] = (uint64_t)be32(p + 1) << 32 | be32(p + 5);
            c->r.p = p + 9;
            continue;
        }
        rv = read_hash(c, &d->hashes[c->n_hashes + i], "block_hashes", (long)i);
        if (rv != 0)
            return rv;
    }
    ev->n_hashes = m;
    c->n_hashes += m;
    return 0;
}

static int read_token_list(dec *c, kvr_kv_event *ev)
{
    kvr_kv_decoder *d = c->d;
    uint32_t m;
    int rv = kvr_mp_read_array(&c->r, &m);
    if (rv != 0)
        return mp_fail(c, rv, "token_ids");
    if (m > d->limits.max_tokens)
        return fail(c, KVR_KV_REJ_LIMIT, "token_ids: %u tokens, limit %u", m,
                    d->limits.max_tokens);
    if (grow((void **)&d->tokens, &d->tokens_cap, c->n_tokens + m, sizeof *d->tokens) != 0)
        return fail(c, KVR_KV_REJ_LIMIT, "token_ids: out of memory for %u tokens", m);
    for (uint32_t i = 0; i < m; i++) {
        /* fast paths for the encodings of a u32; everything else takes the general reader */
        const uint8_t *p = c->r.p;
        ptrdiff_t left = c->r.end - p;
        uint32_t *dst = &d->tokens[c->n_tokens + i];
        if (left >= 1 && p[0] <= 0x7f) {
            *dst = p[0];
            c->r.p = p + 1;
            continue;
        }
        if (left >= 5 && p[0] == 0xce) {
            *dst = be32(p + 1);
            c->r.p = p + 5;
            continue;
        }
        if (left >= 3 && p[0] == 0xcd) {
            *dst = (uint32_t)p[1] << 8 | p[2];
            c->r.p = p + 3;
            continue;
        }
        uint64_t v;
        rv = kvr_mp_read_uint(&c->r, &v);
        if (rv != 0)
            return field_fail(c, rv, "token_ids", (long)i);
        if (v > UINT32_MAX)
            return fail(c, KVR_KV_REJ_INVALID, "token_ids[%u]: %llu is not a u32 token id", i,
                        (unsigned long long)v);
        *dst = (uint32_t)v;
    }
    ev->n_tokens = m;
    c->n_tokens += m;
    return 0;
}

static int read_parent(dec *c, kvr_kv_event *ev)
{
    if (kvr_mp_peek(&c->r) == KVR_MP_NIL) {
        (void)kvr_mp_read_nil(&c->r);
        ev->has_parent = false;
        return 0;
    }
    int rv = read_hash(c, &ev->parent, "parent_block_hash", -1);
    if (rv == 0)
        ev->has_parent = true;
    return rv;
}

static int read_block_size(dec *c, kvr_kv_event *ev)
{
    uint64_t v;
    int rv = kvr_mp_read_uint(&c->r, &v);
    if (rv != 0)
        return rv == KVR_ETYPE ? type_fail(c, "block_size") : mp_fail(c, rv, "block_size");
    if (v == 0)
        return fail(c, KVR_KV_REJ_INVALID, "block_size: must be > 0");
    if (v > c->d->limits.max_block_size)
        return fail(c, KVR_KV_REJ_LIMIT, "block_size: %llu, limit %u", (unsigned long long)v,
                    c->d->limits.max_block_size);
    ev->block_size = (uint32_t)v;
    return 0;
}

static int read_lora_id(dec *c, kvr_kv_event *ev)
{
    if (kvr_mp_peek(&c->r) == KVR_MP_NIL) {
        (void)kvr_mp_read_nil(&c->r);
        ev->has_lora_id = false;
        return 0;
    }
    int rv = kvr_mp_read_int(&c->r, &ev->lora_id);
    if (rv != 0)
        return rv == KVR_ETYPE ? type_fail(c, "lora_id") : mp_fail(c, rv, "lora_id");
    ev->has_lora_id = true;
    return 0;
}

static int read_lora_name(dec *c, kvr_kv_event *ev)
{
    if (kvr_mp_peek(&c->r) == KVR_MP_NIL) {
        (void)kvr_mp_read_nil(&c->r);
        ev->lora_name = (kvr_slice){0};
        return 0;
    }
    kvr_slice s;
    int rv = kvr_mp_read_str(&c->r, &s);
    if (rv != 0)
        return rv == KVR_ETYPE ? type_fail(c, "lora_name") : mp_fail(c, rv, "lora_name");
    if (s.len > KVR_LORA_NAME_MAX)
        return fail(c, KVR_KV_REJ_LIMIT, "lora_name: %zu bytes, limit %d", s.len,
                    KVR_LORA_NAME_MAX);
    ev->lora_name = s;
    return 0;
}

/* Printable copy of an untrusted tag for messages. */
static void quote(char *out, size_t cap, kvr_slice s)
{
    size_t n = 0;
    for (size_t i = 0; i < s.len && n + 2 < cap && i < 40; i++) {
        unsigned char ch = (unsigned char)s.base[i];
        out[n++] = (ch >= 0x20 && ch < 0x7f && ch != '"') ? (char)ch : '?';
    }
    out[n] = '\0';
}

static int parse_tag(dec *c, kvr_kv_event *ev)
{
    kvr_slice s;
    int rv = kvr_mp_read_str(&c->r, &s);
    if (rv != 0)
        return rv == KVR_ETYPE ? type_fail(c, "type tag") : mp_fail(c, rv, "type tag");
    if (kvr_slice_eq_cstr(s, "BlockStored"))
        ev->type = KVR_KV_STORED;
    else if (kvr_slice_eq_cstr(s, "BlockRemoved"))
        ev->type = KVR_KV_REMOVED;
    else if (kvr_slice_eq_cstr(s, "AllBlocksCleared"))
        ev->type = KVR_KV_CLEARED;
    else {
        char q[48];
        quote(q, sizeof q, s);
        return fail(c, KVR_KV_REJ_UNKNOWN, "unknown event type \"%s\"", q);
    }
    return 0;
}

static int check_stored(dec *c, const kvr_kv_event *ev)
{
    uint64_t want = (uint64_t)ev->n_hashes * ev->block_size;
    if (ev->n_tokens != want)
        return fail(c, KVR_KV_REJ_INVALID,
                    "BlockStored: %u token_ids, but %u block_hashes x block_size %u = %llu",
                    ev->n_tokens, ev->n_hashes, ev->block_size, (unsigned long long)want);
    return 0;
}

/* ["BlockStored", hashes, parent, tokens, block_size, lora_id?, ...] etc.; nf >= 1. */
static int parse_event_array(dec *c, kvr_kv_event *ev, uint32_t nf)
{
    int rv = parse_tag(c, ev);
    if (rv != 0)
        return rv;
    uint32_t used = 1;
    switch (ev->type) {
    case KVR_KV_STORED:
        if (nf < 5)
            return fail(c, KVR_KV_REJ_INVALID,
                        "BlockStored: %u fields, need at least 5 (tag, block_hashes, "
                        "parent_block_hash, token_ids, block_size)",
                        nf);
        if ((rv = read_hash_list(c, ev)) != 0 || (rv = read_parent(c, ev)) != 0 ||
            (rv = read_token_list(c, ev)) != 0 || (rv = read_block_size(c, ev)) != 0)
            return rv;
        used = 5;
        if (nf >= 6) {
            if ((rv = read_lora_id(c, ev)) != 0)
                return rv;
            used = 6;
        }
        if (nf >= 8) { /* [.., lora_id, medium, lora_name, ..] */
            if ((rv = skip_n(c, 1, "medium")) != 0)
                return rv;
            /* SGLang's array schema has its cache_salt map here, not vLLM's lora_name: that
             * event names no adapter */
            if (kvr_mp_peek(&c->r) == KVR_MP_MAP)
                rv = skip_n(c, 1, "cache_salt");
            else
                rv = read_lora_name(c, ev);
            if (rv != 0)
                return rv;
            used = 8;
        }
        if ((rv = check_stored(c, ev)) != 0)
            return rv;
        break;
    case KVR_KV_REMOVED:
        if (nf < 2)
            return fail(c, KVR_KV_REJ_INVALID, "BlockRemoved: %u fields, need block_hashes", nf);
        if ((rv = read_hash_list(c, ev)) != 0)
            return rv;
        used = 2;
        break;
    default:
        break;
    }
    return skip_n(c, nf - used, "trailing field");
}

enum {
    K_TYPE = 1 << 0,
    K_HASHES = 1 << 1,
    K_PARENT = 1 << 2,
    K_TOKENS = 1 << 3,
    K_BSIZE = 1 << 4,
    K_LORA = 1 << 5,
    K_LORA_NAME = 1 << 6,
};

/* Reads one map key. Returns 1 with *k set for a str key, 0 for a key of another type
 * (skipped: not one of ours), or a negative code. */
static int read_key(dec *c, kvr_slice *k)
{
    kvr_mp_type t = kvr_mp_peek(&c->r);
    if (t == KVR_MP_STR) {
        int rv = kvr_mp_read_str(&c->r, k);
        return rv ? mp_fail(c, rv, "map key") : 1;
    }
    if (kvr_mp_remaining(&c->r) == 0)
        return mp_fail(c, KVR_ETRUNC, "map key");
    int rv = kvr_mp_skip(&c->r);
    return rv ? mp_fail(c, rv, "map key") : 0;
}

static int dup_key(dec *c, const char *key)
{
    return fail(c, KVR_KV_REJ_INVALID, "duplicate key \"%s\"", key);
}

/* {"type":..., "block_hashes":..., ...}: keys in any order, unknown keys skipped. */
static int parse_event_map(dec *c, kvr_kv_event *ev, uint32_t np)
{
    unsigned seen = 0;
    int rv;
    for (uint32_t i = 0; i < np; i++) {
        kvr_slice k;
        rv = read_key(c, &k);
        if (rv < 0)
            return rv;
        unsigned bit = 0;
        const char *name = NULL;
        if (rv == 1) {
            static const struct {
                const char *name;
                unsigned bit;
            } keys[] = {{"type", K_TYPE},        {"block_hashes", K_HASHES},
                        {"parent_block_hash", K_PARENT}, {"token_ids", K_TOKENS},
                        {"block_size", K_BSIZE}, {"lora_id", K_LORA},
                        {"lora_name", K_LORA_NAME}};
            for (size_t j = 0; j < sizeof keys / sizeof keys[0]; j++)
                if (kvr_slice_eq_cstr(k, keys[j].name)) {
                    bit = keys[j].bit;
                    name = keys[j].name;
                }
        }
        if (bit == 0) {
            if ((rv = skip_n(c, 1, "unknown key's value")) != 0)
                return rv;
            continue;
        }
        if (seen & bit)
            return dup_key(c, name);
        seen |= bit;
        switch (bit) {
        case K_TYPE: rv = parse_tag(c, ev); break;
        case K_HASHES: rv = read_hash_list(c, ev); break;
        case K_PARENT: rv = read_parent(c, ev); break;
        case K_TOKENS: rv = read_token_list(c, ev); break;
        case K_BSIZE: rv = read_block_size(c, ev); break;
        case K_LORA_NAME: rv = read_lora_name(c, ev); break;
        default: rv = read_lora_id(c, ev); break;
        }
        if (rv != 0)
            return rv;
    }
    if (!(seen & K_TYPE))
        return fail(c, KVR_KV_REJ_INVALID, "missing \"type\"");
    switch (ev->type) {
    case KVR_KV_STORED:
        if (!(seen & K_HASHES))
            return fail(c, KVR_KV_REJ_INVALID, "BlockStored: missing \"block_hashes\"");
        if (!(seen & K_TOKENS))
            return fail(c, KVR_KV_REJ_INVALID, "BlockStored: missing \"token_ids\"");
        if (!(seen & K_BSIZE))
            return fail(c, KVR_KV_REJ_INVALID, "BlockStored: missing \"block_size\"");
        return check_stored(c, ev);
    case KVR_KV_REMOVED:
        if (!(seen & K_HASHES))
            return fail(c, KVR_KV_REJ_INVALID, "BlockRemoved: missing \"block_hashes\"");
        break;
    default:
        break;
    }
    /* Fields that do not belong to this type were read into the scratch; this event's are
     * the last ones there, so give them back. */
    if (ev->type != KVR_KV_STORED) {
        c->n_tokens -= ev->n_tokens;
        ev->n_tokens = 0;
        ev->block_size = 0;
        ev->has_parent = false;
        ev->parent = 0;
        ev->has_lora_id = false;
        ev->lora_id = 0;
        ev->lora_name = (kvr_slice){0};
    }
    if (ev->type == KVR_KV_CLEARED) {
        c->n_hashes -= ev->n_hashes;
        ev->n_hashes = 0;
    }
    return 0;
}

static int parse_events(dec *c, uint32_t *n_out)
{
    kvr_kv_decoder *d = c->d;
    uint32_t n;
    int rv = kvr_mp_read_array(&c->r, &n);
    if (rv != 0)
        return rv == KVR_ETYPE ? type_fail(c, "events") : mp_fail(c, rv, "events");
    if (n > d->limits.max_events)
        return fail(c, KVR_KV_REJ_LIMIT, "events: %u events, limit %u", n, d->limits.max_events);
    size_t cap = d->events_cap;
    if (grow((void **)&d->events, &cap, n, sizeof *d->events) != 0 || cap > UINT32_MAX) {
        d->events_cap = cap > UINT32_MAX ? d->events_cap : (uint32_t)cap;
        return fail(c, KVR_KV_REJ_LIMIT, "events: out of memory for %u events", n);
    }
    d->events_cap = (uint32_t)cap;
    for (uint32_t i = 0; i < n; i++) {
        kvr_kv_event *ev = &d->events[i];
        memset(ev, 0, sizeof *ev);
        c->ev = (long)i;
        kvr_mp_type t = kvr_mp_peek(&c->r);
        uint32_t nf;
        if (t == KVR_MP_ARRAY) {
            if ((rv = kvr_mp_read_array(&c->r, &nf)) != 0)
                return mp_fail(c, rv, "event");
            if (nf == 0)
                return fail(c, KVR_KV_REJ_INVALID, "empty event array");
            rv = parse_event_array(c, ev, nf);
        } else if (t == KVR_MP_MAP) {
            if ((rv = kvr_mp_read_map(&c->r, &nf)) != 0)
                return mp_fail(c, rv, "event");
            rv = parse_event_map(c, ev, nf);
        } else {
            rv = type_fail(c, "event");
        }
        if (rv != 0)
            return rv;
    }
    c->ev = -1;
    *n_out = n;
    return 0;
}

static int read_dp_rank(dec *c, kvr_kv_batch *b)
{
    if (kvr_mp_peek(&c->r) == KVR_MP_NIL) {
        (void)kvr_mp_read_nil(&c->r);
        b->has_dp_rank = false;
        return 0;
    }
    int rv = kvr_mp_read_int(&c->r, &b->dp_rank);
    if (rv != 0)
        return rv == KVR_ETYPE ? type_fail(c, "data_parallel_rank")
                               : mp_fail(c, rv, "data_parallel_rank");
    b->has_dp_rank = true;
    return 0;
}

static int read_ts(dec *c, kvr_kv_batch *b)
{
    int rv = kvr_mp_read_double(&c->r, &b->ts);
    if (rv != 0)
        return rv == KVR_ETYPE ? type_fail(c, "ts") : mp_fail(c, rv, "ts");
    return 0;
}

static int parse_batch(dec *c, kvr_kv_batch *b)
{
    kvr_mp_type t = kvr_mp_peek(&c->r);
    int rv;
    uint32_t n;
    if (t == KVR_MP_ARRAY) {
        if ((rv = kvr_mp_read_array(&c->r, &n)) != 0)
            return mp_fail(c, rv, "batch array");
        if (n < 2)
            return fail(c, KVR_KV_REJ_INVALID, "array of %u elements, need [ts, events, ...]", n);
        if ((rv = read_ts(c, b)) != 0 || (rv = parse_events(c, &b->n_events)) != 0)
            return rv;
        if (n >= 3 && (rv = read_dp_rank(c, b)) != 0)
            return rv;
        return skip_n(c, n >= 3 ? n - 3 : 0, "trailing field");
    }
    if (t == KVR_MP_MAP) {
        if ((rv = kvr_mp_read_map(&c->r, &n)) != 0)
            return mp_fail(c, rv, "batch map");
        bool have_ts = false, have_events = false, have_dp = false;
        for (uint32_t i = 0; i < n; i++) {
            kvr_slice k;
            rv = read_key(c, &k);
            if (rv < 0)
                return rv;
            if (rv == 1 && kvr_slice_eq_cstr(k, "ts")) {
                if (have_ts)
                    return dup_key(c, "ts");
                have_ts = true;
                rv = read_ts(c, b);
            } else if (rv == 1 && kvr_slice_eq_cstr(k, "events")) {
                if (have_events)
                    return dup_key(c, "events");
                have_events = true;
                rv = parse_events(c, &b->n_events);
            } else if (rv == 1 && kvr_slice_eq_cstr(k, "data_parallel_rank")) {
                if (have_dp)
                    return dup_key(c, "data_parallel_rank");
                have_dp = true;
                rv = read_dp_rank(c, b);
            } else {
                rv = skip_n(c, 1, "unknown key's value");
            }
            if (rv != 0)
                return rv;
        }
        if (!have_ts)
            return fail(c, KVR_KV_REJ_INVALID, "missing \"ts\"");
        if (!have_events)
            return fail(c, KVR_KV_REJ_INVALID, "missing \"events\"");
        return 0;
    }
    if (kvr_mp_remaining(&c->r) == 0)
        return fail(c, KVR_KV_REJ_TRUNCATED, "empty payload");
    return fail(c, KVR_KV_REJ_TYPE, "expected array or map, got %s", mp_type_name(t));
}

int kvr_kv_decode(kvr_kv_decoder *d, const void *data, size_t len, kvr_kv_batch *out,
                  kvr_kv_reject *reason, kvr_err *err)
{
    dec c = {.d = d, .ev = -1, .reason = KVR_KV_REJ_NONE, .err = err};
    kvr_mp_reader_init(&c.r, data, len);
    c.start = c.r.p;
    kvr_kv_batch b;
    memset(&b, 0, sizeof b);
    memset(out, 0, sizeof *out);
    int rv;
    if (len > d->limits.max_payload_bytes)
        rv = fail(&c, KVR_KV_REJ_LIMIT, "payload of %zu bytes, limit %zu", len,
                  d->limits.max_payload_bytes);
    else if ((rv = parse_batch(&c, &b)) == 0 && kvr_mp_remaining(&c.r) != 0)
        rv = fail(&c, KVR_KV_REJ_TRAILING, "%zu bytes after the batch",
                  kvr_mp_remaining(&c.r));
    if (rv != 0) {
        if (c.reason == KVR_KV_REJ_NONE || c.reason >= KVR_KV_REJ__COUNT)
            c.reason = KVR_KV_REJ_INVALID;
        d->rejected[c.reason]++;
        if (reason != NULL)
            *reason = c.reason;
        return rv;
    }
    /* Accepted: the scratch arrays no longer move, so hand out pointers. */
    size_t h = 0, t = 0;
    for (uint32_t i = 0; i < b.n_events; i++) {
        kvr_kv_event *ev = &d->events[i];
        ev->hashes = ev->n_hashes ? d->hashes + h : NULL;
        ev->tokens = ev->n_tokens ? d->tokens + t : NULL;
        h += ev->n_hashes;
        t += ev->n_tokens;
    }
    b.events = b.n_events ? d->events : NULL;
    *out = b;
    d->decoded++;
    if (reason != NULL)
        *reason = KVR_KV_REJ_NONE;
    return 0;
}
