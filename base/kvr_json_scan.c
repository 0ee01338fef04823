/* kvr_json_scan.c: the streaming token-array scan of kvr_json.h (a request body parsed in one
 * bounded pass without building a cJSON tree) and JSON string-literal decoding. */
#include "kvr_json.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- streaming token scan */

typedef struct jscan {
    const char *p, *end, *base;
    int max_depth;
} jscan;

static void js_ws(jscan *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static int js_fail(jscan *s, kvr_err *err, const char *what)
{
    return kvr_err_set(err, KVR_EINVAL, "invalid JSON near byte %zu: %s", (size_t)(s->p - s->base),
                       what);
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* At '"': moves past the closing quote. Control bytes and bad escapes are errors. */
static int js_string(jscan *s, kvr_err *err)
{
    s->p++;
    while (s->p < s->end) {
        unsigned char ch = (unsigned char)*s->p;
        if (ch == '"') {
            s->p++;
            return 0;
        }
        if (ch < 0x20)
            return js_fail(s, err, "control character in string");
        if (ch == '\\') {
            if (s->end - s->p < 2)
                break;
            char e = s->p[1];
            if (e == 'u') {
                if (s->end - s->p < 6)
                    break;
                for (int i = 2; i < 6; i++)
                    if (hexval(s->p[i]) < 0)
                        return js_fail(s, err, "bad \\u escape");
                s->p += 6;
                continue;
            }
            if (!strchr("\"\\/bfnrt", e) || e == '\0')
                return js_fail(s, err, "bad escape");
            s->p += 2;
            continue;
        }
        s->p++;
    }
    return js_fail(s, err, "unterminated string");
}

static int js_number(jscan *s, kvr_err *err)
{
    const char *st = s->p;
    if (s->p < s->end && *s->p == '-')
        s->p++;
    if (s->p >= s->end || *s->p < '0' || *s->p > '9')
        return js_fail(s, err, "bad number");
    if (*s->p == '0')
        s->p++;
    else
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
            s->p++;
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (s->p >= s->end || *s->p < '0' || *s->p > '9')
            return js_fail(s, err, "bad number");
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
            s->p++;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
            s->p++;
        if (s->p >= s->end || *s->p < '0' || *s->p > '9')
            return js_fail(s, err, "bad number");
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
            s->p++;
    }
    (void)st;
    return 0;
}

static int js_value(jscan *s, int depth, kvr_err *err);

/* At '[' or '{': the container, recursion bounded by max_depth. */
static int js_container(jscan *s, int depth, kvr_err *err)
{
    char close = *s->p == '[' ? ']' : '}';
    bool obj = close == '}';
    if (depth + 1 > s->max_depth)
        return kvr_err_set(err, KVR_ELIMIT, "JSON nested deeper than %d levels", s->max_depth);
    s->p++;
    js_ws(s);
    if (s->p < s->end && *s->p == close) {
        s->p++;
        return 0;
    }
    for (;;) {
        js_ws(s);
        int rc;
        if (obj) {
            if (s->p >= s->end || *s->p != '"')
                return js_fail(s, err, "expected a member name");
            if ((rc = js_string(s, err)) != 0)
                return rc;
            js_ws(s);
            if (s->p >= s->end || *s->p != ':')
                return js_fail(s, err, "expected ':'");
            s->p++;
        }
        if ((rc = js_value(s, depth + 1, err)) != 0)
            return rc;
        js_ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            continue;
        }
        if (s->p < s->end && *s->p == close) {
            s->p++;
            return 0;
        }
        return js_fail(s, err, obj ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static int js_literal(jscan *s, const char *lit, kvr_err *err)
{
    size_t n = strlen(lit);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, lit, n) != 0)
        return js_fail(s, err, "unexpected character");
    s->p += n;
    return 0;
}

static int js_value(jscan *s, int depth, kvr_err *err)
{
    js_ws(s);
    if (s->p >= s->end)
        return js_fail(s, err, "unexpected end");
    switch (*s->p) {
    case '"':
        return js_string(s, err);
    case '{':
    case '[':
        return js_container(s, depth, err);
    case 't':
        return js_literal(s, "true", err);
    case 'f':
        return js_literal(s, "false", err);
    case 'n':
        return js_literal(s, "null", err);
    default:
        return js_number(s, err);
    }
}

/* At '[': reads the token ids straight into tr->tokens. */
static int js_token_array(jscan *s, kvr_json_tokreq *tr, kvr_err *err)
{
    s->p++;
    size_t n = 0;
    js_ws(s);
    if (s->p < s->end && *s->p == ']') {
        s->p++;
        tr->n_tokens = 0;
        return 0;
    }
    for (;;) {
        js_ws(s);
        if (s->p >= s->end || *s->p < '0' || *s->p > '9')
            return kvr_err_set(err, KVR_EINVAL,
                               "token_ids[%zu] must be an integer in [0, 2^32) (byte %zu)", n,
                               (size_t)(s->p - s->base));
        uint64_t v = 0;
        const char *st = s->p;
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9' && v <= UINT32_MAX)
            v = v * 10 + (uint64_t)(*s->p++ - '0');
        bool leading_zero = *st == '0' && s->p - st > 1;
        if (v > UINT32_MAX || leading_zero ||
            (s->p < s->end && (*s->p == '.' || *s->p == 'e' || *s->p == 'E')))
            return kvr_err_set(err, KVR_EINVAL,
                               "token_ids[%zu] must be an integer in [0, 2^32) (byte %zu)", n,
                               (size_t)(st - s->base));
        if (n >= tr->max_tokens)
            return kvr_err_set(err, KVR_ELIMIT, "more than %zu token_ids", tr->max_tokens);
        tr->tokens[n++] = (uint32_t)v;
        js_ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            continue;
        }
        if (s->p < s->end && *s->p == ']') {
            s->p++;
            tr->n_tokens = n;
            return 0;
        }
        return js_fail(s, err, "expected ',' or ']' in token_ids");
    }
}

