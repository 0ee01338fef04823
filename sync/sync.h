/* sync: the replicated route-and-reserve module the router daemon uses (DESIGN sections 5, 6).
 *
 * Every router replica runs one kvr_sync. Commands (kvr_cmd, see fsm.h) are agreed through
 * one Raft group (canonical/raft, libuv TCP) and applied to every replica's kvr_fsm; the route
 * decision is made inside apply, so all replicas book the same worker.
 *
 * Any router answers. The leader batches the commands that arrive in one loop turn (its own and
 * forwarded ones) into one log entry and answers each with its apply result. A follower
 * forwards a command to the leader over kvroute's own forwarding RPC and answers when the
 * leader replies with the result after applying it. On leadership change, connection loss or
 * a per-try timeout it retries with the same command (idempotent per request_id), with bounded
 * waits.
 *
 * Ports: each node listens for Raft on its raft_addr host:P and for forwarded commands on
 * host:P+1 ("raft port + 1"). A cluster launcher must leave P+1 free for every router.
 * Forwarding frames: u32 big-endian length, then msgpack. Request [1, rpc_id, cmd bin];
 * reply [2, rpc_id, status, outcome, type, worker_id, overlap, request_blocks, freed, url].
 * Frames over 64 KiB are refused and the connection closed.
 *
 * A leader whose own log write fails (KVR_EIO from raft: a full or failing disk) logs raft's
 * message and transfers leadership to the most up-to-date voter.
 *
 * Degraded vs lost: degraded (below) starts after degraded_after_ms without a leader, also
 * during start-up and an ordinary election, and only decides how a waiting command is
 * answered (locally). kvr_sync_state.quorum_lost is stricter: a leader was known since start
 * and none for more than 2x election_timeout_ms; routerd uses it (with another router's word
 * that it has a quorum) to leave the NATS queue groups, so a client never finds no router
 * answering during an election (routerd/README.md says what clients see in each case).
 *
 * Degraded mode: when no leader has been known for degraded_after_ms (no quorum reachable),
 * a command that is still unanswered is applied to a local copy of this replica's state
 * (cloned when degradation starts) and answered with mode KVR_SYNC_LOCAL. Every command
 * applied locally is remembered. When a leader is known again the module reconciles by
 * re-proposing through Raft: each booking made locally and still live becomes a ROUTE pinned
 * to the worker that local mode chose (pin_worker, so load accounting reflects where the
 * request really runs; it moves the booking if the same request was also booked through Raft),
 * followed by PREFILL_DONE when its prefill finished; a request routed and finished locally
 * becomes a FREE (its ROUTE may still commit from the node's own log); the other local
 * commands (FREE, PREFILL_DONE of Raft bookings, WORKER_*, FRONTEND_*, EXPIRE) are
 * re-proposed in order. All are idempotent, so a retried or repeated reconcile is harmless.
 * Then the local copy is dropped. Ordering: a FREE that reaches Raft before the ROUTE it frees
 * (the pinned reconcile ROUTE, or a ROUTE still in this node's log from before the quorum was
 * lost) records the request as finished in the FSM, so that ROUTE answers KVR_OUT_FINISHED and
 * books nothing: load accounting converges whatever order the commands commit in (within the
 * FSM's finished-record bound, fsm.h). A local ROUTE answered "finished" by the local copy is
 * re-proposed as a FREE (harmless).
 *
 * Signals: kvr_sync_init sets SIGPIPE to SIG_IGN if it is at its default (a peer closing a
 * socket must not kill the process).
 * Threads: everything (calls and callbacks) on the loop thread passed to kvr_sync_init.
 * Memory: the caller's kvr_cmd / kvr_route_cmd is encoded at submission; the caller may reuse
 * it as soon as the call returns. The kvr_fsm_result passed to a callback is valid only during
 * the callback. */
#ifndef KVR_SYNC_SYNC_H
#define KVR_SYNC_SYNC_H

#include "fsm.h"
#include "kvr_err.h"
#include "peer_auth.h"

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

typedef struct kvr_sync kvr_sync;

