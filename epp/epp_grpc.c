/* epp_grpc: gRPC over h2c on libuv with nghttp2 (see epp_grpc.h). */
#include "epp_grpc.h"

#include "kvr_log.h"

#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct conn {
    uv_tcp_t tcp;
    epp_grpc_server *s;
    nghttp2_session *ng;
    struct conn *next, *prev;
    size_t wpending; /* bytes handed to uv_write, not yet written */
    bool reading;
    bool in_recv; /* inside nghttp2_session_mem_recv: nghttp2 forbids sending from callbacks */
    bool closing;
    /* every call not yet closed: nghttp2_session_del runs no stream-close callback, so a
     * connection that drops closes its calls itself (conn_close) */
    epp_grpc_call *calls;
    bool fake; /* epp_grpc_feed: no socket, output discarded, freed by the feeder */
    SSL *ssl;  /* TLS (limits.tls), on memory BIOs: rbio takes socket bytes, wbio gives them */
    BIO *rbio, *wbio;
    bool hs_done;
} conn;

typedef struct wreq {
    uv_write_t req;
    conn *c;
    size_t len;
    char data[];
} wreq;

static void conn_close(conn *c);
static void conn_flush(conn *c);

/* ---------- framing ---------- */

int epp_grpc_deframe(kvr_buf *rest, const uint8_t *data, size_t len, size_t max_message,
                     void (*cb)(const uint8_t *msg, size_t n, void *arg), void *arg)
{
    const uint8_t *p = data;
    size_t n = len;
    bool in_rest = rest->len > 0;
    if (in_rest) {
        if (kvr_buf_append(rest, data, len))
            return EPP_GRPC_RESOURCE_EXHAUSTED;
        p = (const uint8_t *)rest->base;
        n = rest->len;
    }
    size_t off = 0;
    int st = 0;
    while (n - off >= 5) {
        uint8_t flag = p[off];
        uint32_t ml = (uint32_t)p[off + 1] << 24 | (uint32_t)p[off + 2] << 16 |
                      (uint32_t)p[off + 3] << 8 | p[off + 4];
        if (flag & 1) { /* compressed: we announced no grpc-accept-encoding but identity */
            st = EPP_GRPC_UNIMPLEMENTED;
            break;
        }
        if (flag) {
            st = EPP_GRPC_INTERNAL;
            break;
        }
        if (ml > max_message) {
            st = EPP_GRPC_RESOURCE_EXHAUSTED;
            break;
        }
        if (n - off - 5 < ml)
            break;
        cb(p + off + 5, ml, arg);
        off += 5 + (size_t)ml;
    }
    if (st) {
        kvr_buf_reset(rest);
        return st;
    }
    if (in_rest)
        kvr_buf_consume(rest, off);
    else if (off < n && kvr_buf_append(rest, p + off, n - off))
        return EPP_GRPC_RESOURCE_EXHAUSTED;
    return 0;
}

/* ---------- sending ---------- */

/* grpc-message is percent-encoded (PROTOCOL-HTTP2.md): bytes outside 0x20..0x7E and '%'. */
static void pct_encode(const char *in, char *out, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)in; *p && o + 4 < cap; p++) {
        if (*p < 0x20 || *p > 0x7e || *p == '%') {
            out[o++] = '%';
            out[o++] = hex[*p >> 4];
            out[o++] = hex[*p & 15];
        } else {
            out[o++] = (char)*p;
        }
    }
    out[o] = 0;
}

