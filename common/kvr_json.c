/* kvr_json: bounded cJSON parsing, typed getters, exact integers, and a small writer. */
#include "kvr_json.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Nesting depth of text, skipping strings; stops early past max. Returns the max depth seen
 * (or max+1 when over). Malformed text is left for cJSON to reject. */
static int scan_depth(const char *s, size_t n, int max)
{
    int depth = 0, worst = 0;
    bool in_str = false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (in_str) {
            if (ch == '\\')
                i++;
            else if (ch == '"')
                in_str = false;
            continue;
        }
        if (ch == '"') {
            in_str = true;
        } else if (ch == '[' || ch == '{') {
            if (++depth > worst) {
                worst = depth;
                if (worst > max)
                    return worst;
            }
        } else if (ch == ']' || ch == '}') {
            depth--;
        }
    }
    return worst;
}

int kvr_json_parse(kvr_slice text, size_t max_bytes, int max_depth, cJSON **out, kvr_err *err)
{
    *out = NULL;
    if (max_bytes == 0)
        max_bytes = 16 * 1024 * 1024;
    if (max_depth <= 0)
        max_depth = 64;
    if (text.len > max_bytes)
        return kvr_err_set(err, KVR_ELIMIT, "JSON body of %zu bytes is over the limit of %zu",
                           text.len, max_bytes);
    if (text.len == 0 || text.base == NULL)
        return kvr_err_set(err, KVR_EINVAL, "empty JSON body");
    if (scan_depth(text.base, text.len, max_depth) > max_depth)
        return kvr_err_set(err, KVR_ELIMIT, "JSON nested deeper than %d levels", max_depth);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text.base, text.len, &end, false);
    if (root == NULL) {
        size_t at = end && end >= text.base ? (size_t)(end - text.base) : 0;
        return kvr_err_set(err, KVR_EINVAL, "invalid JSON near byte %zu", at);
    }
    /* Only whitespace may follow the value. */
    size_t at = end ? (size_t)(end - text.base) : text.len;
    for (size_t i = at; i < text.len; i++) {
        char ch = text.base[i];
        if (ch != ' ' && ch != '\t' && ch != '\r' && ch != '\n' && ch != '\0') {
            cJSON_Delete(root);
            return kvr_err_set(err, KVR_EINVAL, "invalid JSON: trailing bytes at byte %zu", i);
        }
    }
    *out = root;
    return 0;
}

/* Looks key up; NULL values count as absent. Fills the absent error per `required`. */
static const cJSON *field(const cJSON *obj, const char *key, bool required, int *rv, kvr_err *err)
{
    const cJSON *it = NULL;
    if (cJSON_IsObject(obj))
        it = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (it == NULL || cJSON_IsNull(it)) {
        *rv = required ? kvr_err_set(err, KVR_EINVAL, "missing field '%s'", key) : KVR_ENOTFOUND;
        return NULL;
    }
    *rv = 0;
    return it;
}

int kvr_json_get_string(const cJSON *obj, const char *key, bool required, const char **out,
                        kvr_err *err)
{
    int rv;
    const cJSON *it = field(obj, key, required, &rv, err);
    if (it == NULL)
        return rv;
    if (!cJSON_IsString(it) || it->valuestring == NULL)
        return kvr_err_set(err, KVR_ETYPE, "field '%s' must be a string", key);
    *out = it->valuestring;
    return 0;
}

int kvr_json_get_bool(const cJSON *obj, const char *key, bool required, bool *out, kvr_err *err)
{
    int rv;
    const cJSON *it = field(obj, key, required, &rv, err);
    if (it == NULL)
        return rv;
    if (!cJSON_IsBool(it))
        return kvr_err_set(err, KVR_ETYPE, "field '%s' must be a boolean", key);
    *out = cJSON_IsTrue(it);
    return 0;
}

int kvr_json_int_exact(const cJSON *item, int64_t *out)
{
    if (!cJSON_IsNumber(item))
        return KVR_ETYPE;
    double d = item->valuedouble;
    if (!isfinite(d) || d != floor(d) || fabs(d) >= KVR_JSON_MAX_EXACT)
        return KVR_ETYPE;
    *out = (int64_t)d;
    return 0;
}

int kvr_json_get_int(const cJSON *obj, const char *key, bool required, int64_t min, int64_t max,
                     int64_t *out, kvr_err *err)
{
    int rv;
    const cJSON *it = field(obj, key, required, &rv, err);
    if (it == NULL)
        return rv;
    int64_t v;
    if (kvr_json_int_exact(it, &v) != 0)
        return kvr_err_set(err, KVR_ETYPE, "field '%s' must be an integer", key);
    if (v < min || v > max)
        return kvr_err_set(err, KVR_EINVAL, "field '%s' must be between %" PRId64 " and %" PRId64,
                           key, min, max);
    *out = v;
    return 0;
}

