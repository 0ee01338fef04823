/* sync_int: the private state of kvr_sync (sync.h) and the functions its files share. Include
 * only from sync/sync*.c.
 *
 * Files: sync.c (the group's lifecycle: options, init/start/close, the pending-command list,
 * dispatch, the tick/check/prepare handlers, housekeeping, state and metrics), sync_fwd.c
 * (forwarding follower -> leader), sync_batch.c (leader batching, FREE/PREFILL_DONE coalescing,
 * apply of committed entries), sync_local.c (degraded mode and reconcile), sync_members.c
 * (membership admin).
 *
 * Threads: everything here runs on the loop thread that owns the kvr_sync. Memory: a pending
 * is owned by the list s->head until sync_pending_finish frees it; batches by s->inflight
 * until their apply; connections by s->conns until conn_closed. */
#ifndef KVR_SYNC_SYNC_INT_H
#define KVR_SYNC_SYNC_INT_H

#include "sync.h"

#include "consensus.h"
#include "entry.h"
#include "lease.h"
#include "liveness.h"
#include "peer_auth.h"

#include <netinet/in.h>
#include <uv.h>

#define FWD_MAX_AUTHING 32 /* inbound forward-port handshakes at once; more are closed */
#define FWD_SLOTS (1u << 16)
#define TICK_MS 10

typedef struct pending pending;
typedef struct conn conn;
typedef struct batch batch;

enum { P_WAIT, P_BATCH, P_FWD, P_DONE };

struct pending {
    kvr_sync *s;
    pending *prev, *next;
    char *cmd;
    size_t cmd_len, cmd_cap;
    kvr_sync_cb cb;
    void *data;
    conn *from; /* forwarded to us by a follower: answer there */
    uint64_t from_rpc;
    bool internal; /* a reconcile re-proposal: nobody waits */
    bool reconcile; /* re-proposes local-mode state: waits RECONCILE_WAIT_MS, not max_wait_ms */
    bool lazy;      /* FREE or PREFILL_DONE: may wait coalesce_us for company in an entry */
    int state;
    int64_t start_ms, try_deadline_ms;
    int64_t fwd_start_us;
    /* hop stamps (kvr_mono_ns; 0: not reached): arrival on the leader, queued, proposed,
     * committed */
    int64_t t_in_ns, t_queued_ns, t_prop_ns, t_commit_ns;
    uint64_t rpc_id;
    conn *via;
    kvr_sync_mode mode;
    int status;
    bool have_res;
    kvr_fsm_result res;
};

struct conn {
    kvr_sync *s;
    uv_tcp_t tcp;
    conn *next;
    bool inbound, connected, closing;
    bool authing; /* peer_auth handshake running: nothing is read or sent as a frame */
    kvr_auth_hs hs;
    uint32_t peer; /* outbound: the peer id */
    kvr_buf in, out;
    uv_write_t wreq;
    bool writing;
    kvr_buf wbuf; /* bytes handed to uv_write */
};

struct batch {
    kvr_consensus_req req;
    kvr_sync *s;
    batch *next;
    uint64_t seq;
    int64_t proposed_ms;
    uint32_t n, applied;
    pending **items;
};

typedef struct local_rec {
    char *cmd;
    size_t len;
} local_rec;

