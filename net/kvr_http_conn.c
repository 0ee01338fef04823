/* kvr_http_conn.c: the connection side of the HTTP server (kvr_http.h): accept, read and
 * dispatch, write with backpressure, timeouts, shedding and closing; the listener and server
 * lifecycle. Shared state in kvr_http_int.h. Loop thread only. */
#include "kvr_http_int.h"
#include "kvr_log.h"

#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void kh_req_free(kvr_http_req *r)
{
    if (r == NULL)
        return;
    kvr_buf_free(&r->head_);
    kvr_buf_free(&r->body_);
    kvr_buf_free(&r->extra_headers_);
    free(r->hdr_offs_);
    free(r);
}

void kh_count_status(kvr_http_server *srv, int status)
{
    int cls = status / 100;
    if (cls >= 1 && cls <= 5)
        srv->stats.responses[cls]++;
}

/* Pipelining backpressure: a client that sends requests but does not read the answers must not
 * make the server queue responses without bound. Over KVR_HTTP_MAX_UNSENT queued writes or
 * stream_high_water queued bytes, the connection neither reads nor dispatches (out_full) until
 * the queue falls to half the count and below stream_low_water. */
static bool out_over(const kvr_http_conn *c)
{
    return c->writes >= KVR_HTTP_MAX_UNSENT ||
           c->tcp.write_queue_size >= c->srv->cfg.stream_high_water;
}

static bool out_drained(const kvr_http_conn *c)
{
    return c->writes <= KVR_HTTP_MAX_UNSENT / 2 &&
           c->tcp.write_queue_size < c->srv->cfg.stream_low_water;
}

/* The reading list: connections with a request begun and not complete, oldest first. It is
 * what gets shed when too many connections are reading at once (slow bodies, slow heads). */
void kh_rlist_add(kvr_http_conn *c)
{
    kvr_http_server *srv = c->srv;
    if (c->in_rlist)
        return;
    c->in_rlist = true;
    c->rnext = NULL;
    c->rprev = srv->rtail_;
    if (srv->rtail_)
        srv->rtail_->rnext = c;
    else
        srv->rhead_ = c;
    srv->rtail_ = c;
    srv->nreading_++;
}

void kh_rlist_del(kvr_http_conn *c)
{
    kvr_http_server *srv = c->srv;
    if (!c->in_rlist)
        return;
    c->in_rlist = false;
    if (c->rprev)
        c->rprev->rnext = c->rnext;
    else
        srv->rhead_ = c->rnext;
    if (c->rnext)
        c->rnext->rprev = c->rprev;
    else
        srv->rtail_ = c->rprev;
    c->rnext = c->rprev = NULL;
    srv->nreading_--;
}

/* ---------------------------------------------------------------- writing */

static void on_write(uv_write_t *w, int status)
{
    wreq *wr = (wreq *)w;
    kvr_http_conn *c = wr->conn;
    free(wr);
    c->writes--;
    if (c->closing)
        return;
    if (status < 0) {
        kh_conn_gone(c);
        return;
    }
    kvr_http_req *r = c->active;
    if (r != NULL && r->want_drain_) {
        if (c->tcp.write_queue_size < c->srv->cfg.stream_low_water) {
            r->want_drain_ = false;
            kh_timer_set(c, T_NONE, 0);
            if (r->on_drain != NULL)
                r->on_drain(r);
            if (c->closing)
                return;
        } else {
            kh_timer_set(c, T_WRITE, c->srv->cfg.write_timeout_ms); /* progress: re-arm */
        }
    }
    if (c->out_full && out_drained(c)) {
        /* The client reads again: serve the pipelined requests that waited. */
        c->out_full = false;
        kh_timer_set(c, T_NONE, 0);
        kh_conn_process(c);
        if (c->closing)
            return;
    } else if (c->out_full) {
        kh_timer_set(c, T_WRITE, c->srv->cfg.write_timeout_ms); /* progress: re-arm */
    }
    if (c->writes == 0 && c->close_after && !c->shut && c->active == NULL)
        kh_conn_start_close(c);
}

