/* Decoding (the library's decoders applied to the tokens of the ids), the streaming decoder,
 * the post-processor template, and the kvr_tok vtable over a model directory. */
#include "tk_internal.h"

#include <stdlib.h>

typedef struct toks {
    kvr_buf text;
    tk_str *v;
    size_t n, cap;
} toks;

static int toks_push(toks *t, const char *s, size_t n)
{
    if (t->n == t->cap) {
        size_t c = t->cap ? t->cap * 2 : 32;
        tk_str *v = realloc(t->v, c * sizeof(tk_str));
        if (!v)
            return KVR_ENOMEM;
        t->v = v;
        t->cap = c;
    }
    uint32_t off = (uint32_t)t->text.len;
    if (kvr_buf_append(&t->text, s, n))
        return KVR_ENOMEM;
    t->v[t->n++] = (tk_str){off, (uint32_t)n};
    return 0;
}

static void toks_free(toks *t)
{
    kvr_buf_free(&t->text);
    free(t->v);
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

/* One decoder step: from a into b (b empty). */
static int dec_step(const tk_step *st, const toks *a, toks *b)
{
    int rc = 0;
    const char *base = a->text.base ? a->text.base : ""; /* empty: never offset NULL */
    switch (st->kind) {
    case TK_D_BYTELEVEL: {
        kvr_buf raw;
        kvr_buf_init(&raw);
        for (size_t i = 0; i < a->n && !rc; i++) {
            const char *s = base + a->v[i].off;
            size_t n = a->v[i].len, mark = raw.len, k = 0;
            while (k < n) {
                size_t l;
                int by = tk_bl_byte(tk_utf8_decode(s + k, n - k, &l));
                if (by < 0)
                    break;
                unsigned char c = (unsigned char)by;
                if ((rc = kvr_buf_append(&raw, &c, 1)) != 0)
                    break;
                k += l;
            }
            if (!rc && k < n) { /* a character outside the alphabet: the token's own bytes */
                raw.len = mark;
                rc = kvr_buf_append(&raw, s, n);
            }
        }
        if (!rc) {
            int nomem = 0;
            kvr_buf out;
            kvr_buf_init(&out);
            tk_utf8_lossy(&out, raw.base, raw.len, &nomem);
            rc = nomem ? KVR_ENOMEM : toks_push(b, out.base, out.len);
            kvr_buf_free(&out);
        }
        kvr_buf_free(&raw);
        return rc;
    }
    case TK_D_BYTEFALLBACK: {
        kvr_buf pend;
        kvr_buf_init(&pend);
        for (size_t i = 0; i <= a->n && !rc; i++) {
            const char *s = i < a->n ? base + a->v[i].off : NULL;
            size_t n = i < a->n ? a->v[i].len : 0;
            if (s && n == 6 && memcmp(s, "<0x", 3) == 0 && s[5] == '>' && hexval(s[3]) >= 0 &&
                hexval(s[4]) >= 0) {
                unsigned char c = (unsigned char)(hexval(s[3]) << 4 | hexval(s[4]));
                rc = kvr_buf_append(&pend, &c, 1);
                continue;
            }
            if (pend.len) {
                if (tk_utf8_valid(pend.base, pend.len))
                    rc = toks_push(b, pend.base, pend.len);
                else
                    for (size_t k = 0; k < pend.len && !rc; k++)
                        rc = toks_push(b, "\xEF\xBF\xBD", 3);
                pend.len = 0;
            }
            if (s && !rc)
                rc = toks_push(b, s, n);
        }
        kvr_buf_free(&pend);
        return rc;
    }
    case TK_D_FUSE: {
        kvr_buf all;
        kvr_buf_init(&all);
        for (size_t i = 0; i < a->n && !rc; i++)
            rc = kvr_buf_append(&all, base + a->v[i].off, a->v[i].len);
        if (!rc)
            rc = toks_push(b, all.base ? all.base : "", all.len);
        kvr_buf_free(&all);
        return rc;
    }
    case TK_D_STRIP: {
        const char *c = st->content;
        size_t cl = st->content_len;
        for (size_t i = 0; i < a->n && !rc; i++) {
            const char *s = base + a->v[i].off;
            size_t n = a->v[i].len;
            for (int k = 0; k < st->strip_start && n >= cl && cl && memcmp(s, c, cl) == 0; k++) {
                s += cl;
                n -= cl;
            }
            for (int k = 0; k < st->strip_stop && n >= cl && cl && memcmp(s + n - cl, c, cl) == 0;
                 k++)
                n -= cl;
            rc = toks_push(b, s, n);
        }
        return rc;
    }
    case TK_D_REPLACE:
    case TK_D_METASPACE: {
        tk_pattern lit = {0};
        const tk_pattern *p = &st->pat;
        const char *rep = st->content;
        size_t rl = st->content_len;
        if (st->kind == TK_D_METASPACE) {
            lit.lit = st->content;
            lit.lit_len = st->content_len;
            p = &lit;
            rep = " ";
            rl = 1;
        }
        for (size_t i = 0; i < a->n && !rc; i++) {
            const char *s = base + a->v[i].off;
            size_t n = a->v[i].len;
            kvr_buf o;
            kvr_buf_init(&o);
            rc = tk_replace_all(p, s, n, rep, rl, &o);
            if (!rc) {
                const char *os = o.base ? o.base : "";
                size_t on = o.len;
                if (st->kind == TK_D_METASPACE && i == 0 &&
                    st->prepend_scheme != TK_PREPEND_NEVER && on && os[0] == ' ') {
                    os++;
                    on--;
                }
                rc = toks_push(b, os, on);
            }
            kvr_buf_free(&o);
        }
        return rc;
    }
    }
    return KVR_EUNSUPPORTED;
}

static const char *tok_string(const kvr_hftok *t, uint32_t id, size_t *n, int *special)
{
    *special = 0;
    if (id < t->id_cap && t->added_by_id[id] >= 0) {
        const tk_added *ad = &t->added[t->added_by_id[id]];
        *n = ad->content.len;
        *special = ad->special;
        return t->added_arena.base + ad->content.off;
    }
    if (id < t->vocab_n && t->vocab[id].off != UINT32_MAX) {
        *n = t->vocab[id].len;
        return t->arena.base + t->vocab[id].off;
    }
    return NULL;
}

int kvr_hftok_decode(const kvr_hftok *t, const uint32_t *ids, size_t n, int skip_special,
                     kvr_buf *out, kvr_err *err)
{
    toks a = {0}, b = {0};
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        size_t l;
        int sp;
        const char *s = tok_string(t, ids[i], &l, &sp);
        if (!s || (skip_special && sp))
            continue;
        rc = toks_push(&a, s, l);
    }
    for (size_t i = 0; i < t->dec_n && !rc; i++) {
        b.n = 0;
        b.text.len = 0;
        rc = dec_step(&t->dec[i], &a, &b);
        toks tmp = a;
        a = b;
        b = tmp;
    }
    for (size_t i = 0; i < a.n && !rc; i++) {
        if (!t->has_decoder && i > 0)
            rc = kvr_buf_append(out, " ", 1);
        if (!rc)
            rc = kvr_buf_append(out, a.text.base ? a.text.base + a.v[i].off : "", a.v[i].len);
    }
    toks_free(&a);
    toks_free(&b);
    return rc ? kvr_err_set(err, rc, "tokenizer: decode: out of memory") : 0;
}

