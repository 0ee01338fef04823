/* kvr-frontend: one call's life after routing: its answers to the client, the upstream
 * transfer to the chosen worker, the SSE relay, retry on another worker, and freeing. */
#include "fe_app.h"

#include "kvr_hash.h"
#include "kvr_log.h"
#include "kvr_mp.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---------- small helpers ---------- */

static const int status_codes[] = {200, 400, 401, 404, 405, 413, 499, 500, 502, 503};

size_t status_index(int status)
{
    for (size_t i = 0; i < sizeof status_codes / sizeof *status_codes; i++)
        if (status_codes[i] == status)
            return i;
    return sizeof status_codes / sizeof *status_codes;
}

void respond_json(kvr_http_req *req, int route, int status, const kvr_buf *body)
{
    kvr_metric_add(app.m_responses, status_index(status), 1);
    (void)route;
    kvr_http_respond(req, status, "application/json", body->base ? body->base : "", body->len);
}

void respond_error(kvr_http_req *req, int route, const fe_http_error *e)
{
    kvr_buf b;
    kvr_buf_init(&b);
    fe_error_json(&b, e);
    if (e->status == 503)
        kvr_http_add_header(req, "Retry-After", "1");
    respond_json(req, route, e->status, &b);
    kvr_buf_free(&b);
}

void respond_simple_error(kvr_http_req *req, int route, int status, const char *type,
                          const char *code, const char *msg)
{
    fe_http_error e;
    fe_error_set(&e, status, type, NULL, code, "%s", msg);
    respond_error(req, route, &e);
}

/* A FREE published while NATS is down, or in the first FREE_RESEND_WINDOW_MS after a
 * reconnect, may be dropped by a server on which no router has resubscribed yet (core NATS
 * keeps what is published while disconnected and sends it on reconnect, to whoever is
 * subscribed then), and its booking would live until --max-request-age: the frontend's lease
 * keeps it. FREE is idempotent (an unknown request id changes nothing), so each such FREE is
 * published again FREE_RESEND_AT1_MS and FREE_RESEND_AT2_MS after it was first published. */
#define FREE_RESEND_MAX 65536u
#define FREE_RESEND_WINDOW_MS 10000
#define FREE_RESEND_AT1_MS 2000
#define FREE_RESEND_AT2_MS 8000

struct fe_resend {
    uint8_t rid[16];
    int64_t noted_ms;
    int sent; /* re-sends done */
};

static void resend_note(const uint8_t *rid)
{
    int64_t now = kvr_mono_ms();
    bool unsure = !kvr_nats_connected(&app.nats) ||
                  (app.reconnect_ms && now - app.reconnect_ms < FREE_RESEND_WINDOW_MS);
    if (!unsure)
        return;
    if (app.n_resend == app.cap_resend) {
        uint32_t cap = app.cap_resend ? app.cap_resend * 2 : 256;
        void *q =
            cap <= FREE_RESEND_MAX ? realloc(app.resend, (size_t)cap * sizeof *app.resend) : NULL;
        if (!q) {
            KVR_LOG_WARN_RL(5, "route event re-send list full", "n=%u", app.n_resend);
            return;
        }
        app.resend = q;
        app.cap_resend = cap;
    }
    struct fe_resend *r = &app.resend[app.n_resend++];
    memcpy(r->rid, rid, sizeof r->rid);
    r->noted_ms = now;
    r->sent = 0;
}

void fe_free_resend_on_state(bool connected, int64_t now)
{
    if (connected)
        app.reconnect_ms = now;
}

