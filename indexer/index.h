/* kvr_index: the prefix index (DESIGN sections 2, 3, 5, 7).
 *
 * What it holds: the set of (worker, seq hash) entries, where a seq hash identifies a whole
 * token prefix (DESIGN section 2), plus, per worker, the engine's external block hash -> seq
 * map used to apply removals, the worker's announced capacity and its event cursor, and the
 * JetStream sequence the index covers.
 *
 * Layout (why it is fast and small): one open-addressing table seq -> bitmask of worker slots
 * (16 bytes a slot while no worker holds a slot beyond 63; masks widen by 64 bits when one
 * does, so max_workers costs nothing until used), and per worker one open-addressing table
 * external -> seq (16 bytes a slot). No trees, no per-entry allocation. find_matches walks the
 * query's seq hashes in order, intersecting worker masks, and stops as soon as no worker
 * continues. The digest is a sum of a strong 64-bit mix of each (worker_id, seq) pair,
 * updated in O(1) on every change, so it is independent of the order events arrived in and of
 * the slot numbers this replica happened to give its workers.
 *
 * Threading: an index is owned by ONE thread (the router's loop thread). No function here
 * locks; none may be called concurrently on the same index. Snapshots do not break this:
 * kvr_index_export() runs on the owner thread and produces an independent flat image that
 * any other thread may then write (indexer/snapshot.h); kvr_index_import() runs on the owner.
 *
 * Memory: the index owns everything it allocates; every allocation is accounted in
 * kvr_index_stats.bytes (exact: requested sizes, tables of 2 MiB and more are mmap'd with
 * MADV_HUGEPAGE and counted in whole pages; the handle included). Tables grow at 3/4 load and
 * shrink below 1/8, so an emptied index returns to its baseline. About 64 bytes per (block,
 * worker) entry when each block is on one worker. Events are borrowed for the duration of a
 * call.
 *
 * Per-worker bound: a worker may hold at most bound = bound_factor x capacity_blocks
 * external hashes (capacity from kvr_index_set_worker_capacity, else default_capacity_blocks).
 * Policy when a store would exceed it: REFUSE the new blocks (that block and the rest of the
 * event, which are its descendants), keep what is already indexed, count the refused blocks
 * in dropped_over_bound. Why not evict the oldest: the oldest entries of a worker are its
 * prefix roots; evicting a root makes every descendant unreachable for find_matches (matching
 * is contiguous from the first block) and orphans later stores that chain from it, so keeping
 * old entries loses the least. A well-behaved engine never reaches 4x its own capacity; one
 * that never sends removals stops growing the index at its bound.
 *
 * Worker ids are u64 (DESIGN section 4). Up to opts.max_workers workers at once (default 64,
 * at most KVR_INDEX_MAX_WORKERS_LIMIT); a store for a new worker beyond that is refused with
 * KVR_ELIMIT and counted (dropped_no_slot). Events for an unknown worker register it with the
 * default capacity. */
#ifndef KVR_INDEX_H
#define KVR_INDEX_H

#include "kv_event.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVR_INDEX_MAX_WORKERS_LIMIT 1024u
#define KVR_INDEX_DEFAULT_BLOCK_SIZE 64u
#define KVR_INDEX_DEFAULT_BOUND_FACTOR 4u
#define KVR_INDEX_DEFAULT_CAPACITY_BLOCKS 16384u
/* Format of kvr_index_image (and of the snapshot that stores it). */
#define KVR_INDEX_IMAGE_FORMAT 1u

typedef struct kvr_index kvr_index;

typedef struct kvr_index_opts {
    uint32_t block_size;              /* router block size; 0 -> 64 */
    uint32_t max_workers;             /* 0 -> 64; at most KVR_INDEX_MAX_WORKERS_LIMIT */
    uint32_t bound_factor;            /* 0 -> 4 */
    uint64_t default_capacity_blocks; /* when a worker's capacity is unknown; 0 -> 16384 */
} kvr_index_opts;

