/* Values: arena, lists, dicts, Python-style str()/repr() and json.dumps. */
#include "tmpl_int.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tm_chunk {
    tm_chunk *next;
    size_t cap, used;
    max_align_t data[];
};

void *tm_alloc(tm_arena *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    if (n > a->limit || a->used > a->limit - n)
        return NULL;
    tm_chunk *c = a->head;
    if (c == NULL || c->cap - c->used < n) {
        size_t cap = n > 32768 ? n : 32768;
        c = malloc(sizeof(*c) + cap);
        if (c == NULL)
            return NULL;
        c->cap = cap;
        c->used = 0;
        c->next = a->head;
        a->head = c;
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    a->used += n;
    memset(p, 0, n);
    return p;
}

void tm_arena_free(tm_arena *a)
{
    tm_chunk *c = a->head;
    while (c) {
        tm_chunk *nx = c->next;
        free(c);
        c = nx;
    }
    a->head = NULL;
    a->used = 0;
}

jlist *jl_new(tm_arena *a, size_t cap)
{
    jlist *l = tm_alloc(a, sizeof(*l));
    if (l == NULL)
        return NULL;
    if (cap) {
        l->v = tm_alloc(a, cap * sizeof(jv));
        if (l->v == NULL)
            return NULL;
        l->cap = cap;
    }
    return l;
}

int jl_push(tm_arena *a, jlist *l, jv v)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 4;
        jv *nv = tm_alloc(a, cap * sizeof(jv));
        if (nv == NULL)
            return KVR_ELIMIT;
        if (l->n)
            memcpy(nv, l->v, l->n * sizeof(jv));
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
    return 0;
}

jdict *jd_new(tm_arena *a, size_t cap)
{
    jdict *d = tm_alloc(a, sizeof(*d));
    if (d == NULL)
        return NULL;
    if (cap) {
        d->e = tm_alloc(a, cap * sizeof(jentry));
        if (d->e == NULL)
            return NULL;
        d->cap = cap;
    }
    return d;
}

jv *jd_get(const jdict *d, const char *k, size_t kn)
{
    for (size_t i = 0; i < d->n; i++)
        if (d->e[i].kn == kn && memcmp(d->e[i].k, k, kn) == 0)
            return &d->e[i].v;
    return NULL;
}

int jd_set(tm_arena *a, jdict *d, const char *k, size_t kn, jv v)
{
    jv *old = jd_get(d, k, kn);
    if (old) {
        *old = v;
        return 0;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 4;
        jentry *ne = tm_alloc(a, cap * sizeof(jentry));
        if (ne == NULL)
            return KVR_ELIMIT;
        if (d->n)
            memcpy(ne, d->e, d->n * sizeof(jentry));
        d->e = ne;
        d->cap = cap;
    }
    d->e[d->n++] = (jentry){k, kn, v};
    return 0;
}

bool jv_truthy(jv v)
{
    switch (v.t) {
    case JV_UNDEF:
    case JV_NONE:
        return false;
    case JV_BOOL:
    case JV_INT:
        return v.i != 0;
    case JV_FLOAT:
        return v.f != 0.0;
    case JV_STR:
        return v.s.n != 0;
    case JV_LIST:
        return v.l->n != 0;
    case JV_DICT:
        return v.flag ? true : v.d->n != 0;
    default:
        return true;
    }
}

static bool is_num(jv v)
{
    return v.t == JV_BOOL || v.t == JV_INT || v.t == JV_FLOAT;
}

