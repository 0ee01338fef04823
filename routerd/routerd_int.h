/* routerd_int.h: what the files of kvr-routerd share (private to routerd/; routerd.h is the
 * public face). One libuv loop thread owns a kvr_routerd and runs every function declared
 * here (routerd.h says which other threads hand work to it and how).
 *
 * The files, one concern each:
 *   routerd.c     start, stop, the NATS connection state and the 250 ms tick
 *   ingest.c      JetStream consumer, KV event apply, readiness, worker clears
 *   workers.c     heartbeats, worker table, worker and frontend liveness
 *   route_api.c   route and match over NATS and HTTP, route events and their relay
 *   admin.c       the HTTP server's dispatch, /v1/state, /admin/raft/..., access control
 *   snapshot.c    LMDB snapshots of the index (threadpool writes)
 *   metrics.c     metric registration and the index gauges
 *   bookings*.c   where bookings live: local FSM, Raft (kvr_sync), best-effort broadcast
 */
#ifndef KVR_ROUTERD_INT_H
#define KVR_ROUTERD_INT_H

#include "bookings.h"
#include "routerd.h"
#include "fsm.h"
#include "approx.h"
#include "index.h"
#include "kv_event.h"
#include "kvr_access.h"
#include "kvr_buf.h"
#include "kvr_err.h"
#include "kvr_hash.h"
#include "kvr_heartbeat.h"
#include "kvr_http.h"
#include "kvr_json.h"
#include "kvr_log.h"
#include "kvr_loop_stat.h"
#include "kvr_metrics.h"
#include "kvr_mp.h"
#include "kvr_nats.h"
#include "kvr_nats_flags.h"
#include "liveness.h"
#include "route_msg.h"
#include "snapshot.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>


#define RD_STREAM "KVR_EVENTS"
#define RD_MAX_WORKERS 1024
#define RD_MAX_FRONTENDS 4096
#define RD_MAX_SEQ_HASHES 65536
#define RD_MAX_MATCHES 1024
#define RD_TICK_MS 250
/* AllBlocksCleared events this router (the leader) still has to get into the stream, and how
 * long it keeps trying one: well inside JetStream's default 2-minute duplicate window, so a
 * retry after a lost ack is dropped by its msg-id instead of landing twice. */
#define RD_MAX_CLEARS 64
#define RD_CLEAR_GIVE_UP_MS 60000

enum {
    REJ_TRUNCATED = 0, /* kv_event reasons first, in kvr_kv_reject order - 1 */
    REJ_TYPE,
    REJ_LIMIT,
    REJ_UNKNOWN_TAG,
    REJ_INVALID,
    REJ_TRAILING,
    REJ_BAD_SUBJECT,
    REJ_OTHER_NS,
    REJ_WORKER_DOWN,
    REJ_REFUSED_WORKER,
    REJ_UNKNOWN_PARENT,
    REJ_BLOCK_SIZE,
    REJ_OVER_BOUND,
    REJ_NO_SLOT,
    REJ__N
};
/* Label values of the labelled metrics (metrics.c), NULL-terminated and indexed by the enum
 * beside them; route_decisions_total{mode} is indexed by rd_decided (bookings.h) and
 * raft_hop_seconds{hop} by KVR_SYNC_HOP_* (sync.h). */
enum { RD_ROUTE_ERR_BACKEND, RD_ROUTE_ERR_NO_WORKER, RD_ROUTE_ERR_BAD_REQUEST };
extern const char *const rd_route_err_names[]; /* route_errors_total{reason} */
/* events_rejected_total{reason}, indexed by REJ_* */
extern const char *const rd_rej_names[];

typedef struct rd_worker {
    uint64_t id;
    char ns[KVR_FSM_NS_MAX + 1];
    char model[KVR_FSM_MODEL_MAX + 1];
    char url[KVR_FSM_URL_MAX + 1];
    char role[16];
    uint32_t block_size, capacity;
    uint32_t active, waiting, used_blocks;
    uint64_t started_ms;
    int64_t last_seen_ms; /* monotonic */
    bool up, refused;
    bool announced;         /* has sent a valid heartbeat */
    int64_t resync_ms;      /* last WORKER_UP re-submitted because the replicated state lacked it */
    int64_t first_event_ms; /* !announced: monotonic time of its first event */
    uint64_t events;        /* messages applied for it */
    /* LoRA adapters it serves (heartbeat "loras"), kept as their hash seeds: a request under
     * an adapter some live worker lists may go only to those workers */
    uint64_t lora_seeds[KVR_HB_MAX_LORAS];
    uint32_t n_loras;
    char mdc_sum[KVR_ROUTE_NAME_MAX + 1]; /* model card checksum; "" unknown */
    bool has_stored; /* stored blocks through KV events: its approx guesses are ignored */
} rd_worker;

