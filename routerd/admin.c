/* routerd HTTP: dispatch, /v1/state, /admin/raft/..., access control (routerd_int.h). */
#include "routerd_int.h"

/* ------------------------------------------------------------------------------------------ */
/* HTTP */

void rd_respond_json(kvr_http_req *req, int status, kvr_buf *b)
{
    kvr_http_respond(req, status, "application/json", b->base, b->len);
}

void rd_respond_error(kvr_http_req *req, int status, const char *msg)
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
    rd_respond_json(req, status, &b);
    kvr_buf_free(&b);
}

/* Opens an object with the six weights (the caller adds members and closes it). */
static void cost_json(kvr_jw *w, const kvr_cost_params *c)
{
    kvr_jw_obj(w);
    kvr_jw_key(w, "overlap_weight");
    kvr_jw_double(w, c->overlap_weight);
    kvr_jw_key(w, "load_weight");
    kvr_jw_double(w, c->load_weight);
    kvr_jw_key(w, "queue_weight");
    kvr_jw_double(w, c->queue_weight);
    kvr_jw_key(w, "overflow_weight");
    kvr_jw_double(w, c->overflow_weight);
    kvr_jw_key(w, "tie_band");
    kvr_jw_double(w, c->tie_band);
    kvr_jw_key(w, "temperature");
    kvr_jw_double(w, c->temperature);
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
    rd->bk->state_json(rd, &w);
    kvr_jw_end(&w);
    rd_pools_state_json(rd, &w);
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
    rd_approx_state_json(rd, &w); /* "mode", and "approx" in approx mode */
    kvr_jw_end(&w);
    /* the route cost's weights (sync/cost.h): "cost" this router's flags, "cost_policy" the
     * replicated policy the group's ROUTEs without weights use (null: none applied yet; with
     * Raft the leader's flags, DESIGN section 6) */
    kvr_fsm_options fo;
    rd_fsm_options(rd, &fo);
    kvr_jw_key(&w, "cost");
    cost_json(&w, &fo.cost);
    kvr_jw_end(&w);
    kvr_cost_params pol;
    uint64_t pol_by = 0;
    kvr_jw_key(&w, "cost_policy");
    if (kvr_fsm_policy(rd_fsm(rd), &pol, &pol_by)) {
        cost_json(&w, &pol);
        kvr_jw_key(&w, "set_by");
        kvr_jw_u64(&w, pol_by);
        kvr_jw_key(&w, "matches_flags");
        kvr_jw_bool(&w, kvr_cost_params_equal(&pol, &fo.cost));
        kvr_jw_end(&w);
    } else {
        kvr_jw_null(&w);
    }
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
        kvr_jw_key(&w, rd_rej_names[i]);
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
        if (rd->approx) {
            kvr_jw_key(&w, "approx_entries");
            kvr_jw_u64(&w, kvr_approx_worker_entries(rd->approx, wk->id));
            kvr_jw_key(&w, "has_events");
            kvr_jw_bool(&w, rd_worker_has_events(rd, wk->id));
        }
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
        rd_respond_error(req, 500, "out of memory");
    else
        rd_respond_json(req, 200, &b);
    kvr_buf_free(&b);
}

static void on_admin_done(int status, void *data)
{
    kvr_http_req *req = data;
    if (status == 0) {
        kvr_http_respond_cstr(req, 200, "application/json", "{\"ok\":true}");
    } else {
        char msg[128];
        snprintf(msg, sizeof(msg), "membership change failed: %s", kvr_strerror(status));
        rd_respond_error(req, 500, msg);
    }
}

/* POST /admin/raft/add {"id":N,"raft_addr":"h:p"}, /promote {"id":N}, /remove {"id":N},
 * /transfer {"id":N} (leadership to voter N; no id or 0: the most up-to-date voter; answered
 * once this router stepped down (the winner shows in /v1/state soon after), for planned
 * maintenance of the leader's host).
 * Only the leader changes membership; elsewhere 409 with the leader id. */
