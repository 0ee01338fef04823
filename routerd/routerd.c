/* routerd: see routerd.h. */
#include "routerd.h"

#include "fsm.h"
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
#include "kvr_metrics.h"
#include "kvr_mp.h"
#include "kvr_nats.h"
#include "kvr_nats_flags.h"
#include "liveness.h"
#include "route_msg.h"
#include "snapshot.h"
#ifdef KVR_ROUTERD_HAVE_SYNC
#include "sync.h"
#endif

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
static const char *const rej_names[] = {"truncated",     "bad_type",       "limit",
                                        "unknown_event", "invalid",        "trailing",
                                        "bad_subject",   "other_namespace", "worker_down",
                                        "refused_worker", "unknown_parent", "block_size",
                                        "over_bound",    "no_slot",        NULL};

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
} rd_worker;

/* One worker's AllBlocksCleared to publish (see on_worker_down_committed). */
typedef struct rd_clear {
    uint64_t worker_id, down_seq; /* down_seq: the FSM's replicated down stamp */
    char ns[KVR_FSM_NS_MAX + 1];
    int64_t first_ms, next_ms; /* monotonic: queued, next try */
    bool inflight;
} rd_clear;

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
    kvr_fsm *fsm; /* local mode */
#ifdef KVR_ROUTERD_HAVE_SYNC
    kvr_sync *sync;
#endif
    /* the routers' queue groups (kvr.route once ready, kvr.route.event), and while Raft is
     * degraded the plain kvr.route.event subscription that replaces the latter
     * (follow_quorum) */
    kvr_nats_sub *sub_route, *sub_event, *sub_event_all;
    bool groups_left;
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
    /* Clears to publish (publish_clears): WORKER_DOWNs this router committed as leader. */
    rd_clear clears[RD_MAX_CLEARS];
    uint32_t n_clears;
    kvr_metric *m_clears_published;
    /* clear_sweep: down workers with entries seen at the last sweep (stable ones get a clear) */
    uint64_t sweep_ids[RD_MAX_CLEARS];
    uint32_t n_sweep_ids;
    int64_t last_clear_sweep_ms;
};

/* ------------------------------------------------------------------------------------------ */
/* small helpers */

static void copy_slice(char *dst, size_t cap, kvr_slice s)
{
    size_t n = s.len < cap - 1 ? s.len : cap - 1;
    if (n)
        memcpy(dst, s.base, n);
    dst[n] = 0;
}

static rd_worker *worker_find(kvr_routerd *rd, uint64_t id)
{
    for (uint32_t i = 0; i < rd->n_workers; i++)
        if (rd->workers[i].id == id)
            return &rd->workers[i];
    return NULL;
}

static void update_index_gauges(kvr_routerd *rd)
{
    kvr_index_stats st;
    kvr_index_stats_get(rd->idx, &st);
    kvr_metric_set(rd->m_index_entries, 0, (double)st.entries);
    kvr_metric_set(rd->m_index_blocks, 0, (double)st.blocks);
    kvr_metric_set(rd->m_index_bytes, 0, (double)st.bytes);
    uint64_t seq = kvr_index_stream_seq(rd->idx);
    kvr_metric_set(rd->m_stream_seq, 0, (double)seq);
    uint64_t lag = rd->last_pending;
    if (rd->target_seq > seq && rd->target_seq - seq > lag)
        lag = rd->target_seq - seq;
    kvr_metric_set(rd->m_stream_lag, 0, (double)lag);
}

/* ------------------------------------------------------------------------------------------ */
/* bookings backend: local FSM or kvr_sync */

typedef void (*rd_cmd_cb)(kvr_routerd *rd, int status, const kvr_fsm_result *res,
                          const char *mode, void *data);

#ifdef KVR_ROUTERD_HAVE_SYNC
typedef struct sync_ctx {
    kvr_routerd *rd;
    rd_cmd_cb cb;
    void *data;
} sync_ctx;

static void on_sync_done(kvr_sync *s, int status, const kvr_fsm_result *res, kvr_sync_mode mode,
                         void *data)
{
    sync_ctx *c = data;
    if (c->cb)
        c->cb(c->rd, status, res, kvr_sync_mode_name(mode), c->data);
    free(c);
}
#endif

/* Best-effort mode: tells the other routers what this one just applied. A ROUTE goes out
 * pinned to the worker chosen here, so every router books the same worker for it. Frame:
 * msgpack [router_id, command bytes]. */
static void broadcast(kvr_routerd *rd, const kvr_cmd *cmd, const kvr_fsm_result *res)
{
    kvr_cmd c = *cmd;
    if (c.type == KVR_CMD_ROUTE) {
        if (res->outcome != KVR_OUT_OK)
            return;
        c.u.route.pin_worker = res->worker_id;
    } else if (c.type != KVR_CMD_FREE && c.type != KVR_CMD_PREFILL_DONE) {
        return;
    }
    kvr_buf cb, b;
    kvr_buf_init(&cb);
    kvr_buf_init(&b);
    if (kvr_cmd_encode(&c, &cb, NULL) == 0 && kvr_mp_write_array(&b, 2) == 0 &&
        kvr_mp_write_uint(&b, rd->cfg.id) == 0 && kvr_mp_write_bin(&b, cb.base, cb.len) == 0)
        kvr_nats_publish(&rd->nats, "kvr.route.bcast", b.base, b.len);
    kvr_buf_free(&cb);
    kvr_buf_free(&b);
}

/* Best-effort mode: another router's booking, prefill_done or free. */
static void on_bcast(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, m->data, m->len);
    uint32_t n;
    uint64_t from;
    kvr_slice bin;
    kvr_cmd cmd;
    kvr_route_candidate cand[KVR_FSM_MAX_CANDIDATES];
    if (kvr_mp_read_array(&r, &n) != 0 || n != 2 || kvr_mp_read_uint(&r, &from) != 0 ||
        kvr_mp_read_bin(&r, &bin) != 0 ||
        kvr_cmd_decode(bin.base, bin.len, &cmd, cand, NULL) != 0) {
        kvr_metric_inc(rd->m_bcast_rejected);
        KVR_LOG_WARN_RL(5, "bad booking broadcast", "len=%zu", m->len);
        return;
    }
    if (from == rd->cfg.id)
        return;
    kvr_fsm_result res;
    kvr_fsm_set_local_now(rd->fsm, kvr_mono_ms());
    kvr_fsm_apply(rd->fsm, &cmd, &res);
}

static void queue_clear(kvr_routerd *rd, uint64_t worker_id, uint64_t down_seq);

/* Submits cmd; cb (may be NULL) runs once, possibly before this returns (local mode). */
static int rd_submit(kvr_routerd *rd, const kvr_cmd *cmd, rd_cmd_cb cb, void *data)
{
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (rd->sync) {
        sync_ctx *c = malloc(sizeof(*c));
        if (!c)
            return KVR_ENOMEM;
        c->rd = rd;
        c->cb = cb;
        c->data = data;
        int rc = kvr_sync_submit(rd->sync, cmd, on_sync_done, c);
        if (rc != 0)
            free(c);
        return rc;
    }
#endif
    kvr_fsm_result res;
    kvr_fsm_set_local_now(rd->fsm, kvr_mono_ms()); /* booking age on one clock (liveness.h) */
    kvr_fsm_apply(rd->fsm, cmd, &res);
    /* without Raft this router's FSM is the one that commits: it publishes the clear */
    if (res.type == KVR_CMD_WORKER_DOWN && res.down_seq != 0)
        queue_clear(rd, res.worker_id, res.down_seq);
    if (rd->cfg.best_effort)
        broadcast(rd, cmd, &res);
    if (cb)
        cb(rd, 0, &res, "local", data);
    return 0;
}

static const kvr_fsm *rd_fsm(kvr_routerd *rd)
{
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (rd->sync)
        return kvr_sync_fsm(rd->sync);
#endif
    return rd->fsm;
}

static void log_cmd_failure(kvr_routerd *rd, int status, const kvr_fsm_result *res,
                            const char *mode, void *data)
{
    const char *what = data;
    if (status != 0)
        KVR_LOG_WARN_RL(5, "command failed", "cmd=%s status=\"%s\"", what, kvr_strerror(status));
}

/* ------------------------------------------------------------------------------------------ */
/* workers */

static void worker_submit_up(kvr_routerd *rd, rd_worker *w)
{
    kvr_cmd cmd = {.type = KVR_CMD_WORKER_UP};
    cmd.u.worker.id = w->id;
    cmd.u.worker.ns = kvr_slice_of(w->ns);
    cmd.u.worker.model = kvr_slice_of(w->model);
    cmd.u.worker.url = kvr_slice_of(w->url);
    cmd.u.worker.role = strcmp(w->role, "prefill") == 0  ? KVR_ROLE_PREFILL
                        : strcmp(w->role, "decode") == 0 ? KVR_ROLE_DECODE
                                                         : KVR_ROLE_BOTH;
    cmd.u.worker.block_size = w->block_size;
    cmd.u.worker.capacity_blocks = w->capacity;
    rd_submit(rd, &cmd, log_cmd_failure, "worker_up");
}

/* Does this router own the worker-liveness policy of the state it books on? Without Raft it
 * does (its own FSM); with Raft only the leader does (one owner: liveness.h), or a router
 * without quorum for the local copy it answers from. */
static bool owns_liveness(kvr_routerd *rd)
{
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (rd->sync)
        return kvr_sync_owns_liveness(rd->sync);
#endif
    (void)rd;
    return true;
}

/* ------------------------------------------------------------------------------------------ */
/* The index is a function of the KV stream alone (issue 18, defect 5). Before, each router
 * dropped a worker's entries when IT learned the worker was down, so a router replaying the
 * stream after a restart (which never saw that moment, or saw it at another stream position)
 * ended with another digest than the routers that applied it live. Now a down worker's
 * events are still indexed (a down worker is never routed to: the registry says so), and its
 * entries go only when a router applies the worker's AllBlocksCleared from the stream: the
 * leader publishes it into the worker's own subject once WORKER_DOWN is committed, with
 * JetStream msg-id kvr-clear-<id>-<down_seq>, so a retry or a second proposal of the same down
 * transition stores it once. Every router, live or replaying, applies it at the same place. */

static rd_clear *clear_find(kvr_routerd *rd, uint64_t worker_id, uint64_t down_seq)
{
    for (uint32_t i = 0; i < rd->n_clears; i++)
        if (rd->clears[i].worker_id == worker_id && rd->clears[i].down_seq == down_seq)
            return &rd->clears[i];
    return NULL;
}

static void clear_drop(kvr_routerd *rd, rd_clear *c)
{
    *c = rd->clears[--rd->n_clears];
}

/* Runs on the loop thread: WORKER_DOWN of an up worker committed here (Raft leader, or the
 * local FSM without Raft). The namespace is the registry's (the worker's own heartbeat). */
static void queue_clear(kvr_routerd *rd, uint64_t worker_id, uint64_t down_seq)
{
    if (clear_find(rd, worker_id, down_seq))
        return;
    kvr_fsm_worker_view fv;
    if (kvr_fsm_worker_get(rd_fsm(rd), worker_id, &fv) != 0 || fv.ns[0] == '\0') {
        KVR_LOG_WARN("worker down: no namespace known, its clear is not published",
                     "worker=%" PRIu64 " down_seq=%" PRIu64, worker_id, down_seq);
        return;
    }
    if (rd->n_clears == RD_MAX_CLEARS) {
        /* the oldest has been retried longest: it is the one least likely to land */
        uint32_t old = 0;
        for (uint32_t i = 1; i < rd->n_clears; i++)
            if (rd->clears[i].first_ms < rd->clears[old].first_ms)
                old = i;
        rd_clear *o = &rd->clears[old];
        bool keep = o->inflight; /* its ack still refers to it: drop the new one instead */
        KVR_LOG_WARN("too many unpublished clears: dropping one", "worker=%" PRIu64
                     " down_seq=%" PRIu64, keep ? worker_id : o->worker_id,
                     keep ? down_seq : o->down_seq);
        if (keep)
            return;
        clear_drop(rd, o);
    }
    rd_clear *c = &rd->clears[rd->n_clears++];
    memset(c, 0, sizeof *c);
    c->worker_id = worker_id;
    c->down_seq = down_seq;
    snprintf(c->ns, sizeof c->ns, "%s", fv.ns);
    c->first_ms = c->next_ms = kvr_mono_ms();
    KVR_LOG_INFO("worker down committed: publishing its AllBlocksCleared (or again: it still has entries)",
                 "worker=%" PRIu64 " down_seq=%" PRIu64 " ns=%s", worker_id, down_seq, c->ns);
}

#ifdef KVR_ROUTERD_HAVE_SYNC
/* kvr_sync_options.worker_down_cb: on the leader, in the apply of the committed entry. */
static void on_worker_down_committed(void *data, uint64_t worker_id, uint64_t down_seq)
{
    queue_clear(data, worker_id, down_seq);
}
#endif

typedef struct clear_ack {
    kvr_routerd *rd;
    uint64_t worker_id, down_seq;
} clear_ack;

static void on_clear_ack(int status, uint64_t seq, bool duplicate, void *cbdata)
{
    clear_ack *a = cbdata;
    kvr_routerd *rd = a->rd;
    rd_clear *c = clear_find(rd, a->worker_id, a->down_seq);
    if (c) {
        c->inflight = false;
        if (status == 0) {
            if (duplicate)
                KVR_LOG_DEBUG("worker clear already in the stream", "worker=%" PRIu64
                              " down_seq=%" PRIu64 " stream_seq=%" PRIu64, a->worker_id,
                              a->down_seq, seq);
            else
                KVR_LOG_INFO("worker clear published", "worker=%" PRIu64 " down_seq=%" PRIu64
                             " stream_seq=%" PRIu64, a->worker_id, a->down_seq, seq);
            kvr_metric_inc(rd->m_clears_published);
            clear_drop(rd, c);
        } else {
            KVR_LOG_WARN_RL(5, "publishing a worker clear failed, retrying",
                            "worker=%" PRIu64 " down_seq=%" PRIu64 " error=\"%s\"", a->worker_id,
                            a->down_seq, kvr_strerror(status));
            c->next_ms = kvr_mono_ms() + 1000;
        }
    }
    free(a);
}

