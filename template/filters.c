#define _GNU_SOURCE
/* Attributes, methods, filters, tests and globals of the template language. */
#include "tmpl_int.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int tm_sort_cmp(tm_ev *e, jv a, jv b, int *cmp);

#define TRY(x)                                                                                     \
    do {                                                                                           \
        int rv_ = (x);                                                                             \
        if (rv_)                                                                                   \
            return rv_;                                                                            \
    } while (0)
#define OOM(n) tm_err(e, n, KVR_ELIMIT, "render memory limit reached")

enum {
    M_STARTSWITH = 1,
    M_ENDSWITH,
    M_STRIP,
    M_LSTRIP,
    M_RSTRIP,
    M_SPLIT,
    M_UPPER,
    M_LOWER,
    M_TITLE,
    M_CAPITALIZE,
    M_REPLACE,
    M_FIND,
    M_COUNT,
    M_GET,
    M_ITEMS,
    M_KEYS,
    M_VALUES,
    M_CYCLE,
    M__N
};
static const char *const MNAMES[M__N] = {NULL,         "startswith", "endswith", "strip", "lstrip",
                                         "rstrip",     "split",      "upper",    "lower", "title",
                                         "capitalize", "replace",    "find",     "count", "get",
                                         "items",      "keys",       "values",   "cycle"};

static bool eq(const char *a, size_t an, const char *b)
{
    return strlen(b) == an && memcmp(a, b, an) == 0;
}

static int method(tm_ev *e, const tm_node *n, jv obj, int id, jv *out)
{
    jv *self = tm_alloc(&e->a, sizeof(jv));
    if (self == NULL)
        return OOM(n);
    *self = obj;
    *out = (jv){.t = JV_METHOD, .fn = (uint16_t)id, .self = self};
    return 0;
}

int tm_getattr(tm_ev *e, const tm_node *n, jv obj, const char *name, size_t nl, jv *out)
{
    *out = jv_undef();
    if (obj.t == JV_STR) {
        for (int m = M_STARTSWITH; m <= M_COUNT; m++)
            if (eq(name, nl, MNAMES[m]))
                return method(e, n, obj, m, out);
        return 0;
    }
    if (obj.t == JV_DICT) {
        if (!obj.flag)
            for (int m = M_GET; m <= M_VALUES; m++)
                if (eq(name, nl, MNAMES[m]))
                    return method(e, n, obj, m, out);
        jv *v = jd_get(obj.d, name, nl);
        if (v)
            *out = *v;
        return 0;
    }
    if (obj.t == JV_LOOP) {
        const jloop *l = obj.lp;
        int64_t len = (int64_t)l->items->n, i = (int64_t)l->i;
        if (eq(name, nl, "index"))
            *out = jv_int(i + 1);
        else if (eq(name, nl, "index0"))
            *out = jv_int(i);
        else if (eq(name, nl, "revindex"))
            *out = jv_int(len - i);
        else if (eq(name, nl, "revindex0"))
            *out = jv_int(len - i - 1);
        else if (eq(name, nl, "first"))
            *out = jv_bool(i == 0);
        else if (eq(name, nl, "last"))
            *out = jv_bool(i == len - 1);
        else if (eq(name, nl, "length"))
            *out = jv_int(len);
        else if (eq(name, nl, "depth"))
            *out = jv_int(l->depth);
        else if (eq(name, nl, "depth0"))
            *out = jv_int(l->depth - 1);
        else if (eq(name, nl, "previtem"))
            *out = i > 0 ? l->items->v[i - 1] : jv_undef();
        else if (eq(name, nl, "nextitem"))
            *out = i + 1 < len ? l->items->v[i + 1] : jv_undef();
        else if (eq(name, nl, "cycle"))
            return method(e, n, obj, M_CYCLE, out);
        return 0;
    }
    return 0;
}

static bool is_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v' ||
           (c >= 0x1c && c <= 0x1f);
}

static bool in_chars(jv chars, const char *p, size_t k)
{
    if (chars.t != JV_STR)
        return k == 1 && is_space((unsigned char)p[0]);
    for (size_t i = 0; i + k <= chars.s.n; i++)
        if (memcmp(chars.s.p + i, p, k) == 0)
            return true;
    return false;
}

static size_t cp_len(const char *p, size_t left)
{
    size_t k = 1;
    while (k < left && ((unsigned char)p[k] & 0xC0) == 0x80)
        k++;
    return k;
}