#define NV(n, v)                                                                                   \
    {                                                                                              \
        (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NONE             \
    }

static int submit_trailers(conn *c, epp_grpc_call *call, bool trailers_only)
{
    char st[12], msg[768];
    snprintf(st, sizeof st, "%d", call->status_);
    pct_encode(call->message_, msg, sizeof msg);
    nghttp2_nv nva[5];
    size_t n = 0;
    if (trailers_only) {
        nghttp2_nv a = NV(":status", "200"), b = NV("content-type", "application/grpc");
        nva[n++] = a;
        nva[n++] = b;
    }
    nghttp2_nv s = NV("grpc-status", st);
    nva[n++] = s;
    if (msg[0]) {
        nghttp2_nv m = NV("grpc-message", msg);
        nva[n++] = m;
    }
    call->trailers_sent_ = true;
    if (trailers_only)
        return nghttp2_submit_response(c->ng, call->sid_, nva, n, NULL);
    return nghttp2_submit_trailer(c->ng, call->sid_, nva, n);
}

static ssize_t data_read(nghttp2_session *ng, int32_t sid, uint8_t *buf, size_t length,
                         uint32_t *flags, nghttp2_data_source *src, void *ud)
{
    (void)ng;
    (void)sid;
    conn *c = ud;
    epp_grpc_call *call = src->ptr;
    size_t avail = call->out_.len - call->out_off_;
    if (avail) {
        size_t n = avail < length ? avail : length;
        memcpy(buf, call->out_.base + call->out_off_, n);
        call->out_off_ += n;
        c->s->stats.buffered -= n;
        if (call->out_off_ == call->out_.len) {
            kvr_buf_reset(&call->out_);
            call->out_off_ = 0;
        }
        return (ssize_t)n;
    }
    if (call->finishing_) {
        *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
        if (submit_trailers(c, call, false))
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        return 0;
    }
    call->deferred_ = true;
    return NGHTTP2_ERR_DEFERRED;
}

static int start_response(conn *c, epp_grpc_call *call)
{
    nghttp2_nv nva[] = {NV(":status", "200"), NV("content-type", "application/grpc"),
                        NV("grpc-accept-encoding", "identity")};
    nghttp2_data_provider dp = {.source.ptr = call, .read_callback = data_read};
    call->started_ = true;
    return nghttp2_submit_response(c->ng, call->sid_, nva, sizeof nva / sizeof *nva, &dp);
}

int epp_grpc_send(epp_grpc_call *call, const void *msg, size_t len)
{
    conn *c = call->conn_;
    if (call->finishing_ || call->closed_ || !c)
        return KVR_EINVAL;
    epp_grpc_server *s = call->server;
    if (s->stats.buffered + len + 5 > s->lim.max_buffered)
        return KVR_ELIMIT;
    uint8_t pfx[5] = {0, (uint8_t)(len >> 24), (uint8_t)(len >> 16), (uint8_t)(len >> 8),
                      (uint8_t)len};
    if (kvr_buf_append(&call->out_, pfx, 5) || kvr_buf_append(&call->out_, msg, len))
        return KVR_ENOMEM;
    s->stats.buffered += len + 5;
    s->stats.messages_out++;
    if (!call->started_) {
        if (start_response(c, call))
            return KVR_EIO;
    } else if (call->deferred_) {
        call->deferred_ = false;
        nghttp2_session_resume_data(c->ng, call->sid_);
    }
    conn_flush(c);
    return 0;
}

void epp_grpc_finish(epp_grpc_call *call, int status, const char *message)
{
    conn *c = call->conn_;
    if (call->finishing_ || call->closed_ || !c)
        return;
    call->finishing_ = true;
    call->status_ = status;
    snprintf(call->message_, sizeof call->message_, "%s", message ? message : "");
    if (!call->started_) {
        submit_trailers(c, call, true);
    } else if (call->deferred_) {
        call->deferred_ = false;
        nghttp2_session_resume_data(c->ng, call->sid_);
    }
    conn_flush(c);
}

void epp_grpc_flush(epp_grpc_call *call)
{
    if (call->conn_)
        conn_flush(call->conn_);
}

/* ---------- nghttp2 callbacks ---------- */

static epp_grpc_call *call_of(conn *c, int32_t sid)
{
    return nghttp2_session_get_stream_user_data(c->ng, sid);
}

static int on_begin_headers(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
    conn *c = ud;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    epp_grpc_call *call = calloc(1, sizeof *call);
    if (!call)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    call->server = c->s;
    call->conn_ = c;
    call->sid_ = f->hd.stream_id;
    kvr_buf_init(&call->in_);
    kvr_buf_init(&call->out_);
    nghttp2_session_set_stream_user_data(ng, f->hd.stream_id, call);
    call->next_ = c->calls;
    if (call->next_)
        call->next_->prev_ = call;
    c->calls = call;
    c->s->stats.calls++;
    c->s->stats.open_calls++;
    return 0;
}

static int on_header(nghttp2_session *ng, const nghttp2_frame *f, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags, void *ud)
{
    (void)ng;
    (void)flags;
    conn *c = ud;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    epp_grpc_call *call = call_of(c, f->hd.stream_id);
    if (!call)
        return 0;
#define IS(s) (namelen == sizeof(s) - 1 && memcmp(name, s, namelen) == 0)
    if (IS(":path")) {
        if (valuelen >= sizeof call->path_) {
            call->refused_ = true;
            return 0;
        }
        memcpy(call->path_, value, valuelen);
        call->path_[valuelen] = 0;
    } else if (IS("content-type")) {
        if (valuelen < 16 || memcmp(value, "application/grpc", 16) != 0)
            call->refused_ = true;
    } else if (IS("grpc-encoding")) {
        if (!(valuelen == 8 && memcmp(value, "identity", 8) == 0)) {
            call->refused_ = true;
            snprintf(call->message_, sizeof call->message_, "grpc-encoding %.*s not supported",
                     (int)(valuelen > 64 ? 64 : valuelen), (const char *)value);
        }
    }
#undef IS
    return 0;
}

static void half_close(conn *c, epp_grpc_call *call)
{
    if (call->half_closed_)
        return;
    call->half_closed_ = true;
    if (call->finishing_ || !call->accepted_)
        return;
    if (call->in_.len) {
        epp_grpc_finish(call, EPP_GRPC_INTERNAL, "stream ended inside a message");
        return;
    }
    if (c->s->h.on_half_close)
        c->s->h.on_half_close(call);
}

static int on_frame_recv(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
    (void)ng;
    conn *c = ud;
    epp_grpc_call *call = f->hd.stream_id ? call_of(c, f->hd.stream_id) : NULL;
    if (!call)
        return 0;
    if (f->hd.type == NGHTTP2_HEADERS && f->headers.cat == NGHTTP2_HCAT_REQUEST) {
        int st = 0;
        if (call->refused_)
            st = call->message_[0] ? EPP_GRPC_UNIMPLEMENTED : EPP_GRPC_INVALID_ARGUMENT;
        else if (!call->path_[0])
            st = EPP_GRPC_INVALID_ARGUMENT;
        else
            st = c->s->h.on_call(call, call->path_);
        if (st) {
            c->s->stats.refused++;
            epp_grpc_finish(call, st,
                            call->message_[0]              ? call->message_
                            : st == EPP_GRPC_UNIMPLEMENTED ? "unknown method"
                                                           : "bad request headers");
        } else {
            call->accepted_ = true;
            if (!call->started_)
                start_response(c, call);
        }
    }
    if ((f->hd.type == NGHTTP2_HEADERS || f->hd.type == NGHTTP2_DATA) &&
        (f->hd.flags & NGHTTP2_FLAG_END_STREAM))
        half_close(c, call);
    return 0;
}

typedef struct deliver_arg {
    conn *c;
    epp_grpc_call *call;
} deliver_arg;

static void deliver(const uint8_t *msg, size_t n, void *arg)
{
    deliver_arg *a = arg;
    if (a->call->finishing_ || a->call->closed_)
        return;
    a->c->s->stats.messages_in++;
    a->c->s->h.on_message(a->call, msg, n);
}

static int on_data_chunk(nghttp2_session *ng, uint8_t flags, int32_t sid, const uint8_t *data,
                         size_t len, void *ud)
{
    (void)ng;
    (void)flags;
    conn *c = ud;
    epp_grpc_call *call = call_of(c, sid);
    if (!call || !call->accepted_ || call->finishing_)
        return 0; /* consumed and dropped: the call is answered already */
    epp_grpc_server *s = c->s;
    if (s->stats.buffered + len > s->lim.max_buffered) {
        epp_grpc_finish(call, EPP_GRPC_RESOURCE_EXHAUSTED, "server buffers full");
        return 0;
    }
    size_t before = call->in_.len;
    deliver_arg a = {c, call};
    int st = epp_grpc_deframe(&call->in_, data, len, s->lim.max_message, deliver, &a);
    s->stats.buffered = s->stats.buffered - before + call->in_.len;
    if (st)
        epp_grpc_finish(call, st,
                        st == EPP_GRPC_UNIMPLEMENTED        ? "compressed messages not supported"
                        : st == EPP_GRPC_RESOURCE_EXHAUSTED ? "message too large"
                                                            : "bad message prefix");
    return 0;
}

static int on_frame_send(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
    conn *c = ud;
    /* Trailers sent while the client still sends: end its side too (as gRPC servers do). */
    if (f->hd.type == NGHTTP2_HEADERS && (f->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
        epp_grpc_call *call = call_of(c, f->hd.stream_id);
        if (call && !call->half_closed_)
            nghttp2_submit_rst_stream(ng, NGHTTP2_FLAG_NONE, f->hd.stream_id, NGHTTP2_NO_ERROR);
    }
    return 0;
}

/* The call is over: the handler hears it last, then it is freed. */
static void call_closed(conn *c, epp_grpc_call *call)
{
    call->closed_ = true;
    if (call->accepted_ && c->s->h.on_close)
        c->s->h.on_close(call, call->finishing_);
    if (call->prev_)
        call->prev_->next_ = call->next_;
    else
        c->calls = call->next_;
    if (call->next_)
        call->next_->prev_ = call->prev_;
    c->s->stats.buffered -= call->in_.len + (call->out_.len - call->out_off_);
    c->s->stats.open_calls--;
    kvr_buf_free(&call->in_);
    kvr_buf_free(&call->out_);
    free(call);
}

static int on_stream_close(nghttp2_session *ng, int32_t sid, uint32_t error_code, void *ud)
{
    conn *c = ud;
    epp_grpc_call *call = call_of(c, sid);
    if (!call)
        return 0;
    if (error_code != NGHTTP2_NO_ERROR)
        c->s->stats.resets++;
    nghttp2_session_set_stream_user_data(ng, sid, NULL);
    call_closed(c, call);
    return 0;
}

/* ---------- connection I/O ---------- */

static void on_closed(uv_handle_t *h)
{
    conn *c = h->data;
    free(c);
}

static void conn_close(conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    epp_grpc_server *s = c->s;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns_ = c->next;
    if (c->next)
        c->next->prev = c->prev;
    /* the calls still open end here (cancelled), before the session goes: a handler may
     * still call epp_grpc_send / finish on them, which see c->closing and do nothing */
    while (c->calls) {
        c->calls->conn_ = NULL;
        c->s->stats.resets++;
        call_closed(c, c->calls);
    }
    nghttp2_session_del(c->ng);
    c->ng = NULL;
    if (c->ssl)
        SSL_free(c->ssl); /* and its BIOs */
    c->ssl = NULL;
    if (!c->fake)
        uv_close((uv_handle_t *)&c->tcp, on_closed);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

static void on_written(uv_write_t *req, int status)
{
    wreq *w = (wreq *)req;
    conn *c = w->c;
    c->wpending -= w->len;
    free(w);
    if (c->closing)
        return;
    if (status < 0) {
        conn_close(c);
        return;
    }
    conn_flush(c);
}

static void alloc_cb(uv_handle_t *h, size_t sz, uv_buf_t *b)
{
    (void)h;
    (void)sz;
    static char rbuf[65536]; /* one loop thread: reads are consumed before the next one */
    b->base = rbuf;
    b->len = sizeof rbuf;
}

/* Hands len bytes to uv_write (copied). 0 or -1 (the connection is closed). */
static int write_raw(conn *c, const void *data, size_t len)
{
    if (!len || c->fake)
        return 0;
    wreq *w = malloc(sizeof *w + len);
    if (!w) {
        conn_close(c);
        return -1;
    }
    w->c = c;
    w->len = len;
    memcpy(w->data, data, len);
    uv_buf_t b = uv_buf_init(w->data, (unsigned)len);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_written)) {
        free(w);
        conn_close(c);
        return -1;
    }
    c->wpending += len;
    return 0;
}

/* TLS: what OpenSSL produced (handshake records, encrypted data) goes to the socket. */
static int drain_tls(conn *c)
{
    char buf[16384];
    int n;
    while ((n = BIO_read(c->wbio, buf, sizeof buf)) > 0)
        if (write_raw(c, buf, (size_t)n))
            return -1;
    return 0;
}

static void conn_flush(conn *c)
{
    if (c->closing || c->in_recv || !c->ng)
        return;
    if (c->ssl && !c->hs_done) { /* nghttp2's output waits for the handshake */
        drain_tls(c);
        return;
    }
    kvr_buf out;
    kvr_buf_init(&out);
    while (c->wpending + out.len < EPP_GRPC_WRITE_HIGH) {
        const uint8_t *d;
        ssize_t n = nghttp2_session_mem_send(c->ng, &d);
        if (n < 0) {
            kvr_buf_free(&out);
            conn_close(c);
            return;
        }
        if (n == 0)
            break;
        if (kvr_buf_append(&out, d, (size_t)n)) {
            kvr_buf_free(&out);
            conn_close(c);
            return;
        }
    }
    int rc = 0;
    if (c->ssl && out.len) {
        /* memory BIOs take everything: SSL_write completes or the session is broken */
        if (SSL_write(c->ssl, out.base, (int)out.len) != (int)out.len) {
            kvr_buf_free(&out);
            conn_close(c);
            return;
        }
        rc = drain_tls(c);
    } else {
        rc = write_raw(c, out.base, out.len);
    }
    kvr_buf_free(&out);
    if (rc)
        return;
    /* back-pressure: a peer that does not read its responses is not read either */
    if (c->fake) {
    } else if (c->wpending >= EPP_GRPC_WRITE_HIGH && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    } else if (c->wpending < EPP_GRPC_WRITE_HIGH / 2 && !c->reading) {
        if (uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, on_read) == 0)
            c->reading = true;
    }
    if (!nghttp2_session_want_read(c->ng) && !nghttp2_session_want_write(c->ng) && !c->wpending)
        conn_close(c);
}

