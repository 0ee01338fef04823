/* epp_grpc_conn: epp_grpc's connections (see epp_grpc_int.h): accepted sockets on the loop,
 * TLS records on memory BIOs, the write queue and its back-pressure, the bytes in and out of
 * each connection's nghttp2 session; and the server: init, listener, close, feed. */
#include "epp_grpc_int.h"

#include "kvr_log.h"

#include <openssl/err.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct wreq {
    uv_write_t req;
    epp_grpc_conn *c;
    size_t len;
    char data[];
} wreq;

/* ---------- connection I/O ---------- */

static void on_closed(uv_handle_t *h)
{
    epp_grpc_conn *c = h->data;
    free(c);
}

void epp_grpc_conn_close(epp_grpc_conn *c)
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
    epp_grpc_session_end(c); /* its calls close (cancelled) before the session goes */
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
    epp_grpc_conn *c = w->c;
    c->wpending -= w->len;
    free(w);
    if (c->closing)
        return;
    if (status < 0) {
        epp_grpc_conn_close(c);
        return;
    }
    epp_grpc_conn_flush(c);
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
static int write_raw(epp_grpc_conn *c, const void *data, size_t len)
{
    if (!len || c->fake)
        return 0;
    wreq *w = malloc(sizeof *w + len);
    if (!w) {
        epp_grpc_conn_close(c);
        return -1;
    }
    w->c = c;
    w->len = len;
    memcpy(w->data, data, len);
    uv_buf_t b = uv_buf_init(w->data, (unsigned)len);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_written)) {
        free(w);
        epp_grpc_conn_close(c);
        return -1;
    }
    c->wpending += len;
    return 0;
}

/* TLS: what OpenSSL produced (handshake records, encrypted data) goes to the socket. */
static int drain_tls(epp_grpc_conn *c)
{
    char buf[16384];
    int n;
    while ((n = BIO_read(c->wbio, buf, sizeof buf)) > 0)
        if (write_raw(c, buf, (size_t)n))
            return -1;
    return 0;
}

void epp_grpc_conn_flush(epp_grpc_conn *c)
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
            epp_grpc_conn_close(c);
            return;
        }
        if (n == 0)
            break;
        if (kvr_buf_append(&out, d, (size_t)n)) {
            kvr_buf_free(&out);
            epp_grpc_conn_close(c);
            return;
        }
    }
    int rc = 0;
    if (c->ssl && out.len) {
        /* memory BIOs take everything: SSL_write completes or the session is broken */
        if (SSL_write(c->ssl, out.base, (int)out.len) != (int)out.len) {
            kvr_buf_free(&out);
            epp_grpc_conn_close(c);
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
        epp_grpc_conn_close(c);
}

/* Bytes in for nghttp2 (plaintext). 0 or -1 (closed). */
static int feed(epp_grpc_conn *c, const uint8_t *data, size_t len)
{
    c->in_recv = true;
    ssize_t rv = nghttp2_session_mem_recv(c->ng, data, len);
    c->in_recv = false;
    if (rv < 0) {
        KVR_LOG_DEBUG("h2 protocol error", "err=\"%s\"", nghttp2_strerror((int)rv));
        epp_grpc_conn_close(c);
        return -1;
    }
    return c->closing ? -1 : 0;
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    epp_grpc_conn *c = st->data;
    if (nread < 0) {
        epp_grpc_conn_close(c);
        return;
    }
    if (nread == 0)
        return;
    if (!c->ssl) {
        if (feed(c, (const uint8_t *)buf->base, (size_t)nread) == 0)
            epp_grpc_conn_flush(c);
        return;
    }
    if (BIO_write(c->rbio, buf->base, (int)nread) != (int)nread) {
        epp_grpc_conn_close(c);
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
                epp_grpc_conn_close(c);
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
        epp_grpc_conn_close(c);
        return;
    }
    epp_grpc_conn_flush(c);
}

/* The nghttp2 server session of a new connection, linked into the server. 0, or -1 (closed). */
static int conn_session(epp_grpc_conn *c)
{
    epp_grpc_server *s = c->s;
    int rv = epp_grpc_session_new(c);
    c->next = s->conns_;
    if (c->next)
        c->next->prev = c;
    s->conns_ = c;
    s->stats.connections++;
    if (rv) {
        epp_grpc_conn_close(c);
        return -1;
    }
    return 0;
}

static void on_conn(uv_stream_t *ls, int status)
{
    epp_grpc_server *s = ls->data;
    if (status < 0)
        return;
    epp_grpc_conn *c = calloc(1, sizeof *c);
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
            epp_grpc_conn_close(c);
            return;
        }
        BIO_set_mem_eof_return(c->rbio, -1);   /* empty means "want more", not end of stream */
        SSL_set_bio(c->ssl, c->rbio, c->wbio); /* ssl owns them now */
        SSL_set_accept_state(c->ssl);
    }
    if (uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, on_read)) {
        epp_grpc_conn_close(c);
        return;
    }
    c->reading = true;
    epp_grpc_conn_flush(c);
}

/* ---------- the server ---------- */

int epp_grpc_feed(epp_grpc_server *s, const uint8_t *data, size_t len, size_t piece)
{
    epp_grpc_conn *c = calloc(1, sizeof *c);
    if (!c)
        return KVR_ENOMEM;
    c->s = s;
    c->fake = true;
    if (conn_session(c) == 0) {
        epp_grpc_conn_flush(c);
        for (size_t off = 0; off < len && !c->closing;) {
            size_t n = len - off < piece ? len - off : piece;
            if (feed(c, data + off, n) == 0)
                epp_grpc_conn_flush(c);
            off += n;
        }
    }
    epp_grpc_conn_close(c); /* the calls still open are closed as when a connection drops */
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
        epp_grpc_conn_close(s->conns_);
}
