/* kvr_http: HTTP/1.1 server on libuv + llhttp (keep-alive, pipelining, chunked bodies, SSE).
 *
 * Threads: everything here runs on the thread that runs the server's uv loop. Every callback
 * (on_request, on_close, on_drain, the close callback) is called on that thread, and every
 * function must be called on it.
 *
 * Memory: the server struct is caller-allocated (libuv style) and must stay valid until the
 * close callback of kvr_http_server_close() has run. Connections and requests are allocated
 * by the server; every connection's memory is bounded by the config (header bytes, body bytes,
 * a bounded amount of pipelined input and of unsent responses), except the bytes a handler
 * queues with kvr_http_stream_write(): a streaming producer must watch
 * kvr_http_stream_pending_bytes() and pause until on_drain (see below).
 *
 * Request lifetime: the server calls on_request(req) once the whole body has arrived. From then
 * on the handler owns the duty to FINISH the request exactly once (twice is a use-after-free),
 * now or in a later loop turn:
 * kvr_http_respond() or kvr_http_stream_end() (after kvr_http_stream_start()). Finishing frees
 * the request; the handler must not touch it afterwards. Until then `req` and every slice in it
 * stay valid, even if the client has gone: the request owns copies of its head and body.
 *
 * Client gone: if the connection dies before the request is finished (EOF, reset, write
 * error, server close), the server calls req->on_close(req) once (if set) so the handler can
 * cancel upstream work. After that every write/respond returns KVR_ECLOSED and does nothing —
 * but the handler must still finish the request (kvr_http_respond() or kvr_http_stream_end(),
 * which then only free it). A half-closed client (EOF after sending its request) counts as gone.
 *
 * One request at a time per connection: pipelined requests wait (buffered, bounded) until the
 * previous response is finished. A client that pipelines without reading the answers is not
 * read from (nor served) while more than 64 responses or stream_high_water bytes of them are
 * unsent; reading resumes once they drain, and a client that reads nothing for
 * write_timeout_ms is closed.
 *
 * Trailer fields of a chunked request are counted against max_header_bytes and dropped.
 *
 * Errors answered by the server itself, each followed by closing the connection: malformed
 * request → 400, header section over max_header_bytes (or > 100 headers) → 431, body over
 * max_body_bytes → 413 (as soon as Content-Length or a chunk header says so, without reading
 * the body), Upgrade/CONNECT/unknown Transfer-Encoding → 501, more than max_connections with
 * none to shed → 503, headers not complete within header_timeout_ms or the body not within
 * request_timeout_ms → 408, shed while reading a request → 408. `Expect: 100-continue` is
 * honoured; any other expectation → 417. */
#ifndef KVR_HTTP_H
#define KVR_HTTP_H

#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct kvr_http_server kvr_http_server;
typedef struct kvr_http_req kvr_http_req;
typedef struct kvr_http_conn kvr_http_conn; /* private */

typedef void (*kvr_http_request_cb)(kvr_http_req *req);
typedef void (*kvr_http_req_cb)(kvr_http_req *req);
typedef void (*kvr_http_server_close_cb)(kvr_http_server *srv);

typedef struct kvr_http_config {
    kvr_http_request_cb on_request;   /* required */
    size_t max_header_bytes;          /* request line + headers; 0 → 16 KiB */
    size_t max_body_bytes;            /* 0 → 16 MiB */
    uint64_t header_timeout_ms;       /* from the first byte of a request to its end of headers
                                         (also on a new connection); 0 → 10 s */
    uint64_t request_timeout_ms;      /* from the first byte of a request to the end of its body,
                                         however the bytes trickle in (not re-armed by reads);
                                         0 → 30 s */
    uint32_t max_reading_connections; /* connections reading a request at once; a new request
                                         over it sheds the one reading longest (408); 0 → 1024 */
    uint64_t idle_timeout_ms;         /* keep-alive connection with no request; 0 → 60 s */
    uint32_t max_connections;         /* 0 → 10000; over it the oldest connection still reading
                                         a request is shed (408) to make room, else the new
                                         one gets 503 + close */
    size_t stream_high_water;  /* pending bytes at which a producer should pause; 0 → 256 KiB */
    size_t stream_low_water;   /* on_drain fires when pending falls below this after it
                                  reached stream_high_water; 0 → 64 KiB */
    uint64_t write_timeout_ms; /* a stream at its high-water mark whose client reads nothing for
                                  this long is closed (on_close); 0 → 60 s */
} kvr_http_config;

