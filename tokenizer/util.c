/* Hash maps, the added-token trie, UTF-8 helpers and the byte-level alphabet. */
#include "tk_internal.h"

#include <stdlib.h>
#include <xxhash.h>

static uint16_t bl_char[256];
static int16_t bl_rev[324]; /* code points < 324 only */

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the rest are moved
 * to 256+n in byte order. Built once; a benign race writes identical values. */
void tk_bl_init(void)
{
    if (bl_char['A'])
        return;
    int n = 0;
    for (int i = 0; i < 324; i++)
        bl_rev[i] = -1;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        bl_char[b] = (uint16_t)(keep ? b : 256 + n++);
        bl_rev[bl_char[b]] = (int16_t)b;
    }
}

int tk_bl_byte(uint32_t cp)
{
    return cp < 324 ? bl_rev[cp] : -1;
}

uint16_t tk_bl_cp(unsigned char b)
{
    return bl_char[b];
}

uint64_t tk_hash(const void *p, size_t n)
{
    return XXH3_64bits(p, n);
}

static size_t pow2_for(size_t n)
{
    size_t c = 16;
    while (c < n * 2)
        c <<= 1;
    return c;
}

int tk_strmap_init(tk_strmap *m, size_t n)
{
    size_t c = pow2_for(n);
    m->slots = calloc(c, sizeof(uint32_t));
    m->mask = c - 1;
    return m->slots ? 0 : KVR_ENOMEM;
}

void tk_strmap_free(tk_strmap *m)
{
    free(m->slots);
    m->slots = NULL;
}

int tk_strmap_put(tk_strmap *m, const kvr_buf *arena, const tk_str *strs, uint32_t id)
{
    /* an empty arena has a NULL base: no offset on it (UBSan, found by fuzz_tokenizer) */
    const char *s = arena->base ? arena->base + strs[id].off : "";
    size_t n = strs[id].len;
    size_t i = tk_hash(s, n) & m->mask;
    for (;; i = (i + 1) & m->mask) {
        uint32_t v = m->slots[i];
        if (!v) {
            m->slots[i] = id + 1;
            return 0;
        }
        const tk_str *o = &strs[v - 1];
        if (o->len == n && memcmp(arena->base + o->off, s, n) == 0)
            return KVR_EEXIST;
    }
}

int64_t tk_strmap_get(const tk_strmap *m, const kvr_buf *arena, const tk_str *strs, const char *s,
                      size_t n)
{
    size_t i = tk_hash(s, n) & m->mask;
    for (;; i = (i + 1) & m->mask) {
        uint32_t v = m->slots[i];
        if (!v)
            return -1;
        const tk_str *o = &strs[v - 1];
        if (o->len == n && memcmp(arena->base + o->off, s, n) == 0)
            return v - 1;
    }
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

int tk_pairmap_init(tk_pairmap *m, size_t n)
{
    size_t c = pow2_for(n);
    m->slots = malloc(c * sizeof(tk_pair));
    if (!m->slots)
        return KVR_ENOMEM;
    for (size_t i = 0; i < c; i++)
        m->slots[i].rank = UINT32_MAX;
    m->mask = c - 1;
    return 0;
}

void tk_pairmap_free(tk_pairmap *m)
{
    free(m->slots);
    m->slots = NULL;
}

/* A pair listed twice: the later entry wins, as in the library's HashMap collect. */
void tk_pairmap_put(tk_pairmap *m, uint32_t a, uint32_t b, uint32_t rank, uint32_t new_id)
{
    uint64_t k = (uint64_t)a << 32 | b;
    size_t i = mix64(k) & m->mask;
    for (;; i = (i + 1) & m->mask) {
        tk_pair *p = &m->slots[i];
        if (p->rank == UINT32_MAX || p->key == k) {
            p->key = k;
            p->rank = rank;
            p->new_id = new_id;
            return;
        }
    }
}

const tk_pair *tk_pairmap_get(const tk_pairmap *m, uint32_t a, uint32_t b)
{
    uint64_t k = (uint64_t)a << 32 | b;
    size_t i = mix64(k) & m->mask;
    for (;; i = (i + 1) & m->mask) {
        const tk_pair *p = &m->slots[i];
        if (p->rank == UINT32_MAX)
            return NULL;
        if (p->key == k)
            return p;
    }
}

static int trie_grow(tk_trie *t)
{
    size_t c = t->mask ? (t->mask + 1) * 2 : 64;
    uint64_t *keys = calloc(c, sizeof(uint64_t));
    uint32_t *child = malloc(c * sizeof(uint32_t));
    if (!keys || !child) {
        free(keys);
        free(child);
        return KVR_ENOMEM;
    }
    for (size_t i = 0; t->mask && i <= t->mask; i++) {
        if (!t->keys[i])
            continue;
        size_t j = mix64(t->keys[i]) & (c - 1);
        while (keys[j])
            j = (j + 1) & (c - 1);
        keys[j] = t->keys[i];
        child[j] = t->child[i];
    }
    free(t->keys);
    free(t->child);
    t->keys = keys;
    t->child = child;
    t->mask = c - 1;
    return 0;
}

static int trie_node(tk_trie *t, uint32_t *out)
{
    if (t->nodes == t->nodes_cap) {
        size_t c = t->nodes_cap ? t->nodes_cap * 2 : 64;
        int32_t *term = realloc(t->term, c * sizeof(int32_t));
        if (!term)
            return KVR_ENOMEM;
        t->term = term;
        t->nodes_cap = c;
    }
    t->term[t->nodes] = -1;
    *out = (uint32_t)t->nodes++;
    return 0;
}

static int64_t trie_step(const tk_trie *t, uint32_t node, unsigned char b)
{
    if (!t->mask)
        return -1;
    uint64_t k = ((uint64_t)node << 8 | b) + 1;
    size_t i = mix64(k) & t->mask;
    for (;; i = (i + 1) & t->mask) {
        if (!t->keys[i])
            return -1;
        if (t->keys[i] == k)
            return t->child[i];
    }
}

int tk_trie_add(tk_trie *t, const char *s, size_t n, int32_t idx)
{
    uint32_t node = 0;
    int rc;
    if (!t->nodes && (rc = trie_node(t, &node)) != 0)
        return rc;
    for (size_t i = 0; i < n; i++) {
        int64_t c = trie_step(t, node, (unsigned char)s[i]);
        if (c < 0) {
            uint32_t nn;
            if ((t->count + 1) * 2 > t->mask && (rc = trie_grow(t)) != 0)
                return rc;
            if ((rc = trie_node(t, &nn)) != 0)
                return rc;
            uint64_t k = ((uint64_t)node << 8 | (unsigned char)s[i]) + 1;
            size_t j = mix64(k) & t->mask;
            while (t->keys[j])
                j = (j + 1) & t->mask;
            t->keys[j] = k;
            t->child[j] = nn;
            t->count++;
            c = nn;
        }
        if (i == 0)
            t->root[(unsigned char)s[0]] = (uint32_t)c + 1;
        node = (uint32_t)c;
    }
    /* the same content twice: the later token wins, as in the library's map */
    t->term[node] = idx;
    return 0;
}

void tk_trie_free(tk_trie *t)
{
    free(t->keys);
    free(t->child);
    free(t->term);
    memset(t, 0, sizeof(*t));
}

size_t tk_trie_longest(const tk_trie *t, const char *s, size_t n, int32_t *idx)
{
    if (!t->nodes)
        return 0;
    uint32_t node = 0;
    size_t best = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t c = trie_step(t, node, (unsigned char)s[i]);
        if (c < 0)
            break;
        node = (uint32_t)c;
        if (t->term[node] >= 0) {
            best = i + 1;
            *idx = t->term[node];
        }
    }
    return best;
}

