/* engine: see engine.h for the model. */
#define _GNU_SOURCE /* qsort_r */
#include "engine.h"

#include "kvr_hash.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#define NIL UINT32_MAX

typedef struct blk {
    uint64_t ext, seq, parent_ext;
    uint32_t ref;
    uint32_t pos; /* chain position (0 = root block) */
    uint32_t prev, next; /* LRU (hashed, ref 0) or free list (next only) */
    uint8_t hashed, has_parent, in_lru;
    uint8_t lora; /* 0: base model, i: adapter cfg.loras[i-1] */
} blk;

enum { S_WAITING = 1, S_RUNNING = 2 };

struct kvr_engine_seq {
    void *data;
    uint32_t *tokens; /* prompt then generated */
    uint32_t n_tokens, cap_tokens;
    uint32_t n_prompt, max_tokens, n_gen;
    uint32_t n_computed;
    uint32_t *blocks; /* covers ceil(n_computed / B) tokens' worth */
    uint32_t n_blocks, cap_blocks;
    uint32_t n_hashed; /* leading blocks that are full and hashed */
    uint32_t cached_tokens;
    bool admitted_once;
    int state;
    uint64_t rng;
    const char *word; /* generator: word being spelled */
    struct kvr_engine_seq *prev, *next;
    uint32_t sched_tokens; /* this step */
    bool finished;
    uint8_t lora; /* as blk.lora */
};

typedef struct seq_list {
    kvr_engine_seq *head, *tail;
    uint32_t n;
} seq_list;

typedef struct ev_rec {
    kvr_kv_type type;
    uint32_t h_off, n_h, t_off, n_t;
    uint64_t parent;
    bool has_parent;
    uint8_t lora; /* STORED: as blk.lora */
} ev_rec;

struct kvr_engine {
    kvr_engine_config cfg;
    int64_t now_ns;
    blk *blks;
    uint32_t *blk_tokens;
    uint32_t free_head, n_free;
    uint32_t lru_head, lru_tail, n_lru;
    uint32_t n_used, n_hashed;
    /* ext hash -> block, linear probing with backward-shift deletion */
    uint32_t *table;
    uint32_t table_mask;
    seq_list running, waiting;
    /* step outputs */
    kvr_engine_output *outs;
    size_t n_outs, cap_outs;
    kvr_engine_seq **sched;
    size_t n_sched, cap_sched;
    /* events */
    ev_rec *evs;
    size_t n_evs, cap_evs, ev_cursor;
    uint64_t *ev_hashes;
    size_t n_ev_hashes, cap_ev_hashes;
    uint32_t *ev_tokens;
    size_t n_ev_tokens, cap_ev_tokens;
    kvr_kv_event *ev_view;
    size_t cap_ev_view;
    uint8_t *hash_scratch;
    kvr_engine_stats st;
    /* per adapter index (0: base): seq-hash seed (kvr_hash_lora_seed) and ext-hash seed */
    uint64_t seq_seed[KVR_ENGINE_MAX_LORAS + 1], ext_seed[KVR_ENGINE_MAX_LORAS + 1];
};

void kvr_engine_config_default(kvr_engine_config *c)
{
    c->block_size = 64;
    c->capacity_blocks = 16384;
    c->max_num_seqs = 256;
    c->max_batched_tokens = 8192;
    c->max_model_len = 131072;
    c->speedup = 1.0;
    c->seed = 0;
    c->loras = NULL;
    c->n_loras = 0;
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : 16;
    while (c < need)
        c *= 2;
    void *n = realloc(*p, c * elem);
    if (!n)
        return KVR_ENOMEM;
    *p = n;
    *cap = c;
    return 0;
}

/* ---------------------------------------------------------------- hash table */

static inline uint32_t slot_of(const kvr_engine *e, uint64_t h)
{
    return (uint32_t)(h ^ (h >> 29) ^ (h >> 47)) & e->table_mask;
}

static uint32_t table_find(const kvr_engine *e, uint64_t ext)
{
    for (uint32_t i = slot_of(e, ext);; i = (i + 1) & e->table_mask) {
        uint32_t b = e->table[i];
        if (b == NIL)
            return NIL;
        if (e->blks[b].ext == ext)
            return b;
    }
}

static void table_insert(kvr_engine *e, uint32_t b)
{
    uint32_t i = slot_of(e, e->blks[b].ext);
    while (e->table[i] != NIL)
        i = (i + 1) & e->table_mask;
    e->table[i] = b;
}

static void table_remove(kvr_engine *e, uint32_t b)
{
    uint32_t i = slot_of(e, e->blks[b].ext);
    while (e->table[i] != b)
        i = (i + 1) & e->table_mask;
    e->table[i] = NIL;
    /* backward shift: move later entries of the cluster that may no longer be reachable */
    uint32_t j = i;
    for (;;) {
        j = (j + 1) & e->table_mask;
        uint32_t c = e->table[j];
        if (c == NIL)
            return;
        uint32_t home = slot_of(e, e->blks[c].ext);
        /* c can move to i if home is not cyclically in (i, j] */
        bool stays = (i <= j) ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            e->table[i] = c;
            e->table[j] = NIL;
            i = j;
        }
    }
}