bool jv_equal(jv a, jv b)
{
    if (is_num(a) && is_num(b)) {
        if (a.t != JV_FLOAT && b.t != JV_FLOAT)
            return a.i == b.i;
        double x = a.t == JV_FLOAT ? a.f : (double)a.i;
        double y = b.t == JV_FLOAT ? b.f : (double)b.i;
        return x == y;
    }
    if (a.t != b.t)
        return false;
    switch (a.t) {
    case JV_UNDEF:
    case JV_NONE:
        return true;
    case JV_STR:
        return a.s.n == b.s.n && memcmp(a.s.p, b.s.p, a.s.n) == 0;
    case JV_LIST:
        if (a.flag != b.flag || a.l->n != b.l->n)
            return false;
        for (size_t i = 0; i < a.l->n; i++)
            if (!jv_equal(a.l->v[i], b.l->v[i]))
                return false;
        return true;
    case JV_DICT:
        if (a.flag || b.flag)
            return a.d == b.d;
        if (a.d->n != b.d->n)
            return false;
        for (size_t i = 0; i < a.d->n; i++) {
            jv *o = jd_get(b.d, a.d->e[i].k, a.d->e[i].kn);
            if (o == NULL || !jv_equal(a.d->e[i].v, *o))
                return false;
        }
        return true;
    default:
        return a.lp == b.lp && a.fn == b.fn;
    }
}

/* Python repr(float): the shortest digits that round-trip, fixed notation for exponents in
 * [-4, 16), else d.ddde+XX. */
void jv_float_repr(double f, char *buf, size_t cap)
{
    if (isnan(f)) {
        snprintf(buf, cap, "nan");
        return;
    }
    if (isinf(f)) {
        snprintf(buf, cap, f < 0 ? "-inf" : "inf");
        return;
    }
    char tmp[40];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec - 1, f);
        if (strtod(tmp, NULL) == f)
            break;
    }
    /* tmp = [-]d[.ddd]e[+-]XX */
    bool neg = tmp[0] == '-';
    const char *p = tmp + neg;
    char digits[24];
    int nd = 0;
    for (; *p && *p != 'e'; p++)
        if (*p != '.')
            digits[nd++] = *p;
    int exp = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = 0;
    char *o = buf;
    char *end = buf + cap - 1;
#define PUT(ch)                                                                                    \
    do {                                                                                           \
        if (o < end)                                                                               \
            *o++ = (ch);                                                                           \
    } while (0)
    if (neg)
        PUT('-');
    if (exp >= -5 + 1 && exp < 16) {
        if (exp < 0) {
            PUT('0');
            PUT('.');
            for (int i = 0; i < -exp - 1; i++)
                PUT('0');
            for (int i = 0; i < nd; i++)
                PUT(digits[i]);
        } else {
            for (int i = 0; i <= exp; i++)
                PUT(i < nd ? digits[i] : '0');
            PUT('.');
            if (nd > exp + 1)
                for (int i = exp + 1; i < nd; i++)
                    PUT(digits[i]);
            else
                PUT('0');
        }
    } else {
        PUT(digits[0]);
        if (nd > 1) {
            PUT('.');
            for (int i = 1; i < nd; i++)
                PUT(digits[i]);
        }
        char e[16];
        snprintf(e, sizeof e, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
        for (char *q = e; *q; q++)
            PUT(*q);
    }
#undef PUT
    *o = 0;
}

static int str_repr(kvr_buf *out, const char *p, size_t n)
{
    bool has_sq = memchr(p, '\'', n) != NULL, has_dq = memchr(p, '"', n) != NULL;
    char q = has_sq && !has_dq ? '"' : '\'';
    int rv = kvr_buf_append(out, &q, 1);
    size_t run = 0;
    for (size_t i = 0; i < n && rv == 0; i++) {
        unsigned char c = (unsigned char)p[i];
        const char *esc = NULL;
        char hex[8];
        if (c == '\\')
            esc = "\\\\";
        else if (c == (unsigned char)q)
            esc = q == '\'' ? "\\'" : "\\\"";
        else if (c == '\n')
            esc = "\\n";
        else if (c == '\r')
            esc = "\\r";
        else if (c == '\t')
            esc = "\\t";
        else if (c < 0x20 || c == 0x7f) {
            snprintf(hex, sizeof hex, "\\x%02x", c);
            esc = hex;
        }
        if (esc) {
            rv = kvr_buf_append(out, p + run, i - run);
            if (rv == 0)
                rv = kvr_buf_append_cstr(out, esc);
            run = i + 1;
        }
    }
    if (rv == 0)
        rv = kvr_buf_append(out, p + run, n - run);
    if (rv == 0)
        rv = kvr_buf_append(out, &q, 1);
    return rv;
}

