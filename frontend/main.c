/* kvr-frontend: stateless OpenAI-compatible gateway (DESIGN section 8).
 *
 * One libuv loop thread owns everything: the HTTP server (kvr_http), the upstream client
 * (kvr_curl), the NATS bridge (kvr_nats: cnats threads hand messages to this loop), the worker
 * table (fe_pool) and every in-flight call. Flow per request:
 *   parse → tokenize → seq hashes → pick pool → route (kvr.route, per-try timeout, N tries,
 *   local least-loaded fallback) → POST worker /v1/completions (stream) → relay SSE →
 *   prefill_done at first token, free at the end / on error / on client disconnect. */
#include "fe_core.h"
#include "fe_pool.h"

#include "kvr_access.h"
#include "kvr_curl.h"
#include "kvr_flags.h"
#include "kvr_hash.h"
#include "kvr_http.h"
#include "kvr_log.h"
#include "kvr_metrics.h"
#include "kvr_mp.h"
#include "kvr_nats.h"
#include "kvr_nats_flags.h"
#include "kvr_sse.h"
#include "kvr_tok.h"

#include <ctype.h>
#include <inttypes.h>
#include <signal.h>
#include <strings.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

enum { R_COMPLETIONS, R_CHAT, R_MODELS, R_HEALTH, R_METRICS, R_OTHER, R_N };
static const char *route_labels[] = {"completions", "chat_completions", "models", "health",
                                     "metrics", "other", NULL};
static const int status_codes[] = {200, 400, 401, 404, 405, 413, 499, 500, 502, 503};
static const char *status_labels[] = {"200", "400", "401", "404", "405", "413",
                                      "499", "500", "502", "503", "other", NULL};
enum { FB_TIMEOUT, FB_NO_RESPONDERS, FB_ROUTER_ERROR, FB_DISCONNECTED, FB_BAD_REPLY };
static const char *fallback_labels[] = {"timeout", "no_responders", "router_error",
                                        "nats_down", "bad_reply", NULL};
enum { UE_CONNECT, UE_STATUS, UE_AFTER_FIRST, UE_MALFORMED };
static const char *uerr_labels[] = {"before_first_token", "http_status", "after_first_token",
                                    "malformed", NULL};

typedef struct fe_app {
    uv_loop_t *loop;
    kvr_http_server http;
    kvr_curl curl;
    kvr_nats nats;
    bool nats_on;
    kvr_metrics *metrics;
    fe_pool pool;
    const kvr_tokenizer *tok;
    uv_timer_t tick;
    uv_signal_t sigint, sigterm;
    bool stopping;
    /* config */
    uint64_t frontend_id;
    fe_mode mode;
    const char *api_key;
    uint32_t block_size;
    int64_t route_timeout_ms;
    int64_t route_tries;
    uint64_t boot_ms;
    uint64_t next_req;
    char lease_subject[64];
    /* metrics */
    kvr_metric *m_requests, *m_responses, *m_ttft, *m_e2e, *m_route_lat, *m_active,
        *m_upstream_err, *m_fallback, *m_route_tries, *m_retries, *m_route_mode,
        *m_workers, *m_hb_rejected, *m_disconnects;
    uint64_t active_streams;
    /* issue 18 edges: drain, stalls, admission (docs/SECURITY.md 5) */
    struct fe_call *calls; /* every live call (doubly linked), ended at the drain deadline */
    size_t n_calls;
    bool draining, closed;
    uv_timer_t drain_timer;
    int64_t drain_timeout_ms;
    int64_t upstream_stall_ms;
    int64_t last_tick_ms;
    kvr_cidr_list worker_cidrs;
    kvr_metric *m_hb_refused_url, *m_stalls, *m_drain_cut;
} fe_app;

static fe_app app;

typedef struct fe_call {
    struct fe_call *prev, *next; /* app.calls */
    kvr_http_req *req;           /* NULL once finished */
    fe_req r;
    fe_relay relay;
    kvr_sse sse;
    kvr_buf out;     /* scratch for SSE bytes to the client */
    kvr_buf upbody;  /* upstream request body */
    uint8_t rid[16];
    char rid_hex[33];
    char ns[FE_NS_MAX];
    int route; /* R_* */
    /* routing */
    int tries;
    bool route_pending;
    bool booked; /* a router booked it, or may have: send events */
    int64_t t_start_ns, t_route_ns, t_first_ns;
    /* upstream */
    kvr_curl_req *up;
    char url[FE_URL_MAX];
    uint64_t worker_id;
    bool have_worker;
    int attempts;
    long up_status;
    bool got_done;
    bool client_gone;
    bool stream_started;
    bool failed_after_first;
    char up_err[256];
} fe_call;

static void start_upstream(fe_call *c);
static void call_maybe_free(fe_call *c);
static void shutdown_now(void);

/* ---------- small helpers ---------- */

static size_t status_index(int status)
{
    for (size_t i = 0; i < sizeof status_codes / sizeof *status_codes; i++)
        if (status_codes[i] == status)
            return i;
    return sizeof status_codes / sizeof *status_codes;
}

static void respond_json(kvr_http_req *req, int route, int status, const kvr_buf *body)
{
    kvr_metric_add(app.m_responses, status_index(status), 1);
    (void)route;
    kvr_http_respond(req, status, "application/json", body->base ? body->base : "", body->len);
}

static void respond_error(kvr_http_req *req, int route, const fe_http_error *e)
{
    kvr_buf b;
    kvr_buf_init(&b);
    fe_error_json(&b, e);
    if (e->status == 503)
        kvr_http_add_header(req, "Retry-After", "1");
    respond_json(req, route, e->status, &b);
    kvr_buf_free(&b);
}

static void respond_simple_error(kvr_http_req *req, int route, int status, const char *type,
                                 const char *code, const char *msg)
{
    fe_http_error e;
    fe_error_set(&e, status, type, NULL, code, "%s", msg);
    respond_error(req, route, &e);
}

static void publish_event(fe_call *c, const char *event)
{
    if (!c->booked || !app.nats_on)
        return;
    kvr_buf b;
    kvr_buf_init(&b);
    if (fe_route_event_encode(&b, c->rid, event) == 0) {
        int rc = kvr_nats_publish(&app.nats, "kvr.route.event", b.base, b.len);
        if (rc)
            KVR_LOG_WARN_RL(5, "route event not published", "request=%s event=%s err=\"%s\"",
                            c->rid_hex, event, kvr_strerror(rc));
    }
    kvr_buf_free(&b);
}

