/* The encode pipeline up to the model: added tokens split out, normalizers, pre-tokenizers.
 * Each step follows the library's NormalizedString/PreTokenizedString semantics; offsets are
 * not tracked (kvroute needs ids only). */
#define _GNU_SOURCE /* memmem */
#include "tk_internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <utf8proc.h>

typedef struct span {
    uint32_t off, len;
    int first; /* starts at offset 0 of the original text (Metaspace prepend_scheme=first) */
} span;

typedef struct spans {
    span *v;
    size_t n, cap;
} spans;

static int spans_push(spans *s, uint32_t off, uint32_t len, int first)
{
    if (s->n == s->cap) {
        size_t c = s->cap ? s->cap * 2 : 32;
        span *v = realloc(s->v, c * sizeof(span));
        if (!v)
            return KVR_ENOMEM;
        s->v = v;
        s->cap = c;
    }
    s->v[s->n++] = (span){off, len, first};
    return 0;
}

typedef struct match {
    size_t a, b;
    int is_match;
} match;

typedef struct matches {
    match *v;
    size_t n, cap;
} matches;

static int matches_push(matches *m, size_t a, size_t b, int is_match)
{
    if (m->n == m->cap) {
        size_t c = m->cap ? m->cap * 2 : 32;
        match *v = realloc(m->v, c * sizeof(match));
        if (!v)
            return KVR_ENOMEM;
        m->v = v;
        m->cap = c;
    }
    m->v[m->n++] = (match){a, b, is_match};
    return 0;
}

/* The library's Pattern::find_matches: the whole of s as gaps and matches, in order. */
static int find_matches(const tk_pattern *p, const char *s, size_t n, matches *m,
                        pcre2_match_data *md, kvr_err *err)
{
    size_t prev = 0, pos = 0;
    m->n = 0;
    while (pos <= n) {
        size_t a, b;
        if (p->lit) {
            if (!p->lit_len)
                break;
            const char *hit = pos < n ? memmem(s + pos, n - pos, p->lit, p->lit_len) : NULL;
            if (!hit)
                break;
            a = (size_t)(hit - s);
            b = a + p->lit_len;
        } else {
            int rc = pcre2_match(p->re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, md, NULL);
            if (rc == PCRE2_ERROR_NOMATCH)
                break;
            if (rc < 0) {
                PCRE2_UCHAR msg[128];
                pcre2_get_error_message(rc, msg, sizeof(msg));
                return kvr_err_set(err, KVR_EINVAL, "tokenizer: regex match failed: %s",
                                   (char *)msg);
            }
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
            a = ov[0];
            b = ov[1];
        }
        if (a != prev && matches_push(m, prev, a, 0))
            return kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
        if (matches_push(m, a, b, 1))
            return kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
        prev = b;
        if (b == a) { /* empty match: step one character */
            if (b >= n)
                break;
            pos = b + tk_utf8_len((unsigned char)s[b]);
            if (pos > n) /* never a start offset past the subject, even on broken text */
                pos = n;
        } else
            pos = b;
    }
    if (prev != n && matches_push(m, prev, n, 0))
        return kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
    return 0;
}

