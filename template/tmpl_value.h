/* Values of the template language (Python objects as jinja2 sees them). */
#ifndef KVR_TMPL_VALUE_H
#define KVR_TMPL_VALUE_H

#include "kvr_buf.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum {
    JV_UNDEF,
    JV_NONE,
    JV_BOOL,
    JV_INT,
    JV_FLOAT,
    JV_STR,
    JV_LIST, /* flag 1: tuple */
    JV_DICT, /* flag 1: namespace() object */
    JV_LOOP,
    JV_FUNC,   /* builtin global; fn = id */
    JV_METHOD, /* bound method; fn = id, self */
    JV_MACRO,
};

struct tm_node;
typedef struct jlist jlist;
typedef struct jdict jdict;
typedef struct jloop jloop;

typedef struct jv {
    uint8_t t;
    uint8_t flag;
    uint16_t fn;
    union {
        int64_t i;
        double f;
        struct {
            const char *p;
            size_t n;
        } s;
        jlist *l;
        jdict *d;
        jloop *lp;
        struct jv *self;
        const struct tm_node *macro;
        const char *name; /* JV_UNDEF: the missing name, for error messages (may be NULL) */
    };
} jv;

struct jlist {
    jv *v;
    size_t n, cap;
};
typedef struct jentry {
    const char *k;
    size_t kn;
    jv v;
} jentry;
struct jdict {
    jentry *e;
    size_t n, cap;
};
struct jloop {
    jlist *items;
    size_t i;
    int depth;
};

static inline jv jv_none(void)
{
    jv v = {.t = JV_NONE};
    return v;
}
static inline jv jv_undef(void)
{
    jv v = {.t = JV_UNDEF};
    return v;
}
static inline jv jv_bool(bool b)
{
    jv v = {.t = JV_BOOL, .i = b};
    return v;
}
static inline jv jv_int(int64_t i)
{
    jv v = {.t = JV_INT, .i = i};
    return v;
}
static inline jv jv_float(double f)
{
    jv v = {.t = JV_FLOAT, .f = f};
    return v;
}
static inline jv jv_str(const char *p, size_t n)
{
    jv v = {.t = JV_STR};
    v.s.p = p;
    v.s.n = n;
    return v;
}

struct tm_arena;
jlist *jl_new(struct tm_arena *a, size_t cap);
int jl_push(struct tm_arena *a, jlist *l, jv v);
jdict *jd_new(struct tm_arena *a, size_t cap);
int jd_set(struct tm_arena *a, jdict *d, const char *k, size_t kn, jv v);
jv *jd_get(const jdict *d, const char *k, size_t kn);

bool jv_truthy(jv v);
bool jv_equal(jv a, jv b);
/* Python str() of v appended to out (repr for containers). 0 or KVR_ENOMEM. */
int jv_str_append(kvr_buf *out, jv v);
int jv_repr_append(kvr_buf *out, jv v);
/* Python json.dumps(v, ensure_ascii=False, indent, separators, sort_keys). indent < 0: none.
 * KVR_ETYPE for a value JSON cannot hold. */
int jv_json_append(kvr_buf *out, jv v, int indent, const char *item_sep, const char *key_sep,
                   bool sort_keys, int depth);
void jv_float_repr(double f, char *buf, size_t cap);
const char *jv_type_name(jv v);
/* UTF-8 code point count */
size_t tm_u8len(const char *p, size_t n);
/* byte offset of code point index ci (ci <= length) */
size_t tm_u8off(const char *p, size_t n, size_t ci);

#endif