/* Bytes in for nghttp2 (plaintext). 0 or -1 (closed). */
static int feed(conn *c, const uint8_t *data, size_t len)
{
    c->in_recv = true;
    ssize_t rv = nghttp2_session_mem_recv(c->ng, data, len);
    c->in_recv = false;
    if (rv < 0) {
        KVR_LOG_DEBUG("h2 protocol error", "err=\"%s\"", nghttp2_strerror((int)rv));
        conn_close(c);
        return -1;
    }
    return c->closing ? -1 : 0;
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    conn *c = st->data;
    if (nread < 0) {
        conn_close(c);
        return;
    }
    if (nread == 0)
        return;
    if (!c->ssl) {
        if (feed(c, (const uint8_t *)buf->base, (size_t)nread) == 0)
            conn_flush(c);
        return;
    }
    if (BIO_write(c->rbio, buf->base, (int)nread) != (int)nread) {
        conn_close(c);
        return;
    }
    if (!c->hs_done) {
        int r = SSL_do_handshake(c->ssl);
        if (r != 1) {
            int e = SSL_get_error(c->ssl, r);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
                c->s->stats.tls_failures++;
                KVR_LOG_DEBUG("tls handshake failed", "err=\"%s\"",
                              ERR_reason_error_string(ERR_peek_last_error()));
                ERR_clear_error();
                drain_tls(c); /* the alert */
                conn_close(c);
                return;
            }
            drain_tls(c);
            return;
        }
        c->hs_done = true;
    }
    uint8_t plain[16384];
    for (;;) {
        int r = SSL_read(c->ssl, plain, sizeof plain);
        if (r > 0) {
            if (feed(c, plain, (size_t)r))
                return;
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
            break;
        ERR_clear_error();
        conn_close(c);
        return;
    }
    conn_flush(c);
}