/* From the tick: (re)sends every queued clear not in flight and due. */
static void publish_clears(kvr_routerd *rd, int64_t now)
{
    for (uint32_t i = 0; i < rd->n_clears;) {
        rd_clear *c = &rd->clears[i];
        if (c->inflight || now < c->next_ms || !rd->nats_up) {
            i++;
            continue;
        }
        kvr_fsm_worker_view fv;
        if (kvr_fsm_worker_get(rd_fsm(rd), c->worker_id, &fv) == 0 && fv.up) {
            /* Up again in the registry: either this was an old WORKER_DOWN replayed from the
             * Raft log when this node took office (its clear went out long ago, maybe outside
             * the duplicate window: sending it again would wipe the worker's new entries), or
             * the worker came back before its clear left (then its cache still holds what the
             * index says). Either way there is nothing to clear now. */
            KVR_LOG_INFO("worker up again: its clear is not published",
                         "worker=%" PRIu64 " down_seq=%" PRIu64, c->worker_id, c->down_seq);
            clear_drop(rd, c);
            continue;
        }
        if (now - c->first_ms > RD_CLEAR_GIVE_UP_MS) {
            KVR_LOG_ERROR("giving up publishing a worker clear: its entries stay until it is "
                          "cleared again", "worker=%" PRIu64 " down_seq=%" PRIu64, c->worker_id,
                          c->down_seq);
            clear_drop(rd, c);
            continue;
        }
        kvr_kv_event ev = {.type = KVR_KV_CLEARED};
        kvr_kv_batch b = {.ts = (double)kvr_now_ms() / 1000.0, .n_events = 1, .events = &ev};
        kvr_buf out;
        kvr_buf_init(&out);
        char subject[sizeof c->ns + 48], msg_id[64];
        snprintf(subject, sizeof subject, "kvr.kv.%s.%" PRIu64, c->ns, c->worker_id);
        snprintf(msg_id, sizeof msg_id, "kvr-clear-%" PRIu64 "-%" PRIu64, c->worker_id,
                 c->down_seq);
        clear_ack *a = malloc(sizeof *a);
        int rc = a ? kvr_kv_encode(&out, &b, KVR_KV_FORMAT_ARRAY, KVR_KV_HASH_INT) : KVR_ENOMEM;
        if (rc == 0) {
            *a = (clear_ack){rd, c->worker_id, c->down_seq};
            rc = kvr_nats_js_publish(&rd->nats, subject, msg_id, out.base, out.len, 2000,
                                     on_clear_ack, a);
        }
        kvr_buf_free(&out);
        if (rc != 0) {
            free(a);
            c->next_ms = now + 1000;
            KVR_LOG_WARN_RL(5, "publishing a worker clear failed, retrying",
                            "worker=%" PRIu64 " error=\"%s\"", c->worker_id, kvr_strerror(rc));
        } else {
            c->inflight = true;
        }
        i++;
    }
}

/* Is this router the one that commits WORKER_DOWN now (Raft leader, or no Raft)? */
static bool commits_liveness(kvr_routerd *rd)
{
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (rd->sync) {
        kvr_sync_state ss;
        kvr_sync_get_state(rd->sync, &ss);
        return ss.leader_id == rd->cfg.id && !ss.degraded;
    }
#endif
    (void)rd;
    return true;
}

/* Every 5 s on the router that commits WORKER_DOWN: a worker down in the registry, not heard
 * here, whose entries are still in the index at two sweeps in a row, gets its clear (again).
 * That covers a leader that committed WORKER_DOWN and died (or lost office, or gave up)
 * before its clear was in the stream: its successor sends it. The msg-id is the same
 * (kvr-clear-<id>-<down_seq>), so a clear that did land within the duplicate window is not
 * stored twice; entries a down worker published after its clear are cleared too. */
static void clear_sweep(kvr_routerd *rd, int64_t now)
{
    if (now - rd->last_clear_sweep_ms < 5000 || !rd->iw_scratch)
        return;
    rd->last_clear_sweep_ms = now;
    if (!rd->ready || !rd->nats_up || !commits_liveness(rd)) {
        rd->n_sweep_ids = 0;
        return;
    }
    uint64_t prev[RD_MAX_CLEARS];
    uint32_t n_prev = rd->n_sweep_ids;
    memcpy(prev, rd->sweep_ids, n_prev * sizeof prev[0]);
    rd->n_sweep_ids = 0;
    size_t n = kvr_index_workers(rd->idx, rd->iw_scratch, RD_MAX_WORKERS);
    if (n > RD_MAX_WORKERS)
        n = RD_MAX_WORKERS;
    for (size_t i = 0; i < n && rd->n_sweep_ids < RD_MAX_CLEARS; i++) {
        uint64_t id = rd->iw_scratch[i].worker_id;
        kvr_fsm_worker_view fv;
        rd_worker *w = worker_find(rd, id);
        if (rd->iw_scratch[i].entries == 0 || (w && w->up) ||
            kvr_fsm_worker_get(rd_fsm(rd), id, &fv) != 0 || fv.up || fv.down_seq == 0)
            continue;
        rd->sweep_ids[rd->n_sweep_ids++] = id;
        for (uint32_t k = 0; k < n_prev; k++)
            if (prev[k] == id) {
                queue_clear(rd, id, fv.down_seq);
                break;
            }
    }
}

/* Marks w down here (it is no longer routed to; its entries stay until the leader's
 * AllBlocksCleared comes through the stream, see above) and, when this router owns the
 * policy, proposes WORKER_DOWN. A Raft follower only follows the replicated registry (see
 * on_tick). */
static void worker_down(kvr_routerd *rd, rd_worker *w, const char *why)
{
    w->up = false;
    KVR_LOG_WARN("worker down", "worker=%" PRIu64 " reason=%s", w->id, why);
    if (owns_liveness(rd)) {
        kvr_cmd cmd = {.type = KVR_CMD_WORKER_DOWN};
        cmd.u.worker_id = w->id;
        rd_submit(rd, &cmd, log_cmd_failure, "worker_down");
    }
    update_index_gauges(rd);
}

/* A valid beat (liveness.h): the sync leader, or this router's own tracker, hears it. */
static void worker_heard(kvr_routerd *rd, uint64_t id, bool valid)
{
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (rd->sync) {
        if (valid)
            kvr_sync_worker_seen(rd->sync, id);
        else
            kvr_sync_worker_forget(rd->sync, id);
        return;
    }
#endif
    if (valid)
        kvr_live_heard(&rd->live, id, kvr_mono_ms());
    else
        kvr_live_forget(&rd->live, id);
}

/* No beat could be heard until now (NATS down, loop stall). */
static void liveness_hold(kvr_routerd *rd)
{
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (rd->sync) {
        kvr_sync_liveness_hold(rd->sync);
        return;
    }
#endif
    kvr_live_hold(&rd->live, kvr_mono_ms());
}

/* Frees one slot of the full worker table for a new worker: the down (or refused) worker
 * heard from longest ago, else the event-only (never announced) one seen longest ago. Live
 * workers are never evicted: a flood of one-shot heartbeats fills the table only until those
 * fakes miss their beats, and then a real worker takes one of their slots. */
static int worker_evict_one(kvr_routerd *rd)
{
    int64_t best_age = -1;
    uint32_t best = UINT32_MAX;
    int64_t now = kvr_mono_ms();
    for (int pass = 0; pass < 2 && best == UINT32_MAX; pass++) {
        for (uint32_t i = 0; i < rd->n_workers; i++) {
            rd_worker *w = &rd->workers[i];
            bool cand = pass == 0 ? w->announced && (!w->up || w->refused) : !w->announced;
            int64_t age = now - (pass == 0 ? w->last_seen_ms : w->first_event_ms);
            if (cand && age > best_age) {
                best_age = age;
                best = i;
            }
        }
    }
    if (best == UINT32_MAX)
        return KVR_ELIMIT;
    rd_worker *w = &rd->workers[best];
    KVR_LOG_INFO("worker table full: evicting a worker that is not live",
                 "worker=%" PRIu64 " announced=%d unseen_ms=%" PRId64, w->id, w->announced,
                 best_age);
    kvr_index_remove_worker(rd->idx, w->id);
    kvr_metric_inc(rd->m_workers_evicted);
    rd->workers[best] = rd->workers[--rd->n_workers];
    return 0;
}

static bool ns_ok(kvr_routerd *rd, kvr_slice ns)
{
    return rd->ns_filter[0] == 0 || kvr_slice_eq_cstr(ns, rd->ns_filter);
}

static void on_heartbeat(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    kvr_heartbeat hb;
    int hrc = kvr_heartbeat_decode(m->data, m->len, &hb);
    if (hrc != 0) {
        KVR_LOG_WARN_RL(10, "malformed heartbeat", "subject=%s error=\"%s\"", m->subject,
                        kvr_strerror(hrc));
        return;
    }
    uint64_t id = hb.id, started = hb.started_ms, bs = hb.block_size, cap = hb.capacity_blocks;
    uint64_t active = hb.active, waiting = hb.waiting, used = hb.used_blocks;
    kvr_slice ns = hb.ns, model = hb.model, url = hb.url, role = hb.role;
    bool have_id = hb.has & KVR_HB_ID, have_bs = hb.has & KVR_HB_BLOCK_SIZE;
    if (!have_id || id == 0 || !have_bs || ns.len > KVR_FSM_NS_MAX || model.len > KVR_FSM_MODEL_MAX ||
        url.len > KVR_FSM_URL_MAX)
        goto bad;
    if (!ns_ok(rd, ns))
        return;
    if (!kvr_cidr_url_allowed(&rd->worker_cidrs, url.base, url.len)) {
        /* defence in depth: a forged heartbeat must not point clients at any host it likes */
        kvr_metric_inc(rd->m_hb_refused_url);
        KVR_LOG_WARN_RL(10, "heartbeat refused: worker url outside --worker-cidr",
                        "worker=%" PRIu64 " url=\"%.*s\"", id, (int)(url.len > 128 ? 128 : url.len),
                        url.base);
        return;
    }
    rd_worker *w = worker_find(rd, id);
    bool is_new = false;
    if (!w) {
        if (rd->n_workers >= RD_MAX_WORKERS && worker_evict_one(rd) != 0) {
            KVR_LOG_WARN_RL(10, "too many live workers, heartbeat ignored", "worker=%" PRIu64, id);
            return;
        }
        w = &rd->workers[rd->n_workers++];
        memset(w, 0, sizeof(*w));
        w->id = id;
        is_new = true;
    }
    if (!w->announced) {
        is_new = true;
        w->announced = true;
    }
    w->last_seen_ms = kvr_mono_ms();
    w->active = (uint32_t)active;
    w->waiting = (uint32_t)waiting;
    w->used_blocks = (uint32_t)used;
    if (bs != rd->cfg.block_size) {
        if (!w->refused) {
            KVR_LOG_ERROR("worker refused: block size differs from the router's",
                          "worker=%" PRIu64 " worker_block_size=%" PRIu64 " router_block_size=%u",
                          id, bs, rd->cfg.block_size);
            kvr_metric_inc(rd->m_workers_refused);
            if (w->up)
                worker_down(rd, w, "block_size_changed");
            else
                kvr_index_remove_worker(rd->idx, id);
        }
        w->refused = true;
        w->up = false;
        w->block_size = (uint32_t)bs;
        worker_heard(rd, id, false);
        return;
    }
    worker_heard(rd, id, true);
    bool restarted = !is_new && w->started_ms != 0 && started != w->started_ms;
    bool changed = is_new || !w->up || w->refused || restarted || w->capacity != cap ||
                   !kvr_slice_eq_cstr(ns, w->ns) || !kvr_slice_eq_cstr(model, w->model) ||
                   !kvr_slice_eq_cstr(url, w->url) || !kvr_slice_eq_cstr(role, w->role);
    if (restarted) {
        /* Its entries are NOT cleared here: the new incarnation's own AllBlocksCleared in the
         * stream does it (kvr-worker sends it first thing, kvr-bridge on an engine restart),
         * at the same stream position on every router. Clearing on the heartbeat made the
         * index depend on when this router heard it: a router that applied the new
         * incarnation's first events before its heartbeat dropped them, one that replayed the
         * stream later kept them (routerd_index_stream). */
        KVR_LOG_INFO("worker restarted", "worker=%" PRIu64 " old_started_ms=%" PRIu64
                     " started_ms=%" PRIu64, id, w->started_ms, started);
    }
    w->refused = false;
    w->started_ms = started;
    w->block_size = (uint32_t)bs;
    w->capacity = (uint32_t)cap;
    copy_slice(w->ns, sizeof(w->ns), ns);
    copy_slice(w->model, sizeof(w->model), model);
    copy_slice(w->url, sizeof(w->url), url);
    copy_slice(w->role, sizeof(w->role), role.len ? role : KVR_SLICE_LIT("both"));
    /* lists and sums only filter candidates at route time: no WORKER_UP for their changes */
    w->n_loras = hb.n_loras;
    for (uint32_t i = 0; i < hb.n_loras; i++)
        w->lora_seeds[i] = kvr_hash_lora_seed(hb.loras[i].base, hb.loras[i].len);
    /* an over-long sum is kept cut: it still differs from every request's (never "unknown") */
    copy_slice(w->mdc_sum, sizeof(w->mdc_sum), hb.mdc_sum);
    if (changed) {
        if (!w->up || is_new)
            KVR_LOG_INFO("worker up", "worker=%" PRIu64 " ns=%s model=%s url=%s", id, w->ns,
                         w->model, w->url);
        w->up = true;
        kvr_index_set_worker_capacity(rd->idx, id, cap);
        worker_submit_up(rd, w);
    }
    return;
bad:
    KVR_LOG_WARN_RL(10, "malformed heartbeat", "subject=%s", m->subject);
}

/* ------------------------------------------------------------------------------------------ */
/* frontends */

static void on_frontend(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    const char *dot = strrchr(m->subject, '.');
    char *end = NULL;
    if (!dot)
        return;
    errno = 0;
    uint64_t id = strtoull(dot + 1, &end, 10);
    if (errno || !end || *end || id == 0)
        return;
    int64_t now = kvr_mono_ms();
    rd_frontend *f = NULL;
    for (uint32_t i = 0; i < rd->n_frontends; i++)
        if (rd->frontends[i].id == id)
            f = &rd->frontends[i];
    if (!f) {
        if (rd->n_frontends >= RD_MAX_FRONTENDS)
            return;
        f = &rd->frontends[rd->n_frontends++];
        f->id = id;
    }
    f->last_seen_ms = now;
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (rd->sync) {
        /* Defect 13: not R routers x F beats per second through Raft; the leader alone
         * proposes, and only when the replicated lease table lacks this frontend. */
        kvr_sync_frontend_seen(rd->sync, id);
        return;
    }
#endif
    kvr_cmd cmd = {.type = KVR_CMD_FRONTEND_SEEN};
    cmd.u.frontend.frontend_id = id;
    cmd.u.frontend.now_ms = (uint64_t)kvr_now_ms();
    rd_submit(rd, &cmd, NULL, NULL);
}

/* ------------------------------------------------------------------------------------------ */
/* KV events */

static void reject(kvr_routerd *rd, int reason, const char *subject, uint64_t seq, const char *why)
{
    kvr_metric_add(rd->m_events_rejected, (size_t)reason, 1);
    KVR_LOG_WARN_RL(5, "kv event rejected", "reason=%s subject=%s seq=%" PRIu64 " error=\"%s\"",
                    rej_names[reason], subject, seq, why ? why : "");
}