static void worker_inflight(fe_call *c, int delta)
{
    if (!c->have_worker)
        return;
    fe_worker *w = fe_pool_find(&app.pool, NULL, c->worker_id);
    if (w && strcmp(w->url, c->url) == 0) {
        if (delta < 0 && w->inflight == 0)
            return;
        w->inflight = (uint32_t)((int)w->inflight + delta);
    }
}

/* Releases the worker booking (router and local count). Idempotent. */
static void release_worker(fe_call *c)
{
    if (c->booked)
        publish_event(c, "free");
    c->booked = false;
    worker_inflight(c, -1);
    c->have_worker = false;
}

/* ---------- finishing ---------- */

static void finish_stream(fe_call *c)
{
    if (!c->req)
        return;
    if (app.active_streams)
        app.active_streams--;
    kvr_http_stream_end(c->req);
    c->req = NULL;
}

static void finish_error(fe_call *c, int status, const char *type, const char *code,
                         const char *msg)
{
    if (!c->req)
        return;
    if (c->stream_started) {
        kvr_buf_reset(&c->out);
        fe_relay_error_event(&c->out, msg);
        kvr_http_stream_write(c->req, c->out.base, c->out.len);
        finish_stream(c);
    } else {
        respond_simple_error(c->req, c->route, status, type, code, msg);
        c->req = NULL;
    }
}

static void call_maybe_free(fe_call *c)
{
    if (c->req || c->route_pending || c->up)
        return;
    release_worker(c);
    fe_req_free(&c->r);
    fe_relay_free(&c->relay);
    kvr_sse_free(&c->sse);
    kvr_buf_free(&c->out);
    kvr_buf_free(&c->upbody);
    if (c->prev)
        c->prev->next = c->next;
    else if (app.calls == c)
        app.calls = c->next;
    if (c->next)
        c->next->prev = c->prev;
    app.n_calls--;
    free(c);
    if (app.draining && app.n_calls == 0)
        shutdown_now(); /* the last in-flight call of a drain is done */
}

/* ---------- client side ---------- */

static void on_client_close(kvr_http_req *req)
{
    fe_call *c = req->data;
    c->client_gone = true;
    kvr_metric_inc(app.m_disconnects);
    if (c->up) {
        kvr_curl_cancel(c->up);
        c->up = NULL;
    }
    release_worker(c);
    /* The request must still be finished (it is then only freed). */
    if (c->stream_started) {
        finish_stream(c);
    } else {
        kvr_metric_add(app.m_responses, status_index(499), 1);
        kvr_http_respond(c->req, 499, NULL, NULL, 0);
        c->req = NULL;
    }
    call_maybe_free(c);
}

static void on_client_drain(kvr_http_req *req)
{
    fe_call *c = req->data;
    if (c->up && kvr_curl_paused(c->up))
        kvr_curl_resume(c->up); /* may deliver data (and even on_done) before returning */
}

/* ---------- upstream ---------- */

static int on_sse_event(void *arg, kvr_slice event, kvr_slice data)
{
    fe_call *c = arg;
    (void)event;
    kvr_err err = {0};
    kvr_buf_reset(&c->out);
    int ev = fe_relay_event(&c->relay, data.base, data.len, &c->out, &err);
    if (ev == KVR_ELIMIT) {
        snprintf(c->up_err, sizeof c->up_err, "%.250s", err.msg);
        return 1;
    }
    if (ev < 0) {
        kvr_metric_add(app.m_upstream_err, UE_MALFORMED, 1);
        KVR_LOG_WARN_RL(5, "bad upstream event", "request=%s err=\"%s\"", c->rid_hex, err.msg);
        return 0; /* skip it */
    }
    if (ev == FE_EV_ERROR) {
        snprintf(c->up_err, sizeof c->up_err, "%.250s", err.msg);
        return 1; /* abort: handled in on_done */
    }
    if (ev == FE_EV_DONE) {
        c->got_done = true;
        return 0;
    }
    if (ev == FE_EV_CHUNK && c->t_first_ns == 0) {
        c->t_first_ns = kvr_mono_ns();
        kvr_metric_observe(app.m_ttft, 0, (double)(c->t_first_ns - c->t_start_ns) / 1e9);
        publish_event(c, "prefill_done");
    }
    if (c->r.stream && c->out.len) {
        if (!c->stream_started) {
            kvr_metric_add(app.m_responses, status_index(200), 1);
            if (kvr_http_stream_start(c->req, 200, "text/event-stream"))
                return 1;
            c->stream_started = true;
            app.active_streams++;
        }
        kvr_http_stream_write(c->req, c->out.base, c->out.len);
    }
    return 0;
}

static int on_up_headers(kvr_curl_req *r, long status)
{
    fe_call *c = kvr_curl_req_data(r);
    c->up_status = status;
    kvr_buf_reset(&c->out); /* collects an error body */
    return 0;
}

static int on_up_data(kvr_curl_req *r, const char *data, size_t len)
{
    fe_call *c = kvr_curl_req_data(r);
    if (!c->req || c->client_gone)
        return 1;
    if (c->up_status != 200) { /* keep (a bounded prefix of) the worker's error body */
        size_t room = c->out.len < 65536 ? 65536 - c->out.len : 0;
        kvr_buf_append(&c->out, data, len < room ? len : room);
        return 0;
    }
    /* Backpressure: the client's socket is full; keep the bytes upstream. */
    if (c->stream_started && kvr_http_stream_should_pause(c->req))
        return KVR_CURL_PAUSE;
    kvr_err err = {0};
    int rc = kvr_sse_feed(&c->sse, data, len, &err);
    if (rc == KVR_ELIMIT) {
        snprintf(c->up_err, sizeof c->up_err, "upstream stream: %.200s", err.msg);
        kvr_metric_add(app.m_upstream_err, UE_MALFORMED, 1);
        return 1;
    }
    return rc ? 1 : 0;
}

