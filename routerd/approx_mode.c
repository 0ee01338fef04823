/* routerd approx mode (--index approx, issue 14 item 4): the replicated ROUTE apply assumes the
 * booked worker now holds the request's blocks (indexer/approx.h), and route decisions use
 * those guesses for workers that publish no KV events (routerd_int.h).
 *
 * Where the assumption is made: in the FSM's route hook (sync/fsm.h), i.e. inside the apply
 * of the ROUTE command, on every router at the same log position, with the command's seq
 * hashes (the router that took the request puts them in the ROUTE) and the FSM clock (command
 * time) for the TTL. So every router of a Raft group holds the same approximate index
 * (GET /v1/state index.approx.digest) whichever router took the request.
 *
 * Mixed pools: the apply cannot know which workers publish events (every router consumes the
 * stream at its own pace, so "has events" is not a replicated fact); it assumes for every
 * booked worker, and the READ side ignores the guesses of a worker the router has seen store
 * blocks through events (or whose event entries it holds): that worker's event entries alone
 * decide its overlap. Its guesses stay bounded by its capacity and the TTL like any other.
 *
 * Restart: the guesses are not in the LMDB snapshot (nor in the FSM's Raft snapshot); a
 * restarted router, or one that installs a Raft snapshot, starts with none for the blocks
 * routed before, and its digest differs from the others' until the TTL has dropped those. */
#include "approx.h"
#include "routerd_int.h"

/* kvr_fsm_options.route_hook: on the loop thread, inside kvr_fsm_apply. */
static void on_route_applied(void *data, uint64_t worker_id, uint32_t capacity_blocks,
                             const kvr_route_cmd *rc, uint64_t clock_ms)
{
    kvr_routerd *rd = data;
    if (!rd->approx)
        return;
    uint32_t n = rc->n_approx_hashes;
    if (n > KVR_CMD_MAX_APPROX_HASHES)
        n = KVR_CMD_MAX_APPROX_HASHES;
    for (uint32_t i = 0; i < n; i++)
        rd->approx_seq[i] = kvr_route_cmd_approx_hash(rc, i);
    int r = kvr_approx_assume(rd->approx, worker_id, capacity_blocks, rd->approx_seq, n, clock_ms);
    if (r != 0)
        KVR_LOG_WARN_RL(5, "approx index: assumption refused", "worker=%" PRIu64 " error=\"%s\"",
                        worker_id, kvr_strerror(r));
}

/* kvr_fsm_options.worker_down_hook: a down worker's cache is gone (a new incarnation starts
 * empty), so are its guesses. */
static void on_worker_down_applied(void *data, uint64_t worker_id)
{
    kvr_routerd *rd = data;
    if (rd->approx)
        kvr_approx_remove_worker(rd->approx, worker_id);
}

void rd_fsm_options(kvr_routerd *rd, kvr_fsm_options *o)
{
    memset(o, 0, sizeof *o);
    o->cost = kvr_cost_params_default();
    if (rd->cfg.has_cost) {
        o->cost.overlap_weight = rd->cfg.cost_overlap_weight;
        o->cost.load_weight = rd->cfg.cost_load_weight;
        o->cost.queue_weight = rd->cfg.cost_queue_weight;
        o->cost.overflow_weight = rd->cfg.cost_overflow_weight;
        o->cost.tie_band = rd->cfg.cost_tie_band;
        o->cost.temperature = rd->cfg.cost_temperature;
    }
    if (!rd->cfg.index_approx)
        return;
    o->route_hook = on_route_applied;
    o->worker_down_hook = on_worker_down_applied;
    o->hook_data = rd;
}

int rd_approx_open(kvr_routerd *rd)
{
    if (!rd->cfg.index_approx)
        return 0;
    kvr_approx_opts ao = {.ttl_ms = rd->cfg.approx_ttl_ms > 0 ? (uint64_t)rd->cfg.approx_ttl_ms : 0,
                          .default_capacity_blocks = rd->cfg.approx_capacity_blocks};
    rd->approx_seq = malloc(KVR_CMD_MAX_APPROX_HASHES * sizeof *rd->approx_seq);
    rd->approx_wire = malloc(KVR_CMD_MAX_APPROX_HASHES * 8);
    if (!rd->approx_seq || !rd->approx_wire)
        return KVR_ENOMEM;
    int rc = kvr_approx_create(&rd->approx, &ao);
    if (rc == 0)
        KVR_LOG_INFO("approximate index", "ttl_ms=%" PRIu64 " default_capacity_blocks=%" PRIu64,
                     kvr_approx_ttl_ms(rd->approx), kvr_approx_default_capacity(rd->approx));
    return rc;
}