/* Counters, monotonically increasing except connections_active. Read them directly. */
typedef struct kvr_http_stats {
    uint64_t connections_accepted;
    uint64_t connections_active;
    uint64_t connections_rejected; /* over max_connections */
    uint64_t requests;             /* complete requests handed to on_request */
    uint64_t responses[6];         /* by status class: [1]=1xx … [5]=5xx ([0] unused) */
    uint64_t parse_errors;         /* 400/431/413/501 answered by the server */
    uint64_t timeouts;             /* header / body / idle / stalled-reader timeouts */
    uint64_t client_gone;          /* requests whose client went away before the end */
    uint64_t shed;                 /* connections dropped (408) while reading a request, to make
                                      room for others (max_reading_connections, max_connections) */
} kvr_http_stats;

struct kvr_http_server {
    void *data; /* caller's */
    kvr_http_stats stats;
    /* private */
    uv_loop_t *loop;
    uv_tcp_t listener;
    kvr_http_config cfg;
    kvr_http_conn *conns; /* doubly linked list of live connections */
    int port;
    bool listening;
    bool closing;
    bool listener_closed;
    kvr_http_server_close_cb close_cb;
    char *readbuf_;                 /* one read buffer shared by all connections */
    kvr_http_conn *rhead_, *rtail_; /* connections reading a request, oldest first */
    uint32_t nreading_;
};

struct kvr_http_req {
    void *data;              /* handler's */
    kvr_http_server *server; /* valid until the server's close callback */
    kvr_slice method;        /* "GET", "POST", ... */
    kvr_slice path;          /* "/v1/completions" (URL before '?', not decoded) */
    kvr_slice query;         /* after '?', without it; empty if none */
    kvr_slice body;          /* the whole (de-chunked) body */
    uint8_t http_minor;      /* HTTP/1.<minor> */
    bool keep_alive;         /* the connection stays open after this response */
    /* Set these in on_request if wanted (see the lifetime rules above). */
    kvr_http_req_cb on_close; /* client went away before the request was finished */
    kvr_http_req_cb on_drain; /* pending stream bytes fell below stream_low_water */
    /* private */
    kvr_http_conn *conn_; /* NULL once the connection is gone */
    kvr_buf head_;        /* method, url, header names/values */
    kvr_buf body_;
    kvr_buf extra_headers_; /* "Name: value\r\n" lines added by kvr_http_add_header() */
    uint32_t *hdr_offs_;    /* 4 per header: name off/len, value off/len into head_ */
    size_t nhdr_;
    int state_; /* 0 handling, 1 streaming, 2 finished */
    bool is_head_;
    bool chunked_out_;
    bool want_drain_;
    bool closed_notified_;
};

/* Initialises srv (does not listen yet). cfg is copied; zero fields take the defaults above.
 * Returns 0 or KVR_EINVAL (no on_request). */
int kvr_http_server_init(kvr_http_server *srv, uv_loop_t *loop, const kvr_http_config *cfg);

/* Binds and listens. addr is "ip:port", "hostname:port" (resolved to IPv4, blocking), ":port"
 * (all IPv4 interfaces) or "[v6]:port"; port 0 lets the OS choose (kvr_http_server_port()). Returns
 * 0, KVR_EINVAL (bad address) or KVR_EIO (bind/listen failed, message says why). */