static void on_up_done(kvr_curl_req *r, int result, long status, const char *errmsg,
                       kvr_slice body)
{
    (void)body;
    fe_call *c = kvr_curl_req_data(r);
    c->up = NULL;
    if (!c->req) { /* client already gone and finished */
        call_maybe_free(c);
        return;
    }
    bool ok = result == 0 && status == 200 && c->up_err[0] == '\0' && c->relay.got_first;
    bool first = c->relay.got_first;
    if (ok || (result == 0 && status == 200 && c->got_done && c->up_err[0] == '\0')) {
        int64_t now = kvr_mono_ns();
        kvr_metric_observe(app.m_e2e, 0, (double)(now - c->t_start_ns) / 1e9);
        if (c->r.stream) {
            if (!c->stream_started) {
                kvr_metric_add(app.m_responses, status_index(200), 1);
                kvr_http_stream_start(c->req, 200, "text/event-stream");
                c->stream_started = true;
                app.active_streams++;
            }
            kvr_http_stream_write(c->req, "data: [DONE]\n\n", 14);
            finish_stream(c);
        } else {
            kvr_buf_reset(&c->out);
            fe_relay_final_json(&c->relay, &c->out);
            respond_json(c->req, c->route, 200, &c->out);
            c->req = NULL;
        }
        release_worker(c);
        call_maybe_free(c);
        return;
    }
    /* The worker refused the request itself (4xx): relay its answer, no retry helps. */
    if (result == 0 && status >= 400 && status < 500 && status != 404 && status != 408 &&
        status != 429 && !first) {
        kvr_metric_add(app.m_upstream_err, UE_STATUS, 1);
        kvr_buf b = c->out;
        kvr_buf_init(&c->out);
        if (b.len == 0 || b.base[0] != '{') {
            fe_http_error e;
            fe_error_set(&e, (int)status, "invalid_request_error", NULL, NULL,
                         "the worker refused the request (HTTP %ld)", status);
            kvr_buf_reset(&b);
            fe_error_json(&b, &e);
        }
        respond_json(c->req, c->route, (int)status, &b);
        kvr_buf_free(&b);
        c->req = NULL;
        release_worker(c);
        call_maybe_free(c);
        return;
    }
    /* Failure. */
    /* why goes to the log (with the URL); the client only learns the worker id: internal
     * addresses are not its business. */
    char why[320], client_msg[320];
    if (c->up_err[0])
        snprintf(why, sizeof why, "%s", c->up_err);
    else if (result == 0)
        snprintf(why, sizeof why, "worker %s answered HTTP %ld", c->url, status);
    else if (result == KVR_ETIMEDOUT)
        snprintf(why, sizeof why, "worker %s sent nothing for %" PRId64 " ms", c->url,
                 app.upstream_stall_ms);
    else
        snprintf(why, sizeof why, "worker %s: %s", c->url, errmsg ? errmsg : kvr_strerror(result));
    if (c->up_err[0])
        snprintf(client_msg, sizeof client_msg, "upstream worker %" PRIu64 " failed: %s",
                 c->worker_id, c->up_err);
    else if (result == 0)
        snprintf(client_msg, sizeof client_msg, "upstream worker %" PRIu64 " failed (HTTP %ld)",
                 c->worker_id, status);
    else if (result == KVR_ETIMEDOUT)
        snprintf(client_msg, sizeof client_msg, "upstream worker %" PRIu64 " failed: stalled",
                 c->worker_id);
    else
        snprintf(client_msg, sizeof client_msg, "upstream worker %" PRIu64 " failed", c->worker_id);
    kvr_metric_add(app.m_upstream_err,
                   first ? UE_AFTER_FIRST : (result == 0 ? UE_STATUS : UE_CONNECT), 1);
    KVR_LOG_WARN_RL(2, "upstream failed", "request=%s worker=%" PRIu64 " first_token=%d err=\"%s\"",
                    c->rid_hex, c->worker_id, first, why);
    uint64_t failed_id = c->worker_id;
    if (result != 0 && result != KVR_ECLOSED && !first && c->have_worker) {
        /* Unreachable: treat it as down until its next heartbeat says otherwise. */
        fe_worker *fw = fe_pool_find(&app.pool, NULL, failed_id);
        if (fw && strcmp(fw->url, c->url) == 0)
            fw->last_seen_ms = INT64_MIN / 4;
    }
    release_worker(c);
    if (!first && c->attempts < 2 && !app.stopping) {
        /* Retry once on another worker, chosen locally (the booking was freed). */
        fe_mode m = app.mode == FE_MODE_KV ? FE_MODE_LEAST : app.mode;
        fe_worker *w = fe_pool_choose(&app.pool, m, c->ns, c->r.model, kvr_mono_ms(), true,
                                      failed_id);
        if (!w || w->id == failed_id) /* the pool has no other worker: any served pool */
            w = fe_pool_choose(&app.pool, m, NULL, c->r.model, kvr_mono_ms(), true, failed_id);
        if (w && w->id != failed_id) {
            kvr_metric_inc(app.m_retries);
            snprintf(c->url, sizeof c->url, "%s", w->url);
            c->worker_id = w->id;
            c->have_worker = true;
            worker_inflight(c, +1);
            c->up_err[0] = '\0';
            c->got_done = false;
            kvr_sse_reset(&c->sse);
            start_upstream(c);
            return;
        }
    }
    finish_error(c, 502, "upstream_error", "worker_failed", client_msg);
    call_maybe_free(c);
}

static void start_upstream(fe_call *c)
{
    static const char *const hdrs[] = {"Content-Type: application/json",
                                       "Accept: text/event-stream", NULL};
    char url[FE_URL_MAX + 32];
    size_t ul = strlen(c->url);
    while (ul && c->url[ul - 1] == '/')
        ul--;
    snprintf(url, sizeof url, "%.*s/v1/completions", (int)ul, c->url);
    c->attempts++;
    c->up_status = 0;
    kvr_curl_opts o = {
        .url = url,
        .method = "POST",
        .headers = hdrs,
        .body = c->upbody.base,
        .body_len = c->upbody.len,
        .connect_timeout_ms = 1000,
        .stall_timeout_ms = app.upstream_stall_ms,
        .data = c,
        .on_headers = on_up_headers,
        .on_data = on_up_data,
        .on_done = on_up_done,
    };
    kvr_err err = {0};
    int rc = kvr_curl_start(&app.curl, &o, &c->up, &err);
    if (rc) {
        c->up = NULL;
        kvr_metric_add(app.m_upstream_err, UE_CONNECT, 1);
        KVR_LOG_WARN_RL(2, "upstream not started", "request=%s worker=%" PRIu64 " err=\"%s\"",
                        c->rid_hex, c->worker_id, err.msg);
        release_worker(c);
        char msg[96];
        snprintf(msg, sizeof msg, "upstream worker %" PRIu64 " failed", c->worker_id);
        finish_error(c, 502, "upstream_error", "worker_failed", msg);
        call_maybe_free(c);
    }
}

/* ---------- routing ---------- */