static bool key_is(const char *k, size_t klen, const char *want)
{
    /* Member names compared as raw literals: an escaped spelling of a name is another name. */
    size_t wl = strlen(want);
    return klen == wl + 2 && memcmp(k + 1, want, wl) == 0;
}

int kvr_json_scan_tokens(kvr_slice body, int max_depth, kvr_json_tokreq *tr, kvr_err *err)
{
    jscan s = {body.base, body.base + body.len, body.base, max_depth > 0 ? max_depth : 16};
    tr->n_tokens = 0;
    tr->model = tr->ns = tr->lora = tr->mdc_sum = (kvr_slice){NULL, 0};
    bool have_tokens = false;
    if (body.base == NULL || body.len == 0)
        return kvr_err_set(err, KVR_EINVAL, "empty JSON body");
    js_ws(&s);
    if (s.p >= s.end || *s.p != '{')
        return js_fail(&s, err, "expected an object");
    s.p++;
    js_ws(&s);
    if (s.p < s.end && *s.p == '}') {
        s.p++;
    } else {
        for (;;) {
            js_ws(&s);
            if (s.p >= s.end || *s.p != '"')
                return js_fail(&s, err, "expected a member name");
            const char *k = s.p;
            int rc = js_string(&s, err);
            if (rc != 0)
                return rc;
            size_t klen = (size_t)(s.p - k);
            js_ws(&s);
            if (s.p >= s.end || *s.p != ':')
                return js_fail(&s, err, "expected ':'");
            s.p++;
            js_ws(&s);
            if (key_is(k, klen, "token_ids")) {
                if (have_tokens)
                    return js_fail(&s, err, "duplicate token_ids");
                if (s.p >= s.end || *s.p != '[')
                    return kvr_err_set(err, KVR_EINVAL, "field 'token_ids' must be an array");
                if ((rc = js_token_array(&s, tr, err)) != 0)
                    return rc;
                have_tokens = true;
            } else if (key_is(k, klen, "model") || key_is(k, klen, "namespace") ||
                       key_is(k, klen, "lora") || key_is(k, klen, "mdc_sum")) {
                kvr_slice *dst = key_is(k, klen, "model")       ? &tr->model
                                 : key_is(k, klen, "namespace") ? &tr->ns
                                 : key_is(k, klen, "lora")      ? &tr->lora
                                                                : &tr->mdc_sum;
                if (dst->base != NULL)
                    return js_fail(&s, err, "duplicate member");
                const char *v = s.p;
                if (s.p < s.end && *s.p == 'n') {
                    if ((rc = js_literal(&s, "null", err)) != 0) /* null: absent */
                        return rc;
                } else {
                    if (s.p >= s.end || *s.p != '"')
                        return kvr_err_set(err, KVR_ETYPE, "field '%.*s' must be a string",
                                           (int)(klen - 2), k + 1);
                    if ((rc = js_string(&s, err)) != 0)
                        return rc;
                    *dst = (kvr_slice){v, (size_t)(s.p - v)};
                }
            } else if ((rc = js_value(&s, 1, err)) != 0) {
                return rc;
            }
            js_ws(&s);
            if (s.p < s.end && *s.p == ',') {
                s.p++;
                continue;
            }
            if (s.p < s.end && *s.p == '}') {
                s.p++;
                break;
            }
            return js_fail(&s, err, "expected ',' or '}'");
        }
    }
    js_ws(&s);
    if (s.p != s.end)
        return js_fail(&s, err, "trailing data");
    if (!have_tokens)
        return kvr_err_set(err, KVR_EINVAL, "missing field 'token_ids'");
    return 0;
}

