/* kvr_curl: libcurl multi driven by a libuv loop (HTTP client for workers and benchmarks).
 *
 * Threads: everything runs on the loop thread; every callback (on_headers, on_data, on_done,
 * the close callback) is called on it, and every function must be called on it.
 *
 * Memory: `kvr_curl` is caller-allocated and must stay valid until kvr_curl_close()'s callback
 * has run. A request (kvr_curl_req) is allocated by kvr_curl_start() and owned by the library;
 * it is freed right after its on_done callback returns, or by kvr_curl_cancel(). The options
 * (URL, headers, body) are copied at start.
 *
 * Every request ends in exactly one of: on_done (success, HTTP error status, transport error,
 * timeout, or an abort requested by a callback's non-zero return), or kvr_curl_cancel() (no
 * on_done is called). Connections are reused across requests of the same kvr_curl (keep-alive).
 *
 * Backpressure: on_data may return KVR_CURL_PAUSE: the transfer pauses (receive side) and the
 * same bytes are delivered again after kvr_curl_resume(). kvr_curl_pause() pauses from outside
 * a callback. Note: kvr_curl_resume() may call on_data before it returns (never on_done). */
#ifndef KVR_CURL_H
#define KVR_CURL_H

#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct kvr_curl kvr_curl;
typedef struct kvr_curl_req kvr_curl_req;
typedef void (*kvr_curl_close_cb)(kvr_curl *kc);

#define KVR_CURL_PAUSE 0x10000001 /* on_data return value: pause, redeliver after resume */

typedef struct kvr_curl_config {
    long max_host_connections;  /* per host:port; 0 → 64 */
    long max_total_connections; /* 0 → unlimited */
    long connect_timeout_ms;    /* default for requests; 0 → 5000 */
} kvr_curl_config;

struct kvr_curl {
    void *data; /* caller's */
    /* private */
    uv_loop_t *loop;
    void *multi; /* CURLM * */
    uv_timer_t timer;
    kvr_curl_req *reqs; /* live requests */
    size_t active;
    long connect_timeout_ms;
    int handles_open;
    bool closing;
    bool in_socket_action;
    kvr_curl_close_cb close_cb;
    void *socks; /* open poll contexts */
};

typedef struct kvr_curl_opts {
    const char *url;            /* required */
    const char *method;         /* "GET", "POST", ...; NULL → POST if body else GET */
    const char *const *headers; /* NULL-terminated "Name: value" lines, or NULL */
    const void *body;           /* copied; may be NULL */
    size_t body_len;
    long timeout_ms;         /* whole transfer; 0 → none */
    long stall_timeout_ms;   /* no byte for this long (rounded up to whole seconds) →
                                on_done(KVR_ETIMEDOUT); not counted while paused; 0 → none */
    long connect_timeout_ms; /* 0 → the kvr_curl default */
    void *data;              /* request's user data (kvr_curl_req_data) */
    /* Once, when the final (non-1xx) response headers are complete. Non-zero aborts. May be NULL.
     */
    int (*on_headers)(kvr_curl_req *r, long http_status);
    /* Each response header line (before on_headers), name/value trimmed. Non-zero aborts. May be
     * NULL. */
    int (*on_header)(kvr_curl_req *r, kvr_slice name, kvr_slice value);
    /* Body bytes as they arrive (de-chunked). Return 0, KVR_CURL_PAUSE, or anything else to
     * abort. If NULL the body is collected and handed to on_done (up to max_body bytes). */
    int (*on_data)(kvr_curl_req *r, const char *data, size_t len);
    /* result: 0 (the exchange completed; check http_status), KVR_ETIMEDOUT, KVR_ECLOSED
     * (aborted by a callback), KVR_ELIMIT (collected body over max_body), KVR_EIO (transport
     * error; errmsg says which). body: the collected body when on_data is NULL. Required. */
    void (*on_done)(kvr_curl_req *r, int result, long http_status, const char *errmsg,
                    kvr_slice body);
    size_t max_body; /* for collected bodies; 0 → 16 MiB */
    /* https: the CA bundle (PEM file) to verify the server with instead of the system's; read
     * at start (a rotated file is picked up by the next request). NULL → system CAs. */
    const char *ca_file;
} kvr_curl_opts;

/* Returns 0 or KVR_EIO/KVR_ENOMEM with a message. cfg may be NULL. */
int kvr_curl_init(kvr_curl *kc, uv_loop_t *loop, const kvr_curl_config *cfg, kvr_err *err);

/* Starts a request. *out (may be NULL) receives the handle, valid until on_done returns or
 * kvr_curl_cancel. Returns 0, KVR_EINVAL, KVR_ENOMEM or KVR_ECLOSED (kc is closing). When it
 * fails no callback is called. */
int kvr_curl_start(kvr_curl *kc, const kvr_curl_opts *opts, kvr_curl_req **out, kvr_err *err);

/* Cancels: no further callbacks; the handle is invalid afterwards. Safe to call from within
 * this request's own on_headers/on_header/on_data (the transfer is then torn down when the
 * callback returns), but not from its on_done. */
void kvr_curl_cancel(kvr_curl_req *r);

/* Pause / resume receiving (backpressure). Return 0 or KVR_EIO. */
int kvr_curl_pause(kvr_curl_req *r);
int kvr_curl_resume(kvr_curl_req *r);
bool kvr_curl_paused(const kvr_curl_req *r);

void *kvr_curl_req_data(const kvr_curl_req *r);
void kvr_curl_req_set_data(kvr_curl_req *r, void *data);
/* Requests in flight. */
size_t kvr_curl_active(const kvr_curl *kc);

/* Cancels every request (no callbacks), closes all handles, then calls close_cb (may be NULL);
 * kc may be freed there. */
void kvr_curl_close(kvr_curl *kc, kvr_curl_close_cb close_cb);

#endif
