/* kvr-epp: an endpoint picker (Gateway API Inference Extension) for Envoy's external processing
 * (envoy.service.ext_proc.v3.ExternalProcessor/Process, FULL_DUPLEX_STREAMED bodies).
 *
 * One libuv loop thread owns everything: the gRPC servers (epp_grpc: ext_proc port, health
 * port), the /metrics HTTP server (kvr_http), NATS (kvr_nats: route replies and worker
 * heartbeats), the worker table (fe_pool, shared with kvr-frontend) and every stream. Per
 * ext_proc stream (protocol: docs/DESIGN.md, epp/README.md):
 *   request headers (stored; a headers-only request is answered at once with a local pick)
 *   → body chunks (buffered, bounded) → at end_of_stream: parse + tokenize exactly as the
 *   frontend does (fe_parse_request) → kvr.route (route-and-reserve, per-try timeout, N tries,
 *   local least-loaded fallback) → deferred HeadersResponse (clear_route_cache, header
 *   x-gateway-destination-endpoint: ip:port[,fallbacks], dynamic_metadata envoy.lb) → the body
 *   echoed as StreamedBodyResponse chunks ≤ 62,000 bytes → response headers / body / trailers
 *   answered in order; prefill_done at the first response body chunk; free at the end of the
 *   response, or when the stream ends or is cancelled. */
#define _GNU_SOURCE /* memmem */
#include "epp_grpc.h"
#include "epp/proto/ext_proc_min.pb-c.h"
#include "epp/proto/health_min.pb-c.h"

#include "fe_core.h"
#include "fe_pool.h"
#include "fe_tokenize.h"
#include "fe_chat.h"
#include "kvr_flags.h"
#include "kvr_hash.h"
#include "kvr_heartbeat.h"
#include "kvr_http.h"
#include "kvr_json.h"
#include "kvr_log.h"
#include "kvr_metrics.h"
#include "kvr_mp.h"
#include "kvr_nats.h"
#include "kvr_nats_flags.h"
#include "route_msg.h"

#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define EPP_CHUNK 62000 /* GIE's BodyByteLimit: body replies are cut at this size */
#define EPP_DEST_HDR "x-gateway-destination-endpoint"
#define EPP_SERVED_KEY "x-gateway-destination-endpoint-served"
#define EPP_SUBSET_NS "envoy.lb.subset_hint"
#define EPP_SUBSET_KEY "x-gateway-destination-endpoint-subset"
#define EPP_MAX_FALLBACKS 8 /* --max-fallbacks bound */
#define EXT_PROC_PATH "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
#define HEALTH_PATH "/grpc.health.v1.Health/Check"

/* error_code labels: the reference EPP's errutil names (429 is its
 * InferencePoolResourceExhausted) */
enum { ERR_400 = 0, ERR_404, ERR_413, ERR_503, ERR_500, ERR_429 };
static const char *const err_labels[] = {"BadRequest",
                                         "NotFound",
                                         "PayloadTooLarge",
                                         "ServiceUnavailable",
                                         "Internal",
                                         "InferencePoolResourceExhausted",
                                         NULL};
enum { FB_TIMEOUT = 0, FB_NO_RESPONDERS, FB_ROUTER_ERROR, FB_NATS_DOWN, FB_BAD_REPLY, FB_SUBSET };
static const char *const fb_labels[] = {
    "timeout", "no_responders", "router_error", "nats_down", "bad_reply", "subset", NULL};

static struct {
    uv_loop_t *loop;
    kvr_nats nats;
    bool nats_on;
    fe_pool pool;
    kvr_cidr_list worker_cidrs;
    epp_grpc_server grpc, health;
    bool health_on;
    kvr_http_server http;
    kvr_metrics *metrics;
    uv_timer_t tick;
    uv_signal_t sigint, sigterm;
    uv_timer_t stop_timer;
    bool stopping;
    uint64_t id;
    char lease_subject[64];
    int64_t route_timeout_ms, route_tries;
    uint32_t block_size;
    int max_fallbacks;
    size_t max_body;
    uint32_t open_streams;
    /* picks in flight: kvr.route requests out (retries included). A pick that would pass
     * max_pending_picks is shed with 429 instead of queueing behind slow routers. */
    uint32_t pending_picks, max_pending_picks;
    kvr_metric *m_req, *m_err, *m_dur, *m_ready, *m_pick, *m_fallback, *m_mismatch, *m_streams,
        *m_buffered, *m_routed, *m_cancelled, *m_pending;
} E;

/* One ext_proc stream. Lives until its call is closed and no route request is out. */
typedef struct xs {
    epp_grpc_call *call; /* NULL once the call is gone */
    int state;           /* XS_* */
    char path[128];      /* the request's :path */
    kvr_buf body;        /* request body so far */
    kvr_buf deferred;    /* messages that arrived while the pick was out: [u32 len][bytes] */
    bool has_subset;
    char subset[1024]; /* comma list of ip:port (has_subset) */
    uint8_t rid[KVR_ROUTE_ID_LEN];
    char rid_hex[2 * KVR_ROUTE_ID_LEN + 1];
    fe_req req;
    /* the pool's model: the request's, or the base model of the LoRA adapter it names (then
     * lora is the adapter), as the frontend maps them (fe_handlers.c) */
    char pool_model[FE_MODEL_MAX];
    char lora[FE_MODEL_MAX];
    fe_filter filt;
    char ns[FE_NS_MAX];
    int tries;
    bool route_pending, booked, prefill_sent, response_done;
    uint64_t worker_id;
    char url[FE_URL_MAX];
    char pick[FE_URL_MAX]; /* ip:port */
    int64_t t_start_ns, t_body_ns;
} xs;

enum { XS_COLLECT = 0, XS_DECIDING, XS_PASS, XS_DONE };

static int health_status(const char *service);

/* ---------- helpers ---------- */

/* "http://10.0.0.5:8000/x" → "10.0.0.5:8000" (the gateway dials ip:port itself). */
static void url_hostport(const char *url, char *out, size_t cap)
{
    const char *p = strstr(url, "://");
    p = p ? p + 3 : url;
    size_t n = strcspn(p, "/?#");
    if (n >= cap)
        n = cap - 1;
    memcpy(out, p, n);
    out[n] = 0;
}

static bool in_subset(const xs *x, const char *hostport)
{
    if (!x->has_subset)
        return true;
    size_t hl = strlen(hostport);
    const char *p = x->subset;
    while (*p) {
        while (*p == ' ' || *p == ',')
            p++;
        size_t n = strcspn(p, ",");
        size_t m = n;
        while (m && p[m - 1] == ' ')
            m--;
        if (m == hl && memcmp(p, hostport, hl) == 0)
            return true;
        p += n;
    }
    return false;
}