/* ---------------------------------------------------------------- block lists */

static void lru_unlink(kvr_engine *e, uint32_t b)
{
    blk *k = &e->blks[b];
    if (k->prev != NIL)
        e->blks[k->prev].next = k->next;
    else
        e->lru_head = k->next;
    if (k->next != NIL)
        e->blks[k->next].prev = k->prev;
    else
        e->lru_tail = k->prev;
    k->prev = k->next = NIL;
    k->in_lru = 0;
    e->n_lru--;
}

static void lru_push_tail(kvr_engine *e, uint32_t b)
{
    blk *k = &e->blks[b];
    k->prev = e->lru_tail;
    k->next = NIL;
    if (e->lru_tail != NIL)
        e->blks[e->lru_tail].next = b;
    else
        e->lru_head = b;
    e->lru_tail = b;
    k->in_lru = 1;
    e->n_lru++;
}

static void free_push(kvr_engine *e, uint32_t b)
{
    blk *k = &e->blks[b];
    k->hashed = 0;
    k->ref = 0;
    k->next = e->free_head;
    e->free_head = b;
    e->n_free++;
}

/* ---------------------------------------------------------------- events */

static int ev_new(kvr_engine *e, kvr_kv_type t, ev_rec **out)
{
    if (grow((void **)&e->evs, &e->cap_evs, e->n_evs + 1, sizeof(ev_rec)))
        return KVR_ENOMEM;
    ev_rec *r = &e->evs[e->n_evs++];
    memset(r, 0, sizeof *r);
    r->type = t;
    r->h_off = (uint32_t)e->n_ev_hashes;
    r->t_off = (uint32_t)e->n_ev_tokens;
    *out = r;
    return 0;
}

static int ev_push_hash(kvr_engine *e, uint64_t h)
{
    if (grow((void **)&e->ev_hashes, &e->cap_ev_hashes, e->n_ev_hashes + 1, sizeof(uint64_t)))
        return KVR_ENOMEM;
    e->ev_hashes[e->n_ev_hashes++] = h;
    return 0;
}

/* Event memory failures only lose events (the consumer heals on resync); they are counted
 * by the caller through has_events/ stats, never crash the engine. */
static void ev_stored(kvr_engine *e, uint32_t b)
{
    const blk *k = &e->blks[b];
    uint32_t B = e->cfg.block_size;
    /* a block whose parent is the last block of the previous (untaken) BlockStored extends it:
     * same meaning, fewer events */
    ev_rec *r = e->n_evs > e->ev_cursor ? &e->evs[e->n_evs - 1] : NULL;
    bool chain = r && r->type == KVR_KV_STORED && r->n_h > 0 && k->has_parent &&
                 r->lora == k->lora && e->ev_hashes[r->h_off + r->n_h - 1] == k->parent_ext &&
                 r->n_t + B <= KVR_ENGINE_EVENT_MAX_TOKENS;
    if (!chain) {
        if (ev_new(e, KVR_KV_STORED, &r))
            return;
        r->has_parent = k->has_parent;
        r->parent = k->parent_ext;
        r->lora = k->lora;
    }
    if (ev_push_hash(e, k->ext))
        return;
    if (grow((void **)&e->ev_tokens, &e->cap_ev_tokens, e->n_ev_tokens + B, sizeof(uint32_t))) {
        e->n_ev_hashes--;
        return;
    }
    memcpy(e->ev_tokens + e->n_ev_tokens, e->blk_tokens + (size_t)b * B, B * sizeof(uint32_t));
    e->n_ev_tokens += B;
    r->n_h++;
    r->n_t += B;
}

static void ev_removed(kvr_engine *e, uint64_t ext)
{
    ev_rec *r = e->n_evs > e->ev_cursor ? &e->evs[e->n_evs - 1] : NULL;
    if (!r || r->type != KVR_KV_REMOVED) {
        if (ev_new(e, KVR_KV_REMOVED, &r))
            return;
    }
    if (ev_push_hash(e, ext))
        return;
    r->n_h++;
}

static void ev_reset_if_drained(kvr_engine *e)
{
    if (e->ev_cursor == e->n_evs) {
        e->n_evs = e->ev_cursor = 0;
        e->n_ev_hashes = e->n_ev_tokens = 0;
    }
}

bool kvr_engine_has_events(const kvr_engine *e)
{
    return e->ev_cursor < e->n_evs;
}

