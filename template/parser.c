/* Parser: tokens → AST (jinja2's grammar and operator precedence). Statements the interpreter
 * does not implement are refused here, by name. */
#include "tmpl_int.h"

#include <stdio.h>
#include <string.h>

#define MAX_NEST 200

typedef struct ps {
    kvr_tmpl *t;
    tm_token *tk;
    size_t n, i;
    int depth;
    kvr_err *err;
} ps;

static tm_token *cur(ps *p)
{
    return &p->tk[p->i];
}

static int fail_at(ps *p, tm_token *t, const char *fmt, const char *arg)
{
    char msg[256];
    snprintf(msg, sizeof msg, fmt, arg);
    return kvr_err_set(p->err, KVR_EINVAL, "template line %d col %d: %s", t->line, t->col, msg);
}

static bool is_name(tm_token *t, const char *s)
{
    return t->type == TK_NAME && t->len == strlen(s) && memcmp(t->str, s, t->len) == 0;
}

static bool is_op(tm_token *t, const char *s)
{
    return t->type == TK_OP && strcmp(t->op, s) == 0;
}

static tm_node *mk(ps *p, int kind, tm_token *t)
{
    tm_node *n = tm_alloc(&p->t->arena, sizeof(*n));
    if (n) {
        n->kind = kind;
        n->line = t->line;
        n->col = t->col;
    }
    return n;
}

static int nl_push(ps *p, tm_nodelist *l, tm_node *n)
{
    if ((l->n & (l->n - 1)) == 0) { /* grow at powers of two */
        size_t cap = l->n ? l->n * 2 : 1;
        tm_node **v = tm_alloc(&p->t->arena, cap * sizeof(*v));
        if (v == NULL)
            return kvr_err_set(p->err, KVR_ENOMEM, "template: out of memory");
        if (l->n)
            memcpy(v, l->v, l->n * sizeof(*v));
        l->v = v;
    }
    l->v[l->n++] = n;
    return 0;
}

static int expect_op(ps *p, const char *op)
{
    if (!is_op(cur(p), op))
        return fail_at(p, cur(p), "expected '%s'", op);
    p->i++;
    return 0;
}

#define OOM() kvr_err_set(p->err, KVR_ENOMEM, "template: out of memory")
#define TRY(x)                                                                                     \
    do {                                                                                           \
        int rv_ = (x);                                                                             \
        if (rv_)                                                                                   \
            return rv_;                                                                            \
    } while (0)

static int p_expr(ps *p, tm_node **out, bool with_cond);
static int p_or(ps *p, tm_node **out);
static int p_unary(ps *p, tm_node **out, bool with_filter);

static const char *dup_name(ps *p, tm_token *t)
{
    char *s = tm_alloc(&p->t->arena, t->len + 1);
    if (s)
        memcpy(s, t->str, t->len);
    return s;
}

/* (args, k=v) after the '(' */
static int p_args(ps *p, tm_node *call)
{
    while (!is_op(cur(p), ")")) {
        if (call->args.n + call->kwargs.n)
            TRY(expect_op(p, ","));
        if (is_op(cur(p), ")"))
            break;
        tm_token *t = cur(p);
        if (t->type == TK_NAME && is_op(&p->tk[p->i + 1], "=")) {
            p->i += 2;
            tm_node *v;
            TRY(p_expr(p, &v, true));
            size_t k = call->kwargs.n;
            TRY(nl_push(p, &call->kwargs, v));
            if ((k & (k - 1)) == 0) {
                const char **nk = tm_alloc(&p->t->arena, (k ? k * 2 : 1) * sizeof(char *));
                if (nk == NULL)
                    return OOM();
                if (k)
                    memcpy(nk, call->kwnames, k * sizeof(char *));
                call->kwnames = nk;
            }
            call->kwnames[k] = dup_name(p, t);
            continue;
        }
        if (call->kwargs.n)
            return fail_at(p, t, "%s", "positional argument after keyword argument");
        tm_node *a;
        TRY(p_expr(p, &a, true));
        TRY(nl_push(p, &call->args, a));
    }
    p->i++;
    return 0;
}

