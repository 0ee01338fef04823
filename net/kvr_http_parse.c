/* kvr_http_parse.c: the llhttp callbacks of the HTTP server (kvr_http.h): request head and
 * body into the request being parsed, limits on every part (431, 413, 400), trailers counted
 * against the head limit. Shared state in kvr_http_int.h. Loop thread only. */
#include "kvr_http_int.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

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
            kh_conn_shed(srv->rhead_);
        kh_rlist_add(c);
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
        kh_timer_set(c, T_HEADER, ms);
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

kvr_slice kh_trim(kvr_slice s)
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
        kvr_slice e = kh_trim(expect);
        if (e.len == 12 && strncasecmp(e.base, "100-continue", 12) == 0) {
            static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
            kh_conn_write2(c, cont, sizeof cont - 1, NULL, 0, NULL, 0);
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
    kh_timer_set(c, T_BODY, left);
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
    kh_rlist_del(c);
    r->body = (kvr_slice){r->body_.base ? r->body_.base : "", r->body_.len};
    r->keep_alive = llhttp_should_keep_alive(p) != 0;
    c->ready = r;
    return HPE_PAUSED;
}

static llhttp_settings_t g_settings;
static pthread_once_t g_settings_once = PTHREAD_ONCE_INIT;

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

const llhttp_settings_t *kh_settings(void)
{
    pthread_once(&g_settings_once, settings_setup);
    return &g_settings;
}
