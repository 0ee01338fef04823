/* kvr-frontend: requests held for a pool waking from zero (issue 16, item 3; DESIGN 5 and 13).
 *
 * A router answers kvr.route for a pool scaled to zero with {"ok":false,"pool_state":"waking",
 * "retry_after_ms":N}: it has started the wake, and the frontend holds the request until a
 * router answers ok. Per pool (namespace, model) the held calls wait in a FIFO queue; one of
 * them at a time is the pool's probe: its kvr.route is sent again when the router's
 * retry_after_ms (bounded 100 ms..2 s) has passed, or at once when a heartbeat of a live worker
 * of the pool arrives (the worker's own heartbeat is the readiness signal). When any call of
 * the pool is routed ok, every queued call of the pool asks again at once; a call answered
 * "waking" again goes back to the queue with its first deadline.
 *
 * Only the probe asks while the pool sleeps, so 10,000 held requests cost one kvr.route per
 * retry interval, not 10,000. Bounds per pool: --max-held calls, --max-held-bytes of request
 * bodies (the client's and the upstream body: both stay in memory); past either the request
 * gets 503 at once. Each held call has its own deadline (--wake-timeout from its arrival):
 * past it, 503 + Retry-After ("model X is starting; try again"), or for a stream whose
 * headers were sent, an SSE error event and [DONE]. Streaming calls get their SSE headers
 * (with x-kvroute-cold-start: 1) when the hold starts and a comment line every
 * --hold-keepalive; non-streaming calls carry the header in their final answer.
 *
 * Loop thread only. Pools are never freed before exit: there is one per (namespace, model)
 * a router said was waking (at most FE_HOLD_MAX_POOLS), and they keep the gauge's series. */
#include "fe_app.h"

#include "kvr_log.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FE_HOLD_MAX_POOLS 1024
#define FE_HOLD_TICK_MS 50
#define FE_HOLD_RETRY_MIN_MS 100
#define FE_HOLD_RETRY_MAX_MS 2000

typedef struct fe_hold_pool {
    struct fe_hold_pool *next;
    char ns[FE_NS_MAX];
    char model[FE_MODEL_MAX];
    fe_call *head, *tail; /* queued calls, oldest first */
    size_t n;             /* held calls: queued, or asking a router again */
    size_t bytes;         /* their request bodies */
    fe_call *probe;       /* the call whose kvr.route is in flight as the pool's probe */
    int64_t next_probe_ms;
    int64_t next_scan_ms; /* no deadline or keepalive is due before this */
    uint32_t retry_ms;    /* the router's last retry_after_ms, bounded */
} fe_hold_pool;

enum { HR_SERVED, HR_TIMEOUT, HR_FULL, HR_GONE, HR_FAILED };
static const char *const result_labels[] = {"served",      "timeout", "rejected_full",
                                            "client_gone", "failed",  NULL};

static struct {
    fe_hold_pool *pools;
    size_t n_pools;
    size_t n_held; /* all pools */
    uv_timer_t timer;
    bool timer_init, timer_on;
    /* config */
    size_t max_held;
    size_t max_bytes;
    int64_t wake_timeout_ms;
    int64_t keepalive_ms;
    kvr_metric *m_total, *m_seconds;
} H = {.max_held = 1024, .max_bytes = 64u << 20, .wake_timeout_ms = 300000, .keepalive_ms = 10000};

void fe_hold_configure(size_t max_held, size_t max_bytes, int64_t wake_timeout_ms,
                       int64_t keepalive_ms)
{
    H.max_held = max_held;
    H.max_bytes = max_bytes;
    H.wake_timeout_ms = wake_timeout_ms;
    H.keepalive_ms = keepalive_ms;
}

int fe_hold_metrics(kvr_metrics *m)
{
    static const double b[] = {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600};
    H.m_total = kvr_metrics_counter(m, "kvr_frontend_held_total",
                                    "requests held for a pool waking from zero, by how the hold "
                                    "ended",
                                    "result", result_labels);
    H.m_seconds = kvr_metrics_histogram(m, "kvr_frontend_hold_seconds",
                                        "time requests were held for a pool waking from zero", b,
                                        sizeof b / sizeof *b, NULL, NULL);
    return H.m_total && H.m_seconds ? 0 : KVR_EINVAL;
}

