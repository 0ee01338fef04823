/* consensus: canonical/raft 0.15 behind kvroute's own small interface, so that moving to
 * cowsql/raft (same API lineage) touches this file pair only.
 *
 * One node: libuv TCP transport, a data dir, pre-vote on, explicit election/heartbeat timeouts,
 * snapshot threshold and trailing, fsm.version 1 (pitfalls P1-P13 in docs/DEPENDENCIES.md 1).
 * The state machine is given as three callbacks over byte buffers; apply is total.
 *
 * Threads: every call and callback on the loop thread given to kvr_consensus_init.
 * Entries are zero-padded to a multiple of 8 bytes (the 0.15 uv backend corrupts other lengths
 * when it reloads its log after a restart), so apply may see up to 7 trailing zero bytes: the
 * entry format must tolerate them.
 * Memory: kvr_consensus_propose copies the bytes (into raft_malloc memory, which raft owns);
 * request structs are caller-owned and must stay valid until their callback has run. */
#ifndef KVR_SYNC_CONSENSUS_H
#define KVR_SYNC_CONSENSUS_H

#include "kvr_buf.h"
#include "kvr_err.h"
#include "peer_auth.h"

#include <raft.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#define KVR_CONSENSUS_MAX_PEERS 16

typedef struct kvr_consensus kvr_consensus;

/* The replicated state machine. apply must be deterministic and must not fail (outcomes go in
 * the state machine's own results); snapshot appends the whole state to out; restore replaces
 * the state (returns 0 or a KVR_E* code). All on the loop thread. */
typedef struct kvr_consensus_fsm {
    void *data;
    void (*apply)(void *data, uint64_t index, const void *buf, size_t len);
    int (*snapshot)(void *data, kvr_buf *out);
    int (*restore)(void *data, const void *buf, size_t len);
} kvr_consensus_fsm;

/* Fills a raft_fsm (version 1) that calls cbs; cbs must outlive it. Used by kvr_consensus and
 * directly by tests that drive raft/fixture.h. */
void kvr_consensus_raft_fsm(struct raft_fsm *out, kvr_consensus_fsm *cbs);

typedef struct kvr_peer {
    uint32_t id;
    char addr[64]; /* host:port */
} kvr_peer;

/* Parses "1@host:port,2@host:port". Returns the count (>= 1) or a negative KVR_E* code. */
int kvr_consensus_parse_peers(const char *s, kvr_peer *out, int max, kvr_err *err);

typedef struct kvr_consensus_options {
    uint32_t id;
    const char *addr;     /* this node's raft address host:port */
    const char *peers;    /* initial voters, see kvr_consensus_parse_peers */
    const char *data_dir; /* created if missing */
    bool join;            /* do not bootstrap */
    unsigned election_timeout_ms, heartbeat_timeout_ms;
    unsigned snapshot_threshold, snapshot_trailing;
    unsigned install_snapshot_timeout_ms; /* default 5000 (raft's own default is 30 s) */
    /* Cluster secret (must outlive the node). Set: every Raft connection runs the peer_auth
     * handshake first (auth_transport.h). NULL or empty: raft's own unauthenticated TCP
     * transport (the caller decided that is acceptable, e.g. --insecure-cluster). */
    const kvr_auth_key *auth_key;
    /* true: entries and snapshots in memory, term and vote on disk, with memlog.h's vote rule
     * (--raft-log memory); false: raft_uv's log on disk, an fsync per entry batch. */
    bool memory_log;
    unsigned memory_hold_ms; /* memlog's wait after catching up; 0: its default (4 s) */
} kvr_consensus_options;

int kvr_consensus_init(kvr_consensus **out, uv_loop_t *loop, const kvr_consensus_options *o,
                       kvr_consensus_fsm *fsm, kvr_err *err);
int kvr_consensus_start(kvr_consensus *c, kvr_err *err);

