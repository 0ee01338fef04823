/* epp_client: Envoy's ext_proc exchange over h2c, from C (see epp_client.h). */
#include "epp_client.h"

#include "epp/proto/ext_proc_min.pb-c.h"
#include "epp_grpc_frame.h"
#include "kvr_buf.h"
#include "kvr_err.h"
#include "kvr_log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define EC_PATH "/envoy.service.ext_proc.v3.ExternalProcessor/Process"

const char *const epp_client_error_names[EPP_CLIENT_E_N] = {
    "immediate_429", "immediate_503", "immediate_other", "grpc_status", "reset", "protocol"};

enum { ST_PICKING = 0, ST_ECHO, ST_RESPONSE, ST_HOLD };

struct epp_client_stream {
    epp_client_conn *c;
    int32_t sid;
    int state;
    kvr_buf out; /* framed messages not yet handed to nghttp2 */
    size_t out_off;
    size_t body_end; /* offset in out just past the body message (0: sent) */
    bool eof;        /* half-close once out is drained */
    bool deferred;
    kvr_buf in; /* response bytes not yet a whole gRPC message */
    int64_t t_body_ns;
    int grpc_status;
    bool error_counted, imm;
    epp_client_stream *lprev, *lnext; /* the client's live streams */
};

/* ---------- gRPC messages ---------- */

static uint8_t *frame(const Envoy__Service__ExtProc__V3__ProcessingRequest *r, size_t *len)
{
    size_t n = envoy__service__ext_proc__v3__processing_request__get_packed_size(r);
    uint8_t *b = malloc(n + EPP_GRPC_PREFIX);
    if (!b)
        return NULL;
    epp_grpc_frame_prefix(b, n);
    envoy__service__ext_proc__v3__processing_request__pack(r, b + EPP_GRPC_PREFIX);
    *len = n + EPP_GRPC_PREFIX;
    return b;
}

static uint8_t *headers_msg(bool response, bool eos, size_t *len)
{
    Envoy__Config__Core__V3__HeaderValue h[3], *hp[3];
    const char *kv[2][3][2] = {
        {{":method", "POST"},
         {":path", "/v1/chat/completions"},
         {"content-type", "application/json"}},
        {{":status", "200"}, {"content-type", "text/event-stream"}, {"server", "kvr-worker"}}};
    for (int i = 0; i < 3; i++) {
        envoy__config__core__v3__header_value__init(&h[i]);
        h[i].key = (char *)kv[response][i][0];
        h[i].raw_value.data = (uint8_t *)kv[response][i][1];
        h[i].raw_value.len = strlen(kv[response][i][1]);
        hp[i] = &h[i];
    }
    Envoy__Config__Core__V3__HeaderMap hm = ENVOY__CONFIG__CORE__V3__HEADER_MAP__INIT;
    hm.n_headers = 3;
    hm.headers = hp;
    Envoy__Service__ExtProc__V3__HttpHeaders hh = ENVOY__SERVICE__EXT_PROC__V3__HTTP_HEADERS__INIT;
    hh.headers = &hm;
    hh.end_of_stream = eos;
    Envoy__Service__ExtProc__V3__ProcessingRequest r =
        ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__INIT;
    if (response) {
        r.request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_HEADERS;
        r.response_headers = &hh;
    } else {
        r.request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_HEADERS;
        r.request_headers = &hh;
    }
    return frame(&r, len);
}

static uint8_t *body_msg(bool response, const char *body, size_t *len)
{
    Envoy__Service__ExtProc__V3__HttpBody hb = ENVOY__SERVICE__EXT_PROC__V3__HTTP_BODY__INIT;
    hb.body.data = (uint8_t *)body;
    hb.body.len = strlen(body);
    hb.end_of_stream = true;
    Envoy__Service__ExtProc__V3__ProcessingRequest r =
        ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__INIT;
    if (response) {
        r.request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_BODY;
        r.response_body = &hb;
    } else {
        r.request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_BODY;
        r.request_body = &hb;
    }
    return frame(&r, len);
}

/* ---------- streams ---------- */

static void count_error(epp_client_stream *st, int e)
{
    if (st->error_counted)
        return;
    st->error_counted = true;
    if (st->c->cl->measuring)
        st->c->cl->errors[e]++;
}

static void resume(epp_client_stream *st)
{
    if (st->deferred && st->sid > 0) {
        st->deferred = false;
        nghttp2_session_resume_data(st->c->s, st->sid);
    }
}

