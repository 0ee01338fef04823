/* routerd pools: the scale-to-zero driver (DESIGN section 13, routerd_int.h).
 *
 * The pools' state lives in the replicated FSM (fsm.h "Pools"): a ROUTE that finds no worker
 * in a sleeping pool wakes it there, on every router at once. What the FSM cannot do (talk to
 * the outside) the router whose commands commit now does, on its 250 ms tick: the Raft leader
 * (or the only router, without peers). It registers the configured pools, runs the scaler
 * (scaler/scaler.h) to wake a waking pool and to stop an idle one, and proposes the state
 * changes that follow: awake once a worker of the pool is live in the registry (its own
 * heartbeat, not a replica count), stopping after --idle-after with no request and nothing in
 * flight, sleeping once the scaler has stopped it, sleeping again when a wake fails for
 * --wake-timeout. A new leader finds the state where the old one left it and carries on; a
 * scale call sets an absolute replica count, so doing it twice starts nothing twice. */
#include "routerd_int.h"

#include "scaler.h"

#include <cjson/cJSON.h>

#define RD_POOLS_MAX 256
#define RD_POOL_TARGET_MAX 253
#define RD_POOL_RETRY_MS 5000 /* after the scaler gave up: try again this much later */

typedef struct rd_pool {
    char ns[KVR_FSM_NS_MAX + 1];
    char model[KVR_FSM_MODEL_MAX + 1];
    char target[RD_POOL_TARGET_MAX + 1];
    char label[KVR_FSM_NS_MAX + KVR_FSM_MODEL_MAX + 2]; /* "ns/model" */
    /* leader-side, not replicated */
    bool op_running, set_inflight;
    kvr_pool_state op_for; /* the state the running scale op serves */
    int64_t next_try_ms;   /* monotonic */
} rd_pool;

struct rd_pools {
    kvr_routerd *rd;
    kvr_scaler scaler;
    bool scaler_open;
    rd_pool pools[RD_POOLS_MAX];
    uint32_t n;
    const char *labels[RD_POOLS_MAX + 1];
    kvr_metric *m_state, *m_idle, *m_wake_seconds, *m_scale_ops;
};

enum { OP_OK, OP_FAILED };
static const char *const op_names[] = {"ok", "failed", NULL};

static int load_file(rd_pools *ps, const char *path, kvr_err *err)
{
    char *text = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return kvr_err_set(err, KVR_EIO, "pools file %s: %s", path, strerror(errno));
    text = malloc(1 << 20);
    size_t n = text ? fread(text, 1, (1 << 20) - 1, f) : 0;
    bool over = text && n == (1 << 20) - 1 && fgetc(f) != EOF;
    fclose(f);
    if (!text)
        return kvr_err_set(err, KVR_ENOMEM, "pools file: out of memory");
    if (over) {
        free(text);
        return kvr_err_set(err, KVR_ELIMIT, "pools file %s: over 1 MiB", path);
    }
    text[n] = 0;
    cJSON *j = cJSON_Parse(text);
    free(text);
    int rc = 0;
    const cJSON *list = cJSON_IsObject(j) ? cJSON_GetObjectItemCaseSensitive(j, "pools") : j;
    if (!cJSON_IsArray(list)) {
        rc = kvr_err_set(err, KVR_EINVAL, "pools file %s: want {\"pools\": [...]} or [...]", path);
        goto out;
    }
    const cJSON *e;
    cJSON_ArrayForEach(e, list)
    {
        const cJSON *ns = cJSON_GetObjectItemCaseSensitive(e, "namespace");
        const cJSON *model = cJSON_GetObjectItemCaseSensitive(e, "model");
        const cJSON *target = cJSON_GetObjectItemCaseSensitive(e, "target");
        if (ps->n >= RD_POOLS_MAX) {
            rc = kvr_err_set(err, KVR_ELIMIT, "pools file: more than %d pools", RD_POOLS_MAX);
            goto out;
        }
        if (!cJSON_IsString(ns) || !cJSON_IsString(model) || !cJSON_IsString(target) ||
            !*model->valuestring || !*target->valuestring ||
            strlen(ns->valuestring) > KVR_FSM_NS_MAX ||
            strlen(model->valuestring) > KVR_FSM_MODEL_MAX ||
            strlen(target->valuestring) > RD_POOL_TARGET_MAX) {
            rc = kvr_err_set(err, KVR_EINVAL,
                             "pools file: entry %u needs namespace, model and target strings "
                             "within their bounds",
                             ps->n);
            goto out;
        }
        rd_pool *p = &ps->pools[ps->n];
        memset(p, 0, sizeof *p);
        snprintf(p->ns, sizeof p->ns, "%s", ns->valuestring);
        snprintf(p->model, sizeof p->model, "%s", model->valuestring);
        snprintf(p->target, sizeof p->target, "%s", target->valuestring);
        snprintf(p->label, sizeof p->label, "%s/%s", ns->valuestring, model->valuestring);
        for (uint32_t i = 0; i < ps->n; i++)
            if (strcmp(ps->pools[i].ns, p->ns) == 0 && strcmp(ps->pools[i].model, p->model) == 0) {
                rc = kvr_err_set(err, KVR_EINVAL, "pools file: %s listed twice", p->label);
                goto out;
            }
        ps->labels[ps->n] = p->label;
        ps->n++;
    }
out:
    cJSON_Delete(j);
    return rc;
}

