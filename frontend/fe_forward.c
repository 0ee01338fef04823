/* kvr-frontend --forward body (issue 13.5): for real engines (vLLM, SGLang) the client's JSON
 * body goes unchanged to the chosen worker's same endpoint, and the worker's 200 answer comes
 * back byte for byte with its Content-Type (SSE as it arrives; tool calls, logprobs, reasoning
 * fields untouched). Token ids are computed only to route. Errors before the first byte keep
 * the tokens path's handling (retry elsewhere, 4xx relayed). */
#include "fe_app.h"

#include "kvr_log.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

int fe_forward_header(kvr_curl_req *r, kvr_slice name, kvr_slice value)
{
    fe_call *c = kvr_curl_req_data(r);
    if (name.len == 12 && !strncasecmp(name.base, "Content-Type", 12)) {
        size_t n = value.len < sizeof c->up_ctype - 1 ? value.len : sizeof c->up_ctype - 1;
        memcpy(c->up_ctype, value.base, n);
        c->up_ctype[n] = '\0';
        c->up_is_sse = !strncasecmp(c->up_ctype, "text/event-stream", 17);
    }
    return 0;
}

static int start(fe_call *c)
{
    if (c->stream_started)
        return 0;
    kvr_metric_add(app.m_responses, status_index(200), 1);
    /* started even when the client is gone: stream_end then finishes the request */
    int rc = kvr_http_stream_start(c->req, 200, c->up_ctype[0] ? c->up_ctype : "application/json");
    c->stream_started = true;
    app.active_streams++;
    return rc;
}

int fe_forward_data(fe_call *c, const char *data, size_t len)
{
    if (len == 0)
        return 0;
    if (!c->relay.got_first) {
        /* The first byte of a 200: for a stream the first chunk (prefill is done), for a JSON
         * answer the whole generation. From here a failure cannot be retried elsewhere. */
        c->relay.got_first = true;
        c->t_first_ns = kvr_mono_ns();
        kvr_metric_observe(app.m_ttft, 0, (double)(c->t_first_ns - c->t_start_ns) / 1e9);
        if (c->booked && app.nats_on) {
            kvr_buf b;
            kvr_buf_init(&b);
            kvr_route_event ev = {.type = KVR_ROUTE_EVENT_PREFILL_DONE};
            memcpy(ev.request_id, c->rid, sizeof ev.request_id);
            if (kvr_route_event_encode(&b, &ev) == 0)
                kvr_nats_publish(&app.nats, "kvr.route.event", b.base, b.len);
            kvr_buf_free(&b);
        }
    }
    if (start(c))
        return 1;
    kvr_http_stream_write(c->req, data, len);
    return 0;
}

void fe_forward_end(fe_call *c)
{
    if (!c->req)
        return;
    start(c);
    if (app.active_streams)
        app.active_streams--;
    kvr_http_stream_end(c->req);
    c->req = NULL;
}

uint32_t fe_pool_block_size(const char *ns, const char *model)
{
    int64_t now = kvr_mono_ms();
    for (size_t i = 0; i < app.pool.n; i++) {
        const fe_worker *w = &app.pool.w[i];
        if (w->block_size == 0 || strcmp(w->ns, ns) || strcmp(w->model, model))
            continue;
        if (now - w->last_seen_ms > app.pool.ttl_ms && !app.pool.blind)
            continue;
        return w->block_size;
    }
    return app.block_size;
}
