/* epp_grpc: a small gRPC server over HTTP/2 cleartext (h2c, prior knowledge) on one libuv loop,
 * with nghttp2's server session. Enough of gRPC for kvr-epp: unary and bidi-streaming calls,
 * identity encoding only, the 5-byte message prefix (messages reassembled across DATA frames),
 * grpc-status / grpc-message trailers and Trailers-Only errors (grpc doc/PROTOCOL-HTTP2.md).
 *
 * Threads: everything (callbacks included) runs on the loop thread of epp_grpc_init. Never
 * blocks: reads go straight into nghttp2, its output is queued to uv_write; a connection whose
 * unsent output passes EPP_GRPC_WRITE_HIGH stops being read until it drains (HTTP/2 flow
 * control then holds the peer back).
 *
 * Ownership: the server owns its connections and calls; an epp_grpc_call pointer is valid from
 * on_call until on_close returns. Message bytes handed to on_message are valid during the
 * callback only.
 *
 * Files: epp_grpc.c (HTTP/2 streams as calls: the nghttp2 session callbacks and the call API),
 * epp_grpc_conn.c (connections: socket, TLS records, write queue, back-pressure; the listener),
 * epp_grpc_frame.c/.h (gRPC's message framing and status codes), epp_grpc_tls.c/.h (the TLS
 * server context); epp_grpc_int.h is what the first two share. */
#ifndef EPP_GRPC_H
#define EPP_GRPC_H

#include "epp_grpc_frame.h" /* status codes, epp_grpc_deframe */
#include "epp_grpc_tls.h"   /* epp_grpc_tls_ctx */
#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define EPP_GRPC_WRITE_HIGH (1u << 20) /* unsent bytes per connection before reading stops */

typedef struct epp_grpc_server epp_grpc_server;
typedef struct epp_grpc_call epp_grpc_call;

typedef struct epp_grpc_handlers {
    /* A call to `path` arrived (headers checked). Return 0 to accept it (set call->data), or a
     * gRPC status: the call is refused with a Trailers-Only error. */
    int (*on_call)(epp_grpc_call *call, const char *path);
    /* One whole message of the call. */
    void (*on_message)(epp_grpc_call *call, const uint8_t *msg, size_t len);
    /* The client half-closed (END_STREAM): no more messages. */
    void (*on_half_close)(epp_grpc_call *call);
    /* The call is gone (finished by us, reset or cancelled by the peer, connection lost);
     * finished says whether epp_grpc_finish had been called. Last callback of the call. */
    void (*on_close)(epp_grpc_call *call, bool finished);
} epp_grpc_handlers;

typedef struct epp_grpc_limits {
    size_t max_message;   /* one message's length (default 4 MiB): larger → RESOURCE_EXHAUSTED */
    size_t max_buffered;  /* all calls' unread input + queued output (default 256 MiB) */
    uint32_t max_streams; /* concurrent streams per connection (default 1024) */
    void *tls;            /* an SSL_CTX * (epp_grpc_tls_ctx; not owned): TLS with ALPN h2;
                             NULL: h2c with prior knowledge */
} epp_grpc_limits;

typedef struct epp_grpc_stats {
    uint64_t connections, calls, refused, messages_in, messages_out, resets, tls_failures;
    size_t buffered; /* bytes now held (input being reassembled + output queued) */
    uint32_t open_calls;
} epp_grpc_stats;

struct epp_grpc_call {
    void *data; /* the handler's */
    epp_grpc_server *server;
    /* private */
    void *conn_;
    epp_grpc_call *next_, *prev_; /* the connection's calls */
    int32_t sid_;
    kvr_buf in_;  /* bytes of a message not yet whole */
    kvr_buf out_; /* framed messages not yet handed to nghttp2 */
    size_t out_off_;
    bool started_;   /* response HEADERS submitted */
    bool deferred_;  /* the data source returned DEFERRED */
    bool finishing_; /* epp_grpc_finish called: trailers go after out_ */
    bool trailers_sent_;
    bool half_closed_;
    bool closed_;
    bool accepted_; /* on_call accepted it: on_close will be called */
    bool refused_;  /* headers refused before on_call */
    int status_;
    char path_[128];
    char message_[256];
};

struct epp_grpc_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    epp_grpc_handlers h;
    epp_grpc_limits lim;
    epp_grpc_stats stats;
    void *data;
    int port;
    bool listening;
    void *conns_; /* private list */
};

/* Caller-allocated server. limits may be NULL (defaults). */
int epp_grpc_init(epp_grpc_server *s, uv_loop_t *loop, const epp_grpc_handlers *h,
                  const epp_grpc_limits *limits);
/* addr "host:port" or ":port" (port 0: any). */
int epp_grpc_listen(epp_grpc_server *s, const char *addr, kvr_err *err);
/* Closes the listener and every connection (calls get on_close). */
void epp_grpc_close(epp_grpc_server *s);

/* Queues one message (len bytes, framed here). Returns 0, KVR_EINVAL after finish,
 * KVR_ELIMIT when the server's max_buffered would be passed. */
int epp_grpc_send(epp_grpc_call *call, const void *msg, size_t len);
/* Ends the call with status and message (NULL: none) after the queued messages: trailers, or
 * a Trailers-Only response when nothing was sent. Idempotent. */
void epp_grpc_finish(epp_grpc_call *call, int status, const char *message);
/* The loop turn's output is written when the loop returns to poll; this flushes at once. */
void epp_grpc_flush(epp_grpc_call *call);

/* Fuzzing and tests: runs len bytes from a client (the HTTP/2 preface first) through a new
 * connection of s that has no socket, piece bytes per read; its output is discarded, and it
 * is closed at the end (open calls get on_close). Loop thread. Returns 0 or KVR_ENOMEM. */
int epp_grpc_feed(epp_grpc_server *s, const uint8_t *data, size_t len, size_t piece);

#endif