static bool parse_kv_subject(const char *subject, kvr_slice *ns, uint64_t *worker_id)
{
    static const char prefix[] = "kvr.kv.";
    size_t pl = sizeof(prefix) - 1;
    if (strncmp(subject, prefix, pl) != 0)
        return false;
    const char *dot = strrchr(subject, '.');
    if (!dot || dot < subject + pl + 1)
        return false;
    char *end = NULL;
    errno = 0;
    if (!dot[1] || dot[1] < '0' || dot[1] > '9')
        return false;
    unsigned long long id = strtoull(dot + 1, &end, 10);
    if (errno || !end || *end || id == 0)
        return false;
    ns->base = subject + pl;
    ns->len = (size_t)(dot - ns->base);
    *worker_id = id;
    return true;
}

static void check_ready(kvr_routerd *rd);

static void on_kv_event(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    rd->last_pending = m->num_pending;
    kvr_slice ns;
    uint64_t wid;
    if (!parse_kv_subject(m->subject, &ns, &wid)) {
        reject(rd, REJ_BAD_SUBJECT, m->subject, m->stream_seq, "subject is not kvr.kv.<ns>.<id>");
        goto done;
    }
    if (!ns_ok(rd, ns)) {
        kvr_metric_add(rd->m_events_rejected, REJ_OTHER_NS, 1);
        goto done;
    }
    rd_worker *w = worker_find(rd, wid);
    if (w && w->announced && w->refused) {
        reject(rd, REJ_REFUSED_WORKER, m->subject, m->stream_seq, "worker refused (block size)");
        goto done;
    }
    /* A down worker's events are applied like any other (it is not routed to while down):
     * whether a router counts it down at this stream position depends on when it learned it,
     * and the index must not (see queue_clear). REJ_WORKER_DOWN is no longer counted. */
    if (!w && rd->n_workers < RD_MAX_WORKERS) {
        /* not announced yet: apply (its heartbeat may come later), remember when we first
         * heard of it so that a worker that never beats is swept (see on_tick) */
        w = &rd->workers[rd->n_workers++];
        memset(w, 0, sizeof(*w));
        w->id = wid;
        w->first_event_ms = kvr_mono_ms();
    }
    if (!w || !w->announced) {
        kvr_metric_inc(rd->m_unknown_worker);
        KVR_LOG_DEBUG("event from a worker not announced by heartbeat (applied)",
                      "worker=%" PRIu64 " seq=%" PRIu64, wid, m->stream_seq);
    }
    kvr_kv_batch b;
    kvr_kv_reject why = KVR_KV_REJ_NONE;
    kvr_err err = {0};
    if (kvr_kv_decode(&rd->dec, m->data, m->len, &b, &why, &err) != 0) {
        int reason = why > KVR_KV_REJ_NONE && why < KVR_KV_REJ__COUNT ? (int)why - 1 : REJ_INVALID;
        reject(rd, reason, m->subject, m->stream_seq, err.msg);
        goto done;
    }
    for (uint32_t i = 0; i < b.n_events; i++) {
        const kvr_kv_event *ev = &b.events[i];
        kvr_index_stats before;
        kvr_index_stats_get(rd->idx, &before);
        int rc = kvr_index_apply(rd->idx, wid, ev, &err);
        if (rc == 0) {
            kvr_metric_inc(rd->m_events_applied);
            if (ev->type == KVR_KV_STORED) {
                kvr_metric_add(rd->m_blocks_applied, 0, ev->n_hashes);
                rd->applied_blocks += ev->n_hashes;
            }
            continue;
        }
        int reason = rc == KVR_ENOTFOUND ? REJ_UNKNOWN_PARENT
                     : rc == KVR_ELIMIT  ? REJ_OVER_BOUND
                     : rc == KVR_EINVAL && ev->type == KVR_KV_STORED &&
                             ev->block_size != rd->cfg.block_size
                         ? REJ_BLOCK_SIZE
                         : REJ_INVALID;
        if (rc == KVR_ELIMIT) {
            kvr_index_stats after;
            kvr_index_stats_get(rd->idx, &after);
            if (after.dropped_no_slot > before.dropped_no_slot)
                reason = REJ_NO_SLOT;
        }
        reject(rd, reason, m->subject, m->stream_seq, err.msg);
    }
    if (w)
        w->events++;
done:
    kvr_index_set_stream_seq(rd->idx, m->stream_seq);
    rd->applied_msgs++;
    kvr_metric_inc(rd->m_replayed);
    if (!rd->ready)
        check_ready(rd);
}

static void on_route_nats(const kvr_nats_msg *m, void *data);

static void check_ready(kvr_routerd *rd)
{
    if (rd->ready || !rd->stream_started)
        return;
    uint64_t seq = kvr_index_stream_seq(rd->idx);
    bool caught_up = seq >= rd->target_seq || (rd->applied_msgs > 0 && rd->last_pending == 0 &&
                                               rd->consumer && seq == kvr_nats_consumer_last_seq(rd->consumer));
    if (!caught_up)
        return;
    rd->ready = true;
    rd->ready_ms = kvr_mono_ms();
    /* join the routers' queue group only now: until the index has caught up, route requests
     * go to routers that have (or time out, and the frontend falls back) */
    kvr_err err = {0};
    if (!rd->groups_left && kvr_nats_subscribe(&rd->nats, "kvr.route", "kvr-routers", on_route_nats,
                                               rd, &rd->sub_route, &err) != 0)
        KVR_LOG_ERROR("subscribing to kvr.route", "error=\"%s\"", err.msg);
    double secs = (double)(kvr_mono_ms() - rd->start_ms) / 1000.0;
    kvr_metric_set(rd->m_ready_s, 0, secs);
    kvr_index_stats st;
    kvr_index_stats_get(rd->idx, &st);
    KVR_LOG_INFO("ready", "stream_seq=%" PRIu64 " target_seq=%" PRIu64 " replayed_msgs=%" PRIu64
                 " entries=%" PRIu64 " seconds=%.3f",
                 seq, rd->target_seq, rd->applied_msgs, st.entries, secs);
    update_index_gauges(rd);
}

static int rd_recreate_index(kvr_routerd *rd)
{
    kvr_index_opts io = {.block_size = rd->cfg.block_size, .max_workers = RD_MAX_WORKERS};
    kvr_index *fresh = NULL;
    kvr_err err = {0};
    int rc = kvr_index_create(&fresh, &io, &err);
    if (rc != 0) {
        KVR_LOG_ERROR("creating index", "error=\"%s\"", err.msg);
        return rc;
    }
    kvr_index_destroy(rd->idx);
    rd->idx = fresh;
    return 0;
}

static void start_stream(kvr_routerd *rd);

/* The retry timer's callback gets the timer; its data is the router (defect 12: casting
 * start_stream to a timer callback handed it the timer as the router, so a router started
 * before NATS never set up its stream). */
static void on_stream_retry(uv_timer_t *t)
{
    start_stream(t->data);
}

static void on_stream_ready(int status, const kvr_nats_stream_info *info, const char *errmsg,
                            void *data)
{
    kvr_routerd *rd = data;
    if (rd->stopping)
        return;
    if (status != 0) {
        KVR_LOG_WARN_RL(5, "ensuring stream failed, retrying", "stream=%s error=\"%s\"", RD_STREAM,
                        errmsg ? errmsg : kvr_strerror(status));
        uv_timer_start(&rd->stream_retry, on_stream_retry, 1000, 0);
        return;
    }
    rd->stream_first = info->first_seq;
    rd->stream_last = info->last_seq;
    rd->target_seq = info->last_seq;
    uint64_t have = kvr_index_stream_seq(rd->idx);
    uint64_t start = have + 1;
    if (rd->snap_loaded && info->msgs > 0 && have + 1 < info->first_seq) {
        KVR_LOG_WARN("snapshot is stale: the stream no longer holds the events after it; "
                     "rebuilding from the stream start",
                     "snapshot_seq=%" PRIu64 " stream_first_seq=%" PRIu64, have, info->first_seq);
        rd_recreate_index(rd);
        start = info->first_seq;
    } else if (rd->snap_loaded && have > info->last_seq) {
        KVR_LOG_WARN("snapshot is ahead of the stream (stream was reset); rebuilding from the "
                     "stream start",
                     "snapshot_seq=%" PRIu64 " stream_last_seq=%" PRIu64, have, info->last_seq);
        rd_recreate_index(rd);
        start = info->first_seq ? info->first_seq : 1;
    }
    if (start < info->first_seq)
        start = info->first_seq;
    if (start == 0)
        start = 1;
    rd->start_seq = start;
    rd->stream_started = true;
    KVR_LOG_INFO("consuming stream", "stream=%s from_seq=%" PRIu64 " first_seq=%" PRIu64
                 " last_seq=%" PRIu64, RD_STREAM, start, info->first_seq, info->last_seq);
    kvr_err err = {0};
    int rc = kvr_nats_js_consume(&rd->nats, RD_STREAM, "kvr.kv.>", start, on_kv_event, rd,
                                 &rd->consumer, &err);
    if (rc != 0) {
        KVR_LOG_ERROR("creating consumer", "error=\"%s\"", err.msg);
        rd->stream_started = false;
        uv_timer_start(&rd->stream_retry, on_stream_retry, 1000, 0);
        return;
    }
    check_ready(rd);
}

static void start_stream(kvr_routerd *rd)
{
    if (rd->stopping || rd->stream_started)
        return;
    kvr_nats_stream_cfg sc = {.name = RD_STREAM,
                              .subjects = "kvr.kv.>",
                              .max_age_ms = rd->cfg.stream_max_age_ms,
                              .max_bytes = rd->cfg.stream_max_bytes,
                              .replicas = (int)rd->cfg.stream_replicas};
    if (kvr_nats_js_ensure_stream(&rd->nats, &sc, on_stream_ready, rd) != 0)
        uv_timer_start(&rd->stream_retry, on_stream_retry, 1000, 0);
}

static void on_nats_state(kvr_nats *kn, kvr_nats_state st, void *data)
{
    kvr_routerd *rd = kn->data;
    KVR_LOG_INFO("nats", "state=%s", kvr_nats_state_name(st));
    rd->nats_up = st == KVR_NATS_CONNECTED || st == KVR_NATS_RECONNECTED;
    if (st == KVR_NATS_RECONNECTED)
        kvr_metric_inc(rd->m_nats_reconnects);
    if (rd->nats_up) {
        /* no heartbeat or lease could reach us while NATS was down (on_tick judged no age
         * then): everyone gets a full period from now to be heard again */
        int64_t now = kvr_mono_ms();
        liveness_hold(rd);
        for (uint32_t i = 0; i < rd->n_workers; i++) {
            rd_worker *w = &rd->workers[i];
            if (w->last_seen_ms < now)
                w->last_seen_ms = now;
            if (!w->announced && w->first_event_ms < now)
                w->first_event_ms = now;
        }
        for (uint32_t i = 0; i < rd->n_frontends; i++)
            if (rd->frontends[i].last_seen_ms < now)
                rd->frontends[i].last_seen_ms = now;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* route */

typedef struct route_req {
    uint8_t request_id[KVR_REQUEST_ID_LEN];
    uint64_t frontend_id;
    char model[KVR_FSM_MODEL_MAX + 1];
    char ns[KVR_FSM_NS_MAX + 1];
    uint32_t tokens;
    uint32_t n_seq;
    const uint64_t *seq;
    char lora[KVR_ROUTE_NAME_MAX + 1];    /* "" base model */
    char mdc_sum[KVR_ROUTE_NAME_MAX + 1]; /* "" no model-card check */
} route_req;

typedef struct route_ctx {
    kvr_routerd *rd;
    int64_t t0_ns;
    char *reply;         /* NATS reply subject (NATS route) */
    kvr_http_req *http;  /* HTTP route */
    uint32_t best_overlap; /* the largest candidate overlap (route reply best_overlap_blocks) */
} route_ctx;

static void finish_route_nats(kvr_routerd *rd, route_ctx *c, int status, const kvr_fsm_result *res,
                              const char *mode, const char *errmsg)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_route_reply rep = {.ok = status == 0};
    if (status == 0) {
        /* local mode: what this router's state held for the chosen worker when it decided
         * (bookings including this one), and when (monotonic ns), so a load test can tell
         * decisions made on stale load */
        kvr_fsm_worker_view wv;
        rep.has_view =
            strcmp(mode, "local") == 0 && kvr_fsm_worker_get(rd_fsm(rd), res->worker_id, &wv) == 0;
        if (rep.has_view) {
            rep.worker_bookings = wv.bookings;
            rep.decided_ns = (uint64_t)kvr_mono_ns();
        }
        rep.worker_id = res->worker_id;
        rep.url = (kvr_slice){res->url, strlen(res->url)};
        rep.overlap_blocks = res->overlap;
        rep.best_overlap_blocks = c->best_overlap > res->overlap ? c->best_overlap : res->overlap;
        rep.router_id = rd->cfg.id;
        rep.mode = (kvr_slice){mode, strlen(mode)};
    } else {
        rep.error = (kvr_slice){errmsg, strlen(errmsg)};
    }
    if (kvr_route_reply_encode(&b, &rep) != 0)
        KVR_LOG_ERROR_RL(5, "route reply not encoded", "worker=%" PRIu64, rep.worker_id);
    if (b.len && !rd->stopping)
        kvr_nats_respond(&rd->nats, c->reply, b.base, b.len);
    kvr_buf_free(&b);
}

static void finish_route_http(kvr_routerd *rd, route_ctx *c, int status, const kvr_fsm_result *res,
                              const char *mode, const char *errmsg, int http_status)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_jw w;
    kvr_jw_init(&w, &b);
    kvr_jw_obj(&w);
    if (status == 0) {
        kvr_jw_key(&w, "worker_id");
        kvr_jw_u64(&w, res->worker_id);
        kvr_jw_key(&w, "url");
        kvr_jw_str(&w, res->url);
        kvr_jw_key(&w, "overlap_blocks");
        kvr_jw_u64(&w, res->overlap);
        kvr_jw_key(&w, "best_overlap_blocks");
        kvr_jw_u64(&w, c->best_overlap > res->overlap ? c->best_overlap : res->overlap);
        kvr_jw_key(&w, "router_id");
        kvr_jw_u64(&w, rd->cfg.id);
        kvr_jw_key(&w, "mode");
        kvr_jw_str(&w, mode);
    } else {
        kvr_jw_key(&w, "error");
        kvr_jw_str(&w, errmsg);
    }
    kvr_jw_end(&w);
    kvr_jw_finish(&w);
    kvr_http_respond(c->http, status == 0 ? 200 : http_status, "application/json", b.base, b.len);
    kvr_buf_free(&b);
}

