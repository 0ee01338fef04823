/* BPE over one pre-tokenized word, the way the library's Word::merge_all does it: symbols in a
 * linked list, a binary min-heap of candidate merges ordered by (rank, position), stale entries
 * skipped when popped. Same order of merges as the library, so the same ids. */
#include "tk_internal.h"

#include <pthread.h>
#include <stdlib.h>

typedef struct sym {
    uint32_t id;
    int32_t prev, next;
    uint32_t len; /* bytes; 0 = merged away */
} sym;

typedef struct cand {
    uint32_t rank, pos, new_id;
    uint32_t a, b; /* the pair's ids when pushed: unchanged ids need no second lookup */
} cand;

static int cand_less(const cand *a, const cand *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

/* Starts in `stack` (most words are short): no malloc per word on the hot path. */
typedef struct heap {
    cand *v;
    size_t n, cap;
    cand stack[64];
} heap;

static int heap_push(heap *h, cand c)
{
    if (h->n == h->cap) {
        size_t nc = h->cap * 2;
        cand *v = h->v == h->stack ? malloc(nc * sizeof(cand)) : realloc(h->v, nc * sizeof(cand));
        if (!v)
            return KVR_ENOMEM;
        if (h->v == h->stack)
            memcpy(v, h->stack, sizeof(h->stack));
        h->v = v;
        h->cap = nc;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_less(&c, &h->v[p]))
            break;
        h->v[i] = h->v[p];
        i = p;
    }
    h->v[i] = c;
    return 0;
}

static cand heap_pop(heap *h)
{
    cand top = h->v[0], last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const cand *mv = &last;
        if (l < h->n && cand_less(&h->v[l], mv)) {
            m = l;
            mv = &h->v[l];
        }
        if (r < h->n && cand_less(&h->v[r], mv))
            m = r;
        if (m == i)
            break;
        h->v[i] = h->v[m];
        i = m;
    }
    if (h->n)
        h->v[i] = last;
    return top;
}

typedef struct word {
    sym *s;
    size_t n, cap;
    sym stack[64];
} word;

static int word_add(word *w, uint32_t id, uint32_t len)
{
    if (w->n == w->cap) {
        size_t nc = w->cap * 2;
        sym *s = w->s == w->stack ? malloc(nc * sizeof(sym)) : realloc(w->s, nc * sizeof(sym));
        if (!s)
            return KVR_ENOMEM;
        if (w->s == w->stack)
            memcpy(s, w->stack, sizeof(w->stack));
        w->s = s;
        w->cap = nc;
    }
    sym *x = &w->s[w->n];
    x->id = id;
    x->len = len;
    x->prev = (int32_t)w->n - 1;
    x->next = -1;
    if (w->n)
        w->s[w->n - 1].next = (int32_t)w->n;
    w->n++;
    return 0;
}

static int push_pair(const kvr_hftok *t, heap *h, const word *w, size_t pos)
{
    const sym *a = &w->s[pos];
    if (a->next < 0)
        return 0;
    const tk_pair *p = tk_pairmap_get(&t->merges, a->id, w->s[a->next].id);
    if (!p)
        return 0;
    return heap_push(h, (cand){p->rank, (uint32_t)pos, p->new_id, a->id, w->s[a->next].id});
}

/* Initial symbols. Byte-level: one per byte (the vocabulary holds all 256 mapped bytes).
 * Otherwise one per character; a character not in the vocabulary becomes its <0xXX> byte
 * tokens (byte_fallback) or the unk token (fused with a preceding unk when fuse_unk), or is
 * dropped when there is neither, as the library does. */