static fe_hold_pool *find_pool(const char *ns, const char *model)
{
    for (fe_hold_pool *p = H.pools; p; p = p->next)
        if (!strcmp(p->model, model) && !strcmp(p->ns, ns))
            return p;
    return NULL;
}

static fe_hold_pool *get_pool(const char *ns, const char *model)
{
    fe_hold_pool *p = find_pool(ns, model);
    if (p || H.n_pools >= FE_HOLD_MAX_POOLS)
        return p;
    p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    snprintf(p->ns, sizeof p->ns, "%s", ns);
    snprintf(p->model, sizeof p->model, "%s", model);
    p->retry_ms = 1000;
    p->next = H.pools;
    H.pools = p;
    H.n_pools++;
    return p;
}

static uint32_t bound_retry(uint32_t ms)
{
    return ms < FE_HOLD_RETRY_MIN_MS   ? FE_HOLD_RETRY_MIN_MS
           : ms > FE_HOLD_RETRY_MAX_MS ? FE_HOLD_RETRY_MAX_MS
                                       : ms;
}

static void on_hold_tick(uv_timer_t *t);

static void timer_update(void)
{
    if (!H.timer_init) {
        uv_timer_init(app.loop, &H.timer);
        uv_unref((uv_handle_t *)&H.timer); /* held calls keep their connections open anyway */
        H.timer_init = true;
    }
    if (H.n_held && !H.timer_on) {
        uv_timer_start(&H.timer, on_hold_tick, FE_HOLD_TICK_MS, FE_HOLD_TICK_MS);
        H.timer_on = true;
    } else if (!H.n_held && H.timer_on) {
        uv_timer_stop(&H.timer);
        H.timer_on = false;
    }
}

static void enqueue(fe_hold_pool *p, fe_call *c, bool front)
{
    c->hold_queued = true;
    c->hold_prev = c->hold_next = NULL;
    if (front) {
        c->hold_next = p->head;
        if (p->head)
            p->head->hold_prev = c;
        else
            p->tail = c;
        p->head = c;
    } else {
        c->hold_prev = p->tail;
        if (p->tail)
            p->tail->hold_next = c;
        else
            p->head = c;
        p->tail = c;
    }
}

static void dequeue(fe_hold_pool *p, fe_call *c)
{
    if (!c->hold_queued)
        return;
    if (c->hold_prev)
        c->hold_prev->hold_next = c->hold_next;
    else
        p->head = c->hold_next;
    if (c->hold_next)
        c->hold_next->hold_prev = c->hold_prev;
    else
        p->tail = c->hold_prev;
    c->hold_prev = c->hold_next = NULL;
    c->hold_queued = false;
}

/* The call's hold is over (it stays marked as waited: x-kvroute-cold-start). Idempotent. */
static void leave(fe_call *c, int result)
{
    fe_hold_pool *p = c->hold;
    if (!p)
        return;
    dequeue(p, c);
    if (p->probe == c) { /* its reply still comes; the next call may ask now */
        p->probe = NULL;
        p->next_probe_ms = kvr_mono_ms();
    }
    p->n--;
    p->bytes -= c->hold_bytes;
    H.n_held--;
    c->hold = NULL;
    kvr_metric_add(H.m_total, (size_t)result, 1);
    kvr_metric_observe(H.m_seconds, 0, (double)(kvr_mono_ns() - c->t_hold_ns) / 1e9);
    timer_update();
}

static void model_for_text(const char *model, char *out, size_t cap)
{
    /* an SSE comment line must not break: no CR/LF from a client-chosen name */
    snprintf(out, cap, "%s", model);
    for (char *q = out; *q; q++)
        if (*q == '\r' || *q == '\n')
            *q = ' ';
}

