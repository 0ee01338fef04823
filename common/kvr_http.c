/* kvr_http: HTTP/1.1 server on libuv + llhttp. See kvr_http.h for the contract.
 *
 * Per connection: one uv_tcp_t, one uv_timer_t (header/body/idle/linger timeouts), one llhttp
 * parser, and `in`, the input not yet parsed. Input is always appended to `in` and parsed from
 * there, so the parser can stop (paused) at the end of a request while the handler works; the
 * rest waits in `in` (bounded: reading stops when it is full). The request being parsed owns
 * copies of its head and body, so a handler can keep it after the connection is gone. */
#include "kvr_http.h"
#include "kvr_log.h"

#include <llhttp.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define KVR_HTTP_READ_BUF (64 * 1024)
#define KVR_HTTP_MAX_PIPELINED (64 * 1024) /* buffered input while a request is handled */
#define KVR_HTTP_MAX_HEADERS 100
#define KVR_HTTP_MAX_EXTRA_HEADERS 8192
#define KVR_HTTP_LINGER_MS 2000
#define KVR_HTTP_MAX_UNSENT 64 /* responses queued to a client that does not read */

enum { T_NONE, T_HEADER, T_BODY, T_IDLE, T_LINGER, T_WRITE };
enum { RS_HANDLING = 0, RS_STREAMING = 1, RS_FINISHED = 2 };
enum { H_NONE, H_FIELD, H_VALUE };

struct kvr_http_conn {
    kvr_http_conn *next, *prev;
    kvr_http_server *srv;
    uv_tcp_t tcp;
    uv_timer_t timer;
    llhttp_t parser;
    kvr_buf in;
    size_t in_off;
    kvr_http_req *cur;    /* being parsed */
    kvr_http_req *ready;  /* complete, set by on_message_complete, not yet dispatched */
    kvr_http_req *active; /* handed to the handler, not finished */
    size_t head_bytes;
    size_t url_off, url_len;
    int hstate;
    bool in_body;          /* head complete: header callbacks now carry trailer fields */
    bool out_full;         /* unsent responses over the bound: not reading, not dispatching */
    uint64_t req_start_ms; /* uv_now() at the first byte of the request being parsed */
    kvr_http_conn *rnext, *rprev; /* srv->reading list (oldest first) while cur != NULL */
    bool in_rlist;
    int err_status; /* status to answer a parse error with (0 → 400) */
    int timer_mode;
    int writes; /* outstanding uv_write requests */
    int handles_open;
    bool reading;
    bool in_process;
    bool closing;     /* uv_close called */
    bool close_after; /* no more requests: shut down once writes are done */
    bool shut;        /* shutdown requested */
    bool counted;     /* counts in connections_active */
};

typedef struct wreq {
    uv_write_t w;
    kvr_http_conn *conn;
    size_t len;
    char data[];
} wreq;

static llhttp_settings_t g_settings;
static pthread_once_t g_settings_once = PTHREAD_ONCE_INIT;

static void conn_process(kvr_http_conn *c);
static void conn_gone(kvr_http_conn *c);
static void conn_start_close(kvr_http_conn *c);

/* ---------------------------------------------------------------- helpers */

const char *kvr_http_status_text(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 204:
        return "No Content";
    case 301:
        return "Moved Permanently";
    case 302:
        return "Found";
    case 304:
        return "Not Modified";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 406:
        return "Not Acceptable";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 410:
        return "Gone";
    case 411:
        return "Length Required";
    case 412:
        return "Precondition Failed";
    case 413:
        return "Payload Too Large";
    case 414:
        return "URI Too Long";
    case 415:
        return "Unsupported Media Type";
    case 416:
        return "Range Not Satisfiable";
    case 417:
        return "Expectation Failed";
    case 422:
        return "Unprocessable Entity";
    case 426:
        return "Upgrade Required";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 499:
        return "Client Closed Request";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 505:
        return "HTTP Version Not Supported";
    case 507:
        return "Insufficient Storage";
    default:
        return "Unknown";
    }
}

static void req_free(kvr_http_req *r)
{
    if (r == NULL)
        return;
    kvr_buf_free(&r->head_);
    kvr_buf_free(&r->body_);
    kvr_buf_free(&r->extra_headers_);
    free(r->hdr_offs_);
    free(r);
}