typedef struct kvr_sync_options {
    uint32_t id;                   /* this node's Raft id, >= 1 */
    const char *raft_addr;         /* "host:port" (IPv4 dotted quad) */
    const char *peers;             /* "1@host:port,2@host:port,3@host:port": the initial voters */
    const char *data_dir;          /* created if missing; holds the Raft log and snapshots */
    bool join;                     /* true: start without bootstrapping (a node added at run time) */
    uint32_t degraded_after_ms;    /* default 500 */
    uint32_t forward_timeout_ms;   /* per try; default 1000 */
    uint32_t max_wait_ms;          /* total per command: then KVR_ETIMEDOUT (while a leader is
                                    * known; without one it was answered locally); default 5000.
                                    * Reconcile re-proposals wait 60 s. */
    uint32_t election_timeout_ms;  /* default 1000 */
    uint32_t heartbeat_timeout_ms; /* default 100 */
    uint32_t snapshot_threshold;   /* log entries between snapshots; default 8192 (each snapshot
                                      stalls appends for tens of ms in 0.15: keep them rare) */
    uint32_t snapshot_trailing;    /* entries kept after a snapshot; default 2048 */
    uint32_t max_batch;            /* commands per log entry; default 512 */
    uint32_t max_inflight;         /* log entries proposed and not yet committed before new
                                      commands wait for the next entry (group commit);
                                      default 1 */
    /* Housekeeping, done by the leader only, through Raft: every housekeeping_ms (default
     * 1000) it proposes FRONTEND_EXPIRE for each frontend it has not heard from (through
     * kvr_sync_frontend_seen) for lease_ttl_ms (default 10000) on its monotonic clock, counted
     * from when it took office at the earliest (lease.h), and EXPIRE{wall now -
     * max_request_age_ms} (default 600000). 0 keeps the default; set
     * housekeeping_ms to UINT32_MAX to disable. */
    uint32_t housekeeping_ms, lease_ttl_ms, max_request_age_ms;
    /* Worker liveness, leader only (liveness.h): WORKER_DOWN for a worker up in the
     * replicated registry that the leader has not heard (kvr_sync_worker_seen) for
     * worker_ttl_ms (0, the default: off, for users that report no heartbeats; kvr-routerd
     * sets --heartbeat-misses seconds) on its monotonic clock, counted from its taking office at
     * the earliest. Request age is measured the same way (max_request_age_ms from when the
     * leader applied the booking or took office), never from wall-clock stamps. */
    uint32_t worker_ttl_ms;
    kvr_fsm_options fsm;
    /* Cluster secret (copied at init). Set: peers authenticate on the Raft port and the
     * forward port with the peer_auth handshake before any message or command is read
     * (peer_auth.h). NULL or empty: no authentication (only with --insecure-cluster). */
    const kvr_auth_key *auth_key;
    uint32_t port_wait_ms; /* how long start waits for a busy Raft/forward port; default 10000 */
    /* Called on the loop thread, on the node that is the Raft leader when it applies a
     * committed WORKER_DOWN that took an up worker down (not for one already down, not on
     * followers, not for commands applied to a degraded node's local copy). down_seq is the
     * worker's replicated down stamp (kvr_fsm_result.down_seq): the same on every replica, so
     * a leader that publishes something for it can name it (kvr-routerd publishes the
     * worker's AllBlocksCleared with a JetStream msg-id built from it). NULL: not called. */
    void (*worker_down_cb)(void *data, uint64_t worker_id, uint64_t down_seq);
    void *worker_down_data;
    /* true: the Raft log and snapshots in memory, term and vote on disk (consensus.h,
     * memlog.h; kvr-routerd's default, --raft-log memory); false (this struct's default): the
     * log on disk with an fsync per entry batch. memory_hold_ms: see memlog.h (0: 4000). */
    bool memory_log;
    uint32_t memory_hold_ms;
    /* Commands nobody waits for (FREE, PREFILL_DONE) do not open a log entry of their own: a
     * queue holding only such commands is proposed once its oldest has waited coalesce_us
     * (default 1000), or at once with the next command someone waits for. */
    uint32_t coalesce_us;
    /* Per-hop latency of route-and-reserve commands (kvr-routerd exports them as
     * kvr_routerd_raft_hop_seconds{hop}); NULL: not measured. Called on the loop thread. */
    void (*hop_cb)(void *data, int hop, double seconds);
    void *hop_data;
    /* Called on the loop thread when this node becomes the Raft leader (true) or stops being
     * it (false), noticed within one sync tick (10 ms). kvr-routerd answers the leader's own
     * route subject while true (DESIGN.md 4). NULL: not called. */
    void (*leader_cb)(void *data, bool leader);
    void *leader_data;
    /* Called once, on the loop thread, when this node's Raft needs a reload: the disk log has
     * been fenced for 1 s since an append failed (a full disk; disklog.h: raft writes nothing
     * more, a leader's snapshot not having lifted it), or a term or vote could not be stored
     * (termguard.h, either log: the node is muted), and the data dir has room again. Reloading
     * Raft from its files (contiguous up to the last good write) is the way back (kvr-routerd
     * restarts itself in place). NULL: only logged. */
    void (*log_fenced_cb)(void *data);
    void *log_fenced_data;
} kvr_sync_options;