static void queue_out(epp_client_stream *st, const uint8_t *m, size_t n)
{
    kvr_buf_append(&st->out, m, n);
    resume(st);
}

static void end_out(epp_client_stream *st)
{
    st->eof = true;
    resume(st);
}

static void record_latency(epp_client *cl, int64_t ns)
{
    if (cl->nlat == cl->cap_lat_) {
        size_t nc = cl->cap_lat_ ? 2 * cl->cap_lat_ : 65536;
        double *nl = realloc(cl->lat, nc * sizeof *nl);
        if (nl)
            cl->lat = nl, cl->cap_lat_ = nc;
    }
    if (cl->nlat < cl->cap_lat_)
        cl->lat[cl->nlat++] = (double)ns / 1e9;
}

static void stream_link(epp_client_stream *st)
{
    epp_client *cl = st->c->cl;
    st->lnext = cl->live_;
    if (cl->live_)
        cl->live_->lprev = st;
    cl->live_ = st;
}

static void stream_free(epp_client_stream *st)
{
    epp_client *cl = st->c->cl;
    if (st->lprev)
        st->lprev->lnext = st->lnext;
    else if (cl->live_ == st)
        cl->live_ = st->lnext;
    if (st->lnext)
        st->lnext->lprev = st->lprev;
    kvr_buf_free(&st->out);
    kvr_buf_free(&st->in);
    free(st);
}

/* One whole ProcessingResponse of the stream: moves the exchange on. */
static void on_msg(epp_client_stream *st, const uint8_t *m, size_t n)
{
    epp_client *cl = st->c->cl;
    Envoy__Service__ExtProc__V3__ProcessingResponse *r =
        envoy__service__ext_proc__v3__processing_response__unpack(NULL, n, m);
    if (!r) {
        count_error(st, EPP_CLIENT_E_PROTO);
        nghttp2_submit_rst_stream(st->c->s, NGHTTP2_FLAG_NONE, st->sid, NGHTTP2_CANCEL);
        return;
    }
    switch (r->response_case) {
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_HEADERS:
        if (st->state == ST_PICKING) {
            if (cl->measuring && st->t_body_ns)
                record_latency(cl, kvr_mono_ns() - st->t_body_ns);
            st->state = ST_ECHO;
        }
        break;
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_BODY: {
        const Envoy__Service__ExtProc__V3__BodyResponse *br = r->request_body;
        if (st->state == ST_ECHO && br->response && br->response->body_mutation &&
            br->response->body_mutation->streamed_response &&
            br->response->body_mutation->streamed_response->end_of_stream) {
            /* the model server answers: response headers, its body (end), then half-close */
            st->state = ST_RESPONSE;
            queue_out(st, cl->m_rheaders_, cl->l_rheaders_);
            queue_out(st, cl->m_rbody_, cl->l_rbody_);
            end_out(st);
        }
        break;
    }
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_IMMEDIATE_RESPONSE: {
        int code = r->immediate_response->status ? r->immediate_response->status->code : 0;
        count_error(st, code == 429   ? EPP_CLIENT_E_IMM_429
                        : code == 503 ? EPP_CLIENT_E_IMM_503
                                      : EPP_CLIENT_E_IMM_OTHER);
        st->imm = true;
        end_out(st);
        break;
    }
    default:
        break;
    }
    envoy__service__ext_proc__v3__processing_response__free_unpacked(r, NULL);
}

/* ---------- nghttp2 callbacks ---------- */

static ssize_t data_read(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t len, uint32_t *flags,
                         nghttp2_data_source *src, void *ud)
{
    (void)s, (void)sid, (void)ud;
    epp_client_stream *st = src->ptr;
    size_t avail = st->out.len - st->out_off;
    if (!avail) {
        if (st->eof) {
            *flags |= NGHTTP2_DATA_FLAG_EOF;
            return 0;
        }
        st->deferred = true;
        return NGHTTP2_ERR_DEFERRED;
    }
    size_t n = avail < len ? avail : len;
    memcpy(buf, st->out.base + st->out_off, n);
    st->out_off += n;
    if (st->body_end && st->out_off >= st->body_end) {
        st->body_end = 0;
        st->t_body_ns = kvr_mono_ns(); /* the body's last byte goes out now */
    }
    if (st->out_off == st->out.len) {
        st->out.len = 0;
        st->out_off = 0;
        if (st->eof)
            *flags |= NGHTTP2_DATA_FLAG_EOF;
    }
    return (ssize_t)n;
}

