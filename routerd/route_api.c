/* routerd route API: route and match over NATS and HTTP, route events (routerd_int.h). */
#include "routerd_int.h"

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
    char role[16]; /* the request's "role": "" none; "both"/"aggregated" never disaggregate */
} route_req;

typedef struct route_ctx {
    kvr_routerd *rd;
    int64_t t0_ns;
    char *reply;         /* NATS reply subject (NATS route) */
    kvr_http_req *http;  /* HTTP route */
    uint32_t best_overlap; /* the largest candidate overlap (route reply best_overlap_blocks) */
    char reply_buf[];      /* NATS route: the reply subject, in the same allocation */
} route_ctx;

static void finish_route_nats(kvr_routerd *rd, route_ctx *c, int status, const kvr_fsm_result *res,
                              rd_decided how, const char *errmsg)
{
    const char *mode = rd_decided_name(how);
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_route_reply rep = {.ok = status == 0};
    if (status == 0) {
        /* local mode: what this router's state held for the chosen worker when it decided
         * (bookings including this one), and when (monotonic ns), so a load test can tell
         * decisions made on stale load */
        kvr_fsm_worker_view wv;
        rep.has_view =
            how == RD_DECIDED_LOCAL && kvr_fsm_worker_get(rd_fsm(rd), res->worker_id, &wv) == 0;
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
        rep.disagg = kvr_slice_of(kvr_disagg_path_name(res->path));
        if (res->path == KVR_DISAGG_REMOTE) {
            rep.prefill_worker_id = res->prefill_worker_id;
            rep.prefill_url = kvr_slice_of(res->prefill_url);
        }
    } else {
        rep.error = (kvr_slice){errmsg, strlen(errmsg)};
        if (res && res->pool_waking) {
            rep.pool_waking = true;
            rep.retry_after_ms = RD_POOL_RETRY_AFTER_MS;
        }
    }
    if (kvr_route_reply_encode(&b, &rep) != 0)
        KVR_LOG_ERROR_RL(5, "route reply not encoded", "worker=%" PRIu64, rep.worker_id);
    if (b.len && !rd->stopping)
        kvr_nats_respond(&rd->nats, c->reply, b.base, b.len);
    kvr_buf_free(&b);
}

static void finish_route_http(kvr_routerd *rd, route_ctx *c, int status, const kvr_fsm_result *res,
                              rd_decided how, const char *errmsg, int http_status)
{
    const char *mode = rd_decided_name(how);
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
        if (res->path != KVR_DISAGG_NONE) {
            kvr_jw_key(&w, "disagg");
            kvr_jw_str(&w, kvr_disagg_path_name(res->path));
        }
        if (res->path == KVR_DISAGG_REMOTE) {
            kvr_jw_key(&w, "prefill_worker_id");
            kvr_jw_u64(&w, res->prefill_worker_id);
            kvr_jw_key(&w, "prefill_url");
            kvr_jw_str(&w, res->prefill_url);
        }
    } else {
        if (res && res->pool_waking) {
            kvr_jw_key(&w, "pool_state");
            kvr_jw_str(&w, "waking");
            kvr_jw_key(&w, "retry_after_ms");
            kvr_jw_u64(&w, RD_POOL_RETRY_AFTER_MS);
        }
        kvr_jw_key(&w, "error");
        kvr_jw_str(&w, errmsg);
    }
    kvr_jw_end(&w);
    kvr_jw_finish(&w);
    kvr_http_respond(c->http, status == 0 ? 200 : http_status, "application/json", b.base, b.len);
    kvr_buf_free(&b);
}