static void on_route_done(kvr_routerd *rd, int status, const kvr_fsm_result *res, const char *mode,
                          void *data)
{
    route_ctx *c = data;
    const char *errmsg = NULL;
    int http_status = 503;
    if (status != 0) {
        errmsg = kvr_strerror(status);
        kvr_metric_add(rd->m_route_errors, 0, 1);
    } else if (res->outcome != KVR_OUT_OK && res->outcome != KVR_OUT_DUPLICATE) {
        errmsg = res->outcome == KVR_OUT_NO_WORKER  ? "no live worker for this model/namespace"
                 : res->outcome == KVR_OUT_FINISHED ? "request already finished"
                                                    : kvr_outcome_name(res->outcome);
        status = KVR_EAGAIN;
        http_status = res->outcome == KVR_OUT_INVALID    ? 400
                      : res->outcome == KVR_OUT_FINISHED ? 409
                                                         : 503;
        kvr_metric_add(rd->m_route_errors, res->outcome == KVR_OUT_NO_WORKER ? 1 : 2, 1);
    } else {
        kvr_metric_add(rd->m_route_decisions, strcmp(mode, "raft") == 0 ? 0 : 1, 1);
    }
    kvr_metric_observe(rd->m_route_latency, 0, (double)(kvr_mono_ns() - c->t0_ns) / 1e9);
    if (c->http)
        finish_route_http(rd, c, status, res, mode, errmsg, http_status);
    else
        finish_route_nats(rd, c, status, res, mode, errmsg);
    free(c->reply);
    free(c);
}

static bool worker_live(const rd_worker *w)
{
    return w->announced && w->up && !w->refused;
}

static bool worker_has_lora(const rd_worker *w, uint64_t seed)
{
    for (uint32_t i = 0; i < w->n_loras; i++)
        if (w->lora_seeds[i] == seed)
            return true;
    return false;
}

/* The candidates filter of a request (issue 13, items 3 and 4): a worker whose non-empty model
 * card checksum differs from the request's never gets it (it tokenizes differently, so routing
 * there would silently get no cache hits or wrong output); under a LoRA adapter that some live
 * worker of the model lists, only the listing workers may serve it (when none lists it, any
 * worker may: engines load adapters on demand). Returns whether the filter restricts the
 * choice at all; *allowed(w) then says which. */
typedef struct route_filter {
    bool by_lora, by_mdc;
    uint64_t seed;
} route_filter;

static bool worker_allowed(const route_filter *f, const route_req *q, const rd_worker *w)
{
    if (f->by_mdc && w->mdc_sum[0] && strcmp(w->mdc_sum, q->mdc_sum) != 0)
        return false;
    if (f->by_lora && !worker_has_lora(w, f->seed))
        return false;
    return true;
}

static bool route_filter_init(kvr_routerd *rd, const route_req *q, route_filter *f)
{
    *f = (route_filter){0};
    if (q->lora[0])
        f->seed = kvr_hash_lora_seed(q->lora, strlen(q->lora));
    for (uint32_t i = 0; i < rd->n_workers; i++) {
        const rd_worker *w = &rd->workers[i];
        if (!worker_live(w) || strcmp(w->model, q->model) != 0 || strcmp(w->ns, q->ns) != 0)
            continue;
        if (!rd->cfg.no_lora_filter && q->lora[0] && worker_has_lora(w, f->seed))
            f->by_lora = true;
        if (!rd->cfg.no_mdc_filter && q->mdc_sum[0] && w->mdc_sum[0] &&
            strcmp(w->mdc_sum, q->mdc_sum) != 0)
            f->by_mdc = true;
    }
    return f->by_lora || f->by_mdc;
}

static uint32_t match_depth(const kvr_index_match *m, size_t nm, uint64_t id)
{
    for (size_t i = 0; i < nm; i++)
        if (m[i].worker_id == id)
            return m[i].depth;
    return 0;
}

/* Matches + submits a ROUTE. Takes ownership of c. */
static void do_route(kvr_routerd *rd, const route_req *q, route_ctx *c)
{
    size_t nm = kvr_index_find_matches(rd->idx, q->seq, q->n_seq, rd->matches, RD_MAX_MATCHES);
    if (nm > RD_MAX_MATCHES)
        nm = RD_MAX_MATCHES;
    kvr_route_candidate cand[RD_MAX_MATCHES];
    uint32_t nc = 0;
    route_filter flt;
    bool only = route_filter_init(rd, q, &flt);
    if (only) {
        /* every allowed live worker of the model is a candidate, overlap 0 included, and the
         * FSM chooses among those only (its registry may know workers this router does not) */
        for (uint32_t i = 0; i < rd->n_workers && nc < KVR_FSM_MAX_CANDIDATES; i++) {
            const rd_worker *w = &rd->workers[i];
            if (!worker_live(w) || strcmp(w->model, q->model) != 0 || strcmp(w->ns, q->ns) != 0 ||
                !worker_allowed(&flt, q, w))
                continue;
            cand[nc++] = (kvr_route_candidate){w->id, match_depth(rd->matches, nm, w->id)};
        }
    } else {
        for (size_t i = 0; i < nm && nc < KVR_FSM_MAX_CANDIDATES; i++)
            cand[nc++] = (kvr_route_candidate){rd->matches[i].worker_id, rd->matches[i].depth};
    }
    /* the best overlap a routable candidate had (route reply best_overlap_blocks) */
    for (uint32_t i = 0; i < nc; i++) {
        if (cand[i].overlap <= c->best_overlap)
            continue;
        const rd_worker *mw = worker_find(rd, cand[i].worker_id);
        if (mw && worker_live(mw) && strcmp(mw->model, q->model) == 0)
            c->best_overlap = cand[i].overlap;
    }
    uint32_t bs = rd->cfg.block_size;
    uint32_t blocks = (uint32_t)(((uint64_t)q->tokens + bs - 1) / bs); /* no wrap near 2^32 */
    if (blocks < q->n_seq)
        blocks = q->n_seq;
    if (blocks == 0)
        blocks = 1;
    kvr_cmd cmd = {.type = KVR_CMD_ROUTE};
    kvr_route_cmd *r = &cmd.u.route;
    memcpy(r->request_id, q->request_id, KVR_REQUEST_ID_LEN);
    r->frontend_id = q->frontend_id;
    r->now_ms = (uint64_t)kvr_now_ms();
    r->request_blocks = blocks;
    r->model = kvr_slice_of(q->model);
    r->ns = kvr_slice_of(q->ns);
    r->candidates = cand;
    r->n_candidates = nc;
    r->only_candidates = only;
    int rc;
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (rd->sync) {
        sync_ctx *sc = malloc(sizeof(*sc));
        rc = KVR_ENOMEM;
        if (sc) {
            sc->rd = rd;
            sc->cb = on_route_done;
            sc->data = c;
            rc = kvr_sync_route(rd->sync, r, on_sync_done, sc);
            if (rc != 0)
                free(sc);
        }
    } else
#endif
        rc = rd_submit(rd, &cmd, on_route_done, c);
    if (rc != 0)
        on_route_done(rd, rc, NULL, "local", c);
}

/* Picks a namespace when the request names none: the router's own filter, else the first
 * live worker serving the model. */
static void default_ns(kvr_routerd *rd, route_req *q)
{
    if (q->ns[0])
        return;
    if (rd->ns_filter[0]) {
        snprintf(q->ns, sizeof(q->ns), "%s", rd->ns_filter);
        return;
    }
    for (uint32_t i = 0; i < rd->n_workers; i++) {
        rd_worker *w = &rd->workers[i];
        if (w->announced && w->up && strcmp(w->model, q->model) == 0) {
            snprintf(q->ns, sizeof(q->ns), "%s", w->ns);
            return;
        }
    }
}

static void on_route_nats(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    int64_t t0 = kvr_mono_ns();
    if (!m->reply)
        return;
    route_ctx *c = calloc(1, sizeof(*c));
    if (!c)
        return;
    c->rd = rd;
    c->t0_ns = t0;
    c->reply = strdup(m->reply);
    if (!c->reply) {
        free(c);
        return;
    }
    route_req q = {0};
    kvr_route_req wire;
    kvr_route_req_limits lim = {.max_tokens = rd->max_tokens, .max_hashes = RD_MAX_SEQ_HASHES};
    kvr_err err = {0};
    const char *why = err.msg;
    if (kvr_route_req_decode(m->data, m->len, &lim, rd->seq_scratch, &wire, &err) != 0)
        goto bad;
    if (wire.model.len > KVR_FSM_MODEL_MAX) {
        why = "model too long";
        goto bad;
    }
    if (wire.ns.len > KVR_FSM_NS_MAX) {
        why = "namespace too long";
        goto bad;
    }
    memcpy(q.request_id, wire.request_id, KVR_REQUEST_ID_LEN);
    q.frontend_id = wire.frontend_id;
    copy_slice(q.model, sizeof(q.model), wire.model);
    copy_slice(q.ns, sizeof(q.ns), wire.ns);
    copy_slice(q.lora, sizeof(q.lora), wire.lora);
    copy_slice(q.mdc_sum, sizeof(q.mdc_sum), wire.mdc_sum);
    q.tokens = wire.tokens;
    q.seq = wire.seq_hashes;
    q.n_seq = (uint32_t)wire.n_hashes;
    default_ns(rd, &q);
    do_route(rd, &q, c);
    return;
bad:
    KVR_LOG_WARN_RL(5, "bad route request", "error=\"%s\"", why);
    kvr_metric_add(rd->m_route_errors, 2, 1);
    finish_route_nats(rd, c, KVR_EINVAL, NULL, "local", why);
    free(c->reply);
    free(c);
}

/* A route event this router took from the queue group but could not commit through Raft
 * (answered from its local copy because it has no quorum, or timed out) is published once
 * more, marked "relayed": a router of the majority commits it. Without this the FREEs taken
 * in the second or so before a partitioned router notices it lost the quorum stayed out of
 * the majority's state until the heal (28 bookings held with 3 requests in flight in
 * chaos_follower_partition). The local copy keeps its own application too (reconciled later;
 * FREE and PREFILL_DONE are idempotent). One answered locally while this router is still in
 * the queue group waits (relay_q) until it leaves it, else the relay could come back to
 * it; the wait is dropped when no other router with a quorum is heard or a leader is back
 * (then the local copy's reconcile carries it). */
#define RD_RELAY_Q_MAX 65536u

static void relay_route_event(kvr_routerd *rd, const ev_ctx *e)
{
    kvr_buf b;
    kvr_buf_init(&b);
    const char *ev = e->type == KVR_CMD_FREE ? "free" : "prefill_done";
    kvr_route_event re = {.type = e->type == KVR_CMD_FREE ? KVR_ROUTE_EVENT_FREE
                                                          : KVR_ROUTE_EVENT_PREFILL_DONE,
                          .relayed = true};
    memcpy(re.request_id, e->rid, KVR_REQUEST_ID_LEN);
    int rc = kvr_route_event_encode(&b, &re);
    if (rc == 0 && kvr_nats_publish(&rd->nats, "kvr.route.event", b.base, b.len) == 0)
        KVR_LOG_DEBUG("route event relayed", "event=%s", ev);
    kvr_buf_free(&b);
}

/* A beacon older than this no longer proves that some router with a quorum answers
 * kvr.route: a router that left the queue groups rejoins. 4 router ticks. */
#define RD_PEER_QUORUM_TTL_MS 1000

/* another router said within the TTL that it has a Raft leader and answers kvr.route */
static bool peer_has_quorum(const kvr_routerd *rd, int64_t now)
{
    return rd->peer_quorum_ms > 0 && now - rd->peer_quorum_ms < RD_PEER_QUORUM_TTL_MS;
}

static void relay_later(kvr_routerd *rd, const ev_ctx *e)
{
    if (rd->n_relay == rd->cap_relay) {
        uint32_t cap = rd->cap_relay ? rd->cap_relay * 2 : 64;
        if (cap > RD_RELAY_Q_MAX || rd->n_relay >= RD_RELAY_Q_MAX) {
            KVR_LOG_WARN_RL(5, "route event relay queue full: left to reconcile", "n=%u",
                            rd->n_relay);
            return;
        }
        ev_ctx *q = realloc(rd->relay_q, cap * sizeof *q);
        if (!q)
            return; /* the local copy's reconcile still carries it */
        rd->relay_q = q;
        rd->cap_relay = cap;
    }
    rd->relay_q[rd->n_relay++] = *e;
}

static void on_event_done(kvr_routerd *rd, int status, const kvr_fsm_result *res, const char *mode,
                          void *data)
{
    ev_ctx *e = data;
    bool local = status == 0 && mode && strcmp(mode, "local") == 0;
    bool raft = false;
#ifdef KVR_ROUTERD_HAVE_SYNC
    raft = rd->sync != NULL;
#endif
    if (raft && !e->relayed && local) {
        if (rd->groups_left)
            relay_route_event(rd, e);
        else if (peer_has_quorum(rd, kvr_mono_ms()))
            relay_later(rd, e);
    } else if (raft && !e->relayed && status != 0) {
        relay_route_event(rd, e);
    } else if (status != 0) {
        log_cmd_failure(rd, status, res, mode, e->type == KVR_CMD_FREE ? "free" : "prefill_done");
    }
    free(e);
}

static void route_event(kvr_routerd *rd, const kvr_nats_msg *m, bool no_relay)
{
    kvr_route_event ev;
    kvr_err err = {0};
    if (kvr_route_event_decode(m->data, m->len, &ev, &err) != 0) {
        KVR_LOG_WARN_RL(5, "bad route event", "subject=%s error=\"%s\"", m->subject, err.msg);
        return;
    }
    int type = ev.type == KVR_ROUTE_EVENT_FREE ? KVR_CMD_FREE : KVR_CMD_PREFILL_DONE;
    kvr_cmd cmd = {.type = (kvr_cmd_type)type};
    memcpy(cmd.u.request_id, ev.request_id, KVR_REQUEST_ID_LEN);
    ev_ctx *e = malloc(sizeof *e);
    if (!e) {
        KVR_LOG_WARN_RL(5, "route event dropped: out of memory", "subject=%s", m->subject);
        return;
    }
    memcpy(e->rid, ev.request_id, KVR_REQUEST_ID_LEN);
    e->type = type;
    e->relayed = ev.relayed || no_relay;
    if (rd_submit(rd, &cmd, on_event_done, e) != 0)
        free(e);
}

/* kvr.route.event through the routers' queue group */
static void on_route_event(const kvr_nats_msg *m, void *data)
{
    route_event(data, m, false);
}

#ifdef KVR_ROUTERD_HAVE_SYNC
/* kvr.route.event on the plain subscription held while degraded (follow_quorum): every
 * router without quorum hears it, so none relays it. */
static void on_route_event_all(const kvr_nats_msg *m, void *data)
{
    route_event(data, m, true);
}
#endif

