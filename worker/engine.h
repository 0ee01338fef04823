/* engine: the simulated inference engine behind kvr-worker — a paged KV cache with prefix
 * reuse and LRU eviction, and a continuous-batching scheduler, on a simulated clock.
 *
 * Pure module: no I/O, no wall clock, no threads. The caller (worker/main.c, or a unit test)
 * adds requests, calls kvr_engine_step() and reads the outputs and KV events each step made.
 *
 * Model (after vLLM v1 and NVIDIA Dynamo's mocker):
 * - The cache has capacity_blocks blocks of block_size tokens. A block becomes cached (hashed,
 *   shareable, announced by a BlockStored event) when it is full, whether its tokens came from
 *   the prompt or from generation. Blocks carry a reference count; a cached block whose count
 *   drops to 0 joins an LRU list and stays reusable by prefix hits until it is evicted (which
 *   announces a BlockRemoved). A sequence frees its blocks last-to-first, so the tail of a
 *   prefix is evicted before its head, as in vLLM.
 * - External (engine-side) block hashes: ext[0] = XXH3_64(tokens of block 0, seed
 *   KVR_ENGINE_EXT_SEED), ext[i] = XXH3_64(LE64(ext[i-1]) || tokens of block i, same seed). They
 *   are deliberately not kvroute's seq hashes (DESIGN 2): the router must map them.
 * - Scheduling per step: running sequences first (decode = 1 token, prefill = a chunk), in
 *   arrival order, under max_batched_tokens; if a running sequence cannot get a block the most
 *   recently admitted running sequence is preempted (its blocks freed, recomputed later). Then,
 *   if nothing was preempted, waiting sequences are admitted while running < max_num_seqs and
 *   budget and blocks remain; admission first takes the longest cached prefix (at most
 *   n_tokens - 1 tokens, so at least one token is computed, as in vLLM).
 * - Step time (ms, then divided by speedup): prefill(T) = 4.21e-7*T^2 + 0.01518*T + 16.5 when
 *   the step computes T > 0 non-decode tokens, plus decode(u) = -5.47*u^2 + 43.88*u + 19.44 when
 *   the step has decoding sequences, where u in [0,1] is the fraction of blocks referenced by
 *   sequences after scheduling (Dynamo mocker's quadratic in KV utilisation).
 * - A sequence whose computed tokens reach its total samples one token in that step. Output
 *   tokens are byte tokens of lowercase words and spaces, a pure function of (seed, prompt),
 *   so a client can predict a stream exactly (kvr_engine_gen_tokens()).
 *
 * Memory: the engine copies prompts; everything it returns (outputs, event batches) borrows
 * engine memory and is valid until the next mutating call (add, cancel, step, take, resync).
 * One thread at a time. */
#ifndef KVR_WORKER_ENGINE_H
#define KVR_WORKER_ENGINE_H

#include "kv_event.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVR_ENGINE_EXT_SEED 0x6b76722d776b7231ull /* "kvr-wkr1" */
#define KVR_ENGINE_MAX_BLOCK_SIZE 4096u
/* A BlockStored event grows by chaining blocks up to this many tokens (then a new event
 * continues the chain), so one event stays well under NATS' default 1 MiB payload. */
#define KVR_ENGINE_EVENT_MAX_TOKENS 16384u
#define KVR_ENGINE_MAX_LORAS 16u

typedef struct kvr_engine_config {
    uint32_t block_size;         /* tokens per block, 1..KVR_ENGINE_MAX_BLOCK_SIZE (64) */
    uint32_t capacity_blocks;    /* 1..(1<<24) (16384) */
    uint32_t max_num_seqs;       /* running sequences per step (256) */
    uint32_t max_batched_tokens; /* tokens per step (8192) */
    uint32_t max_model_len;      /* prompt + max_tokens bound (131072) */
    double speedup;              /* step times are divided by this (1.0) */
    uint64_t seed;               /* output token generator seed */
    /* LoRA adapters served (borrowed names, 1..KVR_LORA_NAME_MAX bytes, alive as long as the
     * engine). A request under adapter i (kvr_engine_add_lora, 1-based) hashes its blocks
     * apart: ext hashes under KVR_ENGINE_EXT_SEED + XXH3_64(name), seq hashes under
     * kvr_hash_lora_seed(name); its BlockStored events carry lora_name. */
    const char *const *loras;
    uint32_t n_loras; /* <= KVR_ENGINE_MAX_LORAS */
} kvr_engine_config;

void kvr_engine_config_default(kvr_engine_config *c);

typedef struct kvr_engine kvr_engine;
typedef struct kvr_engine_seq kvr_engine_seq; /* a request's handle */

int kvr_engine_new(const kvr_engine_config *cfg, kvr_engine **out, kvr_err *err);
void kvr_engine_free(kvr_engine *e);

/* Queues a request at the current simulated time. The prompt is copied. max_tokens >= 1.
 * Fails with KVR_ELIMIT if the request could never fit (n_prompt + max_tokens over
 * max_model_len, or needing more blocks than the whole cache). `data` is returned in outputs.
 * The handle stays valid until an output with finished=true for it, or kvr_engine_cancel(). */
int kvr_engine_add(kvr_engine *e, const uint32_t *prompt, uint32_t n_prompt, uint32_t max_tokens,
                   void *data, kvr_engine_seq **out, kvr_err *err);

/* kvr_engine_add under LoRA adapter `lora` (0: the base model, i: cfg.loras[i-1]). */
int kvr_engine_add_lora(kvr_engine *e, const uint32_t *prompt, uint32_t n_prompt,
                        uint32_t max_tokens, uint32_t lora, void *data, kvr_engine_seq **out,
                        kvr_err *err);