int jv_repr_append(kvr_buf *out, jv v)
{
    if (v.t == JV_STR)
        return str_repr(out, v.s.p, v.s.n);
    if (v.t == JV_LIST) {
        int rv = kvr_buf_append(out, v.flag ? "(" : "[", 1);
        for (size_t i = 0; i < v.l->n && rv == 0; i++) {
            if (i)
                rv = kvr_buf_append(out, ", ", 2);
            if (rv == 0)
                rv = jv_repr_append(out, v.l->v[i]);
        }
        if (rv == 0 && v.flag && v.l->n == 1)
            rv = kvr_buf_append(out, ",", 1);
        return rv ? rv : kvr_buf_append(out, v.flag ? ")" : "]", 1);
    }
    if (v.t == JV_DICT && !v.flag) {
        int rv = kvr_buf_append(out, "{", 1);
        for (size_t i = 0; i < v.d->n && rv == 0; i++) {
            if (i)
                rv = kvr_buf_append(out, ", ", 2);
            if (rv == 0)
                rv = str_repr(out, v.d->e[i].k, v.d->e[i].kn);
            if (rv == 0)
                rv = kvr_buf_append(out, ": ", 2);
            if (rv == 0)
                rv = jv_repr_append(out, v.d->e[i].v);
        }
        return rv ? rv : kvr_buf_append(out, "}", 1);
    }
    return jv_str_append(out, v);
}

int jv_str_append(kvr_buf *out, jv v)
{
    char num[48];
    switch (v.t) {
    case JV_UNDEF:
        return 0;
    case JV_NONE:
        return kvr_buf_append(out, "None", 4);
    case JV_BOOL:
        return kvr_buf_append_cstr(out, v.i ? "True" : "False");
    case JV_INT:
        snprintf(num, sizeof num, "%lld", (long long)v.i);
        return kvr_buf_append_cstr(out, num);
    case JV_FLOAT:
        jv_float_repr(v.f, num, sizeof num);
        return kvr_buf_append_cstr(out, num);
    case JV_STR:
        return kvr_buf_append(out, v.s.p, v.s.n);
    case JV_LIST:
        return jv_repr_append(out, v);
    case JV_DICT:
        if (v.flag)
            return kvr_buf_append_cstr(out, "<Namespace>");
        return jv_repr_append(out, v);
    case JV_LOOP:
        return kvr_buf_append_cstr(out, "<LoopContext>");
    case JV_MACRO:
        return kvr_buf_append_cstr(out, "<Macro>");
    default:
        return kvr_buf_append_cstr(out, "<function>");
    }
}

static int json_str(kvr_buf *out, const char *p, size_t n)
{
    int rv = kvr_buf_append(out, "\"", 1);
    size_t run = 0;
    for (size_t i = 0; i < n && rv == 0; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        char esc[8];
        switch (c) {
        case '"':
            strcpy(esc, "\\\"");
            break;
        case '\\':
            strcpy(esc, "\\\\");
            break;
        case '\n':
            strcpy(esc, "\\n");
            break;
        case '\r':
            strcpy(esc, "\\r");
            break;
        case '\t':
            strcpy(esc, "\\t");
            break;
        case '\b':
            strcpy(esc, "\\b");
            break;
        case '\f':
            strcpy(esc, "\\f");
            break;
        default:
            snprintf(esc, sizeof esc, "\\u%04x", c);
        }
        rv = kvr_buf_append(out, p + run, i - run);
        if (rv == 0)
            rv = kvr_buf_append_cstr(out, esc);
        run = i + 1;
    }
    if (rv == 0)
        rv = kvr_buf_append(out, p + run, n - run);
    return rv ? rv : kvr_buf_append(out, "\"", 1);
}

static int json_nl(kvr_buf *out, int indent, int depth)
{
    int rv = kvr_buf_append(out, "\n", 1);
    for (int i = 0; i < indent * depth && rv == 0; i++)
        rv = kvr_buf_append(out, " ", 1);
    return rv;
}