/* NormalizedString::split with a behavior; appends the non-empty pieces to out. */
static int split_piece(const tk_step *st, const char *base, const span *sp, spans *out, matches *m,
                       pcre2_match_data *md, kvr_err *err)
{
    int rc = find_matches(&st->pat, base + sp->off, sp->len, m, md, err);
    if (rc)
        return rc;
    if (st->invert)
        for (size_t i = 0; i < m->n; i++)
            m->v[i].is_match = !m->v[i].is_match;
    /* fold into (a, b, remove) in place */
    size_t k = 0;
    int prev_match = 0;
    switch (st->behavior) {
    case TK_ISOLATED:
        for (size_t i = 0; i < m->n; i++)
            m->v[i].is_match = 0;
        k = m->n;
        break;
    case TK_REMOVED:
        k = m->n;
        break;
    case TK_CONTIGUOUS:
        for (size_t i = 0; i < m->n; i++) {
            if (k && m->v[i].is_match == prev_match)
                m->v[k - 1].b = m->v[i].b;
            else
                m->v[k++] = (match){m->v[i].a, m->v[i].b, 0};
            prev_match = m->v[i].is_match;
        }
        break;
    case TK_MERGED_PREV:
        for (size_t i = 0; i < m->n; i++) {
            if (m->v[i].is_match && !prev_match && k)
                m->v[k - 1].b = m->v[i].b;
            else
                m->v[k++] = (match){m->v[i].a, m->v[i].b, 0};
            prev_match = m->v[i].is_match;
        }
        break;
    case TK_MERGED_NEXT: { /* the library folds from the right */
        size_t w = m->n;
        for (size_t i = m->n; i-- > 0;) {
            if (m->v[i].is_match && !prev_match && w < m->n)
                m->v[w].a = m->v[i].a;
            else
                m->v[--w] = (match){m->v[i].a, m->v[i].b, 0};
            prev_match = m->v[i].is_match;
        }
        memmove(m->v, m->v + w, (m->n - w) * sizeof(match));
        k = m->n - w;
        break;
    }
    }
    for (size_t i = 0; i < k; i++) {
        if (m->v[i].is_match || m->v[i].b == m->v[i].a)
            continue;
        if (spans_push(out, sp->off + (uint32_t)m->v[i].a, (uint32_t)(m->v[i].b - m->v[i].a),
                       sp->first && m->v[i].a == 0))
            return kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
    }
    return 0;
}

/* Replaces every match of pat in s[0..n) by rep, appending the result to out. */
static int replace_all(const tk_pattern *pat, const char *s, size_t n, const char *rep,
                       size_t rep_len, kvr_buf *out, pcre2_match_data *md, kvr_err *err)
{
    matches m = {0};
    int rc = find_matches(pat, s, n, &m, md, err);
    for (size_t i = 0; !rc && i < m.n; i++) {
        if (m.v[i].is_match)
            rc = kvr_buf_append(out, rep, rep_len);
        else
            rc = kvr_buf_append(out, s + m.v[i].a, m.v[i].b - m.v[i].a);
        if (rc)
            rc = kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
    }
    free(m.v);
    return rc;
}

int tk_replace_all(const tk_pattern *pat, const char *s, size_t n, const char *rep, size_t rep_len,
                   kvr_buf *out)
{
    kvr_err e;
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    if (!md)
        return KVR_ENOMEM;
    int rc = replace_all(pat, s, n, rep, rep_len, out, md, &e);
    pcre2_match_data_free(md);
    return rc;
}

/* Replace of a literal (Gemma's " " -> U+2581): the output is sized once and written
 * directly, not grown match by match through a list of matches. Same result as replace_all. */
static int replace_lit(const tk_step *st, const char *s, size_t n, kvr_buf *out, kvr_err *err)
{
    const char *lit = st->pat.lit;
    size_t ll = st->pat.lit_len, rl = st->content_len;
    size_t worst = rl > ll ? n / ll * rl + n % ll : n;
    if (!n)
        return 0;
    if (kvr_buf_reserve(out, worst))
        return kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
    char *d = out->base + out->len;
    for (size_t i = 0; i < n;) {
        const char *hit = ll == 1 ? memchr(s + i, lit[0], n - i) : memmem(s + i, n - i, lit, ll);
        size_t a = hit ? (size_t)(hit - s) : n;
        memcpy(d, s + i, a - i);
        d += a - i;
        if (!hit)
            break;
        if (rl)
            memcpy(d, st->content, rl);
        d += rl;
        i = a + ll;
    }
    out->len = (size_t)(d - out->base);
    return 0;
}

