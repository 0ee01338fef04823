/* kv_event: vLLM-format KV-cache event batches (DESIGN section 3), decode and encode.
 *
 * Decoding accepts both encodings (array form with the tag first, map form with "type"),
 * block hashes as msgpack ints (u64, or negative i64 taken as its bit pattern) or as bin/str
 * bytes of any length (reduced to u64 with XXH3-64 seed 0), and ignores unknown trailing
 * fields and unknown keys. It never allocates from an unchecked length: every count is checked
 * against the bytes that remain and against the decoder's limits before anything is sized.
 *
 * Details of the accepted forms:
 * - batch: array [ts, events, dp_rank|nil, ...more ignored] (at least 2 elements), or map
 *   with "ts" and "events" required, "data_parallel_rank" optional (nil = absent), other keys
 *   skipped. ts is float32/float64 or any integer.
 * - event: array with the tag first (BlockStored needs >= 5 fields, lora_id is the optional
 *   6th, medium the 7th (skipped), lora_name the 8th; BlockRemoved >= 2), or map with "type"
 *   anywhere among its keys. In map form "parent_block_hash", "lora_id" and "lora_name" may
 *   be missing (= nil). lora_name is a str of at most KVR_LORA_NAME_MAX bytes (kvr_hash.h);
 *   a longer one rejects the event (LIMIT). Non-str map keys are skipped.
 *   A known key given twice is KVR_KV_REJ_INVALID.
 * - BlockStored: block_size in 1..max_block_size, token ids u32, and
 *   n_tokens == n_hashes * block_size, else rejected. Non-stored events report
 *   n_tokens == 0 and has_parent == false; AllBlocksCleared reports n_hashes == 0.
 * - Unknown fields and keys are skipped with kvr_mp_skip (nesting <= KVR_MP_MAX_DEPTH each).
 * Return codes per reason: TRUNCATED -> KVR_ETRUNC (also an array/map count larger than the
 * bytes left, e.g. `dd 05 f5 e1 00`: that is what a cut payload looks like), TYPE -> KVR_ETYPE,
 * LIMIT -> KVR_ELIMIT (a configured limit, nesting deeper than KVR_MP_MAX_DEPTH inside a
 * skipped field, or out of memory), UNKNOWN -> KVR_EUNSUPPORTED, INVALID and TRAILING ->
 * KVR_EINVAL. Messages read "event 3: block_hashes: truncated (array of 16 elements, 9 bytes
 * left) (at byte 57)" or "batch: ts: wrong type (str) (at byte 1)".
 *
 * Ownership: a decoded batch borrows the decoder's scratch arrays; it is valid until the next
 * kvr_kv_decode() on the same decoder or kvr_kv_decoder_free(). lora_name borrows the payload
 * itself. A decoder is used by one
 * thread at a time. */
#ifndef KV_EVENT_H
#define KV_EVENT_H

#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    KVR_KV_STORED = 1,  /* "BlockStored" */
    KVR_KV_REMOVED = 2, /* "BlockRemoved" */
    KVR_KV_CLEARED = 3, /* "AllBlocksCleared" */
} kvr_kv_type;

typedef struct kvr_kv_event {
    kvr_kv_type type;
    uint32_t n_hashes;
    const uint64_t *hashes; /* external (engine) block hashes, reduced to u64 */
    bool has_parent;        /* STORED: parent_block_hash was not nil */
    uint64_t parent;        /* STORED: external hash of the parent block */
    uint32_t n_tokens;
    const uint32_t *tokens; /* STORED: n_hashes * block_size token ids */
    uint32_t block_size;    /* STORED */
    bool has_lora_id;
    int64_t lora_id;
    kvr_slice lora_name; /* STORED: the adapter's name; len 0 = the base model */
} kvr_kv_event;

typedef struct kvr_kv_batch {
    double ts;
    bool has_dp_rank;
    int64_t dp_rank;
    uint32_t n_events;
    const kvr_kv_event *events;
} kvr_kv_batch;