/* ------------------------------------------------------------------------------------------ */
/* HTTP */

static void respond_json(kvr_http_req *req, int status, kvr_buf *b)
{
    kvr_http_respond(req, status, "application/json", b->base, b->len);
}

static void respond_error(kvr_http_req *req, int status, const char *msg)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_jw w;
    kvr_jw_init(&w, &b);
    kvr_jw_obj(&w);
    kvr_jw_key(&w, "error");
    kvr_jw_str(&w, msg);
    kvr_jw_end(&w);
    kvr_jw_finish(&w);
    respond_json(req, status, &b);
    kvr_buf_free(&b);
}

/* Parses {"token_ids":[...], "model"?, "namespace"?} and computes the seq hashes into
 * rd->seq_scratch. The body is scanned as a stream straight into rd->tok_scratch (no cJSON
 * tree: a tree costs ~40 bytes per token and a loop stall per MB), and an array longer than
 * max_request_tokens is refused as soon as it crosses the bound. */
static int parse_tokens_body(kvr_routerd *rd, kvr_http_req *req, route_req *q, kvr_err *err)
{
    kvr_json_tokreq tr = {.tokens = rd->tok_scratch, .max_tokens = rd->max_tokens};
    int rc = kvr_json_scan_tokens(req->body, 16, &tr, err);
    if (rc != 0)
        return rc;
    if (tr.lora.base != NULL &&
        (rc = kvr_json_decode_string(tr.lora, q->lora, sizeof(q->lora), err)) != 0)
        return rc == KVR_ELIMIT ? kvr_err_set(err, KVR_EINVAL, "lora too long") : rc;
    if (tr.mdc_sum.base != NULL &&
        (rc = kvr_json_decode_string(tr.mdc_sum, q->mdc_sum, sizeof(q->mdc_sum), err)) != 0)
        return rc == KVR_ELIMIT ? kvr_err_set(err, KVR_EINVAL, "mdc_sum too long") : rc;
    /* an adapter's blocks are hashed under its seed, as the index stored them */
    q->n_seq = (uint32_t)kvr_hash_seq_seeded(tr.tokens, tr.n_tokens, rd->cfg.block_size, false, 0,
                                             kvr_hash_lora_seed(q->lora, strlen(q->lora)),
                                             rd->seq_scratch, RD_MAX_SEQ_HASHES);
    q->seq = rd->seq_scratch;
    q->tokens = (uint32_t)tr.n_tokens;
    if (tr.model.base != NULL &&
        (rc = kvr_json_decode_string(tr.model, q->model, sizeof(q->model), err)) != 0)
        return rc == KVR_ELIMIT ? kvr_err_set(err, KVR_EINVAL, "model too long") : rc;
    if (tr.ns.base != NULL && (rc = kvr_json_decode_string(tr.ns, q->ns, sizeof(q->ns), err)) != 0)
        return rc == KVR_ELIMIT ? kvr_err_set(err, KVR_EINVAL, "namespace too long") : rc;
    return 0;
}

static void http_match(kvr_routerd *rd, kvr_http_req *req)
{
    route_req q = {0};
    kvr_err err = {0};
    if (parse_tokens_body(rd, req, &q, &err) != 0) {
        respond_error(req, 400, err.msg);
        return;
    }
    size_t nm = kvr_index_find_matches(rd->idx, q.seq, q.n_seq, rd->matches, RD_MAX_MATCHES);
    if (nm > RD_MAX_MATCHES)
        nm = RD_MAX_MATCHES;
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_jw w;
    kvr_jw_init(&w, &b);
    kvr_jw_obj(&w);
    kvr_jw_key(&w, "block_size");
    kvr_jw_u64(&w, rd->cfg.block_size);
    kvr_jw_key(&w, "blocks");
    kvr_jw_u64(&w, q.n_seq);
    kvr_jw_key(&w, "overlaps");
    kvr_jw_obj(&w);
    for (size_t i = 0; i < nm; i++) {
        char k[24];
        snprintf(k, sizeof(k), "%" PRIu64, rd->matches[i].worker_id);
        kvr_jw_key(&w, k);
        kvr_jw_u64(&w, rd->matches[i].depth);
    }
    kvr_jw_end(&w);
    kvr_jw_end(&w);
    if (kvr_jw_finish(&w) != 0)
        respond_error(req, 500, "out of memory");
    else
        respond_json(req, 200, &b);
    kvr_buf_free(&b);
}

static void http_route(kvr_routerd *rd, kvr_http_req *req)
{
    int64_t t0 = kvr_mono_ns();
    route_req q = {0};
    kvr_err err = {0};
    if (parse_tokens_body(rd, req, &q, &err) != 0) {
        respond_error(req, 400, err.msg);
        return;
    }
    if (!q.model[0]) {
        respond_error(req, 400, "missing field 'model'");
        return;
    }
    route_ctx *c = calloc(1, sizeof(*c));
    if (!c) {
        respond_error(req, 500, "out of memory");
        return;
    }
    c->rd = rd;
    c->t0_ns = t0;
    c->http = req;
    /* a random request id: HTTP route calls are not retried by request id */
    uint64_t a = (uint64_t)kvr_mono_ns() ^ ((uint64_t)rd->cfg.id << 56), b2 = (uint64_t)rand() << 32 | (uint64_t)rand();
    static uint64_t counter;
    counter++;
    a ^= counter * 0x9E3779B97F4A7C15ull;
    memcpy(q.request_id, &a, 8);
    memcpy(q.request_id + 8, &b2, 8);
    default_ns(rd, &q);
    do_route(rd, &q, c);
}

static void http_state(kvr_routerd *rd, kvr_http_req *req)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_jw w;
    kvr_jw_init(&w, &b);
    kvr_index_stats st;
    kvr_index_stats_get(rd->idx, &st);
    const kvr_fsm *f = rd_fsm(rd);
    kvr_jw_obj(&w);
    kvr_jw_key(&w, "router_id");
    kvr_jw_u64(&w, rd->cfg.id);
    kvr_jw_key(&w, "ready");
    kvr_jw_bool(&w, rd->ready);
    kvr_jw_key(&w, "raft");
    kvr_jw_obj(&w);
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (rd->sync) {
        kvr_sync_state ss;
        kvr_sync_get_state(rd->sync, &ss);
        kvr_jw_key(&w, "role");
        kvr_jw_str(&w, ss.role);
        kvr_jw_key(&w, "leader");
        kvr_jw_u64(&w, ss.leader_id);
        kvr_jw_key(&w, "term");
        kvr_jw_u64(&w, ss.term);
        kvr_jw_key(&w, "commit_index");
        kvr_jw_u64(&w, ss.commit_index);
        kvr_jw_key(&w, "applied_index");
        kvr_jw_u64(&w, ss.applied_index);
        kvr_jw_key(&w, "degraded");
        kvr_jw_bool(&w, ss.degraded);
        kvr_jw_key(&w, "quorum_lost");
        kvr_jw_bool(&w, ss.quorum_lost);
        kvr_jw_key(&w, "queue_groups_left");
        kvr_jw_u64(&w, rd->groups_left_n);
        kvr_jw_key(&w, "in_queue_groups");
        kvr_jw_bool(&w, !rd->groups_left);
        kvr_jw_key(&w, "fsm_digest");
        char d[24];
        snprintf(d, sizeof(d), "%016" PRIx64, ss.digest);
        kvr_jw_str(&w, d);
        kvr_jw_key(&w, "log");
        kvr_jw_str(&w, ss.log_memory ? "memory" : "disk");
        kvr_jw_key(&w, "vote_restricted");
        kvr_jw_bool(&w, ss.vote_restricted);
        kvr_jw_key(&w, "votes_withheld");
        kvr_jw_u64(&w, ss.votes_withheld);
    } else
#endif
    {
        kvr_jw_key(&w, "role");
        kvr_jw_str(&w, "local");
        kvr_jw_key(&w, "leader");
        kvr_jw_u64(&w, 0);
        kvr_jw_key(&w, "term");
        kvr_jw_u64(&w, 0);
        kvr_jw_key(&w, "commit_index");
        kvr_jw_u64(&w, 0);
        kvr_jw_key(&w, "applied_index");
        kvr_jw_u64(&w, 0);
        kvr_jw_key(&w, "fsm_digest");
        char d[24];
        snprintf(d, sizeof(d), "%016" PRIx64, kvr_fsm_digest(f));
        kvr_jw_str(&w, d);
    }
    kvr_jw_end(&w);
    kvr_jw_key(&w, "index");
    kvr_jw_obj(&w);
    kvr_jw_key(&w, "blocks");
    kvr_jw_u64(&w, st.blocks);
    kvr_jw_key(&w, "entries");
    kvr_jw_u64(&w, st.entries);
    kvr_jw_key(&w, "bytes");
    kvr_jw_u64(&w, st.bytes);
    kvr_jw_key(&w, "digest");
    char dg[24];
    snprintf(dg, sizeof(dg), "%016" PRIx64, kvr_index_digest(rd->idx));
    kvr_jw_str(&w, dg);
    kvr_jw_key(&w, "stream_seq");
    kvr_jw_u64(&w, kvr_index_stream_seq(rd->idx));
    kvr_jw_end(&w);
    kvr_jw_key(&w, "ingest");
    kvr_jw_obj(&w);
    kvr_jw_key(&w, "snapshot_loaded");
    kvr_jw_bool(&w, rd->snap_loaded);
    kvr_jw_key(&w, "snapshot_seq");
    kvr_jw_u64(&w, rd->snap_seq);
    kvr_jw_key(&w, "start_seq");
    kvr_jw_u64(&w, rd->start_seq);
    kvr_jw_key(&w, "target_seq");
    kvr_jw_u64(&w, rd->target_seq);
    kvr_jw_key(&w, "applied_msgs");
    kvr_jw_u64(&w, rd->applied_msgs);
    kvr_jw_key(&w, "applied_blocks");
    kvr_jw_u64(&w, rd->applied_blocks);
    kvr_jw_key(&w, "rejected");
    kvr_jw_obj(&w);
    for (int i = 0; i < REJ__N; i++) {
        kvr_jw_key(&w, rej_names[i]);
        kvr_jw_u64(&w, kvr_metric_counter_value(rd->m_events_rejected, (size_t)i));
    }
    kvr_jw_end(&w);
    kvr_jw_end(&w);
    kvr_jw_key(&w, "workers");
    kvr_jw_arr(&w);
    int64_t now = kvr_mono_ms();
    for (uint32_t i = 0; i < rd->n_workers; i++) {
        rd_worker *wk = &rd->workers[i];
        kvr_index_worker_info wi = {0};
        kvr_index_worker(rd->idx, wk->id, &wi);
        kvr_fsm_worker_view fv;
        bool have_fv = kvr_fsm_worker_get(f, wk->id, &fv) == 0;
        kvr_jw_obj(&w);
        kvr_jw_key(&w, "id");
        kvr_jw_u64(&w, wk->id);
        kvr_jw_key(&w, "namespace");
        kvr_jw_str(&w, wk->ns);
        kvr_jw_key(&w, "model");
        kvr_jw_str(&w, wk->model);
        kvr_jw_key(&w, "url");
        kvr_jw_str(&w, wk->url);
        kvr_jw_key(&w, "role");
        kvr_jw_str(&w, wk->role);
        kvr_jw_key(&w, "up");
        kvr_jw_bool(&w, wk->up);
        kvr_jw_key(&w, "announced");
        kvr_jw_bool(&w, wk->announced);
        kvr_jw_key(&w, "refused");
        kvr_jw_bool(&w, wk->refused);
        kvr_jw_key(&w, "block_size");
        kvr_jw_u64(&w, wk->block_size);
        kvr_jw_key(&w, "started_ms");
        kvr_jw_u64(&w, wk->started_ms);
        kvr_jw_key(&w, "last_seen_ms_ago");
        kvr_jw_int(&w, now - wk->last_seen_ms);
        kvr_jw_key(&w, "entries");
        kvr_jw_u64(&w, wi.entries);
        kvr_jw_key(&w, "active_blocks");
        kvr_jw_u64(&w, have_fv ? fv.active_blocks : 0);
        kvr_jw_key(&w, "bookings");
        kvr_jw_u64(&w, have_fv ? fv.bookings : 0);
        kvr_jw_end(&w);
    }
    kvr_jw_end(&w);
    kvr_jw_key(&w, "bookings");
    kvr_jw_u64(&w, kvr_fsm_booking_count(f));
    kvr_jw_end(&w);
    if (kvr_jw_finish(&w) != 0)
        respond_error(req, 500, "out of memory");
    else
        respond_json(req, 200, &b);
    kvr_buf_free(&b);
}

#ifdef KVR_ROUTERD_HAVE_SYNC
static void on_admin_done(kvr_sync *sy, int status, void *data)
{
    kvr_http_req *req = data;
    if (status == 0) {
        kvr_http_respond_cstr(req, 200, "application/json", "{\"ok\":true}");
    } else {
        char msg[128];
        snprintf(msg, sizeof(msg), "membership change failed: %s", kvr_strerror(status));
        respond_error(req, 500, msg);
    }
}

/* POST /admin/raft/add {"id":N,"raft_addr":"h:p"}, /promote {"id":N}, /remove {"id":N}.
 * Only the leader changes membership; elsewhere 409 with the leader id. */
static void http_admin(kvr_routerd *rd, kvr_http_req *req, const char *op)
{
    if (!rd->sync) {
        respond_error(req, 409, "not in raft mode (no --peers)");
        return;
    }
    cJSON *root = NULL;
    kvr_err err = {0};
    if (kvr_json_parse(req->body, 65536, 8, &root, &err) != 0) {
        respond_error(req, 400, err.msg);
        return;
    }
    int64_t id = 0;
    const char *addr = NULL;
    int rc = kvr_json_get_int(root, "id", true, 1, UINT32_MAX, &id, &err);
    if (rc == 0 && strcmp(op, "add") == 0)
        rc = kvr_json_get_string(root, "raft_addr", true, &addr, &err);
    if (rc != 0) {
        cJSON_Delete(root);
        respond_error(req, 400, err.msg);
        return;
    }
    uint32_t leader = 0;
    if (strcmp(op, "add") == 0)
        rc = kvr_sync_add_node(rd->sync, (uint32_t)id, addr, on_admin_done, req, &leader);
    else if (strcmp(op, "promote") == 0)
        rc = kvr_sync_promote_node(rd->sync, (uint32_t)id, on_admin_done, req, &leader);
    else
        rc = kvr_sync_remove_node(rd->sync, (uint32_t)id, on_admin_done, req, &leader);
    cJSON_Delete(root);
    if (rc == KVR_EAGAIN) {
        char msg[128];
        snprintf(msg, sizeof(msg), "not the leader; leader is %u", leader);
        respond_error(req, 409, msg);
    } else if (rc != 0) {
        respond_error(req, 400, kvr_strerror(rc));
    }
}
#endif