int rd_pools_open(kvr_routerd *rd, kvr_err *err)
{
    const kvr_routerd_config *c = &rd->cfg;
    if (!c->pools_file || !*c->pools_file)
        return 0;
    if (!c->scaler || !*c->scaler)
        return kvr_err_set(err, KVR_EINVAL, "--pools-file needs --scaler exec:PATH|kubernetes");
    rd_pools *ps = calloc(1, sizeof *ps);
    if (!ps)
        return kvr_err_set(err, KVR_ENOMEM, "pools: out of memory");
    ps->rd = rd;
    int rc = load_file(ps, c->pools_file, err);
    if (rc != 0) {
        free(ps);
        return rc;
    }
    kvr_scaler_config sc = {0};
    if (strncmp(c->scaler, "exec:", 5) == 0 && c->scaler[5]) {
        sc.kind = KVR_SCALER_EXEC;
        sc.command = c->scaler + 5;
    } else if (strcmp(c->scaler, "kubernetes") == 0) {
        sc.kind = KVR_SCALER_KUBERNETES;
        sc.api_url = c->scaler_api_url;
        sc.token_file = c->scaler_token_file;
        sc.ca_file = c->scaler_ca_file;
        sc.kube_namespace = c->scaler_namespace;
    } else {
        free(ps);
        return kvr_err_set(err, KVR_EINVAL, "--scaler: want exec:PATH or kubernetes, got %s",
                           c->scaler);
    }
    sc.timeout_ms = c->scaler_timeout_ms;
    if ((rc = kvr_scaler_init(&ps->scaler, rd->loop, &sc, err)) != 0) {
        free(ps);
        return rc;
    }
    ps->scaler.data = ps;
    ps->scaler_open = true;
    kvr_metrics *m = rd->metrics;
    ps->m_state = kvr_metrics_gauge(m, "kvr_routerd_pool_state",
                                    "Scale-to-zero pool state: 1 awake, 2 waking, 3 sleeping, "
                                    "4 stopping (0: not registered yet)",
                                    "pool", ps->labels);
    ps->m_idle = kvr_metrics_gauge(m, "kvr_routerd_pool_idle_seconds",
                                   "Seconds since the pool's last route request", "pool",
                                   ps->labels);
    static const double wake_buckets[] = {1, 2, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600};
    ps->m_wake_seconds = kvr_metrics_histogram(
        m, "kvr_routerd_pool_wake_seconds",
        "From a pool's wake to its first live worker (this router as leader)", wake_buckets,
        sizeof wake_buckets / sizeof *wake_buckets, NULL, NULL);
    ps->m_scale_ops = kvr_metrics_counter(m, "kvr_routerd_scale_operations_total",
                                          "Scale operations this router ran, by result", "result",
                                          op_names);
    rd->pools = ps;
    KVR_LOG_INFO("scale-to-zero pools", "pools=%u scaler=%s idle_after_ms=%" PRId64
                 " wake_timeout_ms=%" PRId64 " min_workers=%" PRId64,
                 ps->n, sc.kind == KVR_SCALER_EXEC ? "exec" : "kubernetes", c->idle_after_ms,
                 c->wake_timeout_ms, c->min_workers);
    return 0;
}

