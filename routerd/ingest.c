/* routerd ingest: the JetStream consumer, KV event apply, readiness and worker clears (routerd_int.h). */
#include "routerd_int.h"

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
void rd_queue_clear(kvr_routerd *rd, uint64_t worker_id, uint64_t down_seq)
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
void rd_publish_clears(kvr_routerd *rd, int64_t now)
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

/* Every 5 s on the router that commits WORKER_DOWN: a worker down in the registry, not heard
 * here, whose entries are still in the index at two sweeps in a row, gets its clear (again).
 * That covers a leader that committed WORKER_DOWN and died (or lost office, or gave up)
 * before its clear was in the stream: its successor sends it. The msg-id is the same
 * (kvr-clear-<id>-<down_seq>), so a clear that did land within the duplicate window is not
 * stored twice; entries a down worker published after its clear are cleared too. */
void rd_clear_sweep(kvr_routerd *rd, int64_t now)
{
    if (now - rd->last_clear_sweep_ms < 5000 || !rd->iw_scratch)
        return;
    rd->last_clear_sweep_ms = now;
    if (!rd->ready || !rd->nats_up || !rd->bk->commits_liveness(rd)) {
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
        rd_worker *w = rd_worker_find(rd, id);
        if (rd->iw_scratch[i].entries == 0 || (w && w->up) ||
            kvr_fsm_worker_get(rd_fsm(rd), id, &fv) != 0 || fv.up || fv.down_seq == 0)
            continue;
        rd->sweep_ids[rd->n_sweep_ids++] = id;
        for (uint32_t k = 0; k < n_prev; k++)
            if (prev[k] == id) {
                rd_queue_clear(rd, id, fv.down_seq);
                break;
            }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* KV events */

static void reject(kvr_routerd *rd, int reason, const char *subject, uint64_t seq, const char *why)
{
    kvr_metric_add(rd->m_events_rejected, (size_t)reason, 1);
    KVR_LOG_WARN_RL(5, "kv event rejected", "reason=%s subject=%s seq=%" PRIu64 " error=\"%s\"",
                    rd_rej_names[reason], subject, seq, why ? why : "");
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
    rd_worker *w = rd_worker_find(rd, wid);
    if (w && w->announced && w->refused) {
        reject(rd, REJ_REFUSED_WORKER, m->subject, m->stream_seq, "worker refused (block size)");
        goto done;
    }
    /* A down worker's events are applied like any other (it is not routed to while down):
     * whether a router counts it down at this stream position depends on when it learned it,
     * and the index must not (see rd_queue_clear). REJ_WORKER_DOWN is no longer counted. */
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
                if (w)
                    w->has_stored = true; /* approx mode: its events, not guesses, count */
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
        rd_check_ready(rd);
}


void rd_check_ready(kvr_routerd *rd)
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
    if (!rd->groups_left && kvr_nats_subscribe(&rd->nats, "kvr.route", "kvr-routers", rd_on_route_nats,
                                               rd, &rd->sub_route, &err) != 0)
        KVR_LOG_ERROR("subscribing to kvr.route", "error=\"%s\"", err.msg);
    rd_leader_route_update(rd);
    double secs = (double)(kvr_mono_ms() - rd->start_ms) / 1000.0;
    kvr_metric_set(rd->m_ready_s, 0, secs);
    kvr_index_stats st;
    kvr_index_stats_get(rd->idx, &st);
    KVR_LOG_INFO("ready", "stream_seq=%" PRIu64 " target_seq=%" PRIu64 " replayed_msgs=%" PRIu64
                 " entries=%" PRIu64 " seconds=%.3f",
                 seq, rd->target_seq, rd->applied_msgs, st.entries, secs);
    rd_update_index_gauges(rd);
}

int rd_recreate_index(kvr_routerd *rd)
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


/* The retry timer's callback gets the timer; its data is the router (defect 12: casting
 * rd_start_stream to a timer callback handed it the timer as the router, so a router started
 * before NATS never set up its stream). */
static void on_stream_retry(uv_timer_t *t)
{
    rd_start_stream(t->data);
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
    rd_check_ready(rd);
}

void rd_start_stream(kvr_routerd *rd)
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