static bool worker_ok(const fe_worker *w, const char *ns, const char *model, int64_t now)
{
    if (!E.pool.blind && now - w->last_seen_ms > E.pool.ttl_ms)
        return false;
    if (strcmp(w->role, "prefill") == 0)
        return false;
    if (ns && strcmp(ns, w->ns) != 0)
        return false;
    return !model || strcmp(model, w->model) == 0;
}

/* The least-loaded live worker of (ns, model) in the subset, skipping the n_ex ip:ports in ex. */
static fe_worker *local_pick(const xs *x, const char *ns, const char *model, const char **ex,
                             size_t n_ex)
{
    int64_t now = kvr_mono_ms();
    fe_worker *best = NULL;
    for (size_t i = 0; i < E.pool.n; i++) {
        fe_worker *w = &E.pool.w[i];
        if (!worker_ok(w, ns, model, now))
            continue;
        /* a worker announcing another model card than the tokenizer loaded is never chosen */
        if (x->filt.mdc_sum && x->filt.mdc_sum[0] && w->mdc_sum[0] &&
            strcmp(x->filt.mdc_sum, w->mdc_sum) != 0)
            continue;
        char hp[FE_URL_MAX];
        url_hostport(w->url, hp, sizeof hp);
        if (!in_subset(x, hp))
            continue;
        bool skip = false;
        for (size_t j = 0; j < n_ex; j++)
            if (strcmp(ex[j], hp) == 0)
                skip = true;
        if (skip)
            continue;
        if (!best ||
            w->inflight + w->active + w->waiting < best->inflight + best->active + best->waiting)
            best = w;
    }
    return best;
}

static void publish_event(xs *x, kvr_route_event_type type)
{
    if (!x->booked || !E.nats_on)
        return;
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_route_event ev = {.type = type};
    memcpy(ev.request_id, x->rid, sizeof ev.request_id);
    if (kvr_route_event_encode(&b, &ev) == 0)
        kvr_nats_publish(&E.nats, "kvr.route.event", b.base, b.len);
    kvr_buf_free(&b);
}

static void worker_inflight(xs *x, int d)
{
    if (!x->url[0])
        return;
    fe_worker *w = fe_pool_find_url(&E.pool, x->url);
    if (w && (d > 0 || w->inflight > 0))
        w->inflight = (uint32_t)((int)w->inflight + d);
}

/* Frees the booking (router and local count). Idempotent. */
static void release(xs *x)
{
    if (x->booked)
        publish_event(x, KVR_ROUTE_EVENT_FREE);
    x->booked = false;
    worker_inflight(x, -1);
    x->url[0] = 0;
}

static void xs_maybe_free(xs *x)
{
    if (x->call || x->route_pending)
        return;
    release(x);
    kvr_buf_free(&x->body);
    kvr_buf_free(&x->deferred);
    fe_req_free(&x->req);
    free(x);
}

