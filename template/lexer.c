/* Lexer: template source → tokens, applying jinja2's whitespace rules as transformers sets
 * them (trim_blocks, lstrip_blocks, "-" strip markers, "+" keep markers, newline
 * normalization to \n and the dropped final newline of keep_trailing_newline=False). */
#include "tmpl_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct lx {
    const char *s; /* normalized source */
    size_t n, pos;
    tm_arena *a;
    tm_token *v;
    size_t nv, cap;
    size_t lc_off; /* line/col tracker */
    int line, col;
    kvr_err *err;
} lx;

static void where(lx *l, size_t off, int *line, int *col)
{
    if (off < l->lc_off) {
        l->lc_off = 0;
        l->line = 1;
        l->col = 1;
    }
    for (; l->lc_off < off; l->lc_off++) {
        if (l->s[l->lc_off] == '\n') {
            l->line++;
            l->col = 1;
        } else {
            l->col++;
        }
    }
    *line = l->line;
    *col = l->col;
}

static int fail(lx *l, size_t off, const char *msg)
{
    int line, col;
    where(l, off, &line, &col);
    return kvr_err_set(l->err, KVR_EINVAL, "template line %d col %d: %s", line, col, msg);
}

static tm_token *push(lx *l, int type, size_t off)
{
    if (l->nv == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 256;
        tm_token *nv = tm_alloc(l->a, cap * sizeof(*nv));
        if (nv == NULL)
            return NULL;
        if (l->nv)
            memcpy(nv, l->v, l->nv * sizeof(*nv));
        l->v = nv;
        l->cap = cap;
    }
    tm_token *t = &l->v[l->nv++];
    memset(t, 0, sizeof(*t));
    t->type = type;
    where(l, off, &t->line, &t->col);
    return t;
}

static bool is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

static int put_utf8(char *o, unsigned cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | cp >> 6);
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12);
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | cp >> 18);
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static int hexval(const char *p, int n, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < n; i++) {
        char c = p[i];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (d < 0)
            return -1;
        v = v * 16 + (unsigned)d;
    }
    *out = v;
    return 0;
}

/* A quoted string with Python's escapes (jinja2 decodes literals with unicode-escape). */
static int lex_string(lx *l)
{
    size_t start = l->pos;
    char q = l->s[l->pos++];
    char *o = tm_alloc(l->a, (l->n - l->pos) + 1);
    if (o == NULL)
        return kvr_err_set(l->err, KVR_ENOMEM, "template: out of memory");
    size_t on = 0;
    for (;;) {
        if (l->pos >= l->n)
            return fail(l, start, "unterminated string literal");
        char c = l->s[l->pos++];
        if (c == q)
            break;
        if (c != '\\') {
            o[on++] = c;
            continue;
        }
        if (l->pos >= l->n)
            return fail(l, start, "unterminated string literal");
        char e = l->s[l->pos++];
        unsigned cp;
        int hn = 0;
        switch (e) {
        case 'n':
            o[on++] = '\n';
            break;
        case 't':
            o[on++] = '\t';
            break;
        case 'r':
            o[on++] = '\r';
            break;
        case 'b':
            o[on++] = '\b';
            break;
        case 'f':
            o[on++] = '\f';
            break;
        case 'v':
            o[on++] = '\v';
            break;
        case 'a':
            o[on++] = '\a';
            break;
        case '0':
            o[on++] = '\0';
            break;
        case '\\':
            o[on++] = '\\';
            break;
        case '\'':
            o[on++] = '\'';
            break;
        case '"':
            o[on++] = '"';
            break;
        case '\n':
            break;
        case 'x':
            hn = 2;
            break;
        case 'u':
            hn = 4;
            break;
        case 'U':
            hn = 8;
            break;
        default:
            o[on++] = '\\';
            o[on++] = e;
        }
        if (hn) {
            if (l->pos + (size_t)hn > l->n || hexval(l->s + l->pos, hn, &cp) != 0 || cp > 0x10FFFF)
                return fail(l, l->pos - 2, "bad \\x/\\u escape in string literal");
            l->pos += (size_t)hn;
            on += (size_t)put_utf8(o + on, cp);
        }
    }
    tm_token *t = push(l, TK_STRING, start);
    if (t == NULL)
        return kvr_err_set(l->err, KVR_ENOMEM, "template: out of memory");
    t->str = o;
    t->len = on;
    return 0;
}

