#define _GNU_SOURCE
/* Evaluator: walks the AST over a per-render arena; every step counted, output and memory
 * bounded, macro recursion depth bounded. */
#include "tmpl_int.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int tm_err(tm_ev *e, const tm_node *n, int code, const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n)
        return kvr_err_set(e->err, code, "template line %d col %d: %s", n->line, n->col, msg);
    return kvr_err_set(e->err, code, "template: %s", msg);
}

#define TRY(x)                                                                                     \
    do {                                                                                           \
        int rv_ = (x);                                                                             \
        if (rv_)                                                                                   \
            return rv_;                                                                            \
    } while (0)
#define OOM(n) tm_err(e, n, KVR_ELIMIT, "render memory limit reached")

static int undef_err(tm_ev *e, const tm_node *n, jv v)
{
    if (v.name)
        return tm_err(e, n, KVR_EINVAL, "'%s' is undefined", v.name);
    return tm_err(e, n, KVR_EINVAL, "undefined value used");
}

static int eval(tm_ev *e, const tm_node *n, tm_frame *f, jv *out);
static int exec_body(tm_ev *e, const tm_nodelist *body, tm_frame *f);

static jv *lookup(tm_frame *f, const char *name, size_t len)
{
    for (; f; f = f->parent) {
        jv *v = jd_get(f->vars, name, len);
        if (v)
            return v;
    }
    return NULL;
}

enum { G_RANGE = 1, G_NAMESPACE, G_DICT, G_RAISE, G_STRFTIME };
static const char *const GLOBALS[] = {NULL,   "range",           "namespace",
                                      "dict", "raise_exception", "strftime_now"};

static int step(tm_ev *e, const tm_node *n)
{
    if (++e->steps > e->lim.max_steps)
        return tm_err(e, n, KVR_ELIMIT, "template ran more than %llu steps",
                      (unsigned long long)e->lim.max_steps);
    return 0;
}

/* Called after each append: the chunk that crossed the limit is cut back to it, so a failed
 * render never leaves more than max_output bytes in the caller's buffer (found by
 * fuzz_template: a loop of raw text ended one chunk over). */
static int check_out(tm_ev *e, const tm_node *n)
{
    if (e->out->len - e->out_base > e->lim.max_output) {
        e->out->len = e->out_base + e->lim.max_output;
        return tm_err(e, n, KVR_ELIMIT, "template output over %zu bytes", e->lim.max_output);
    }
    return 0;
}

static int new_str(tm_ev *e, const tm_node *n, const char *a, size_t an, const char *b, size_t bn,
                   jv *out)
{
    char *s = tm_alloc(&e->a, an + bn + 1);
    if (s == NULL)
        return OOM(n);
    memcpy(s, a, an);
    memcpy(s + an, b, bn);
    *out = jv_str(s, an + bn);
    return 0;
}

int tm_tostr(tm_ev *e, jv v, jv *out)
{
    if (v.t == JV_STR) {
        *out = v;
        return 0;
    }
    kvr_buf b;
    kvr_buf_init(&b);
    if (jv_str_append(&b, v) != 0) {
        kvr_buf_free(&b);
        return tm_err(e, NULL, KVR_ENOMEM, "out of memory");
    }
    int rv = new_str(e, NULL, b.base ? b.base : "", b.len, "", 0, out);
    kvr_buf_free(&b);
    return rv;
}

static bool is_num(jv v)
{
    return v.t == JV_INT || v.t == JV_FLOAT || v.t == JV_BOOL;
}
static double num(jv v)
{
    return v.t == JV_FLOAT ? v.f : (double)v.i;
}