static void use_local_choice(fe_call *c, int fb_reason)
{
    if (fb_reason >= 0) {
        kvr_metric_add(app.m_fallback, (size_t)fb_reason, 1);
        KVR_LOG_INFO("route fallback", "request=%s reason=%s", c->rid_hex,
                     fallback_labels[fb_reason]);
    }
    fe_worker *w = fe_pool_choose(&app.pool, app.mode, c->ns, c->r.model, kvr_mono_ms(), false, 0);
    if (!w) {
        finish_error(c, 503, "service_unavailable", "no_worker", "no live worker for this model");
        call_maybe_free(c);
        return;
    }
    snprintf(c->url, sizeof c->url, "%s", w->url);
    c->worker_id = w->id;
    c->have_worker = true;
    worker_inflight(c, +1);
    start_upstream(c);
}

static void send_route(fe_call *c);

static void on_route_reply(int status, const char *data, size_t len, void *cbdata)
{
    fe_call *c = cbdata;
    c->route_pending = false;
    if (!c->req || c->client_gone) {
        /* A router may have booked it: free it (routers ignore unknown ids). */
        if (status == 0) {
            c->booked = true;
            release_worker(c);
        }
        call_maybe_free(c);
        return;
    }
    if (status == KVR_ETIMEDOUT && c->tries < app.route_tries) {
        send_route(c);
        return;
    }
    kvr_metric_observe(app.m_route_lat, 0, (double)(kvr_mono_ns() - c->t_route_ns) / 1e9);
    if (status != 0 && status != KVR_NATS_NO_RESPONDERS) {
        /* A try that timed out may still be applied later by a slow router (or be committed
         * by Raft after its leader died): treat the request as possibly booked so that its
         * events, "free" above all, are published. A FREE that arrives first is remembered by
         * the routers' state machine, so the late ROUTE books nothing. */
        c->booked = true;
    }
    if (status != 0) {
        use_local_choice(c, status == KVR_ETIMEDOUT            ? FB_TIMEOUT
                            : status == KVR_NATS_NO_RESPONDERS ? FB_NO_RESPONDERS
                                                               : FB_DISCONNECTED);
        return;
    }
    fe_route_reply rep;
    kvr_err err = {0};
    if (fe_route_reply_decode(data, len, &rep, &err)) {
        c->booked = true; /* a router answered something: it may have booked */
        KVR_LOG_WARN_RL(5, "bad route reply", "request=%s err=\"%s\"", c->rid_hex, err.msg);
        use_local_choice(c, FB_BAD_REPLY);
        return;
    }
    if (!rep.ok) {
        KVR_LOG_WARN_RL(5, "router refused", "request=%s err=\"%s\"", c->rid_hex, rep.error);
        use_local_choice(c, FB_ROUTER_ERROR);
        return;
    }
    kvr_metric_add(app.m_route_mode, strcmp(rep.mode, "local") == 0 ? 1 : 0, 1);
    snprintf(c->url, sizeof c->url, "%s", rep.url);
    c->worker_id = rep.worker_id;
    c->have_worker = true;
    c->booked = true;
    worker_inflight(c, +1);
    KVR_LOG_DEBUG("routed", "request=%s worker=%" PRIu64 " overlap=%u router=%u mode=%s",
                  c->rid_hex, rep.worker_id, rep.overlap_blocks, rep.router_id, rep.mode);
    start_upstream(c);
}

static void send_route(fe_call *c)
{
    size_t nt = kvr_tok_count(&c->r.tokens);
    size_t nb = app.block_size ? nt / app.block_size : 0;
    uint64_t *hs = nb ? malloc(nb * sizeof *hs) : NULL;
    if (nb && !hs) {
        use_local_choice(c, FB_ROUTER_ERROR);
        return;
    }
    if (nb)
        nb = kvr_hash_seq(kvr_tok_ids(&c->r.tokens), nt, app.block_size, false, 0, hs, nb);
    fe_route_req rq = {.frontend_id = app.frontend_id, .model = c->r.model, .ns = c->ns,
                       .tokens = (uint32_t)nt, .seq_hashes = hs, .n_hashes = nb};
    memcpy(rq.request_id, c->rid, 16);
    kvr_buf b;
    kvr_buf_init(&b);
    int rc = fe_route_req_encode(&b, &rq);
    free(hs);
    c->tries++;
    kvr_metric_inc(app.m_route_tries);
    if (!rc)
        rc = kvr_nats_request(&app.nats, "kvr.route", b.base, b.len,
                              (uint32_t)app.route_timeout_ms, on_route_reply, c);
    kvr_buf_free(&b);
    if (rc) {
        use_local_choice(c, FB_DISCONNECTED);
        return;
    }
    c->route_pending = true;
}

/* ---------- request handling ---------- */

/* Called by the tick (1 s) and before every use of worker liveness. Two calls more than 2.5 s
 * apart mean the loop did not run meanwhile (SIGSTOP, a long callback, a paused VM) and could
 * read no heartbeat: liveness is judged on the time it had, so every deadline moves on by the
 * stall (never past now). Checked on requests too, because after a stall the I/O that was
 * waiting (a request among it) runs before the timers. */
static void note_loop_time(int64_t now)
{
    int64_t gap = app.last_tick_ms ? now - app.last_tick_ms : 0;
    app.last_tick_ms = now;
    if (gap <= 2500)
        return;
    kvr_metric_inc(app.m_stalls);
    KVR_LOG_WARN("loop stalled: extending worker deadlines by the stall", "stall_ms=%" PRId64,
                 gap - 1000);
    fe_pool_shift(&app.pool, gap - 1000, now);
}

static bool check_auth(kvr_http_req *req, int route)
{
    if (!app.api_key || !app.api_key[0])
        return true;
    kvr_slice a = kvr_http_req_header(req, "Authorization");
    if (a.base && fe_auth_ok(app.api_key, a.base, a.len))
        return true;
    respond_simple_error(req, route, 401, "invalid_request_error", "invalid_api_key",
                         "Incorrect API key provided.");
    return false;
}