/* One worker's AllBlocksCleared to publish (see on_worker_down_committed). */
typedef struct rd_clear {
    uint64_t worker_id, down_seq; /* down_seq: the FSM's replicated down stamp */
    char ns[KVR_FSM_NS_MAX + 1];
    int64_t first_ms, next_ms; /* monotonic: queued, next try */
    bool inflight;
} rd_clear;

typedef struct rd_pools rd_pools; /* pools.c */

typedef struct rd_frontend {
    uint64_t id;
    int64_t last_seen_ms; /* monotonic */
} rd_frontend;

/* a route event in flight (route_event, on_event_done) */
typedef struct ev_ctx {
    uint8_t rid[KVR_REQUEST_ID_LEN];
    int type;
    bool relayed; /* already relayed, or heard on the plain subscription: never relayed */
} ev_ctx;

struct kvr_routerd {
    kvr_routerd_config cfg;
    uv_loop_t *loop;
    char *data_dir;
    char *snap_dir; /* <data_dir>/index */
    char ns_filter[KVR_FSM_NS_MAX + 1]; /* "" = all */
    /* NATS */
    kvr_nats nats;
    bool nats_up;
    kvr_nats_consumer *consumer;
    uv_timer_t stream_retry;
    bool stream_started;
    /* index */
    kvr_index *idx;
    kvr_kv_decoder dec;
    uint64_t snap_seq;       /* sequence covered by the loaded snapshot (0: none) */
    bool snap_loaded;
    uint64_t start_seq;      /* first sequence consumed in this run */
    uint64_t target_seq;     /* stream's last sequence observed at start */
    uint64_t stream_first, stream_last;
    uint64_t applied_msgs;   /* stream messages applied in this run */
    uint64_t applied_blocks;
    uint64_t last_pending;
    bool ready;
    int64_t start_ms;
    /* registry */
    rd_worker workers[RD_MAX_WORKERS];
    uint32_t n_workers;
    rd_frontend frontends[RD_MAX_FRONTENDS];
    uint32_t n_frontends;
    /* bookings */
    const rd_bookings_ops *bk; /* the mode, picked at start (bookings.h) */
    kvr_fsm *fsm;              /* local and best-effort modes book here */
    struct kvr_sync *sync;     /* Raft mode (bookings_raft.c); NULL once closed */
    /* the routers' queue groups (kvr.route once ready, kvr.route.event), and while Raft is
     * degraded the plain kvr.route.event subscription that replaces the latter
     * (follow_quorum, bookings_raft.c) */
    kvr_nats_sub *sub_route, *sub_event, *sub_event_all;
    kvr_nats_sub *sub_route_leader; /* kvr.route.leader while this router is the Raft leader */
    kvr_nats_sub *sub_event_leader; /* kvr.route.leader.event, the same while */
    kvr_loop_stat loop_stat;        /* kvr_routerd_loop_busy_seconds */
    bool raft_leader;               /* kvr_sync's leader_cb: this router leads the group */
    bool policy_inflight;           /* a ROUTE_POLICY of this router's weights is proposed */
    bool groups_left;
    /* rd_hand_over (before a restart in place or a stop): queue groups drained, commands
     * finishing; nothing rejoins a queue group meanwhile */
    bool handing_over;
    int handover_drains; /* subscriptions still draining */
    int64_t handover_since_ms;
    void (*handover_done)(struct kvr_routerd *rd);
    bool stop_requested; /* kvr_routerd_stop was called (stopping follows the hand-over) */
    /* kvr_mono_ms() when another router last said it is in the kvr.route queue group with a
     * Raft leader (kvr.routers.quorum), 0: never */
    int64_t peer_quorum_ms;
    uint64_t groups_left_n; /* times it left them (GET /v1/state raft.queue_groups_left) */
    ev_ctx *relay_q;        /* route events to relay once out of the queue groups (on_event_done) */
    uint32_t n_relay, cap_relay;
    /* HTTP + metrics */
    kvr_http_server http;
    kvr_metrics *metrics;
    kvr_metric *m_events_applied, *m_blocks_applied, *m_events_rejected, *m_stream_lag,
        *m_stream_seq, *m_route_decisions, *m_route_errors, *m_route_latency, *m_raft_hop, *m_index_entries,
        *m_index_blocks, *m_index_bytes, *m_snap_duration, *m_snap_bytes, *m_snaps,
        *m_snap_failures, *m_ready_s, *m_workers_up, *m_workers_refused, *m_replayed,
        *m_nats_reconnects, *m_consumer_restarts, *m_nats_backpressure, *m_unknown_worker,
        *m_unannounced_removed, *m_snap_export;
    int64_t ready_ms;
    /* timers */
    uv_timer_t tick;      /* 250 ms: heartbeats, leases, expiry */
    uv_timer_t snap_timer;
    int64_t last_expire_ms;
    /* snapshots */
    bool snap_running;
    uint64_t snap_last_written_seq;
    uint64_t snap_last_digest;
    /* stopping */
    bool stopping;
    int closing_handles;
    void (*done_cb)(void *);
    void *done_data;
    /* scratch */
    uint64_t *seq_scratch;
    uint32_t *tok_scratch; /* max_tokens entries: token ids of one HTTP request */
    size_t max_tokens;     /* --max-request-tokens, capped by what seq_scratch can hash */
    kvr_index_match matches[RD_MAX_MATCHES];
    /* access and liveness (docs/SECURITY.md sections 4 and 5) */
    kvr_cidr_list worker_cidrs;
    int64_t last_tick_ms; /* monotonic time the tick last ran: a late tick is a loop stall */
    kvr_metric *m_http_unauthorized, *m_hb_refused_url, *m_workers_evicted, *m_tick_stalls;
    kvr_metric *m_bcast_rejected; /* best-effort mode: booking broadcasts refused */
    /* worker liveness of the local/best-effort FSM (liveness.h; with Raft the sync module's
     * leader owns it) and the orphan-entry sweep (entries of workers this router has no
     * record of, e.g. loaded from the LMDB snapshot) */
    kvr_live_tracker live;
    int64_t last_orphan_sweep_ms;
    kvr_index_worker_info *iw_scratch; /* RD_MAX_WORKERS entries */
    /* Clears to publish (rd_publish_clears): WORKER_DOWNs this router committed as leader. */
    rd_clear clears[RD_MAX_CLEARS];
    uint32_t n_clears;
    kvr_metric *m_clears_published;
    /* rd_clear_sweep: down workers with entries seen at the last sweep (stable ones get a clear) */
    uint64_t sweep_ids[RD_MAX_CLEARS];
    uint32_t n_sweep_ids;
    int64_t last_clear_sweep_ms;
    rd_pools *pools; /* scale-to-zero (pools.c); NULL without --pools-file */
    /* --index approx (approx_mode.c): guesses made in the ROUTE apply; NULL in events mode */
    kvr_approx *approx;
    uint64_t *approx_seq;  /* KVR_CMD_MAX_APPROX_HASHES: hashes decoded for an assume */
    uint8_t *approx_wire;  /* 8 x KVR_CMD_MAX_APPROX_HASHES: hashes encoded into a ROUTE */
    kvr_approx_stats approx_seen; /* counters already added to the metrics */
    kvr_metric *m_approx_entries, *m_approx_inserted, *m_approx_evicted, *m_approx_expired;
};