size_t kvr_engine_take_events(kvr_engine *e, uint32_t max_tokens, kvr_kv_batch *out)
{
    memset(out, 0, sizeof *out);
    out->ts = (double)e->now_ns / 1e9;
    size_t first = e->ev_cursor, last = first;
    uint64_t toks = 0;
    while (last < e->n_evs) {
        if (last > first && toks + e->evs[last].n_t > max_tokens)
            break;
        toks += e->evs[last].n_t;
        last++;
    }
    size_t n = last - first;
    if (n == 0)
        return 0;
    if (grow((void **)&e->ev_view, &e->cap_ev_view, n, sizeof(kvr_kv_event)))
        return 0;
    for (size_t i = 0; i < n; i++) {
        const ev_rec *r = &e->evs[first + i];
        kvr_kv_event *v = &e->ev_view[i];
        memset(v, 0, sizeof *v);
        v->type = r->type;
        v->n_hashes = r->n_h;
        v->hashes = e->ev_hashes + r->h_off;
        if (r->type == KVR_KV_STORED) {
            v->has_parent = r->has_parent;
            v->parent = r->parent;
            v->n_tokens = r->n_t;
            v->tokens = e->ev_tokens + r->t_off;
            v->block_size = e->cfg.block_size;
            if (r->lora)
                v->lora_name = kvr_slice_of(e->cfg.loras[r->lora - 1]);
        }
    }
    e->ev_cursor = last;
    out->n_events = (uint32_t)n;
    out->events = e->ev_view;
    return n;
}

static int cmp_pos(const void *a, const void *b, void *arg)
{
    const kvr_engine *e = arg;
    uint32_t pa = e->blks[*(const uint32_t *)a].pos, pb = e->blks[*(const uint32_t *)b].pos;
    return pa < pb ? -1 : pa > pb;
}

int kvr_engine_queue_resync(kvr_engine *e)
{
    e->n_evs = e->ev_cursor = 0;
    e->n_ev_hashes = e->n_ev_tokens = 0;
    ev_rec *r;
    if (ev_new(e, KVR_KV_CLEARED, &r))
        return KVR_ENOMEM;
    uint32_t *ids = malloc(sizeof(uint32_t) * (e->n_hashed ? e->n_hashed : 1));
    if (!ids)
        return KVR_ENOMEM;
    uint32_t n = 0;
    for (uint32_t b = 0; b < e->cfg.capacity_blocks; b++)
        if (e->blks[b].hashed)
            ids[n++] = b;
    qsort_r(ids, n, sizeof *ids, cmp_pos, e);
    for (uint32_t i = 0; i < n; i++)
        ev_stored(e, ids[i]);
    free(ids);
    return 0;
}

/* ---------------------------------------------------------------- hashing */

/* Under an adapter the ext hashes use their own seed: its blocks are never a base-model hit. */
static uint64_t ext_hash(kvr_engine *e, uint8_t lora, bool has_parent, uint64_t parent,
                         const uint32_t *toks)
{
    uint32_t B = e->cfg.block_size;
    uint8_t *p = e->hash_scratch;
    size_t off = 0;
    if (has_parent) {
        for (int i = 0; i < 8; i++)
            p[i] = (uint8_t)(parent >> (8 * i));
        off = 8;
    }
    for (uint32_t i = 0; i < B; i++) {
        uint32_t t = toks[i];
        p[off++] = (uint8_t)t;
        p[off++] = (uint8_t)(t >> 8);
        p[off++] = (uint8_t)(t >> 16);
        p[off++] = (uint8_t)(t >> 24);
    }
    return XXH3_64bits_withSeed(p, off, e->ext_seed[lora]);
}

/* ---------------------------------------------------------------- output tokens */

static const char *const WORDS[] = {
    "the",   "a",     "of",    "cache", "block", "router", "token", "model", "prefix", "engine",
    "fast",  "queue", "write", "read",  "node",  "loop",   "event", "state", "page",   "batch",
    "time",  "hash",  "tree",  "raft",  "leader","vote",   "log",   "step",  "key",    "value",
    "data",  "world", "light", "river", "stone", "green",  "blue",  "quiet", "simple", "small",
    "large", "open",  "close", "start", "end",   "and",    "or",    "with",  "from",   "into",
};
#define N_WORDS (sizeof WORDS / sizeof WORDS[0])

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t gen_seed(uint64_t seed, const uint32_t *prompt, uint32_t n)
{
    return XXH3_64bits_withSeed(prompt, (size_t)n * sizeof(uint32_t), seed);
}

static uint32_t gen_next(uint64_t *rng, const char **word)
{
    if (*word && **word) {
        uint32_t t = (uint8_t) * *word;
        (*word)++;
        return t;
    }
    if (*word) { /* word done: a space */
        *word = NULL;
        return ' ';
    }
    *word = WORDS[splitmix(rng) % N_WORDS];
    uint32_t t = (uint8_t) * *word;
    (*word)++;
    return t;
}

void kvr_engine_gen_tokens(uint64_t seed, const uint32_t *prompt, uint32_t n_prompt, uint32_t *out,
                           uint32_t n)
{
    uint64_t rng = gen_seed(seed, prompt, n_prompt);
    const char *w = NULL;
    for (uint32_t i = 0; i < n; i++)
        out[i] = gen_next(&rng, &w);
}