static jv strip(jv s, jv chars, bool left, bool right)
{
    size_t a = 0, b = s.s.n;
    while (left && a < b) {
        size_t k = cp_len(s.s.p + a, b - a);
        if (!in_chars(chars, s.s.p + a, k))
            break;
        a += k;
    }
    while (right && b > a) {
        size_t k = 1;
        while (k < b - a && ((unsigned char)s.s.p[b - k] & 0xC0) == 0x80)
            k++;
        if (!in_chars(chars, s.s.p + b - k, k))
            break;
        b -= k;
    }
    return jv_str(s.s.p + a, b - a);
}

/* ASCII case mapping; non-ASCII bytes copied (Python maps them too: documented gap) */
static int casemap(tm_ev *e, const tm_node *n, jv s, int mode, jv *out)
{
    char *p = tm_alloc(&e->a, s.s.n + 1);
    if (p == NULL)
        return OOM(n);
    bool prev_cased = false;
    for (size_t i = 0; i < s.s.n; i++) {
        unsigned char c = (unsigned char)s.s.p[i];
        bool alpha = isalpha(c) && c < 0x80;
        if (mode == 0)
            c = c < 0x80 ? (unsigned char)toupper(c) : c;
        else if (mode == 1)
            c = c < 0x80 ? (unsigned char)tolower(c) : c;
        else if (mode == 2 && c < 0x80)
            c = (unsigned char)(prev_cased ? tolower(c) : toupper(c));
        else if (mode == 3 && c < 0x80)
            c = (unsigned char)(i == 0 ? toupper(c) : tolower(c));
        prev_cased = alpha;
        p[i] = (char)c;
    }
    *out = jv_str(p, s.s.n);
    return 0;
}

static int replace(tm_ev *e, const tm_node *n, jv s, jv old, jv new_, int64_t count, jv *out)
{
    if (old.t != JV_STR || new_.t != JV_STR)
        return tm_err(e, n, KVR_ETYPE, "replace() arguments must be str");
    kvr_buf b;
    kvr_buf_init(&b);
    size_t i = 0;
    int64_t done = 0;
    int rv = 0;
    if (old.s.n == 0) {
        *out = s; /* Python inserts between code points: not used by chat templates */
        return tm_err(e, n, KVR_EUNSUPPORTED, "replace() with an empty pattern");
    }
    while (i < s.s.n && rv == 0) {
        const char *hit =
            (count < 0 || done < count) ? memmem(s.s.p + i, s.s.n - i, old.s.p, old.s.n) : NULL;
        if (hit == NULL) {
            rv = kvr_buf_append(&b, s.s.p + i, s.s.n - i);
            break;
        }
        rv = kvr_buf_append(&b, s.s.p + i, (size_t)(hit - (s.s.p + i)));
        if (rv == 0)
            rv = kvr_buf_append(&b, new_.s.p, new_.s.n);
        i = (size_t)(hit - s.s.p) + old.s.n;
        done++;
    }
    char *p = rv == 0 ? tm_alloc(&e->a, b.len + 1) : NULL;
    if (p && b.len)
        memcpy(p, b.base, b.len);
    size_t len = b.len;
    kvr_buf_free(&b);
    if (p == NULL)
        return OOM(n);
    *out = jv_str(p, len);
    return 0;
}

static int split(tm_ev *e, const tm_node *n, jv s, jv sep, int64_t maxsplit, jv *out)
{
    jlist *l = jl_new(&e->a, 0);
    if (l == NULL)
        return OOM(n);
    size_t i = 0;
    int64_t done = 0;
    if (sep.t == JV_STR) {
        if (sep.s.n == 0)
            return tm_err(e, n, KVR_EINVAL, "empty separator");
        for (;;) {
            const char *hit = (maxsplit < 0 || done < maxsplit)
                                  ? memmem(s.s.p + i, s.s.n - i, sep.s.p, sep.s.n)
                                  : NULL;
            if (hit == NULL) {
                if (jl_push(&e->a, l, jv_str(s.s.p + i, s.s.n - i)))
                    return OOM(n);
                break;
            }
            if (jl_push(&e->a, l, jv_str(s.s.p + i, (size_t)(hit - s.s.p) - i)))
                return OOM(n);
            i = (size_t)(hit - s.s.p) + sep.s.n;
            done++;
        }
    } else {
        for (;;) {
            while (i < s.s.n && is_space((unsigned char)s.s.p[i]))
                i++;
            if (i >= s.s.n)
                break;
            size_t j = i;
            if (maxsplit >= 0 && done >= maxsplit) {
                jv rest = strip(jv_str(s.s.p + i, s.s.n - i), jv_none(), false, true);
                if (jl_push(&e->a, l, rest))
                    return OOM(n);
                break;
            }
            while (j < s.s.n && !is_space((unsigned char)s.s.p[j]))
                j++;
            if (jl_push(&e->a, l, jv_str(s.s.p + i, j - i)))
                return OOM(n);
            done++;
            i = j;
        }
    }
    *out = (jv){.t = JV_LIST, .l = l};
    return 0;
}