/* Everything but GET (and HEAD) of a read-only path, and all of /admin/, needs the admin
 * token: POST /v1/route books workers, /admin/raft/add etc. change membership, and even /v1/match
 * costs loop time. GET /health, /ready, /metrics and /v1/state stay open for probes and
 * scrapers (they change nothing). Without --admin-token-file those endpoints are disabled. */
static bool http_authorized(kvr_routerd *rd, kvr_http_req *req)
{
    bool read_only = (kvr_slice_eq_cstr(req->method, "GET") ||
                      kvr_slice_eq_cstr(req->method, "HEAD")) &&
                     !(req->path.len >= 7 && memcmp(req->path.base, "/admin/", 7) == 0);
    if (read_only)
        return true;
    kvr_slice a = kvr_http_req_header(req, "Authorization");
    if (rd->cfg.admin_token && a.base && kvr_bearer_ok(rd->cfg.admin_token, a.base, a.len))
        return true;
    kvr_metric_inc(rd->m_http_unauthorized);
    KVR_LOG_WARN_RL(10, "http request refused: admin token missing or wrong",
                    "method=%.*s path=\"%.*s\" configured=%d", (int)(req->method.len > 16 ? 16 : req->method.len),
                    req->method.base, (int)(req->path.len > 64 ? 64 : req->path.len), req->path.base,
                    rd->cfg.admin_token != NULL);
    kvr_http_add_header(req, "WWW-Authenticate", "Bearer realm=\"kvr-routerd\"");
    respond_error(req, 401,
                  rd->cfg.admin_token ? "admin token required (Authorization: Bearer ...)"
                                      : "admin endpoints disabled: start with --admin-token-file");
    return false;
}

static void on_http(kvr_http_req *req)
{
    kvr_routerd *rd = req->server->data;
    bool get = kvr_slice_eq_cstr(req->method, "GET");
    bool post = kvr_slice_eq_cstr(req->method, "POST");
    if (!http_authorized(rd, req))
        return;
    if (get && kvr_slice_eq_cstr(req->path, "/health")) {
        kvr_http_respond_cstr(req, 200, "text/plain", "ok\n");
    } else if (get && kvr_slice_eq_cstr(req->path, "/ready")) {
        if (rd->ready)
            kvr_http_respond_cstr(req, 200, "text/plain", "ready\n");
        else
            kvr_http_respond_cstr(req, 503, "text/plain", "catching up\n");
    } else if (get && kvr_slice_eq_cstr(req->path, "/metrics")) {
        update_index_gauges(rd);
        kvr_metrics_respond(rd->metrics, req);
    } else if (get && kvr_slice_eq_cstr(req->path, "/v1/state")) {
        http_state(rd, req);
    } else if (post && kvr_slice_eq_cstr(req->path, "/v1/match")) {
        http_match(rd, req);
    } else if (post && kvr_slice_eq_cstr(req->path, "/v1/route")) {
        http_route(rd, req);
#ifdef KVR_ROUTERD_HAVE_SYNC
    } else if (post && kvr_slice_eq_cstr(req->path, "/admin/raft/add")) {
        http_admin(rd, req, "add");
    } else if (post && kvr_slice_eq_cstr(req->path, "/admin/raft/promote")) {
        http_admin(rd, req, "promote");
    } else if (post && kvr_slice_eq_cstr(req->path, "/admin/raft/remove")) {
        http_admin(rd, req, "remove");
#endif
    } else if (kvr_slice_eq_cstr(req->path, "/health") || kvr_slice_eq_cstr(req->path, "/ready") ||
               kvr_slice_eq_cstr(req->path, "/metrics") || kvr_slice_eq_cstr(req->path, "/v1/state") ||
               kvr_slice_eq_cstr(req->path, "/v1/match") || kvr_slice_eq_cstr(req->path, "/v1/route")) {
        respond_error(req, 405, "method not allowed");
    } else {
        respond_error(req, 404, "not found");
    }
}

/* ------------------------------------------------------------------------------------------ */
/* periodic: heartbeats, leases, expiry */

/* A tick that comes much later than its 250 ms period means the loop did not run (a long
 * callback, SIGSTOP, a paused VM): no heartbeat or lease beat could be read meanwhile. Judge
 * liveness on the time the loop actually had by moving every deadline on by the stall. */
static void tick_compensate_stall(kvr_routerd *rd, int64_t now)
{
    int64_t gap = rd->last_tick_ms ? now - rd->last_tick_ms : 0;
    rd->last_tick_ms = now;
    if (gap <= RD_TICK_MS * 4)
        return;
    int64_t stall = gap - RD_TICK_MS;
    kvr_metric_inc(rd->m_tick_stalls);
    KVR_LOG_WARN("loop stalled: extending worker and frontend deadlines by the stall",
                 "stall_ms=%" PRId64, stall);
    liveness_hold(rd);
    /* never past now: a beat read just before this tick does not gain the stall on top */
    for (uint32_t i = 0; i < rd->n_workers; i++) {
        rd_worker *w = &rd->workers[i];
        w->last_seen_ms = w->last_seen_ms + stall < now ? w->last_seen_ms + stall : now;
        if (w->first_event_ms)
            w->first_event_ms = w->first_event_ms + stall < now ? w->first_event_ms + stall : now;
    }
    for (uint32_t i = 0; i < rd->n_frontends; i++) {
        rd_frontend *f = &rd->frontends[i];
        f->last_seen_ms = f->last_seen_ms + stall < now ? f->last_seen_ms + stall : now;
    }
}

/* Without Raft: the rule the sync leader applies to the replicated registry (liveness.h),
 * applied to this router's own FSM: a worker up there and not heard for --heartbeat-misses
 * seconds since it was last heard or this router started goes down, also one this router has
 * no record of. */
static void liveness_local(kvr_routerd *rd, int64_t now)
{
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (rd->sync)
        return;
#endif
    if (!rd->live.office_ms)
        kvr_live_set_leader(&rd->live, true, rd->start_ms ? rd->start_ms : now);
    uint64_t ids[64];
    uint32_t n = kvr_live_due(&rd->live, rd->fsm, now, rd->cfg.heartbeat_misses * 1000, ids, 64);
    for (uint32_t i = 0; i < n; i++) {
        rd_worker *w = worker_find(rd, ids[i]);
        if (w && w->up) {
            worker_down(rd, w, "missed_heartbeats");
            continue;
        }
        KVR_LOG_WARN("worker down: not heard", "worker=%" PRIu64, ids[i]);
        kvr_cmd cmd = {.type = KVR_CMD_WORKER_DOWN};
        cmd.u.worker_id = ids[i];
        rd_submit(rd, &cmd, log_cmd_failure, "worker_down");
    }
}

/* Index entries of workers this router has no record of (loaded from the LMDB snapshot, for
 * a worker that may never beat again) are tracked like events of a worker not announced yet:
 * without a heartbeat within --heartbeat-misses seconds of ready they are removed (on_tick), so
 * every replica drops the same entries. Once a second. */
static void orphan_sweep(kvr_routerd *rd, int64_t now)
{
    if (now - rd->last_orphan_sweep_ms < 1000 || !rd->iw_scratch)
        return;
    rd->last_orphan_sweep_ms = now;
    size_t n = kvr_index_workers(rd->idx, rd->iw_scratch, RD_MAX_WORKERS);
    if (n > RD_MAX_WORKERS)
        n = RD_MAX_WORKERS;
    for (size_t i = 0; i < n && rd->n_workers < RD_MAX_WORKERS; i++) {
        if (worker_find(rd, rd->iw_scratch[i].worker_id))
            continue;
        rd_worker *w = &rd->workers[rd->n_workers++];
        memset(w, 0, sizeof(*w));
        w->id = rd->iw_scratch[i].worker_id;
        w->first_event_ms = now;
    }
}

#ifdef KVR_ROUTERD_HAVE_SYNC
/* kvr.routers.quorum: "<router id>" from a router that is in the kvr.route queue group and
 * knows a Raft leader, sent every tick. */
static void on_quorum_beacon(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    char buf[16];
    if (m->len == 0 || m->len >= sizeof buf)
        return;
    memcpy(buf, m->data, m->len);
    buf[m->len] = '\0';
    char *end;
    unsigned long id = strtoul(buf, &end, 10);
    if (*end != '\0' || id == 0 || id == rd->cfg.id)
        return;
    rd->peer_quorum_ms = kvr_mono_ms();
}

static void send_quorum_beacon(kvr_routerd *rd, const kvr_sync_state *ss)
{
    if (!rd->ready || rd->groups_left || !rd->sub_route || ss->leader_id == 0 || !rd->nats_up)
        return;
    char buf[16];
    int n = snprintf(buf, sizeof buf, "%u", (unsigned)rd->cfg.id);
    (void)kvr_nats_publish(&rd->nats, "kvr.routers.quorum", buf, (size_t)n);
}

/* A router that has LOST its Raft group's quorum (cut off from the majority, but maybe not
 * from NATS) leaves the routers' queue groups, so route requests and route events go to
 * routers that can commit them: before, a partitioned leader kept taking its share of them
 * into its local copy, the majority held bookings whose FREE it never saw, and those FREEs
 * reached it only at reconcile. It leaves only while both hold:
 *  - kvr_sync says the quorum is lost: a leader was known since start and none has been for
 *    more than 2x the election timeout (monotonic clock). Start-up and ordinary elections do
 *    not count: leaving on plain "degraded" (500 ms without a leader) emptied the queue
 *    group during elections and the frontends got "no responders".
 *  - another router said, after this one lost its quorum and within the last
 *    RD_PEER_QUORUM_TTL_MS, that it has a leader and is in the kvr.route queue group. So
 *    the group never empties on its own account: when every router is without a quorum (all
 *    partitioned from each other, the majority down) nobody hears such a beacon and all keep
 *    answering in local mode.
 * It rejoins as soon as either stops holding (a leader is known again, or the beacons stop).
 * While out it still hears every route event (a plain subscription): they go into its local
 * copy and are re-proposed when the quorum is back. */
static void follow_quorum(kvr_routerd *rd)
{
    if (!rd->sync)
        return;
    kvr_sync_state ss;
    kvr_sync_get_state(rd->sync, &ss);
    int64_t now = kvr_mono_ms();
    bool peer = peer_has_quorum(rd, now);
    bool leave = ss.quorum_lost && peer && rd->peer_quorum_ms > ss.quorum_lost_since_ms;
    send_quorum_beacon(rd, &ss);
    if (rd->n_relay > 0 && (ss.leader_id != 0 || !peer))
        rd->n_relay = 0; /* nobody to relay to, or a leader to reconcile with */
    if (leave == rd->groups_left)
        return;
    kvr_err err = {0};
    if (leave) {
        if (kvr_nats_subscribe(&rd->nats, "kvr.route.event", NULL, on_route_event_all, rd,
                               &rd->sub_event_all, &err) != 0) {
            KVR_LOG_WARN_RL(5, "subscribing to kvr.route.event", "error=\"%s\"", err.msg);
            return;
        }
        if (rd->sub_route)
            kvr_nats_unsubscribe(rd->sub_route);
        if (rd->sub_event)
            kvr_nats_unsubscribe(rd->sub_event);
        rd->sub_route = rd->sub_event = NULL;
        rd->groups_left = true;
        rd->groups_left_n++;
        for (uint32_t i = 0; i < rd->n_relay; i++)
            relay_route_event(rd, &rd->relay_q[i]);
        if (rd->n_relay)
            KVR_LOG_INFO("route events answered locally relayed", "n=%u", rd->n_relay);
        rd->n_relay = 0;
        KVR_LOG_WARN("quorum lost, another router has one: left the routers' queue groups",
                     "ready=%d no_leader_ms=%lld", rd->ready,
                     (long long)(now - ss.quorum_lost_since_ms));
        return;
    }
    if (kvr_nats_subscribe(&rd->nats, "kvr.route.event", "kvr-routers", on_route_event, rd,
                           &rd->sub_event, &err) != 0 ||
        (rd->ready && kvr_nats_subscribe(&rd->nats, "kvr.route", "kvr-routers", on_route_nats, rd,
                                         &rd->sub_route, &err) != 0)) {
        KVR_LOG_WARN_RL(5, "rejoining the routers' queue groups", "error=\"%s\"", err.msg);
        if (rd->sub_event)
            kvr_nats_unsubscribe(rd->sub_event);
        rd->sub_event = NULL;
        return;
    }
    if (rd->sub_event_all)
        kvr_nats_unsubscribe(rd->sub_event_all);
    rd->sub_event_all = NULL;
    rd->groups_left = false;
    KVR_LOG_INFO("rejoined the routers' queue groups", "ready=%d leader=%u peer_with_quorum=%d",
                 rd->ready, ss.leader_id, peer);
}
#endif