void fe_free_resend_tick(int64_t now)
{
    if (!app.n_resend || !app.nats_on || !kvr_nats_connected(&app.nats))
        return;
    kvr_buf b;
    kvr_buf_init(&b);
    uint32_t sent = 0, kept = 0;
    for (uint32_t i = 0; i < app.n_resend; i++) {
        struct fe_resend r = app.resend[i];
        int64_t age = now - r.noted_ms;
        int due = age >= FREE_RESEND_AT2_MS ? 2 : age >= FREE_RESEND_AT1_MS ? 1 : 0;
        if (due > r.sent) {
            kvr_route_event ev = {.type = KVR_ROUTE_EVENT_FREE};
            memcpy(ev.request_id, r.rid, sizeof ev.request_id);
            b.len = 0;
            if (kvr_route_event_encode(&b, &ev) == 0 &&
                kvr_nats_publish(&app.nats, "kvr.route.event", b.base, b.len) == 0)
                sent++;
            r.sent = due;
        }
        if (r.sent < 2)
            app.resend[kept++] = r;
    }
    app.n_resend = kept;
    kvr_buf_free(&b);
    if (sent) {
        kvr_metric_add(app.m_free_resent, 0, sent);
        KVR_LOG_INFO("route events re-sent after a reconnect", "free=%u left=%u", sent, kept);
    }
}

void fe_free_resend_free(void)
{
    free(app.resend);
    app.resend = NULL;
    app.n_resend = app.cap_resend = 0;
}

static void publish_event(fe_call *c, kvr_route_event_type type)
{
    if (!c->booked || !app.nats_on)
        return;
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_route_event ev = {.type = type};
    memcpy(ev.request_id, c->rid, sizeof ev.request_id);
    const char *event = kvr_route_event_name(type);
    if (kvr_route_event_encode(&b, &ev) == 0) {
        /* to the leader first, as the route went (bookings_raft.c leader_events_update) */
        int rc = kvr_route_target_events_to_leader(&app.route_target, kvr_mono_ms())
                     ? kvr_nats_publish_fallback(&app.nats, KVR_ROUTE_LEADER_EVENT_SUBJECT,
                                                 KVR_ROUTE_EVENT_SUBJECT, b.base, b.len)
                     : kvr_nats_publish(&app.nats, KVR_ROUTE_EVENT_SUBJECT, b.base, b.len);
        if (type == KVR_ROUTE_EVENT_FREE)
            resend_note(c->rid);
        if (rc)
            KVR_LOG_WARN_RL(5, "route event not published", "request=%s event=%s err=\"%s\"",
                            c->rid_hex, event, kvr_strerror(rc));
    }
    kvr_buf_free(&b);
}

void fe_call_prefill_done(fe_call *c)
{
    if (c->prefill_done_sent)
        return;
    c->prefill_done_sent = true;
    publish_event(c, KVR_ROUTE_EVENT_PREFILL_DONE);
}