/* ---------------------------------------------------------------- lifecycle */

int kvr_engine_new(const kvr_engine_config *cfg, kvr_engine **out, kvr_err *err)
{
    *out = NULL;
    if (cfg->block_size < 1 || cfg->block_size > KVR_ENGINE_MAX_BLOCK_SIZE)
        return kvr_err_set(err, KVR_EINVAL, "block size %u not in 1..%u", cfg->block_size,
                           KVR_ENGINE_MAX_BLOCK_SIZE);
    if (cfg->capacity_blocks < 1 || cfg->capacity_blocks > (1u << 24))
        return kvr_err_set(err, KVR_EINVAL, "capacity %u blocks not in 1..%u",
                           cfg->capacity_blocks, 1u << 24);
    if ((uint64_t)cfg->capacity_blocks * cfg->block_size > (1ull << 30))
        return kvr_err_set(err, KVR_ELIMIT, "capacity %u x block size %u is over 2^30 tokens",
                           cfg->capacity_blocks, cfg->block_size);
    if (cfg->max_num_seqs < 1 || cfg->max_batched_tokens < 1 || cfg->max_model_len < 1)
        return kvr_err_set(err, KVR_EINVAL, "max-num-seqs, max-batched-tokens, max-model-len must be >= 1");
    if (!(cfg->speedup > 0) || cfg->speedup > 1e6)
        return kvr_err_set(err, KVR_EINVAL, "speedup %g not in (0, 1e6]", cfg->speedup);
    if (cfg->n_loras > KVR_ENGINE_MAX_LORAS || (cfg->n_loras && !cfg->loras))
        return kvr_err_set(err, KVR_EINVAL, "at most %u LoRA adapters", KVR_ENGINE_MAX_LORAS);
    for (uint32_t i = 0; i < cfg->n_loras; i++) {
        size_t len = cfg->loras[i] ? strlen(cfg->loras[i]) : 0;
        if (len == 0 || len > KVR_LORA_NAME_MAX)
            return kvr_err_set(err, KVR_EINVAL, "LoRA name must be 1..%d bytes", KVR_LORA_NAME_MAX);
    }
    kvr_engine *e = calloc(1, sizeof *e);
    if (!e)
        return kvr_err_set(err, KVR_ENOMEM, "engine");
    e->cfg = *cfg;
    e->seq_seed[0] = KVR_HASH_SEED;
    e->ext_seed[0] = KVR_ENGINE_EXT_SEED;
    for (uint32_t i = 0; i < cfg->n_loras; i++) {
        e->seq_seed[i + 1] = kvr_hash_lora_seed(cfg->loras[i], strlen(cfg->loras[i]));
        e->ext_seed[i + 1] = KVR_ENGINE_EXT_SEED + (e->seq_seed[i + 1] - KVR_HASH_SEED);
    }
    uint32_t C = cfg->capacity_blocks;
    uint32_t tsize = 16;
    while (tsize < 2 * C)
        tsize *= 2;
    e->blks = calloc(C, sizeof(blk));
    e->blk_tokens = malloc((size_t)C * cfg->block_size * sizeof(uint32_t));
    e->table = malloc((size_t)tsize * sizeof(uint32_t));
    e->hash_scratch = malloc(8 + 4 * (size_t)cfg->block_size);
    if (!e->blks || !e->blk_tokens || !e->table || !e->hash_scratch) {
        kvr_engine_free(e);
        return kvr_err_set(err, KVR_ENOMEM, "engine cache of %u blocks", C);
    }
    memset(e->table, 0xff, (size_t)tsize * sizeof(uint32_t));
    e->table_mask = tsize - 1;
    e->lru_head = e->lru_tail = NIL;
    e->free_head = NIL;
    for (uint32_t b = C; b-- > 0;) {
        e->blks[b].prev = e->blks[b].next = NIL;
        free_push(e, b);
    }
    e->st.capacity_blocks = C;
    *out = e;
    return 0;
}

static void seq_destroy(kvr_engine_seq *s)
{
    free(s->tokens);
    free(s->blocks);
    free(s);
}

static void list_remove(seq_list *l, kvr_engine_seq *s)
{
    if (s->prev)
        s->prev->next = s->next;
    else
        l->head = s->next;
    if (s->next)
        s->next->prev = s->prev;
    else
        l->tail = s->prev;
    s->prev = s->next = NULL;
    l->n--;
}

static void list_push_tail(seq_list *l, kvr_engine_seq *s)
{
    s->prev = l->tail;
    s->next = NULL;
    if (l->tail)
        l->tail->next = s;
    else
        l->head = s;
    l->tail = s;
    l->n++;
}

static void list_push_head(seq_list *l, kvr_engine_seq *s)
{
    s->next = l->head;
    s->prev = NULL;
    if (l->head)
        l->head->prev = s;
    else
        l->tail = s;
    l->head = s;
    l->n++;
}