/* The hops hop_cb reports. On the leader, per command: QUEUE from arrival (its own or
 * forwarded by a follower) to its entry being proposed; COMMIT from proposal to committed and
 * applied; REPLY from applied to its answer handed over (caller's callback, or the forward
 * connection's buffer); LEADER the whole stay on the leader. On a follower: FORWARD from
 * sending a command to the leader to its answer arriving (one try). */
enum {
    KVR_SYNC_HOP_QUEUE = 0,
    KVR_SYNC_HOP_COMMIT = 1,
    KVR_SYNC_HOP_REPLY = 2,
    KVR_SYNC_HOP_LEADER = 3,
    KVR_SYNC_HOP_FORWARD = 4,
    KVR_SYNC_HOP_N = 5
};

/* Defaults for every field; the caller sets id, raft_addr, peers, data_dir. */
void kvr_sync_options_default(kvr_sync_options *o);

typedef enum kvr_sync_mode {
    KVR_SYNC_RAFT = 0,  /* agreed through Raft */
    KVR_SYNC_LOCAL = 1, /* degraded: applied to this router's own copy only */
} kvr_sync_mode;
const char *kvr_sync_mode_name(kvr_sync_mode m); /* "raft" / "local" */

/* Answer to a command. status 0: res holds the FSM result (res->outcome says what the FSM did).
 * status < 0: KVR_ECLOSED (module closing), KVR_EINVAL (command could not be encoded); res is
 * NULL. Runs on the loop thread, never from inside the submitting call. */
typedef void (*kvr_sync_cb)(kvr_sync *s, int status, const kvr_fsm_result *res,
                            kvr_sync_mode mode, void *data);

/* Allocates and initialises (Raft I/O, data dir, forwarding listener are set up in start). */
int kvr_sync_init(kvr_sync **out, uv_loop_t *loop, const kvr_sync_options *opts, kvr_err *err);
/* Starts Raft (bootstraps the peers configuration on a pristine data dir unless join) and the
 * forwarding listener on raft port + 1. */
int kvr_sync_start(kvr_sync *s, kvr_err *err);

int kvr_sync_route(kvr_sync *s, const kvr_route_cmd *cmd, kvr_sync_cb cb, void *data);
int kvr_sync_submit(kvr_sync *s, const kvr_cmd *cmd, kvr_sync_cb cb, void *data);
/* A frontend's lease beat (kvr.frontends.<id>), heard by this router. Every router calls it;
 * only the leader proposes, FRONTEND_SEEN only when the replicated lease table lacks the
 * frontend, and FRONTEND_EXPIRE once it has been silent for lease_ttl_ms on the leader's
 * monotonic clock (lease.h). */
void kvr_sync_frontend_seen(kvr_sync *s, uint64_t frontend_id);
/* A valid heartbeat of worker_id heard by this router. Every router calls it; only the leader
 * acts on it (liveness.h): it proposes WORKER_DOWN for workers up in the registry and not heard
 * for worker_ttl_ms. Followers never propose WORKER_DOWN for silence. */
void kvr_sync_worker_seen(kvr_sync *s, uint64_t worker_id);
/* The worker no longer counts as heard (refused: its beats are not valid any more). */
void kvr_sync_worker_forget(kvr_sync *s, uint64_t worker_id);
/* No heartbeat could be heard until now (this router's NATS connection is down, its loop
 * stalled): silence until now says nothing; every worker gets a full worker_ttl_ms. */