int kvr_json_get_u64(const cJSON *obj, const char *key, bool required, uint64_t *out, kvr_err *err)
{
    int64_t v = 0;
    int rv = kvr_json_get_int(obj, key, required, 0, (int64_t)KVR_JSON_MAX_EXACT - 1, &v, err);
    if (rv == KVR_EINVAL && err != NULL && strstr(err->msg, "between") != NULL)
        return kvr_err_set(err, KVR_EINVAL, "field '%s' must be a non-negative integer", key);
    if (rv != 0)
        return rv;
    *out = (uint64_t)v;
    return 0;
}

int kvr_json_get_double(const cJSON *obj, const char *key, bool required, double *out, kvr_err *err)
{
    int rv;
    const cJSON *it = field(obj, key, required, &rv, err);
    if (it == NULL)
        return rv;
    if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble))
        return kvr_err_set(err, KVR_ETYPE, "field '%s' must be a number", key);
    *out = it->valuedouble;
    return 0;
}

int kvr_json_get_array(const cJSON *obj, const char *key, bool required, const cJSON **out,
                       kvr_err *err)
{
    int rv;
    const cJSON *it = field(obj, key, required, &rv, err);
    if (it == NULL)
        return rv;
    if (!cJSON_IsArray(it))
        return kvr_err_set(err, KVR_ETYPE, "field '%s' must be an array", key);
    *out = it;
    return 0;
}

int kvr_json_get_object(const cJSON *obj, const char *key, bool required, const cJSON **out,
                        kvr_err *err)
{
    int rv;
    const cJSON *it = field(obj, key, required, &rv, err);
    if (it == NULL)
        return rv;
    if (!cJSON_IsObject(it))
        return kvr_err_set(err, KVR_ETYPE, "field '%s' must be an object", key);
    *out = it;
    return 0;
}

/* Length of a valid UTF-8 sequence at s (1..4), or 0 if invalid. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    size_t len;
    unsigned min;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        min = 0x10000;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    unsigned cp = c & (0xFF >> (len + 1));
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return len;
}

int kvr_json_append_escaped(kvr_buf *out, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    /* Worst case 6 bytes per input byte. */
    if (len > SIZE_MAX / 6 || kvr_buf_reserve(out, len * 6) != 0)
        return KVR_ENOMEM;
    char *o = out->base + out->len;
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        unsigned char c = p[i];
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            *o++ = (char)c;
            i++;
            continue;
        }
        if (c >= 0x80) {
            size_t l = utf8_len(p + i, len - i);
            if (l == 0) {
                /* U+FFFD (3 bytes) */
                *o++ = (char)0xEF;
                *o++ = (char)0xBF;
                *o++ = (char)0xBD;
                i++;
            } else {
                memcpy(o, p + i, l);
                o += l;
                i += l;
            }
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"':
            *o++ = '"';
            break;
        case '\\':
            *o++ = '\\';
            break;
        case '\n':
            *o++ = 'n';
            break;
        case '\r':
            *o++ = 'r';
            break;
        case '\t':
            *o++ = 't';
            break;
        case '\b':
            *o++ = 'b';
            break;
        case '\f':
            *o++ = 'f';
            break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = hex[c >> 4];
            *o++ = hex[c & 15];
        }
        i++;
    }
    out->len = (size_t)(o - out->base);
    return 0;
}

int kvr_json_append_string(kvr_buf *out, const char *s, size_t len)
{
    if (len > SIZE_MAX / 6 - 2 || kvr_buf_reserve(out, len * 6 + 2) != 0)
        return KVR_ENOMEM;
    out->base[out->len++] = '"';
    kvr_json_append_escaped(out, s, len); /* cannot fail: room reserved above */
    out->base[out->len++] = '"';
    return 0;
}

/* ---------------------------------------------------------------- writer */

void kvr_jw_init(kvr_jw *w, kvr_buf *out)
{
    memset(w, 0, sizeof *w);
    w->out = out;
}

static void jw_fail(kvr_jw *w, int code)
{
    if (w->err == 0)
        w->err = code;
}

static void jw_put(kvr_jw *w, const char *s, size_t n)
{
    if (w->err == 0 && kvr_buf_append(w->out, s, n) != 0)
        jw_fail(w, KVR_ENOMEM);
}