static inline void copy_slice(char *dst, size_t cap, kvr_slice s)
{
    size_t n = s.len < cap - 1 ? s.len : cap - 1;
    if (n)
        memcpy(dst, s.base, n);
    dst[n] = 0;
}

static inline bool ns_ok(kvr_routerd *rd, kvr_slice ns)
{
    return rd->ns_filter[0] == 0 || kvr_slice_eq_cstr(ns, rd->ns_filter);
}

rd_worker *rd_worker_find(kvr_routerd *rd, uint64_t id);
void rd_update_index_gauges(kvr_routerd *rd);
/* Replaces this process's image with a fresh start of the same command line (same pid, same
 * log): every state is rebuilt by the warm-restart path. First hands over (rd_hand_over),
 * then execs. A call while handing over does nothing. */
void rd_restart_in_place(kvr_routerd *rd, const char *why);
/* Raft mode: leaves the routers' queue groups without dropping what NATS already routed here
 * (kvr_nats_drain) and lets every command this router holds finish (a FREE lost with the
 * process would hold its booking until --max-request-age), then calls done on the loop
 * thread; at most RD_HANDOVER_MS. Uses rd->tick (the regular tick pauses meanwhile). A call
 * while handing over only replaces done. */
#define RD_HANDOVER_MS 2000
void rd_hand_over(kvr_routerd *rd, void (*done)(kvr_routerd *rd));
void rd_log_cmd_failure(kvr_routerd *rd, int status, const kvr_fsm_result *res, rd_decided how,
                        void *data);