void rd_approx_close(kvr_routerd *rd)
{
    kvr_approx_destroy(rd->approx);
    rd->approx = NULL;
    free(rd->approx_seq);
    free(rd->approx_wire);
    rd->approx_seq = NULL;
    rd->approx_wire = NULL;
}

bool rd_worker_has_events(kvr_routerd *rd, uint64_t worker_id)
{
    const rd_worker *w = rd_worker_find(rd, worker_id);
    if (w && w->has_stored)
        return true;
    kvr_index_worker_info wi;
    return kvr_index_worker(rd->idx, worker_id, &wi) == 0 && wi.entries > 0;
}

size_t rd_find_matches(kvr_routerd *rd, const uint64_t *seq, size_t n)
{
    size_t nm = kvr_index_find_matches(rd->idx, seq, n, rd->matches, RD_MAX_MATCHES);
    if (nm > RD_MAX_MATCHES)
        nm = RD_MAX_MATCHES;
    if (!rd->approx)
        return nm;
    kvr_index_match am[RD_MAX_MATCHES];
    /* the local clock only filters what is read; the state changes in the apply alone */
    size_t na =
        kvr_approx_find_matches(rd->approx, seq, n, (uint64_t)kvr_now_ms(), am, RD_MAX_MATCHES);
    if (na > RD_MAX_MATCHES)
        na = RD_MAX_MATCHES;
    for (size_t i = 0; i < na && nm < RD_MAX_MATCHES; i++) {
        /* an event worker's overlap comes from its events alone (it is then in matches, or
         * its events say it holds none of the prefix) */
        if (rd_worker_has_events(rd, am[i].worker_id))
            continue;
        rd->matches[nm++] = am[i];
    }
    return nm;
}

void rd_approx_fill_cmd(kvr_routerd *rd, kvr_route_cmd *r, const uint64_t *seq, size_t n)
{
    if (!rd->approx || n == 0)
        return;
    if (n > KVR_CMD_MAX_APPROX_HASHES)
        n = KVR_CMD_MAX_APPROX_HASHES;
    for (size_t i = 0; i < n; i++)
        for (int k = 0; k < 8; k++)
            rd->approx_wire[8 * i + (size_t)k] = (uint8_t)(seq[i] >> (8 * k));
    r->approx_hashes = rd->approx_wire;
    r->n_approx_hashes = (uint32_t)n;
}

void rd_approx_metrics(kvr_routerd *rd)
{
    if (!rd->approx || !rd->m_approx_entries)
        return;
    kvr_approx_stats st;
    kvr_approx_stats_get(rd->approx, &st);
    kvr_metric_set(rd->m_approx_entries, 0, (double)st.entries);
    kvr_metric_add(rd->m_approx_inserted, 0, st.inserted - rd->approx_seen.inserted);
    kvr_metric_add(rd->m_approx_evicted, 0, st.evicted - rd->approx_seen.evicted);
    kvr_metric_add(rd->m_approx_expired, 0, st.expired - rd->approx_seen.expired);
    rd->approx_seen = st;
}

void rd_approx_state_json(kvr_routerd *rd, kvr_jw *w)
{
    kvr_jw_key(w, "mode");
    kvr_jw_str(w, rd->approx ? "approx" : "events");
    if (!rd->approx)
        return;
    kvr_approx_stats st;
    kvr_approx_stats_get(rd->approx, &st);
    kvr_jw_key(w, "approx");
    kvr_jw_obj(w);
    kvr_jw_key(w, "ttl_ms");
    kvr_jw_u64(w, kvr_approx_ttl_ms(rd->approx));
    kvr_jw_key(w, "capacity_blocks");
    kvr_jw_u64(w, kvr_approx_default_capacity(rd->approx));
    kvr_jw_key(w, "entries");
    kvr_jw_u64(w, st.entries);
    kvr_jw_key(w, "workers");
    kvr_jw_u64(w, st.workers);
    kvr_jw_key(w, "bytes");
    kvr_jw_u64(w, st.bytes);
    kvr_jw_key(w, "inserted");
    kvr_jw_u64(w, st.inserted);
    kvr_jw_key(w, "refreshed");
    kvr_jw_u64(w, st.refreshed);
    kvr_jw_key(w, "evicted");
    kvr_jw_u64(w, st.evicted);
    kvr_jw_key(w, "expired");
    kvr_jw_u64(w, st.expired);
    kvr_jw_key(w, "removed");
    kvr_jw_u64(w, st.removed);
    kvr_jw_key(w, "refused");
    kvr_jw_u64(w, st.refused);
    kvr_jw_key(w, "digest");
    char d[24];
    snprintf(d, sizeof d, "%016" PRIx64, kvr_approx_digest(rd->approx));
    kvr_jw_str(w, d);
    kvr_jw_end(w);
}
