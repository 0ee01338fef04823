/* memlog: a raft_io whose log and snapshots live in memory, with term and vote on disk.
 *
 * What the route-and-reserve group replicates is soft state (bookings that live seconds and
 * are released by lease expiry anyway), so paying an fsync per entry on every router buys
 * nothing a user sees (issue 19). memlog wraps another raft_io (raft_uv in kvr-routerd) and
 *  - delegates init, start (network and timers), send, set_term, set_vote, time, random and
 *    close to it: term and vote stay durable and synchronous, they change only at elections;
 *  - completes append, truncate and snapshot_put in memory (raft keeps the entries in its own
 *    in-memory log and owns their buffers; memlog keeps the last snapshot as a copy so it can
 *    answer snapshot_get for a lagging follower);
 *  - load returns the durable term and vote, no snapshot and, when bootstrapped, the
 *    bootstrap configuration as entry 1 (term 1): every router of the group builds the same
 *    entry, so a restarted router knows its voters with an otherwise empty log.
 *
 * The vote rule (docs/DESIGN.md "Raft log in memory" has the safety argument). A router that
 * restarts with a durable term > 1 may have acknowledged entries it has now forgotten, so it
 * must not hand a majority to a candidate that lacks them. Until it is "caught up" memlog
 * rewrites every vote it would grant (RequestVote and pre-vote results) into a refusal, except:
 *  - caught up: it accepted entries from a leader of a term >= its durable term at start until
 *    its last index reached the end of that leader's first message (its last index then) or
 *    its commit index, whichever is larger, and then hold_ms more passed (a margin for acks it
 *    sent before dying that were still in flight); from then on it votes normally;
 *  - whole-group restart: every other voter of the configuration has asked it for a vote
 *    since it started; then it grants a candidate whose last log (term, index) is at least as
 *    up to date as every log it saw in those requests (all empty after a whole-group restart:
 *    they agree, with no bookings).
 * Refusing a vote raft has already recorded is safe: the durable vote only makes it stricter.
 *
 * Threads: everything on the loop thread of the inner raft_io. Memory: the inner io is
 * caller-owned and must outlive the memlog io; memlog frees its own state in close. */
#ifndef KVR_SYNC_MEMLOG_H
#define KVR_SYNC_MEMLOG_H

#include <raft.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

typedef struct kvr_memlog_options {
    /* Voters written as entry 1 by bootstrap (and on every later load, since nothing else is
     * on disk); NULL: the router joins, its configuration comes from the leader. Copied. */
    const struct raft_configuration *bootstrap;
    unsigned hold_ms; /* the wait after catching up; 0: 4000 */
} kvr_memlog_options;

/* Fills io to wrap inner (already initialised with raft_uv_init or a test double). Returns 0
 * or a RAFT_* code. The loop runs append/snapshot callbacks on a later loop turn. */
int kvr_memlog_init(struct raft_io *io, struct raft_io *inner, uv_loop_t *loop,
                    const kvr_memlog_options *o);

typedef struct kvr_memlog_stats {
    bool restricted;       /* started with a durable term > 1 (may have forgotten acks) */
    bool may_vote;         /* the rule lets it grant votes now */
    uint64_t withheld;     /* vote grants rewritten into refusals */
    uint64_t start_term;   /* durable term when it started */
    uint64_t caught_up_ms; /* io->time when it caught up (0: not yet) */
} kvr_memlog_stats;
void kvr_memlog_get_stats(struct raft_io *io, kvr_memlog_stats *out);

/* Releases a memlog io that raft_init never took (its timer closes on a later loop turn). */
void kvr_memlog_discard(struct raft_io *io);

/* For tests: turn the vote rule off (to show what it prevents). */
void kvr_memlog_disable_vote_rule(struct raft_io *io, bool disable);

#endif