/* Queues a+b (copied into one allocation) for writing. */
int kh_conn_write2(kvr_http_conn *c, const char *a, size_t alen, const char *b, size_t blen,
                   const char *t, size_t tlen)
{
    if (c->closing || c->shut)
        return KVR_ECLOSED;
    size_t len = alen + blen + tlen;
    wreq *wr = malloc(sizeof *wr + len);
    if (wr == NULL)
        return KVR_ENOMEM;
    wr->conn = c;
    wr->len = len;
    if (alen)
        memcpy(wr->data, a, alen);
    if (blen)
        memcpy(wr->data + alen, b, blen);
    if (tlen)
        memcpy(wr->data + alen + blen, t, tlen);
    uv_buf_t buf = uv_buf_init(wr->data, (unsigned)len);
    int rv = uv_write(&wr->w, (uv_stream_t *)&c->tcp, &buf, 1, on_write);
    if (rv < 0) {
        free(wr);
        return KVR_EIO;
    }
    c->writes++;
    return 0;
}

/* Server-generated error response; the connection closes after it. */
static void conn_error(kvr_http_conn *c, int status)
{
    kh_rlist_del(c); /* no longer reading a request, never to be shed */
    if (c->closing || c->shut)
        return;
    /* The body is OpenAI-style error JSON: every kvroute HTTP API speaks it, and a client of
     * the frontend must not meet a different error shape just because the server itself,
     * not the handler, refused the request (413, 431, 408, ...). */
    char body[192];
    const char *text = kvr_http_status_text(status);
    int blen = snprintf(body, sizeof body,
                        "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"param\":null,"
                        "\"code\":%d}}\n",
                        text, status >= 500 ? "server_error" : "invalid_request_error", status);
    if (blen < 0 || (size_t)blen >= sizeof body)
        blen = 0;
    char msg[448];
    int n = snprintf(msg, sizeof msg,
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     "%sConnection: close\r\n\r\n%.*s",
                     status, text, blen, status == 503 ? "Retry-After: 1\r\n" : "", blen, body);
    if (n < 0 || (size_t)n >= sizeof msg) {
        kh_conn_gone(c);
        return;
    }
    kh_count_status(c->srv, status);
    c->close_after = true;
    if (c->reading) {
        /* Stop parsing; keep the socket readable only for lingering after shutdown. */
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
    if (kh_conn_write2(c, msg, (size_t)n, NULL, 0, NULL, 0) != 0) {
        kh_conn_gone(c);
        return;
    }
    if (c->writes == 0)
        kh_conn_start_close(c);
}

/* Drops a connection that is still reading its request, to make room (see rlist). It gets a
 * 408 and stops counting towards max_connections at once. */
void kh_conn_shed(kvr_http_conn *c)
{
    kvr_http_server *srv = c->srv;
    kh_rlist_del(c);
    srv->stats.shed++;
    if (c->counted) {
        c->counted = false;
        srv->stats.connections_active--;
    }
    KVR_LOG_WARN_RL(10, "http shedding a slow request", "reading=%u max=%u", srv->nreading_,
                    srv->cfg.max_reading_connections);
    conn_error(c, 408);
}

/* ---------------------------------------------------------------- closing */

static void on_handle_closed(uv_handle_t *h)
{
    kvr_http_conn *c = h->data;
    if (--c->handles_open > 0)
        return;
    kvr_http_server *srv = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    if (c->counted)
        srv->stats.connections_active--;
    kvr_buf_free(&c->in);
    free(c);
    if (srv->closing && srv->listener_closed && srv->conns == NULL && srv->close_cb != NULL) {
        kvr_http_server_close_cb cb = srv->close_cb;
        srv->close_cb = NULL;
        cb(srv);
    }
}

/* The connection is finished: tell an unfinished request, close both handles. */
void kh_conn_gone(kvr_http_conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    uv_timer_stop(&c->timer);
    kh_rlist_del(c);
    kh_req_free(c->cur);
    c->cur = NULL;
    kh_req_free(c->ready);
    c->ready = NULL;
    kvr_http_req *r = c->active;
    c->active = NULL;
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    if (r != NULL) {
        r->conn_ = NULL;
        c->srv->stats.client_gone++;
        if (!r->closed_notified_) {
            r->closed_notified_ = true;
            if (r->on_close != NULL)
                r->on_close(r); /* may finish (and free) r */
        }
    }
}

static void on_linger_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    kvr_http_conn *c = s->data;
    if (nread < 0)
        kh_conn_gone(c); /* EOF: the client has read our answer and closed */
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf);

