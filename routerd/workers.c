/* routerd workers: heartbeats, the worker table, worker and frontend liveness (routerd_int.h). */
#include "routerd_int.h"
#include "beat_msg.h"

rd_worker *rd_worker_find(kvr_routerd *rd, uint64_t id)
{
    for (uint32_t i = 0; i < rd->n_workers; i++)
        if (rd->workers[i].id == id)
            return &rd->workers[i];
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* workers */

void rd_worker_submit_up(kvr_routerd *rd, rd_worker *w)
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
    rd_submit(rd, &cmd, rd_log_cmd_failure, "worker_up");
}

/* Marks w down here (it is no longer routed to; its entries stay until the leader's
 * AllBlocksCleared comes through the stream, see above) and, when this router owns the
 * policy, proposes WORKER_DOWN. A Raft follower only follows the replicated registry (see
 * on_tick). */
void rd_worker_down(kvr_routerd *rd, rd_worker *w, const char *why)
{
    w->up = false;
    KVR_LOG_WARN("worker down", "worker=%" PRIu64 " reason=%s", w->id, why);
    if (rd->bk->owns_liveness(rd)) {
        kvr_cmd cmd = {.type = KVR_CMD_WORKER_DOWN};
        cmd.u.worker_id = w->id;
        rd_submit(rd, &cmd, rd_log_cmd_failure, "worker_down");
    }
    rd_update_index_gauges(rd);
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

void rd_on_heartbeat(const kvr_nats_msg *m, void *data)
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
    rd_worker *w = rd_worker_find(rd, id);
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
                rd_worker_down(rd, w, "block_size_changed");
            else
                kvr_index_remove_worker(rd->idx, id);
        }
        w->refused = true;
        w->up = false;
        w->block_size = (uint32_t)bs;
        rd->bk->worker_heard(rd, id, false);
        return;
    }
    rd->bk->worker_heard(rd, id, true);
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
        rd_worker_submit_up(rd, w);
    }
    return;
bad:
    KVR_LOG_WARN_RL(10, "malformed heartbeat", "subject=%s", m->subject);
}

/* ------------------------------------------------------------------------------------------ */
/* frontends */

void rd_on_frontend(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    uint64_t id;
    if (kvr_lease_subject_id(m->subject, &id) != 0)
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
    rd->bk->frontend_seen(rd, id);
}

/* ------------------------------------------------------------------------------------------ */
/* periodic: heartbeats, leases, expiry */

/* A tick that comes much later than its 250 ms period means the loop did not run (a long
 * callback, SIGSTOP, a paused VM): no heartbeat or lease beat could be read meanwhile. Judge
 * liveness on the time the loop actually had by moving every deadline on by the stall. */
void rd_tick_compensate_stall(kvr_routerd *rd, int64_t now)
{
    int64_t gap = rd->last_tick_ms ? now - rd->last_tick_ms : 0;
    rd->last_tick_ms = now;
    if (gap <= RD_TICK_MS * 4)
        return;
    int64_t stall = gap - RD_TICK_MS;
    kvr_metric_inc(rd->m_tick_stalls);
    KVR_LOG_WARN("loop stalled: extending worker and frontend deadlines by the stall",
                 "stall_ms=%" PRId64, stall);
    rd->bk->liveness_hold(rd);
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
void rd_liveness_local(kvr_routerd *rd, int64_t now)
{
    if (rd->bk->leader_housekeeping)
        return;
    if (!rd->live.office_ms)
        kvr_live_set_leader(&rd->live, true, rd->start_ms ? rd->start_ms : now);
    uint64_t ids[64];
    uint32_t n = kvr_live_due(&rd->live, rd->fsm, now, rd->cfg.heartbeat_misses * 1000, ids, 64);
    for (uint32_t i = 0; i < n; i++) {
        rd_worker *w = rd_worker_find(rd, ids[i]);
        if (w && w->up) {
            rd_worker_down(rd, w, "missed_heartbeats");
            continue;
        }
        KVR_LOG_WARN("worker down: not heard", "worker=%" PRIu64, ids[i]);
        kvr_cmd cmd = {.type = KVR_CMD_WORKER_DOWN};
        cmd.u.worker_id = ids[i];
        rd_submit(rd, &cmd, rd_log_cmd_failure, "worker_down");
    }
}

/* Index entries of workers this router has no record of (loaded from the LMDB snapshot, for
 * a worker that may never beat again) are tracked like events of a worker not announced yet:
 * without a heartbeat within --heartbeat-misses seconds of ready they are removed (on_tick), so
 * every replica drops the same entries. Once a second. */
void rd_orphan_sweep(kvr_routerd *rd, int64_t now)
{
    if (now - rd->last_orphan_sweep_ms < 1000 || !rd->iw_scratch)
        return;
    rd->last_orphan_sweep_ms = now;
    size_t n = kvr_index_workers(rd->idx, rd->iw_scratch, RD_MAX_WORKERS);
    if (n > RD_MAX_WORKERS)
        n = RD_MAX_WORKERS;
    for (size_t i = 0; i < n && rd->n_workers < RD_MAX_WORKERS; i++) {
        if (rd_worker_find(rd, rd->iw_scratch[i].worker_id))
            continue;
        rd_worker *w = &rd->workers[rd->n_workers++];
        memset(w, 0, sizeof(*w));
        w->id = rd->iw_scratch[i].worker_id;
        w->first_event_ms = now;
    }
}