static void on_tick(uv_timer_t *t)
{
    kvr_routerd *rd = t->data;
    int64_t now = kvr_mono_ms();
    int64_t limit = rd->cfg.heartbeat_misses * 1000;
    uint32_t up = 0;
    tick_compensate_stall(rd, now);
#ifdef KVR_ROUTERD_HAVE_SYNC
    follow_quorum(rd);
#endif
    for (uint32_t i = 0; i < rd->n_workers;) {
        rd_worker *w = &rd->workers[i];
        if (!w->announced) {
            /* events but never a heartbeat: once we are live and heartbeats had time to
             * arrive, its entries go (a worker nobody hears from cannot be routed to) */
            int64_t since = w->first_event_ms > rd->ready_ms ? w->first_event_ms : rd->ready_ms;
            if (rd->ready && rd->nats_up && now - since > limit) {
                KVR_LOG_WARN_RL(10, "worker sent events but no heartbeat: removing its entries",
                                "worker=%" PRIu64 " events=%" PRIu64, w->id, w->events);
                kvr_index_remove_worker(rd->idx, w->id);
                kvr_metric_inc(rd->m_unannounced_removed);
                rd->workers[i] = rd->workers[--rd->n_workers];
                continue;
            }
            i++;
            continue;
        }
        /* with NATS down a missing heartbeat says nothing: keep the last known state */
        if (w->up && rd->nats_up && now - w->last_seen_ms > limit) {
            kvr_fsm_worker_view fv;
            bool reg_up = kvr_fsm_worker_get(rd_fsm(rd), w->id, &fv) == 0 && fv.up;
            /* With Raft the leader declares it down (liveness.h); here it goes down once the
             * replicated registry says so, so every replica drops the same entries. */
            if (owns_liveness(rd) || !reg_up)
                worker_down(rd, w, reg_up ? "missed_heartbeats" : "down_in_registry");
        }
        if (w->up) {
            up++;
            /* another replica may have declared it down (it lost the heartbeats, or a
             * reconcile replayed an old WORKER_DOWN): while we hear it, keep it up in the
             * replicated registry */
            kvr_fsm_worker_view fv;
            if ((kvr_fsm_worker_get(rd_fsm(rd), w->id, &fv) != 0 || !fv.up) &&
                now - w->resync_ms > 2000) {
                w->resync_ms = now;
                worker_submit_up(rd, w);
            }
        }
        i++;
    }
    kvr_metric_set(rd->m_workers_up, 0, up);
    if (!rd->nats_up)
        liveness_hold(rd);
    liveness_local(rd, now);
    orphan_sweep(rd, now);
    clear_sweep(rd, now);
    publish_clears(rd, now);
    /* With Raft the leader's housekeeping owns lease and request expiry (sync.h): one owner
     * of each policy instead of every router proposing the same expiries (defect 13). */
    bool own_expiry = true;
#ifdef KVR_ROUTERD_HAVE_SYNC
    own_expiry = rd->sync == NULL;
#endif
    for (uint32_t i = 0; own_expiry && i < rd->n_frontends;) {
        rd_frontend *f = &rd->frontends[i];
        if (rd->nats_up && now - f->last_seen_ms > rd->cfg.frontend_timeout_ms) {
            KVR_LOG_INFO("frontend lease expired: freeing its bookings", "frontend=%" PRIu64, f->id);
            kvr_cmd cmd = {.type = KVR_CMD_FRONTEND_EXPIRE};
            cmd.u.frontend.frontend_id = f->id;
            cmd.u.frontend.now_ms = (uint64_t)kvr_now_ms();
            rd_submit(rd, &cmd, NULL, NULL);
            rd->frontends[i] = rd->frontends[--rd->n_frontends];
            continue;
        }
        i++;
    }
    if (own_expiry && now - rd->last_expire_ms > 10000) {
        rd->last_expire_ms = now;
        /* age on this router's monotonic clock, not a (broadcast) booking's wall stamp
         * against our wall clock (liveness.h) */
        uint64_t before;
        uint32_t age = rd->cfg.max_request_age_ms > UINT32_MAX - 1
                           ? UINT32_MAX - 1
                           : (uint32_t)rd->cfg.max_request_age_ms;
        if (kvr_live_expire_due(rd->fsm, now, rd->start_ms, age, &before)) {
            kvr_cmd cmd = {.type = KVR_CMD_EXPIRE};
            cmd.u.before_ms = before;
            rd_submit(rd, &cmd, NULL, NULL);
        }
    }
    kvr_nats_stats ns;
    kvr_nats_get_stats(&rd->nats, &ns);
    kvr_metric_counter_set(rd->m_consumer_restarts, 0, ns.consumer_restarts);
    kvr_metric_counter_set(rd->m_nats_backpressure, 0, ns.backpressure_waits);
    if (!rd->ready)
        check_ready(rd);
}

/* ------------------------------------------------------------------------------------------ */
/* snapshots */

typedef struct snap_job {
    uv_work_t req;
    kvr_routerd *rd;
    kvr_index_image img;
    char *dir;
    int rc;
    kvr_err err;
    kvr_snapshot_info info;
    int64_t t0_ns;
    double export_s; /* time the loop was busy copying the index */
    bool final;
} snap_job;

static void snap_work(uv_work_t *req)
{
    snap_job *j = req->data;
    j->rc = kvr_snapshot_write(&j->img, j->dir, &j->info, &j->err);
}

static void maybe_finish_stop(kvr_routerd *rd);
static int start_snapshot(kvr_routerd *rd, bool final);

static void snap_after(uv_work_t *req, int status)
{
    snap_job *j = req->data;
    kvr_routerd *rd = j->rd;
    double secs = (double)(kvr_mono_ns() - j->t0_ns) / 1e9;
    rd->snap_running = false;
    if (j->rc == 0) {
        rd->snap_last_written_seq = j->img.stream_seq;
        rd->snap_last_digest = j->img.digest;
        kvr_metric_inc(rd->m_snaps);
        kvr_metric_observe(rd->m_snap_duration, 0, secs);
        kvr_metric_set(rd->m_snap_bytes, 0, (double)j->info.file_bytes);
        KVR_LOG_INFO("snapshot written", "stream_seq=%" PRIu64 " entries=%" PRIu64
                     " bytes=%" PRIu64 " seconds=%.3f export_seconds=%.4f final=%d",
                     j->img.stream_seq, j->img.entries, j->info.file_bytes, secs, j->export_s,
                     j->final);
    } else {
        kvr_metric_inc(rd->m_snap_failures);
        KVR_LOG_ERROR("snapshot failed", "error=\"%s\"", j->err.msg);
    }
    bool was_final = j->final;
    kvr_index_image_free(&j->img);
    free(j);
    if (rd->stopping) {
        /* a periodic snapshot was running when SIGTERM came: now write the final one */
        if (!was_final)
            start_snapshot(rd, true);
        maybe_finish_stop(rd);
    }
}

static int start_snapshot(kvr_routerd *rd, bool final)
{
    if (rd->snap_running)
        return KVR_EAGAIN;
    if (!rd->stream_started && !rd->snap_loaded)
        return 0; /* nothing consumed yet: keep whatever is on disk */
    uint64_t seq = kvr_index_stream_seq(rd->idx);
    uint64_t dg = kvr_index_digest(rd->idx);
    if (seq == rd->snap_last_written_seq && dg == rd->snap_last_digest) {
        /* Nothing changed since the last snapshot: the file on disk already is the final one. */
        if (final)
            KVR_LOG_INFO("snapshot current", "stream_seq=%" PRIu64 " final=1", seq);
        return 0;
    }
    snap_job *j = calloc(1, sizeof(*j));
    if (!j)
        return KVR_ENOMEM;
    j->rd = rd;
    j->dir = rd->snap_dir;
    j->final = final;
    j->t0_ns = kvr_mono_ns();
    kvr_err err = {0};
    int rc = kvr_index_export(rd->idx, &j->img, &err);
    j->export_s = (double)(kvr_mono_ns() - j->t0_ns) / 1e9;
    kvr_metric_set(rd->m_snap_export, 0, j->export_s);
    if (rc != 0) {
        KVR_LOG_ERROR("snapshot export failed", "error=\"%s\"", err.msg);
        free(j);
        return rc;
    }
    j->req.data = j;
    rd->snap_running = true;
    if (uv_queue_work(rd->loop, &j->req, snap_work, snap_after) != 0) {
        rd->snap_running = false;
        kvr_index_image_free(&j->img);
        free(j);
        return KVR_EIO;
    }
    return 0;
}

static void on_snap_timer(uv_timer_t *t)
{
    kvr_routerd *rd = t->data;
    start_snapshot(rd, false);
}

static void load_snapshot(kvr_routerd *rd)
{
    kvr_index_image img = {0};
    kvr_err err = {0};
    int64_t t0 = kvr_mono_ns();
    int rc = kvr_snapshot_read(rd->snap_dir, rd->cfg.block_size, &img, NULL, &err);
    if (rc == KVR_ENOTFOUND) {
        KVR_LOG_INFO("no snapshot: building the index from the stream start", "dir=%s", rd->snap_dir);
        return;
    }
    if (rc != 0) {
        KVR_LOG_WARN("snapshot unusable: rebuilding from the stream start", "error=\"%s\"", err.msg);
        return;
    }
    rc = kvr_index_import(rd->idx, &img, &err);
    if (rc != 0) {
        KVR_LOG_WARN("snapshot import failed: rebuilding from the stream start", "error=\"%s\"",
                     err.msg);
        kvr_index_image_free(&img);
        rd_recreate_index(rd);
        return;
    }
    rd->snap_loaded = true;
    rd->snap_seq = img.stream_seq;
    rd->snap_last_written_seq = img.stream_seq;
    rd->snap_last_digest = img.digest;
    KVR_LOG_INFO("snapshot loaded", "stream_seq=%" PRIu64 " entries=%" PRIu64 " seconds=%.3f",
                 img.stream_seq, img.entries, (double)(kvr_mono_ns() - t0) / 1e9);
    kvr_index_image_free(&img);
}

/* ------------------------------------------------------------------------------------------ */
/* metrics */

static void register_metrics(kvr_routerd *rd)
{
    kvr_metrics *m = rd->metrics;
    static const char *const modes[] = {"raft", "local", NULL};
    static const char *const route_err[] = {"backend", "no_worker", "bad_request", NULL};
    rd->m_events_applied = kvr_metrics_counter(m, "kvr_routerd_events_applied_total",
                                               "KV events applied to the index", NULL, NULL);
    rd->m_blocks_applied = kvr_metrics_counter(m, "kvr_routerd_blocks_applied_total",
                                               "Blocks in applied BlockStored events", NULL, NULL);
    rd->m_events_rejected = kvr_metrics_counter(m, "kvr_routerd_events_rejected_total",
                                                "KV event payloads or events rejected, by reason",
                                                "reason", rej_names);
    rd->m_clears_published = kvr_metrics_counter(
        m, "kvr_routerd_worker_clears_published_total",
        "AllBlocksCleared events published for workers whose WORKER_DOWN this router committed",
        NULL, NULL);
    rd->m_replayed = kvr_metrics_counter(m, "kvr_routerd_stream_messages_total",
                                         "Stream messages consumed since start", NULL, NULL);
    rd->m_stream_lag = kvr_metrics_gauge(m, "kvr_routerd_stream_lag_messages",
                                         "Stream messages not yet applied", NULL, NULL);
    rd->m_stream_seq = kvr_metrics_gauge(m, "kvr_routerd_stream_seq",
                                         "Last applied stream sequence", NULL, NULL);
    rd->m_route_decisions = kvr_metrics_counter(m, "kvr_routerd_route_decisions_total",
                                                "Route decisions by mode", "mode", modes);
    rd->m_route_errors = kvr_metrics_counter(m, "kvr_routerd_route_errors_total",
                                             "Route requests not answered with a worker",
                                             "reason", route_err);
    static const double route_buckets[] = {0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
                                           0.001,   0.0025,   0.005,   0.01,   0.025,   0.05,
                                           0.1,     0.25,     1.0};
    rd->m_route_latency = kvr_metrics_histogram(
        m, "kvr_routerd_route_latency_seconds",
        "Route request latency inside the router (request on the loop to reply sent)",
        route_buckets, sizeof(route_buckets) / sizeof(route_buckets[0]), NULL, NULL);
    static const char *const hops[] = {"queue", "commit", "reply", "leader", "forward", NULL};
    rd->m_raft_hop = kvr_metrics_histogram(
        m, "kvr_routerd_raft_hop_seconds",
        "Raft route-and-reserve per hop: queue (arrival on the leader to proposal), commit "
        "(proposal to applied), reply (applied to answer handed over), leader (whole stay on the "
        "leader), forward (follower: forward sent to answer received)",
        route_buckets, sizeof(route_buckets) / sizeof(route_buckets[0]), "hop", hops);
    rd->m_index_entries = kvr_metrics_gauge(m, "kvr_routerd_index_entries", "Index entries (worker x block)", NULL, NULL);
    rd->m_index_blocks = kvr_metrics_gauge(m, "kvr_routerd_index_blocks", "Distinct blocks in the index", NULL, NULL);
    rd->m_index_bytes = kvr_metrics_gauge(m, "kvr_routerd_index_bytes", "Heap bytes of the index", NULL, NULL);
    rd->m_snap_duration = kvr_metrics_histogram(m, "kvr_routerd_snapshot_duration_seconds",
                                                "Snapshot export+write time",
                                                kvr_metrics_latency_buckets_s,
                                                kvr_metrics_latency_buckets_s_n, NULL, NULL);
    rd->m_snap_export = kvr_metrics_gauge(m, "kvr_routerd_snapshot_export_seconds",
                                          "Loop time spent copying the index for the last snapshot",
                                          NULL, NULL);
    rd->m_snap_bytes = kvr_metrics_gauge(m, "kvr_routerd_snapshot_bytes", "Size of the last snapshot", NULL, NULL);
    rd->m_snaps = kvr_metrics_counter(m, "kvr_routerd_snapshots_total", "Snapshots written", NULL, NULL);
    rd->m_snap_failures = kvr_metrics_counter(m, "kvr_routerd_snapshot_failures_total", "Snapshots that failed", NULL, NULL);
    rd->m_ready_s = kvr_metrics_gauge(m, "kvr_routerd_time_to_ready_seconds", "Seconds from start to caught up", NULL, NULL);
    rd->m_workers_up = kvr_metrics_gauge(m, "kvr_routerd_workers_up", "Workers with a live heartbeat", NULL, NULL);
    rd->m_workers_refused = kvr_metrics_counter(m, "kvr_routerd_workers_refused_total",
                                                "Workers refused (block size differs)", NULL, NULL);
    rd->m_nats_reconnects = kvr_metrics_counter(m, "kvr_routerd_nats_reconnects_total", "NATS reconnects", NULL, NULL);
    rd->m_consumer_restarts = kvr_metrics_counter(m, "kvr_routerd_consumer_restarts_total",
                                                  "JetStream consumer re-creations", NULL, NULL);
    rd->m_nats_backpressure = kvr_metrics_counter(m, "kvr_routerd_nats_backpressure_total",
                                                  "Times a NATS delivery thread waited for the loop", NULL, NULL);
    rd->m_unknown_worker = kvr_metrics_counter(
        m, "kvr_routerd_events_unknown_worker_total",
        "Event messages from workers not (yet) announced by heartbeat (applied)", NULL, NULL);
    rd->m_unannounced_removed = kvr_metrics_counter(
        m, "kvr_routerd_unannounced_workers_removed_total",
        "Workers whose entries were removed because they never sent a heartbeat", NULL, NULL);
    rd->m_http_unauthorized = kvr_metrics_counter(
        m, "kvr_routerd_http_unauthorized_total",
        "HTTP POST and /admin requests refused for a missing or wrong admin token", NULL, NULL);
    rd->m_hb_refused_url = kvr_metrics_counter(
        m, "kvr_routerd_heartbeats_refused_url_total",
        "Heartbeats refused because the worker url is outside --worker-cidr", NULL, NULL);
    rd->m_workers_evicted = kvr_metrics_counter(
        m, "kvr_routerd_workers_evicted_total",
        "Down or never-announced workers evicted from the full worker table", NULL, NULL);
    rd->m_tick_stalls = kvr_metrics_counter(
        m, "kvr_routerd_loop_stalls_total",
        "Late ticks (loop stalls) whose duration was added to every liveness deadline", NULL,
        NULL);
    rd->m_bcast_rejected = kvr_metrics_counter(
        m, "kvr_routerd_booking_broadcasts_rejected_total",
        "Best-effort mode: booking broadcasts from other routers that did not decode", NULL, NULL);
    kvr_metrics_add_http_server(m, "kvr_routerd_http", &rd->http);
}

/* ------------------------------------------------------------------------------------------ */
/* start / stop */