/* Counters. "events" count kvr_kv_event structs; "blocks" count hashes inside them. */
typedef struct kvr_index_stats {
    uint64_t entries;    /* distinct (worker, seq) pairs */
    uint64_t blocks;     /* distinct seq hashes */
    uint64_t workers;    /* registered workers */
    uint64_t ext_hashes; /* external hashes held, all workers (>= entries if engines alias) */
    uint64_t bytes;      /* exact bytes owned by the index, handle included */

    uint64_t events_applied;   /* every event passed to kvr_index_apply */
    uint64_t stores;           /* STORED events applied (fully or in part) */
    uint64_t removes;          /* REMOVED events */
    uint64_t clears;           /* CLEARED events */
    uint64_t blocks_stored;    /* blocks newly added by STORED (duplicates not counted) */
    uint64_t blocks_duplicate; /* blocks of STORED already present with the same seq */
    uint64_t blocks_removed;   /* external hashes removed by REMOVED */

    uint64_t dropped_unknown_parent; /* STORED events dropped: parent not in the worker's map */
    uint64_t dropped_block_size;     /* STORED events dropped: block_size != router's */
    uint64_t dropped_invalid;        /* STORED events dropped: n_tokens < n_hashes*block_size */
    uint64_t dropped_over_bound;     /* BLOCKS refused by the per-worker bound */
    uint64_t dropped_no_slot;        /* events refused: too many workers */
    uint64_t unknown_removes;        /* external hashes in REMOVED that were not held */
} kvr_index_stats;

typedef struct kvr_index_worker_info {
    uint64_t worker_id;
    uint64_t capacity_blocks; /* 0 when never announced (default used for the bound) */
    uint64_t bound;           /* max external hashes held */
    uint64_t entries;         /* distinct seq hashes held */
    uint64_t ext_hashes;      /* external hashes held */
    uint64_t last_event_seq;  /* caller-maintained cursor, see kvr_index_set_worker_cursor */
} kvr_index_worker_info;

typedef struct kvr_index_match {
    uint64_t worker_id;
    uint32_t depth; /* contiguous matched blocks from the first query block, >= 1 */
} kvr_index_match;

/* opts may be NULL for the defaults. Returns 0, KVR_EINVAL (bad option) or KVR_ENOMEM. */
int kvr_index_create(kvr_index **out, const kvr_index_opts *opts, kvr_err *err);
void kvr_index_destroy(kvr_index *idx);

uint32_t kvr_index_block_size(const kvr_index *idx);

/* Applies one event for worker_id. Returns 0 when the event was applied (duplicates and
 * removals of unknown hashes included: they are harmless and counted). Returns a negative code,
 * with err saying why, when the event or a part of it was dropped; the index stays consistent
 * and the drop is counted:
 *   KVR_ENOTFOUND  STORED whose parent is unknown for this worker (nothing applied)
 *   KVR_EINVAL     STORED with block_size != router's, or too few tokens (nothing applied);
 *                  or an unknown event type
 *   KVR_ELIMIT     blocks refused by the per-worker bound (blocks before it applied), or no
 *                  free worker slot
 *   KVR_ENOMEM     allocation failed (blocks before it applied)
 * An engine that stores an external hash again with different tokens is taken at its word:
 * the old association is replaced. */
int kvr_index_apply(kvr_index *idx, uint64_t worker_id, const kvr_kv_event *ev, kvr_err *err);

/* Applies n events in order; a dropped event does not stop the rest. Returns the number of
 * events that returned an error (0 = all applied); err holds the last error. */
size_t kvr_index_apply_batch(kvr_index *idx, uint64_t worker_id, const kvr_kv_event *evs, size_t n,
                             kvr_err *err);

/* Registers the worker if unknown and sets its capacity (0 = unknown -> default). A lowered
 * bound does not evict: it only refuses further stores. Returns 0, KVR_ELIMIT or KVR_ENOMEM. */
int kvr_index_set_worker_capacity(kvr_index *idx, uint64_t worker_id, uint64_t capacity_blocks);

/* Drops every entry of the worker and forgets it (its slot is reused). Returns 0 or
 * KVR_ENOTFOUND. Cost: O(entries of that worker). */
int kvr_index_remove_worker(kvr_index *idx, uint64_t worker_id);

/* Drops every entry of the worker but keeps it registered (same as an AllBlocksCleared). */
int kvr_index_clear_worker(kvr_index *idx, uint64_t worker_id);