static void on_shutdown(uv_shutdown_t *sr, int status)
{
    kvr_http_conn *c = sr->data;
    free(sr);
    if (c->closing)
        return;
    if (status < 0) {
        kh_conn_gone(c);
        return;
    }
    /* Lingering: read and discard until the client closes (or a short timer), so that unread
     * request bytes do not turn our close into a reset that destroys the response. */
    kh_timer_set(c, T_LINGER, KVR_HTTP_LINGER_MS);
    if (uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, on_linger_read) != 0)
        kh_conn_gone(c);
}

void kh_conn_start_close(kvr_http_conn *c)
{
    if (c->closing || c->shut)
        return;
    c->shut = true;
    if (c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
    uv_shutdown_t *sr = malloc(sizeof *sr);
    if (sr == NULL) {
        kh_conn_gone(c);
        return;
    }
    sr->data = c;
    if (uv_shutdown(sr, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
        free(sr);
        kh_conn_gone(c);
    }
}

/* ---------------------------------------------------------------- timers */

static void on_timer(uv_timer_t *t)
{
    kvr_http_conn *c = t->data;
    int mode = c->timer_mode;
    c->timer_mode = T_NONE;
    switch (mode) {
    case T_HEADER:
    case T_BODY:
        c->srv->stats.timeouts++;
        if (c->cur != NULL)
            conn_error(c, 408);
        else
            kh_conn_gone(c);
        break;
    case T_IDLE:
        c->srv->stats.timeouts++;
        kh_conn_gone(c);
        break;
    case T_LINGER:
        kh_conn_gone(c);
        break;
    case T_WRITE:
        /* The client stopped reading a paused stream: give up on it. */
        c->srv->stats.timeouts++;
        kh_conn_gone(c);
        break;
    default:
        break;
    }
}

void kh_timer_set(kvr_http_conn *c, int mode, uint64_t ms)
{
    if (c->closing)
        return;
    if (mode == T_NONE) {
        if (c->timer_mode != T_NONE)
            uv_timer_stop(&c->timer);
    } else {
        uv_timer_start(&c->timer, on_timer, ms, 0);
    }
    c->timer_mode = mode;
}

/* ---------------------------------------------------------------- reading */

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    kvr_http_conn *c = h->data;
    /* One read buffer per server: the loop thread consumes it fully before the next read. */
    buf->base = c->srv->readbuf_;
    buf->len = KVR_HTTP_READ_BUF;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    kvr_http_conn *c = s->data;
    if (nread == 0)
        return;
    if (nread < 0) {
        /* EOF between requests is a normal close; during one, the client is gone. */
        kh_conn_gone(c);
        return;
    }
    if (c->in_off == c->in.len) {
        c->in.len = 0;
        c->in_off = 0;
    } else if (c->in_off > 0 && c->in.cap - c->in.len < (size_t)nread) {
        memmove(c->in.base, c->in.base + c->in_off, c->in.len - c->in_off);
        c->in.len -= c->in_off;
        c->in_off = 0;
    }
    if (kvr_buf_append(&c->in, buf->base, (size_t)nread) != 0) {
        kh_conn_gone(c);
        return;
    }
    if (c->out_full) {
        /* Bytes that were in flight when reading stopped: keep them for later. */
        if (c->reading) {
            uv_read_stop(s);
            c->reading = false;
        }
        return;
    }
    if (c->active != NULL || c->ready != NULL) {
        if (c->in.len - c->in_off >= KVR_HTTP_MAX_PIPELINED && c->reading) {
            uv_read_stop(s);
            c->reading = false;
        }
        return;
    }
    kh_conn_process(c);
}

static void conn_read_start(kvr_http_conn *c)
{
    if (c->reading || c->closing || c->shut)
        return;
    if (uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, on_read) == 0)
        c->reading = true;
}