/* Before any value: comma if needed; inside an object a key must come first. */
static bool jw_value(kvr_jw *w)
{
    if (w->err)
        return false;
    if (w->depth > 0 && w->kind[w->depth] == '{') {
        if (!w->after_key) {
            jw_fail(w, KVR_EINVAL);
            return false;
        }
        w->after_key = false;
        return true;
    }
    if (w->depth == 0 && w->need_comma[0]) {
        jw_fail(w, KVR_EINVAL); /* a second top-level value */
        return false;
    }
    if (w->need_comma[w->depth])
        jw_put(w, ",", 1);
    w->need_comma[w->depth] = true;
    return w->err == 0;
}

static void jw_open(kvr_jw *w, char kind)
{
    if (!jw_value(w))
        return;
    if (w->depth >= KVR_JW_MAX_DEPTH) {
        jw_fail(w, KVR_EINVAL);
        return;
    }
    w->depth++;
    w->kind[w->depth] = kind;
    w->need_comma[w->depth] = false;
    jw_put(w, kind == '{' ? "{" : "[", 1);
}

void kvr_jw_obj(kvr_jw *w)
{
    jw_open(w, '{');
}

void kvr_jw_arr(kvr_jw *w)
{
    jw_open(w, '[');
}

void kvr_jw_end(kvr_jw *w)
{
    if (w->err)
        return;
    if (w->depth == 0 || w->after_key) {
        jw_fail(w, KVR_EINVAL);
        return;
    }
    jw_put(w, w->kind[w->depth] == '{' ? "}" : "]", 1);
    w->depth--;
}

void kvr_jw_key(kvr_jw *w, const char *key)
{
    if (w->err)
        return;
    if (w->depth == 0 || w->kind[w->depth] != '{' || w->after_key) {
        jw_fail(w, KVR_EINVAL);
        return;
    }
    if (w->need_comma[w->depth])
        jw_put(w, ",", 1);
    w->need_comma[w->depth] = true;
    if (w->err == 0 && kvr_json_append_string(w->out, key, strlen(key)) != 0)
        jw_fail(w, KVR_ENOMEM);
    jw_put(w, ":", 1);
    w->after_key = true;
}

void kvr_jw_strn(kvr_jw *w, const char *s, size_t len)
{
    if (jw_value(w) && kvr_json_append_string(w->out, s, len) != 0)
        jw_fail(w, KVR_ENOMEM);
}

void kvr_jw_str(kvr_jw *w, const char *s)
{
    if (s == NULL) {
        kvr_jw_null(w);
        return;
    }
    kvr_jw_strn(w, s, strlen(s));
}

void kvr_jw_int(kvr_jw *w, int64_t v)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, "%" PRId64, v);
    if (jw_value(w))
        jw_put(w, tmp, (size_t)n);
}

void kvr_jw_u64(kvr_jw *w, uint64_t v)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, "%" PRIu64, v);
    if (jw_value(w))
        jw_put(w, tmp, (size_t)n);
}

void kvr_jw_double(kvr_jw *w, double v)
{
    if (!isfinite(v)) {
        kvr_jw_null(w);
        return;
    }
    char tmp[40];
    int n = snprintf(tmp, sizeof tmp, "%.15g", v);
    if (strtod(tmp, NULL) != v)
        n = snprintf(tmp, sizeof tmp, "%.17g", v);
    if (jw_value(w))
        jw_put(w, tmp, (size_t)n);
}

void kvr_jw_bool(kvr_jw *w, bool v)
{
    if (jw_value(w))
        jw_put(w, v ? "true" : "false", v ? 4 : 5);
}

void kvr_jw_null(kvr_jw *w)
{
    if (jw_value(w))
        jw_put(w, "null", 4);
}

void kvr_jw_raw(kvr_jw *w, const char *json, size_t len)
{
    if (jw_value(w))
        jw_put(w, json, len);
}

int kvr_jw_finish(kvr_jw *w)
{
    if (w->err)
        return w->err;
    if (w->depth != 0 || w->after_key)
        return KVR_EINVAL;
    return 0;
}

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
    tr->model = tr->ns = (kvr_slice){NULL, 0};
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
            } else if (key_is(k, klen, "model") || key_is(k, klen, "namespace")) {
                kvr_slice *dst = key_is(k, klen, "model") ? &tr->model : &tr->ns;
                if (dst->base != NULL)
                    return js_fail(&s, err, "duplicate member");
                const char *v = s.p;
                if (s.p < s.end && *s.p == 'n') {
                    if ((rc = js_literal(&s, "null", err)) != 0) /* null: absent */
                        return rc;
                } else {
                    if (s.p >= s.end || *s.p != '"')
                        return kvr_err_set(err, KVR_ETYPE, "field '%s' must be a string",
                                           dst == &tr->model ? "model" : "namespace");
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