static void handle_generate(kvr_http_req *req, int route)
{
    fe_call *c = calloc(1, sizeof *c);
    if (!c) {
        respond_simple_error(req, route, 500, "server_error", NULL, "out of memory");
        return;
    }
    c->next = app.calls;
    if (app.calls)
        app.calls->prev = c;
    app.calls = c;
    app.n_calls++;
    c->route = route;
    c->t_start_ns = kvr_mono_ns();
    fe_req_init(&c->r);
    kvr_buf_init(&c->out);
    kvr_buf_init(&c->upbody);
    kvr_sse_init(&c->sse, 0, 0, on_sse_event, c);
    fe_http_error e;
    memset(&e, 0, sizeof e);
    int rc = fe_parse_request(req->body.base, req->body.len, route == R_CHAT, app.tok, &c->r, &e);
    if (rc) {
        respond_error(req, route, &e);
        call_maybe_free(c);
        return;
    }
    int64_t now = kvr_mono_ms();
    note_loop_time(now);
    rc = fe_pool_pick_ns(&app.pool, c->r.model, now, c->ns);
    if (rc == KVR_ENOTFOUND) {
        fe_error_set(&e, 404, "invalid_request_error", "model", "model_not_found",
                     "The model `%s` does not exist or has no live worker.", c->r.model);
        respond_error(req, route, &e);
        call_maybe_free(c);
        return;
    }
    if (rc) {
        fe_error_set(&e, 503, "service_unavailable", NULL, "no_worker",
                     "No worker is available; retry later.");
        respond_error(req, route, &e);
        call_maybe_free(c);
        return;
    }
    /* request id: frontend id, boot time, counter — unique across frontends and restarts. */
    uint64_t a = (app.frontend_id << 40) ^ app.boot_ms, b = ++app.next_req;
    for (int i = 0; i < 8; i++) {
        c->rid[i] = (uint8_t)(a >> (56 - 8 * i));
        c->rid[8 + i] = (uint8_t)(b >> (56 - 8 * i));
    }
    for (int i = 0; i < 16; i++)
        snprintf(c->rid_hex + 2 * i, 3, "%02x", c->rid[i]);
    char id[48];
    snprintf(id, sizeof id, "%s-%s", route == R_CHAT ? "chatcmpl" : "cmpl", c->rid_hex);
    fe_relay_init(&c->relay, &c->r, id, (int64_t)time(NULL));
    if (fe_upstream_body(&c->upbody, &c->r)) {
        respond_simple_error(req, route, 500, "server_error", NULL, "out of memory");
        call_maybe_free(c);
        return;
    }
    c->req = req;
    req->data = c;
    req->on_close = on_client_close;
    req->on_drain = on_client_drain;
    c->t_route_ns = kvr_mono_ns();
    if (app.mode == FE_MODE_KV) {
        if (app.nats_on && kvr_nats_connected(&app.nats))
            send_route(c);
        else
            use_local_choice(c, FB_DISCONNECTED);
    } else {
        use_local_choice(c, -1);
    }
}

static void on_request(kvr_http_req *req)
{
    kvr_slice p = req->path;
    bool get = kvr_slice_eq_cstr(req->method, "GET") || kvr_slice_eq_cstr(req->method, "HEAD");
    bool post = kvr_slice_eq_cstr(req->method, "POST");
    int route = R_OTHER;
    if (kvr_slice_eq_cstr(p, "/v1/completions"))
        route = R_COMPLETIONS;
    else if (kvr_slice_eq_cstr(p, "/v1/chat/completions"))
        route = R_CHAT;
    else if (kvr_slice_eq_cstr(p, "/v1/models"))
        route = R_MODELS;
    else if (kvr_slice_eq_cstr(p, "/health") || kvr_slice_eq_cstr(p, "/ready"))
        route = R_HEALTH;
    else if (kvr_slice_eq_cstr(p, "/metrics"))
        route = R_METRICS;
    kvr_metric_add(app.m_requests, (size_t)route, 1);
    switch (route) {
    case R_HEALTH:
        if (!get)
            goto bad_method;
        if (app.stopping && kvr_slice_eq_cstr(p, "/ready")) {
            /* draining: a load balancer that still has a connection open learns we are going */
            respond_simple_error(req, route, 503, "service_unavailable", NULL, "draining");
            return;
        }
        kvr_metric_add(app.m_responses, status_index(200), 1);
        kvr_http_respond_cstr(req, 200, "application/json", "{\"status\":\"ok\"}");
        return;
    case R_METRICS:
        if (!get)
            goto bad_method;
        kvr_metric_add(app.m_responses, status_index(200), 1);
        kvr_metrics_respond(app.metrics, req);
        return;
    case R_MODELS: {
        if (!get)
            goto bad_method;
        if (!check_auth(req, route))
            return;
        kvr_buf b;
        kvr_buf_init(&b);
        note_loop_time(kvr_mono_ms());
        fe_pool_models_json(&app.pool, kvr_mono_ms(), &b);
        respond_json(req, route, 200, &b);
        kvr_buf_free(&b);
        return;
    }
    case R_COMPLETIONS:
    case R_CHAT:
        if (!post)
            goto bad_method;
        if (!check_auth(req, route))
            return;
        if (app.stopping) {
            respond_simple_error(req, route, 503, "service_unavailable", NULL, "shutting down");
            return;
        }
        handle_generate(req, route);
        return;
    default:
        respond_simple_error(req, route, 404, "invalid_request_error", "not_found",
                             "Unknown path.");
        return;
    }
bad_method:
    respond_simple_error(req, route, 405, "invalid_request_error", "method_not_allowed",
                         "Method not allowed for this path.");
}

/* ---------- NATS: heartbeats, lease ---------- */

static void on_heartbeat(const kvr_nats_msg *m, void *data)
{
    (void)data;
    kvr_err err = {0};
    if (fe_pool_heartbeat(&app.pool, m->data, m->len, kvr_mono_ms(), &err))
        KVR_LOG_WARN_RL(10, "bad worker heartbeat", "subject=%s err=\"%s\"", m->subject, err.msg);
}

/* Loop thread. While NATS is down, heartbeats cannot arrive: workers keep their last known
 * state (requests go to them by local choice) instead of expiring one TTL after the outage
 * began; after the reconnect they get a full TTL to beat again. */
static void on_nats_state(kvr_nats *kn, kvr_nats_state st, void *data)
{
    (void)kn;
    (void)data;
    KVR_LOG_INFO("nats", "state=%s workers=%zu", kvr_nats_state_name(st), app.pool.n);
    if (st == KVR_NATS_DISCONNECTED)
        fe_pool_set_blind(&app.pool, true, kvr_mono_ms());
    else if (st == KVR_NATS_CONNECTED || st == KVR_NATS_RECONNECTED)
        fe_pool_set_blind(&app.pool, false, kvr_mono_ms());
}

static void on_tick(uv_timer_t *t)
{
    (void)t;
    int64_t now = kvr_mono_ms();
    note_loop_time(now);
    fe_pool_expire(&app.pool, now);
    if (app.nats_on && kvr_nats_connected(&app.nats)) {
        kvr_buf b;
        kvr_buf_init(&b);
        kvr_mp_write_map(&b, 3);
        kvr_mp_write_cstr(&b, "frontend_id");
        kvr_mp_write_uint(&b, app.frontend_id);
        kvr_mp_write_cstr(&b, "ts_ms");
        kvr_mp_write_uint(&b, (uint64_t)kvr_now_ms());
        kvr_mp_write_cstr(&b, "active");
        kvr_mp_write_uint(&b, app.active_streams);
        kvr_nats_publish(&app.nats, app.lease_subject, b.base, b.len);
        kvr_buf_free(&b);
    }
}