static int key_cmp(const void *a, const void *b)
{
    const jentry *x = *(const jentry *const *)a, *y = *(const jentry *const *)b;
    size_t n = x->kn < y->kn ? x->kn : y->kn;
    int c = memcmp(x->k, y->k, n);
    return c ? c : (x->kn > y->kn) - (x->kn < y->kn);
}

int jv_json_append(kvr_buf *out, jv v, int indent, const char *isep, const char *ksep,
                   bool sort_keys, int depth)
{
    char num[48];
    int rv = 0;
    if (depth > 256)
        return KVR_ELIMIT;
    switch (v.t) {
    case JV_NONE:
        return kvr_buf_append(out, "null", 4);
    case JV_BOOL:
        return kvr_buf_append_cstr(out, v.i ? "true" : "false");
    case JV_INT:
        return jv_str_append(out, v);
    case JV_FLOAT:
        if (isnan(v.f))
            return kvr_buf_append_cstr(out, "NaN");
        if (isinf(v.f))
            return kvr_buf_append_cstr(out, v.f < 0 ? "-Infinity" : "Infinity");
        jv_float_repr(v.f, num, sizeof num);
        return kvr_buf_append_cstr(out, num);
    case JV_STR:
        return json_str(out, v.s.p, v.s.n);
    case JV_LIST:
        if (v.l->n == 0)
            return kvr_buf_append(out, "[]", 2);
        rv = kvr_buf_append(out, "[", 1);
        for (size_t i = 0; i < v.l->n && rv == 0; i++) {
            if (i)
                rv = kvr_buf_append_cstr(out, isep);
            if (rv == 0 && indent >= 0)
                rv = json_nl(out, indent, depth + 1);
            if (rv == 0)
                rv = jv_json_append(out, v.l->v[i], indent, isep, ksep, sort_keys, depth + 1);
        }
        if (rv == 0 && indent >= 0)
            rv = json_nl(out, indent, depth);
        return rv ? rv : kvr_buf_append(out, "]", 1);
    case JV_DICT: {
        if (v.flag)
            return KVR_ETYPE;
        if (v.d->n == 0)
            return kvr_buf_append(out, "{}", 2);
        jentry **order = malloc(v.d->n * sizeof(*order));
        if (order == NULL)
            return KVR_ENOMEM;
        for (size_t i = 0; i < v.d->n; i++)
            order[i] = &v.d->e[i];
        if (sort_keys)
            qsort(order, v.d->n, sizeof(*order), key_cmp);
        rv = kvr_buf_append(out, "{", 1);
        for (size_t i = 0; i < v.d->n && rv == 0; i++) {
            if (i)
                rv = kvr_buf_append_cstr(out, isep);
            if (rv == 0 && indent >= 0)
                rv = json_nl(out, indent, depth + 1);
            if (rv == 0)
                rv = json_str(out, order[i]->k, order[i]->kn);
            if (rv == 0)
                rv = kvr_buf_append_cstr(out, ksep);
            if (rv == 0)
                rv = jv_json_append(out, order[i]->v, indent, isep, ksep, sort_keys, depth + 1);
        }
        free(order);
        if (rv == 0 && indent >= 0)
            rv = json_nl(out, indent, depth);
        return rv ? rv : kvr_buf_append(out, "}", 1);
    }
    default:
        return KVR_ETYPE;
    }
}

const char *jv_type_name(jv v)
{
    static const char *names[] = {"Undefined", "NoneType", "bool", "int",      "float",  "str",
                                  "list",      "dict",     "loop", "function", "method", "macro"};
    if (v.t == JV_LIST && v.flag)
        return "tuple";
    if (v.t == JV_DICT && v.flag)
        return "Namespace";
    return names[v.t];
}

size_t tm_u8len(const char *p, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += ((unsigned char)p[i] & 0xC0) != 0x80;
    return c;
}

size_t tm_u8off(const char *p, size_t n, size_t ci)
{
    size_t c = 0, i = 0;
    for (; i < n; i++) {
        if (((unsigned char)p[i] & 0xC0) != 0x80) {
            if (c == ci)
                return i;
            c++;
        }
    }
    return n;
}