static void scaler_closed(kvr_scaler *s)
{
    rd_pools *ps = s->data;
    kvr_routerd *rd = ps->rd;
    ps->scaler_open = false;
    rd_closed_one(rd);
}

bool rd_pools_close(kvr_routerd *rd)
{
    rd_pools *ps = rd->pools;
    if (!ps || !ps->scaler_open)
        return false;
    kvr_scaler_close(&ps->scaler, scaler_closed);
    return true;
}

void rd_pools_free(kvr_routerd *rd)
{
    free(rd->pools);
    rd->pools = NULL;
}

/* ---------------------------------------------------------------------------------------- */

typedef struct pool_op {
    rd_pools *ps;
    uint32_t idx;
} pool_op;

static rd_pool *by_name(rd_pools *ps, const char *ns, const char *model)
{
    for (uint32_t i = 0; i < ps->n; i++)
        if (strcmp(ps->pools[i].ns, ns) == 0 && strcmp(ps->pools[i].model, model) == 0)
            return &ps->pools[i];
    return NULL;
}

static void on_set_done(kvr_routerd *rd, int status, const kvr_fsm_result *res, rd_decided how,
                        void *data)
{
    (void)how;
    pool_op *op = data;
    if (op->ps->rd == rd && op->idx < op->ps->n)
        op->ps->pools[op->idx].set_inflight = false;
    if (status != 0 || (res && res->outcome != KVR_OUT_OK))
        KVR_LOG_WARN_RL(5, "pool state change not applied", "status=%s outcome=%s",
                        kvr_strerror(status), res ? kvr_outcome_name(res->outcome) : "-");
    free(op);
}

static void propose(rd_pools *ps, uint32_t i, kvr_pool_state st, const char *why)
{
    rd_pool *p = &ps->pools[i];
    if (p->set_inflight)
        return;
    pool_op *op = malloc(sizeof *op);
    if (!op)
        return;
    *op = (pool_op){ps, i};
    kvr_cmd cmd = {.type = KVR_CMD_POOL_SET};
    cmd.u.pool = (kvr_pool_cmd){kvr_slice_of(p->ns), kvr_slice_of(p->model), st,
                                (uint64_t)kvr_now_ms()};
    KVR_LOG_INFO("pool state", "pool=%s state=%s why=%s", p->label, kvr_pool_state_name(st), why);
    p->set_inflight = true;
    if (rd_submit(ps->rd, &cmd, on_set_done, op) != 0) {
        p->set_inflight = false;
        free(op);
    }
}

static void scale(rd_pools *ps, uint32_t i, kvr_pool_state for_state, uint32_t replicas);