static void collect(kvr_metrics *m, void *arg)
{
    (void)m;
    (void)arg;
    kvr_metric_set(app.m_active, 0, (double)app.active_streams);
    note_loop_time(kvr_mono_ms());
    kvr_metric_set(app.m_workers, 0, (double)fe_pool_live(&app.pool, NULL, kvr_mono_ms()));
    kvr_metric_counter_set(app.m_hb_rejected, 0, app.pool.rejected);
    kvr_metric_counter_set(app.m_hb_refused_url, 0, app.pool.refused_url);
}

/* ---------- shutdown ---------- */

static void on_closed_handle(uv_handle_t *h)
{
    (void)h;
}

/* Ends every call still in flight: its upstream is cancelled, its booking freed, and its
 * client gets an error (an SSE error event and [DONE] when the stream had started). */
static void end_all_calls(const char *why)
{
    fe_call *c = app.calls;
    while (c) {
        fe_call *next = c->next;
        if (c->req) {
            kvr_metric_inc(app.m_drain_cut);
            if (c->up) {
                kvr_curl_cancel(c->up);
                c->up = NULL;
            }
            release_worker(c);
            finish_error(c, 503, "service_unavailable", "shutting_down", why);
            call_maybe_free(c); /* unless a route reply is still due */
        }
        c = next;
    }
}

/* The final close, once the last response bytes reached the kernel (or after 2 s): closing
 * a connection drops what is still queued on it, the error event and [DONE] included. */
static void on_flush_wait(uv_timer_t *t)
{
    int64_t waited = (int64_t)(uintptr_t)t->data;
    if (kvr_http_server_writes_pending(&app.http) > 0 && waited < 2000) {
        t->data = (void *)(uintptr_t)(waited + 10);
        uv_timer_start(t, on_flush_wait, 10, 0);
        return;
    }
    uv_close((uv_handle_t *)&app.drain_timer, on_closed_handle);
    uv_close((uv_handle_t *)&app.tick, on_closed_handle);
    kvr_http_server_close(&app.http, NULL);
    kvr_curl_close(&app.curl, NULL);
    if (app.nats_on)
        kvr_nats_close(&app.nats, NULL);
}

/* Closes everything; the loop then runs out of handles and main returns. */
static void shutdown_now(void)
{
    if (app.closed)
        return;
    app.closed = true;
    app.draining = false;
    KVR_LOG_INFO("stopped", "calls_left=%zu", app.n_calls);
    uv_close((uv_handle_t *)&app.sigint, on_closed_handle);
    uv_close((uv_handle_t *)&app.sigterm, on_closed_handle);
    uv_timer_stop(&app.drain_timer);
    app.drain_timer.data = (void *)(uintptr_t)0;
    uv_timer_start(&app.drain_timer, on_flush_wait, 0, 0);
}

static void on_drain_timeout(uv_timer_t *t)
{
    (void)t;
    KVR_LOG_WARN("drain timeout: ending the streams still running", "calls=%zu", app.n_calls);
    end_all_calls("the frontend is shutting down; retry the request");
    shutdown_now();
}

/* First SIGTERM/SIGINT: drain. The listener closes (no new connection), /ready and new
 * requests on open connections answer 503, and the calls in flight may finish for up to
 * --drain-timeout; NATS, the lease beat and the upstream client keep running for them. Then
 * the rest get an SSE error event and [DONE]. A second signal cuts at once (same ending). */
static void on_signal(uv_signal_t *s, int signum)
{
    (void)s;
    if (app.closed)
        return;
    if (app.stopping) {
        KVR_LOG_WARN("second signal: ending every call now", "signal=%d calls=%zu", signum,
                     app.n_calls);
        end_all_calls("the frontend is shutting down; retry the request");
        shutdown_now();
        return;
    }
    app.stopping = true;
    KVR_LOG_INFO("stopping: draining", "signal=%d calls=%zu drain_timeout_ms=%" PRId64, signum,
                 app.n_calls, app.drain_timeout_ms);
    kvr_http_server_stop_listening(&app.http);
    if (app.n_calls == 0 || app.drain_timeout_ms <= 0) {
        end_all_calls("the frontend is shutting down; retry the request");
        shutdown_now();
        return;
    }
    app.draining = true;
    uv_timer_start(&app.drain_timer, on_drain_timeout, (uint64_t)app.drain_timeout_ms, 0);
}

/* ---------- main ---------- */

static int parse_size(const char *s, int64_t *out)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || v < 0)
        return KVR_EINVAL;
    while (*end == ' ')
        end++;
    double mul = 1;
    if (!*end || !strcasecmp(end, "b"))
        mul = 1;
    else if (!strcasecmp(end, "k") || !strcasecmp(end, "kb") || !strcasecmp(end, "kib"))
        mul = 1024;
    else if (!strcasecmp(end, "m") || !strcasecmp(end, "mb") || !strcasecmp(end, "mib"))
        mul = 1024.0 * 1024;
    else if (!strcasecmp(end, "g") || !strcasecmp(end, "gb") || !strcasecmp(end, "gib"))
        mul = 1024.0 * 1024 * 1024;
    else
        return KVR_EINVAL;
    v *= mul;
    if (v < 1 || v > 1024.0 * 1024 * 1024)
        return KVR_EINVAL;
    *out = (int64_t)v;
    return 0;
}