/* Bounds on one payload; defaults from kvr_kv_limits_default(). */
typedef struct kvr_kv_limits {
    size_t max_payload_bytes;   /* default 8 MiB */
    uint32_t max_events;        /* per batch, default 65536 */
    uint32_t max_hashes;        /* per event, default 65536 */
    uint32_t max_tokens;        /* per event, default 4 Mi */
    uint32_t max_block_size;    /* default 4096 */
    uint32_t max_hash_bytes;    /* bytes of one bin/str hash, default 256 */
} kvr_kv_limits;

kvr_kv_limits kvr_kv_limits_default(void);

/* Why a payload was rejected: one counter per reason in the routers' metrics. */
typedef enum {
    KVR_KV_REJ_NONE = 0,
    KVR_KV_REJ_TRUNCATED,  /* input ends early */
    KVR_KV_REJ_TYPE,       /* a field of the wrong type */
    KVR_KV_REJ_LIMIT,      /* a count or size over a limit, or nesting too deep */
    KVR_KV_REJ_UNKNOWN,    /* unknown event tag */
    KVR_KV_REJ_INVALID,    /* inconsistent fields (tokens != hashes * block_size, ...) */
    KVR_KV_REJ_TRAILING,   /* bytes after the batch */
    KVR_KV_REJ__COUNT
} kvr_kv_reject;

const char *kvr_kv_reject_name(kvr_kv_reject r);

typedef struct kvr_kv_decoder {
    kvr_kv_limits limits;
    /* scratch, grown as needed (within limits), reused across calls */
    kvr_kv_event *events;
    uint32_t events_cap;
    uint64_t *hashes;
    size_t hashes_cap;
    uint32_t *tokens;
    size_t tokens_cap;
    /* counters, for tests and metrics */
    uint64_t decoded;
    uint64_t rejected[KVR_KV_REJ__COUNT];
} kvr_kv_decoder;

/* limits may be NULL for the defaults. */
void kvr_kv_decoder_init(kvr_kv_decoder *d, const kvr_kv_limits *limits);
void kvr_kv_decoder_free(kvr_kv_decoder *d);

/* Decodes one payload into *out. Returns 0, or a negative KVR_E* code with err (may be NULL)
 * saying what and where, *reason (may be NULL) set, and d->rejected[reason] incremented.
 * A rejected payload is rejected whole: no partial batch is returned. */
int kvr_kv_decode(kvr_kv_decoder *d, const void *data, size_t len, kvr_kv_batch *out,
                  kvr_kv_reject *reason, kvr_err *err);

typedef enum { KVR_KV_FORMAT_ARRAY = 0, KVR_KV_FORMAT_MAP = 1 } kvr_kv_format;
typedef enum { KVR_KV_HASH_INT = 0, KVR_KV_HASH_BYTES = 1 } kvr_kv_hash_format;

/* Encodes a batch in vLLM's array or map form, appending to out. With KVR_KV_HASH_BYTES each
 * u64 hash h is written as a 32-byte bin (kvr_kv_hash_to_bytes), so decoding gives back
 * kvr_hash_bytes(those 32 bytes), a stable function of h. Returns 0 or KVR_ENOMEM, or
 * KVR_EINVAL for an event of unknown type; on failure nothing is appended.
 * Array form: [ts, events(, dp_rank)], events ["BlockStored", hashes, parent|nil, tokens,
 * block_size, lora_id|nil], ["BlockRemoved", hashes], ["AllBlocksCleared"].
 * Map form (vLLM key names, omit_defaults): {"ts","events"(,"data_parallel_rank" only when
 * has_dp_rank)}, {"type","block_hashes","parent_block_hash" (nil when none),"token_ids",
 * "block_size"(,"lora_id" only when has_lora_id)}. ts is written as float32 when that is
 * exact, else float64. The encoder does not check n_tokens == n_hashes * block_size. */
int kvr_kv_encode(kvr_buf *out, const kvr_kv_batch *batch, kvr_kv_format fmt,
                  kvr_kv_hash_format hfmt);

/* The 32 bytes that stand for u64 hash h in bytes format (deterministic expansion of h). */
void kvr_kv_hash_to_bytes(uint64_t h, uint8_t out[32]);
/* What a decoder reports for a hash encoded in bytes format: kvr_hash_bytes(to_bytes(h)). */
uint64_t kvr_kv_hash_bytes_id(uint64_t h);

#endif
