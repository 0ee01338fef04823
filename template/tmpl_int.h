/* Internals of kvr_tmpl shared by lexer.c, parser.c, value.c, eval.c, filters.c. */
#ifndef KVR_TMPL_INT_H
#define KVR_TMPL_INT_H

#include "kvr_tmpl.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- arena: bump allocator, freed as a whole; bounded by `limit` bytes ---- */
typedef struct tm_chunk tm_chunk;
typedef struct tm_arena {
    tm_chunk *head;
    size_t used, limit;
} tm_arena;
void *tm_alloc(tm_arena *a, size_t n); /* zeroed; NULL when over the limit or out of memory */
void tm_arena_free(tm_arena *a);

/* ---- tokens ---- */
enum {
    TK_EOF,
    TK_TEXT,      /* template data between tags */
    TK_VAR_BEGIN, /* {{ */
    TK_VAR_END,
    TK_BLOCK_BEGIN, /* {% */
    TK_BLOCK_END,
    TK_NAME,
    TK_STRING, /* decoded into str/len */
    TK_INT,
    TK_FLOAT,
    TK_OP, /* op holds the operator text, e.g. "==" */
};

typedef struct tm_token {
    int type;
    int line, col;
    const char *str; /* text, name, decoded string (owned by the template arena) */
    size_t len;
    int64_t ival;
    double fval;
    char op[4];
} tm_token;

int tm_lex(const char *src, size_t len, tm_arena *a, tm_token **out, size_t *n, kvr_err *err);

/* ---- AST ---- */
enum {
    /* statements */
    N_TEXT,
    N_OUT,
    N_IF, /* a=cond, body, else_body */
    N_FOR,
    N_SET,
    N_SETBLOCK,
    N_MACRO,
    N_BREAK,
    N_CONTINUE,
    /* expressions */
    N_CONST, /* value in cv */
    N_NAME,
    N_ATTR,  /* a.name */
    N_ITEM,  /* a[b] */
    N_SLICE, /* a[b:c:d] (missing parts NULL) */
    N_CALL,  /* a(args; kwargs) */
    N_FILTER,
    N_TEST,
    N_BIN, /* op in op */
    N_NOT,
    N_NEG,
    N_POS,
    N_AND,
    N_OR,
    N_COND, /* a if b else c */
    N_LIST,
    N_TUPLE,
    N_DICT, /* args: k0,v0,k1,v1... */
    N_CMP,  /* chained: a op0 args[0] op1 args[1]... ops in ops[] */
};

typedef struct tm_node tm_node;
typedef struct tm_nodelist {
    tm_node **v;
    size_t n;
} tm_nodelist;

#include "tmpl_value.h"

struct tm_node {
    int kind;
    int line, col;
    const char *name; /* names, attribute, filter/test name, op */
    size_t name_len;
    tm_node *a, *b, *c, *d;
    tm_nodelist args;
    const char **kwnames; /* parallel to kwargs */
    tm_nodelist kwargs;
    tm_nodelist body, else_body;
    const char **targets; /* for/set targets */
    size_t ntargets;
    const char **ops; /* N_CMP */
    jv cv;
    bool negated; /* is not */
};

struct kvr_tmpl {
    tm_arena arena; /* tokens, nodes, literal strings */
    tm_nodelist body;
};

int tm_parse(kvr_tmpl *t, tm_token *toks, size_t n, kvr_err *err);

/* ---- evaluation ---- */
typedef struct tm_frame {
    struct tm_frame *parent;
    jdict *vars;
} tm_frame;

typedef struct tm_ev {
    tm_arena a;
    kvr_buf *out;
    size_t out_base;
    kvr_tmpl_limits lim;
    uint64_t steps;
    int depth;
    int ctl; /* 1 break, 2 continue */
    tm_frame *root;
    kvr_err *err;
} tm_ev;

/* call arguments, evaluated */
typedef struct tm_args {
    jv *pos;
    size_t npos;
    const char **kwn;
    jv *kw;
    size_t nkw;
} tm_args;

int tm_err(tm_ev *e, const tm_node *n, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
int tm_getattr(tm_ev *e, const tm_node *n, jv obj, const char *name, size_t nlen, jv *out);
int tm_getitem(tm_ev *e, const tm_node *n, jv obj, jv key, jv *out);
int tm_filter(tm_ev *e, const tm_node *n, jv in, tm_args *a, jv *out);
int tm_test(tm_ev *e, const tm_node *n, jv in, tm_args *a, bool *out);
int tm_call_method(tm_ev *e, const tm_node *n, jv m, tm_args *a, jv *out);
int tm_call_func(tm_ev *e, const tm_node *n, jv f, tm_args *a, jv *out);
/* iterable → list (strings by code point, dicts by key) */
int tm_to_list(tm_ev *e, const tm_node *n, jv v, jlist **out);
int tm_tostr(tm_ev *e, jv v, jv *out); /* str(v) as a JV_STR in the arena */
jv tm_kwarg(tm_args *a, const char *name, size_t pos, jv dflt);
bool tm_filter_known(const char *name, size_t len);
bool tm_test_known(const char *name, size_t len);

#endif
