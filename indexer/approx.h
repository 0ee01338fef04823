/* kvr_approx: the approximate prefix index of `kvr-routerd --index approx` (issue 14 item 4).
 *
 * For engines that publish no KV events the router cannot know what a worker caches; it
 * assumes instead that the worker it booked a request on now holds that request's blocks
 * (kvr_approx_assume, called from the replicated ROUTE apply, so every router makes the same
 * assumptions in the same order). The guesses are bounded twice:
 *   - per worker at most its capacity in blocks (the capacity the FSM registry has from the
 *     worker's heartbeat, else opts.default_capacity_blocks; never above
 *     opts.max_capacity_blocks): past it the worker's least recently used blocks go first
 *     (counted in evicted);
 *   - all workers together at most opts.max_entries (heartbeats announce capacities; this
 *     bounds what many workers with huge announced capacities could hold): past it the
 *     oldest entries of any worker go first (counted in evicted);
 *   - a TTL (opts.ttl_ms): a block not assumed again for ttl_ms of COMMAND time is dropped
 *     (counted in expired) by the next assume or kvr_approx_expire whose time is past it.
 * A request's blocks are touched from the last to the first, so its root is the most recently
 * used: LRU then drops leaves before the prefix roots they hang from (what an engine's own LRU
 * over a prefix tree does; a dropped root would make its descendants unreachable, matching
 * is contiguous from the first block).
 *
 * Determinism: the content depends only on the sequence of calls and their arguments, never on
 * the clock. Times must come from the replicated command (the FSM clock); a time lower than
 * one already seen is taken as the latest seen, so the recency list stays sorted by time and
 * expiry is O(expired). kvr_approx_digest() covers (worker, seq, time) of every entry: two
 * routers that applied the same ROUTE commands from the same start have equal digests.
 * Reads (find_matches) may filter by a local clock without changing anything.
 *
 * Layout: entries in one pool (40 bytes each), each on two doubly linked lists (global recency,
 * for the TTL; its worker's recency, for the LRU), found through an open-addressing table of
 * u32 entry indexes keyed by (worker slot, seq) (linear probing, backward-shift deletion,
 * grown at 1/2 load). About 48 bytes per entry. No per-entry allocation.
 *
 * Threading: owned by ONE thread (the router's loop thread); no locks. Memory: owns all it
 * allocates; arguments are borrowed for the call. */
#ifndef KVR_APPROX_H
#define KVR_APPROX_H

#include "index.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVR_APPROX_DEFAULT_TTL_MS 120000u
#define KVR_APPROX_DEFAULT_MAX_CAPACITY (1u << 22) /* 4 Mi blocks a worker at most */
#define KVR_APPROX_DEFAULT_MAX_ENTRIES (1u << 23)  /* ~400 MB at 48 bytes an entry */
#define KVR_APPROX_MAX_WORKERS KVR_INDEX_MAX_WORKERS_LIMIT

typedef struct kvr_approx kvr_approx;

typedef struct kvr_approx_opts {
    uint64_t ttl_ms;                  /* 0 -> KVR_APPROX_DEFAULT_TTL_MS */
    uint64_t default_capacity_blocks; /* worker capacity unknown; 0 -> 16384 */
    uint64_t max_capacity_blocks;     /* clamp of any capacity; 0 -> 4 Mi */
    uint64_t max_entries;             /* all workers together; 0 -> 8 Mi (oldest first beyond) */
} kvr_approx_opts;

typedef struct kvr_approx_stats {
    uint64_t entries;   /* (worker, seq) pairs held */
    uint64_t workers;   /* workers with a slot */
    uint64_t bytes;     /* bytes owned (pool + table + workers + handle) */
    uint64_t inserted;  /* pairs newly assumed */
    uint64_t refreshed; /* pairs assumed again (moved to most recent) */
    uint64_t evicted;   /* pairs dropped by a worker's capacity (LRU) */
    uint64_t expired;   /* pairs dropped by the TTL */
    uint64_t removed;   /* pairs dropped by kvr_approx_remove_worker */
    uint64_t refused;   /* assumes refused: no worker slot left or out of memory */
} kvr_approx_stats;

/* opts may be NULL. Returns 0, KVR_EINVAL or KVR_ENOMEM. */
int kvr_approx_create(kvr_approx **out, const kvr_approx_opts *opts);
void kvr_approx_destroy(kvr_approx *a);

uint64_t kvr_approx_ttl_ms(const kvr_approx *a);
uint64_t kvr_approx_default_capacity(const kvr_approx *a);

/* Worker worker_id is assumed to hold seq[0..n) from now_ms (command time). capacity_blocks:
 * its capacity (0: unknown, the default). First drops every entry expired at now_ms, then
 * touches the blocks from last to first (a request longer than the capacity records its first
 * capacity blocks only), then evicts the worker's LRU blocks beyond its capacity, then the
 * oldest entries beyond max_entries. Returns 0,
 * KVR_ELIMIT (no worker slot) or KVR_ENOMEM; either way the structure stays consistent. */
int kvr_approx_assume(kvr_approx *a, uint64_t worker_id, uint64_t capacity_blocks,
                      const uint64_t *seq, size_t n, uint64_t now_ms);

/* Drops every entry last assumed at or before now_ms - ttl. Returns how many. */
size_t kvr_approx_expire(kvr_approx *a, uint64_t now_ms);

/* Drops every entry of the worker and frees its slot. Returns how many entries. */
size_t kvr_approx_remove_worker(kvr_approx *a, uint64_t worker_id);

/* For each worker, its contiguous matched depth from seq[0] (as kvr_index_find_matches).
 * Entries already past the TTL at now_ms are not matched (0: no filter); nothing changes.
 * Returns the number of matching workers (may exceed cap; only cap are written). */
size_t kvr_approx_find_matches(const kvr_approx *a, const uint64_t *seq, size_t n, uint64_t now_ms,
                               kvr_index_match *out, size_t cap);

/* Entries held by one worker (0 when unknown). */
uint64_t kvr_approx_worker_entries(const kvr_approx *a, uint64_t worker_id);

/* Order-independent digest of the (worker_id, seq, last assumed time) triples; 0 when empty. */
uint64_t kvr_approx_digest(const kvr_approx *a);

void kvr_approx_stats_get(const kvr_approx *a, kvr_approx_stats *out);

#endif