static void count_status(kvr_http_server *srv, int status)
{
    int cls = status / 100;
    if (cls >= 1 && cls <= 5)
        srv->stats.responses[cls]++;
}

static void timer_set(kvr_http_conn *c, int mode, uint64_t ms);

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
static void rlist_add(kvr_http_conn *c)
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

static void rlist_del(kvr_http_conn *c)
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
        conn_gone(c);
        return;
    }
    kvr_http_req *r = c->active;
    if (r != NULL && r->want_drain_) {
        if (c->tcp.write_queue_size < c->srv->cfg.stream_low_water) {
            r->want_drain_ = false;
            timer_set(c, T_NONE, 0);
            if (r->on_drain != NULL)
                r->on_drain(r);
            if (c->closing)
                return;
        } else {
            timer_set(c, T_WRITE, c->srv->cfg.write_timeout_ms); /* progress: re-arm */
        }
    }
    if (c->out_full && out_drained(c)) {
        /* The client reads again: serve the pipelined requests that waited. */
        c->out_full = false;
        timer_set(c, T_NONE, 0);
        conn_process(c);
        if (c->closing)
            return;
    } else if (c->out_full) {
        timer_set(c, T_WRITE, c->srv->cfg.write_timeout_ms); /* progress: re-arm */
    }
    if (c->writes == 0 && c->close_after && !c->shut && c->active == NULL)
        conn_start_close(c);
}

/* Queues a+b (copied into one allocation) for writing. */
static int conn_write2(kvr_http_conn *c, const char *a, size_t alen, const char *b, size_t blen,
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
    rlist_del(c); /* no longer reading a request, never to be shed */
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
        conn_gone(c);
        return;
    }
    count_status(c->srv, status);
    c->close_after = true;
    if (c->reading) {
        /* Stop parsing; keep the socket readable only for lingering after shutdown. */
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
    if (conn_write2(c, msg, (size_t)n, NULL, 0, NULL, 0) != 0) {
        conn_gone(c);
        return;
    }
    if (c->writes == 0)
        conn_start_close(c);
}

/* Drops a connection that is still reading its request, to make room (see rlist). It gets a
 * 408 and stops counting towards max_connections at once. */
static void conn_shed(kvr_http_conn *c)
{
    kvr_http_server *srv = c->srv;
    rlist_del(c);
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
static void conn_gone(kvr_http_conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    uv_timer_stop(&c->timer);
    rlist_del(c);
    req_free(c->cur);
    c->cur = NULL;
    req_free(c->ready);
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
        conn_gone(c); /* EOF: the client has read our answer and closed */
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf);

static void on_shutdown(uv_shutdown_t *sr, int status)
{
    kvr_http_conn *c = sr->data;
    free(sr);
    if (c->closing)
        return;
    if (status < 0) {
        conn_gone(c);
        return;
    }
    /* Lingering: read and discard until the client closes (or a short timer), so that unread
     * request bytes do not turn our close into a reset that destroys the response. */
    timer_set(c, T_LINGER, KVR_HTTP_LINGER_MS);
    if (uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, on_linger_read) != 0)
        conn_gone(c);
}

static void conn_start_close(kvr_http_conn *c)
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
        conn_gone(c);
        return;
    }
    sr->data = c;
    if (uv_shutdown(sr, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
        free(sr);
        conn_gone(c);
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
            conn_gone(c);
        break;
    case T_IDLE:
        c->srv->stats.timeouts++;
        conn_gone(c);
        break;
    case T_LINGER:
        conn_gone(c);
        break;
    case T_WRITE:
        /* The client stopped reading a paused stream: give up on it. */
        c->srv->stats.timeouts++;
        conn_gone(c);
        break;
    default:
        break;
    }
}

static void timer_set(kvr_http_conn *c, int mode, uint64_t ms)
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

/* ---------------------------------------------------------------- parsing */

static kvr_http_conn *P(llhttp_t *p)
{
    return p->data;
}