int kvr_hftok_encode(const kvr_hftok *t, kvr_slice text, int add_special, kvr_buf *out,
                     kvr_err *err)
{
    if (text.len > TK_MAX_TEXT)
        return kvr_err_set(err, KVR_ELIMIT, "tokenizer: text of %zu bytes is over %u", text.len,
                           TK_MAX_TEXT);
    if (!tk_utf8_valid(text.base, text.len))
        return kvr_err_set(err, KVR_EINVAL, "tokenizer: text is not valid UTF-8");
    size_t mark = out->len;
    int rc = 0;
    if (add_special && t->tpl_pre_n)
        rc = kvr_buf_append(out, t->tpl_pre, t->tpl_pre_n * sizeof(uint32_t));
    if (!rc && (rc = tk_encode_text(t, text.base, text.len, out, err)) != 0) {
        out->len = mark;
        return rc;
    }
    if (!rc && add_special && t->tpl_post_n)
        rc = kvr_buf_append(out, t->tpl_post, t->tpl_post_n * sizeof(uint32_t));
    if (rc) {
        out->len = mark;
        return kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
    }
    return 0;
}

int kvr_hftok_is_special(const kvr_hftok *t, uint32_t id)
{
    return id < t->id_cap && t->added_by_id[id] >= 0 && t->added[t->added_by_id[id]].special;
}

