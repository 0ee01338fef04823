/* termguard: a raft_io layer that silences a node whose term or vote could not be stored.
 *
 * canonical/raft 0.15 (and 0.18, the last release) corrupts its own state when storing the
 * term or vote fails as it starts an election: convertToCandidate sets the state back to
 * follower without resetting the follower fields, which share a union with the candidate's,
 * so the next state change frees a garbage pointer (seen: a router whose data dir was
 * removed crashed in convertClearFollower within seconds). Any failure of set_term/set_vote
 * (a vanished or read-only data dir, a failing disk) leads there.
 *
 * termguard sits between raft's io (memlog or disklog) and raft_uv. When set_term or set_vote
 * fails it reports success to raft (so raft never takes that path) and *mutes* the node from
 * then on: nothing it sends leaves (sends complete with RAFT_CANCELED, unsent) and its appends
 * fail unwritten. A muted node is, to the others, a node that crashed just before the failed
 * write: it votes for nobody and acknowledges nothing on a term it could not store, so the
 * in-memory term it runs on is never relied upon. It stays muted until the process restarts
 * and loads its durable term again (kvr-routerd restarts in place once its data dir has room:
 * sync.h log_fenced_cb). Everything else is delegated.
 *
 * Threads: everything on the loop thread of the inner raft_io. Memory: the inner io is
 * caller-owned and must outlive the termguard io; termguard frees its own state in close. */
#ifndef KVR_SYNC_TERMGUARD_H
#define KVR_SYNC_TERMGUARD_H

#include <raft.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

/* Fills io to wrap inner (raft_uv, or a test double). Returns 0 or RAFT_NOMEM. */
int kvr_termguard_init(struct raft_io *io, struct raft_io *inner, uv_loop_t *loop);

typedef struct kvr_termguard_stats {
    bool muted;             /* a term or vote could not be stored */
    uint64_t failed_writes; /* set_term/set_vote calls the inner io failed */
    uint64_t dropped_sends; /* messages not sent because muted */
} kvr_termguard_stats;
void kvr_termguard_get_stats(struct raft_io *io, kvr_termguard_stats *out);

/* Releases a termguard io that no outer io took (its timer closes on a later loop turn). */
void kvr_termguard_discard(struct raft_io *io);

#endif