static int split_symbols(const kvr_hftok *t, const char *w, size_t n, word *wd)
{
    int rc;
    if (t->byte_level) {
        for (size_t i = 0; i < n; i++) {
            int32_t id = t->byte_id[(unsigned char)w[i]];
            if (id >= 0 && (rc = word_add(wd, (uint32_t)id, 1)) != 0)
                return rc;
        }
        return 0;
    }
    int64_t unk = -1;
    uint32_t unk_len = 0;
    for (size_t i = 0; i < n;) {
        size_t l = tk_utf8_len((unsigned char)w[i]);
        if (l > n - i)
            l = n - i;
        int64_t id = tk_strmap_get(&t->vmap, &t->arena, t->vocab, w + i, l);
        if (id >= 0) {
            if (unk >= 0) {
                if ((rc = word_add(wd, (uint32_t)unk, unk_len)) != 0)
                    return rc;
                unk = -1;
            }
            if ((rc = word_add(wd, (uint32_t)id, (uint32_t)l)) != 0)
                return rc;
            i += l;
            continue;
        }
        if (t->byte_fallback) {
            size_t k = 0;
            while (k < l && t->fallback_id[(unsigned char)w[i + k]] >= 0)
                k++;
            if (k == l) {
                for (k = 0; k < l; k++)
                    if ((rc = word_add(wd, (uint32_t)t->fallback_id[(unsigned char)w[i + k]], 1)) !=
                        0)
                        return rc;
                i += l;
                continue;
            }
        }
        if (t->unk_id >= 0) {
            if (unk >= 0 && t->fuse_unk)
                unk_len += (uint32_t)l;
            else {
                if (unk >= 0 && (rc = word_add(wd, (uint32_t)unk, unk_len)) != 0)
                    return rc;
                unk = t->unk_id;
                unk_len = (uint32_t)l;
            }
        }
        i += l;
    }
    if (unk >= 0)
        return word_add(wd, (uint32_t)unk, unk_len);
    return 0;
}

/* Word cache: BPE is a pure function of (tokenizer, word), and prompts repeat their words,
 * so short words' ids are remembered, as the library's BPE cache does. One direct-mapped
 * table per thread (a kvr_hftok is shared by threads and immutable), keyed by the load's gen
 * so a freed tokenizer's entries never match another's; allocated on first use and freed at
 * thread exit. */
#define WC_SLOTS 4096
#define WC_MAX_BYTES 128 /* whole words of prose and code; pieces of cut long words */
#define WC_MAX_IDS 32
typedef struct wc_entry {
    uint64_t gen; /* 0 = empty */
    uint64_t hash;
    uint8_t len, nids;
    char bytes[WC_MAX_BYTES];
    uint32_t ids[WC_MAX_IDS];
} wc_entry;

static pthread_key_t wc_key;
static pthread_once_t wc_once = PTHREAD_ONCE_INIT;
static __thread wc_entry *wc_tab;

static void wc_key_init(void)
{
    pthread_key_create(&wc_key, free);
}

/* Inline multiply-xor hash of a word: a library call to XXH3 per word showed in profiles.
 * Collisions cost only a miss: entries compare the bytes. */
static uint64_t wc_hash(const char *w, size_t n)
{
    uint64_t h = (uint64_t)n * 0x9E3779B97F4A7C15ull, x;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        memcpy(&x, w + i, 8);
        h = (h ^ x) * 0xff51afd7ed558ccdull;
        h ^= h >> 32;
    }
    x = 0;
    memcpy(&x, w + i, n - i);
    h = (h ^ x) * 0xc4ceb9fe1a85ec53ull;
    return h ^ (h >> 29);
}

static wc_entry *wc_slot(const kvr_hftok *t, const char *w, size_t n, uint64_t *hash)
{
    if (!wc_tab) {
        pthread_once(&wc_once, wc_key_init);
        if (!(wc_tab = calloc(WC_SLOTS, sizeof(wc_entry))))
            return NULL; /* no cache: still exact, only slower */
        pthread_setspecific(wc_key, wc_tab);
    }
    *hash = wc_hash(w, n) ^ t->gen * 0x9E3779B97F4A7C15ull;
    return &wc_tab[*hash & (WC_SLOTS - 1)];
}

static int bpe_merge(const kvr_hftok *t, const char *w, size_t n, kvr_buf *out, kvr_err *err);

static int cached_bpe(const kvr_hftok *t, const char *w, size_t n, kvr_buf *out, kvr_err *err);

static uint64_t bigram_bit(uint32_t x, uint32_t y)
{
    uint64_t k = ((uint64_t)x << 21 | y) * 0x9E3779B97F4A7C15ull;
    return (k >> 29) & (TK_BIGRAM_BITS - 1);
}