static void on_msg_cb(const uint8_t *m, size_t n, void *arg)
{
    on_msg(arg, m, n);
}

/* DATA: the gRPC messages, reassembled across frames by kvr-epp's own deframer. */
static int on_data(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data, size_t len,
                   void *ud)
{
    (void)flags, (void)ud;
    epp_client_stream *st = nghttp2_session_get_stream_user_data(s, sid);
    if (!st)
        return 0;
    if (epp_grpc_deframe(&st->in, data, len, UINT32_MAX, on_msg_cb, st)) {
        /* a compressed or flagged message: kvr-epp sends neither */
        count_error(st, EPP_CLIENT_E_PROTO);
        nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, sid, NGHTTP2_CANCEL);
    }
    return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t nl,
                     const uint8_t *value, size_t vl, uint8_t flags, void *ud)
{
    (void)flags, (void)ud, (void)vl;
    epp_client_stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (st && nl == 11 && memcmp(name, "grpc-status", 11) == 0)
        st->grpc_status = atoi((const char *)value);
    return 0;
}

/* The stream is over: it counts as done, or as an error of the first kind seen. */
static int on_close(nghttp2_session *s, int32_t sid, uint32_t code, void *ud)
{
    (void)ud;
    epp_client_stream *st = nghttp2_session_get_stream_user_data(s, sid);
    if (!st)
        return 0;
    epp_client *cl = st->c->cl;
    if (st->state == ST_HOLD)
        cl->held--;
    else if (code != NGHTTP2_NO_ERROR)
        count_error(st, EPP_CLIENT_E_RESET);
    else if (st->grpc_status != 0)
        count_error(st, EPP_CLIENT_E_GRPC);
    else if (!st->imm && st->state != ST_RESPONSE)
        count_error(st, EPP_CLIENT_E_PROTO);
    else if (!st->imm && cl->measuring)
        cl->done_ok++;
    st->c->open--;
    cl->open_streams--;
    stream_free(st);
    return 0;
}

static ssize_t on_send(nghttp2_session *s, const uint8_t *data, size_t len, int flags, void *ud)
{
    (void)s, (void)flags;
    epp_client_conn *c = ud;
    ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? NGHTTP2_ERR_WOULDBLOCK
                                                       : NGHTTP2_ERR_CALLBACK_FAILURE;
    return n;
}

/* ---------- connections ---------- */

static int conn_open(epp_client *cl, epp_client_conn *c, int port)
{
    c->cl = cl;
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0)
        return KVR_EIO;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) != 0)
        return KVR_EIO;
    fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
    nghttp2_session_callbacks *cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_send_callback(cb, on_send);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_close);
    int rc = nghttp2_session_client_new(&c->s, cb, c);
    nghttp2_session_callbacks_del(cb);
    if (rc) {
        c->s = NULL;
        return KVR_EIO;
    }
    nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 100},
                                   {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20}};
    nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, iv, 2);
    nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0, 16 << 20);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(cl->ep_, EPOLL_CTL_ADD, c->fd, &ev);
    return 0;
}

/* Hands every session's pending frames to its socket (streams just started go out now, not
 * after the next wait). */
