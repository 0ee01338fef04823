/* kvr-epp: the ext_proc message flow of one stream (headers, body, response, trailers), immediate
 * responses, the gRPC call handlers (ext_proc and health). */
#include "epp_priv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void epp_xs_maybe_free(xs *x)
{
    if (x->call || x->route_pending)
        return;
    epp_hold_end(x, false); /* not held any more by now; never freed inside a hold queue */
    epp_release(x);
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

void epp_immediate(xs *x, int status, int err_li, const char *msg)
{
    epp_hold_end(x, false);
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
    KVR_LOG_DEBUG("epp_immediate response", "request=%s status=%d msg=\"%s\"", x->rid_hex, status,
                  msg);
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

static void handle_msg(xs *x, const uint8_t *msg, size_t len);

/* The pick is made: answer the request headers, echo the body, then the messages that waited. */
void epp_decided(xs *x)
{
    epp_hold_end(x, true);
    char dest[3 * FE_URL_MAX];
    epp_build_dest(x, x->pool_model[0] ? x->pool_model : NULL, dest, sizeof dest);
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
    epp_release(x);
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
            fe_worker *w = epp_local_pick(x, NULL, NULL, NULL, 0);
            if (!w) {
                epp_immediate(x, 503, ERR_503, "no live worker");
                break;
            }
            epp_url_hostport(w->url, x->pick, sizeof x->pick);
            x->state = XS_PASS;
            epp_decided(x);
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
            epp_immediate(x, 413, ERR_413, "request body too large");
            break;
        }
        kvr_buf_append(&x->body, b->body.data, b->body.len);
        if (b->end_of_stream)
            epp_start_pick(x);
        break;
    }
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_TRAILERS:
        if (x->state == XS_COLLECT) {
            /* the body ended with trailers: pick now, answer the trailers after */
            uint32_t n = (uint32_t)len;
            kvr_buf_append(&x->deferred, &n, 4);
            kvr_buf_append(&x->deferred, msg, len);
            epp_start_pick(x);
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
            epp_publish_event(x, KVR_ROUTE_EVENT_PREFILL_DONE);
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

static char health_marker;

int epp_on_call(epp_grpc_call *call, const char *path)
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

void epp_on_message(epp_grpc_call *call, const uint8_t *msg, size_t len)
{
    if (call->data == &health_marker) {
        Grpc__Health__V1__HealthCheckRequest *rq =
            grpc__health__v1__health_check_request__unpack(NULL, len, msg);
        if (!rq) {
            epp_grpc_finish(call, EPP_GRPC_INVALID_ARGUMENT, "undecodable HealthCheckRequest");
            return;
        }
        int st = epp_health_status(rq->service ? rq->service : "");
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

void epp_on_half_close(epp_grpc_call *call)
{
    if (call->data == &health_marker)
        return;
    xs *x = call->data;
    /* Envoy ends its side when the HTTP stream is done; a pick still out is answered first */
    if (x->state != XS_DECIDING)
        epp_grpc_finish(call, EPP_GRPC_OK, NULL);
}

void epp_on_close(epp_grpc_call *call, bool finished)
{
    if (call->data == &health_marker)
        return;
    xs *x = call->data;
    if (!finished || !x->response_done)
        kvr_metric_inc(E.m_cancelled);
    E.open_streams--;
    x->call = NULL;
    epp_hold_client_gone(x);
    epp_release(x); /* stream ended or cancelled: the booking goes */
    epp_xs_maybe_free(x);
}