void kvr_engine_free(kvr_engine *e)
{
    if (!e)
        return;
    kvr_engine_seq *s, *n;
    for (size_t i = 0; i < e->n_outs; i++)
        if (e->outs[i].seq && e->outs[i].seq->finished)
            seq_destroy(e->outs[i].seq);
    for (s = e->running.head; s; s = n) {
        n = s->next;
        seq_destroy(s);
    }
    for (s = e->waiting.head; s; s = n) {
        n = s->next;
        seq_destroy(s);
    }
    free(e->blks);
    free(e->blk_tokens);
    free(e->table);
    free(e->hash_scratch);
    free(e->outs);
    free(e->sched);
    free(e->evs);
    free(e->ev_hashes);
    free(e->ev_tokens);
    free(e->ev_view);
    free(e);
}

bool kvr_engine_has_work(const kvr_engine *e)
{
    return e->running.n + e->waiting.n > 0;
}

int64_t kvr_engine_now_ns(const kvr_engine *e)
{
    return e->now_ns;
}

void kvr_engine_idle_until(kvr_engine *e, int64_t t_ns)
{
    if (!kvr_engine_has_work(e) && t_ns > e->now_ns)
        e->now_ns = t_ns;
}

static uint32_t blocks_for(const kvr_engine *e, uint64_t tokens)
{
    return (uint32_t)((tokens + e->cfg.block_size - 1) / e->cfg.block_size);
}

int kvr_engine_add(kvr_engine *e, const uint32_t *prompt, uint32_t n_prompt, uint32_t max_tokens,
                   void *data, kvr_engine_seq **out, kvr_err *err)
{
    return kvr_engine_add_lora(e, prompt, n_prompt, max_tokens, 0, data, out, err);
}

int kvr_engine_add_lora(kvr_engine *e, const uint32_t *prompt, uint32_t n_prompt,
                        uint32_t max_tokens, uint32_t lora, void *data, kvr_engine_seq **out,
                        kvr_err *err)
{
    *out = NULL;
    if (lora > e->cfg.n_loras)
        return kvr_err_set(err, KVR_EINVAL, "unknown LoRA adapter %u", lora);
    if (n_prompt == 0)
        return kvr_err_set(err, KVR_EINVAL, "empty prompt");
    if (max_tokens == 0)
        return kvr_err_set(err, KVR_EINVAL, "max_tokens must be >= 1");
    uint64_t total = (uint64_t)n_prompt + max_tokens;
    if (total > e->cfg.max_model_len)
        return kvr_err_set(err, KVR_ELIMIT,
                           "prompt (%u tokens) + max_tokens (%u) is over max-model-len %u",
                           n_prompt, max_tokens, e->cfg.max_model_len);
    if (blocks_for(e, total) > e->cfg.capacity_blocks)
        return kvr_err_set(err, KVR_ELIMIT, "request needs %u blocks, the cache has %u",
                           blocks_for(e, total), e->cfg.capacity_blocks);
    kvr_engine_seq *s = calloc(1, sizeof *s);
    if (!s)
        return kvr_err_set(err, KVR_ENOMEM, "sequence");
    s->cap_tokens = (uint32_t)total;
    s->tokens = malloc((size_t)s->cap_tokens * sizeof(uint32_t));
    s->cap_blocks = blocks_for(e, total);
    s->blocks = malloc((size_t)s->cap_blocks * sizeof(uint32_t));
    if (!s->tokens || !s->blocks) {
        seq_destroy(s);
        return kvr_err_set(err, KVR_ENOMEM, "sequence of %" PRIu64 " tokens", total);
    }
    memcpy(s->tokens, prompt, (size_t)n_prompt * sizeof(uint32_t));
    s->n_tokens = s->n_prompt = n_prompt;
    s->max_tokens = max_tokens;
    s->data = data;
    s->lora = (uint8_t)lora;
    s->rng = gen_seed(e->cfg.seed, prompt, n_prompt);
    s->state = S_WAITING;
    list_push_tail(&e->waiting, s);
    e->st.requests_total++;
    *out = s;
    return 0;
}

/* Releases a sequence's blocks last-to-first: the tail of a prefix lands in the LRU list
 * before its head, so it is evicted first. */
static void seq_release_blocks(kvr_engine *e, kvr_engine_seq *s)
{
    for (uint32_t i = s->n_blocks; i-- > 0;) {
        uint32_t b = s->blocks[i];
        blk *k = &e->blks[b];
        if (--k->ref == 0) {
            e->n_used--;
            if (k->hashed)
                lru_push_tail(e, b);
            else
                free_push(e, b);
        }
    }
    s->n_blocks = 0;
    s->n_hashed = 0;
    s->n_computed = 0;
}