static int arith(tm_ev *e, const tm_node *n, const char *op, jv a, jv b, jv *out)
{
    if (a.t == JV_UNDEF)
        return undef_err(e, n, a);
    if (b.t == JV_UNDEF)
        return undef_err(e, n, b);
    char c = op[0];
    if (c == '+' && a.t == JV_STR && b.t == JV_STR)
        return new_str(e, n, a.s.p, a.s.n, b.s.p, b.s.n, out);
    if (c == '+' && a.t == JV_LIST && b.t == JV_LIST) {
        jlist *l = jl_new(&e->a, a.l->n + b.l->n);
        if (l == NULL)
            return OOM(n);
        for (size_t i = 0; i < a.l->n; i++)
            l->v[l->n++] = a.l->v[i];
        for (size_t i = 0; i < b.l->n; i++)
            l->v[l->n++] = b.l->v[i];
        *out = (jv){.t = JV_LIST, .flag = a.flag, .l = l};
        return 0;
    }
    if (c == '*' && op[1] == 0 &&
        ((a.t == JV_STR && b.t == JV_INT) || (a.t == JV_INT && b.t == JV_STR))) {
        jv s = a.t == JV_STR ? a : b;
        int64_t k = a.t == JV_INT ? a.i : b.i;
        if (k <= 0) {
            *out = jv_str("", 0);
            return 0;
        }
        if (s.s.n && (uint64_t)k > e->lim.max_output / s.s.n)
            return tm_err(e, n, KVR_ELIMIT, "string repetition too large");
        char *p = tm_alloc(&e->a, s.s.n * (size_t)k + 1);
        if (p == NULL)
            return OOM(n);
        for (int64_t i = 0; i < k; i++)
            memcpy(p + (size_t)i * s.s.n, s.s.p, s.s.n);
        *out = jv_str(p, s.s.n * (size_t)k);
        return 0;
    }
    if (!is_num(a) || !is_num(b))
        return tm_err(e, n, KVR_ETYPE, "unsupported operand type(s) for %s: '%s' and '%s'", op,
                      jv_type_name(a), jv_type_name(b));
    bool ints = a.t != JV_FLOAT && b.t != JV_FLOAT;
    int64_t r;
    switch (c) {
    case '+':
    case '-':
        if (ints) {
            if (c == '+' ? __builtin_add_overflow(a.i, b.i, &r)
                         : __builtin_sub_overflow(a.i, b.i, &r))
                return tm_err(e, n, KVR_ELIMIT, "integer overflow");
            *out = jv_int(r);
        } else {
            *out = jv_float(c == '+' ? num(a) + num(b) : num(a) - num(b));
        }
        return 0;
    case '*':
        if (op[1] == '*') {
            if (ints && b.i >= 0) {
                int64_t acc = 1;
                for (int64_t i = 0; i < b.i; i++) {
                    if (__builtin_mul_overflow(acc, a.i, &acc))
                        return tm_err(e, n, KVR_ELIMIT, "integer overflow");
                    if (acc == 0 || acc == 1)
                        break;
                }
                *out = jv_int(acc);
            } else {
                *out = jv_float(pow(num(a), num(b)));
            }
            return 0;
        }
        if (ints) {
            if (__builtin_mul_overflow(a.i, b.i, &r))
                return tm_err(e, n, KVR_ELIMIT, "integer overflow");
            *out = jv_int(r);
        } else {
            *out = jv_float(num(a) * num(b));
        }
        return 0;
    case '/':
        if (num(b) == 0)
            return tm_err(e, n, KVR_EINVAL, "division by zero");
        if (op[1] == '/') {
            if (ints) {
                if (a.i == INT64_MIN && b.i == -1)
                    return tm_err(e, n, KVR_ELIMIT, "integer overflow");
                int64_t q = a.i / b.i;
                if ((a.i % b.i != 0) && ((a.i < 0) != (b.i < 0)))
                    q--;
                *out = jv_int(q);
            } else {
                *out = jv_float(floor(num(a) / num(b)));
            }
            return 0;
        }
        *out = jv_float(num(a) / num(b));
        return 0;
    case '%':
        if (num(b) == 0)
            return tm_err(e, n, KVR_EINVAL, "modulo by zero");
        if (ints) {
            if (b.i == -1) {
                *out = jv_int(0);
                return 0;
            }
            int64_t m = a.i % b.i;
            if (m != 0 && ((m < 0) != (b.i < 0)))
                m += b.i;
            *out = jv_int(m);
        } else {
            double m = fmod(num(a), num(b));
            if (m != 0 && ((m < 0) != (num(b) < 0)))
                m += num(b);
            *out = jv_float(m);
        }
        return 0;
    }
    return tm_err(e, n, KVR_EINVAL, "unknown operator %s", op);
}

