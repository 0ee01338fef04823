/* routerd: see routerd.h; the files and what they share: routerd_int.h. */
#include "routerd_int.h"
#include "sync.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
        rd->bk->liveness_hold(rd);
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

static void on_tick(uv_timer_t *t)
{
    kvr_routerd *rd = t->data;
    int64_t now = kvr_mono_ms();
    int64_t limit = rd->cfg.heartbeat_misses * 1000;
    uint32_t up = 0;
    rd_tick_compensate_stall(rd, now);
    if (rd->bk->tick)
        rd->bk->tick(rd, now);
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
            if (rd->bk->owns_liveness(rd) || !reg_up)
                rd_worker_down(rd, w, reg_up ? "missed_heartbeats" : "down_in_registry");
        }
        if (w->up) {
            up++;
            /* another replica may have declared it down (it lost the heartbeats, or a
             * reconcile replayed an old WORKER_DOWN): while we hear it, keep it up in the
             * replicated registry */
            kvr_fsm_worker_view fv;
            kvr_fsm_pool_view pv;
            /* ... except in a pool that sleeps or is stopping (the scaler stopped it there;
             * its last beats are still in flight: a request wakes the pool first), or one that
             * is waking and that we last heard before the wake began (a stopped worker whose
             * beats have not lapsed yet is not the worker the wake brings) */
            bool parked = false;
            if (kvr_fsm_pool_get(rd_fsm(rd), w->ns, w->model, &pv) == 0) {
                int64_t heard_wall = kvr_now_ms() - (now - w->last_seen_ms);
                parked = pv.state == KVR_POOL_SLEEPING || pv.state == KVR_POOL_STOPPING ||
                         (pv.state == KVR_POOL_WAKING && heard_wall <= (int64_t)pv.state_since_ms);
            }
            if (!parked && (kvr_fsm_worker_get(rd_fsm(rd), w->id, &fv) != 0 || !fv.up) &&
                now - w->resync_ms > 2000) {
                w->resync_ms = now;
                rd_worker_submit_up(rd, w);
            }
        }
        i++;
    }
    kvr_metric_set(rd->m_workers_up, 0, up);
    if (!rd->nats_up)
        rd->bk->liveness_hold(rd);
    rd_liveness_local(rd, now);
    rd_orphan_sweep(rd, now);
    rd_clear_sweep(rd, now);
    rd_publish_clears(rd, now);
    /* With Raft the leader's housekeeping owns lease and request expiry (sync.h): one owner
     * of each policy instead of every router proposing the same expiries (defect 13). */
    bool own_expiry = !rd->bk->leader_housekeeping;
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
        rd_check_ready(rd);
    rd_pools_tick(rd);
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
    rd_load_snapshot(rd);

    rc = rd_approx_open(rd);
    if (rc != 0)
        goto fail;
    kvr_fsm_options fo;
    rd_fsm_options(rd, &fo);
    rd->fsm = kvr_fsm_new(&fo);
    if (!rd->fsm) {
        rc = KVR_ENOMEM;
        goto fail;
    }
    rc = rd_bookings_open(rd);
    if (rc != 0)
        goto fail;

    rd->metrics = kvr_metrics_new();
    if (!rd->metrics) {
        rc = KVR_ENOMEM;
        goto fail;
    }
    /* The biggest body a route needs: max_tokens ids of up to 10 digits, a separator and
     * some whitespace each, plus the other members. A bigger one is refused (413) from its
     * Content-Length or chunk headers, before it is read. */
    kvr_http_config hc = {.on_request = rd_on_http,
                          .max_body_bytes = rd->max_tokens * 16 + (64u << 10)};
    rc = kvr_http_server_init(&rd->http, loop, &hc);
    if (rc != 0)
        goto fail;
    rd->http.data = rd;
    rd_register_metrics(rd);
    rc = kvr_loop_stat_start(&rd->loop_stat, loop, rd->metrics, "kvr_routerd");
    if (rc != 0)
        goto fail;
    rd->loop_stat.prep.data = rd;
    if ((rc = rd_pools_open(rd, &err)) != 0) {
        KVR_LOG_ERROR("scale-to-zero pools", "error=\"%s\"", err.msg);
        goto fail;
    }
    rc = kvr_http_listen(&rd->http, cfg->http_addr, &err);
    if (rc != 0) {
        KVR_LOG_ERROR("http listen", "addr=%s error=\"%s\"", cfg->http_addr, err.msg);
        goto fail;
    }

    char name[64];
    snprintf(name, sizeof(name), "kvr-routerd-%u", cfg->id);
    kvr_nats_opts no = {.url = cfg->nats_url,
                        .name = name,
                        .on_state = on_nats_state,
                        .inbox_prefix = "_INBOX.router"};
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
    if ((rc = kvr_nats_subscribe(&rd->nats, subj, NULL, rd_on_heartbeat, rd, NULL, &err)) != 0 ||
        (rc = kvr_nats_subscribe(&rd->nats, "kvr.route.event", "kvr-routers", rd_on_route_event, rd,
                                 &rd->sub_event, &err)) != 0 ||
        (rc = kvr_nats_subscribe(&rd->nats, "kvr.frontends.*", NULL, rd_on_frontend, rd, NULL,
                                 &err)) != 0 ||
        (rc = rd_pools_subscribe(rd, &err)) != 0 ||
        (rd->bk->subscribe && (rc = rd->bk->subscribe(rd, &err)) != 0)) {
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
        uv_timer_start(&rd->snap_timer, rd_on_snap_timer, (uint64_t)cfg->snapshot_interval_ms,
                       (uint64_t)cfg->snapshot_interval_ms);
    rd_start_stream(rd);
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
    rd_maybe_finish_stop(rd);
}