static int register_metrics(void)
{
    kvr_metrics *m = app.metrics;
    const double *lb = kvr_metrics_latency_buckets_s;
    size_t nlb = kvr_metrics_latency_buckets_s_n;
    static const double route_b[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                     0.01,   0.025,   0.05,   0.1,   0.25,   0.5, 1};
    static const char *const mode_labels[] = {"raft", "local", NULL};
    app.m_requests = kvr_metrics_counter(m, "kvr_frontend_requests_total",
                                         "HTTP requests by route", "route", route_labels);
    app.m_responses = kvr_metrics_counter(m, "kvr_frontend_responses_total",
                                          "HTTP responses by status", "status", status_labels);
    app.m_ttft = kvr_metrics_histogram(m, "kvr_frontend_ttft_seconds",
                                       "time to first token seen by the frontend", lb, nlb, NULL,
                                       NULL);
    app.m_e2e = kvr_metrics_histogram(m, "kvr_frontend_e2e_seconds",
                                      "request arrival to last byte", lb, nlb, NULL, NULL);
    app.m_route_lat = kvr_metrics_histogram(m, "kvr_frontend_route_seconds",
                                            "route decision latency (all tries)", route_b,
                                            sizeof route_b / sizeof *route_b, NULL, NULL);
    app.m_active = kvr_metrics_gauge(m, "kvr_frontend_active_streams",
                                     "SSE streams open to clients", NULL, NULL);
    app.m_upstream_err = kvr_metrics_counter(m, "kvr_frontend_upstream_errors_total",
                                             "worker request failures", "kind", uerr_labels);
    app.m_fallback = kvr_metrics_counter(m, "kvr_frontend_route_fallback_total",
                                         "local routing decisions because no router answered",
                                         "reason", fallback_labels);
    app.m_route_tries = kvr_metrics_counter(m, "kvr_frontend_route_requests_total",
                                            "kvr.route requests sent (tries)", NULL, NULL);
    app.m_retries = kvr_metrics_counter(m, "kvr_frontend_upstream_retries_total",
                                        "requests retried on another worker", NULL, NULL);
    app.m_route_mode = kvr_metrics_counter(m, "kvr_frontend_routed_total",
                                           "requests routed by a router, by its mode", "mode",
                                           mode_labels);
    app.m_workers = kvr_metrics_gauge(m, "kvr_frontend_live_workers",
                                      "live workers seen in heartbeats", NULL, NULL);
    app.m_hb_rejected = kvr_metrics_counter(m, "kvr_frontend_heartbeats_rejected_total",
                                            "malformed worker heartbeats", NULL, NULL);
    app.m_disconnects = kvr_metrics_counter(m, "kvr_frontend_client_disconnects_total",
                                            "clients gone before the end of their request",
                                            NULL, NULL);
    app.m_hb_refused_url =
        kvr_metrics_counter(m, "kvr_frontend_heartbeats_refused_url_total",
                            "heartbeats refused: worker url outside --worker-cidr", NULL, NULL);
    app.m_stalls =
        kvr_metrics_counter(m, "kvr_frontend_loop_stalls_total",
                            "late ticks whose duration was added to worker deadlines", NULL, NULL);
    app.m_drain_cut =
        kvr_metrics_counter(m, "kvr_frontend_drain_cut_total",
                            "calls ended by shutdown (drain timeout or second signal)", NULL, NULL);
    if (!app.m_hb_refused_url || !app.m_stalls || !app.m_drain_cut)
        return KVR_EINVAL;
    if (!app.m_requests || !app.m_responses || !app.m_ttft || !app.m_e2e || !app.m_route_lat ||
        !app.m_active || !app.m_upstream_err || !app.m_fallback || !app.m_route_tries ||
        !app.m_retries || !app.m_route_mode || !app.m_workers || !app.m_hb_rejected ||
        !app.m_disconnects)
        return KVR_EINVAL;
    kvr_metrics_on_collect(m, collect, NULL);
    return kvr_metrics_add_http_server(m, "kvr_frontend_http", &app.http);
}