static int head_append(kvr_http_conn *c, const char *at, size_t len)
{
    c->head_bytes += len;
    if (c->head_bytes > c->srv->cfg.max_header_bytes) {
        c->err_status = 431;
        return -1;
    }
    if (kvr_buf_append(&c->cur->head_, at, len) != 0) {
        c->err_status = 503;
        return -1;
    }
    return 0;
}

static int cb_message_begin(llhttp_t *p)
{
    kvr_http_conn *c = P(p);
    kvr_http_req *r = calloc(1, sizeof *r);
    if (r == NULL) {
        c->err_status = 503;
        return -1;
    }
    r->server = c->srv;
    c->cur = r;
    kvr_http_server *srv = c->srv;
    /* Too many connections reading a request at once (slow heads, trickled bodies): shed the
     * one that has been at it longest. A short request is read within one loop turn, so it is
     * never the oldest; a new client always gets a slot. A new connection was admitted (and
     * listed) at accept. */
    if (!c->in_rlist) {
        while (srv->nreading_ >= srv->cfg.max_reading_connections && srv->rhead_ != NULL)
            conn_shed(srv->rhead_);
        rlist_add(c);
        c->req_start_ms = uv_now(srv->loop);
    }
    c->head_bytes = 0;
    c->url_off = c->url_len = 0;
    c->hstate = H_NONE;
    c->in_body = false;
    /* Slow-loris bound: the whole head must arrive within header_timeout_ms (and within the
     * request deadline). */
    if (c->timer_mode != T_HEADER) {
        uint64_t ms = srv->cfg.header_timeout_ms;
        if (ms > srv->cfg.request_timeout_ms)
            ms = srv->cfg.request_timeout_ms;
        timer_set(c, T_HEADER, ms);
    }
    return 0;
}

static int cb_url(llhttp_t *p, const char *at, size_t len)
{
    kvr_http_conn *c = P(p);
    if (c->url_len == 0)
        c->url_off = c->cur->head_.len;
    c->url_len += len;
    return head_append(c, at, len);
}

/* Trailer fields (after a chunked body) come through the header callbacks again. They are
 * counted against max_header_bytes and dropped: appending them to head_ would realloc it under
 * the path/query/header slices handed out at headers_complete (a use-after-free), and no route
 * reads trailers. */
static int trailer_bytes(kvr_http_conn *c, size_t len)
{
    c->head_bytes += len;
    if (c->head_bytes > c->srv->cfg.max_header_bytes) {
        c->err_status = 431;
        return -1;
    }
    return 0;
}

static int cb_header_field(llhttp_t *p, const char *at, size_t len)
{
    kvr_http_conn *c = P(p);
    kvr_http_req *r = c->cur;
    if (c->in_body)
        return trailer_bytes(c, len);
    if (c->hstate != H_FIELD) {
        if (r->nhdr_ >= KVR_HTTP_MAX_HEADERS) {
            c->err_status = 431;
            return -1;
        }
        if (r->hdr_offs_ == NULL) {
            r->hdr_offs_ = malloc(sizeof(uint32_t) * 4 * KVR_HTTP_MAX_HEADERS);
            if (r->hdr_offs_ == NULL) {
                c->err_status = 503;
                return -1;
            }
        }
        uint32_t *h = r->hdr_offs_ + 4 * r->nhdr_++;
        h[0] = (uint32_t)r->head_.len;
        h[1] = h[2] = h[3] = 0;
        c->hstate = H_FIELD;
    }
    r->hdr_offs_[4 * (r->nhdr_ - 1) + 1] += (uint32_t)len;
    return head_append(c, at, len);
}

static int cb_header_value(llhttp_t *p, const char *at, size_t len)
{
    kvr_http_conn *c = P(p);
    kvr_http_req *r = c->cur;
    if (c->in_body)
        return trailer_bytes(c, len);
    if (r->nhdr_ == 0)
        return 0;
    uint32_t *h = r->hdr_offs_ + 4 * (r->nhdr_ - 1);
    if (c->hstate != H_VALUE) {
        h[2] = (uint32_t)r->head_.len;
        c->hstate = H_VALUE;
    }
    h[3] += (uint32_t)len;
    return head_append(c, at, len);
}