/* Fills out[0..cap) with the registered workers (order unspecified); returns how many exist. */
size_t kvr_index_workers(const kvr_index *idx, kvr_index_worker_info *out, size_t cap);
/* Returns 0 and fills *out, or KVR_ENOTFOUND. */
int kvr_index_worker(const kvr_index *idx, uint64_t worker_id, kvr_index_worker_info *out);

/* For each worker, its contiguous matched depth from seq_hashes[0]. Writes up to cap
 * (worker_id, depth) pairs with depth >= 1 into out, in unspecified order, and returns how many
 * workers matched (may exceed cap; cap >= max_workers never truncates). No allocation; stops at
 * the first query block that no still-matching worker holds. */
size_t kvr_index_find_matches(const kvr_index *idx, const uint64_t *seq_hashes, size_t n,
                              kvr_index_match *out, size_t cap);

/* Order-independent digest of the set of (worker_id, seq) entries; 0 for an empty index.
 * Two indexes with the same entry set have the same digest whatever their history. */
uint64_t kvr_index_digest(const kvr_index *idx);
/* The digest's contribution of one pair (exposed for tests and reference models). */
uint64_t kvr_index_pair_mix(uint64_t worker_id, uint64_t seq_hash);

void kvr_index_stats_get(const kvr_index *idx, kvr_index_stats *out);

/* Cursors carried by snapshots. The stream sequence is the last JetStream sequence whose
 * event has been applied (global). A worker's cursor is any per-worker position the caller
 * keeps (e.g. last event batch sequence); it is stored and restored, never interpreted.
 * set_worker_cursor registers the worker if unknown (KVR_ELIMIT / KVR_ENOMEM possible). */
void kvr_index_set_stream_seq(kvr_index *idx, uint64_t seq);
uint64_t kvr_index_stream_seq(const kvr_index *idx);
int kvr_index_set_worker_cursor(kvr_index *idx, uint64_t worker_id, uint64_t last_event_seq);

/* ---- flat image, for snapshots ---------------------------------------------------------- */

typedef struct kvr_index_image_worker {
    uint64_t worker_id;
    uint64_t capacity_blocks;
    uint64_t last_event_seq;
    uint64_t first_pair; /* index into pairs (in pairs, not words) */
    uint64_t n_pairs;
} kvr_index_image_worker;

/* A self-contained copy of an index's content. The index entries are exactly the distinct
 * (worker, seq) of the workers' external -> seq pairs, so the pairs are the whole content;
 * entries and digest are carried to verify an import. Owned by whoever holds it; plain data,
 * usable on any thread, freed with kvr_index_image_free. */
typedef struct kvr_index_image {
    uint32_t format; /* KVR_INDEX_IMAGE_FORMAT */
    uint32_t block_size;
    uint64_t stream_seq;
    uint64_t entries;
    uint64_t digest;
    uint32_t n_workers;
    kvr_index_image_worker *workers; /* malloc'd, n_workers */
    uint64_t n_pairs;
    uint64_t *pairs; /* malloc'd, 2*n_pairs words: ext, seq, ext, seq, ... per worker range */
} kvr_index_image;

/* On the owner thread: copies the index into *img (a flat copy, no sorting: O(table size)
 * memory traffic, no hashing). Returns 0 or KVR_ENOMEM (img left empty). */
int kvr_index_export(const kvr_index *idx, kvr_index_image *img, kvr_err *err);

/* On the owner thread: replaces the whole content of idx (entries, workers, capacities,
 * cursors, stream seq) with the image's. Verifies format, block size (KVR_EUNSUPPORTED when it
 * differs from the index's), pair ranges, worker count, and that the rebuilt entries count and
 * digest equal the image's (KVR_ECORRUPT). On any error idx is left exactly as it was: the
 * content is built aside and swapped in only when complete. Counters other than the
 * content-derived ones (entries, blocks, workers, bytes) are kept. */
int kvr_index_import(kvr_index *idx, const kvr_index_image *img, kvr_err *err);

/* Frees the image's arrays and zeroes it. Any thread. NULL-safe. */
void kvr_index_image_free(kvr_index_image *img);

#endif