struct kvr_sync {
    uv_loop_t *loop;
    kvr_sync_options o;
    char *raft_addr, *peers, *data_dir;
    kvr_consensus *cons;
    kvr_consensus_fsm cfsm;
    kvr_fsm *fsm;
    uint64_t nonce, next_seq, next_rpc;
    pending head; /* circular list of outstanding commands */
    uint32_t n_pending;
    pending **fwd_slots;
    batch *inflight, *inflight_tail;
    uint32_t n_inflight;
    pending **queue; /* commands for the next batch */
    uint32_t n_queue, cap_queue;
    uv_timer_t tick;
    uv_check_t check;
    uv_prepare_t prep;
    uv_timer_t coalesce; /* wakes sync_flush_batches for a queue of lazy commands */
    uv_tcp_t listener;
    bool listening, started, closing;
    kvr_auth_key key;   /* len 0: forward port unauthenticated (--insecure-cluster) */
    uint32_t n_authing; /* inbound handshakes running */
    uint64_t auth_refused;
    conn *conns;
    conn *clients[KVR_CONSENSUS_MAX_PEERS + 1]; /* by slot, lookup by peer id */
    uint32_t last_leader;
    int64_t no_leader_since;
    bool had_leader; /* a leader was known since start: only then can the quorum be "lost" */
    int64_t last_housekeeping_ms;
    kvr_lease_tracker leases; /* the leader's frontend-lease policy (lease.h) */
    kvr_live_tracker live;    /* the leader's worker-liveness policy (liveness.h) */
    bool was_leader;
    bool leader_told; /* what leader_cb was last told */
    bool degraded;
    bool io_transfer; /* a leadership transfer after a failed log write is running */
    kvr_consensus_transfer io_treq;
    int64_t io_error_ms; /* last failed log write (mono), 0: none */
    /* log_fenced_cb's watch (sync_batch.c sync_check_log_fenced): since when the log is fenced */
    int64_t fenced_since_ms;
    bool fenced_told;
    kvr_fsm *local;
    local_rec *log;
    uint32_t n_log, cap_log;
    kvr_sync_metrics m;
    pending *pool;  /* finished pendings kept for reuse (sync_pending_new), linked by next */
    uint32_t n_pool;
    kvr_buf enc;    /* kvr_sync_submit's encoding scratch, reused */
    int handles_open;
    void (*close_cb)(void *);
    void *close_data;
};

static const uint32_t LOCAL_LOG_MAX = 200000;
/* A reconcile command dropped after max_wait_ms (5 s) was a leaked booking or a lost FREE:
 * right after a partition heals, forwarding connections to the leader are still being
 * re-established (the old ones died silently) and the leader may change again, so these
 * commands get a minute before they are given up. */
static const int64_t RECONCILE_WAIT_MS = 60000;

/* sync.c: group lifecycle, pending commands, dispatch, timers */
void sync_plist_add(kvr_sync *s, pending *p);
void sync_fwd_slot_clear(kvr_sync *s, pending *p);
void sync_hop(kvr_sync *s, int h, int64_t from_ns, int64_t now_ns);
/* sync_batch.c: tells log_fenced_cb (once) when the log is fenced or the node muted and a
 * reload can succeed (sync.h). From every tick. */
void sync_check_log_fenced(kvr_sync *s, int64_t now);
void sync_pending_finish(kvr_sync *s, pending *p);
void sync_pending_ready(kvr_sync *s, pending *p);
pending *sync_pending_new(kvr_sync *s, const char *cmd, size_t len);
void sync_dispatch(kvr_sync *s, pending *p);

/* sync_fwd.c: forwarding to the leader */
int sync_send_reply(conn *c, uint64_t rpc, int status, const kvr_fsm_result *r);
void sync_conn_close(conn *c);
void sync_conn_flush(conn *c);
void sync_on_accept(uv_stream_t *server, int status);
int sync_fwd_sockaddr(const char *raft_addr, struct sockaddr_in *sa);
void sync_forward(kvr_sync *s, pending *p, uint32_t leader, const char *leader_addr);

/* sync_local.c: degraded mode and reconcile */
void sync_apply_local(kvr_sync *s, pending *p);
void sync_reconcile(kvr_sync *s);

/* sync_batch.c: batching, coalescing, apply */
void sync_batch_free(batch *b);
void sync_flush_batches(kvr_sync *s);
void sync_enqueue_batch(kvr_sync *s, pending *p);
void sync_fsm_apply_cb(void *data, uint64_t index, const void *buf, size_t len);
int sync_fsm_snapshot_cb(void *data, kvr_buf *out);
int sync_fsm_restore_cb(void *data, const void *buf, size_t len);

#endif