void kvr_engine_cancel(kvr_engine *e, kvr_engine_seq *s)
{
    if (s->finished)
        return; /* already out of the engine; destroyed at the next step */
    seq_release_blocks(e, s);
    list_remove(s->state == S_RUNNING ? &e->running : &e->waiting, s);
    /* a cancelled sequence's outputs of the current step must not dangle */
    for (size_t i = 0; i < e->n_outs; i++)
        if (e->outs[i].seq == s)
            e->outs[i].seq = NULL;
    e->st.cancelled_total++;
    seq_destroy(s);
}

/* ---------------------------------------------------------------- blocks for sequences */

static uint32_t take_block(kvr_engine *e)
{
    uint32_t b;
    if (e->free_head != NIL) {
        b = e->free_head;
        e->free_head = e->blks[b].next;
        e->n_free--;
    } else {
        b = e->lru_head; /* caller checked availability */
        lru_unlink(e, b);
        table_remove(e, b);
        e->n_hashed--;
        e->st.removed_blocks_total++;
        ev_removed(e, e->blks[b].ext);
    }
    blk *k = &e->blks[b];
    memset(k, 0, sizeof *k);
    k->prev = k->next = NIL;
    k->ref = 1;
    e->n_used++;
    return b;
}

static void ref_block(kvr_engine *e, uint32_t b)
{
    blk *k = &e->blks[b];
    if (k->ref++ == 0) {
        if (k->in_lru)
            lru_unlink(e, b);
        e->n_used++;
    }
}

/* Ensures s has blocks for `tokens` computed tokens; all or nothing. */
static bool ensure_blocks(kvr_engine *e, kvr_engine_seq *s, uint32_t tokens)
{
    uint32_t want = blocks_for(e, tokens);
    if (want <= s->n_blocks)
        return true;
    uint32_t need = want - s->n_blocks;
    if (need > e->n_free + e->n_lru)
        return false;
    while (s->n_blocks < want)
        s->blocks[s->n_blocks++] = take_block(e);
    return true;
}

/* Admission: take references on the longest cached prefix of s (at most n_tokens - 1). */
static void take_prefix(kvr_engine *e, kvr_engine_seq *s)
{
    uint32_t B = e->cfg.block_size;
    uint32_t max_hits = (s->n_tokens - 1) / B;
    bool has_parent = false;
    uint64_t parent = 0;
    uint32_t hits = 0;
    while (hits < max_hits) {
        uint64_t h = ext_hash(e, s->lora, has_parent, parent, s->tokens + (size_t)hits * B);
        uint32_t b = table_find(e, h);
        if (b == NIL)
            break;
        ref_block(e, b);
        s->blocks[hits] = b;
        hits++;
        has_parent = true;
        parent = h;
    }
    s->n_blocks = s->n_hashed = hits;
    s->n_computed = hits * B;
}

/* Block b (referenced, not hashed) becomes the cached block at chain position pos holding
 * toks, ext hash h: its seq hash chained from parent_seq, indexed, announced (BlockStored). */
static void seal_block(kvr_engine *e, uint32_t b, const uint32_t *toks, uint32_t pos, uint8_t lora,
                       bool has_parent, uint64_t parent, uint64_t parent_seq, uint64_t h)
{
    uint32_t B = e->cfg.block_size;
    blk *k = &e->blks[b];
    memcpy(e->blk_tokens + (size_t)b * B, toks, B * sizeof(uint32_t));
    k->ext = h;
    uint64_t local = kvr_hash_block_seeded(toks, B, e->seq_seed[lora]);
    k->seq = has_parent ? kvr_hash_chain(parent_seq, local) : local;
    k->has_parent = has_parent;
    k->parent_ext = parent;
    k->pos = pos;
    k->lora = lora;
    k->hashed = 1;
    table_insert(e, b);
    e->n_hashed++;
    e->st.stored_blocks_total++;
    ev_stored(e, b);
}

/* Hashes the blocks that the computed tokens filled; a block equal to one already cached
 * (computed concurrently by another sequence) is dropped in favour of the cached one. */
static void seal_full_blocks(kvr_engine *e, kvr_engine_seq *s)
{
    uint32_t B = e->cfg.block_size;
    uint32_t full = s->n_computed / B;
    while (s->n_hashed < full) {
        uint32_t i = s->n_hashed;
        const uint32_t *toks = s->tokens + (size_t)i * B;
        bool has_parent = i > 0;
        uint64_t parent = has_parent ? e->blks[s->blocks[i - 1]].ext : 0;
        uint64_t parent_seq = has_parent ? e->blks[s->blocks[i - 1]].seq : 0;
        uint64_t h = ext_hash(e, s->lora, has_parent, parent, toks);
        uint32_t dup = table_find(e, h);
        if (dup != NIL) {
            uint32_t mine = s->blocks[i];
            ref_block(e, dup);
            s->blocks[i] = dup;
            blk *m = &e->blks[mine];
            if (--m->ref == 0) {
                e->n_used--;
                free_push(e, mine);
            }
        } else {
            seal_block(e, s->blocks[i], toks, i, s->lora, has_parent, parent, parent_seq, h);
        }
        s->n_hashed++;
    }
}