static void http_admin(kvr_routerd *rd, kvr_http_req *req, const char *op)
{
    if (!rd->bk->membership) {
        rd_respond_error(req, 409, "not in raft mode (no --peers)");
        return;
    }
    cJSON *root = NULL;
    kvr_err err = {0};
    bool transfer = strcmp(op, "transfer") == 0;
    kvr_slice body = req->body;
    if (transfer && body.len == 0)
        body = kvr_slice_of("{}"); /* no body: to the most up-to-date voter */
    if (kvr_json_parse(body, 65536, 8, &root, &err) != 0) {
        rd_respond_error(req, 400, err.msg);
        return;
    }
    int64_t id = 0;
    const char *addr = NULL;
    int rc = kvr_json_get_int(root, "id", !transfer, transfer ? 0 : 1, UINT32_MAX, &id, &err);
    if (rc == KVR_ENOTFOUND)
        rc = 0; /* a transfer without an id: id 0 */
    if (rc == 0 && strcmp(op, "add") == 0)
        rc = kvr_json_get_string(root, "raft_addr", true, &addr, &err);
    if (rc != 0) {
        cJSON_Delete(root);
        rd_respond_error(req, 400, err.msg);
        return;
    }
    uint32_t leader = 0;
    rd_member_op mop = strcmp(op, "add") == 0       ? RD_MEMBER_ADD
                       : strcmp(op, "promote") == 0 ? RD_MEMBER_PROMOTE
                       : transfer                   ? RD_MEMBER_TRANSFER
                                                    : RD_MEMBER_REMOVE;
    rc = rd->bk->membership(rd, mop, (uint32_t)id, addr, on_admin_done, req, &leader);
    cJSON_Delete(root);
    if (rc == KVR_EAGAIN) {
        char msg[128];
        snprintf(msg, sizeof(msg), "not the leader; leader is %u", leader);
        rd_respond_error(req, 409, msg);
    } else if (rc != 0) {
        rd_respond_error(req, 400, kvr_strerror(rc));
    }
}

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
    rd_respond_error(req, 401,
                  rd->cfg.admin_token ? "admin token required (Authorization: Bearer ...)"
                                      : "admin endpoints disabled: start with --admin-token-file");
    return false;
}

static void restart_due(uv_timer_t *t)
{
    kvr_routerd *rd = t->data;
    rd_restart_in_place(rd, "POST /admin/restart");
    uv_close((uv_handle_t *)t, (uv_close_cb)free); /* only reached when exec failed */
}

/* POST /admin/restart: the same restart in place as after an unusable Raft log (the warm
 * restart path: index snapshot, JetStream replay, Raft from its files), answered first and
 * done 100 ms later so the answer leaves. */
static void http_restart(kvr_routerd *rd, kvr_http_req *req)
{
    uv_timer_t *t = malloc(sizeof *t);
    if (!rd->cfg.argv || !t) {
        free(t);
        rd_respond_error(req, 503, "restart in place unavailable");
        return;
    }
    uv_timer_init(rd->loop, t);
    t->data = rd;
    uv_timer_start(t, restart_due, 100, 0);
    kvr_http_respond_cstr(req, 202, "application/json", "{\"ok\":true,\"restarting\":true}\n");
}

void rd_on_http(kvr_http_req *req)
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
        rd_update_index_gauges(rd);
        kvr_metrics_respond(rd->metrics, req);
    } else if (get && kvr_slice_eq_cstr(req->path, "/v1/state")) {
        http_state(rd, req);
    } else if (post && kvr_slice_eq_cstr(req->path, "/v1/match")) {
        rd_http_match(rd, req);
    } else if (post && kvr_slice_eq_cstr(req->path, "/v1/route")) {
        rd_http_route(rd, req);
    } else if (post && kvr_slice_eq_cstr(req->path, "/admin/raft/add")) {
        http_admin(rd, req, "add");
    } else if (post && kvr_slice_eq_cstr(req->path, "/admin/raft/promote")) {
        http_admin(rd, req, "promote");
    } else if (post && kvr_slice_eq_cstr(req->path, "/admin/raft/remove")) {
        http_admin(rd, req, "remove");
    } else if (post && kvr_slice_eq_cstr(req->path, "/admin/raft/transfer")) {
        http_admin(rd, req, "transfer");
    } else if (post && kvr_slice_eq_cstr(req->path, "/admin/restart")) {
        http_restart(rd, req);
    } else if (kvr_slice_eq_cstr(req->path, "/health") || kvr_slice_eq_cstr(req->path, "/ready") ||
               kvr_slice_eq_cstr(req->path, "/metrics") ||
               kvr_slice_eq_cstr(req->path, "/v1/state") ||
               kvr_slice_eq_cstr(req->path, "/v1/match") ||
               kvr_slice_eq_cstr(req->path, "/v1/route")) {
        rd_respond_error(req, 405, "method not allowed");
    } else {
        rd_respond_error(req, 404, "not found");
    }
}