static void nats_closed(kvr_nats *kn)
{
    kvr_routerd *rd = kn->data;
    rd->closing_handles--;
    rd_maybe_finish_stop(rd);
}

static void http_closed(kvr_http_server *srv)
{
    kvr_routerd *rd = srv->data;
    rd->closing_handles--;
    rd_maybe_finish_stop(rd);
}

/* A handle (or a module: the bookings' kvr_sync) that rd_maybe_finish_stop closed is closed. */
void rd_closed_one(kvr_routerd *rd)
{
    rd->closing_handles--;
    rd_maybe_finish_stop(rd);
}

static bool stop_phase2_started;

void rd_maybe_finish_stop(kvr_routerd *rd)
{
    if (!rd->stopping || rd->snap_running)
        return;
    if (!stop_phase2_started) {
        stop_phase2_started = true;
        rd->closing_handles = 8;
        kvr_loop_stat_close(&rd->loop_stat, handle_closed);
        uv_close((uv_handle_t *)&rd->tick, handle_closed);
        uv_close((uv_handle_t *)&rd->snap_timer, handle_closed);
        uv_close((uv_handle_t *)&rd->stream_retry, handle_closed);
        kvr_http_server_close(&rd->http, http_closed);
        if (kvr_nats_close(&rd->nats, nats_closed) != 0)
            rd->closing_handles--;
        if (!rd->bk->close || !rd->bk->close(rd))
            rd->closing_handles--;
        if (!rd_pools_close(rd))
            rd->closing_handles--;
        return;
    }
    if (rd->closing_handles == 0 && rd->done_cb) {
        void (*cb)(void *) = rd->done_cb;
        rd->done_cb = NULL;
        cb(rd->done_data);
    }
}

static void stop_after_handover(kvr_routerd *rd)
{
    rd->stopping = true;
    rd_leader_route_update(rd); /* clients go to kvr.route (any router) from now on */
    KVR_LOG_INFO("stopping: final snapshot", "stream_seq=%" PRIu64, kvr_index_stream_seq(rd->idx));
    uv_timer_stop(&rd->tick);
    uv_timer_stop(&rd->snap_timer);
    uv_timer_stop(&rd->stream_retry);
    if (rd->consumer)
        kvr_nats_consumer_stop(rd->consumer);
    if (rd->snap_running)
        return; /* snap_after calls rd_maybe_finish_stop; then one more below is not needed */
    rd_start_snapshot(rd, true);
    rd_maybe_finish_stop(rd);
}

