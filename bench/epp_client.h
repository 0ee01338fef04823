/* epp_client: a load client for kvr-epp that speaks as Envoy's ext_proc filter does, in
 * FULL_DUPLEX_STREAMED mode, over h2c (prior knowledge) with nghttp2 client sessions on
 * non-blocking sockets under one epoll instance. Used by `kvr-bench epp` (bench_epp.c).
 *
 * One stream = one request: RequestHeaders, RequestBody (one chunk, end_of_stream); wait for the
 * deferred HeadersResponse (the pick) and the body echo up to its end_of_stream; then
 * ResponseHeaders and a ResponseBody with end_of_stream (so the booking is freed), half-close,
 * and wait for grpc-status. A held stream (epp_client_start(cl, true)) sends its headers only
 * and stays open until epp_client_free.
 *
 * Threads: one. Every call and every nghttp2 callback runs on the caller's thread, inside
 * epp_client_pump_us / epp_client_start; nothing blocks but the wait in epp_client_pump_us.
 *
 * Memory: the epp_client is caller-allocated; it owns its connections, streams, the framed
 * messages (copied from the bodies given to epp_client_init) and the latency array, all freed
 * by epp_client_free. The counters and `lat` are read by the caller in place. */
#ifndef EPP_CLIENT_H
#define EPP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define EPP_CLIENT_MAX_CONNS 64
#define EPP_CLIENT_STREAMS_PER_CONN 1000 /* kvr-epp allows 1,024 */

/* How a stream failed (each failed stream is counted once, under its first failure). */
enum {
    EPP_CLIENT_E_IMM_429 = 0, /* ImmediateResponse 429 (shed) */
    EPP_CLIENT_E_IMM_503,     /* ImmediateResponse 503 */
    EPP_CLIENT_E_IMM_OTHER,   /* another ImmediateResponse status */
    EPP_CLIENT_E_GRPC,        /* ended with a non-zero grpc-status */
    EPP_CLIENT_E_RESET,       /* reset (RST_STREAM with an error code) */
    EPP_CLIENT_E_PROTO,       /* bad or compressed message, or ended before the exchange was done */
    EPP_CLIENT_E_N
};
/* "immediate_429", …, "protocol": the names of the report and its JSON. */
extern const char *const epp_client_error_names[EPP_CLIENT_E_N];

typedef struct epp_client epp_client;
typedef struct epp_client_stream epp_client_stream; /* private to epp_client.c */

typedef struct epp_client_conn {
    int fd; /* -1: not open */
    struct nghttp2_session *s;
    int open;  /* streams open on it */
    bool dead; /* EOF, socket or protocol error: no new stream goes to it */
    epp_client *cl;
} epp_client_conn;

struct epp_client {
    /* Set by the caller: requests done, errors and latencies are counted only while true
     * (streams started and open streams always are). */
    bool measuring;
    /* Read by the caller. */
    uint64_t started; /* streams started */
    uint64_t done_ok; /* whole exchanges ended with grpc-status 0 (while measuring) */
    uint64_t errors[EPP_CLIENT_E_N];
    uint64_t open_streams; /* open now, held ones included */
    uint64_t held;         /* held streams open now */
    double *lat; /* client pick latencies in seconds (body's last byte handed to the socket →
                    HeadersResponse parsed), in arrival order; nlat of them */
    size_t nlat;
    /* private */
    epp_client_conn conns_[EPP_CLIENT_MAX_CONNS];
    int nconns_, ep_;
    uint8_t *m_headers_, *m_body_, *m_rheaders_, *m_rbody_; /* the framed messages */
    size_t l_headers_, l_body_, l_rheaders_, l_rbody_;
    size_t cap_lat_;
    epp_client_stream *live_; /* every live stream (nghttp2_session_del calls no close
                                 callback: epp_client_free frees those still open) */
};

/* Caller-allocated client. request_body: the request's body (an OpenAI chat request);
 * response_body: the model server's answer sent back in the ResponseBody. Both are copied
 * (framed here). Returns 0, KVR_ENOMEM, or KVR_EIO (epoll_create1 failed). Call
 * epp_client_free in any case. */
int epp_client_init(epp_client *cl, const char *request_body, const char *response_body);

/* Opens conns (1..EPP_CLIENT_MAX_CONNS) connections to 127.0.0.1:port and sends each one's
 * SETTINGS. Returns 0, KVR_EINVAL, or KVR_EIO with errno telling why. */
int epp_client_connect(epp_client *cl, int port, int conns);

/* Starts a stream on the least busy live connection: request headers and body, or (hold)
 * headers only. Its frames go out on the next pump. Returns 0, or KVR_ELIMIT when every
 * connection is dead or has EPP_CLIENT_STREAMS_PER_CONN streams open, KVR_ENOMEM, KVR_EIO. */
int epp_client_start(epp_client *cl, bool hold);

/* One turn: hands every session's pending frames to its socket, waits up to timeout_us
 * (epoll_pwait2: sub-millisecond waits without spinning) for the sockets, reads, and writes
 * again. */
void epp_client_pump_us(epp_client *cl, int64_t timeout_us);
void epp_client_pump(epp_client *cl, int timeout_ms);

/* Closes the sessions and sockets, frees the streams still open, the messages and the
 * latencies. The client may be initialised again after. */
void epp_client_free(epp_client *cl);

#endif