static int p_primary(ps *p, tm_node **out)
{
    tm_token *t = cur(p);
    tm_node *n = NULL;
    if (++p->depth > MAX_NEST)
        return fail_at(p, t, "%s", "expression nested too deeply");
    if (t->type == TK_NAME) {
        p->i++;
        n = mk(p, N_CONST, t);
        if (n == NULL)
            return OOM();
        if (is_name(t, "true") || is_name(t, "True"))
            n->cv = jv_bool(true);
        else if (is_name(t, "false") || is_name(t, "False"))
            n->cv = jv_bool(false);
        else if (is_name(t, "none") || is_name(t, "None"))
            n->cv = jv_none();
        else {
            n->kind = N_NAME;
            n->name = t->str;
            n->name_len = t->len;
        }
    } else if (t->type == TK_STRING) {
        /* adjacent literals concatenate */
        size_t total = 0, j = p->i;
        while (p->tk[j].type == TK_STRING)
            total += p->tk[j++].len;
        char *s = tm_alloc(&p->t->arena, total + 1);
        if (s == NULL)
            return OOM();
        size_t off = 0;
        for (; p->i < j; p->i++) {
            memcpy(s + off, p->tk[p->i].str, p->tk[p->i].len);
            off += p->tk[p->i].len;
        }
        n = mk(p, N_CONST, t);
        if (n == NULL)
            return OOM();
        n->cv = jv_str(s, total);
    } else if (t->type == TK_INT || t->type == TK_FLOAT) {
        p->i++;
        n = mk(p, N_CONST, t);
        if (n == NULL)
            return OOM();
        n->cv = t->type == TK_INT ? jv_int(t->ival) : jv_float(t->fval);
    } else if (is_op(t, "(")) {
        p->i++;
        if (is_op(cur(p), ")")) {
            p->i++;
            n = mk(p, N_TUPLE, t);
            if (n == NULL)
                return OOM();
        } else {
            TRY(p_expr(p, &n, true));
            if (is_op(cur(p), ",")) {
                tm_node *tup = mk(p, N_TUPLE, t);
                if (tup == NULL)
                    return OOM();
                TRY(nl_push(p, &tup->args, n));
                while (is_op(cur(p), ",")) {
                    p->i++;
                    if (is_op(cur(p), ")"))
                        break;
                    tm_node *e;
                    TRY(p_expr(p, &e, true));
                    TRY(nl_push(p, &tup->args, e));
                }
                n = tup;
            }
            TRY(expect_op(p, ")"));
        }
    } else if (is_op(t, "[")) {
        p->i++;
        n = mk(p, N_LIST, t);
        if (n == NULL)
            return OOM();
        while (!is_op(cur(p), "]")) {
            if (n->args.n)
                TRY(expect_op(p, ","));
            if (is_op(cur(p), "]"))
                break;
            tm_node *e;
            TRY(p_expr(p, &e, true));
            TRY(nl_push(p, &n->args, e));
        }
        p->i++;
    } else if (is_op(t, "{")) {
        p->i++;
        n = mk(p, N_DICT, t);
        if (n == NULL)
            return OOM();
        while (!is_op(cur(p), "}")) {
            if (n->args.n)
                TRY(expect_op(p, ","));
            if (is_op(cur(p), "}"))
                break;
            tm_node *k, *v;
            TRY(p_expr(p, &k, true));
            TRY(expect_op(p, ":"));
            TRY(p_expr(p, &v, true));
            TRY(nl_push(p, &n->args, k));
            TRY(nl_push(p, &n->args, v));
        }
        p->i++;
    } else {
        return fail_at(p, t, "%s",
                       t->type == TK_EOF ? "unexpected end of template"
                                         : "unexpected token in expression");
    }
    p->depth--;
    *out = n;
    return 0;
}

static int p_subscript(ps *p, tm_node *obj, tm_node **out)
{
    tm_token *t = cur(p);
    p->i++; /* [ */
    tm_node *parts[3] = {NULL, NULL, NULL};
    int np = 0;
    bool is_slice = false;
    for (;;) {
        if (is_op(cur(p), ":")) {
            is_slice = true;
            if (++np > 2)
                return fail_at(p, cur(p), "%s", "bad slice");
            p->i++;
            continue;
        }
        if (is_op(cur(p), "]"))
            break;
        if (parts[np])
            return fail_at(p, cur(p), "%s", "expected ']'");
        TRY(p_expr(p, &parts[np], true));
    }
    p->i++;
    tm_node *n = mk(p, is_slice ? N_SLICE : N_ITEM, t);
    if (n == NULL)
        return OOM();
    n->a = obj;
    n->b = parts[0];
    n->c = parts[1];
    n->d = parts[2];
    if (!is_slice && parts[0] == NULL)
        return fail_at(p, t, "%s", "empty subscript");
    *out = n;
    return 0;
}