void kvr_routerd_stop(kvr_routerd *rd, void (*done_cb)(void *), void *data)
{
    if (rd->stop_requested || rd->stopping)
        return;
    rd->stop_requested = true;
    rd->done_cb = done_cb;
    rd->done_data = data;
    /* a Raft router hands over what it holds first (a restart's hand-over turns into this) */
    if (rd->sync) {
        KVR_LOG_INFO("stopping: handing over first", "held=%u", kvr_sync_pending(rd->sync));
        rd_hand_over(rd, stop_after_handover);
        return;
    }
    stop_after_handover(rd);
}

void kvr_routerd_free(kvr_routerd *rd)
{
    if (!rd)
        return;
    kvr_index_destroy(rd->idx);
    kvr_kv_decoder_free(&rd->dec);
    kvr_fsm_free(rd->fsm);
    rd_approx_close(rd);
    kvr_metrics_free(rd->metrics);
    rd_pools_free(rd);
    free(rd->seq_scratch);
    free(rd->iw_scratch);
    free(rd->tok_scratch);
    free(rd->relay_q);
    free(rd->data_dir);
    free(rd->snap_dir);
    free(rd);
}

static void restart_exec(kvr_routerd *rd)
{
    /* The new image opens its own LMDB environment, sockets and files: nothing of this one
     * may stay open across exec (libuv's sockets are close-on-exec already, others need not
     * be). */
    DIR *d = opendir("/proc/self/fd");
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            int fd = atoi(e->d_name);
            if (fd > 2 && fd != dirfd(d))
                fcntl(fd, F_SETFD, FD_CLOEXEC);
        }
        closedir(d);
    }
    fflush(NULL);
    execv("/proc/self/exe", rd->cfg.argv);
    KVR_LOG_ERROR("restart in place failed: serving on", "err=\"%s\"", strerror(errno));
    /* the tick resumes; follow_quorum sees the groups left without cause and rejoins them */
    rd->handing_over = false;
    uv_timer_start(&rd->tick, on_tick, RD_TICK_MS, RD_TICK_MS);
}

static void handover_drained(void *data)
{
    kvr_routerd *rd = data;
    rd->handover_drains--;
}

static void handover_poll(uv_timer_t *t)
{
    kvr_routerd *rd = t->data;
    uint32_t pending = rd->sync ? kvr_sync_pending(rd->sync) : 0;
    int64_t ms = kvr_mono_ms() - rd->handover_since_ms;
    if ((rd->handover_drains > 0 || pending > 0) && ms < RD_HANDOVER_MS)
        return;
    uv_timer_stop(t);
    if (rd->handover_drains > 0 || pending > 0)
        KVR_LOG_WARN("hand-over not finished, going on", "draining=%d pending=%u ms=%lld",
                     rd->handover_drains, pending, (long long)ms);
    else
        KVR_LOG_INFO("handed over", "ms=%lld", (long long)ms);
    void (*done)(kvr_routerd *) = rd->handover_done;
    rd->handover_done = NULL;
    done(rd);
}

void rd_hand_over(kvr_routerd *rd, void (*done)(kvr_routerd *rd))
{
    rd->handover_done = done;
    if (rd->handing_over)
        return;
    rd->handing_over = true;
    rd->handover_since_ms = kvr_mono_ms();
    kvr_nats_sub **subs[] = {&rd->sub_route, &rd->sub_event, &rd->sub_event_all,
                             &rd->sub_route_leader, &rd->sub_event_leader};
    for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++) {
        if (*subs[i] && kvr_nats_drain(*subs[i], handover_drained, rd) == 0)
            rd->handover_drains++;
        *subs[i] = NULL;
    }
    rd->groups_left = true; /* keeps them left (ingest, rd_leader_route_update) */
    uv_timer_stop(&rd->tick);
    uv_timer_start(&rd->tick, handover_poll, 5, 5);
}

void rd_restart_in_place(kvr_routerd *rd, const char *why)
{
    if (rd->handing_over || rd->stop_requested)
        return;
    if (!rd->cfg.argv || !rd->cfg.argv[0]) {
        KVR_LOG_ERROR("cannot restart in place: no command line", "why=\"%s\"", why);
        return;
    }
    KVR_LOG_WARN("restarting in place", "why=\"%s\"", why);
    rd_hand_over(rd, restart_exec);
}
