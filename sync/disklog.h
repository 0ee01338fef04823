/* disklog: raft_uv's log on disk, fenced after the first failed append (--raft-log disk).
 *
 * canonical/raft 0.15 counts what a node has stored (r->last_stored) by adding the length of
 * each append that succeeds; a failed append is not added, but raft goes on appending the
 * entries after it, so from then on the count is short of the real last index, and the disk
 * holds the log with a hole where the failed batch was (a full disk: the next open segment
 * could not be allocated; the one after it could once space came back). Such a node
 *  - applies too little (its commit index is capped by the short count) and never catches up;
 *  - acknowledges an index inside the hole as stored;
 *  - after a restart, may find its files refused ("closed segment ... is past last snapshot":
 *    a segment after the hole and no snapshot covering the hole).
 * disklog stops that at the first failure: it wraps raft_uv, delegates everything to it, and
 * once an append has failed it refuses every later one (completed with RAFT_IOERR on a later
 * loop turn, never written), so the disk keeps a contiguous log up to the last good write,
 * raft's count stays right, and nothing past it is acknowledged. A successful install of a
 * leader's snapshot (snapshot_put with trailing 0) replaces the whole log on disk and resets
 * raft's count, so it lifts the fence. Otherwise the fence stays until the process restarts
 * and raft reloads its files (kvr-routerd restarts in place: sync.h log_fenced_cb).
 *
 * Threads: everything on the loop thread of the inner raft_io. Memory: the inner io is
 * caller-owned and must outlive the disklog io; disklog frees its own state in close. */
#ifndef KVR_SYNC_DISKLOG_H
#define KVR_SYNC_DISKLOG_H

#include <raft.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

/* Fills io to wrap inner (initialised with raft_uv_init, or a test double). Returns 0 or a
 * RAFT_* code. */
int kvr_disklog_init(struct raft_io *io, struct raft_io *inner, uv_loop_t *loop);

typedef struct kvr_disklog_stats {
    bool fenced;             /* an append failed and nothing has lifted the fence since */
    uint64_t failed_appends; /* appends the inner io failed */
    uint64_t refused;        /* appends refused by the fence (never written) */
    uint64_t fenced_ms;      /* io->time when the fence went up (0: not fenced) */
} kvr_disklog_stats;
void kvr_disklog_get_stats(struct raft_io *io, kvr_disklog_stats *out);

/* Releases a disklog io that raft_init never took (its timer closes on a later loop turn). */
void kvr_disklog_discard(struct raft_io *io);

#endif