/* Drops a request at once (waiting or running) and releases its KV references. */
void kvr_engine_cancel(kvr_engine *e, kvr_engine_seq *s);

typedef struct kvr_engine_output {
    kvr_engine_seq *seq; /* freed after this step when finished */
    void *data;
    uint32_t token;      /* the new token */
    uint32_t index;      /* 0 for the first generated token */
    bool finished;       /* max_tokens reached ("length") */
    uint32_t prompt_tokens;
    uint32_t cached_tokens; /* prefix-cache hit at first admission */
} kvr_engine_output;

typedef struct kvr_engine_step_info {
    int64_t start_ns, dur_ns;  /* simulated */
    uint32_t prefill_tokens;   /* T, non-decode tokens computed */
    uint32_t decode_seqs;
    uint32_t scheduled_seqs;
    uint32_t preempted;
    double kv_util;            /* u of the decode formula */
} kvr_engine_step_info;

bool kvr_engine_has_work(const kvr_engine *e);
int64_t kvr_engine_now_ns(const kvr_engine *e);
/* Moves an idle engine's clock forward to t (no-op when busy or t is in the past). */
void kvr_engine_idle_until(kvr_engine *e, int64_t t_ns);

/* Runs one step at now, advancing now by its duration. With no work, does nothing (dur 0).
 * Outputs: *outs and *n_outs (may be NULL) list the tokens the step produced. */
int kvr_engine_step(kvr_engine *e, kvr_engine_step_info *info, const kvr_engine_output **outs,
                    size_t *n_outs);

/* The step-time model, in simulated ns (speedup applied). */
int64_t kvr_engine_step_time_ns(const kvr_engine *e, uint32_t prefill_tokens, uint32_t decode_seqs,
                                double kv_util);

/* KV events since the last take, in order, grouped (one BlockStored per sequence chain per
 * step, one BlockRemoved per run of evictions). Returns at most max_tokens token ids' worth of
 * events per call (at least one event); call until it returns 0 events. The batch borrows
 * engine memory. ts is the batch's timestamp (seconds) written by the caller's encoder. */
size_t kvr_engine_take_events(kvr_engine *e, uint32_t max_tokens, kvr_kv_batch *out);
bool kvr_engine_has_events(const kvr_engine *e);
/* Drops pending events and queues AllBlocksCleared followed by BlockStored events for every
 * cached block, parents before children (for a consumer that missed events). */
int kvr_engine_queue_resync(kvr_engine *e);

typedef struct kvr_engine_stats {
    uint32_t running, waiting;
    uint32_t used_blocks;    /* referenced by a sequence */
    uint32_t cached_blocks;  /* hashed (full, shareable), referenced or not */
    uint32_t free_blocks;    /* free list + evictable */
    uint32_t capacity_blocks;
    uint64_t steps, preemptions;
    uint64_t prompt_tokens_total, cached_tokens_total, generated_tokens_total;
    uint64_t stored_blocks_total, removed_blocks_total;
    uint64_t requests_total, finished_total, cancelled_total;
    /* what the steps held: prefill (non-decode) tokens computed, and steps that decoded with
     * and without prefill tokens beside (a mixed step makes every decoder wait for the chunk:
     * the prefill interference disaggregation removes from decode workers) */
    uint64_t prefill_tokens_total, decode_steps, mixed_steps;
} kvr_engine_stats;

void kvr_engine_get_stats(const kvr_engine *e, kvr_engine_stats *st);

/* Calls fn for every cached block: ext hash, kvroute seq hash (DESIGN 2), parent ext hash
 * (has_parent false at the root), reference count. Read-only. */
typedef void (*kvr_engine_block_fn)(void *arg, uint64_t ext, uint64_t seq, bool has_parent,
                                    uint64_t parent_ext, uint32_t refs);
void kvr_engine_foreach_cached(const kvr_engine *e, kvr_engine_block_fn fn, void *arg);

/* The first n generated tokens for a prompt under seed (what the engine will emit). */
void kvr_engine_gen_tokens(uint64_t seed, const uint32_t *prompt, uint32_t n_prompt, uint32_t *out,
                           uint32_t n);

/* ---- Disaggregated prefill/decode (worker/disagg.c, DESIGN 9). Full blocks only: a block is
 * named by its ext hash, which a decoder computes from its own prompt. */

/* The ext hashes of the first n_blocks full blocks of prompt under adapter lora, into ext[]
 * (n_blocks is capped at n_prompt / block_size). */
void kvr_engine_prompt_ext(kvr_engine *e, const uint32_t *prompt, uint32_t n_prompt, uint32_t lora,
                           uint32_t n_blocks, uint64_t *ext);
/* How many leading full blocks of prompt are cached now (no references taken). */
uint32_t kvr_engine_cached_blocks(kvr_engine *e, const uint32_t *prompt, uint32_t n_prompt,
                                  uint32_t lora);
/* Takes a reference on each of the leading full blocks of prompt, at most max_blocks, and
 * writes their block indices to blocks[] (caller-allocated, max_blocks entries); returns how
 * many. A block not cached ends the run, unless create: then it is made cached as if computed
 * (its BlockStored is queued) — a decoder importing transferred blocks; it stops early when no
 * block is free. Held blocks count as used and are never evicted until kvr_engine_unhold(). */
uint32_t kvr_engine_hold_prompt(kvr_engine *e, const uint32_t *prompt, uint32_t n_prompt,
                                uint32_t lora, uint32_t max_blocks, bool create, uint32_t *blocks);
/* Drops the references kvr_engine_hold_prompt took (the same blocks[], n). */
void kvr_engine_unhold(kvr_engine *e, const uint32_t *blocks, uint32_t n);
/* The ext hash of block index b (0 when out of range). */
uint64_t kvr_engine_block_ext(const kvr_engine *e, uint32_t b);

#endif