static void on_scaled(int status, const char *errmsg, void *data)
{
    pool_op *op = data;
    rd_pools *ps = op->ps;
    rd_pool *p = &ps->pools[op->idx];
    kvr_routerd *rd = ps->rd;
    p->op_running = false;
    free(op);
    if (status == KVR_ECLOSED || rd->stopping)
        return;
    kvr_metric_add(ps->m_scale_ops, status == 0 ? OP_OK : OP_FAILED, 1);
    if (status != 0) {
        KVR_LOG_WARN("scale operation failed", "pool=%s for=%s error=\"%s\"", p->label,
                     kvr_pool_state_name(p->op_for), errmsg ? errmsg : "");
        p->next_try_ms = kvr_mono_ms() + RD_POOL_RETRY_MS;
        return;
    }
    /* a stop that succeeded: the pool sleeps, unless requests came meanwhile (the FSM made it
     * awake again: then the tick wakes it through the usual path) */
    kvr_fsm_pool_view v;
    if (!rd->bk->commits_liveness(rd) || kvr_fsm_pool_get(rd_fsm(rd), p->ns, p->model, &v) != 0)
        return;
    if (p->op_for == KVR_POOL_STOPPING && v.state == KVR_POOL_STOPPING)
        propose(ps, (uint32_t)(p - ps->pools), KVR_POOL_SLEEPING, "stopped");
    /* a wake that finished after it timed out (the pool sleeps again): take back what it
     * started, or those workers would run with nobody sending them requests */
    if (p->op_for == KVR_POOL_WAKING && v.state == KVR_POOL_SLEEPING)
        scale(ps, (uint32_t)(p - ps->pools), KVR_POOL_SLEEPING, (uint32_t)rd->cfg.min_workers);
}

static void scale(rd_pools *ps, uint32_t i, kvr_pool_state for_state, uint32_t replicas)
{
    rd_pool *p = &ps->pools[i];
    if (p->op_running || kvr_mono_ms() < p->next_try_ms)
        return;
    pool_op *op = malloc(sizeof *op);
    if (!op)
        return;
    *op = (pool_op){ps, i};
    p->op_running = true;
    p->op_for = for_state;
    KVR_LOG_INFO("scaling pool", "pool=%s target=%s replicas=%u for=%s", p->label, p->target,
                 replicas, kvr_pool_state_name(for_state));
    if (kvr_scaler_scale(&ps->scaler, p->ns, p->model, p->target, replicas, on_scaled, op) != 0) {
        p->op_running = false;
        p->next_try_ms = kvr_mono_ms() + RD_POOL_RETRY_MS;
        free(op);
    }
}

/* Live workers of a pool in the replicated registry, and their bookings. */
static void pool_load(const kvr_fsm *f, const rd_pool *p, uint32_t *live, uint64_t *bookings)
{
    *live = 0;
    *bookings = 0;
    kvr_fsm_worker_view w;
    for (uint32_t i = 0; kvr_fsm_worker_at(f, i, &w) == 0; i++) {
        if (!w.up || strcmp(w.ns, p->ns) != 0 || strcmp(w.model, p->model) != 0)
            continue;
        (*live)++;
        *bookings += w.bookings;
    }
}