static int p_postfix(ps *p, tm_node **io)
{
    for (;;) {
        tm_token *t = cur(p);
        if (is_op(t, ".")) {
            p->i++;
            tm_token *nt = cur(p);
            if (nt->type == TK_INT) { /* a.0 is a[0] */
                tm_node *n = mk(p, N_ITEM, t), *c = mk(p, N_CONST, nt);
                if (n == NULL || c == NULL)
                    return OOM();
                c->cv = jv_int(nt->ival);
                n->a = *io;
                n->b = c;
                *io = n;
                p->i++;
                continue;
            }
            if (nt->type != TK_NAME)
                return fail_at(p, nt, "%s", "expected attribute name after '.'");
            tm_node *n = mk(p, N_ATTR, t);
            if (n == NULL)
                return OOM();
            n->a = *io;
            n->name = nt->str;
            n->name_len = nt->len;
            p->i++;
            *io = n;
        } else if (is_op(t, "[")) {
            TRY(p_subscript(p, *io, io));
        } else if (is_op(t, "(")) {
            p->i++;
            tm_node *n = mk(p, N_CALL, t);
            if (n == NULL)
                return OOM();
            n->a = *io;
            TRY(p_args(p, n));
            *io = n;
        } else {
            return 0;
        }
    }
}

/* filters (|name(args)) and tests (is [not] name [arg]) bind tighter than any operator */
static int p_filter_test(ps *p, tm_node **io)
{
    for (;;) {
        tm_token *t = cur(p);
        if (is_op(t, "|")) {
            p->i++;
            tm_token *nt = cur(p);
            if (nt->type != TK_NAME)
                return fail_at(p, nt, "%s", "expected filter name after '|'");
            p->i++;
            tm_node *n = mk(p, N_FILTER, nt);
            if (n == NULL)
                return OOM();
            n->a = *io;
            n->name = nt->str;
            n->name_len = nt->len;
            if (is_op(cur(p), "(")) {
                p->i++;
                TRY(p_args(p, n));
            }
            *io = n;
        } else if (is_name(t, "is")) {
            p->i++;
            tm_node *n = mk(p, N_TEST, t);
            if (n == NULL)
                return OOM();
            if (is_name(cur(p), "not")) {
                n->negated = true;
                p->i++;
            }
            tm_token *nt = cur(p);
            if (nt->type != TK_NAME)
                return fail_at(p, nt, "%s", "expected test name after 'is'");
            p->i++;
            n->a = *io;
            n->name = nt->str;
            n->name_len = nt->len;
            tm_token *a = cur(p);
            if (is_op(a, "(")) {
                p->i++;
                TRY(p_args(p, n));
            } else if (a->type == TK_STRING || a->type == TK_INT || a->type == TK_FLOAT ||
                       is_op(a, "[") || is_op(a, "{") ||
                       (a->type == TK_NAME && !is_name(a, "else") && !is_name(a, "or") &&
                        !is_name(a, "and") && !is_name(a, "if") && !is_name(a, "in") &&
                        !is_name(a, "not") && !is_name(a, "is"))) {
                tm_node *arg;
                TRY(p_unary(p, &arg, false));
                TRY(nl_push(p, &n->args, arg));
            }
            *io = n;
        } else if (is_op(t, "(")) {
            p->i++;
            tm_node *n = mk(p, N_CALL, t);
            if (n == NULL)
                return OOM();
            n->a = *io;
            TRY(p_args(p, n));
            *io = n;
        } else {
            return 0;
        }
    }
}

static int p_unary(ps *p, tm_node **out, bool with_filter)
{
    tm_token *t = cur(p);
    tm_node *n;
    if (++p->depth > MAX_NEST)
        return fail_at(p, t, "%s", "expression nested too deeply");
    if (is_op(t, "-") || is_op(t, "+")) {
        p->i++;
        n = mk(p, is_op(t, "-") ? N_NEG : N_POS, t);
        if (n == NULL)
            return OOM();
        TRY(p_unary(p, &n->a, false));
    } else {
        TRY(p_primary(p, &n));
    }
    TRY(p_postfix(p, &n));
    if (with_filter)
        TRY(p_filter_test(p, &n));
    p->depth--;
    *out = n;
    return 0;
}

static int p_binloop(ps *p, tm_node **out, int level);