/* The nghttp2 server session of a new connection, linked into the server. 0, or -1 (closed). */
static int conn_session(conn *c)
{
    epp_grpc_server *s = c->s;
    nghttp2_session_callbacks *cbs;
    nghttp2_session_callbacks_new(&cbs);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    int rv = nghttp2_session_server_new(&c->ng, cbs, c);
    nghttp2_session_callbacks_del(cbs);
    c->next = s->conns_;
    if (c->next)
        c->next->prev = c;
    s->conns_ = c;
    s->stats.connections++;
    if (rv) {
        c->ng = NULL;
        conn_close(c);
        return -1;
    }
    /* Windows of 1 MiB per stream and 16 MiB per connection: a body of several chunks need
     * not wait for a WINDOW_UPDATE round trip each 64 KiB. nghttp2 sends WINDOW_UPDATEs as
     * data is consumed (at once: every byte is deframed and copied out on arrival), and our
     * own per-call and total caps bound memory. */
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, s->lim.max_streams},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20},
    };
    nghttp2_submit_settings(c->ng, NGHTTP2_FLAG_NONE, iv, sizeof iv / sizeof *iv);
    nghttp2_session_set_local_window_size(c->ng, NGHTTP2_FLAG_NONE, 0, 16 << 20);
    return 0;
}

