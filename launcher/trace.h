/* trace: Mooncake-format trace reader and the deterministic prompt generator (DESIGN section 10).
 *
 * A trace is JSONL (plain, or gzip: zlib reads both transparently), one object a line:
 *   {"timestamp": ms, "input_length": n, "output_length": n, "hash_ids": [id, ...]}
 * Unknown keys are ignored; empty lines are skipped. Lines longer than limits.max_line_bytes,
 * more than limits.max_hash_ids ids, or more than limits.max_requests lines are refused with a
 * clear error (file:line) and nothing is returned.
 *
 * Prompt tokens: token k (0-based, inside the block) of a block whose hash id is h is
 * kvr_trace_token(h, k), so equal hash ids give equal token blocks. A prompt is the blocks of
 * its hash_ids, `trace_block_size` tokens each, trimmed to input_length; tokens past the hashed
 * blocks (when input_length > n_hash_ids * trace_block_size) are unique to the request, derived
 * from its index in the trace. Token ids lie in [KVR_TRACE_TOKEN_MIN, KVR_TRACE_VOCAB): the low
 * ids, where tokenizers keep special tokens, are never produced.
 *
 * Ownership: kvr_trace owns its arrays (free with kvr_trace_free). Pure functions otherwise;
 * any thread. */
#ifndef KVR_TRACE_H
#define KVR_TRACE_H

#include "kvr_err.h"

#include <stddef.h>
#include <stdint.h>

#define KVR_TRACE_VOCAB 32000u
#define KVR_TRACE_TOKEN_MIN 256u
#define KVR_TRACE_DEFAULT_BLOCK_SIZE 512u

typedef struct kvr_trace_limits {
    size_t max_line_bytes; /* default 16 MiB */
    uint32_t max_hash_ids; /* per request, default 1 Mi */
    size_t max_requests;   /* default 10 M */
} kvr_trace_limits;

kvr_trace_limits kvr_trace_limits_default(void);

typedef struct kvr_trace_req {
    int64_t timestamp_ms;
    uint32_t input_length;
    uint32_t output_length;
    uint32_t n_hash_ids;
    const uint64_t *hash_ids; /* points into the trace's pool */
} kvr_trace_req;

typedef struct kvr_trace {
    size_t n;
    kvr_trace_req *reqs;
    uint64_t *ids; /* pool of every request's hash ids */
    size_t n_ids;
    uint64_t max_hash_id; /* largest id seen (0 if none) */
} kvr_trace;

/* Loads the whole file. limits may be NULL for the defaults. Returns 0, or KVR_ENOTFOUND
 * (no such file), KVR_EIO, KVR_EINVAL (bad JSON or field, with file:line), KVR_ELIMIT,
 * KVR_ENOMEM; *out is left empty on error. */
int kvr_trace_load(const char *path, const kvr_trace_limits *limits, kvr_trace *out, kvr_err *err);
void kvr_trace_free(kvr_trace *t);

/* Parses one JSON line into *req; hash ids are written to ids (capacity ids_cap). Returns 0,
 * KVR_EINVAL or KVR_ELIMIT (more than ids_cap ids). req->hash_ids points to ids. */
int kvr_trace_parse_line(const char *line, size_t len, kvr_trace_req *req, uint64_t *ids,
                         uint32_t ids_cap, kvr_err *err);

/* The replay's slice: how many leading requests have timestamp - first timestamp, divided by
 * speedup, below duration_s (0 = no limit), and at most max_requests (0 = no limit). */
size_t kvr_trace_slice(const kvr_trace *t, double speedup, double duration_s, long max_requests);

/* Token k of the block with hash id h. */
uint32_t kvr_trace_token(uint64_t hash_id, uint32_t k);

/* Writes the prompt of request r (its index in the trace is req_index) into out: min(
 * r->input_length, max_out) tokens; returns that count. trace_block_size 0 -> 512. */
size_t kvr_trace_prompt(const kvr_trace_req *r, uint64_t req_index, uint32_t trace_block_size,
                        uint32_t *out, size_t max_out);

/* Writes the tokens of one trace block (hash id h) into out[0..trace_block_size). */
void kvr_trace_block_tokens(uint64_t hash_id, uint32_t trace_block_size, uint32_t *out);

#endif