static int put_utf8(char *out, size_t cap, size_t *n, uint32_t cp)
{
    char b[4];
    size_t k;
    if (cp < 0x80) {
        b[0] = (char)cp;
        k = 1;
    } else if (cp < 0x800) {
        b[0] = (char)(0xC0 | (cp >> 6));
        b[1] = (char)(0x80 | (cp & 0x3F));
        k = 2;
    } else if (cp < 0x10000) {
        b[0] = (char)(0xE0 | (cp >> 12));
        b[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (char)(0x80 | (cp & 0x3F));
        k = 3;
    } else {
        b[0] = (char)(0xF0 | (cp >> 18));
        b[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        b[3] = (char)(0x80 | (cp & 0x3F));
        k = 4;
    }
    if (*n + k >= cap)
        return KVR_ELIMIT;
    memcpy(out + *n, b, k);
    *n += k;
    return 0;
}

static int hex4(const char *p, uint32_t *v)
{
    *v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(p[i]);
        if (h < 0)
            return -1;
        *v = *v << 4 | (uint32_t)h;
    }
    return 0;
}

int kvr_json_decode_string(kvr_slice lit, char *out, size_t cap, kvr_err *err)
{
    if (cap == 0 || lit.len < 2 || lit.base[0] != '"' || lit.base[lit.len - 1] != '"')
        return kvr_err_set(err, KVR_EINVAL, "not a JSON string");
    size_t n = 0;
    const char *p = lit.base + 1, *end = lit.base + lit.len - 1;
    while (p < end) {
        uint32_t cp;
        if (*p != '\\') {
            if (n + 1 >= cap)
                goto too_long;
            out[n++] = *p++;
            continue;
        }
        if (end - p < 2)
            goto bad;
        char e = p[1];
        p += 2;
        switch (e) {
        case 'b':
            cp = '\b';
            break;
        case 'f':
            cp = '\f';
            break;
        case 'n':
            cp = '\n';
            break;
        case 'r':
            cp = '\r';
            break;
        case 't':
            cp = '\t';
            break;
        case '"':
        case '\\':
        case '/':
            cp = (uint32_t)e;
            break;
        case 'u':
            if (end - p < 4 || hex4(p, &cp) != 0)
                goto bad;
            p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                uint32_t lo;
                if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, &lo) != 0 ||
                    lo < 0xDC00 || lo > 0xDFFF)
                    goto bad;
                p += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                goto bad;
            }
            break;
        default:
            goto bad;
        }
        if (cp == 0)
            goto bad;
        if (put_utf8(out, cap, &n, cp) != 0)
            goto too_long;
    }
    out[n] = '\0';
    return 0;
too_long:
    out[0] = '\0';
    return kvr_err_set(err, KVR_ELIMIT, "string longer than %zu bytes", cap - 1);
bad:
    out[0] = '\0';
    return kvr_err_set(err, KVR_EINVAL, "bad escape in JSON string");
}
