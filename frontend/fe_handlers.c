/* kvr-frontend: the HTTP endpoints (completions, chat, models, health, metrics, tokenize). */
#include "fe_app.h"
#include "fe_proxy.h"
#include "fe_tokenize.h"

#include "kvr_hash.h"
#include "kvr_log.h"
#include "kvr_mp.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---------- request handling ---------- */

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

/* A call that ends before routing: its error answer, then freed. */
static void fail_early(fe_call *c, const fe_http_error *e)
{
    if (c->req) {
        respond_error(c->req, c->route, e);
        c->req = NULL;
    }
    call_maybe_free(c);
}

static void route_call(fe_call *c);
static void after_parse(fe_call *c);

/* Bodies up to this size are parsed on the loop: rendering and tokenizing them takes well
 * under a millisecond, less than the hop to the thread pool and back. */
#define FE_PARSE_INLINE_MAX 8192

static void parse_work(uv_work_t *w)
{
    fe_call *c = w->data;
    memset(&c->perr, 0, sizeof c->perr);
    c->parse_rc = fe_parse_request(c->req->body.base, c->req->body.len, c->route == R_CHAT, app.tok,
                                   &c->r, &c->perr);
}

static void parse_done(uv_work_t *w, int status)
{
    fe_call *c = w->data;
    c->parse_pending = false;
    if (status) { /* cancelled: the loop is closing */
        c->parse_rc = KVR_ECLOSED;
        fe_error_set(&c->perr, 503, "service_unavailable", NULL, "shutting_down",
                     "the frontend is shutting down; retry the request");
    }
    after_parse(c);
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
    c->req = req;
    req->data = c;
    req->on_close = on_client_close;
    req->on_drain = on_client_drain;
    /* A big body (a long chat rendered through the model's template and tokenized: ~80 ms for
     * 75k tokens) is parsed on the thread pool, not on the loop; the request (and its body)
     * stays ours until it is answered, and nothing answers it while the parse runs. */
    c->work.data = c;
    if (req->body.len > FE_PARSE_INLINE_MAX &&
        uv_queue_work(app.loop, &c->work, parse_work, parse_done) == 0) {
        c->parse_pending = true;
        return;
    }
    parse_work(&c->work);
    after_parse(c);
}