static const char *const OPS2[] = {"//", "**", "==", "!=", "<=", ">="};
static const char OPS1[] = "+-/*%~<>=()[]{},.:|";

/* Tokens inside {% %} or {{ }} up to and including the end marker. */
static int lex_tag(lx *l, bool block)
{
    const char end0 = block ? '%' : '}';
    for (;;) {
        while (l->pos < l->n && is_ws(l->s[l->pos]))
            l->pos++;
        if (l->pos >= l->n)
            return fail(l, l->pos, block ? "missing %}" : "missing }}");
        const char *p = l->s + l->pos;
        size_t left = l->n - l->pos;
        /* end markers: -%} +%} %} (jinja2 tries them before operators) */
        size_t m = 0;
        char sign = 0;
        if (left >= 3 && (p[0] == '-' || p[0] == '+') && p[1] == end0 && p[2] == '}') {
            sign = p[0];
            m = 3;
        } else if (left >= 2 && p[0] == end0 && p[1] == '}') {
            m = 2;
        }
        if (m) {
            if (push(l, block ? TK_BLOCK_END : TK_VAR_END, l->pos) == NULL)
                return kvr_err_set(l->err, KVR_ENOMEM, "template: out of memory");
            l->pos += m;
            if (sign == '-') {
                while (l->pos < l->n && is_ws(l->s[l->pos]))
                    l->pos++;
            } else if (block && sign != '+' && l->pos < l->n && l->s[l->pos] == '\n') {
                l->pos++; /* trim_blocks */
            }
            return 0;
        }
        char c = p[0];
        if (c == '\'' || c == '"') {
            int rv = lex_string(l);
            if (rv)
                return rv;
            continue;
        }
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') {
            size_t k = 1;
            while (k < left && ((p[k] >= 'a' && p[k] <= 'z') || (p[k] >= 'A' && p[k] <= 'Z') ||
                                (p[k] >= '0' && p[k] <= '9') || p[k] == '_'))
                k++;
            tm_token *t = push(l, TK_NAME, l->pos);
            if (t == NULL)
                return kvr_err_set(l->err, KVR_ENOMEM, "template: out of memory");
            t->str = p;
            t->len = k;
            l->pos += k;
            continue;
        }
        if (c >= '0' && c <= '9') {
            char num[64];
            size_t k = 0, nn = 0;
            bool is_float = false;
            while (k < left && nn < sizeof num - 1) {
                char d = p[k];
                if ((d >= '0' && d <= '9') || d == '_') {
                    if (d != '_')
                        num[nn++] = d;
                } else if (d == '.' && !is_float && k + 1 < left && p[k + 1] >= '0' &&
                           p[k + 1] <= '9') {
                    is_float = true;
                    num[nn++] = d;
                } else if ((d == 'e' || d == 'E') && k + 1 < left &&
                           ((p[k + 1] >= '0' && p[k + 1] <= '9') || p[k + 1] == '-' ||
                            p[k + 1] == '+')) {
                    is_float = true;
                    num[nn++] = d;
                    num[nn++] = p[++k];
                } else {
                    break;
                }
                k++;
            }
            num[nn] = 0;
            tm_token *t = push(l, is_float ? TK_FLOAT : TK_INT, l->pos);
            if (t == NULL)
                return kvr_err_set(l->err, KVR_ENOMEM, "template: out of memory");
            if (is_float) {
                t->fval = strtod(num, NULL);
            } else {
                char *endp;
                unsigned long long u = strtoull(num, &endp, 10);
                if (nn > 18 && u > (unsigned long long)INT64_MAX)
                    return fail(l, l->pos, "integer literal too large");
                t->ival = (int64_t)u;
            }
            l->pos += k;
            continue;
        }
        size_t oplen = 0;
        for (size_t i = 0; i < sizeof OPS2 / sizeof OPS2[0]; i++)
            if (left >= 2 && p[0] == OPS2[i][0] && p[1] == OPS2[i][1])
                oplen = 2;
        if (oplen == 0 && strchr(OPS1, c) != NULL && c != 0)
            oplen = 1;
        if (oplen == 0 && c == '!')
            return fail(l, l->pos, "unexpected '!'");
        if (oplen == 0) {
            char msg[64];
            snprintf(msg, sizeof msg, "unexpected character '%c' (0x%02x) in tag",
                     (c >= 0x20 && c < 0x7f) ? c : '?', (unsigned char)c);
            return fail(l, l->pos, msg);
        }
        tm_token *t = push(l, TK_OP, l->pos);
        if (t == NULL)
            return kvr_err_set(l->err, KVR_ENOMEM, "template: out of memory");
        memcpy(t->op, p, oplen);
        t->str = t->op;
        t->len = oplen;
        l->pos += oplen;
    }
}