void rd_pools_tick(kvr_routerd *rd)
{
    rd_pools *ps = rd->pools;
    if (!ps || rd->stopping)
        return;
    const kvr_fsm *f = rd_fsm(rd);
    uint64_t now = (uint64_t)kvr_now_ms();
    bool leader = rd->bk->commits_liveness(rd);
    const kvr_routerd_config *c = &rd->cfg;
    uint32_t wake_to = c->min_workers > 1 ? (uint32_t)c->min_workers : 1;
    if (c->max_workers > 0 && wake_to > (uint32_t)c->max_workers)
        wake_to = (uint32_t)c->max_workers;
    for (uint32_t i = 0; i < ps->n; i++) {
        rd_pool *p = &ps->pools[i];
        kvr_fsm_pool_view v;
        uint32_t live;
        uint64_t bookings;
        bool known = kvr_fsm_pool_get(f, p->ns, p->model, &v) == 0;
        pool_load(f, p, &live, &bookings);
        kvr_metric_set(ps->m_state, i, known ? (double)v.state : 0);
        if (known) {
            uint64_t last = v.last_request_ms > v.state_since_ms ? v.last_request_ms
                                                                 : v.state_since_ms;
            kvr_metric_set(ps->m_idle, i, now > last ? (double)(now - last) / 1000.0 : 0);
        }
        if (!leader || !rd->ready)
            continue;
        if (!known) {
            propose(ps, i, live ? KVR_POOL_AWAKE : KVR_POOL_SLEEPING, "registered");
            continue;
        }
        switch (v.state) {
        case KVR_POOL_AWAKE: {
            uint64_t last = v.last_request_ms > v.state_since_ms ? v.last_request_ms
                                                                 : v.state_since_ms;
            if (c->min_workers == 0 && live > 0 && bookings == 0 &&
                now >= last + (uint64_t)c->idle_after_ms)
                propose(ps, i, KVR_POOL_STOPPING, "idle");
            break;
        }
        case KVR_POOL_STOPPING:
            scale(ps, i, KVR_POOL_STOPPING, (uint32_t)c->min_workers);
            break;
        case KVR_POOL_WAKING:
            if (live > 0) {
                kvr_metric_observe(ps->m_wake_seconds, 0,
                                   now > v.state_since_ms ? (double)(now - v.state_since_ms) / 1e3
                                                          : 0);
                propose(ps, i, KVR_POOL_AWAKE, "worker live");
            } else if (now >= v.state_since_ms + (uint64_t)c->wake_timeout_ms) {
                KVR_LOG_WARN("pool wake timed out", "pool=%s after_ms=%" PRIu64, p->label,
                             now - v.state_since_ms);
                propose(ps, i, KVR_POOL_SLEEPING, "wake timed out");
            } else {
                scale(ps, i, KVR_POOL_WAKING, wake_to);
            }
            break;
        case KVR_POOL_SLEEPING:
            /* nothing: a worker still live here is one just stopped whose heartbeats have not
             * lapsed yet, or one started by hand; a request booked on it makes the pool awake
             * (fsm.h "Pools") */
            break;
        default:
            break;
        }
    }
}

/* A request that names no namespace and whose model has no live worker goes to the
 * configured pool of that model (the first listed), so it can wake it. */
bool rd_pools_default_ns(kvr_routerd *rd, const char *model, char *ns, size_t cap)
{
    rd_pools *ps = rd->pools;
    if (!ps)
        return false;
    for (uint32_t i = 0; i < ps->n; i++)
        if (strcmp(ps->pools[i].model, model) == 0) {
            snprintf(ns, cap, "%s", ps->pools[i].ns);
            return true;
        }
    return false;
}

static void pools_array(kvr_routerd *rd, kvr_jw *w)
{
    rd_pools *ps = rd->pools;
    kvr_jw_arr(w);
    if (ps) {
        const kvr_fsm *f = rd_fsm(rd);
        for (uint32_t i = 0; i < ps->n; i++) {
            rd_pool *p = &ps->pools[i];
            kvr_fsm_pool_view v;
            bool known = kvr_fsm_pool_get(f, p->ns, p->model, &v) == 0;
            uint32_t live;
            uint64_t bookings;
            pool_load(f, p, &live, &bookings);
            kvr_jw_obj(w);
            kvr_jw_key(w, "namespace");
            kvr_jw_str(w, p->ns);
            kvr_jw_key(w, "model");
            kvr_jw_str(w, p->model);
            kvr_jw_key(w, "target");
            kvr_jw_str(w, p->target);
            kvr_jw_key(w, "state");
            kvr_jw_str(w, known ? kvr_pool_state_name(v.state) : "unregistered");
            kvr_jw_key(w, "live_workers");
            kvr_jw_u64(w, live);
            kvr_jw_key(w, "bookings");
            kvr_jw_u64(w, bookings);
            if (known) {
                kvr_jw_key(w, "last_request_ms");
                kvr_jw_u64(w, v.last_request_ms);
                kvr_jw_key(w, "state_since_ms");
                kvr_jw_u64(w, v.state_since_ms);
                kvr_jw_key(w, "wakes");
                kvr_jw_u64(w, v.wakes);
            }
            kvr_jw_key(w, "scale_running");
            kvr_jw_bool(w, p->op_running);
            kvr_jw_end(w);
        }
    }
    kvr_jw_end(w);
}