static void preempt(kvr_engine *e, kvr_engine_seq *s)
{
    seq_release_blocks(e, s);
    list_remove(&e->running, s);
    s->state = S_WAITING;
    list_push_head(&e->waiting, s);
    e->st.preemptions++;
}

/* ---------------------------------------------------------------- step */

int64_t kvr_engine_step_time_ns(const kvr_engine *e, uint32_t prefill_tokens, uint32_t decode_seqs,
                                double u)
{
    double ms = 0;
    if (prefill_tokens > 0) {
        double T = prefill_tokens;
        ms += 4.21e-7 * T * T + 0.01518 * T + 16.5;
    }
    if (decode_seqs > 0)
        ms += -5.47 * u * u + 43.88 * u + 19.44;
    return (int64_t)(ms * 1e6 / e->cfg.speedup + 0.5);
}

static int push_out(kvr_engine *e, kvr_engine_seq *s, uint32_t tok)
{
    if (grow((void **)&e->outs, &e->cap_outs, e->n_outs + 1, sizeof(kvr_engine_output)))
        return KVR_ENOMEM;
    kvr_engine_output *o = &e->outs[e->n_outs++];
    o->seq = s;
    o->data = s->data;
    o->token = tok;
    o->index = s->n_gen - 1;
    o->finished = s->finished;
    o->prompt_tokens = s->n_prompt;
    o->cached_tokens = s->cached_tokens;
    return 0;
}

static int sched_push(kvr_engine *e, kvr_engine_seq *s, uint32_t n)
{
    if (grow((void **)&e->sched, &e->cap_sched, e->n_sched + 1, sizeof(*e->sched)))
        return KVR_ENOMEM;
    s->sched_tokens = n;
    e->sched[e->n_sched++] = s;
    return 0;
}

int kvr_engine_step(kvr_engine *e, kvr_engine_step_info *info, const kvr_engine_output **outs,
                    size_t *n_outs)
{
    kvr_engine_step_info inf = {.start_ns = e->now_ns};
    /* finished sequences of the previous step are destroyed lazily, here */
    for (size_t i = 0; i < e->n_outs; i++) {
        kvr_engine_seq *s = e->outs[i].seq;
        if (s && s->finished)
            seq_destroy(s);
    }
    e->n_outs = 0;
    e->n_sched = 0;
    ev_reset_if_drained(e);
    if (outs)
        *outs = e->outs;
    if (n_outs)
        *n_outs = 0;
    if (!kvr_engine_has_work(e)) {
        if (info)
            *info = inf;
        return 0;
    }
    int rc = 0;
    uint32_t budget = e->cfg.max_batched_tokens;
    bool preempted = false;
    for (kvr_engine_seq *s = e->running.head; s && budget > 0;) {
        kvr_engine_seq *next = s->next;
        uint32_t need = s->n_tokens - s->n_computed;
        uint32_t n = need < budget ? need : budget;
        while (!ensure_blocks(e, s, s->n_computed + n)) {
            kvr_engine_seq *victim = e->running.tail;
            preempt(e, victim);
            inf.preempted++;
            preempted = true;
            if (victim == s)
                break;
        }
        if (s->state != S_RUNNING)
            break;
        next = s->next; /* the tail may have been preempted */
        if ((rc = sched_push(e, s, n)))
            goto out;
        budget -= n;
        s = next;
    }
    while (!preempted && budget > 0 && e->waiting.head && e->running.n < e->cfg.max_num_seqs) {
        kvr_engine_seq *s = e->waiting.head;
        take_prefix(e, s);
        uint32_t need = s->n_tokens - s->n_computed;
        uint32_t n = need < budget ? need : budget;
        if (!ensure_blocks(e, s, s->n_computed + n)) {
            seq_release_blocks(e, s);
            break;
        }
        if (!s->admitted_once) {
            s->admitted_once = true;
            s->cached_tokens = s->n_computed;
            e->st.prompt_tokens_total += s->n_prompt;
            e->st.cached_tokens_total += s->cached_tokens;
        }
        list_remove(&e->waiting, s);
        s->state = S_RUNNING;
        list_push_tail(&e->running, s);
        if ((rc = sched_push(e, s, n)))
            goto out;
        budget -= n;
    }
    inf.kv_util = (double)e->n_used / e->cfg.capacity_blocks;
    /* execute */
    for (size_t i = 0; i < e->n_sched; i++) {
        kvr_engine_seq *s = e->sched[i];
        uint32_t n = s->sched_tokens;
        bool decode = n == 1 && s->n_gen > 0 && s->n_computed + 1 == s->n_tokens;
        if (decode)
            inf.decode_seqs++;
        else
            inf.prefill_tokens += n;
        s->n_computed += n;
        seal_full_blocks(e, s);
        if (s->n_computed == s->n_tokens) {
            uint32_t tok = gen_next(&s->rng, &s->word);
            s->tokens[s->n_tokens++] = tok;
            s->n_gen++;
            e->st.generated_tokens_total++;
            if (s->n_gen >= s->max_tokens) {
                s->finished = true;
                seq_release_blocks(e, s);
                list_remove(&e->running, s);
                e->st.finished_total++;
            }
            if ((rc = push_out(e, s, tok)))
                goto out;
        }
    }
    inf.scheduled_seqs = (uint32_t)e->n_sched;
    inf.dur_ns = kvr_engine_step_time_ns(e, inf.prefill_tokens, inf.decode_seqs, inf.kv_util);
    e->now_ns += inf.dur_ns;
    e->st.steps++;
    e->st.prefill_tokens_total += inf.prefill_tokens;
    if (inf.decode_seqs > 0) {
        e->st.decode_steps++;
        if (inf.prefill_tokens > 0)
            e->st.mixed_steps++;
    }
out:
    if (info)
        *info = inf;
    if (outs)
        *outs = e->outs;
    if (n_outs)
        *n_outs = e->n_outs;
    return rc;
}

