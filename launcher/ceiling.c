#include "ceiling.h"

#include "kvr_hash.h"

#include <stdlib.h>
#include <string.h>

#define NIL UINT32_MAX
#define CEIL_MAX_PROMPT (1u << 20)

/* One cached block: an LRU list node and a hash chain link. */
typedef struct node {
    uint64_t key; /* seq hash */
    uint32_t prev, next, hnext;
} node;

typedef struct cache {
    node *nodes;
    uint32_t n_nodes, cap_nodes; /* cap_nodes: the slots allocated */
    uint32_t *buckets, mask;
    uint32_t head, tail; /* head = most recently used */
    uint32_t free_list;
    uint64_t capacity; /* 0 = infinite */
    uint64_t used, evictions;
} cache;

static uint32_t bucket_of(const cache *c, uint64_t key)
{
    return (uint32_t)(kvr_mix64(key) & c->mask);
}

static uint32_t find(const cache *c, uint64_t key)
{
    for (uint32_t i = c->buckets[bucket_of(c, key)]; i != NIL; i = c->nodes[i].hnext)
        if (c->nodes[i].key == key)
            return i;
    return NIL;
}

static void lru_unlink(cache *c, uint32_t i)
{
    node *n = &c->nodes[i];
    if (n->prev != NIL)
        c->nodes[n->prev].next = n->next;
    else
        c->head = n->next;
    if (n->next != NIL)
        c->nodes[n->next].prev = n->prev;
    else
        c->tail = n->prev;
}

static void lru_push_head(cache *c, uint32_t i)
{
    node *n = &c->nodes[i];
    n->prev = NIL;
    n->next = c->head;
    if (c->head != NIL)
        c->nodes[c->head].prev = i;
    c->head = i;
    if (c->tail == NIL)
        c->tail = i;
}

static void evict_tail(cache *c)
{
    uint32_t i = c->tail;
    lru_unlink(c, i);
    uint32_t *pp = &c->buckets[bucket_of(c, c->nodes[i].key)];
    while (*pp != i)
        pp = &c->nodes[*pp].hnext;
    *pp = c->nodes[i].hnext;
    c->nodes[i].hnext = c->free_list;
    c->free_list = i;
    c->used--;
    c->evictions++;
}

static void lru_insert_after(cache *c, uint32_t i, uint32_t after)
{
    if (after == NIL) {
        lru_push_head(c, i);
        return;
    }
    node *n = &c->nodes[i], *a = &c->nodes[after];
    n->prev = after;
    n->next = a->next;
    if (a->next != NIL)
        c->nodes[a->next].prev = i;
    else
        c->tail = i;
    a->next = i;
}

/* Puts key right after `after` in recency (at the head when NIL), inserting it when absent.
 * Returns its node, or NIL when the cache holds nothing but the blocks up to `after`. */
static uint32_t place(cache *c, uint64_t key, uint32_t after)
{
    uint32_t i = find(c, key);
    if (i != NIL) {
        if (i == after)
            return i;
        lru_unlink(c, i);
        lru_insert_after(c, i, after);
        return i;
    }
    if (c->capacity && c->used >= c->capacity) {
        if (c->tail == after)
            return NIL; /* the prompt alone fills the cache */
        evict_tail(c);
    }
    if (c->free_list != NIL) {
        i = c->free_list;
        c->free_list = c->nodes[i].hnext;
    } else {
        i = c->n_nodes++; /* sized up front: never past cap_nodes */
    }
    c->nodes[i].key = key;
    uint32_t b = bucket_of(c, key);
    c->nodes[i].hnext = c->buckets[b];
    c->buckets[b] = i;
    lru_insert_after(c, i, after);
    c->used++;
    return i;
}

int kvr_ceiling_run(const kvr_trace *tr, size_t n, const kvr_ceiling_cfg *cfg,
                    kvr_ceiling_result *out, kvr_err *err)
{
    memset(out, 0, sizeof *out);
    if (!cfg->block_size || n > tr->n)
        return kvr_err_set(err, KVR_EINVAL, "ceiling: block size 0 or slice past the trace");
    size_t maxin = cfg->max_input && cfg->max_input < CEIL_MAX_PROMPT ? cfg->max_input
                                                                       : CEIL_MAX_PROMPT;
    /* Distinct blocks are at most the slice's full blocks: size everything once. */
    uint64_t total = 0;
    for (size_t r = 0; r < n; r++) {
        uint64_t len = tr->reqs[r].input_length < maxin ? tr->reqs[r].input_length : maxin;
        total += len / cfg->block_size;
    }
    uint64_t slots = cfg->capacity_blocks && cfg->capacity_blocks < total ? cfg->capacity_blocks
                                                                         : total;
    if (slots >= NIL / 2)
        return kvr_err_set(err, KVR_EINVAL, "ceiling: %llu blocks is too many",
                           (unsigned long long)slots);
    cache c = {.head = NIL, .tail = NIL, .free_list = NIL, .capacity = cfg->capacity_blocks};
    c.cap_nodes = (uint32_t)slots + 1;
    uint32_t nb = 16;
    while (nb < 2 * c.cap_nodes)
        nb <<= 1;
    c.mask = nb - 1;
    c.nodes = malloc((size_t)c.cap_nodes * sizeof *c.nodes);
    c.buckets = malloc((size_t)nb * sizeof *c.buckets);
    uint32_t *toks = malloc(maxin * sizeof *toks);
    uint64_t *seq = malloc((maxin / cfg->block_size + 1) * sizeof *seq);
    int rc = 0;
    if (!c.nodes || !c.buckets || !toks || !seq) {
        rc = kvr_err_set(err, KVR_ENOMEM, "ceiling: %llu blocks", (unsigned long long)slots);
        goto out;
    }
    memset(c.buckets, 0xff, (size_t)nb * sizeof *c.buckets);
    for (size_t r = 0; r < n; r++) {
        size_t nt = kvr_trace_prompt(&tr->reqs[r], r, cfg->trace_block_size, toks, maxin);
        size_t nbk = kvr_hash_seq(toks, nt, cfg->block_size, false, 0, seq, nt / cfg->block_size);
        size_t max_hits = nt ? (nt - 1) / cfg->block_size : 0;
        size_t hits = 0;
        while (hits < max_hits && hits < nbk && find(&c, seq[hits]) != NIL)
            hits++;
        out->prompt_tokens += (double)nt;
        out->cached_tokens += (double)(hits * cfg->block_size);
        /* The prompt's blocks become the most recent, in prompt order, so its tail is the
         * first of them to go; the cached prefix is placed first so that making room for
         * the new blocks never evicts it. */
        uint32_t after = NIL;
        for (size_t k = 0; k < nbk; k++)
            if ((after = place(&c, seq[k], after)) == NIL)
                break;
    }
    out->hit_rate = out->prompt_tokens > 0 ? out->cached_tokens / out->prompt_tokens : 0;
    out->evictions = c.evictions;
out:
    free(c.nodes);
    free(c.buckets);
    free(toks);
    free(seq);
    return rc;
}