static int mkdir_p(const char *path)
{
    char buf[4096];
    size_t n = strlen(path);
    if (n >= sizeof(buf))
        return KVR_ELIMIT;
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] == '/' || buf[i] == 0) {
            char c = buf[i];
            buf[i] = 0;
            if (mkdir(buf, 0755) != 0 && errno != EEXIST)
                return KVR_EIO;
            buf[i] = c;
        }
    }
    return 0;
}

#ifdef KVR_ROUTERD_HAVE_SYNC
/* kvr_sync's per-hop latencies (sync.h KVR_SYNC_HOP_*: same order as the label values). */
static void raft_hop_observe(void *data, int hop, double seconds)
{
    kvr_routerd *rd = data;
    if (rd->m_raft_hop)
        kvr_metric_observe(rd->m_raft_hop, (size_t)hop, seconds);
}
#endif

int kvr_routerd_start(kvr_routerd **out, uv_loop_t *loop, const kvr_routerd_config *cfg)
{
    kvr_routerd *rd = calloc(1, sizeof(*rd));
    if (!rd)
        return KVR_ENOMEM;
    rd->cfg = *cfg;
    rd->loop = loop;
    rd->start_ms = kvr_mono_ms();
    rd->last_expire_ms = rd->start_ms;
    kvr_err cerr = {0};
    if (kvr_cidr_list_add_csv(&rd->worker_cidrs,
                              cfg->worker_cidrs && *cfg->worker_cidrs ? cfg->worker_cidrs : "private",
                              &cerr) != 0) {
        KVR_LOG_ERROR("bad --worker-cidr", "error=\"%s\"", cerr.msg);
        free(rd);
        return KVR_EINVAL;
    }
    if (cfg->ns && *cfg->ns && strcmp(cfg->ns, "all") != 0)
        snprintf(rd->ns_filter, sizeof(rd->ns_filter), "%s", cfg->ns);
    kvr_err err = {0};
    int rc;
    rd->data_dir = strdup(cfg->data_dir);
    rd->snap_dir = malloc(strlen(cfg->data_dir) + 8);
    if (rd->snap_dir)
        sprintf(rd->snap_dir, "%s/index", cfg->data_dir);
    rd->seq_scratch = malloc(RD_MAX_SEQ_HASHES * sizeof(uint64_t));
    rd->max_tokens = cfg->max_request_tokens > 0 ? (size_t)cfg->max_request_tokens : 131072;
    if (rd->max_tokens > (size_t)RD_MAX_SEQ_HASHES * cfg->block_size)
        rd->max_tokens = (size_t)RD_MAX_SEQ_HASHES * cfg->block_size;
    rd->tok_scratch = malloc(rd->max_tokens * sizeof(uint32_t));
    rd->iw_scratch = malloc(RD_MAX_WORKERS * sizeof *rd->iw_scratch);
    if (!rd->data_dir || !rd->snap_dir || !rd->seq_scratch || !rd->tok_scratch || !rd->iw_scratch) {
        rc = KVR_ENOMEM;
        goto fail;
    }
    if (mkdir_p(rd->data_dir) != 0) {
        KVR_LOG_ERROR("cannot create data dir", "dir=%s error=\"%s\"", rd->data_dir, strerror(errno));
        rc = KVR_EIO;
        goto fail;
    }
    kvr_index_opts io = {.block_size = cfg->block_size, .max_workers = RD_MAX_WORKERS};
    rc = kvr_index_create(&rd->idx, &io, &err);
    if (rc != 0) {
        KVR_LOG_ERROR("creating index", "error=\"%s\"", err.msg);
        goto fail;
    }
    kvr_kv_decoder_init(&rd->dec, NULL);
    load_snapshot(rd);

    rd->fsm = kvr_fsm_new(NULL);
    if (!rd->fsm) {
        rc = KVR_ENOMEM;
        goto fail;
    }
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (cfg->peers && *cfg->peers) {
        kvr_sync_options so;
        kvr_sync_options_default(&so);
        so.id = cfg->id;
        so.raft_addr = cfg->raft_addr;
        so.peers = cfg->peers;
        so.join = cfg->join;
        char raft_dir[4096];
        snprintf(raft_dir, sizeof(raft_dir), "%s/raft", rd->data_dir);
        so.data_dir = raft_dir;
        so.memory_log = cfg->raft_log_memory;
        so.hop_cb = raft_hop_observe;
        so.hop_data = rd;
        /* tests only: shorten memlog's post-catch-up hold */
        const char *hold = getenv("KVR_TEST_MEMLOG_HOLD_MS");
        if (hold && *hold)
            so.memory_hold_ms = (uint32_t)strtoul(hold, NULL, 10);
        if (cfg->degraded_after_ms > 0)
            so.degraded_after_ms = (uint32_t)cfg->degraded_after_ms;
        if (cfg->raft_max_inflight > 0)
            so.max_inflight = (uint32_t)cfg->raft_max_inflight;
        if (cfg->raft_snapshot_threshold > 0) {
            so.snapshot_threshold = (uint32_t)cfg->raft_snapshot_threshold;
            so.snapshot_trailing = so.snapshot_threshold / 4 ? so.snapshot_threshold / 4 : 1;
        }
        if (cfg->election_timeout_ms > 0) {
            so.election_timeout_ms = (uint32_t)cfg->election_timeout_ms;
            if (so.heartbeat_timeout_ms * 5 > so.election_timeout_ms)
                so.heartbeat_timeout_ms = so.election_timeout_ms / 5;
        }
        /* Defect 13: both policies reach the leader's housekeeping (sync.h), the only place
         * that proposes lease and request expiry with Raft. */
        if (cfg->frontend_timeout_ms > 0)
            so.lease_ttl_ms = cfg->frontend_timeout_ms > UINT32_MAX - 1
                                  ? UINT32_MAX - 1
                                  : (uint32_t)cfg->frontend_timeout_ms;
        if (cfg->max_request_age_ms > 0)
            so.max_request_age_ms = cfg->max_request_age_ms > UINT32_MAX - 1
                                        ? UINT32_MAX - 1
                                        : (uint32_t)cfg->max_request_age_ms;
        /* Worker liveness with Raft: the leader alone, same bound as without (liveness.h). */
        so.worker_ttl_ms = cfg->heartbeat_misses > 0 ? (uint32_t)cfg->heartbeat_misses * 1000 : 3000;
        so.worker_down_cb = on_worker_down_committed;
        so.worker_down_data = rd;
        kvr_auth_key key;
        if (cfg->cluster_secret_file) {
            rc = kvr_auth_key_load(&key, cfg->cluster_secret_file, &err);
            if (rc != 0) {
                KVR_LOG_ERROR("starting raft", "error=\"%s\"", err.msg);
                goto fail;
            }
            so.auth_key = &key;
        } else {
            KVR_LOG_WARN("raft peers are not authenticated (--insecure-cluster or a single router)",
                         "raft_addr=%s", cfg->raft_addr);
        }
        rc = kvr_sync_init(&rd->sync, loop, &so, &err);
        memset(&key, 0, sizeof key); /* kvr_sync keeps its own copy */
        if (rc == 0)
            rc = kvr_sync_start(rd->sync, &err);
        if (rc != 0) {
            KVR_LOG_ERROR("starting raft", "error=\"%s\"", err.msg);
            goto fail;
        }
        KVR_LOG_INFO("raft started", "id=%u raft_addr=%s peers=%s", cfg->id, cfg->raft_addr, cfg->peers);
    }
#else
    if (cfg->peers && *cfg->peers) {
        KVR_LOG_ERROR("--peers given but this build has no sync module", "peers=%s", cfg->peers);
        rc = KVR_EUNSUPPORTED;
        goto fail;
    }
#endif

    rd->metrics = kvr_metrics_new();
    if (!rd->metrics) {
        rc = KVR_ENOMEM;
        goto fail;
    }
    /* The biggest body a route needs: max_tokens ids of up to 10 digits, a separator and
     * some whitespace each, plus the other members. A bigger one is refused (413) from its
     * Content-Length or chunk headers, before it is read. */
    kvr_http_config hc = {.on_request = on_http,
                          .max_body_bytes = rd->max_tokens * 16 + (64u << 10)};
    rc = kvr_http_server_init(&rd->http, loop, &hc);
    if (rc != 0)
        goto fail;
    rd->http.data = rd;
    register_metrics(rd);
    rc = kvr_http_listen(&rd->http, cfg->http_addr, &err);
    if (rc != 0) {
        KVR_LOG_ERROR("http listen", "addr=%s error=\"%s\"", cfg->http_addr, err.msg);
        goto fail;
    }

    char name[64];
    snprintf(name, sizeof(name), "kvr-routerd-%u", cfg->id);
    kvr_nats_opts no = {.url = cfg->nats_url, .name = name, .on_state = on_nats_state};
    if (cfg->nats_flags)
        kvr_nats_flags_fill(cfg->nats_flags, &no);
    rd->nats.data = rd;
    rc = kvr_nats_init(&rd->nats, loop, &no, &err);
    if (rc != 0) {
        KVR_LOG_ERROR("nats", "error=\"%s\"", err.msg);
        goto fail;
    }
    rd->nats.data = rd;
    char subj[128];
    if (rd->ns_filter[0])
        snprintf(subj, sizeof(subj), "kvr.workers.%s.*", rd->ns_filter);
    else
        snprintf(subj, sizeof(subj), "kvr.workers.>");
    if ((rc = kvr_nats_subscribe(&rd->nats, subj, NULL, on_heartbeat, rd, NULL, &err)) != 0 ||
        (rc = kvr_nats_subscribe(&rd->nats, "kvr.route.event", "kvr-routers", on_route_event, rd,
                                 &rd->sub_event, &err)) != 0 ||
        (rc = kvr_nats_subscribe(&rd->nats, "kvr.frontends.*", NULL, on_frontend, rd, NULL,
                                 &err)) != 0 ||
#ifdef KVR_ROUTERD_HAVE_SYNC
        (rd->sync && (rc = kvr_nats_subscribe(&rd->nats, "kvr.routers.quorum", NULL,
                                              on_quorum_beacon, rd, NULL, &err)) != 0) ||
#endif
        (cfg->best_effort && (rc = kvr_nats_subscribe(&rd->nats, "kvr.route.bcast", NULL, on_bcast,
                                                      rd, NULL, &err)) != 0)) {
        KVR_LOG_ERROR("nats subscribe", "error=\"%s\"", err.msg);
        goto fail;
    }
    uv_timer_init(loop, &rd->stream_retry);
    rd->stream_retry.data = rd;
    uv_timer_init(loop, &rd->tick);
    rd->tick.data = rd;
    rd->last_tick_ms = kvr_mono_ms();
    uv_timer_start(&rd->tick, on_tick, RD_TICK_MS, RD_TICK_MS);
    uv_timer_init(loop, &rd->snap_timer);
    rd->snap_timer.data = rd;
    if (cfg->snapshot_interval_ms > 0)
        uv_timer_start(&rd->snap_timer, on_snap_timer, (uint64_t)cfg->snapshot_interval_ms,
                       (uint64_t)cfg->snapshot_interval_ms);
    start_stream(rd);
    char nats_red[512];
    KVR_LOG_INFO("started", "id=%u http=%s port=%d nats=%s data_dir=%s namespace=%s block_size=%u",
                 cfg->id, cfg->http_addr, kvr_http_server_port(&rd->http),
                 kvr_nats_redact_url(cfg->nats_url, nats_red, sizeof nats_red), rd->data_dir, rd->ns_filter[0] ? rd->ns_filter : "all", cfg->block_size);
    *out = rd;
    return 0;
fail:
    /* start-up failure: the process exits; the OS reclaims the rest */
    return rc ? rc : KVR_EIO;
}

static void handle_closed(uv_handle_t *h)
{
    kvr_routerd *rd = h->data;
    rd->closing_handles--;
    maybe_finish_stop(rd);
}

static void nats_closed(kvr_nats *kn)
{
    kvr_routerd *rd = kn->data;
    rd->closing_handles--;
    maybe_finish_stop(rd);
}

static void http_closed(kvr_http_server *srv)
{
    kvr_routerd *rd = srv->data;
    rd->closing_handles--;
    maybe_finish_stop(rd);
}

#ifdef KVR_ROUTERD_HAVE_SYNC
static void sync_closed(void *data)
{
    kvr_routerd *rd = data;
    rd->sync = NULL;
    rd->closing_handles--;
    maybe_finish_stop(rd);
}
#endif

static bool stop_phase2_started;

static void maybe_finish_stop(kvr_routerd *rd)
{
    if (!rd->stopping || rd->snap_running)
        return;
    if (!stop_phase2_started) {
        stop_phase2_started = true;
        rd->closing_handles = 6;
        uv_close((uv_handle_t *)&rd->tick, handle_closed);
        uv_close((uv_handle_t *)&rd->snap_timer, handle_closed);
        uv_close((uv_handle_t *)&rd->stream_retry, handle_closed);
        kvr_http_server_close(&rd->http, http_closed);
        if (kvr_nats_close(&rd->nats, nats_closed) != 0)
            rd->closing_handles--;
#ifdef KVR_ROUTERD_HAVE_SYNC
        if (rd->sync)
            kvr_sync_close(rd->sync, sync_closed, rd);
        else
            rd->closing_handles--;
#else
        rd->closing_handles--;
#endif
        return;
    }
    if (rd->closing_handles == 0 && rd->done_cb) {
        void (*cb)(void *) = rd->done_cb;
        rd->done_cb = NULL;
        cb(rd->done_data);
    }
}

void kvr_routerd_stop(kvr_routerd *rd, void (*done_cb)(void *), void *data)
{
    if (rd->stopping)
        return;
    rd->stopping = true;
    rd->done_cb = done_cb;
    rd->done_data = data;
    KVR_LOG_INFO("stopping: final snapshot", "stream_seq=%" PRIu64, kvr_index_stream_seq(rd->idx));
    uv_timer_stop(&rd->tick);
    uv_timer_stop(&rd->snap_timer);
    uv_timer_stop(&rd->stream_retry);
    if (rd->consumer)
        kvr_nats_consumer_stop(rd->consumer);
    if (rd->snap_running)
        return; /* snap_after calls maybe_finish_stop; then one more below is not needed */
    start_snapshot(rd, true);
    maybe_finish_stop(rd);
}

void kvr_routerd_free(kvr_routerd *rd)
{
    if (!rd)
        return;
    kvr_index_destroy(rd->idx);
    kvr_kv_decoder_free(&rd->dec);
    kvr_fsm_free(rd->fsm);
    kvr_metrics_free(rd->metrics);
    free(rd->seq_scratch);
    free(rd->iw_scratch);
    free(rd->tok_scratch);
    free(rd->relay_q);
    free(rd->data_dir);
    free(rd->snap_dir);
    free(rd);
}