size_t kvr_hftok_vocab_size(const kvr_hftok *t)
{
    return t->id_cap;
}

int64_t kvr_hftok_max_len(const kvr_hftok *t)
{
    return t->max_len;
}

void kvr_hftok_set_fast(kvr_hftok *t, int fast)
{
    t->slow = !fast;
}

void kvr_hftok_stream_init(kvr_hftok_stream *s, const kvr_hftok *t, int skip_special)
{
    memset(s, 0, sizeof(*s));
    s->t = t;
    s->skip_special = skip_special;
}

void kvr_hftok_stream_free(kvr_hftok_stream *s)
{
    kvr_buf_free(&s->ids);
    kvr_buf_free(&s->prefix);
}

/* The library's DecodeStream::step: decode the ids kept since the last emitted prefix; emit
 * the new suffix once it grows and does not end in U+FFFD (a cut UTF-8 character). */
int kvr_hftok_stream_step(kvr_hftok_stream *s, uint32_t id, kvr_buf *out, kvr_err *err)
{
    kvr_buf str;
    kvr_buf_init(&str);
    int rc;
    if (kvr_buf_append(&s->ids, &id, sizeof(id)))
        return kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
    size_t n = s->ids.len / sizeof(uint32_t);
    const uint32_t *v = (const uint32_t *)(const void *)s->ids.base;
    if ((rc = kvr_hftok_decode(s->t, v, n, s->skip_special, &str, err)) != 0)
        goto done;
    if (str.len > s->prefix.len &&
        !(str.len >= 3 && memcmp(str.base + str.len - 3, "\xEF\xBF\xBD", 3) == 0)) {
        if (s->prefix.len && memcmp(str.base, s->prefix.base, s->prefix.len) != 0) {
            rc = kvr_err_set(err, KVR_EINVAL, "tokenizer: stream decode: invalid prefix");
            goto done;
        }
        if (kvr_buf_append(out, str.base + s->prefix.len, str.len - s->prefix.len)) {
            rc = kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
            goto done;
        }
        size_t new_prefix_index = n - s->prefix_index;
        kvr_buf_consume(&s->ids, s->prefix_index * sizeof(uint32_t));
        s->prefix.len = 0;
        n = s->ids.len / sizeof(uint32_t);
        v = (const uint32_t *)(const void *)s->ids.base;
        if ((rc = kvr_hftok_decode(s->t, v, n, s->skip_special, &s->prefix, err)) != 0)
            goto done;
        s->prefix_index = new_prefix_index;
    }
done:
    kvr_buf_free(&str);
    return rc;
}

/* kvr_tok vtable */
static int vt_encode(const kvr_tokenizer *tk, kvr_slice text, kvr_buf *out, kvr_err *err)
{
    return kvr_hftok_encode(tk->data, text, 0, out, err);
}
static int vt_decode(const kvr_tokenizer *tk, const uint32_t *ids, size_t n, kvr_buf *out,
                     kvr_err *err)
{
    return kvr_hftok_decode(tk->data, ids, n, 0, out, err);
}
static int vt_chat(const kvr_tokenizer *tk, const kvr_chat_msg *msgs, size_t n, int add_gen,
                   kvr_buf *out, kvr_err *err)
{
    (void)tk;
    /* Seam for the chat-template interpreter (template/): until it is wired, ChatML. */
    return kvr_tok_chatml(msgs, n, add_gen, out, err);
}
static const char *vt_name(const kvr_tokenizer *tk)
{
    return ((const kvr_hftok *)tk->data)->name;
}
static void vt_destroy(kvr_tokenizer *tk)
{
    kvr_hftok_free(tk->data);
    free(tk);
}
static const kvr_tok_vtable hf_vt = {vt_encode, vt_decode, vt_chat, vt_name, vt_destroy};

int kvr_tok_open_dir(const char *dir, kvr_tokenizer **out, kvr_err *err)
{
    kvr_hftok *h;
    int rc = kvr_hftok_load(dir, &h, err);
    if (rc)
        return rc;
    kvr_tokenizer *tk = calloc(1, sizeof(*tk));
    if (!tk) {
        kvr_hftok_free(h);
        return kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
    }
    tk->vt = &hf_vt;
    tk->data = h;
    *out = tk;
    return 0;
}

const kvr_hftok *kvr_tok_hf(const kvr_tokenizer *t)
{
    return t && t->vt == &hf_vt ? t->data : NULL;
}