static void on_conn(uv_stream_t *ls, int status)
{
    epp_grpc_server *s = ls->data;
    if (status < 0)
        return;
    conn *c = calloc(1, sizeof *c);
    if (!c)
        return;
    c->s = s;
    uv_tcp_init(s->loop, &c->tcp);
    c->tcp.data = c;
    if (uv_accept(ls, (uv_stream_t *)&c->tcp)) {
        c->closing = true;
        uv_close((uv_handle_t *)&c->tcp, on_closed);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    if (conn_session(c))
        return;
    if (s->lim.tls) {
        c->ssl = SSL_new(s->lim.tls);
        c->rbio = BIO_new(BIO_s_mem());
        c->wbio = BIO_new(BIO_s_mem());
        if (!c->ssl || !c->rbio || !c->wbio) {
            BIO_free(c->rbio);
            BIO_free(c->wbio);
            c->rbio = c->wbio = NULL;
            conn_close(c);
            return;
        }
        BIO_set_mem_eof_return(c->rbio, -1);   /* empty means "want more", not end of stream */
        SSL_set_bio(c->ssl, c->rbio, c->wbio); /* ssl owns them now */
        SSL_set_accept_state(c->ssl);
    }
    if (uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, on_read)) {
        conn_close(c);
        return;
    }
    c->reading = true;
    conn_flush(c);
}