static void dispatch(kvr_http_conn *c)
{
    kvr_http_req *r = c->ready;
    c->ready = NULL;
    r->conn_ = c;
    c->active = r;
    kh_timer_set(c, T_NONE, 0);
    if (!r->keep_alive)
        c->close_after = true;
    c->srv->stats.requests++;
    c->srv->cfg.on_request(r);
}

static int map_error(kvr_http_conn *c, llhttp_errno_t e)
{
    if (c->err_status)
        return c->err_status;
    switch (e) {
    case HPE_INVALID_TRANSFER_ENCODING:
        return 501;
    default:
        return 400;
    }
}

/* Parses buffered input and dispatches complete requests, one at a time. */
void kh_conn_process(kvr_http_conn *c)
{
    if (c->in_process)
        return;
    c->in_process = true;
    while (!c->closing && !c->close_after && c->active == NULL) {
        if (out_over(c)) {
            /* The client is not reading our answers: stop reading its requests until it
             * does (on_write resumes), and give up if it makes no progress. */
            c->out_full = true;
            if (c->reading) {
                uv_read_stop((uv_stream_t *)&c->tcp);
                c->reading = false;
            }
            kh_timer_set(c, T_WRITE, c->srv->cfg.write_timeout_ms);
            break;
        }
        if (c->ready != NULL) {
            dispatch(c);
            continue;
        }
        size_t avail = c->in.len - c->in_off;
        if (avail == 0)
            break;
        if (llhttp_get_errno(&c->parser) == HPE_PAUSED)
            llhttp_resume(&c->parser);
        const char *start = c->in.base + c->in_off;
        llhttp_errno_t e = llhttp_execute(&c->parser, start, avail);
        if (e == HPE_OK) {
            c->in_off += avail;
        } else if (e == HPE_PAUSED) {
            c->in_off += (size_t)(llhttp_get_error_pos(&c->parser) - start);
        } else {
            int status = map_error(c, e);
            if (status != 431 && status != 413)
                KVR_LOG_DEBUG("http parse error", "err=%s reason=\"%s\"", llhttp_errno_name(e),
                              c->parser.reason ? c->parser.reason : "");
            c->srv->stats.parse_errors++;
            kh_rlist_del(c);
            kh_req_free(c->cur);
            c->cur = NULL;
            conn_error(c, status);
            break;
        }
    }
    c->in_process = false;
    if (c->closing || c->shut || c->out_full)
        return;
    if (c->active == NULL && c->ready == NULL) {
        if (c->close_after) {
            if (c->writes == 0)
                kh_conn_start_close(c);
            return;
        }
        if (c->in_off == c->in.len && c->in.cap > KVR_HTTP_MAX_PIPELINED) {
            /* Drop a buffer grown by a big body. */
            kvr_buf_free(&c->in);
            c->in_off = 0;
        }
        conn_read_start(c);
        if (c->cur == NULL && c->timer_mode != T_IDLE)
            kh_timer_set(c, T_IDLE, c->srv->cfg.idle_timeout_ms);
        else if (c->cur != NULL && c->timer_mode == T_NONE)
            kh_timer_set(c, T_BODY, c->srv->cfg.header_timeout_ms); /* was paused by out_full */
    }
}

/* ---------------------------------------------------------------- accept */