int main(int argc, char **argv)
{
    const char *listen = ":8000", *nats_url = NULL, *ns = NULL, *prefix = NULL,
               *mode = "kv", *api_key = getenv("KVR_API_KEY"), *max_body_s = "4MiB",
               *log_level = "info";
    kvr_nats_flags nats_sec = {0};
    uint64_t id = 1;
    int64_t block_size = 64, route_timeout = 200, route_tries = 3, max_conns = 10000,
            header_timeout = 10000, idle_timeout = 60000;
    int64_t upstream_stall = 10000, drain_timeout = 30000;
    const char *worker_cidr = "private";
    kvr_flag flags[] = {
        {"listen", KVR_FLAG_STRING, &listen, "HTTP listen address (host:port or :port)", 0},
        {"nats", KVR_FLAG_STRING, &nats_url, "NATS URL (required for kv mode and heartbeats)", 0},
        {"id", KVR_FLAG_U64, &id, "frontend id >= 1 (lease kvr.frontends.<id>)", 0},
        {"namespace", KVR_FLAG_STRING, &ns, "worker namespace (default \"default\")", 0},
        {"namespace-prefix", KVR_FLAG_STRING, &prefix, "serve namespaces P and P-<suffix>", 0},
        {"router-mode", KVR_FLAG_STRING, &mode, "kv|round-robin|random|least-loaded", 0},
        {"api-key", KVR_FLAG_STRING, &api_key, "Bearer key required from clients (env KVR_API_KEY)",
         0},
        {"block-size", KVR_FLAG_INT, &block_size, "tokens per KV block for seq hashes", 0},
        {"route-timeout", KVR_FLAG_DURATION, &route_timeout, "per-try kvr.route timeout", 0},
        {"route-tries", KVR_FLAG_INT, &route_tries, "kvr.route tries before local fallback", 0},
        {"max-body", KVR_FLAG_STRING, &max_body_s, "request body limit (default 4MiB; a 128Ki-token prompt needs well under 2MiB)", 0},
        {"max-connections", KVR_FLAG_INT, &max_conns, "client connection limit", 0},
        {"header-timeout", KVR_FLAG_DURATION, &header_timeout, "request header timeout", 0},
        {"idle-timeout", KVR_FLAG_DURATION, &idle_timeout, "keep-alive idle timeout", 0},
        {"log-level", KVR_FLAG_STRING, &log_level, "debug|info|warn|error", 0},
        {"upstream-stall-timeout", KVR_FLAG_DURATION, &upstream_stall,
         "a worker that sends no byte for this long has failed (before the first token: retried "
         "elsewhere; after: SSE error; 0: off)",
         0},
        {"drain-timeout", KVR_FLAG_DURATION, &drain_timeout,
         "on SIGTERM, how long in-flight streams may finish (then they get an SSE error and "
         "[DONE])",
         0},
        {"worker-cidr", KVR_FLAG_STRING, &worker_cidr,
         "comma-separated CIDRs a worker's heartbeat url must be in; private = loopback + RFC 1918 "
         "+ fc00::/7; any = no check",
         0},
        KVR_NATS_FLAG_ENTRIES(&nats_sec),
    };
    size_t nflags = sizeof flags / sizeof *flags;
    kvr_err err = {0};
    int rv = kvr_flags_parse(flags, nflags, argc - 1, argv + 1, NULL, 0, NULL, &err);
    if (rv == KVR_FLAGS_HELP) {
        kvr_flags_usage(stdout, "kvr-frontend", flags, nflags);
        return 0;
    }
    if (rv < 0) {
        fprintf(stderr, "kvr-frontend: %s\n", err.msg);
        return 2;
    }
    kvr_log_level lvl;
    if (kvr_log_parse_level(log_level, &lvl)) {
        fprintf(stderr, "kvr-frontend: --log-level %s: want debug|info|warn|error\n", log_level);
        return 2;
    }
    static char idbuf[24];
    snprintf(idbuf, sizeof idbuf, "%" PRIu64, id);
    kvr_log_setup("frontend", idbuf, lvl);
    signal(SIGPIPE, SIG_IGN);
    /* Each client stream holds two sockets (client + worker): raise the fd limit. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    memset(&app, 0, sizeof app);
    app.loop = uv_default_loop();
    app.frontend_id = id;
    app.api_key = api_key && api_key[0] ? api_key : NULL;
    if (fe_mode_parse(mode, &app.mode)) {
        fprintf(stderr, "kvr-frontend: --router-mode %s: want kv|round-robin|random|least-loaded\n",
                mode);
        return 2;
    }
    if (id == 0) {
        fprintf(stderr, "kvr-frontend: --id must be >= 1 (routers ignore lease 0)\n");
        return 2;
    }
    if (ns && prefix) {
        fprintf(stderr, "kvr-frontend: --namespace and --namespace-prefix are exclusive\n");
        return 2;
    }
    if (block_size < 1 || block_size > 1 << 20 || route_tries < 1 || route_tries > 100 ||
        route_timeout < 1 || max_conns < 1) {
        fprintf(stderr, "kvr-frontend: --block-size, --route-tries, --route-timeout and "
                        "--max-connections must be positive\n");
        return 2;
    }
    if (kvr_nats_flags_load(&nats_sec, &err)) {
        fprintf(stderr, "kvr-frontend: %s\n", err.msg);
        return 2;
    }
    int64_t max_body;
    if (parse_size(max_body_s, &max_body)) {
        fprintf(stderr, "kvr-frontend: --max-body %s: want a size like 16MiB\n", max_body_s);
        return 2;
    }
    if (!nats_url && app.mode == FE_MODE_KV)
        KVR_LOG_WARN("no --nats", "msg2=\"kv mode without NATS: every request is a fallback\"");
    if (upstream_stall < 0 || drain_timeout < 0) {
        fprintf(stderr,
                "kvr-frontend: --upstream-stall-timeout and --drain-timeout must be >= 0\n");
        return 2;
    }
    app.upstream_stall_ms = upstream_stall;
    app.drain_timeout_ms = drain_timeout;
    if (kvr_cidr_list_add_csv(&app.worker_cidrs, worker_cidr, &err)) {
        fprintf(stderr, "kvr-frontend: --worker-cidr: %s\n", err.msg);
        return 2;
    }
    app.block_size = (uint32_t)block_size;
    app.route_timeout_ms = route_timeout;
    app.route_tries = route_tries;
    app.boot_ms = (uint64_t)kvr_now_ms();
    app.tok = kvr_tok_byte();
    snprintf(app.lease_subject, sizeof app.lease_subject, "kvr.frontends.%" PRIu64, id);
    if (fe_pool_init(&app.pool, prefix ? prefix : ns ? ns : "default", prefix != NULL,
                     app.boot_ms ^ (id * 0x9e3779b97f4a7c15ull))) {
        fprintf(stderr, "kvr-frontend: bad namespace\n");
        return 2;
    }
    app.pool.allow = &app.worker_cidrs;

    app.metrics = kvr_metrics_new();
    kvr_http_config hc = {
        .on_request = on_request,
        .max_body_bytes = (size_t)max_body,
        .header_timeout_ms = (uint64_t)header_timeout,
        .idle_timeout_ms = (uint64_t)idle_timeout,
        .max_connections = (uint32_t)max_conns,
    };
    if (!app.metrics || kvr_http_server_init(&app.http, app.loop, &hc) || register_metrics()) {
        fprintf(stderr, "kvr-frontend: init failed\n");
        return 1;
    }
    kvr_curl_config cc = {.max_host_connections = 4096, .connect_timeout_ms = 1000};
    if (kvr_curl_init(&app.curl, app.loop, &cc, &err)) {
        fprintf(stderr, "kvr-frontend: http client: %s\n", err.msg);
        return 1;
    }
    if (nats_url) {
        kvr_nats_opts no = {.url = nats_url, .name = "kvr-frontend", .on_state = on_nats_state};
        kvr_nats_flags_fill(&nats_sec, &no);
        if (kvr_nats_init(&app.nats, app.loop, &no, &err)) {
            fprintf(stderr, "kvr-frontend: nats: %s\n", err.msg);
            return 1;
        }
        app.nats_on = true;
        if (kvr_nats_subscribe(&app.nats, "kvr.workers.>", NULL, on_heartbeat, NULL, NULL, &err)) {
            fprintf(stderr, "kvr-frontend: subscribing kvr.workers.>: %s\n", err.msg);
            return 1;
        }
    } else {
        KVR_LOG_WARN("no --nats", "msg2=\"no heartbeats: no worker will be known\"");
    }
    if (kvr_http_listen(&app.http, listen, &err)) {
        fprintf(stderr, "kvr-frontend: listen %s: %s\n", listen, err.msg);
        return 1;
    }
    uv_timer_init(app.loop, &app.tick);
    uv_timer_start(&app.tick, on_tick, 0, 1000);
    uv_timer_init(app.loop, &app.drain_timer);
    uv_signal_init(app.loop, &app.sigint);
    uv_signal_init(app.loop, &app.sigterm);
    uv_signal_start(&app.sigint, on_signal, SIGINT);
    uv_signal_start(&app.sigterm, on_signal, SIGTERM);
    char nats_red[512];
    KVR_LOG_INFO("listening", "addr=%s port=%d mode=%s namespace=%s%s nats=%s", listen,
                 kvr_http_server_port(&app.http), fe_mode_name(app.mode),
                 prefix ? prefix : ns ? ns : "default", prefix ? "-*" : "",
                 nats_url ? kvr_nats_redact_url(nats_url, nats_red, sizeof nats_red) : "none");
    uv_run(app.loop, UV_RUN_DEFAULT);
    if (app.nats_on)
        kvr_nats_global_shutdown(2000);
    fe_pool_free(&app.pool);
    kvr_metrics_free(app.metrics);
    uv_loop_close(app.loop);
    return 0;
}