static kvr_slice trim(kvr_slice s)
{
    while (s.len && (s.base[0] == ' ' || s.base[0] == '\t')) {
        s.base++;
        s.len--;
    }
    while (s.len && (s.base[s.len - 1] == ' ' || s.base[s.len - 1] == '\t'))
        s.len--;
    return s;
}

static int cb_headers_complete(llhttp_t *p)
{
    kvr_http_conn *c = P(p);
    kvr_http_req *r = c->cur;
    kvr_http_server *srv = c->srv;
    if (p->upgrade || p->method == HTTP_CONNECT) {
        c->err_status = 501;
        return -1;
    }
    /* Slices into head_ are fixed now: the head is complete and no longer grows (trailers
     * are not appended, see trailer_bytes()). */
    c->in_body = true;
    const char *m = llhttp_method_name((llhttp_method_t)p->method);
    r->method = kvr_slice_of(m);
    r->is_head_ = p->method == HTTP_HEAD;
    kvr_slice url = {r->head_.base ? r->head_.base + c->url_off : "", c->url_len};
    const char *q = memchr(url.base, '?', url.len);
    if (q != NULL) {
        r->path = (kvr_slice){url.base, (size_t)(q - url.base)};
        r->query = (kvr_slice){q + 1, url.len - r->path.len - 1};
    } else {
        r->path = url;
        r->query = (kvr_slice){"", 0};
    }
    r->http_minor = p->http_minor;
    if (p->flags & F_CONTENT_LENGTH) {
        if (p->content_length > srv->cfg.max_body_bytes) {
            c->err_status = 413;
            return -1;
        }
        /* Reserve at most 64 KiB up front: a client announcing a big body and sending
         * nothing must not cost that much memory. */
        size_t want = p->content_length < 65536 ? (size_t)p->content_length : 65536;
        if (want > 0 && kvr_buf_reserve(&r->body_, want) != 0) {
            c->err_status = 503;
            return -1;
        }
    }
    kvr_slice expect = kvr_http_req_header(r, "expect");
    if (expect.len) {
        kvr_slice e = trim(expect);
        if (e.len == 12 && strncasecmp(e.base, "100-continue", 12) == 0) {
            static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
            conn_write2(c, cont, sizeof cont - 1, NULL, 0, NULL, 0);
        } else {
            c->err_status = 417;
            return -1;
        }
    }
    /* The body must be complete by the request deadline, counted from the request's first
     * byte. It is not re-armed by reads: a client trickling one byte at a time must not hold
     * a connection (and its body buffer) for longer than a fast one. */
    uint64_t elapsed = uv_now(srv->loop) - c->req_start_ms;
    uint64_t left =
        elapsed < srv->cfg.request_timeout_ms ? srv->cfg.request_timeout_ms - elapsed : 1;
    timer_set(c, T_BODY, left);
    return 0;
}

/* A chunk's size is known before its data: refuse a body that will cross max_body_bytes now,
 * not after reading up to the limit. */
static int cb_chunk_header(llhttp_t *p)
{
    kvr_http_conn *c = P(p);
    kvr_http_req *r = c->cur;
    if (p->content_length > c->srv->cfg.max_body_bytes - r->body_.len) {
        c->err_status = 413;
        return -1;
    }
    return 0;
}

static int cb_body(llhttp_t *p, const char *at, size_t len)
{
    kvr_http_conn *c = P(p);
    kvr_http_req *r = c->cur;
    if (r->body_.len + len > c->srv->cfg.max_body_bytes) {
        c->err_status = 413;
        return -1;
    }
    if (kvr_buf_append(&r->body_, at, len) != 0) {
        c->err_status = 503;
        return -1;
    }
    return 0;
}

static int cb_message_complete(llhttp_t *p)
{
    kvr_http_conn *c = P(p);
    kvr_http_req *r = c->cur;
    c->cur = NULL;
    rlist_del(c);
    r->body = (kvr_slice){r->body_.base ? r->body_.base : "", r->body_.len};
    r->keep_alive = llhttp_should_keep_alive(p) != 0;
    c->ready = r;
    return HPE_PAUSED;
}