void rd_pools_state_json(kvr_routerd *rd, kvr_jw *w)
{
    kvr_jw_key(w, "pools");
    pools_array(rd, w);
}

/* ---------------------------------------------------------------------------------------- */
/* kvr.pools.list and kvr.pools.set: the frontends' /proxy/ API (frontend/fe_proxy.c) reaches
 * the pools through these, NATS being their only channel to the routers. Every router with
 * --pools-file answers, in the queue group kvr-pools: list from its replicated state, set by
 * submitting a POOL_SET through its bookings (Raft), so the leader's driver above does the
 * rest (stopping → scale to --min-workers → sleeping; waking → scale up → awake). */

#define RD_POOLS_SET_MAX 1024 /* bytes of a kvr.pools.set request */

static void pools_reply(kvr_routerd *rd, const char *reply, bool ok, const char *error,
                        const rd_pool *p, const char *from, const char *state, bool unchanged,
                        const char *mode)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_jw w;
    kvr_jw_init(&w, &b);
    kvr_jw_obj(&w);
    kvr_jw_key(&w, "ok");
    kvr_jw_bool(&w, ok);
    if (error) {
        kvr_jw_key(&w, "error");
        kvr_jw_str(&w, error);
    }
    if (p) {
        kvr_jw_key(&w, "namespace");
        kvr_jw_str(&w, p->ns);
        kvr_jw_key(&w, "model");
        kvr_jw_str(&w, p->model);
    }
    if (from) {
        kvr_jw_key(&w, "from");
        kvr_jw_str(&w, from);
    }
    if (state) {
        kvr_jw_key(&w, "state");
        kvr_jw_str(&w, state);
        kvr_jw_key(&w, "unchanged");
        kvr_jw_bool(&w, unchanged);
    }
    if (mode) { /* raft: agreed by the group; local: this router's own state only (no peers,
                 * or degraded) */
        kvr_jw_key(&w, "mode");
        kvr_jw_str(&w, mode);
    }
    kvr_jw_key(&w, "router_id");
    kvr_jw_u64(&w, rd->cfg.id);
    kvr_jw_end(&w);
    if (kvr_jw_finish(&w) == 0 && !rd->stopping)
        kvr_nats_respond(&rd->nats, reply, b.base, b.len);
    kvr_buf_free(&b);
}

static void on_pools_list(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    if (!m->reply || !rd->pools)
        return;
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_jw w;
    kvr_jw_init(&w, &b);
    pools_array(rd, &w);
    if (kvr_jw_finish(&w) == 0 && !rd->stopping)
        kvr_nats_respond(&rd->nats, m->reply, b.base, b.len);
    kvr_buf_free(&b);
}

typedef struct set_op {
    kvr_routerd *rd;
    uint32_t idx;
    kvr_pool_state from, to;
    bool known;
    char reply[]; /* the requester's reply subject */
} set_op;

static void on_pools_set_done(kvr_routerd *rd, int status, const kvr_fsm_result *res,
                              rd_decided how, void *data)
{
    set_op *op = data;
    rd_pools *ps = rd->pools;
    const rd_pool *p = ps && op->idx < ps->n ? &ps->pools[op->idx] : NULL;
    const char *err = status != 0                         ? kvr_strerror(status)
                      : res && res->outcome != KVR_OUT_OK ? kvr_outcome_name(res->outcome)
                                                          : NULL;
    if (err)
        KVR_LOG_WARN_RL(5, "pool set not applied", "pool=%s error=%s", p ? p->label : "-", err);
    else if (p)
        KVR_LOG_INFO("pool state", "pool=%s state=%s why=kvr.pools.set", p->label,
                     kvr_pool_state_name(op->to));
    pools_reply(rd, op->reply, err == NULL, err, p,
                op->known ? kvr_pool_state_name(op->from) : "unregistered",
                kvr_pool_state_name(op->to), false, err ? NULL : rd_decided_name(how));
    free(op);
}