/* levels: 0 math1 (+ -), 1 concat (~), 2 math2 (* / // %), 3 pow (**) */
static const char *const LEVEL_OPS[4][4] = {
    {"+", "-", NULL}, {"~", NULL}, {"*", "/", "//", "%"}, {"**", NULL}};

static int p_binloop(ps *p, tm_node **out, int level)
{
    if (level == 4)
        return p_unary(p, out, true);
    tm_node *l;
    TRY(p_binloop(p, &l, level + 1));
    for (;;) {
        tm_token *t = cur(p);
        const char *op = NULL;
        for (int k = 0; k < 4 && LEVEL_OPS[level][k]; k++)
            if (is_op(t, LEVEL_OPS[level][k]))
                op = LEVEL_OPS[level][k];
        if (op == NULL)
            break;
        p->i++;
        tm_node *n = mk(p, N_BIN, t);
        if (n == NULL)
            return OOM();
        n->name = op;
        n->a = l;
        TRY(p_binloop(p, &n->b, level + 1));
        l = n;
    }
    *out = l;
    return 0;
}

static int p_compare(ps *p, tm_node **out)
{
    tm_node *l;
    TRY(p_binloop(p, &l, 0));
    tm_node *cmp = NULL;
    for (;;) {
        tm_token *t = cur(p);
        const char *op = NULL;
        static const char *const cops[] = {"==", "!=", "<", "<=", ">", ">="};
        for (int k = 0; k < 6; k++)
            if (is_op(t, cops[k]))
                op = cops[k];
        if (op == NULL && is_name(t, "in"))
            op = "in";
        if (op == NULL && is_name(t, "not") && is_name(&p->tk[p->i + 1], "in")) {
            op = "notin";
            p->i++;
        }
        if (op == NULL)
            break;
        p->i++;
        if (cmp == NULL) {
            cmp = mk(p, N_CMP, t);
            if (cmp == NULL)
                return OOM();
            cmp->a = l;
        }
        tm_node *r;
        TRY(p_binloop(p, &r, 0));
        size_t k = cmp->args.n;
        TRY(nl_push(p, &cmp->args, r));
        if ((k & (k - 1)) == 0) {
            const char **no = tm_alloc(&p->t->arena, (k ? k * 2 : 1) * sizeof(char *));
            if (no == NULL)
                return OOM();
            if (k)
                memcpy(no, cmp->ops, k * sizeof(char *));
            cmp->ops = no;
        }
        cmp->ops[k] = op;
    }
    *out = cmp ? cmp : l;
    return 0;
}

static int p_not(ps *p, tm_node **out)
{
    tm_token *t = cur(p);
    if (is_name(t, "not")) {
        p->i++;
        tm_node *n = mk(p, N_NOT, t);
        if (n == NULL)
            return OOM();
        if (++p->depth > MAX_NEST)
            return fail_at(p, t, "%s", "expression nested too deeply");
        TRY(p_not(p, &n->a));
        p->depth--;
        *out = n;
        return 0;
    }
    return p_compare(p, out);
}

static int p_and(ps *p, tm_node **out)
{
    tm_node *l;
    TRY(p_not(p, &l));
    while (is_name(cur(p), "and")) {
        tm_node *n = mk(p, N_AND, cur(p));
        if (n == NULL)
            return OOM();
        p->i++;
        n->a = l;
        TRY(p_not(p, &n->b));
        l = n;
    }
    *out = l;
    return 0;
}

static int p_or(ps *p, tm_node **out)
{
    tm_node *l;
    TRY(p_and(p, &l));
    while (is_name(cur(p), "or")) {
        tm_node *n = mk(p, N_OR, cur(p));
        if (n == NULL)
            return OOM();
        p->i++;
        n->a = l;
        TRY(p_and(p, &n->b));
        l = n;
    }
    *out = l;
    return 0;
}

static int p_expr(ps *p, tm_node **out, bool with_cond)
{
    tm_node *l;
    if (++p->depth > MAX_NEST)
        return fail_at(p, cur(p), "%s", "expression nested too deeply");
    TRY(p_or(p, &l));
    while (with_cond && is_name(cur(p), "if")) {
        tm_node *n = mk(p, N_COND, cur(p));
        if (n == NULL)
            return OOM();
        p->i++;
        n->a = l;
        TRY(p_or(p, &n->b));
        if (is_name(cur(p), "else")) {
            p->i++;
            TRY(p_expr(p, &n->c, true));
        }
        l = n;
    }
    p->depth--;
    *out = l;
    return 0;
}

#include "parser_stmt.inc"