int tk_normalize(const kvr_hftok *t, const char *s, size_t n, kvr_buf *out, kvr_err *err)
{
    kvr_buf cur, nxt;
    kvr_buf_init(&cur);
    kvr_buf_init(&nxt);
    int rc = 0;
    pcre2_match_data *md = NULL;
    if (!t->norm_n) {
        if (kvr_buf_append(out, s, n))
            return kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
        return 0;
    }
    if (kvr_buf_append(&cur, s, n) || !(md = pcre2_match_data_create(1, NULL))) {
        rc = kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
        goto done;
    }
    for (size_t i = 0; i < t->norm_n && !rc; i++) {
        const tk_step *st = &t->norm[i];
        kvr_buf_reset(&nxt);
        switch (st->kind) {
        case TK_NFC:
            if (cur.len && !t->slow)
                rc = tk_nfc_fast(cur.base, cur.len, &nxt, err);
            else if (cur.len) {
                utf8proc_uint8_t *dst = NULL;
                utf8proc_ssize_t l =
                    utf8proc_map((const utf8proc_uint8_t *)cur.base, (utf8proc_ssize_t)cur.len,
                                 &dst, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
                if (l < 0) {
                    rc = kvr_err_set(err, KVR_EINVAL, "tokenizer: NFC: %s", utf8proc_errmsg(l));
                    break;
                }
                if (kvr_buf_append(&nxt, dst, (size_t)l))
                    rc = kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
                free(dst);
            }
            break;
        case TK_REPLACE:
            if (!t->slow && st->pat.lit && st->pat.lit_len) {
                rc = replace_lit(st, cur.base, cur.len, &nxt, err);
                break;
            }
            rc = replace_all(&st->pat, cur.base, cur.len, st->content, st->content_len, &nxt, md,
                             err);
            break;
        case TK_PREPEND:
            if (cur.len && (kvr_buf_append(&nxt, st->content, st->content_len) ||
                            kvr_buf_append(&nxt, cur.base, cur.len)))
                rc = kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
            break;
        }
        kvr_buf tmp = cur;
        cur = nxt;
        nxt = tmp;
    }
    if (!rc && kvr_buf_append(out, cur.base, cur.len))
        rc = kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
done:
    kvr_buf_free(&cur);
    kvr_buf_free(&nxt);
    if (md)
        pcre2_match_data_free(md);
    return rc;
}

/* Per-thread scratch for pretok_and_model: the span and match lists grew from nothing by
 * doubling for every segment of every encode; kept per thread they are sized once. Freed at
 * thread exit (pthread key); lists that grew past SCRATCH_KEEP entries are not kept. */
typedef struct scratch {
    spans a, b;
    matches m;
} scratch;
#define SCRATCH_KEEP (1u << 16)
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static __thread scratch *tls_scratch;

static void scratch_free(void *p)
{
    scratch *s = p;
    free(s->a.v);
    free(s->b.v);
    free(s->m.v);
    free(s);
}

static void scratch_key_init(void)
{
    pthread_key_create(&scratch_key, scratch_free);
}

static scratch *scratch_get(void)
{
    if (!tls_scratch) {
        pthread_once(&scratch_once, scratch_key_init);
        if (!(tls_scratch = calloc(1, sizeof(scratch))))
            return NULL;
        pthread_setspecific(scratch_key, tls_scratch);
    }
    return tls_scratch;
}

/* Pre-tokenizes arena[sp] (arena may grow: new text is appended to it) and runs BPE on each
 * resulting word. */
static int pretok_and_model(const kvr_hftok *t, kvr_buf *arena, span whole, kvr_buf *ids,
                            pcre2_match_data *md, kvr_err *err)
{
    scratch *sc = t->slow ? NULL : scratch_get();
    spans a = {0}, b = {0};
    matches m = {0};
    if (sc) {
        a = sc->a, b = sc->b, m = sc->m;
        a.n = b.n = m.n = 0;
        sc->a = sc->b = (spans){0}; /* owned here until handed back below */
        sc->m = (matches){0};
    }
    int rc = spans_push(&a, whole.off, whole.len, whole.first) ? KVR_ENOMEM : 0;
    if (rc) {
        rc = kvr_err_set(err, rc, "tokenizer: out of memory");
        goto out;
    }
    for (size_t i = 0; i < t->pre_n && !rc; i++) {
        const tk_step *st = &t->pre[i];
        b.n = 0;
        for (size_t j = 0; j < a.n && !rc; j++) {
            span sp = a.v[j];
            switch (st->kind) {
            case TK_SPLIT:
            case TK_DIGITS:
                rc = split_piece(st, arena->base, &sp, &b, &m, md, err);
                break;
            case TK_BYTELEVEL: /* bytes stay raw; the vocabulary was mapped at load time */
                if (st->add_prefix_space && (sp.len == 0 || arena->base[sp.off] != ' ')) {
                    uint32_t off = (uint32_t)arena->len;
                    /* reserve first: the copy reads from the arena it appends to */
                    if (kvr_buf_reserve(arena, (size_t)sp.len + 1) ||
                        kvr_buf_append(arena, " ", 1) ||
                        kvr_buf_append(arena, arena->base + sp.off, sp.len)) {
                        rc = kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
                        break;
                    }
                    sp = (span){off, sp.len + 1, sp.first};
                }
                if (st->use_regex)
                    rc = split_piece(st, arena->base, &sp, &b, &m, md, err);
                else if (spans_push(&b, sp.off, sp.len, sp.first))
                    rc = kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
                break;
            case TK_METASPACE: {
                uint32_t off = (uint32_t)arena->len;
                const char *r = st->content;
                size_t rl = st->content_len;
                int starts = sp.len >= rl && memcmp(arena->base + sp.off, r, rl) == 0;
                int pre = !starts && sp.len > 0 &&
                          (st->prepend_scheme == TK_PREPEND_ALWAYS ||
                           (st->prepend_scheme == TK_PREPEND_FIRST && sp.first));
                if (pre && kvr_buf_append(arena, r, rl))
                    rc = KVR_ENOMEM;
                for (uint32_t k = 0; !rc && k < sp.len; k++) {
                    char c = arena->base[sp.off + k];
                    if (c == ' ' ? kvr_buf_append(arena, r, rl) : kvr_buf_append(arena, &c, 1))
                        rc = KVR_ENOMEM;
                }
                if (rc) {
                    rc = kvr_err_set(err, rc, "tokenizer: out of memory");
                    break;
                }
                span ns = {off, (uint32_t)(arena->len - off), sp.first};
                if (st->split)
                    rc = split_piece(st, arena->base, &ns, &b, &m, md, err);
                else if (ns.len && spans_push(&b, ns.off, ns.len, ns.first))
                    rc = kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
                break;
            }
            }
        }
        spans tmp = a;
        a = b;
        b = tmp;
    }
    for (size_t j = 0; j < a.n && !rc; j++)
        rc = tk_bpe_word(t, arena->base + a.v[j].off, a.v[j].len, ids, err);
out:
    if (sc && a.cap <= SCRATCH_KEEP && b.cap <= SCRATCH_KEEP && m.cap <= SCRATCH_KEEP) {
        sc->a = a, sc->b = b, sc->m = m;
        return rc;
    }
    free(a.v);
    free(b.v);
    free(m.v);
    return rc;
}

static int is_ws(uint32_t c)
{
    return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

static int is_word_cp(uint32_t c)
{
    if (c == '_')
        return 1;
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    return (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO) ||
           (k >= UTF8PROC_CATEGORY_ND && k <= UTF8PROC_CATEGORY_NO);
}

static uint32_t last_cp(const char *s, size_t n, size_t *start)
{
    size_t i = n;
    while (i > 0 && ((unsigned char)s[i - 1] & 0xC0) == 0x80)
        i--;
    if (i > 0)
        i--;
    size_t l;
    *start = i;
    return tk_utf8_decode(s + i, n - i, &l);
}

typedef struct seg {
    size_t a, b;
    int32_t added; /* index into t->added or -1 */
} seg;

/* The library's AddedVocabulary::find_matches over one trie, leftmost-longest. */
static int split_added(const kvr_hftok *t, const tk_trie *trie, const char *s, size_t n, seg **out,
                       size_t *out_n)
{
    size_t cap = 8, k = 0, start_off = 0;
    seg *v = malloc(cap * sizeof(seg));
    if (!v)
        return KVR_ENOMEM;
    for (size_t i = 0; i < n && trie->nodes;) {
        if (!t->slow) { /* most bytes start no added token: skip them without the trie */
            while (i < n && !trie->root[(unsigned char)s[i]])
                i++;
            if (i == n)
                break;
        }
        int32_t idx = -1;
        size_t l = tk_trie_longest(trie, s + i, n - i, &idx);
        if (!l) {
            i++;
            continue;
        }
        const tk_added *ad = &t->added[idx];
        size_t a = i, b = i + l;
        if (ad->single_word) {
            size_t p, q;
            int before = a > 0 && is_word_cp(last_cp(s, a, &p));
            int after = b < n && is_word_cp(tk_utf8_decode(s + b, n - b, &q));
            if (before || after) {
                i++;
                continue;
            }
        }
        if (ad->lstrip) {
            size_t p;
            while (a > start_off && is_ws(last_cp(s, a, &p)))
                a = p;
        }
        if (ad->rstrip) {
            size_t q;
            while (b < n && is_ws(tk_utf8_decode(s + b, n - b, &q)))
                b += q;
        }
        if (k + 2 > cap) {
            cap *= 2;
            seg *nv = realloc(v, cap * sizeof(seg));
            if (!nv) {
                free(v);
                return KVR_ENOMEM;
            }
            v = nv;
        }
        if (a > start_off)
            v[k++] = (seg){start_off, a, -1};
        v[k++] = (seg){a, b, idx};
        start_off = b;
        i = b;
    }
    if (start_off < n) {
        if (k + 1 > cap) {
            seg *nv = realloc(v, (cap + 1) * sizeof(seg));
            if (!nv) {
                free(v);
                return KVR_ENOMEM;
            }
            v = nv;
        }
        v[k++] = (seg){start_off, n, -1};
    }
    *out = v;
    *out_n = k;
    return 0;
}

int tk_encode_text(const kvr_hftok *t, const char *s, size_t n, kvr_buf *ids, kvr_err *err)
{
    seg *s1 = NULL, *s2 = NULL;
    size_t n1 = 0, n2 = 0;
    kvr_buf arena;
    kvr_buf_init(&arena);
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    int rc = md ? split_added(t, &t->trie_raw, s, n, &s1, &n1) : KVR_ENOMEM;
    if (rc) {
        rc = kvr_err_set(err, rc, "tokenizer: out of memory");
        goto done;
    }
    for (size_t i = 0; i < n1 && !rc; i++) {
        if (s1[i].added >= 0) {
            if (kvr_buf_append(ids, &t->added[s1[i].added].id, sizeof(uint32_t)))
                rc = kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
            continue;
        }
        kvr_buf_reset(&arena);
        if ((rc = tk_normalize(t, s + s1[i].a, s1[i].b - s1[i].a, &arena, err)) != 0)
            break;
        size_t nl = arena.len;
        free(s2);
        s2 = NULL;
        if ((rc = split_added(t, &t->trie_norm, arena.base, nl, &s2, &n2)) != 0) {
            rc = kvr_err_set(err, rc, "tokenizer: out of memory");
            break;
        }
        for (size_t j = 0; j < n2 && !rc; j++) {
            if (s2[j].added >= 0) {
                if (kvr_buf_append(ids, &t->added[s2[j].added].id, sizeof(uint32_t)))
                    rc = kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
                continue;
            }
            span whole = {(uint32_t)s2[j].a, (uint32_t)(s2[j].b - s2[j].a),
                          s1[i].a == 0 && s2[j].a == 0};
            rc = pretok_and_model(t, &arena, whole, ids, md, err);
        }
    }
done:
    free(s1);
    free(s2);
    kvr_buf_free(&arena);
    if (md)
        pcre2_match_data_free(md);
    return rc;
}