int tm_lex(const char *src, size_t len, tm_arena *a, tm_token **out, size_t *n, kvr_err *err)
{
    /* newline normalization (\r\n, \r → \n) and keep_trailing_newline=False */
    char *s = tm_alloc(a, len + 1);
    if (s == NULL)
        return kvr_err_set(err, KVR_ENOMEM, "template: out of memory");
    size_t sn = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            s[sn++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n')
                i++;
        } else {
            s[sn++] = src[i];
        }
    }
    if (sn && s[sn - 1] == '\n')
        sn--;
    lx l = {.s = s, .n = sn, .a = a, .line = 1, .col = 1, .err = err};
    bool line_starting = true;
    while (l.pos < l.n) {
        size_t k = l.pos;
        const char *hit = NULL;
        while (k + 1 < l.n) {
            hit = memchr(l.s + k, '{', l.n - k - 1);
            if (hit == NULL)
                break;
            char nx = hit[1];
            if (nx == '{' || nx == '%' || nx == '#')
                break;
            k = (size_t)(hit - l.s) + 1;
            hit = NULL;
        }
        size_t tag = hit ? (size_t)(hit - l.s) : l.n;
        size_t tlen = tag - l.pos;
        char kind = hit ? hit[1] : 0;
        char sign = (hit && tag + 2 < l.n) ? l.s[tag + 2] : 0;
        if (sign != '-' && sign != '+')
            sign = 0;
        if (hit) {
            if (sign == '-') {
                while (tlen && is_ws(l.s[l.pos + tlen - 1]))
                    tlen--;
            } else if (sign != '+' && kind != '{') {
                size_t lp = tlen;
                while (lp && l.s[l.pos + lp - 1] != '\n')
                    lp--;
                bool all_ws = lp < tlen;
                for (size_t i = lp; i < tlen; i++)
                    if (!is_ws(l.s[l.pos + i]))
                        all_ws = false;
                if ((lp > 0 || line_starting) && all_ws)
                    tlen = lp;
            }
        }
        if (tlen) {
            tm_token *t = push(&l, TK_TEXT, l.pos);
            if (t == NULL)
                return kvr_err_set(err, KVR_ENOMEM, "template: out of memory");
            t->str = l.s + l.pos;
            t->len = tlen;
        }
        if (!hit)
            break;
        l.pos = tag + 2 + (sign ? 1 : 0);
        if (kind == '#') {
            size_t e = l.pos;
            while (e + 1 < l.n && !(l.s[e] == '#' && l.s[e + 1] == '}'))
                e++;
            if (e + 1 >= l.n)
                return fail(&l, tag, "unterminated comment");
            char esign = e > l.pos ? l.s[e - 1] : 0;
            l.pos = e + 2;
            if (esign == '-') {
                while (l.pos < l.n && is_ws(l.s[l.pos]))
                    l.pos++;
            } else if (esign != '+' && l.pos < l.n && l.s[l.pos] == '\n') {
                l.pos++;
            }
        } else {
            if (push(&l, kind == '%' ? TK_BLOCK_BEGIN : TK_VAR_BEGIN, tag) == NULL)
                return kvr_err_set(err, KVR_ENOMEM, "template: out of memory");
            int rv = lex_tag(&l, kind == '%');
            if (rv)
                return rv;
        }
        line_starting = l.pos > 0 && l.s[l.pos - 1] == '\n';
    }
    if (push(&l, TK_EOF, l.n) == NULL)
        return kvr_err_set(err, KVR_ENOMEM, "template: out of memory");
    *out = l.v;
    *n = l.nv;
    return 0;
}