void rd_queue_clear(kvr_routerd *rd, uint64_t worker_id, uint64_t down_seq);
void rd_publish_clears(kvr_routerd *rd, int64_t now);
void rd_clear_sweep(kvr_routerd *rd, int64_t now);
void rd_worker_submit_up(kvr_routerd *rd, rd_worker *w);
void rd_worker_down(kvr_routerd *rd, rd_worker *w, const char *why);
void rd_on_heartbeat(const kvr_nats_msg *m, void *data);
void rd_on_frontend(const kvr_nats_msg *m, void *data);
void rd_tick_compensate_stall(kvr_routerd *rd, int64_t now);
void rd_liveness_local(kvr_routerd *rd, int64_t now);
void rd_orphan_sweep(kvr_routerd *rd, int64_t now);
void rd_check_ready(kvr_routerd *rd);
void rd_start_stream(kvr_routerd *rd);
void rd_on_route_nats(const kvr_nats_msg *m, void *data);
void rd_on_route_event(const kvr_nats_msg *m, void *data);
void rd_on_route_event_all(const kvr_nats_msg *m, void *data);
void rd_relay_route_event(kvr_routerd *rd, const ev_ctx *e);
/* Subscribes to or leaves kvr.route.leader (DESIGN.md 4) as this router's state asks: the
 * Raft leader, ready, in the routers' queue groups. Idempotent; loop thread. */
void rd_leader_route_update(kvr_routerd *rd);
bool rd_peer_has_quorum(const kvr_routerd *rd, int64_t now);
void rd_respond_json(kvr_http_req *req, int status, kvr_buf *b);
void rd_respond_error(kvr_http_req *req, int status, const char *msg);
void rd_http_match(kvr_routerd *rd, kvr_http_req *req);
void rd_http_route(kvr_routerd *rd, kvr_http_req *req);
int rd_start_snapshot(kvr_routerd *rd, bool final);
void rd_on_snap_timer(uv_timer_t *t);
void rd_load_snapshot(kvr_routerd *rd);
void rd_maybe_finish_stop(kvr_routerd *rd);
void rd_register_metrics(kvr_routerd *rd);
void rd_on_http(kvr_http_req *req);
int rd_recreate_index(kvr_routerd *rd);

/* approx_mode.c (--index approx) */
void rd_fsm_options(kvr_routerd *rd, kvr_fsm_options *o); /* the FSM hooks of the mode */
int rd_approx_open(kvr_routerd *rd);
void rd_approx_close(kvr_routerd *rd);
bool rd_worker_has_events(kvr_routerd *rd, uint64_t worker_id);
/* Event matches, plus the approximate matches of workers without events, into rd->matches. */
size_t rd_find_matches(kvr_routerd *rd, const uint64_t *seq, size_t n);
/* Puts the request's seq hashes into a ROUTE (borrowing rd->approx_wire) in approx mode. */
void rd_approx_fill_cmd(kvr_routerd *rd, kvr_route_cmd *r, const uint64_t *seq, size_t n);
void rd_approx_metrics(kvr_routerd *rd);
void rd_approx_state_json(kvr_routerd *rd, kvr_jw *w);

void rd_closed_one(kvr_routerd *rd); /* routerd.c: one more handle closed while stopping */

/* pools.c: scale-to-zero. open: 0 without --pools-file; close: true when rd_closed_one will
 * follow. */
#define RD_POOL_RETRY_AFTER_MS 250 /* route reply "retry_after_ms" for a waking pool */
int rd_pools_open(kvr_routerd *rd, kvr_err *err);
void rd_pools_tick(kvr_routerd *rd);
bool rd_pools_close(kvr_routerd *rd);
void rd_pools_free(kvr_routerd *rd);
bool rd_pools_default_ns(kvr_routerd *rd, const char *model, char *ns, size_t cap);
void rd_pools_state_json(kvr_routerd *rd, kvr_jw *w);
/* kvr.pools.list / kvr.pools.set (queue group kvr-pools); 0 without --pools-file */
int rd_pools_subscribe(kvr_routerd *rd, kvr_err *err);

/* The bookings of this router's mode (bookings.h), by their old names. */
static inline int rd_submit(kvr_routerd *rd, const kvr_cmd *cmd, rd_cmd_cb cb, void *data)
{
    return rd->bk->submit(rd, cmd, cb, data);
}
static inline const kvr_fsm *rd_fsm(kvr_routerd *rd)
{
    return rd->bk->state(rd);
}

#endif