void kvr_engine_get_stats(const kvr_engine *e, kvr_engine_stats *st)
{
    *st = e->st;
    st->running = e->running.n;
    st->waiting = e->waiting.n;
    st->used_blocks = e->n_used;
    st->cached_blocks = e->n_hashed;
    st->free_blocks = e->n_free + e->n_lru;
    st->capacity_blocks = e->cfg.capacity_blocks;
}

void kvr_engine_foreach_cached(const kvr_engine *e, kvr_engine_block_fn fn, void *arg)
{
    for (uint32_t b = 0; b < e->cfg.capacity_blocks; b++) {
        const blk *k = &e->blks[b];
        if (k->hashed)
            fn(arg, k->ext, k->seq, k->has_parent, k->parent_ext, k->ref);
    }
}

/* ---------------------------------------------------------------- disaggregation */

void kvr_engine_prompt_ext(kvr_engine *e, const uint32_t *prompt, uint32_t n_prompt, uint32_t lora,
                           uint32_t n_blocks, uint64_t *ext)
{
    uint32_t B = e->cfg.block_size;
    if (lora > e->cfg.n_loras)
        lora = 0;
    if (n_blocks > n_prompt / B)
        n_blocks = n_prompt / B;
    for (uint32_t i = 0; i < n_blocks; i++)
        ext[i] = ext_hash(e, (uint8_t)lora, i > 0, i > 0 ? ext[i - 1] : 0,
                          prompt + (size_t)i * B);
}

uint32_t kvr_engine_cached_blocks(kvr_engine *e, const uint32_t *prompt, uint32_t n_prompt,
                                  uint32_t lora)
{
    uint32_t B = e->cfg.block_size, n = 0;
    if (lora > e->cfg.n_loras)
        return 0;
    uint64_t parent = 0;
    for (; n < n_prompt / B; n++) {
        uint64_t h = ext_hash(e, (uint8_t)lora, n > 0, parent, prompt + (size_t)n * B);
        if (table_find(e, h) == NIL)
            break;
        parent = h;
    }
    return n;
}

uint32_t kvr_engine_hold_prompt(kvr_engine *e, const uint32_t *prompt, uint32_t n_prompt,
                                uint32_t lora, uint32_t max_blocks, bool create, uint32_t *blocks)
{
    uint32_t B = e->cfg.block_size, n = 0;
    if (lora > e->cfg.n_loras)
        return 0;
    uint64_t parent = 0, parent_seq = 0;
    while (n < max_blocks && n < n_prompt / B) {
        const uint32_t *toks = prompt + (size_t)n * B;
        uint64_t h = ext_hash(e, (uint8_t)lora, n > 0, parent, toks);
        uint32_t b = table_find(e, h);
        if (b != NIL) {
            ref_block(e, b);
        } else {
            /* the blocks held so far are referenced: an eviction here never takes one */
            if (!create || e->n_free + e->n_lru == 0)
                break;
            b = take_block(e);
            seal_block(e, b, toks, n, (uint8_t)lora, n > 0, parent, parent_seq, h);
        }
        blocks[n++] = b;
        parent = h;
        parent_seq = e->blks[b].seq;
    }
    return n;
}

void kvr_engine_unhold(kvr_engine *e, const uint32_t *blocks, uint32_t n)
{
    for (uint32_t i = n; i-- > 0;) {
        uint32_t b = blocks[i];
        blk *k = &e->blks[b];
        if (k->ref == 0)
            continue; /* not held: a caller bug, never a double free */
        if (--k->ref == 0) {
            e->n_used--;
            if (k->hashed)
                lru_push_tail(e, b);
            else
                free_push(e, b);
        }
    }
}

uint64_t kvr_engine_block_ext(const kvr_engine *e, uint32_t b)
{
    return b < e->cfg.capacity_blocks ? e->blks[b].ext : 0;
}