static int contains(tm_ev *e, const tm_node *n, jv hay, jv needle, bool *out)
{
    if (hay.t == JV_STR) {
        if (needle.t != JV_STR)
            return tm_err(e, n, KVR_ETYPE, "'in <string>' requires string as left operand");
        *out = needle.s.n == 0 || memmem(hay.s.p, hay.s.n, needle.s.p, needle.s.n) != NULL;
        return 0;
    }
    if (hay.t == JV_LIST) {
        *out = false;
        for (size_t i = 0; i < hay.l->n && !*out; i++)
            *out = jv_equal(hay.l->v[i], needle);
        return 0;
    }
    if (hay.t == JV_DICT) {
        *out = needle.t == JV_STR && jd_get(hay.d, needle.s.p, needle.s.n) != NULL;
        return 0;
    }
    if (hay.t == JV_UNDEF)
        return undef_err(e, n, hay);
    return tm_err(e, n, KVR_ETYPE, "argument of type '%s' is not iterable", jv_type_name(hay));
}

static int order(tm_ev *e, const tm_node *n, jv a, jv b, int *cmp)
{
    if (is_num(a) && is_num(b)) {
        double x = num(a), y = num(b);
        if (a.t != JV_FLOAT && b.t != JV_FLOAT)
            *cmp = (a.i > b.i) - (a.i < b.i);
        else
            *cmp = (x > y) - (x < y);
        return 0;
    }
    if (a.t == JV_STR && b.t == JV_STR) {
        size_t m = a.s.n < b.s.n ? a.s.n : b.s.n;
        int c = memcmp(a.s.p, b.s.p, m);
        *cmp = c ? (c > 0) - (c < 0) : (a.s.n > b.s.n) - (a.s.n < b.s.n);
        return 0;
    }
    if (a.t == JV_LIST && b.t == JV_LIST) {
        for (size_t i = 0; i < a.l->n && i < b.l->n; i++) {
            if (!jv_equal(a.l->v[i], b.l->v[i]))
                return order(e, n, a.l->v[i], b.l->v[i], cmp);
        }
        *cmp = (a.l->n > b.l->n) - (a.l->n < b.l->n);
        return 0;
    }
    return tm_err(e, n, KVR_ETYPE, "'<' not supported between instances of '%s' and '%s'",
                  jv_type_name(a), jv_type_name(b));
}

int tm_sort_cmp(tm_ev *e, jv a, jv b, int *cmp)
{
    return order(e, NULL, a, b, cmp);
}

int tm_to_list(tm_ev *e, const tm_node *n, jv v, jlist **out)
{
    if (v.t == JV_LIST) {
        *out = v.l;
        return 0;
    }
    if (v.t == JV_UNDEF) {
        *out = jl_new(&e->a, 0);
        return *out ? 0 : OOM(n);
    }
    if (v.t == JV_DICT && !v.flag) {
        jlist *l = jl_new(&e->a, v.d->n);
        if (l == NULL)
            return OOM(n);
        for (size_t i = 0; i < v.d->n; i++)
            l->v[l->n++] = jv_str(v.d->e[i].k, v.d->e[i].kn);
        *out = l;
        return 0;
    }
    if (v.t == JV_STR) {
        /* one item per code point as the loop below splits: a string that starts with a
         * continuation byte (not UTF-8) gives it an item of its own, which tm_u8len does not
         * count (the list was one item short: found by fuzz_template) */
        size_t items =
            v.s.n ? tm_u8len(v.s.p, v.s.n) + (((unsigned char)v.s.p[0] & 0xC0) == 0x80) : 0;
        jlist *l = jl_new(&e->a, items);
        if (l == NULL)
            return OOM(n);
        for (size_t i = 0; i < v.s.n;) {
            size_t k = i + 1;
            while (k < v.s.n && ((unsigned char)v.s.p[k] & 0xC0) == 0x80)
                k++;
            l->v[l->n++] = jv_str(v.s.p + i, k - i);
            i = k;
        }
        *out = l;
        return 0;
    }
    return tm_err(e, n, KVR_ETYPE, "'%s' object is not iterable", jv_type_name(v));
}

static int64_t norm_index(int64_t i, size_t len)
{
    return i < 0 ? i + (int64_t)len : i;
}