static void on_pools_set(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    rd_pools *ps = rd->pools;
    if (!m->reply || !ps)
        return;
    if (m->len > RD_POOLS_SET_MAX) {
        pools_reply(rd, m->reply, false, "request over 1024 bytes", NULL, NULL, NULL, false, NULL);
        return;
    }
    cJSON *j = cJSON_ParseWithLength(m->data, m->len);
    const cJSON *ns = cJSON_GetObjectItemCaseSensitive(j, "namespace");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(j, "model");
    const cJSON *state = cJSON_GetObjectItemCaseSensitive(j, "state");
    const char *why = NULL;
    rd_pool *p = NULL;
    kvr_pool_state want = KVR_POOL_REMOVED;
    if (!cJSON_IsObject(j) || !cJSON_IsString(model) || !cJSON_IsString(state) ||
        (ns && !cJSON_IsString(ns)))
        why = "want {\"namespace\", \"model\", \"state\": \"sleeping\"|\"waking\"}";
    else if (strcmp(state->valuestring, "sleeping") == 0)
        want = KVR_POOL_STOPPING; /* the driver scales it down, then it sleeps */
    else if (strcmp(state->valuestring, "waking") == 0)
        want = KVR_POOL_WAKING;
    else
        why = "state: want sleeping or waking";
    if (!why && !(p = by_name(ps, ns ? ns->valuestring : "", model->valuestring)))
        why = "no such pool on this router (--pools-file)";
    cJSON_Delete(j);
    if (why) {
        pools_reply(rd, m->reply, false, why, p, NULL, NULL, false, NULL);
        return;
    }
    kvr_fsm_pool_view v;
    bool known = kvr_fsm_pool_get(rd_fsm(rd), p->ns, p->model, &v) == 0;
    /* already there, or on its way: nothing to submit (a second stop must not restart a
     * scale-down, a second start must not reset the wake's deadline) */
    if (known &&
        ((want == KVR_POOL_STOPPING &&
          (v.state == KVR_POOL_SLEEPING || v.state == KVR_POOL_STOPPING)) ||
         (want == KVR_POOL_WAKING && (v.state == KVR_POOL_AWAKE || v.state == KVR_POOL_WAKING)))) {
        pools_reply(rd, m->reply, true, NULL, p, kvr_pool_state_name(v.state),
                    kvr_pool_state_name(v.state), true, NULL);
        return;
    }
    size_t rl = strlen(m->reply);
    set_op *op = malloc(sizeof *op + rl + 1);
    if (!op) {
        pools_reply(rd, m->reply, false, "out of memory", p, NULL, NULL, false, NULL);
        return;
    }
    *op = (set_op){rd, (uint32_t)(p - ps->pools), known ? v.state : KVR_POOL_REMOVED, want, known};
    memcpy(op->reply, m->reply, rl + 1);
    kvr_cmd cmd = {.type = KVR_CMD_POOL_SET};
    cmd.u.pool =
        (kvr_pool_cmd){kvr_slice_of(p->ns), kvr_slice_of(p->model), want, (uint64_t)kvr_now_ms()};
    int rc = rd_submit(rd, &cmd, on_pools_set_done, op);
    if (rc != 0) {
        pools_reply(rd, m->reply, false, kvr_strerror(rc), p, NULL, NULL, false, NULL);
        free(op);
    }
}

int rd_pools_subscribe(kvr_routerd *rd, kvr_err *err)
{
    if (!rd->pools)
        return 0;
    int rc =
        kvr_nats_subscribe(&rd->nats, "kvr.pools.list", "kvr-pools", on_pools_list, rd, NULL, err);
    if (rc == 0)
        rc = kvr_nats_subscribe(&rd->nats, "kvr.pools.set", "kvr-pools", on_pools_set, rd, NULL,
                                err);
    return rc;
}

/* kept for tests and /admin: the pool a (ns, model) names, or NULL */
const char *rd_pools_target(kvr_routerd *rd, const char *ns, const char *model)
{
    rd_pool *p = rd->pools ? by_name(rd->pools, ns, model) : NULL;
    return p ? p->target : NULL;
}