static void settings_setup(void)
{
    llhttp_settings_init(&g_settings);
    g_settings.on_message_begin = cb_message_begin;
    g_settings.on_url = cb_url;
    g_settings.on_header_field = cb_header_field;
    g_settings.on_header_value = cb_header_value;
    g_settings.on_headers_complete = cb_headers_complete;
    g_settings.on_body = cb_body;
    g_settings.on_chunk_header = cb_chunk_header;
    g_settings.on_message_complete = cb_message_complete;
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
        conn_gone(c);
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
        conn_gone(c);
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
    conn_process(c);
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
    timer_set(c, T_NONE, 0);
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
static void conn_process(kvr_http_conn *c)
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
            timer_set(c, T_WRITE, c->srv->cfg.write_timeout_ms);
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
            rlist_del(c);
            req_free(c->cur);
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
                conn_start_close(c);
            return;
        }
        if (c->in_off == c->in.len && c->in.cap > KVR_HTTP_MAX_PIPELINED) {
            /* Drop a buffer grown by a big body. */
            kvr_buf_free(&c->in);
            c->in_off = 0;
        }
        conn_read_start(c);
        if (c->cur == NULL && c->timer_mode != T_IDLE)
            timer_set(c, T_IDLE, c->srv->cfg.idle_timeout_ms);
        else if (c->cur != NULL && c->timer_mode == T_NONE)
            timer_set(c, T_BODY, c->srv->cfg.header_timeout_ms); /* was paused by out_full */
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
        conn_gone(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    llhttp_init(&c->parser, HTTP_REQUEST, &g_settings);
    c->parser.data = c;
    srv->stats.connections_accepted++;
    /* At the limit, a connection still reading its request after the others is worth less
     * than a new client: shed the oldest reader to make room. Only when every connection is
     * being served (or idle) is the new one refused. */
    if (srv->stats.connections_active >= srv->cfg.max_connections && srv->rhead_ != NULL)
        conn_shed(srv->rhead_);
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
        conn_shed(srv->rhead_);
    rlist_add(c);
    c->req_start_ms = uv_now(srv->loop);
    timer_set(c, T_HEADER, srv->cfg.header_timeout_ms);
    conn_read_start(c);
}

/* ---------------------------------------------------------------- server */