int tm_getitem(tm_ev *e, const tm_node *n, jv obj, jv key, jv *out)
{
    if (obj.t == JV_UNDEF)
        return undef_err(e, n, obj);
    if (obj.t == JV_DICT && key.t == JV_STR) {
        jv *v = jd_get(obj.d, key.s.p, key.s.n);
        if (v) {
            *out = *v;
            return 0;
        }
        return tm_getattr(e, n, obj, key.s.p, key.s.n, out);
    }
    if ((obj.t == JV_LIST || obj.t == JV_STR) && (key.t == JV_INT || key.t == JV_BOOL)) {
        size_t len = obj.t == JV_LIST ? obj.l->n : tm_u8len(obj.s.p, obj.s.n);
        int64_t i = norm_index(key.i, len);
        if (i < 0 || (size_t)i >= len) {
            *out = jv_undef();
            return 0;
        }
        if (obj.t == JV_LIST) {
            *out = obj.l->v[i];
        } else {
            size_t b0 = tm_u8off(obj.s.p, obj.s.n, (size_t)i);
            size_t b1 = tm_u8off(obj.s.p, obj.s.n, (size_t)i + 1);
            *out = jv_str(obj.s.p + b0, b1 - b0);
        }
        return 0;
    }
    if (key.t == JV_STR)
        return tm_getattr(e, n, obj, key.s.p, key.s.n, out);
    *out = jv_undef();
    return 0;
}

static int slice(tm_ev *e, const tm_node *n, jv obj, jv *parts, jv *out)
{
    if (obj.t == JV_UNDEF)
        return undef_err(e, n, obj);
    if (obj.t != JV_LIST && obj.t != JV_STR)
        return tm_err(e, n, KVR_ETYPE, "'%s' object is not subscriptable", jv_type_name(obj));
    int64_t len = (int64_t)(obj.t == JV_LIST ? obj.l->n : tm_u8len(obj.s.p, obj.s.n));
    int64_t st = 1;
    for (int k = 0; k < 3; k++)
        if (parts[k].t != JV_NONE && parts[k].t != JV_UNDEF && parts[k].t != JV_INT)
            return tm_err(e, n, KVR_ETYPE, "slice indices must be integers or None");
    if (parts[2].t == JV_INT)
        st = parts[2].i;
    if (st == 0)
        return tm_err(e, n, KVR_EINVAL, "slice step cannot be zero");
    int64_t lo, hi;
    if (st > 0) {
        lo = parts[0].t == JV_INT ? norm_index(parts[0].i, (size_t)len) : 0;
        hi = parts[1].t == JV_INT ? norm_index(parts[1].i, (size_t)len) : len;
        lo = lo < 0 ? 0 : lo > len ? len : lo;
        hi = hi < 0 ? 0 : hi > len ? len : hi;
    } else {
        lo = parts[0].t == JV_INT ? norm_index(parts[0].i, (size_t)len) : len - 1;
        hi = parts[1].t == JV_INT ? norm_index(parts[1].i, (size_t)len) : -1;
        lo = lo < -1 ? -1 : lo > len - 1 ? len - 1 : lo;
        hi = hi < -1 ? -1 : hi > len - 1 ? len - 1 : hi;
    }
    jlist *src = NULL;
    TRY(tm_to_list(e, n, obj, &src));
    jlist *l = jl_new(&e->a, 0);
    if (l == NULL)
        return OOM(n);
    for (int64_t i = lo; st > 0 ? i < hi : i > hi; i += st)
        if (jl_push(&e->a, l, src->v[i]) != 0)
            return OOM(n);
    if (obj.t == JV_LIST) {
        *out = (jv){.t = JV_LIST, .flag = obj.flag, .l = l};
        return 0;
    }
    size_t total = 0;
    for (size_t i = 0; i < l->n; i++)
        total += l->v[i].s.n;
    char *p = tm_alloc(&e->a, total + 1);
    if (p == NULL)
        return OOM(n);
    size_t off = 0;
    for (size_t i = 0; i < l->n; i++) {
        memcpy(p + off, l->v[i].s.p, l->v[i].s.n);
        off += l->v[i].s.n;
    }
    *out = jv_str(p, total);
    return 0;
}

#include "eval_stmt.inc"