static int items_of(tm_ev *e, const tm_node *n, jv d, int which, jv *out)
{
    if (d.t != JV_DICT)
        return tm_err(e, n, KVR_ETYPE, "items() of a '%s'", jv_type_name(d));
    jlist *l = jl_new(&e->a, d.d->n);
    if (l == NULL)
        return OOM(n);
    for (size_t i = 0; i < d.d->n; i++) {
        jv k = jv_str(d.d->e[i].k, d.d->e[i].kn);
        if (which == 1) {
            l->v[l->n++] = k;
        } else if (which == 2) {
            l->v[l->n++] = d.d->e[i].v;
        } else {
            jlist *pair = jl_new(&e->a, 2);
            if (pair == NULL)
                return OOM(n);
            pair->v[0] = k;
            pair->v[1] = d.d->e[i].v;
            pair->n = 2;
            l->v[l->n++] = (jv){.t = JV_LIST, .flag = 1, .l = pair};
        }
    }
    *out = (jv){.t = JV_LIST, .l = l};
    return 0;
}

static int need_str(tm_ev *e, const tm_node *n, jv v, const char *what)
{
    if (v.t == JV_STR)
        return 0;
    return tm_err(e, n, KVR_ETYPE, "%s expects a str, got '%s'", what, jv_type_name(v));
}

int tm_call_method(tm_ev *e, const tm_node *n, jv m, tm_args *a, jv *out)
{
    jv s = *m.self;
    jv a0 = tm_kwarg(a, "\x01", 0, jv_none()), a1 = tm_kwarg(a, "\x01", 1, jv_none());
    switch (m.fn) {
    case M_STARTSWITH:
    case M_ENDSWITH: {
        jlist *opts = NULL;
        if (a0.t == JV_LIST)
            opts = a0.l;
        bool r = false;
        for (size_t i = 0; i < (opts ? opts->n : 1) && !r; i++) {
            jv p = opts ? opts->v[i] : a0;
            TRY(need_str(e, n, p, MNAMES[m.fn]));
            if (p.s.n <= s.s.n)
                r = memcmp(m.fn == M_STARTSWITH ? s.s.p : s.s.p + s.s.n - p.s.n, p.s.p, p.s.n) == 0;
        }
        *out = jv_bool(r);
        return 0;
    }
    case M_STRIP:
        *out = strip(s, a0, true, true);
        return 0;
    case M_LSTRIP:
        *out = strip(s, a0, true, false);
        return 0;
    case M_RSTRIP:
        *out = strip(s, a0, false, true);
        return 0;
    case M_SPLIT: {
        jv sep = tm_kwarg(a, "sep", 0, jv_none());
        jv mx = tm_kwarg(a, "maxsplit", 1, jv_int(-1));
        return split(e, n, s, sep, mx.t == JV_INT ? mx.i : -1, out);
    }
    case M_UPPER:
        return casemap(e, n, s, 0, out);
    case M_LOWER:
        return casemap(e, n, s, 1, out);
    case M_TITLE:
        return casemap(e, n, s, 2, out);
    case M_CAPITALIZE:
        return casemap(e, n, s, 3, out);
    case M_REPLACE: {
        jv c = tm_kwarg(a, "count", 2, jv_int(-1));
        return replace(e, n, s, a0, a1, c.t == JV_INT ? c.i : -1, out);
    }
    case M_FIND:
    case M_COUNT: {
        TRY(need_str(e, n, a0, MNAMES[m.fn]));
        if (m.fn == M_FIND) {
            const char *h = a0.s.n ? memmem(s.s.p, s.s.n, a0.s.p, a0.s.n) : s.s.p;
            *out = jv_int(h ? (int64_t)tm_u8len(s.s.p, (size_t)(h - s.s.p)) : -1);
            return 0;
        }
        int64_t c = 0;
        if (a0.s.n == 0) {
            *out = jv_int((int64_t)tm_u8len(s.s.p, s.s.n) + 1);
            return 0;
        }
        for (const char *h = s.s.p; (h = memmem(h, s.s.n - (size_t)(h - s.s.p), a0.s.p, a0.s.n));
             h += a0.s.n)
            c++;
        *out = jv_int(c);
        return 0;
    }
    case M_GET: {
        jv *v = a0.t == JV_STR ? jd_get(s.d, a0.s.p, a0.s.n) : NULL;
        *out = v ? *v : (a->npos > 1 ? a1 : jv_none());
        return 0;
    }
    case M_ITEMS:
        return items_of(e, n, s, 0, out);
    case M_KEYS:
        return items_of(e, n, s, 1, out);
    case M_VALUES:
        return items_of(e, n, s, 2, out);
    case M_CYCLE:
        if (a->npos == 0)
            return tm_err(e, n, KVR_EINVAL, "no items for cycling given");
        *out = a->pos[s.lp->i % a->npos];
        return 0;
    }
    return tm_err(e, n, KVR_EINVAL, "unknown method");
}