void kvr_sync_liveness_hold(kvr_sync *s);
/* True while this node decides worker liveness: it is the Raft leader, or it is degraded
 * (no quorum: it answers from its own copy, so its own WORKER_DOWN is applied there and
 * re-proposed at reconcile like every local command). */
bool kvr_sync_owns_liveness(kvr_sync *s);
/* Commands submitted here whose callback has not run yet (its own and, on the leader, those
 * forwarded by followers). */
uint32_t kvr_sync_pending(kvr_sync *s);

/* Stops accepting commands, answers every pending one with KVR_ECLOSED, closes Raft and all
 * handles; close_cb runs when everything is closed, after which s is freed. */
void kvr_sync_close(kvr_sync *s, void (*close_cb)(void *data), void *data);

/* State for GET /v1/state. */
typedef struct kvr_sync_state {
    uint32_t id;
    const char *role; /* "leader" | "follower" | "candidate" | "unavailable" */
    uint32_t leader_id; /* 0 when unknown */
    uint64_t term, commit_index, applied_index;
    uint64_t digest;    /* kvr_fsm_digest of the Raft replica */
    uint32_t bookings, workers;
    bool degraded;      /* answering locally now */
    uint32_t local_pending; /* commands applied locally and not yet reconciled */
    /* This node knew a leader since it started and has known none for more than 2x the
     * election timeout (monotonic clock): it lost the majority, it is not merely electing or
     * starting. quorum_lost_since_ms: kvr_mono_ms() when that began (0 when not lost). */
    bool quorum_lost;
    int64_t quorum_lost_since_ms;
    /* --raft-log memory (memlog.h): log_memory; vote_restricted: restarted with a durable
     * term > 1 and not yet allowed to vote; votes_withheld: grants turned into refusals. */
    bool log_memory, vote_restricted;
    uint64_t votes_withheld;
    /* --raft-log disk (disklog.h): an append failed and the log is fenced until a reload */
    bool log_fenced;
} kvr_sync_state;
void kvr_sync_get_state(kvr_sync *s, kvr_sync_state *out);
uint64_t kvr_sync_digest(kvr_sync *s);
/* The Raft replica's state machine, read-only, for the worker list and booking lookups. Valid
 * until the next loop turn. */
const kvr_fsm *kvr_sync_fsm(kvr_sync *s);

typedef struct kvr_sync_metrics {
    uint64_t commits;            /* log entries applied */
    uint64_t commands_applied;   /* commands applied through Raft */
    uint64_t proposals;          /* log entries proposed by this node as leader */
    uint64_t forwards;           /* commands forwarded to a leader */
    uint64_t forward_retries;
    uint64_t forward_latency_us_sum, forward_latency_count;
    uint64_t forwarded_in;       /* commands received from followers */
    uint64_t elections;          /* leader changes seen */
    uint64_t degraded_answers;   /* commands answered in local mode */
    uint64_t reconciled;         /* local commands re-proposed */
} kvr_sync_metrics;
void kvr_sync_get_metrics(kvr_sync *s, kvr_sync_metrics *out);

/* Membership (on the leader only; elsewhere KVR_EAGAIN with the leader id in *leader if not
 * NULL). One change at a time. cb(status) on the loop thread: 0 done, <0 failed. */
typedef void (*kvr_sync_change_cb)(kvr_sync *s, int status, void *data);
int kvr_sync_add_node(kvr_sync *s, uint32_t id, const char *raft_addr, kvr_sync_change_cb cb,
                      void *data, uint32_t *leader);
int kvr_sync_promote_node(kvr_sync *s, uint32_t id, kvr_sync_change_cb cb, void *data,
                          uint32_t *leader);
int kvr_sync_remove_node(kvr_sync *s, uint32_t id, kvr_sync_change_cb cb, void *data,
                         uint32_t *leader);
/* Hands leadership to another voter (id 0: the most up-to-date one). cb status 0 once this
 * node stepped down (the winner may not be known yet), KVR_EAGAIN when it still leads (the
 * transfer timed out: the target did not catch up or win in time). */
int kvr_sync_transfer(kvr_sync *s, uint32_t id, kvr_sync_change_cb cb, void *data,
                      uint32_t *leader);

#endif