int kvr_http_listen(kvr_http_server *srv, const char *addr, kvr_err *err);

/* The bound port (after kvr_http_listen), else 0. */
int kvr_http_server_port(const kvr_http_server *srv);

/* Stops listening, closes every connection (in-flight requests get on_close), and calls
 * close_cb (may be NULL) once every handle is closed. The caller may free srv in close_cb.
 * Requests not yet finished by their handlers stay allocated until they are finished. */
void kvr_http_server_close(kvr_http_server *srv, kvr_http_server_close_cb close_cb);

/* Closes the listening socket only (graceful drain): no new connection is accepted, live
 * connections and their requests go on. kvr_http_server_close() later finishes the rest. */
void kvr_http_server_stop_listening(kvr_http_server *srv);
/* Writes queued on live connections and not yet handed to the kernel: wait for 0 before
 * kvr_http_server_close() so that the last bytes of finished responses are not dropped. */
size_t kvr_http_server_writes_pending(const kvr_http_server *srv);

/* Case-insensitive header lookup; the first occurrence, or {NULL,0} if absent. */
kvr_slice kvr_http_req_header(const kvr_http_req *req, const char *name);
/* Header count and access by index (names as received). */
size_t kvr_http_req_header_count(const kvr_http_req *req);
void kvr_http_req_header_at(const kvr_http_req *req, size_t i, kvr_slice *name, kvr_slice *value);
/* True when the connection under req is gone (on_close has been or is being called). */
bool kvr_http_req_closed(const kvr_http_req *req);

/* Adds a response header before kvr_http_respond/kvr_http_stream_start. Name and value must
 * not contain CR/LF (KVR_EINVAL); the total of extra headers is capped at 8 KiB (KVR_ELIMIT).
 * Content-Length, Transfer-Encoding and Connection are managed by the server. */
int kvr_http_add_header(kvr_http_req *req, const char *name, const char *value);

/* Sends a complete response (adds Content-Length) and finishes the request. content_type may
 * be NULL (no Content-Type). body is copied. Returns 0, or KVR_ECLOSED when the client is gone
 * (the request is finished and freed either way), or KVR_EINVAL if it was already started
 * as a stream (then nothing happens). */
int kvr_http_respond(kvr_http_req *req, int status, const char *content_type, const void *body,
                     size_t len);
/* Convenience: respond with a NUL-terminated body. */
int kvr_http_respond_cstr(kvr_http_req *req, int status, const char *content_type,
                          const char *body);

/* Starts a streamed response (chunked for HTTP/1.1; for HTTP/1.0 clients the body runs to
 * connection close). For SSE pass "text/event-stream" (Cache-Control: no-cache is added).
 * Returns 0 or KVR_ECLOSED. */
int kvr_http_stream_start(kvr_http_req *req, int status, const char *content_type);
/* Queues len bytes (copied) as one chunk. Returns 0 or KVR_ECLOSED. Never blocks and never
 * drops: watch kvr_http_stream_pending_bytes(). */
int kvr_http_stream_write(kvr_http_req *req, const void *data, size_t len);
/* Bytes queued to the socket but not yet accepted by the kernel (0 once the client is gone). */
size_t kvr_http_stream_pending_bytes(const kvr_http_req *req);
/* True when pending bytes are at or above stream_high_water: the producer should pause until
 * req->on_drain is called. */
bool kvr_http_stream_should_pause(const kvr_http_req *req);
/* Ends the stream (terminating chunk) and finishes the request. Also the way to finish a
 * request whose client is gone. Called before kvr_http_stream_start() it answers an empty 204.
 * Returns 0 or KVR_ECLOSED. */
int kvr_http_stream_end(kvr_http_req *req);

/* Reason phrase for a status code ("OK", "Not Found", ...; "Unknown" otherwise). */
const char *kvr_http_status_text(int status);

#endif