int epp_grpc_feed(epp_grpc_server *s, const uint8_t *data, size_t len, size_t piece)
{
    conn *c = calloc(1, sizeof *c);
    if (!c)
        return KVR_ENOMEM;
    c->s = s;
    c->fake = true;
    if (conn_session(c) == 0) {
        conn_flush(c);
        for (size_t off = 0; off < len && !c->closing;) {
            size_t n = len - off < piece ? len - off : piece;
            if (feed(c, data + off, n) == 0)
                conn_flush(c);
            off += n;
        }
    }
    conn_close(c); /* the calls still open are closed as when a connection drops */
    free(c);
    return 0;
}

int epp_grpc_init(epp_grpc_server *s, uv_loop_t *loop, const epp_grpc_handlers *h,
                  const epp_grpc_limits *limits)
{
    if (!h || !h->on_call || !h->on_message)
        return KVR_EINVAL;
    memset(s, 0, sizeof *s);
    s->loop = loop;
    s->h = *h;
    if (limits)
        s->lim = *limits;
    if (!s->lim.max_message)
        s->lim.max_message = 4u << 20;
    if (!s->lim.max_buffered)
        s->lim.max_buffered = (size_t)256 << 20;
    if (!s->lim.max_streams)
        s->lim.max_streams = 1024;
    return 0;
}

int epp_grpc_listen(epp_grpc_server *s, const char *addr, kvr_err *err)
{
    const char *colon = strrchr(addr, ':');
    if (!colon)
        return kvr_err_set(err, KVR_EINVAL, "listen address %s: want host:port or :port", addr);
    char host[128];
    size_t hl = (size_t)(colon - addr);
    if (hl >= sizeof host)
        return kvr_err_set(err, KVR_EINVAL, "listen address %s: host too long", addr);
    memcpy(host, addr, hl);
    host[hl] = 0;
    if (!host[0])
        snprintf(host, sizeof host, "0.0.0.0");
    int port = atoi(colon + 1);
    struct sockaddr_storage ss;
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)&ss) &&
        uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss))
        return kvr_err_set(err, KVR_EINVAL, "listen address %s: bad host", addr);
    uv_tcp_init(s->loop, &s->listener);
    s->listener.data = s;
    int rc = uv_tcp_bind(&s->listener, (struct sockaddr *)&ss, 0);
    if (!rc)
        rc = uv_listen((uv_stream_t *)&s->listener, 1024, on_conn);
    if (rc) {
        uv_close((uv_handle_t *)&s->listener, NULL);
        return kvr_err_set(err, KVR_EIO, "listen %s: %s", addr, uv_strerror(rc));
    }
    struct sockaddr_storage got;
    int gl = sizeof got;
    uv_tcp_getsockname(&s->listener, (struct sockaddr *)&got, &gl);
    s->port = ntohs(got.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&got)->sin6_port
                                              : ((struct sockaddr_in *)&got)->sin_port);
    s->listening = true;
    return 0;
}