static void on_route_done(kvr_routerd *rd, int status, const kvr_fsm_result *res, rd_decided how,
                          void *data)
{
    route_ctx *c = data;
    const char *errmsg = NULL;
    int http_status = 503;
    if (status != 0) {
        errmsg = kvr_strerror(status);
        kvr_metric_add(rd->m_route_errors, RD_ROUTE_ERR_BACKEND, 1);
    } else if (res->outcome != KVR_OUT_OK && res->outcome != KVR_OUT_DUPLICATE) {
        errmsg = res->pool_waking                    ? "pool waking"
                 : res->outcome == KVR_OUT_NO_WORKER ? "no live worker for this model/namespace"
                 : res->outcome == KVR_OUT_FINISHED ? "request already finished"
                                                    : kvr_outcome_name(res->outcome);
        status = KVR_EAGAIN;
        http_status = res->outcome == KVR_OUT_INVALID    ? 400
                      : res->outcome == KVR_OUT_FINISHED ? 409
                                                         : 503;
        kvr_metric_add(rd->m_route_errors,
                       res->outcome == KVR_OUT_NO_WORKER ? RD_ROUTE_ERR_NO_WORKER
                                                         : RD_ROUTE_ERR_BAD_REQUEST,
                       1);
    } else {
        kvr_metric_add(rd->m_route_decisions, (size_t)how, 1);
    }
    kvr_metric_observe(rd->m_route_latency, 0, (double)(kvr_mono_ns() - c->t0_ns) / 1e9);
    if (c->http)
        finish_route_http(rd, c, status, res, how, errmsg, http_status);
    else
        finish_route_nats(rd, c, status, res, how, errmsg);
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

/* Whether a request is routed as two legs (fsm.h "Disaggregation"): when some live worker
 * of its model and namespace has the role prefill or decode, unless the request asks for
 * role "both"/"aggregated". Without such workers a ROUTE keeps its former bytes. */
static bool want_disagg(const kvr_routerd *rd, const route_req *q)
{
    if (strcmp(q->role, "both") == 0 || strcmp(q->role, "aggregated") == 0)
        return false;
    for (uint32_t i = 0; i < rd->n_workers; i++) {
        const rd_worker *w = &rd->workers[i];
        if (worker_live(w) && strcmp(w->model, q->model) == 0 && strcmp(w->ns, q->ns) == 0 &&
            (strcmp(w->role, "prefill") == 0 || strcmp(w->role, "decode") == 0))
            return true;
    }
    return false;
}

/* Matches + submits a ROUTE. Takes ownership of c. */
static void do_route(kvr_routerd *rd, const route_req *q, route_ctx *c)
{
    size_t nm = rd_find_matches(rd, q->seq, q->n_seq);
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
        const rd_worker *mw = rd_worker_find(rd, cand[i].worker_id);
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
    rd_approx_fill_cmd(rd, r, q->seq, q->n_seq);
    /* this router's weights travel with the command (sync/cmd.h); with Raft, raft_route
     * drops them once the replicated route policy covers this router (bookings_raft.c) */
    if (rd->cfg.has_cost) {
        kvr_fsm_options fo;
        rd_fsm_options(rd, &fo);
        r->has_cost = true;
        r->cost = fo.cost;
    }
    if (want_disagg(rd, q)) {
        r->disagg = true;
        r->tokens = q->tokens;
        r->block_size = bs;
        r->max_local_prefill = rd->cfg.max_local_prefill;
        r->max_prefill_queue = rd->cfg.max_prefill_queue;
    }
    int rc = rd->bk->route(rd, &cmd, on_route_done, c);
    if (rc != 0)
        on_route_done(rd, rc, NULL, RD_DECIDED_LOCAL, c);
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
    rd_pools_default_ns(rd, q->model, q->ns, sizeof q->ns);
}

void rd_on_route_nats(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    int64_t t0 = kvr_mono_ns();
    if (!m->reply)
        return;
    /* one allocation per request: the context and its reply subject */
    size_t rl = strlen(m->reply);
    route_ctx *c = malloc(sizeof(*c) + rl + 1);
    if (!c)
        return;
    memset(c, 0, sizeof *c);
    c->rd = rd;
    c->t0_ns = t0;
    memcpy(c->reply_buf, m->reply, rl + 1);
    c->reply = c->reply_buf;
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
    copy_slice(q.role, sizeof(q.role), wire.role);
    q.tokens = wire.tokens;
    q.seq = wire.seq_hashes;
    q.n_seq = (uint32_t)wire.n_hashes;
    default_ns(rd, &q);
    do_route(rd, &q, c);
    return;
bad:
    KVR_LOG_WARN_RL(5, "bad route request", "error=\"%s\"", why);
    kvr_metric_add(rd->m_route_errors, RD_ROUTE_ERR_BAD_REQUEST, 1);
    finish_route_nats(rd, c, KVR_EINVAL, NULL, RD_DECIDED_LOCAL, why);
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

void rd_relay_route_event(kvr_routerd *rd, const ev_ctx *e)
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
bool rd_peer_has_quorum(const kvr_routerd *rd, int64_t now)
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

static void on_event_done(kvr_routerd *rd, int status, const kvr_fsm_result *res, rd_decided how,
                          void *data)
{
    ev_ctx *e = data;
    bool local = status == 0 && how == RD_DECIDED_LOCAL;
    /* only a Raft group has a majority to relay to */
    bool raft = rd->bk->mode == RD_BOOKINGS_RAFT;
    if (raft && !e->relayed && local) {
        if (rd->groups_left)
            rd_relay_route_event(rd, e);
        else if (rd_peer_has_quorum(rd, kvr_mono_ms()))
            relay_later(rd, e);
    } else if (raft && !e->relayed && status != 0) {
        rd_relay_route_event(rd, e);
    } else if (status != 0) {
        rd_log_cmd_failure(rd, status, res, how, e->type == KVR_CMD_FREE ? "free" : "prefill_done");
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
void rd_on_route_event(const kvr_nats_msg *m, void *data)
{
    route_event(data, m, false);
}

/* kvr.route.event on the plain subscription held while degraded (follow_quorum, bookings_raft.c): every
 * router without quorum hears it, so none relays it. */
void rd_on_route_event_all(const kvr_nats_msg *m, void *data)
{
    route_event(data, m, true);
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

void rd_http_match(kvr_routerd *rd, kvr_http_req *req)
{
    route_req q = {0};
    kvr_err err = {0};
    if (parse_tokens_body(rd, req, &q, &err) != 0) {
        rd_respond_error(req, 400, err.msg);
        return;
    }
    size_t nm = rd_find_matches(rd, q.seq, q.n_seq);
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
        rd_respond_error(req, 500, "out of memory");
    else
        rd_respond_json(req, 200, &b);
    kvr_buf_free(&b);
}

void rd_http_route(kvr_routerd *rd, kvr_http_req *req)
{
    int64_t t0 = kvr_mono_ns();
    route_req q = {0};
    kvr_err err = {0};
    if (parse_tokens_body(rd, req, &q, &err) != 0) {
        rd_respond_error(req, 400, err.msg);
        return;
    }
    if (!q.model[0]) {
        rd_respond_error(req, 400, "missing field 'model'");
        return;
    }
    route_ctx *c = calloc(1, sizeof(*c));
    if (!c) {
        rd_respond_error(req, 500, "out of memory");
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

