/* kvr_http: HTTP/1.1 server on libuv + llhttp. See kvr_http.h for the contract.
 *
 * This file: status texts, request accessors, responses and streaming. The connection side is
 * kvr_http_conn.c, the parser callbacks kvr_http_parse.c, their shared state kvr_http_int.h. */
#include "kvr_http_int.h"
#include "kvr_log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---------------------------------------------------------------- status texts */

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
/* ---------------------------------------------------------------- requests */

kvr_slice kvr_http_req_header(const kvr_http_req *req, const char *name)
{
    size_t nl = strlen(name);
    for (size_t i = 0; i < req->nhdr_; i++) {
        const uint32_t *h = req->hdr_offs_ + 4 * i;
        if (h[1] == nl && strncasecmp(req->head_.base + h[0], name, nl) == 0)
            return kh_trim((kvr_slice){req->head_.base + h[2], h[3]});
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
    *value = kh_trim((kvr_slice){req->head_.base + h[2], h[3]});
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
        kh_req_free(req);
        return;
    }
    c->active = NULL;
    kh_req_free(req);
    if (c->close_after) {
        if (c->writes == 0)
            kh_conn_start_close(c);
        return;
    }
    kh_conn_process(c);
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
        rv = kh_conn_write2(c, head, (size_t)n, req->is_head_ ? NULL : body,
                            req->is_head_ ? 0 : len, NULL, 0);
    if (head != stackbuf)
        free(head);
    kh_count_status(c->srv, status);
    if (rv != 0) {
        c->close_after = true;
        req_finish(req);
        kh_conn_gone(c);
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
            kh_conn_gone(c);
            return KVR_ENOMEM;
        }
    }
    int n = format_head(req, status, content_type, fr, head, cap);
    int rv = n > 0 ? kh_conn_write2(c, head, (size_t)n, NULL, 0, NULL, 0) : KVR_ENOMEM;
    if (head != stackbuf)
        free(head);
    kh_count_status(c->srv, status);
    if (rv != 0) {
        kh_conn_gone(c);
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
        kh_timer_set(c, T_WRITE, c->srv->cfg.write_timeout_ms);
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
        rv = kh_conn_write2(c, hdr, (size_t)n, data, len, "\r\n", 2);
    } else {
        rv = kh_conn_write2(c, data, len, NULL, 0, NULL, 0);
    }
    if (rv != 0) {
        kh_conn_gone(c);
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
        rv = kh_conn_write2(c, "0\r\n\r\n", 5, NULL, 0, NULL, 0);
    if (rv != 0) {
        req_finish(req);
        kh_conn_gone(c);
        return KVR_ECLOSED;
    }
    req_finish(req);
    return 0;
}