int kvr_http_server_init(kvr_http_server *srv, uv_loop_t *loop, const kvr_http_config *cfg)
{
    if (cfg == NULL || cfg->on_request == NULL)
        return KVR_EINVAL;
    pthread_once(&g_settings_once, settings_setup);
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
        conn_gone(c);
        c = next;
    }
    if (!uv_is_closing((uv_handle_t *)&srv->listener)) {
        uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
    } else if (srv->listener_closed) {
        /* closed earlier by kvr_http_server_stop_listening; the connections have stopped
         * reading (conn_gone) */
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

/* ---------------------------------------------------------------- requests */

kvr_slice kvr_http_req_header(const kvr_http_req *req, const char *name)
{
    size_t nl = strlen(name);
    for (size_t i = 0; i < req->nhdr_; i++) {
        const uint32_t *h = req->hdr_offs_ + 4 * i;
        if (h[1] == nl && strncasecmp(req->head_.base + h[0], name, nl) == 0)
            return trim((kvr_slice){req->head_.base + h[2], h[3]});
    }
    return (kvr_slice){NULL, 0};
}

size_t kvr_http_req_header_count(const kvr_http_req *req)
{
    return req->nhdr_;
}

void kvr_http_req_header_at(const kvr_http_req *req, size_t i, kvr_slice *name, kvr_slice *value)
{
    if (i >= req->nhdr_) {
        *name = *value = (kvr_slice){NULL, 0};
        return;
    }
    const uint32_t *h = req->hdr_offs_ + 4 * i;
    *name = (kvr_slice){req->head_.base + h[0], h[1]};
    *value = trim((kvr_slice){req->head_.base + h[2], h[3]});
}

bool kvr_http_req_closed(const kvr_http_req *req)
{
    return req->conn_ == NULL || req->conn_->closing || req->conn_->shut;
}

static bool has_crlf(const char *s)
{
    return strpbrk(s, "\r\n") != NULL;
}

int kvr_http_add_header(kvr_http_req *req, const char *name, const char *value)
{
    if (req->state_ != RS_HANDLING || has_crlf(name) || has_crlf(value) || name[0] == '\0')
        return KVR_EINVAL;
    size_t add = strlen(name) + strlen(value) + 4;
    if (req->extra_headers_.len + add > KVR_HTTP_MAX_EXTRA_HEADERS)
        return KVR_ELIMIT;
    return kvr_buf_appendf(&req->extra_headers_, "%s: %s\r\n", name, value);
}

/* Frees req; if its connection lives, moves on to the next request. */
static void req_finish(kvr_http_req *req)
{
    kvr_http_conn *c = req->conn_;
    req->state_ = RS_FINISHED;
    if (c == NULL) {
        req_free(req);
        return;
    }
    c->active = NULL;
    req_free(req);
    if (c->close_after) {
        if (c->writes == 0)
            conn_start_close(c);
        return;
    }
    conn_process(c);
}

/* Formats the status line and headers into out. */
static int format_head(kvr_http_req *req, int status, const char *ct, const char *framing,
                       char *out, size_t cap)
{
    kvr_http_conn *c = req->conn_;
    const char *conn_hdr = "";
    if (c->close_after || !req->keep_alive)
        conn_hdr = "Connection: close\r\n";
    else if (req->http_minor == 0)
        conn_hdr = "Connection: keep-alive\r\n";
    int n = snprintf(out, cap, "HTTP/1.1 %d %s\r\n%s%s%s%s%.*s\r\n", status,
                     kvr_http_status_text(status), ct ? "Content-Type: " : "", ct ? ct : "",
                     ct ? "\r\n" : "", framing, (int)req->extra_headers_.len,
                     req->extra_headers_.base ? req->extra_headers_.base : "");
    if (n < 0 || (size_t)n >= cap)
        return -1;
    /* Connection goes before the blank line: rewrite the tail. */
    size_t cl = strlen(conn_hdr);
    if (cl) {
        if ((size_t)n + cl >= cap)
            return -1;
        memcpy(out + n - 2, conn_hdr, cl);
        memcpy(out + n - 2 + cl, "\r\n", 2);
        n += (int)cl;
    }
    return n;
}

int kvr_http_respond(kvr_http_req *req, int status, const char *content_type, const void *body,
                     size_t len)
{
    if (req->state_ != RS_HANDLING)
        return KVR_EINVAL;
    kvr_http_conn *c = req->conn_;
    if (c == NULL || c->closing || c->shut) {
        req_finish(req);
        return KVR_ECLOSED;
    }
    if (!req->keep_alive)
        c->close_after = true;
    char stackbuf[1024];
    char *head = stackbuf;
    size_t cap = sizeof stackbuf;
    if (req->extra_headers_.len + 256 > cap) {
        cap = req->extra_headers_.len + 512;
        head = malloc(cap);
        if (head == NULL) {
            c->close_after = true;
            req_finish(req);
            return KVR_ENOMEM;
        }
    }
    char framing[64];
    snprintf(framing, sizeof framing, "Content-Length: %zu\r\n", len);
    int n = format_head(req, status, content_type, framing, head, cap);
    int rv = KVR_ENOMEM;
    if (n > 0)
        rv = conn_write2(c, head, (size_t)n, req->is_head_ ? NULL : body, req->is_head_ ? 0 : len,
                         NULL, 0);
    if (head != stackbuf)
        free(head);
    count_status(c->srv, status);
    if (rv != 0) {
        c->close_after = true;
        req_finish(req);
        conn_gone(c);
        return rv;
    }
    req_finish(req);
    return 0;
}

int kvr_http_respond_cstr(kvr_http_req *req, int status, const char *content_type, const char *body)
{
    return kvr_http_respond(req, status, content_type, body, body ? strlen(body) : 0);
}

int kvr_http_stream_start(kvr_http_req *req, int status, const char *content_type)
{
    if (req->state_ != RS_HANDLING)
        return KVR_EINVAL;
    req->state_ = RS_STREAMING;
    kvr_http_conn *c = req->conn_;
    if (c == NULL || c->closing || c->shut)
        return KVR_ECLOSED;
    const char *framing = "Transfer-Encoding: chunked\r\n";
    if (req->http_minor == 0) {
        /* HTTP/1.0 has no chunked encoding: the body runs to the close. */
        framing = "";
        req->keep_alive = false;
        c->close_after = true;
    } else {
        req->chunked_out_ = true;
    }
    if (!req->keep_alive)
        c->close_after = true;
    char fr[128];
    bool sse = content_type && strncmp(content_type, "text/event-stream", 17) == 0;
    snprintf(fr, sizeof fr, "%s%s", framing, sse ? "Cache-Control: no-cache\r\n" : "");
    char stackbuf[1024];
    char *head = stackbuf;
    size_t cap = sizeof stackbuf;
    if (req->extra_headers_.len + 256 > cap) {
        cap = req->extra_headers_.len + 512;
        head = malloc(cap);
        if (head == NULL) {
            conn_gone(c);
            return KVR_ENOMEM;
        }
    }
    int n = format_head(req, status, content_type, fr, head, cap);
    int rv = n > 0 ? conn_write2(c, head, (size_t)n, NULL, 0, NULL, 0) : KVR_ENOMEM;
    if (head != stackbuf)
        free(head);
    count_status(c->srv, status);
    if (rv != 0) {
        conn_gone(c);
        return rv == KVR_ECLOSED ? rv : KVR_EIO;
    }
    return 0;
}

/* The producer is (or should be) paused: on_drain is owed, and the client must make progress
 * within write_timeout_ms. */
static void want_drain(kvr_http_req *req, kvr_http_conn *c)
{
    if (!req->want_drain_) {
        req->want_drain_ = true;
        timer_set(c, T_WRITE, c->srv->cfg.write_timeout_ms);
    }
}

int kvr_http_stream_write(kvr_http_req *req, const void *data, size_t len)
{
    if (req->state_ != RS_STREAMING)
        return KVR_EINVAL;
    kvr_http_conn *c = req->conn_;
    if (c == NULL || c->closing || c->shut)
        return KVR_ECLOSED;
    if (len == 0 || req->is_head_)
        return 0;
    int rv;
    if (req->chunked_out_) {
        char hdr[32];
        int n = snprintf(hdr, sizeof hdr, "%zx\r\n", len);
        rv = conn_write2(c, hdr, (size_t)n, data, len, "\r\n", 2);
    } else {
        rv = conn_write2(c, data, len, NULL, 0, NULL, 0);
    }
    if (rv != 0) {
        conn_gone(c);
        return KVR_ECLOSED;
    }
    if (c->tcp.write_queue_size >= c->srv->cfg.stream_high_water)
        want_drain(req, c);
    return 0;
}

size_t kvr_http_stream_pending_bytes(const kvr_http_req *req)
{
    kvr_http_conn *c = req->conn_;
    if (c == NULL || c->closing)
        return 0;
    return c->tcp.write_queue_size;
}

bool kvr_http_stream_should_pause(const kvr_http_req *req)
{
    kvr_http_conn *c = req->conn_;
    if (c == NULL || c->closing)
        return false;
    if (c->tcp.write_queue_size < c->srv->cfg.stream_high_water)
        return false;
    /* Whoever was told to pause is owed an on_drain. */
    want_drain((kvr_http_req *)req, c);
    return true;
}

int kvr_http_stream_end(kvr_http_req *req)
{
    if (req->state_ == RS_FINISHED)
        return KVR_EINVAL;
    kvr_http_conn *c = req->conn_;
    if (c == NULL || c->closing || c->shut) {
        req_finish(req);
        return KVR_ECLOSED;
    }
    if (req->state_ == RS_HANDLING) {
        /* Ended without starting: an empty 200 would be a lie; treat as a plain 204. */
        return kvr_http_respond(req, 204, NULL, NULL, 0);
    }
    int rv = 0;
    if (req->chunked_out_ && !req->is_head_)
        rv = conn_write2(c, "0\r\n\r\n", 5, NULL, 0, NULL, 0);
    if (rv != 0) {
        req_finish(req);
        conn_gone(c);
        return KVR_ECLOSED;
    }
    req_finish(req);
    return 0;
}
