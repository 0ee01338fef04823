/* kvr_json: bounded cJSON parsing, typed getters, exact integers, and a small writer. The
 * streaming token-array scan and string decoding are in kvr_json_scan.c. */
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