void worker_inflight(fe_call *c, int delta)
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
void release_worker(fe_call *c)
{
    if (c->booked)
        publish_event(c, KVR_ROUTE_EVENT_FREE);
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

void finish_error(fe_call *c, int status, const char *type, const char *code, const char *msg)
{
    if (!c->req)
        return;
    if (c->stream_started) {
        /* a forwarded body that is not SSE (a JSON answer) can only be cut short */
        if (!app.forward_body || c->up_is_sse) {
            kvr_buf_reset(&c->out);
            fe_relay_error_event(&c->out, msg);
            kvr_http_stream_write(c->req, c->out.base, c->out.len);
        }
        finish_stream(c);
    } else {
        respond_simple_error(c->req, c->route, status, type, code, msg);
        c->req = NULL;
    }
}

void call_maybe_free(fe_call *c)
{
    if (c->req || c->route_pending || c->up || c->parse_pending)
        return;
    fe_hold_detach(c);
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

void on_client_close(kvr_http_req *req)
{
    fe_call *c = req->data;
    c->client_gone = true;
    kvr_metric_inc(app.m_disconnects);
    fe_hold_client_gone(c); /* a held call leaves its queue now */
    if (c->parse_pending)
        return; /* the parse still reads the body: after_parse finishes the request */
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

void on_client_drain(kvr_http_req *req)
{
    fe_call *c = req->data;
    if (c->up && kvr_curl_paused(c->up))
        kvr_curl_resume(c->up); /* may deliver data (and even on_done) before returning */
}

/* ---------- upstream ---------- */

int on_sse_event(void *arg, kvr_slice event, kvr_slice data)
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
        fe_call_prefill_done(c);
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
    if (app.forward_body)
        return fe_forward_data(c, data, len);
    kvr_err err = {0};
    int rc = kvr_sse_feed(&c->sse, data, len, &err);
    if (rc == KVR_ELIMIT) {
        snprintf(c->up_err, sizeof c->up_err, "upstream stream: %.200s", err.msg);
        kvr_metric_add(app.m_upstream_err, UE_MALFORMED, 1);
        return 1;
    }
    return rc ? 1 : 0;
}

static void on_up_done(kvr_curl_req *r, int result, long status, const char *errmsg, kvr_slice body)
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
    if (app.forward_body && result == 0 && status == 200 && c->up_err[0] == '\0') {
        fe_forward_end(c); /* the worker's answer went through as it came */
        kvr_metric_observe(app.m_e2e, 0, (double)(kvr_mono_ns() - c->t_start_ns) / 1e9);
        release_worker(c);
        call_maybe_free(c);
        return;
    }
    if (ok || (result == 0 && status == 200 && c->got_done && c->up_err[0] == '\0')) {
        int64_t now = kvr_mono_ns();
        fe_hits_record(c);
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
        fe_worker *w = fe_pool_choose_f(&app.pool, m, c->ns, c->pool_model, kvr_mono_ms(), true,
                                        failed_id, &c->filt);
        if (!w || w->id == failed_id) /* the pool has no other worker: any served pool */
            w = fe_pool_choose_f(&app.pool, m, NULL, c->pool_model, kvr_mono_ms(), true, failed_id,
                                 &c->filt);
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

void start_upstream(fe_call *c)
{
    if (fe_disagg_start(c))
        return; /* the prefill leg first; it calls back here */
    /* the request id, the same on both legs of a disaggregated request (vLLM's proxy) */
    char xrid[64];
    snprintf(xrid, sizeof xrid, "X-Request-Id: %s", c->rid_hex);
    const char *hdrs[] = {"Content-Type: application/json", "Accept: text/event-stream", xrid,
                          NULL};
    char url[FE_URL_MAX + 32];
    size_t ul = strlen(c->url);
    while (ul && c->url[ul - 1] == '/')
        ul--;
    /* --forward body: the client's endpoint; tokens: the worker's completions with ids */
    snprintf(url, sizeof url, "%.*s%s", (int)ul, c->url,
             app.forward_body && c->route == R_CHAT ? "/v1/chat/completions" : "/v1/completions");
    c->up_is_sse = false;
    c->up_ctype[0] = '\0';
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
        .on_header = app.forward_body ? fe_forward_header : NULL,
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

/* A transfer paused because its client reads slowly shows no response bytes whether or not
 * its worker is alive, so the stall timeout (kvr_curl, which does not count paused time)
 * never fired there: a SIGSTOPped worker's stream ended only after the client had drained
 * everything the worker sent before it stopped. For a paused transfer the worker's heartbeat
 * is the sign of life: unheard for the stall timeout, its stream ends with an error event. */
void cut_hung_paused(int64_t now)
{
    if (app.upstream_stall_ms <= 0)
        return;
    for (fe_call *c = app.calls, *next; c; c = next) {
        next = c->next;
        if (!c->up || !c->have_worker || !c->req || !kvr_curl_paused(c->up) ||
            !fe_pool_worker_silent(&app.pool, c->worker_id, c->url, now, app.upstream_stall_ms))
            continue;
        kvr_curl_cancel(c->up);
        c->up = NULL;
        kvr_metric_add(app.m_upstream_err, UE_AFTER_FIRST, 1);
        KVR_LOG_WARN_RL(2, "upstream failed",
                        "request=%s worker=%" PRIu64 " first_token=1 err=\"worker %s paused by a "
                        "slow client, no heartbeat for %" PRId64 " ms\"",
                        c->rid_hex, c->worker_id, c->url, app.upstream_stall_ms);
        char msg[96];
        snprintf(msg, sizeof msg, "upstream worker %" PRIu64 " failed: stalled", c->worker_id);
        release_worker(c);
        finish_error(c, 502, "upstream_error", "worker_failed", msg);
        call_maybe_free(c);
    }
}