static void flush_all(epp_client *cl)
{
    for (int i = 0; i < cl->nconns_; i++) {
        epp_client_conn *c = &cl->conns_[i];
        if (c->dead)
            continue;
        if (nghttp2_session_send(c->s) != 0)
            c->dead = true;
        struct epoll_event ev = {
            .events = EPOLLIN | (nghttp2_session_want_write(c->s) ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(cl->ep_, EPOLL_CTL_MOD, c->fd, &ev);
    }
}

/* ---------- API ---------- */

int epp_client_init(epp_client *cl, const char *request_body, const char *response_body)
{
    memset(cl, 0, sizeof *cl);
    cl->ep_ = -1;
    for (int i = 0; i < EPP_CLIENT_MAX_CONNS; i++)
        cl->conns_[i].fd = -1;
    cl->m_headers_ = headers_msg(false, false, &cl->l_headers_);
    cl->m_body_ = body_msg(false, request_body, &cl->l_body_);
    cl->m_rheaders_ = headers_msg(true, false, &cl->l_rheaders_);
    cl->m_rbody_ = body_msg(true, response_body, &cl->l_rbody_);
    if (!cl->m_headers_ || !cl->m_body_ || !cl->m_rheaders_ || !cl->m_rbody_)
        return KVR_ENOMEM;
    cl->ep_ = epoll_create1(0);
    return cl->ep_ < 0 ? KVR_EIO : 0;
}

int epp_client_connect(epp_client *cl, int port, int conns)
{
    if (conns < 1 || conns > EPP_CLIENT_MAX_CONNS || cl->nconns_)
        return KVR_EINVAL;
    /* counted first: epp_client_free closes what a failure left half open */
    cl->nconns_ = conns;
    for (int i = 0; i < conns; i++) {
        int rc = conn_open(cl, &cl->conns_[i], port);
        if (rc)
            return rc;
    }
    return 0;
}

int epp_client_start(epp_client *cl, bool hold)
{
    epp_client_conn *c = NULL;
    for (int i = 0; i < cl->nconns_; i++)
        if (!cl->conns_[i].dead && cl->conns_[i].s &&
            cl->conns_[i].open < EPP_CLIENT_STREAMS_PER_CONN &&
            (!c || cl->conns_[i].open < c->open))
            c = &cl->conns_[i];
    if (!c)
        return KVR_ELIMIT;
    epp_client_stream *st = calloc(1, sizeof *st);
    if (!st)
        return KVR_ENOMEM;
    st->c = c;
    kvr_buf_init(&st->out);
    kvr_buf_init(&st->in);
    stream_link(st);
    kvr_buf_append(&st->out, cl->m_headers_, cl->l_headers_);
    if (hold) {
        st->state = ST_HOLD;
        cl->held++;
    } else {
        kvr_buf_append(&st->out, cl->m_body_, cl->l_body_);
        st->body_end = st->out.len;
    }
    const nghttp2_nv nv[] = {
#define NV(n, v) {(uint8_t *)n, (uint8_t *)v, sizeof n - 1, sizeof v - 1, NGHTTP2_NV_FLAG_NONE}
        NV(":method", "POST"),       NV(":scheme", "http"), NV(":path", EC_PATH),
        NV(":authority", "kvr-epp"), NV("te", "trailers"),  NV("content-type", "application/grpc"),
#undef NV
    };
    nghttp2_data_provider dp = {.source.ptr = st, .read_callback = data_read};
    st->sid = nghttp2_submit_request(c->s, NULL, nv, sizeof nv / sizeof *nv, &dp, st);
    if (st->sid < 0) {
        stream_free(st);
        return KVR_EIO;
    }
    c->open++;
    cl->open_streams++;
    cl->started++;
    return 0;
}

void epp_client_pump_us(epp_client *cl, int64_t timeout_us)
{
    struct epoll_event evs[EPP_CLIENT_MAX_CONNS];
    flush_all(cl);
    if (timeout_us < 0)
        timeout_us = 0;
    struct timespec ts = {.tv_sec = timeout_us / 1000000, .tv_nsec = timeout_us % 1000000 * 1000};
    int n = epoll_pwait2(cl->ep_, evs, EPP_CLIENT_MAX_CONNS, &ts, NULL);
    for (int i = 0; i < n; i++) {
        epp_client_conn *c = evs[i].data.ptr;
        if (c->dead || !(evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
            continue;
        uint8_t buf[65536];
        for (;;) {
            ssize_t r = recv(c->fd, buf, sizeof buf, 0);
            if (r > 0) {
                if (nghttp2_session_mem_recv(c->s, buf, (size_t)r) < 0) {
                    c->dead = true;
                    break;
                }
                continue;
            }
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            c->dead = true; /* EOF or error */
            break;
        }
    }
    flush_all(cl);
}

void epp_client_pump(epp_client *cl, int timeout_ms)
{
    epp_client_pump_us(cl, (int64_t)timeout_ms * 1000);
}

void epp_client_free(epp_client *cl)
{
    for (int i = 0; i < EPP_CLIENT_MAX_CONNS; i++) {
        epp_client_conn *c = &cl->conns_[i];
        if (c->s)
            nghttp2_session_del(c->s);
        if (c->fd >= 0)
            close(c->fd);
        c->s = NULL;
        c->fd = -1;
    }
    while (cl->live_) /* streams still open (held ones): no close callback came for them */
        stream_free(cl->live_);
    if (cl->ep_ >= 0)
        close(cl->ep_);
    free(cl->m_headers_);
    free(cl->m_body_);
    free(cl->m_rheaders_);
    free(cl->m_rbody_);
    free(cl->lat);
    memset(cl, 0, sizeof *cl);
    cl->ep_ = -1;
    for (int i = 0; i < EPP_CLIENT_MAX_CONNS; i++)
        cl->conns_[i].fd = -1;
}