static int has_bit(const uint64_t *set, uint64_t b)
{
    return (int)(set[b / 64] >> (b % 64) & 1);
}

int tk_cuts_init(kvr_hftok *t)
{
    if (t->byte_level || t->ignore_merges)
        return 0;
    t->bigram = calloc(TK_BIGRAM_BITS / 64, sizeof(uint64_t));
    t->single = calloc(TK_SINGLE_CPS / 64, sizeof(uint64_t));
    if (!t->bigram || !t->single)
        return KVR_ENOMEM;
    if (tk_strmap_get(&t->vmap, &t->arena, t->vocab, "\xE2\x96\x81", 3) < 0) {
        free(t->bigram); /* no U+2581 token: cut_word's candidates never occur */
        free(t->single);
        t->bigram = t->single = NULL;
        return 0;
    }
    for (uint32_t id = 0; id < t->vocab_n; id++) {
        const tk_str *v = &t->vocab[id];
        if (!v->len)
            continue;
        const char *p = t->arena.base + v->off;
        uint32_t prev = 0;
        for (size_t i = 0; i < v->len;) {
            size_t l;
            uint32_t cp = tk_utf8_decode(p + i, v->len - i, &l);
            if (i == 0 && l == v->len && cp < TK_SINGLE_CPS)
                t->single[cp / 64] |= 1ull << (cp % 64);
            if (i > 0) {
                uint64_t b = bigram_bit(prev, cp);
                t->bigram[b / 64] |= 1ull << (b % 64);
            }
            prev = cp;
            i += l ? l : 1;
        }
    }
    return 0;
}

/* BPE of a word cut at safe points (see tk_cuts_init): merges never cross a safe point, so
 * each piece merges on its own exactly as inside the whole word, and the pieces are short
 * enough for the word cache. Gemma 3's pre-tokenizer leaves whole lines as one word (its
 * normalizer turns spaces into U+2581 before a split on spaces), where one heap over thousands
 * of symbols was most of its time. Candidates are the places before a U+2581 (E2 96 81): they
 * give word-sized pieces ("▁word"), and memchr finds them fast. */
static int cut_word(const kvr_hftok *t, const char *w, size_t n, kvr_buf *out, kvr_err *err)
{
    size_t start = 0;
    int rc;
    for (size_t i = 1; i + 3 <= n;) {
        const char *hit = memchr(w + i, 0xE2, n - i - 2);
        if (!hit)
            break;
        i = (size_t)(hit - w);
        if ((unsigned char)w[i + 1] != 0x96 || (unsigned char)w[i + 2] != 0x81) {
            i++;
            continue;
        }
        size_t p = i - 1, l; /* the character before */
        while (p > start && ((unsigned char)w[p] & 0xC0) == 0x80)
            p--;
        uint32_t x = tk_utf8_decode(w + p, i - p, &l);
        if (i > start && p + l == i && x < TK_SINGLE_CPS && has_bit(t->single, x) &&
            !has_bit(t->bigram, bigram_bit(x, 0x2581))) {
            if ((rc = cached_bpe(t, w + start, i - start, out, err)) != 0)
                return rc;
            start = i;
        }
        i += 3;
    }
    return cached_bpe(t, w + start, n - start, out, err);
}

int tk_bpe_word(const kvr_hftok *t, const char *w, size_t n, kvr_buf *out, kvr_err *err)
{
    if (!t->slow && t->bigram && n > 4)
        return cut_word(t, w, n, out, err);
    return cached_bpe(t, w, n, out, err);
}