static void after_parse(fe_call *c)
{
    if (!c->req || c->client_gone) { /* gone (or cut by shutdown) while parsing */
        if (c->req) {
            kvr_metric_add(app.m_responses, status_index(499), 1);
            kvr_http_respond(c->req, 499, NULL, NULL, 0);
            c->req = NULL;
        }
        call_maybe_free(c);
        return;
    }
    if (c->parse_rc) {
        fail_early(c, &c->perr);
        return;
    }
    fe_http_error e;
    memset(&e, 0, sizeof e);
    int64_t now = kvr_mono_ms();
    note_loop_time(now);
    /* A model some live worker lists as a LoRA adapter is served by its base model's pool,
     * its blocks hashed under the adapter's seed (fe_route.c) */
    const char *base = fe_pool_lora_base(&app.pool, c->r.model, now);
    if (base && fe_pool_live(&app.pool, c->r.model, now) == 0) {
        snprintf(c->pool_model, sizeof c->pool_model, "%s", base);
        snprintf(c->lora, sizeof c->lora, "%s", c->r.model);
    } else {
        snprintf(c->pool_model, sizeof c->pool_model, "%s", c->r.model);
        c->lora[0] = 0;
    }
    c->filt.lora = c->lora;
    c->filt.mdc_sum = fe_tok_mdc_sum(c->pool_model);
    int rc = fe_pool_pick_ns_f(&app.pool, c->pool_model, now, &c->filt, c->ns);
    if ((rc == KVR_ENOTFOUND || rc == KVR_EAGAIN) && app.mode == FE_MODE_KV && app.nats_on &&
        kvr_nats_connected(&app.nats)) {
        /* No live worker of the model: its pool may be scaled to zero, which only the routers
         * know. They are asked (in the frontend's namespace, or its prefix's first one); one
         * that answers "waking" has the request held (fe_hold.c), else it gets the answer it
         * would have got before. */
        c->cold_status = rc == KVR_ENOTFOUND ? 404 : 503;
        snprintf(c->ns, sizeof c->ns, "%s", app.pool.ns);
        rc = 0;
    }
    if (rc == KVR_ENOTFOUND) {
        fe_error_set(&e, 404, "invalid_request_error", "model", "model_not_found",
                     "The model `%s` does not exist or has no live worker.", c->r.model);
        fail_early(c, &e);
        return;
    }
    if (rc) {
        fe_error_set(&e, 503, "service_unavailable", NULL, "no_worker",
                     "No worker is available; retry later.");
        fail_early(c, &e);
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
    if (c->r.remote_tok) {
        fe_remote_tokenize(c, route_call);
        return;
    }
    route_call(c);
}

/* Tokens known: the upstream body, then the route. */
static void route_call(fe_call *c)
{
    char id[48];
    snprintf(id, sizeof id, "%s-%s", c->route == R_CHAT ? "chatcmpl" : "cmpl", c->rid_hex);
    fe_relay_init(&c->relay, &c->r, id, (int64_t)time(NULL));
    /* --forward body: the client's JSON goes to the worker unchanged (ids only route) */
    if (app.forward_body ? kvr_buf_append(&c->upbody, c->req->body.base, c->req->body.len) ||
                               fe_disagg_strip(c) /* SECURITY 5d */
                         : fe_upstream_body(&c->upbody, &c->r)) {
        fe_http_error e;
        fe_error_set(&e, 500, "server_error", NULL, NULL, "out of memory");
        fail_early(c, &e);
        return;
    }
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

/* /tokenize and /detokenize: a big chat is rendered and tokenized on the thread pool, like a
 * generate call's parse; the request is answered (or, client gone, only finished) after. */
typedef struct tok_job {
    uv_work_t work;
    kvr_http_req *req;
    int route, status;
    bool detok;
    kvr_buf out;
} tok_job;

static void tok_work(uv_work_t *w)
{
    tok_job *j = w->data;
    j->status = fe_tokenize_handle(j->req->body.base, j->req->body.len, j->detok, app.tok, &j->out);
}

static void tok_done(uv_work_t *w, int status)
{
    tok_job *j = w->data;
    if (status) { /* cancelled: the loop is closing */
        kvr_buf_reset(&j->out);
        kvr_buf_append_cstr(&j->out, "{\"object\":\"error\",\"message\":\"shutting down\","
                                     "\"type\":\"ServiceUnavailableError\",\"code\":503}");
        j->status = 503;
    }
    respond_json(j->req, j->route, j->status, &j->out); /* only frees it if the client left */
    kvr_buf_free(&j->out);
    free(j);
}

static void tok_client_close(kvr_http_req *req)
{
    (void)req; /* tok_done finishes it */
}

static void handle_tokenize(kvr_http_req *req, int route, bool detok)
{
    tok_job *j = calloc(1, sizeof *j);
    if (!j) {
        respond_simple_error(req, route, 500, "server_error", NULL, "out of memory");
        return;
    }
    j->req = req;
    j->route = route;
    j->detok = detok;
    j->work.data = j;
    kvr_buf_init(&j->out);
    req->data = j;
    req->on_close = tok_client_close;
    if (req->body.len > FE_PARSE_INLINE_MAX &&
        uv_queue_work(app.loop, &j->work, tok_work, tok_done) == 0)
        return;
    tok_work(&j->work);
    tok_done(&j->work, 0);
}

void on_request(kvr_http_req *req)
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
    if (route == R_OTHER && fe_proxy_handle(req))
        return;
    if (kvr_slice_eq_cstr(p, "/tokenize") || kvr_slice_eq_cstr(p, "/detokenize")) {
        if (!post)
            goto bad_method;
        if (!check_auth(req, route))
            return;
        handle_tokenize(req, route, p.len == 11);
        return;
    }
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
        fe_hold_metrics_respond(req);
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