size_t tk_utf8_len(unsigned char c)
{
    if (c < 0x80)
        return 1;
    if ((c & 0xE0) == 0xC0)
        return 2;
    if ((c & 0xF0) == 0xE0)
        return 3;
    if ((c & 0xF8) == 0xF0)
        return 4;
    return 1;
}

/* Length of the valid UTF-8 sequence at s (1..4), or -(bytes of the maximal invalid prefix). */
static int utf8_seq(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    size_t need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF)
        need = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0)
            lo = 0xA0;
        if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0)
            lo = 0x90;
        if (c == 0xF4)
            hi = 0x8F;
    } else
        return -1;
    for (size_t i = 1; i < need; i++) {
        if (i >= n)
            return -(int)i;
        unsigned d = s[i];
        if (i == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF))
            return -(int)i;
    }
    return (int)need;
}

int tk_utf8_valid(const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        /* ASCII eight bytes at a time: every encode validates its whole text first */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ull)
                break;
            i += 8;
        }
        if (i >= n)
            break;
        int l = utf8_seq((const unsigned char *)s + i, n - i);
        if (l < 0)
            return 0;
        i += (size_t)l;
    }
    return 1;
}

/* Rust's String::from_utf8_lossy: each maximal invalid prefix becomes one U+FFFD. */
void tk_utf8_lossy(kvr_buf *out, const char *s, size_t n, int *nomem)
{
    if (!s) /* an empty buffer has no base: no pointer arithmetic on NULL */
        s = "";
    size_t i = 0, run = 0;
    while (i < n) {
        int l = utf8_seq((const unsigned char *)s + i, n - i);
        if (l > 0) {
            i += (size_t)l;
            continue;
        }
        if (kvr_buf_append(out, s + run, i - run) || kvr_buf_append(out, "\xEF\xBF\xBD", 3))
            *nomem = 1;
        i += (size_t)-l;
        run = i;
    }
    if (kvr_buf_append(out, s + run, n - run))
        *nomem = 1;
}

uint32_t tk_utf8_decode(const char *s, size_t n, size_t *len)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t l = tk_utf8_len(u[0]);
    if (l > n)
        l = 1;
    *len = l;
    switch (l) {
    case 1:
        return u[0];
    case 2:
        return (uint32_t)(u[0] & 0x1F) << 6 | (u[1] & 0x3F);
    case 3:
        return (uint32_t)(u[0] & 0x0F) << 12 | (uint32_t)(u[1] & 0x3F) << 6 | (u[2] & 0x3F);
    default:
        return (uint32_t)(u[0] & 0x07) << 18 | (uint32_t)(u[1] & 0x3F) << 12 |
               (uint32_t)(u[2] & 0x3F) << 6 | (u[3] & 0x3F);
    }
}

int tk_utf8_put(kvr_buf *out, uint32_t cp)
{
    char b[4];
    size_t n;
    if (cp < 0x80) {
        b[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        b[0] = (char)(0xC0 | cp >> 6);
        b[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        b[0] = (char)(0xE0 | cp >> 12);
        b[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        b[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        b[0] = (char)(0xF0 | cp >> 18);
        b[1] = (char)(0x80 | (cp >> 12 & 0x3F));
        b[2] = (char)(0x80 | (cp >> 6 & 0x3F));
        b[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    return kvr_buf_append(out, b, n);
}

void tk_pattern_free(tk_pattern *p)
{
    free(p->lit);
    if (p->re)
        pcre2_code_free(p->re);
    memset(p, 0, sizeof(*p));
}

void tk_step_free(tk_step *s)
{
    tk_pattern_free(&s->pat);
    free(s->content);
    memset(s, 0, sizeof(*s));
}
