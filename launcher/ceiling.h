/* ceiling: the prefix hit rate a pooled cache could reach on a trace slice (issue 14).
 *
 * Replays the slice's prompts in arrival order against ONE cache of `capacity_blocks` blocks
 * (the workers' total: what a perfect router over a perfectly shared cache could use), or an
 * infinite one (capacity 0), and counts cached prompt tokens the way kvr-worker (and vLLM)
 * does: the longest prefix of full blocks already cached, at most (n - 1) / block_size blocks.
 * After each prompt its full blocks are the most recently used, the last block first to go
 * (vLLM frees a sequence's blocks tail first). Blocks are cached the moment a request
 * arrives and output blocks take no room, so this is an upper bound: a real pool of N workers
 * that computes prompts over time and stores outputs cannot beat it.
 *
 * Pure computation on the caller's thread; allocates only inside kvr_ceiling_run. */
#ifndef KVR_CEILING_H
#define KVR_CEILING_H

#include "kvr_err.h"
#include "trace.h"

#include <stddef.h>
#include <stdint.h>

typedef struct kvr_ceiling_cfg {
    uint32_t block_size;       /* the workers' KV block size in tokens (> 0) */
    uint64_t capacity_blocks;  /* the pooled cache; 0 = infinite */
    uint32_t trace_block_size; /* as the replay builds prompts (0 = 512) */
    size_t max_input;          /* prompt tokens cap, as the replay (0 = 1 Mi) */
} kvr_ceiling_cfg;

typedef struct kvr_ceiling_result {
    double prompt_tokens, cached_tokens;
    double hit_rate; /* cached / prompt; 0 when no prompt tokens */
    uint64_t evictions;
} kvr_ceiling_result;

/* Runs requests tr->reqs[0..n) (the slice, in trace order). Returns 0, KVR_EINVAL (bad cfg)
 * or KVR_ENOMEM. */
int kvr_ceiling_run(const kvr_trace *tr, size_t n, const kvr_ceiling_cfg *cfg,
                    kvr_ceiling_result *out, kvr_err *err);

#endif