static void on_connection(uv_stream_t *ls, int status)
{
    kvr_http_server *srv = ls->data;
    if (status < 0) {
        KVR_LOG_WARN_RL(10, "http accept failed", "err=\"%s\"", uv_strerror(status));
        return;
    }
    kvr_http_conn *c = calloc(1, sizeof *c);
    if (c == NULL)
        return;
    c->srv = srv;
    if (uv_tcp_init(srv->loop, &c->tcp) != 0) {
        free(c);
        return;
    }
    c->tcp.data = c;
    uv_timer_init(srv->loop, &c->timer);
    c->timer.data = c;
    c->handles_open = 2;
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    if (uv_accept(ls, (uv_stream_t *)&c->tcp) != 0) {
        kh_conn_gone(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    llhttp_init(&c->parser, HTTP_REQUEST, kh_settings());
    c->parser.data = c;
    srv->stats.connections_accepted++;
    /* At the limit, a connection still reading its request after the others is worth less
     * than a new client: shed the oldest reader to make room. Only when every connection is
     * being served (or idle) is the new one refused. */
    if (srv->stats.connections_active >= srv->cfg.max_connections && srv->rhead_ != NULL)
        kh_conn_shed(srv->rhead_);
    if (srv->stats.connections_active >= srv->cfg.max_connections) {
        srv->stats.connections_rejected++;
        KVR_LOG_WARN_RL(10, "http connection limit", "max=%u", srv->cfg.max_connections);
        conn_error(c, 503);
        return;
    }
    srv->stats.connections_active++;
    c->counted = true;
    /* A new connection is reading its first request from now on (its deadline counts from
     * here too): it takes a reading slot, shedding the oldest reader if none is free. */
    while (srv->nreading_ >= srv->cfg.max_reading_connections && srv->rhead_ != NULL)
        kh_conn_shed(srv->rhead_);
    kh_rlist_add(c);
    c->req_start_ms = uv_now(srv->loop);
    kh_timer_set(c, T_HEADER, srv->cfg.header_timeout_ms);
    conn_read_start(c);
}

/* ---------------------------------------------------------------- server */

int kvr_http_server_init(kvr_http_server *srv, uv_loop_t *loop, const kvr_http_config *cfg)
{
    if (cfg == NULL || cfg->on_request == NULL)
        return KVR_EINVAL;
    (void)kh_settings(); /* parser callbacks ready before the first connection */
    void *data = srv->data;
    memset(srv, 0, sizeof *srv);
    srv->data = data;
    srv->loop = loop;
    srv->cfg = *cfg;
    if (!srv->cfg.max_header_bytes)
        srv->cfg.max_header_bytes = 16 * 1024;
    if (!srv->cfg.max_body_bytes)
        srv->cfg.max_body_bytes = 16 * 1024 * 1024;
    if (!srv->cfg.header_timeout_ms)
        srv->cfg.header_timeout_ms = 10000;
    if (!srv->cfg.idle_timeout_ms)
        srv->cfg.idle_timeout_ms = 60000;
    if (!srv->cfg.max_connections)
        srv->cfg.max_connections = 10000;
    if (!srv->cfg.request_timeout_ms)
        srv->cfg.request_timeout_ms = 30000;
    if (!srv->cfg.max_reading_connections)
        srv->cfg.max_reading_connections = 1024;
    if (!srv->cfg.write_timeout_ms)
        srv->cfg.write_timeout_ms = 60000;
    if (!srv->cfg.stream_high_water)
        srv->cfg.stream_high_water = 256 * 1024;
    if (!srv->cfg.stream_low_water)
        srv->cfg.stream_low_water = 64 * 1024;
    if (srv->cfg.stream_low_water > srv->cfg.stream_high_water)
        srv->cfg.stream_low_water = srv->cfg.stream_high_water;
    srv->readbuf_ = malloc(KVR_HTTP_READ_BUF);
    if (srv->readbuf_ == NULL)
        return KVR_ENOMEM;
    if (uv_tcp_init(loop, &srv->listener) != 0) {
        free(srv->readbuf_);
        srv->readbuf_ = NULL;
        return KVR_EIO;
    }
    srv->listener.data = srv;
    return 0;
}

static int parse_addr(const char *addr, struct sockaddr_storage *ss, kvr_err *err)
{
    const char *colon = strrchr(addr, ':');
    if (colon == NULL)
        return kvr_err_set(err, KVR_EINVAL, "address '%s' has no ':port'", addr);
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (colon[1] == '\0' || *end != '\0' || port < 0 || port > 65535)
        return kvr_err_set(err, KVR_EINVAL, "address '%s': bad port", addr);
    char host[256];
    size_t hl = (size_t)(colon - addr);
    if (hl >= sizeof host)
        return kvr_err_set(err, KVR_EINVAL, "address '%s': host too long", addr);
    memcpy(host, addr, hl);
    host[hl] = '\0';
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
        host[hl - 1] = '\0';
        if (uv_ip6_addr(host + 1, (int)port, (struct sockaddr_in6 *)ss) != 0)
            return kvr_err_set(err, KVR_EINVAL, "address '%s': bad IPv6 host", addr);
        return 0;
    }
    if (hl == 0)
        strcpy(host, "0.0.0.0");
    if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)ss) == 0)
        return 0;
    /* A host name: resolved once, at start-up (blocking is fine here). */
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int rc = getaddrinfo(host, NULL, &hints, &res);
    if (rc != 0 || res == NULL)
        return kvr_err_set(err, KVR_EINVAL, "address '%s': cannot resolve '%s': %s", addr, host,
                           rc ? gai_strerror(rc) : "no address");
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
    freeaddrinfo(res);
    return 0;
}