void epp_grpc_close(epp_grpc_server *s)
{
    if (s->listening) {
        uv_close((uv_handle_t *)&s->listener, NULL);
        s->listening = false;
    }
    while (s->conns_)
        conn_close(s->conns_);
}

/* ---------- TLS context ---------- */

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg)
{
    (void)ssl;
    (void)arg;
    static const unsigned char h2[] = {2, 'h', '2'};
    unsigned char *o = NULL;
    if (SSL_select_next_proto(&o, outlen, h2, sizeof h2, in, inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_ALERT_FATAL; /* gRPC is HTTP/2 only */
    *out = o;
    return SSL_TLSEXT_ERR_OK;
}

static int self_signed(SSL_CTX *ctx, kvr_err *err)
{
    EVP_PKEY *k = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    X509_EXTENSION *ext = NULL;
    BIGNUM *bn = NULL;
    int rc = KVR_EIO;
    if (!k || !x)
        goto out;
    unsigned char serial[8];
    uv_random(NULL, NULL, serial, sizeof serial, 0, NULL);
    serial[0] &= 0x7f;
    bn = BN_bin2bn(serial, sizeof serial, NULL);
    if (!bn || !BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)))
        goto out;
    X509_set_version(x, 2);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 10L * 365 * 24 * 3600);
    X509_NAME *nm = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(nm, "CN", MBSTRING_ASC, (const unsigned char *)"kvr-epp", -1, -1, 0);
    X509_set_issuer_name(x, nm);
    X509_set_pubkey(x, k);
    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
    ext = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name,
                              "DNS:kvr-epp,DNS:localhost,IP:127.0.0.1");
    if (!ext || !X509_add_ext(x, ext, -1))
        goto out;
    if (!X509_sign(x, k, EVP_sha256()) || SSL_CTX_use_certificate(ctx, x) != 1 ||
        SSL_CTX_use_PrivateKey(ctx, k) != 1)
        goto out;
    rc = 0;
out:
    X509_EXTENSION_free(ext);
    BN_free(bn);
    X509_free(x);
    EVP_PKEY_free(k);
    if (rc)
        kvr_err_set(err, rc, "self-signed certificate: %s",
                    ERR_reason_error_string(ERR_get_error()));
    return rc;
}

int epp_grpc_tls_ctx(const char *cert_dir, const char *client_ca, void **out, kvr_err *err)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx)
        return kvr_err_set(err, KVR_ENOMEM, "SSL_CTX_new failed");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);
    if (cert_dir && cert_dir[0]) {
        char crt[1024], key[1024];
        snprintf(crt, sizeof crt, "%s/tls.crt", cert_dir);
        snprintf(key, sizeof key, "%s/tls.key", cert_dir);
        if (SSL_CTX_use_certificate_chain_file(ctx, crt) != 1 ||
            SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_check_private_key(ctx) != 1) {
            kvr_err_set(err, KVR_EINVAL, "--cert-path %s: tls.crt / tls.key: %s", cert_dir,
                        ERR_reason_error_string(ERR_get_error()));
            SSL_CTX_free(ctx);
            return KVR_EINVAL;
        }
    } else if (self_signed(ctx, err)) {
        SSL_CTX_free(ctx);
        return KVR_EIO;
    }
    if (client_ca && client_ca[0]) {
        if (SSL_CTX_load_verify_locations(ctx, client_ca, NULL) != 1) {
            kvr_err_set(err, KVR_EINVAL, "--client-ca-file %s: %s", client_ca,
                        ERR_reason_error_string(ERR_get_error()));
            SSL_CTX_free(ctx);
            return KVR_EINVAL;
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    }
    *out = ctx;
    return 0;
}

void epp_grpc_tls_free(void *ctx)
{
    SSL_CTX_free(ctx);
}