static void send_resp(xs *x, const Envoy__Service__ExtProc__V3__ProcessingResponse *r)
{
    if (!x->call)
        return;
    size_t n = envoy__service__ext_proc__v3__processing_response__get_packed_size(r);
    uint8_t stackbuf[512];
    uint8_t *buf = n <= sizeof stackbuf ? stackbuf : malloc(n);
    if (!buf) {
        epp_grpc_finish(x->call, EPP_GRPC_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    envoy__service__ext_proc__v3__processing_response__pack(r, buf);
    int rc = epp_grpc_send(x->call, buf, n);
    if (buf != stackbuf)
        free(buf);
    if (rc)
        epp_grpc_finish(x->call, EPP_GRPC_RESOURCE_EXHAUSTED, "server buffers full");
}

static void immediate(xs *x, int status, int err_li, const char *msg)
{
    kvr_metric_add(E.m_err, (size_t)err_li, 1);
    Envoy__Type__V3__HttpStatus st = ENVOY__TYPE__V3__HTTP_STATUS__INIT;
    st.code = status;
    Envoy__Service__ExtProc__V3__ImmediateResponse ir =
        ENVOY__SERVICE__EXT_PROC__V3__IMMEDIATE_RESPONSE__INIT;
    ir.status = &st;
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_buf_append_cstr(&b, "{\"error\":{\"message\":");
    kvr_json_append_string(&b, msg, strlen(msg));
    kvr_buf_appendf(&b, ",\"code\":%d}}", status);
    ir.body.data = (uint8_t *)b.base;
    ir.body.len = b.len;
    ir.details = (char *)msg;
    Envoy__Config__Core__V3__HeaderValue hv = ENVOY__CONFIG__CORE__V3__HEADER_VALUE__INIT;
    hv.key = "content-type";
    hv.raw_value.data = (uint8_t *)"application/json";
    hv.raw_value.len = 16;
    Envoy__Config__Core__V3__HeaderValueOption hvo =
        ENVOY__CONFIG__CORE__V3__HEADER_VALUE_OPTION__INIT;
    hvo.header = &hv;
    hvo.append_action = 2;
    Envoy__Config__Core__V3__HeaderValueOption *hvos[] = {&hvo};
    Envoy__Service__ExtProc__V3__HeaderMutation hm =
        ENVOY__SERVICE__EXT_PROC__V3__HEADER_MUTATION__INIT;
    hm.n_set_headers = 1;
    hm.set_headers = hvos;
    ir.headers = &hm;
    Envoy__Service__ExtProc__V3__ProcessingResponse r =
        ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__INIT;
    r.response_case =
        ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_IMMEDIATE_RESPONSE;
    r.immediate_response = &ir;
    send_resp(x, &r);
    kvr_buf_free(&b);
    x->state = XS_DONE;
    if (x->call && x->call->half_closed_)
        epp_grpc_finish(x->call, EPP_GRPC_OK, NULL);
    KVR_LOG_DEBUG("immediate response", "request=%s status=%d msg=\"%s\"", x->rid_hex, status, msg);
}

/* An empty CommonResponse answer to a headers / body / trailers message. */
static void ack(xs *x, int which)
{
    Envoy__Service__ExtProc__V3__CommonResponse cr =
        ENVOY__SERVICE__EXT_PROC__V3__COMMON_RESPONSE__INIT;
    Envoy__Service__ExtProc__V3__HeadersResponse hr =
        ENVOY__SERVICE__EXT_PROC__V3__HEADERS_RESPONSE__INIT;
    Envoy__Service__ExtProc__V3__TrailersResponse tr =
        ENVOY__SERVICE__EXT_PROC__V3__TRAILERS_RESPONSE__INIT;
    Envoy__Service__ExtProc__V3__ProcessingResponse r =
        ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__INIT;
    hr.response = &cr;
    r.response_case = which;
    switch (which) {
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_RESPONSE_HEADERS:
        r.response_headers = &hr;
        break;
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_TRAILERS:
        r.request_trailers = &tr;
        break;
    default:
        r.response_trailers = &tr;
        break;
    }
    send_resp(x, &r);
}

/* Echoes body as StreamedBodyResponse chunks of at most EPP_CHUNK bytes (request or response
 * direction); the last carries eos. An empty body still sends one (empty) chunk. */
static void echo_body(xs *x, bool request, const uint8_t *data, size_t len, bool eos)
{
    size_t off = 0;
    do {
        size_t n = len - off > EPP_CHUNK ? EPP_CHUNK : len - off;
        Envoy__Service__ExtProc__V3__StreamedBodyResponse sb =
            ENVOY__SERVICE__EXT_PROC__V3__STREAMED_BODY_RESPONSE__INIT;
        sb.body.data = (uint8_t *)data + off;
        sb.body.len = n;
        sb.end_of_stream = eos && off + n == len;
        Envoy__Service__ExtProc__V3__BodyMutation bm =
            ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__INIT;
        bm.mutation_case = ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__MUTATION_STREAMED_RESPONSE;
        bm.streamed_response = &sb;
        Envoy__Service__ExtProc__V3__CommonResponse cr =
            ENVOY__SERVICE__EXT_PROC__V3__COMMON_RESPONSE__INIT;
        cr.body_mutation = &bm;
        Envoy__Service__ExtProc__V3__BodyResponse br =
            ENVOY__SERVICE__EXT_PROC__V3__BODY_RESPONSE__INIT;
        br.response = &cr;
        Envoy__Service__ExtProc__V3__ProcessingResponse r =
            ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__INIT;
        if (request) {
            r.response_case =
                ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_BODY;
            r.request_body = &br;
        } else {
            r.response_case =
                ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_RESPONSE_BODY;
            r.response_body = &br;
        }
        send_resp(x, &r);
        off += n;
    } while (off < len);
}

/* The deferred request HeadersResponse naming dest, with the envoy.lb metadata. */
static void send_destination(xs *x, const char *dest)
{
    Envoy__Config__Core__V3__HeaderValue hv = ENVOY__CONFIG__CORE__V3__HEADER_VALUE__INIT;
    hv.key = EPP_DEST_HDR;
    hv.raw_value.data = (uint8_t *)dest;
    hv.raw_value.len = strlen(dest);
    Envoy__Config__Core__V3__HeaderValueOption hvo =
        ENVOY__CONFIG__CORE__V3__HEADER_VALUE_OPTION__INIT;
    hvo.header = &hv;
    hvo.append_action = 2; /* OVERWRITE_IF_EXISTS_OR_ADD: a client cannot pre-set it */
    Envoy__Config__Core__V3__HeaderValueOption *hvos[] = {&hvo};
    Envoy__Service__ExtProc__V3__HeaderMutation hm =
        ENVOY__SERVICE__EXT_PROC__V3__HEADER_MUTATION__INIT;
    hm.n_set_headers = 1;
    hm.set_headers = hvos;
    Envoy__Service__ExtProc__V3__CommonResponse cr =
        ENVOY__SERVICE__EXT_PROC__V3__COMMON_RESPONSE__INIT;
    cr.header_mutation = &hm;
    cr.clear_route_cache = true;
    Envoy__Service__ExtProc__V3__HeadersResponse hr =
        ENVOY__SERVICE__EXT_PROC__V3__HEADERS_RESPONSE__INIT;
    hr.response = &cr;
    /* dynamic_metadata {"envoy.lb": {"x-gateway-destination-endpoint": dest}} */
    Google__Protobuf__Value sv = GOOGLE__PROTOBUF__VALUE__INIT;
    sv.kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE;
    sv.string_value = (char *)dest;
    Google__Protobuf__Struct__FieldsEntry ie = GOOGLE__PROTOBUF__STRUCT__FIELDS_ENTRY__INIT;
    ie.key = EPP_DEST_HDR;
    ie.value = &sv;
    Google__Protobuf__Struct__FieldsEntry *ies[] = {&ie};
    Google__Protobuf__Struct inner = GOOGLE__PROTOBUF__STRUCT__INIT;
    inner.n_fields = 1;
    inner.fields = ies;
    Google__Protobuf__Value iv = GOOGLE__PROTOBUF__VALUE__INIT;
    iv.kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE;
    iv.struct_value = &inner;
    Google__Protobuf__Struct__FieldsEntry oe = GOOGLE__PROTOBUF__STRUCT__FIELDS_ENTRY__INIT;
    oe.key = "envoy.lb";
    oe.value = &iv;
    Google__Protobuf__Struct__FieldsEntry *oes[] = {&oe};
    Google__Protobuf__Struct outer = GOOGLE__PROTOBUF__STRUCT__INIT;
    outer.n_fields = 1;
    outer.fields = oes;
    Envoy__Service__ExtProc__V3__ProcessingResponse r =
        ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__INIT;
    r.response_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_HEADERS;
    r.request_headers = &hr;
    r.dynamic_metadata = &outer;
    send_resp(x, &r);
}

/* dest = pick[,fallback…]: the next least-loaded live workers of the model, in the subset. */
static void build_dest(xs *x, const char *model, char *dest, size_t cap)
{
    snprintf(dest, cap, "%s", x->pick);
    char hps[EPP_MAX_FALLBACKS + 1][FE_URL_MAX];
    const char *ex[EPP_MAX_FALLBACKS + 1];
    size_t n_ex = 0;
    ex[n_ex++] = x->pick;
    for (int i = 0; i < E.max_fallbacks; i++) {
        fe_worker *w = local_pick(x, x->ns[0] ? x->ns : NULL, model, ex, n_ex);
        if (!w)
            break;
        char hp[FE_URL_MAX];
        url_hostport(w->url, hp, sizeof hp);
        size_t l = strlen(dest);
        if (l + strlen(hp) + 2 > cap)
            break;
        snprintf(dest + l, cap - l, ",%s", hp);
        snprintf(hps[n_ex], sizeof hps[n_ex], "%s", hp);
        ex[n_ex] = hps[n_ex];
        n_ex++;
    }
}

static void handle_msg(xs *x, const uint8_t *msg, size_t len);

/* The pick is made: answer the request headers, echo the body, then the messages that waited. */
static void decided(xs *x)
{
    char dest[3 * FE_URL_MAX];
    build_dest(x, x->pool_model[0] ? x->pool_model : NULL, dest, sizeof dest);
    if (x->t_body_ns)
        kvr_metric_observe(E.m_pick, 0, (double)(kvr_mono_ns() - x->t_body_ns) / 1e9);
    send_destination(x, dest);
    KVR_LOG_DEBUG("picked", "request=%s dest=%s", x->rid_hex, dest);
    if (x->state == XS_DECIDING) /* a body came (GET has none) */
        echo_body(x, true, (const uint8_t *)x->body.base, x->body.len, true);
    kvr_buf_free(&x->body);
    x->state = XS_PASS;
    /* messages that arrived while the route request was out, in order */
    kvr_buf d = x->deferred;
    kvr_buf_init(&x->deferred);
    size_t off = 0;
    while (off + 4 <= d.len && x->call) {
        uint32_t n;
        memcpy(&n, d.base + off, 4);
        handle_msg(x, (const uint8_t *)d.base + off + 4, n);
        off += 4 + n;
    }
    kvr_buf_free(&d);
    /* the gateway ended its side while the pick was out: the call ends after the answers */
    if (x->call && x->call->half_closed_)
        epp_grpc_finish(x->call, EPP_GRPC_OK, NULL);
    else if (x->call)
        epp_grpc_flush(x->call);
}

static void choose_local(xs *x, int fb)
{
    if (fb >= 0)
        kvr_metric_add(E.m_fallback, (size_t)fb, 1);
    fe_worker *w =
        local_pick(x, x->ns[0] ? x->ns : NULL, x->pool_model[0] ? x->pool_model : NULL, NULL, 0);
    if (!w) {
        immediate(x, 503, ERR_503,
                  x->has_subset ? "no live worker in the endpoint subset" : "no live worker");
        return;
    }
    snprintf(x->url, sizeof x->url, "%s", w->url);
    url_hostport(w->url, x->pick, sizeof x->pick);
    x->worker_id = w->id;
    worker_inflight(x, +1);
    decided(x);
}

static void send_route(xs *x);

static void on_route_reply(int status, const char *data, size_t len, void *cbdata)
{
    xs *x = cbdata;
    x->route_pending = false;
    E.pending_picks--;
    if (!x->call || x->state != XS_DECIDING) {
        if (status == 0)
            x->booked = true; /* a router may have booked it: free it */
        xs_maybe_free(x);
        return;
    }
    if (status == KVR_ETIMEDOUT && x->tries < E.route_tries) {
        send_route(x);
        return;
    }
    if (status != 0 && status != KVR_NATS_NO_RESPONDERS)
        x->booked = true; /* a slow router may still book it (fe_route.c says why) */
    if (status != 0) {
        choose_local(x, status == KVR_ETIMEDOUT            ? FB_TIMEOUT
                        : status == KVR_NATS_NO_RESPONDERS ? FB_NO_RESPONDERS
                                                           : FB_NATS_DOWN);
        return;
    }
    kvr_route_reply rep;
    kvr_err err = {0};
    if (kvr_route_reply_decode(data, len, &rep, &err)) {
        x->booked = true;
        choose_local(x, FB_BAD_REPLY);
        return;
    }
    if (!rep.ok || rep.url.len >= sizeof x->url) {
        if (rep.ok)
            x->booked = true;
        choose_local(x, rep.ok ? FB_BAD_REPLY : FB_ROUTER_ERROR);
        return;
    }
    x->booked = true;
    memcpy(x->url, rep.url.base, rep.url.len);
    x->url[rep.url.len] = 0;
    url_hostport(x->url, x->pick, sizeof x->pick);
    x->worker_id = rep.worker_id;
    if (!in_subset(x, x->pick)) {
        /* the routers do not know the gateway's subset: their pick outside it is given back */
        release(x);
        choose_local(x, FB_SUBSET);
        return;
    }
    kvr_metric_inc(E.m_routed);
    worker_inflight(x, +1);
    decided(x);
}

/* The block size live workers of (ns, model) announce, else --block-size (as the frontend). */
static uint32_t block_size_of(const char *ns, const char *model)
{
    int64_t now = kvr_mono_ms();
    for (size_t i = 0; i < E.pool.n; i++) {
        const fe_worker *w = &E.pool.w[i];
        if (w->block_size && !strcmp(w->ns, ns) && !strcmp(w->model, model) &&
            (E.pool.blind || now - w->last_seen_ms <= E.pool.ttl_ms))
            return w->block_size;
    }
    return E.block_size;
}

static void send_route(xs *x)
{
    const char *model = x->pool_model;
    size_t nt = kvr_tok_count(&x->req.tokens);
    uint32_t bs = block_size_of(x->ns, model);
    size_t nb = bs ? nt / bs : 0;
    uint64_t *hs = nb ? malloc(nb * sizeof *hs) : NULL;
    if (nb && !hs) {
        choose_local(x, FB_ROUTER_ERROR);
        return;
    }
    if (nb)
        nb = kvr_hash_seq_seeded(kvr_tok_ids(&x->req.tokens), nt, bs, false, 0,
                                 kvr_hash_lora_seed(x->lora, strlen(x->lora)), hs, nb);
    kvr_route_req rq = {.frontend_id = E.id,
                        .model = {model, strlen(model)},
                        .lora = {x->lora, strlen(x->lora)},
                        .mdc_sum = {x->filt.mdc_sum, strlen(x->filt.mdc_sum)},
                        .ns = {x->ns, strlen(x->ns)},
                        .tokens = (uint32_t)nt,
                        .seq_hashes = hs,
                        .n_hashes = nb};
    memcpy(rq.request_id, x->rid, sizeof rq.request_id);
    kvr_buf b;
    kvr_buf_init(&b);
    int rc = kvr_route_req_encode(&b, &rq);
    free(hs);
    x->tries++;
    if (!rc)
        rc = kvr_nats_request(&E.nats, "kvr.route", b.base, b.len, (uint32_t)E.route_timeout_ms,
                              on_route_reply, x);
    kvr_buf_free(&b);
    if (rc) {
        choose_local(x, FB_NATS_DOWN);
        return;
    }
    x->route_pending = true;
    E.pending_picks++;
}

/* The request body is complete: parse, tokenize, pick. */
static void start_pick(xs *x)
{
    x->state = XS_DECIDING;
    x->t_body_ns = kvr_mono_ns();
    bool is_chat = strstr(x->path, "/chat/") != NULL;
    if (!strstr(x->path, "completions"))
        is_chat = memmem(x->body.base, x->body.len, "\"messages\"", 10) != NULL;
    fe_http_error e;
    memset(&e, 0, sizeof e);
    if (fe_parse_request(x->body.base, x->body.len, is_chat, kvr_tok_byte(), &x->req, &e)) {
        immediate(x, 400, ERR_400, e.message[0] ? e.message : "bad request body");
        return;
    }
    int64_t now = kvr_mono_ms();
    const char *base = fe_pool_lora_base(&E.pool, x->req.model, now);
    if (base && fe_pool_live(&E.pool, x->req.model, now) == 0) {
        snprintf(x->pool_model, sizeof x->pool_model, "%s", base);
        snprintf(x->lora, sizeof x->lora, "%s", x->req.model);
    } else {
        snprintf(x->pool_model, sizeof x->pool_model, "%s", x->req.model);
        x->lora[0] = 0;
    }
    x->filt.lora = x->lora;
    x->filt.mdc_sum = fe_tok_mdc_sum(x->pool_model);
    int rc = fe_pool_pick_ns_f(&E.pool, x->pool_model, now, &x->filt, x->ns);
    if (rc == KVR_ENOTFOUND) { /* workers are live, none of this model: the frontend's 404 */
        immediate(x, 404, ERR_404, "model not served by any live worker");
        return;
    }
    if (rc) {
        immediate(x, 503, ERR_503, "no live worker");
        return;
    }
    if (!E.nats_on || !kvr_nats_connected(&E.nats)) {
        choose_local(x, FB_NATS_DOWN);
        return;
    }
    if (E.pending_picks >= E.max_pending_picks) {
        /* shed now rather than queue: the gateway retries elsewhere or returns 429 at once */
        immediate(x, 429, ERR_429, "too many picks in flight");
        return;
    }
    send_route(x);
}

/* Reads the subset hint and the served endpoint from metadata_context. */
static void read_metadata(xs *x, const Envoy__Config__Core__V3__Metadata *md)
{
    if (!md)
        return;
    for (size_t i = 0; i < md->n_filter_metadata; i++) {
        const Envoy__Config__Core__V3__Metadata__FilterMetadataEntry *fe = md->filter_metadata[i];
        if (!fe->key || !fe->value)
            continue;
        bool subset = strcmp(fe->key, EPP_SUBSET_NS) == 0;
        bool lb = strcmp(fe->key, "envoy.lb") == 0;
        if (!subset && !lb)
            continue;
        for (size_t j = 0; j < fe->value->n_fields; j++) {
            const Google__Protobuf__Struct__FieldsEntry *f = fe->value->fields[j];
            if (!f->key || !f->value)
                continue;
            if (subset && strcmp(f->key, EPP_SUBSET_KEY) == 0) {
                x->has_subset = true;
                x->subset[0] = 0;
                size_t l = 0;
                if (f->value->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE) {
                    snprintf(x->subset, sizeof x->subset, "%s", f->value->string_value);
                } else if (f->value->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_LIST_VALUE &&
                           f->value->list_value) {
                    const Google__Protobuf__ListValue *lv = f->value->list_value;
                    for (size_t k = 0; k < lv->n_values; k++) {
                        if (lv->values[k]->kind_case != GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE)
                            continue;
                        int w = snprintf(x->subset + l, sizeof x->subset - l, "%s%s", l ? "," : "",
                                         lv->values[k]->string_value);
                        if (w < 0 || (size_t)w >= sizeof x->subset - l)
                            break;
                        l += (size_t)w;
                    }
                }
            } else if (lb && strcmp(f->key, EPP_SERVED_KEY) == 0 &&
                       f->value->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE &&
                       x->pick[0] && strcmp(f->value->string_value, x->pick) != 0) {
                kvr_metric_inc(E.m_mismatch);
                KVR_LOG_INFO("served endpoint differs from the pick",
                             "request=%s pick=%s served=%s", x->rid_hex, x->pick,
                             f->value->string_value);
            }
        }
    }
}

static void end_response(xs *x)
{
    if (x->response_done)
        return;
    x->response_done = true;
    release(x);
    kvr_metric_observe(E.m_dur, 0, (double)(kvr_mono_ns() - x->t_start_ns) / 1e9);
}

static void handle_msg(xs *x, const uint8_t *msg, size_t len)
{
    if (x->state == XS_DONE)
        return;
    if (x->state == XS_DECIDING) {
        uint32_t n = (uint32_t)len;
        if (x->deferred.len + len > E.max_body + (1u << 20) ||
            kvr_buf_append(&x->deferred, &n, 4) || kvr_buf_append(&x->deferred, msg, len))
            epp_grpc_finish(x->call, EPP_GRPC_RESOURCE_EXHAUSTED, "too much data while picking");
        return;
    }
    Envoy__Service__ExtProc__V3__ProcessingRequest *r =
        envoy__service__ext_proc__v3__processing_request__unpack(NULL, len, msg);
    if (!r) {
        epp_grpc_finish(x->call, EPP_GRPC_INVALID_ARGUMENT, "undecodable ProcessingRequest");
        return;
    }
    read_metadata(x, r->metadata_context);
    switch (r->request_case) {
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_HEADERS: {
        kvr_metric_inc(E.m_req);
        const Envoy__Service__ExtProc__V3__HttpHeaders *h = r->request_headers;
        if (h->headers)
            for (size_t i = 0; i < h->headers->n_headers; i++) {
                const Envoy__Config__Core__V3__HeaderValue *hv = h->headers->headers[i];
                if (hv->key && strcmp(hv->key, ":path") == 0) {
                    const char *v =
                        hv->raw_value.len ? (const char *)hv->raw_value.data : hv->value;
                    size_t vl = hv->raw_value.len ? hv->raw_value.len : strlen(hv->value);
                    if (vl >= sizeof x->path)
                        vl = sizeof x->path - 1;
                    memcpy(x->path, v, vl);
                    x->path[vl] = 0;
                }
            }
        if (h->end_of_stream) { /* no body (GET /v1/models …): any live worker, nothing booked */
            x->state = XS_PASS;
            fe_worker *w = local_pick(x, NULL, NULL, NULL, 0);
            if (!w) {
                immediate(x, 503, ERR_503, "no live worker");
                break;
            }
            url_hostport(w->url, x->pick, sizeof x->pick);
            x->state = XS_PASS;
            decided(x);
        }
        break;
    }
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_BODY: {
        const Envoy__Service__ExtProc__V3__HttpBody *b = r->request_body;
        if (x->state != XS_COLLECT) { /* body after the pick: Envoy never does that; echo */
            echo_body(x, true, b->body.data, b->body.len, b->end_of_stream);
            break;
        }
        if (x->body.len + b->body.len > E.max_body) {
            immediate(x, 413, ERR_413, "request body too large");
            break;
        }
        kvr_buf_append(&x->body, b->body.data, b->body.len);
        if (b->end_of_stream)
            start_pick(x);
        break;
    }
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_TRAILERS:
        if (x->state == XS_COLLECT) {
            /* the body ended with trailers: pick now, answer the trailers after */
            uint32_t n = (uint32_t)len;
            kvr_buf_append(&x->deferred, &n, 4);
            kvr_buf_append(&x->deferred, msg, len);
            start_pick(x);
            break;
        }
        ack(x, ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_TRAILERS);
        break;
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_HEADERS:
        ack(x, ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_RESPONSE_HEADERS);
        if (r->response_headers->end_of_stream)
            end_response(x);
        break;
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_BODY: {
        const Envoy__Service__ExtProc__V3__HttpBody *b = r->response_body;
        if (!x->prefill_sent && (b->body.len || b->end_of_stream)) {
            x->prefill_sent = true;
            publish_event(x, KVR_ROUTE_EVENT_PREFILL_DONE);
        }
        echo_body(x, false, b->body.data, b->body.len, b->end_of_stream);
        if (b->end_of_stream)
            end_response(x);
        break;
    }
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_TRAILERS:
        ack(x, ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_RESPONSE_TRAILERS);
        end_response(x);
        break;
    default:
        break;
    }
    envoy__service__ext_proc__v3__processing_request__free_unpacked(r, NULL);
}

/* ---------- gRPC handlers ---------- */

static char health_marker;

static int on_call(epp_grpc_call *call, const char *path)
{
    if (strcmp(path, HEALTH_PATH) == 0) {
        call->data = &health_marker;
        return 0;
    }
    if (call->server != &E.grpc || strcmp(path, EXT_PROC_PATH) != 0)
        return EPP_GRPC_UNIMPLEMENTED;
    xs *x = calloc(1, sizeof *x);
    if (!x)
        return EPP_GRPC_RESOURCE_EXHAUSTED;
    x->call = call;
    kvr_buf_init(&x->body);
    kvr_buf_init(&x->deferred);
    fe_req_init(&x->req);
    uv_random(NULL, NULL, x->rid, sizeof x->rid, 0, NULL);
    for (size_t i = 0; i < sizeof x->rid; i++)
        snprintf(x->rid_hex + 2 * i, 3, "%02x", x->rid[i]);
    x->t_start_ns = kvr_mono_ns();
    call->data = x;
    E.open_streams++;
    return 0;
}

static void on_message(epp_grpc_call *call, const uint8_t *msg, size_t len)
{
    if (call->data == &health_marker) {
        Grpc__Health__V1__HealthCheckRequest *rq =
            grpc__health__v1__health_check_request__unpack(NULL, len, msg);
        if (!rq) {
            epp_grpc_finish(call, EPP_GRPC_INVALID_ARGUMENT, "undecodable HealthCheckRequest");
            return;
        }
        int st = health_status(rq->service ? rq->service : "");
        grpc__health__v1__health_check_request__free_unpacked(rq, NULL);
        if (st < 0) {
            epp_grpc_finish(call, EPP_GRPC_NOT_FOUND, "unknown service");
            return;
        }
        Grpc__Health__V1__HealthCheckResponse rs = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
        rs.status = st;
        uint8_t buf[16];
        size_t n = grpc__health__v1__health_check_response__pack(&rs, buf);
        epp_grpc_send(call, buf, n);
        epp_grpc_finish(call, EPP_GRPC_OK, NULL);
        return;
    }
    handle_msg(call->data, msg, len);
}

static void on_half_close(epp_grpc_call *call)
{
    if (call->data == &health_marker)
        return;
    xs *x = call->data;
    /* Envoy ends its side when the HTTP stream is done; a pick still out is answered first */
    if (x->state != XS_DECIDING)
        epp_grpc_finish(call, EPP_GRPC_OK, NULL);
}

static void on_close(epp_grpc_call *call, bool finished)
{
    if (call->data == &health_marker)
        return;
    xs *x = call->data;
    if (!finished || !x->response_done)
        kvr_metric_inc(E.m_cancelled);
    E.open_streams--;
    x->call = NULL;
    release(x); /* stream ended or cancelled: the booking goes */
    xs_maybe_free(x);
}

/* ---------- health, metrics, NATS ---------- */

/* SERVING 1 / NOT_SERVING 2, or -1 for an unknown service. Ready = NATS (the routers' bus)
 * reachable; live workers are not required (a pool may be scaling from zero: requests then
 * get 503 from the picker, not from a dead EPP). */
static int health_status(const char *s)
{
    if (!s[0] || strcmp(s, "liveness") == 0)
        return 1;
    if (strcmp(s, "readiness") == 0 || strcmp(s, "inference-extension") == 0 ||
        strcmp(s, "envoy.service.ext_proc.v3.ExternalProcessor") == 0)
        return !E.nats_on || kvr_nats_connected(&E.nats) ? 1 : 2;
    return -1;
}

static void on_http(kvr_http_req *req)
{
    if (kvr_slice_eq_cstr(req->path, "/metrics")) {
        kvr_metrics_respond(E.metrics, req);
        return;
    }
    kvr_http_respond_cstr(req, 404, "text/plain", "not found\n");
}

static void collect(kvr_metrics *m, void *arg)
{
    (void)m;
    (void)arg;
    kvr_metric_set(E.m_ready, 0, (double)fe_pool_live(&E.pool, NULL, kvr_mono_ms()));
    kvr_metric_set(E.m_streams, 0, (double)E.open_streams);
    kvr_metric_set(E.m_buffered, 0, (double)E.grpc.stats.buffered);
    kvr_metric_set(E.m_pending, 0, (double)E.pending_picks);
}

static int register_metrics(void)
{
    kvr_metrics *m = E.metrics;
    static const double pick_b[] = {0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.0025, 0.005,
                                    0.01,    0.025,  0.05,   0.1,    0.25,  1};
    E.m_req = kvr_metrics_counter(m, "inference_objective_request_total",
                                  "requests seen (request headers)", NULL, NULL);
    E.m_err = kvr_metrics_counter(m, "inference_objective_request_error_total",
                                  "requests answered with an error", "error_code", err_labels);
    E.m_dur = kvr_metrics_histogram(
        m, "inference_objective_request_duration_seconds", "request headers to end of response",
        kvr_metrics_latency_buckets_s, kvr_metrics_latency_buckets_s_n, NULL, NULL);
    E.m_ready =
        kvr_metrics_gauge(m, "inference_pool_ready_pods", "live workers (heartbeats)", NULL, NULL);
    E.m_pick = kvr_metrics_histogram(m, "kvr_epp_pick_seconds",
                                     "last request body chunk in to destination out", pick_b,
                                     sizeof pick_b / sizeof *pick_b, NULL, NULL);
    E.m_fallback = kvr_metrics_counter(m, "kvr_epp_route_fallback_total",
                                       "local picks because no router answered (or subset)",
                                       "reason", fb_labels);
    E.m_routed =
        kvr_metrics_counter(m, "kvr_epp_routed_total", "picks made by a router", NULL, NULL);
    E.m_mismatch =
        kvr_metrics_counter(m, "kvr_epp_served_mismatch_total",
                            "responses served by another endpoint than the pick", NULL, NULL);
    E.m_cancelled =
        kvr_metrics_counter(m, "kvr_epp_streams_cancelled_total",
                            "ext_proc streams that ended before their response", NULL, NULL);
    E.m_streams = kvr_metrics_gauge(m, "kvr_epp_open_streams", "ext_proc streams open", NULL, NULL);
    E.m_buffered = kvr_metrics_gauge(m, "kvr_epp_grpc_buffered_bytes",
                                     "bytes held by the gRPC layer", NULL, NULL);
    E.m_pending = kvr_metrics_gauge(m, "kvr_epp_pending_picks",
                                    "kvr.route requests out (picks in flight)", NULL, NULL);
    if (!E.m_req || !E.m_err || !E.m_dur || !E.m_ready || !E.m_pick || !E.m_fallback ||
        !E.m_routed || !E.m_mismatch || !E.m_cancelled || !E.m_streams || !E.m_buffered ||
        !E.m_pending)
        return KVR_EINVAL;
    kvr_metrics_on_collect(m, collect, NULL);
    return 0;
}

static void on_heartbeat(const kvr_nats_msg *m, void *data)
{
    (void)data;
    kvr_err err = {0};
    if (fe_pool_heartbeat(&E.pool, m->data, m->len, kvr_mono_ms(), &err)) {
        KVR_LOG_WARN_RL(10, "bad worker heartbeat", "subject=%s err=\"%s\"", m->subject, err.msg);
        return;
    }
    /* a request naming one of its adapters tokenizes as its base model does (as the frontend) */
    kvr_heartbeat hb;
    char ns[FE_NS_MAX];
    if (kvr_heartbeat_decode(m->data, m->len, &hb) != 0 || !hb.n_loras || hb.ns.len >= sizeof ns)
        return;
    memcpy(ns, hb.ns.base, hb.ns.len);
    ns[hb.ns.len] = 0;
    fe_worker *w = fe_pool_find(&E.pool, ns, hb.id);
    for (uint32_t i = 0; w && i < hb.n_loras; i++)
        fe_tok_note_lora(hb.loras[i].base, hb.loras[i].len, w->model);
}

static void on_nats_state(kvr_nats *kn, kvr_nats_state st, void *data)
{
    (void)kn;
    (void)data;
    KVR_LOG_INFO("nats", "state=%s workers=%zu", kvr_nats_state_name(st), E.pool.n);
    if (st == KVR_NATS_DISCONNECTED)
        fe_pool_set_blind(&E.pool, true, kvr_mono_ms());
    else if (st == KVR_NATS_CONNECTED || st == KVR_NATS_RECONNECTED)
        fe_pool_set_blind(&E.pool, false, kvr_mono_ms());
}

static void on_tick(uv_timer_t *t)
{
    (void)t;
    fe_pool_expire(&E.pool, kvr_mono_ms());
    if (E.nats_on && kvr_nats_connected(&E.nats)) {
        /* the lease routers free a dead picker's bookings by (kvr.frontends.<id>) */
        kvr_buf b;
        kvr_buf_init(&b);
        kvr_mp_write_map(&b, 3);
        kvr_mp_write_cstr(&b, "frontend_id");
        kvr_mp_write_uint(&b, E.id);
        kvr_mp_write_cstr(&b, "ts_ms");
        kvr_mp_write_uint(&b, (uint64_t)kvr_now_ms());
        kvr_mp_write_cstr(&b, "active");
        kvr_mp_write_uint(&b, E.open_streams);
        kvr_nats_publish(&E.nats, E.lease_subject, b.base, b.len);
        kvr_buf_free(&b);
    }
}

static void on_stop_timer(uv_timer_t *t)
{
    (void)t;
    uv_stop(E.loop);
}

/* First signal: every connection is closed, so every open stream ends as if cancelled and its
 * booking's "free" is published (routers would otherwise hold it until the lease expires,
 * 10 s); the loop runs 300 ms more for NATS to send them. A second signal stops at once. */
static void on_signal(uv_signal_t *s, int sig)
{
    (void)s;
    if (E.stopping) {
        uv_stop(E.loop);
        return;
    }
    E.stopping = true;
    KVR_LOG_INFO("signal: stopping", "signal=%d open_streams=%u", sig, E.open_streams);
    epp_grpc_close(&E.grpc);
    if (E.health_on)
        epp_grpc_close(&E.health);
    uv_timer_init(E.loop, &E.stop_timer);
    uv_timer_start(&E.stop_timer, on_stop_timer, E.nats_on ? 300 : 0, 0);
}

int main(int argc, char **argv)
{
    const char *nats_url = NULL, *ns = NULL, *prefix = NULL, *log_level = "info",
               *worker_cidr = "private", *pool_name = "", *pool_ns = "", *cert_path = "";
    const char *bind_host = "";
    kvr_nats_flags nats_sec = {0};
    int64_t grpc_port = 9002, health_port = 9003, metrics_port = 9090, block_size = 64,
            route_timeout = 200, route_tries = 3, max_body = 4 << 20, max_fallbacks = 2,
            max_pending = 1024;
    uint64_t id = 1;
    bool secure = true;
    kvr_flag flags[] = {
        {"grpc-port", KVR_FLAG_INT, &grpc_port, "ext_proc gRPC port (0: any)", 0},
        {"grpc-health-port", KVR_FLAG_INT, &health_port, "gRPC health port (-1: off)", 0},
        {"metrics-port", KVR_FLAG_INT, &metrics_port, "Prometheus /metrics port (-1: off)", 0},
        {"bind", KVR_FLAG_STRING, &bind_host, "listen host (default all)", 0},
        {"secure-serving", KVR_FLAG_BOOL, &secure,
         "TLS (ALPN h2) on the ext_proc port; false: plaintext h2c", 0},
        {"cert-path", KVR_FLAG_STRING, &cert_path,
         "directory with tls.crt and tls.key (default: a self-signed certificate made at start)",
         0},
        {"pool-name", KVR_FLAG_STRING, &pool_name, "InferencePool name (logged)", 0},
        {"pool-namespace", KVR_FLAG_STRING, &pool_ns, "InferencePool namespace (logged)", 0},
        {"nats", KVR_FLAG_STRING, &nats_url, "NATS URL (routers and heartbeats)", 0},
        {"id", KVR_FLAG_U64, &id, "lease id >= 1 (kvr.frontends.<id>; distinct from frontends)", 0},
        {"namespace", KVR_FLAG_STRING, &ns, "worker namespace (default \"default\")", 0},
        {"namespace-prefix", KVR_FLAG_STRING, &prefix, "serve namespaces P and P-<suffix>", 0},
        {"block-size", KVR_FLAG_INT, &block_size, "tokens per KV block (when no worker says)", 0},
        {"route-timeout", KVR_FLAG_DURATION, &route_timeout, "per-try kvr.route timeout", 0},
        {"route-tries", KVR_FLAG_INT, &route_tries, "kvr.route tries before local fallback", 0},
        {"max-body", KVR_FLAG_SIZE, &max_body, "request body limit (default 4MiB)", 0},
        {"max-fallbacks", KVR_FLAG_INT, &max_fallbacks,
         "next least-loaded live workers listed after the pick (0-8)", 0},
        {"max-pending-picks", KVR_FLAG_INT, &max_pending,
         "picks in flight (kvr.route out) before new ones get 429", 0},
        {"worker-cidr", KVR_FLAG_STRING, &worker_cidr,
         "CIDRs a worker's heartbeat url must be in (private, any, or a list)", 0},
        {"log-level", KVR_FLAG_STRING, &log_level, "debug|info|warn|error", 0},
        KVR_NATS_FLAG_ENTRIES(&nats_sec),
    };
    size_t nflags = sizeof flags / sizeof *flags;
    kvr_err err = {0};
    if (fe_tok_take_flags(&argc, argv, &err)) {
        fprintf(stderr, "kvr-epp: %s\n", err.msg);
        return 2;
    }
    fe_set_tok_lookup(fe_tok_for);
    int rv = kvr_flags_parse(flags, nflags, argc - 1, argv + 1, NULL, 0, NULL, &err);
    if (rv == KVR_FLAGS_HELP) {
        kvr_flags_usage(stdout, "kvr-epp", flags, nflags);
        printf(
            "  --tokenizer NAME=DIR|byte  tokenizer for model NAME (repeatable; default byte)\n");
        return 0;
    }
    if (rv < 0) {
        fprintf(stderr, "kvr-epp: %s\n", err.msg);
        return 2;
    }
    kvr_log_level lvl;
    if (kvr_log_parse_level(log_level, &lvl)) {
        fprintf(stderr, "kvr-epp: --log-level %s: want debug|info|warn|error\n", log_level);
        return 2;
    }
    static char idbuf[24];
    snprintf(idbuf, sizeof idbuf, "%" PRIu64, id);
    kvr_log_setup("epp", idbuf, lvl);
    if (id == 0 || (ns && prefix) || block_size < 1 || route_tries < 1 || route_tries > 100 ||
        route_timeout < 1 || max_body < 1 || max_fallbacks < 0 ||
        max_fallbacks > EPP_MAX_FALLBACKS || max_pending < 1 || max_pending > 1000000 ||
        grpc_port < 0 || grpc_port > 65535 || health_port > 65535 || metrics_port > 65535) {
        fprintf(stderr, "kvr-epp: bad flags (--id >= 1; --namespace and --namespace-prefix are "
                        "exclusive; sizes and ports in range)\n");
        return 2;
    }
    if (kvr_nats_flags_load(&nats_sec, &err)) {
        fprintf(stderr, "kvr-epp: %s\n", err.msg);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    E.loop = uv_default_loop();
    E.id = id;
    E.route_timeout_ms = route_timeout;
    E.route_tries = route_tries;
    E.max_body = (size_t)max_body;
    E.max_fallbacks = (int)max_fallbacks;
    E.max_pending_picks = (uint32_t)max_pending;
    snprintf(E.lease_subject, sizeof E.lease_subject, "kvr.frontends.%" PRIu64, id);
    if (kvr_cidr_list_add_csv(&E.worker_cidrs, worker_cidr, &err)) {
        fprintf(stderr, "kvr-epp: --worker-cidr: %s\n", err.msg);
        return 2;
    }
    if (fe_pool_init(&E.pool,
                     prefix ? prefix
                     : ns   ? ns
                            : "default",
                     prefix != NULL, (uint64_t)kvr_now_ms() ^ (id * 0x9e3779b97f4a7c15ull))) {
        fprintf(stderr, "kvr-epp: bad namespace\n");
        return 2;
    }
    E.pool.allow = &E.worker_cidrs;
    E.block_size = (uint32_t)block_size;
    E.metrics = kvr_metrics_new();
    if (!E.metrics || register_metrics()) {
        fprintf(stderr, "kvr-epp: metrics init failed\n");
        return 1;
    }
    epp_grpc_handlers h = {.on_call = on_call,
                           .on_message = on_message,
                           .on_half_close = on_half_close,
                           .on_close = on_close};
    epp_grpc_limits lim = {.max_message = E.max_body + 4096};
    if (secure && epp_grpc_tls_ctx(cert_path, &lim.tls, &err)) {
        fprintf(stderr, "kvr-epp: tls: %s\n", err.msg);
        return 1;
    }
    char addr[300];
    snprintf(addr, sizeof addr, "%s:%d", bind_host, (int)grpc_port);
    if (epp_grpc_init(&E.grpc, E.loop, &h, &lim) || epp_grpc_listen(&E.grpc, addr, &err)) {
        fprintf(stderr, "kvr-epp: ext_proc port: %s\n", err.msg);
        return 1;
    }
    if (health_port >= 0) {
        snprintf(addr, sizeof addr, "%s:%d", bind_host, (int)health_port);
        if (epp_grpc_init(&E.health, E.loop, &h, NULL) || epp_grpc_listen(&E.health, addr, &err)) {
            fprintf(stderr, "kvr-epp: health port: %s\n", err.msg);
            return 1;
        }
        E.health_on = true;
    }
    if (metrics_port >= 0) {
        kvr_http_config hc = {.on_request = on_http,
                              .max_body_bytes = 4096,
                              .header_timeout_ms = 10000,
                              .idle_timeout_ms = 60000,
                              .max_connections = 64};
        snprintf(addr, sizeof addr, "%s:%d", bind_host, (int)metrics_port);
        if (kvr_http_server_init(&E.http, E.loop, &hc) || kvr_http_listen(&E.http, addr, &err)) {
            fprintf(stderr, "kvr-epp: metrics port: %s\n", err.msg);
            return 1;
        }
    }
    if (nats_url) {
        kvr_nats_opts no = {.url = nats_url, .name = "kvr-epp", .on_state = on_nats_state};
        kvr_nats_flags_fill(&nats_sec, &no);
        if (kvr_nats_init(&E.nats, E.loop, &no, &err)) {
            fprintf(stderr, "kvr-epp: nats: %s\n", err.msg);
            return 1;
        }
        E.nats_on = true;
        if (kvr_nats_subscribe(&E.nats, "kvr.workers.>", NULL, on_heartbeat, NULL, NULL, &err)) {
            fprintf(stderr, "kvr-epp: subscribing kvr.workers.>: %s\n", err.msg);
            return 1;
        }
    } else {
        KVR_LOG_WARN("no --nats", "msg2=\"no heartbeats: no worker will be known\"");
    }
    uv_timer_init(E.loop, &E.tick);
    uv_timer_start(&E.tick, on_tick, 0, 1000);
    uv_signal_init(E.loop, &E.sigint);
    uv_signal_init(E.loop, &E.sigterm);
    uv_signal_start(&E.sigint, on_signal, SIGINT);
    uv_signal_start(&E.sigterm, on_signal, SIGTERM);
    KVR_LOG_INFO("listening", "grpc_port=%d tls=%s health_port=%d metrics_port=%d pool=%s/%s",
                 E.grpc.port,
                 !secure        ? "off"
                 : cert_path[0] ? cert_path
                                : "self-signed",
                 E.health_on ? E.health.port : -1,
                 metrics_port >= 0 ? kvr_http_server_port(&E.http) : -1, pool_ns, pool_name);
    uv_run(E.loop, UV_RUN_DEFAULT);
    /* stopped by a signal: process exit closes the sockets */
    if (E.nats_on)
        kvr_nats_global_shutdown(2000);
    return 0;
}