static int cached_bpe(const kvr_hftok *t, const char *w, size_t n, kvr_buf *out, kvr_err *err)
{
    /* slow: the cache as it was before the fast paths (22 bytes, 8 ids), for old-vs-new */
    size_t max_bytes = t->slow ? 22 : WC_MAX_BYTES, max_ids = t->slow ? 8 : WC_MAX_IDS;
    if (n == 0 || n > max_bytes || (t->slow && t->ignore_merges))
        return bpe_merge(t, w, n, out, err);
    uint64_t hash;
    wc_entry *e = wc_slot(t, w, n, &hash);
    if (e && e->gen == t->gen && e->hash == hash && e->len == n && !memcmp(e->bytes, w, n))
        return kvr_buf_append(out, e->ids, e->nids * sizeof(uint32_t))
                   ? kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory")
                   : 0;
    size_t before = out->len;
    int rc = bpe_merge(t, w, n, out, err);
    size_t nids = (out->len - before) / sizeof(uint32_t);
    if (rc == 0 && e && nids <= max_ids) {
        e->gen = t->gen;
        e->hash = hash;
        e->len = (uint8_t)n;
        e->nids = (uint8_t)nids;
        memcpy(e->bytes, w, n);
        if (nids) /* a word can merge to nothing only in a broken vocabulary; out->base may be NULL */
            memcpy(e->ids, out->base + before, nids * sizeof(uint32_t));
    }
    return rc;
}

static int bpe_merge(const kvr_hftok *t, const char *w, size_t n, kvr_buf *out, kvr_err *err)
{
    int rc = 0;
    word wd = {.n = 0, .cap = 64};
    wd.s = wd.stack;
    heap h = {.n = 0, .cap = 64};
    h.v = h.stack;
    if (n == 0)
        return 0;
    if (t->ignore_merges) {
        int64_t id;
        if (t->byte_level) {
            char tmp[512];
            kvr_buf big;
            kvr_buf_init(&big);
            const char *k = tmp;
            size_t kl = 0;
            if (n * 2 <= sizeof(tmp)) {
                for (size_t i = 0; i < n; i++) {
                    uint16_t cp = tk_bl_cp((unsigned char)w[i]);
                    if (cp < 0x80)
                        tmp[kl++] = (char)cp;
                    else {
                        tmp[kl++] = (char)(0xC0 | cp >> 6);
                        tmp[kl++] = (char)(0x80 | (cp & 0x3F));
                    }
                }
            } else {
                for (size_t i = 0; i < n; i++)
                    if (tk_utf8_put(&big, tk_bl_cp((unsigned char)w[i])) != 0) {
                        kvr_buf_free(&big);
                        return kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
                    }
                k = big.base;
                kl = big.len;
            }
            id = tk_strmap_get(&t->vmap, &t->arena, t->vocab, k, kl);
            kvr_buf_free(&big);
        } else
            id = tk_strmap_get(&t->vmap, &t->arena, t->vocab, w, n);
        if (id >= 0) {
            uint32_t v = (uint32_t)id;
            if (kvr_buf_append(out, &v, sizeof(v)) != 0)
                return kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
            return 0;
        }
    }
    if ((rc = split_symbols(t, w, n, &wd)) != 0)
        goto nomem;
    for (size_t i = 0; i + 1 < wd.n; i++)
        if ((rc = push_pair(t, &h, &wd, i)) != 0)
            goto nomem;
    while (h.n) {
        cand c = heap_pop(&h);
        sym *a = &wd.s[c.pos];
        if (a->len == 0 || a->next < 0)
            continue;
        sym *b = &wd.s[a->next];
        if (a->id != c.a || b->id != c.b) { /* another pair now: valid only if it makes the
                                             * same token, as the library checks */
            const tk_pair *p = tk_pairmap_get(&t->merges, a->id, b->id);
            if (!p || p->new_id != c.new_id)
                continue;
        }
        a->id = c.new_id;
        a->len += b->len;
        a->next = b->next;
        b->len = 0;
        if (a->next >= 0)
            wd.s[a->next].prev = (int32_t)c.pos;
        if (a->prev >= 0 && (rc = push_pair(t, &h, &wd, (size_t)a->prev)) != 0)
            goto nomem;
        if ((rc = push_pair(t, &h, &wd, c.pos)) != 0)
            goto nomem;
    }
    for (size_t i = 0; i < wd.n; i++) {
        if (!wd.s[i].len)
            continue;
        if ((rc = kvr_buf_append(out, &wd.s[i].id, sizeof(uint32_t))) != 0)
            goto nomem;
    }
    goto done;
nomem:
    rc = kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
done:
    if (wd.s != wd.stack)
        free(wd.s);
    if (h.v != h.stack)
        free(h.v);
    return rc;
}