typedef struct kvr_consensus_req kvr_consensus_req;
/* status 0: committed and applied (the apply callback has already run for it). KVR_EAGAIN:
 * not leader / leadership lost (the entry may or may not commit later), KVR_ECLOSED: shutting
 * down, KVR_EIO: other failure. */
typedef void (*kvr_consensus_cb)(kvr_consensus_req *req, int status);
struct kvr_consensus_req {
    struct raft_apply raft; /* private */
    kvr_consensus_cb cb;
    void *data;
};
/* KVR_EAGAIN when not leader, KVR_ENOMEM; on error the callback will not run. */
int kvr_consensus_propose(kvr_consensus *c, kvr_consensus_req *req, const void *buf, size_t len,
                          kvr_consensus_cb cb);

typedef struct kvr_consensus_change kvr_consensus_change;
struct kvr_consensus_change {
    struct raft_change raft; /* private */
    void (*cb)(kvr_consensus_change *req, int status);
    void *data;
};
int kvr_consensus_add(kvr_consensus *c, kvr_consensus_change *req, uint32_t id, const char *addr);
int kvr_consensus_assign_voter(kvr_consensus *c, kvr_consensus_change *req, uint32_t id);
int kvr_consensus_remove(kvr_consensus *c, kvr_consensus_change *req, uint32_t id);

typedef struct kvr_consensus_transfer kvr_consensus_transfer;
struct kvr_consensus_transfer {
    struct raft_transfer raft; /* private */
    void (*cb)(kvr_consensus_transfer *req);
    void *data;
};
int kvr_consensus_transfer_leadership(kvr_consensus *c, kvr_consensus_transfer *req, uint32_t id);
/* raft's message for its last error (a failed disk write names the system error); owned by
 * raft, valid until the next raft call. */
const char *kvr_consensus_errmsg(kvr_consensus *c);

typedef enum {
    KVR_ROLE_UNAVAILABLE = 0,
    KVR_ROLE_FOLLOWER = 1,
    KVR_ROLE_CANDIDATE = 2,
    KVR_ROLE_LEADER = 3,
} kvr_consensus_role;
kvr_consensus_role kvr_consensus_get_role(kvr_consensus *c);
const char *kvr_consensus_role_name(kvr_consensus_role r);
/* Leader id (0 if unknown) and its raft address (NULL if unknown; valid until the next loop turn). */
uint32_t kvr_consensus_leader(kvr_consensus *c, const char **addr);
uint64_t kvr_consensus_term(kvr_consensus *c);
uint64_t kvr_consensus_commit_index(kvr_consensus *c);
uint64_t kvr_consensus_applied_index(kvr_consensus *c);
uint32_t kvr_consensus_id(kvr_consensus *c);
/* Address of peer id from the current configuration (NULL if unknown). */
const char *kvr_consensus_peer_addr(kvr_consensus *c, uint32_t id);

/* Memory log only (else zeros): see kvr_memlog_stats. */
typedef struct kvr_consensus_memlog_stats {
    bool memory_log, restricted, may_vote;
    uint64_t withheld;
} kvr_consensus_memlog_stats;
void kvr_consensus_memlog_stats_get(kvr_consensus *c, kvr_consensus_memlog_stats *out);
/* True while this node needs a reload of its Raft files: the disk log is fenced after a failed
 * append (disklog.h: until a restart or a leader's snapshot), or the node is muted (below). */
bool kvr_consensus_log_fenced(kvr_consensus *c);
/* A term or vote could not be stored: the node speaks no more Raft until it restarts
 * (termguard.h). */
bool kvr_consensus_muted(kvr_consensus *c);
/* Tests only: switch memlog's vote rule off (KVR_TEST_NO_VOTE_RULE=1 in routerd). */
void kvr_consensus_disable_vote_rule(kvr_consensus *c);

/* raft_close, then raft_uv_close + raft_uv_tcp_close; close_cb after which c is freed.
 * Pending proposals fail with KVR_ECLOSED (or KVR_EAGAIN) before close_cb. */
void kvr_consensus_close(kvr_consensus *c, void (*close_cb)(void *data), void *data);

#endif