int kvr_http_listen(kvr_http_server *srv, const char *addr, kvr_err *err)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    int rv = parse_addr(addr, &ss, err);
    if (rv != 0)
        return rv;
    rv = uv_tcp_bind(&srv->listener, (const struct sockaddr *)&ss, 0);
    if (rv == 0)
        rv = uv_listen((uv_stream_t *)&srv->listener, 1024, on_connection);
    if (rv != 0)
        return kvr_err_set(err, KVR_EIO, "listening on %s: %s", addr, uv_strerror(rv));
    struct sockaddr_storage bound;
    int len = sizeof bound;
    if (uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&bound, &len) == 0) {
        if (bound.ss_family == AF_INET)
            srv->port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
        else
            srv->port = ntohs(((struct sockaddr_in6 *)&bound)->sin6_port);
    }
    srv->listening = true;
    return 0;
}

int kvr_http_server_port(const kvr_http_server *srv)
{
    return srv->port;
}

static void on_listener_closed(uv_handle_t *h)
{
    kvr_http_server *srv = h->data;
    srv->listener_closed = true;
    if (!srv->closing)
        return; /* kvr_http_server_stop_listening: live connections still read into readbuf_ */
    free(srv->readbuf_);
    srv->readbuf_ = NULL;
    if (srv->conns == NULL && srv->close_cb != NULL) {
        kvr_http_server_close_cb cb = srv->close_cb;
        srv->close_cb = NULL;
        cb(srv);
    }
}

void kvr_http_server_close(kvr_http_server *srv, kvr_http_server_close_cb close_cb)
{
    if (srv->closing)
        return;
    srv->closing = true;
    srv->close_cb = close_cb;
    kvr_http_conn *c = srv->conns;
    while (c != NULL) {
        kvr_http_conn *next = c->next; /* stays linked until its handles close */
        kh_conn_gone(c);
        c = next;
    }
    if (!uv_is_closing((uv_handle_t *)&srv->listener)) {
        uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
    } else if (srv->listener_closed) {
        /* closed earlier by kvr_http_server_stop_listening; the connections have stopped
         * reading (kh_conn_gone) */
        free(srv->readbuf_);
        srv->readbuf_ = NULL;
        if (srv->conns == NULL && srv->close_cb != NULL) {
            kvr_http_server_close_cb cb = srv->close_cb;
            srv->close_cb = NULL;
            cb(srv);
        }
    }
}

size_t kvr_http_server_writes_pending(const kvr_http_server *srv)
{
    size_t n = 0;
    for (const kvr_http_conn *c = srv->conns; c != NULL; c = c->next)
        n += c->closing ? 0 : (size_t)c->writes;
    return n;
}

void kvr_http_server_stop_listening(kvr_http_server *srv)
{
    if (!uv_is_closing((uv_handle_t *)&srv->listener))
        uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
}