int tm_call_func(tm_ev *e, const tm_node *n, jv f, tm_args *a, jv *out)
{
    switch (f.fn) {
    case 1: { /* range */
        int64_t lo = 0, hi, st = 1;
        for (size_t i = 0; i < a->npos; i++)
            if (a->pos[i].t != JV_INT)
                return tm_err(e, n, KVR_ETYPE, "range() arguments must be integers");
        if (a->npos == 1)
            hi = a->pos[0].i;
        else if (a->npos >= 2) {
            lo = a->pos[0].i;
            hi = a->pos[1].i;
            if (a->npos == 3)
                st = a->pos[2].i;
        } else
            return tm_err(e, n, KVR_EINVAL, "range expected at least 1 argument");
        if (st == 0)
            return tm_err(e, n, KVR_EINVAL, "range() arg 3 must not be zero");
        jlist *l = jl_new(&e->a, 0);
        if (l == NULL)
            return OOM(n);
        for (int64_t i = lo; st > 0 ? i < hi : i > hi; i += st) {
            if (l->n >= 100000)
                return tm_err(e, n, KVR_ELIMIT, "range() over 100000 items");
            if (jl_push(&e->a, l, jv_int(i)))
                return OOM(n);
        }
        *out = (jv){.t = JV_LIST, .l = l};
        return 0;
    }
    case 2:   /* namespace */
    case 3: { /* dict */
        jdict *d = jd_new(&e->a, a->nkw);
        if (d == NULL)
            return OOM(n);
        if (a->npos == 1 && a->pos[0].t == JV_DICT)
            for (size_t i = 0; i < a->pos[0].d->n; i++)
                if (jd_set(&e->a, d, a->pos[0].d->e[i].k, a->pos[0].d->e[i].kn,
                           a->pos[0].d->e[i].v))
                    return OOM(n);
        for (size_t i = 0; i < a->nkw; i++)
            if (jd_set(&e->a, d, a->kwn[i], strlen(a->kwn[i]), a->kw[i]))
                return OOM(n);
        *out = (jv){.t = JV_DICT, .flag = f.fn == 2, .d = d};
        return 0;
    }
    case 4: { /* raise_exception */
        jv msg = a->npos ? a->pos[0] : jv_str("", 0);
        TRY(tm_tostr(e, msg, &msg));
        return kvr_err_set(e->err, KVR_EINVAL, "raise_exception: %.*s",
                           (int)(msg.s.n > 300 ? 300 : msg.s.n), msg.s.p);
    }
    case 5: { /* strftime_now: datetime.now().strftime(fmt), local time */
        jv fmt = a->npos ? a->pos[0] : jv_none();
        TRY(need_str(e, n, fmt, "strftime_now"));
        char cfmt[256], buf[512];
        if (fmt.s.n >= sizeof cfmt)
            return tm_err(e, n, KVR_ELIMIT, "strftime_now format too long");
        memcpy(cfmt, fmt.s.p, fmt.s.n);
        cfmt[fmt.s.n] = 0;
        time_t now = time(NULL);
        struct tm tmv;
        localtime_r(&now, &tmv);
        size_t k = strftime(buf, sizeof buf, cfmt, &tmv);
        char *p = tm_alloc(&e->a, k + 1);
        if (p == NULL)
            return OOM(n);
        memcpy(p, buf, k);
        *out = jv_str(p, k);
        return 0;
    }
    }
    return tm_err(e, n, KVR_EINVAL, "unknown function");
}

#include "filters_tbl.inc"