static void write_keepalive(fe_call *c)
{
    char m[FE_MODEL_MAX], line[FE_MODEL_MAX + 48];
    model_for_text(c->pool_model, m, sizeof m);
    int n = snprintf(line, sizeof line, ": waiting for model %s to start\n\n", m);
    if (n > 0)
        kvr_http_stream_write(c->req, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* Ends a call that can be held no longer: 503 + Retry-After, or, for a stream whose headers
 * went out, an SSE error event and [DONE]. The caller frees it (call_maybe_free). */
static void answer_503(fe_call *c, uint32_t retry_ms, const char *code, const char *msg)
{
    if (!c->req)
        return;
    fe_http_error e;
    fe_error_set(&e, 503, "service_unavailable", NULL, code, "%s", msg);
    kvr_buf b;
    kvr_buf_init(&b);
    if (c->stream_started) {
        kvr_buf_append_cstr(&b, "data: ");
        fe_error_json(&b, &e);
        kvr_buf_append_cstr(&b, "\n\ndata: [DONE]\n\n");
        kvr_http_stream_write(c->req, b.base, b.len);
        if (app.active_streams)
            app.active_streams--;
        kvr_http_stream_end(c->req);
    } else {
        char ra[16];
        snprintf(ra, sizeof ra, "%u", (retry_ms + 999) / 1000 ? (retry_ms + 999) / 1000 : 1);
        kvr_http_add_header(c->req, "Retry-After", ra);
        fe_error_json(&b, &e);
        respond_json(c->req, c->route, 503, &b);
    }
    kvr_buf_free(&b);
    c->req = NULL;
}

/* Starts or resumes holding c in its pool. false: c was answered (pool full or no memory). */
static bool hold(fe_call *c, fe_hold_pool *p, uint32_t retry_ms, bool front)
{
    int64_t now = kvr_mono_ms();
    if (app.stopping) { /* draining: a held call has no work to finish here (fe_hold_drain) */
        if (c->hold)
            leave(c, HR_FAILED);
        answer_503(c, retry_ms, "shutting_down",
                   "the frontend is shutting down; retry the request");
        return false;
    }
    if (!c->hold) {
        size_t bytes = (c->req ? c->req->body.len : 0) + c->upbody.len;
        if (!p || p->n >= H.max_held || p->bytes + bytes > H.max_bytes) {
            kvr_metric_add(H.m_total, HR_FULL, 1);
            char msg[FE_MODEL_MAX + 96];
            snprintf(msg, sizeof msg,
                     "model %s is starting and too many requests already wait for it; try again",
                     c->pool_model);
            KVR_LOG_WARN_RL(5, "hold queue full", "request=%s namespace=%s model=%s held=%zu",
                            c->rid_hex, c->ns, c->pool_model, p ? p->n : 0);
            answer_503(c, retry_ms, "model_starting", msg);
            return false;
        }
        c->hold = p;
        c->hold_bytes = bytes;
        p->n++;
        p->bytes += bytes;
        H.n_held++;
        if (!c->waited) {
            c->waited = true;
            c->t_hold_ns = kvr_mono_ns();
            c->hold_deadline_ms = now + H.wake_timeout_ms;
            kvr_http_add_header(c->req, "x-kvroute-cold-start", "1");
            if (c->r.stream && !c->stream_started) {
                /* the client learns at once that its request is accepted; the comments keep
                 * proxies from cutting an idle stream */
                kvr_metric_add(app.m_responses, status_index(200), 1);
                kvr_http_stream_start(c->req, 200, "text/event-stream");
                c->stream_started = true;
                app.active_streams++;
                write_keepalive(c);
            }
            c->hold_keepalive_ms = now + H.keepalive_ms;
            /* one line when a pool starts holding, not one per request (10,000 may wait) */
            if (p->n == 1)
                KVR_LOG_INFO("pool waking: holding its requests",
                             "request=%s namespace=%s model=%s", c->rid_hex, c->ns, c->pool_model);
            else
                KVR_LOG_DEBUG("request held: pool waking",
                              "request=%s namespace=%s model=%s held=%zu", c->rid_hex, c->ns,
                              c->pool_model, p->n);
        }
    }
    enqueue(c->hold, c, front);
    p = c->hold;
    if (p->next_scan_ms > c->hold_deadline_ms || p->next_scan_ms == 0)
        p->next_scan_ms = c->hold_deadline_ms;
    if (c->stream_started && p->next_scan_ms > c->hold_keepalive_ms)
        p->next_scan_ms = c->hold_keepalive_ms;
    if (p->probe == c || !p->probe) {
        p->probe = NULL;
        p->next_probe_ms = now + retry_ms;
    }
    timer_update();
    return true;
}

void fe_hold_waking(fe_call *c, uint32_t retry_after_ms)
{
    fe_hold_pool *p = c->hold ? c->hold : get_pool(c->ns, c->pool_model);
    uint32_t r = bound_retry(retry_after_ms);
    if (p)
        p->retry_ms = r;
    /* the probe, or a call that asked after a release, goes back to the front: oldest first */
    if (!hold(c, p, r, c->hold != NULL))
        call_maybe_free(c);
}

/* Asks a router again for c (its kvr.route tries start over). */
static void ask_again(fe_call *c)
{
    c->tries = 0;
    c->t_route_ns = kvr_mono_ns();
    send_route(c);
}

static void probe(fe_hold_pool *p)
{
    fe_call *c = p->head;
    if (!c || p->probe)
        return;
    dequeue(p, c);
    p->probe = c;
    p->next_probe_ms = INT64_MAX;
    ask_again(c);
}

/* Every queued call of p asks a router again. The queue is taken first: a call answered at
 * once (or failing at once) may come back to it. */
static void release_all(fe_hold_pool *p)
{
    fe_call *c = p->head;
    p->head = p->tail = NULL;
    while (c) {
        fe_call *next = c->hold_next;
        c->hold_prev = c->hold_next = NULL;
        c->hold_queued = false;
        ask_again(c);
        c = next;
    }
}

void fe_hold_reply_seen(fe_call *c)
{
    fe_hold_pool *p = c->hold;
    if (p && p->probe == c) {
        p->probe = NULL;
        p->next_probe_ms = kvr_mono_ms(); /* the next one asks at once unless c is held again */
    }
}

void fe_hold_served(fe_call *c, bool routed)
{
    fe_hold_pool *p = c->hold;
    if (p) {
        if (p->n == 1)
            KVR_LOG_INFO("pool woke: its last held request goes to a worker",
                         "request=%s namespace=%s model=%s held_ms=%" PRId64, c->rid_hex, c->ns,
                         c->pool_model, (kvr_mono_ns() - c->t_hold_ns) / 1000000);
        KVR_LOG_DEBUG("held request served", "request=%s namespace=%s model=%s held_ms=%" PRId64,
                      c->rid_hex, c->ns, c->pool_model, (kvr_mono_ns() - c->t_hold_ns) / 1000000);
        leave(c, HR_SERVED);
    } else if (routed && H.n_held) {
        p = find_pool(c->ns, c->pool_model);
    }
    /* a router routed a call of the pool: it is awake, the others ask again now */
    if (routed && p && p->head)
        release_all(p);
}

bool fe_hold_no_worker(fe_call *c, int fb_reason)
{
    if (c->hold && c->req && !c->client_gone &&
        (fb_reason == FB_TIMEOUT || fb_reason == FB_NO_RESPONDERS ||
         fb_reason == FB_DISCONNECTED)) {
        /* the routers said the pool was waking and cannot be asked now: keep waiting (the
         * deadline still bounds it) */
        if (!hold(c, c->hold, c->hold->retry_ms, true))
            call_maybe_free(c); /* answered: the frontend is draining */
        return true;
    }
    if (c->hold) {
        /* a router refused the request after the pool was waking: the wake failed */
        char msg[FE_MODEL_MAX + 64];
        snprintf(msg, sizeof msg, "model %s could not be started; try again", c->pool_model);
        uint32_t r = c->hold->retry_ms;
        leave(c, HR_FAILED);
        answer_503(c, r, "model_starting", msg);
        call_maybe_free(c);
        return true;
    }
    if (c->cold_status) {
        /* no live worker was known when it arrived and no router took it: what the frontend
         * answered before it asked routers about sleeping pools */
        fe_http_error e;
        if (c->cold_status == 404)
            fe_error_set(&e, 404, "invalid_request_error", "model", "model_not_found",
                         "The model `%s` does not exist or has no live worker.", c->r.model);
        else
            fe_error_set(&e, 503, "service_unavailable", NULL, "no_worker",
                         "No worker is available; retry later.");
        if (c->req) {
            respond_error(c->req, c->route, &e);
            c->req = NULL;
        }
        call_maybe_free(c);
        return true;
    }
    return false;
}

void fe_hold_client_gone(fe_call *c)
{
    if (c->hold)
        leave(c, HR_GONE);
}

void fe_hold_detach(fe_call *c)
{
    if (c->hold)
        leave(c, c->client_gone ? HR_GONE : HR_FAILED);
}

void fe_hold_worker_heard(const char *ns, const char *model)
{
    if (!H.n_held)
        return;
    fe_hold_pool *p = find_pool(ns, model);
    if (p && p->head && !p->probe)
        probe(p);
}

static void scan(fe_hold_pool *p, int64_t now)
{
    int64_t next = INT64_MAX;
    for (fe_call *c = p->head, *nx; c; c = nx) {
        nx = c->hold_next;
        if (now >= c->hold_deadline_ms) {
            char msg[FE_MODEL_MAX + 48];
            snprintf(msg, sizeof msg, "model %s is starting; try again", c->pool_model);
            KVR_LOG_WARN_RL(5, "held request timed out", "request=%s namespace=%s model=%s",
                            c->rid_hex, c->ns, c->pool_model);
            uint32_t r = p->retry_ms;
            leave(c, HR_TIMEOUT);
            answer_503(c, r, "model_starting", msg);
            call_maybe_free(c);
            continue;
        }
        if (c->stream_started && now >= c->hold_keepalive_ms) {
            write_keepalive(c);
            c->hold_keepalive_ms = now + H.keepalive_ms;
        }
        if (c->hold_deadline_ms < next)
            next = c->hold_deadline_ms;
        if (c->stream_started && c->hold_keepalive_ms < next)
            next = c->hold_keepalive_ms;
    }
    p->next_scan_ms = next == INT64_MAX ? 0 : next;
}

static void on_hold_tick(uv_timer_t *t)
{
    (void)t;
    int64_t now = kvr_mono_ms();
    for (fe_hold_pool *p = H.pools; p; p = p->next) {
        if (!p->head)
            continue;
        if (p->next_scan_ms && now >= p->next_scan_ms)
            scan(p, now);
        if (p->head && !p->probe && now >= p->next_probe_ms)
            probe(p);
    }
}

void fe_hold_drain(void)
{
    for (fe_hold_pool *p = H.pools; p; p = p->next) {
        while (p->head) {
            fe_call *c = p->head;
            uint32_t r = p->retry_ms;
            leave(c, HR_FAILED);
            answer_503(c, r, "shutting_down", "the frontend is shutting down; retry the request");
            call_maybe_free(c);
        }
    }
}

void fe_hold_close(void)
{
    if (H.timer_init) {
        uv_timer_stop(&H.timer);
        H.timer_on = false;
        uv_close((uv_handle_t *)&H.timer, NULL);
        H.timer_init = false;
    }
}

static void label(kvr_buf *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            kvr_buf_append(b, "\\", 1);
        if (*s == '\n')
            kvr_buf_append_cstr(b, "\\n");
        else
            kvr_buf_append(b, s, 1);
    }
}

/* kvr_frontend_held_requests has one series per pool that ever held a request: its label
 * values are not known at registration (kvr_metrics), so it is rendered here. */
void fe_hold_metrics_respond(kvr_http_req *req)
{
    kvr_buf b;
    kvr_buf_init(&b);
    int rc = kvr_metrics_render(app.metrics, &b);
    kvr_buf_append_cstr(&b, "# HELP kvr_frontend_held_requests requests held now for a pool "
                            "waking from zero\n# TYPE kvr_frontend_held_requests gauge\n");
    for (fe_hold_pool *p = H.pools; p; p = p->next) {
        kvr_buf_append_cstr(&b, "kvr_frontend_held_requests{namespace=\"");
        label(&b, p->ns);
        kvr_buf_append_cstr(&b, "\",model=\"");
        label(&b, p->model);
        char v[32];
        snprintf(v, sizeof v, "\"} %zu\n", p->n);
        kvr_buf_append_cstr(&b, v);
    }
    if (rc)
        kvr_http_respond_cstr(req, 500, "text/plain", "out of memory\n");
    else
        kvr_http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", b.base, b.len);
    kvr_buf_free(&b);
}
