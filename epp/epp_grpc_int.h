/* epp_grpc_int.h: private to epp/epp_grpc*.c. One accepted (or fed) connection, shared by
 * the two layers of epp_grpc:
 *   - epp_grpc_conn.c: the connection's bytes: the socket (libuv), TLS records on memory BIOs,
 *     the write queue and its back-pressure; it drives the nghttp2 session with them
 *     (mem_recv / mem_send), and owns the listener and the list of connections;
 *   - epp_grpc.c: the nghttp2 server session's callbacks: HTTP/2 streams as gRPC calls, and
 *     the call API (epp_grpc_send / finish / flush).
 * Loop thread only. */
#ifndef EPP_GRPC_INT_H
#define EPP_GRPC_INT_H

#include "epp_grpc.h"

#include <nghttp2/nghttp2.h>
#include <openssl/ssl.h>

typedef struct epp_grpc_conn {
    uv_tcp_t tcp;
    epp_grpc_server *s;
    nghttp2_session *ng;
    struct epp_grpc_conn *next, *prev;
    size_t wpending; /* bytes handed to uv_write, not yet written */
    bool reading;
    bool in_recv; /* inside nghttp2_session_mem_recv: nghttp2 forbids sending from callbacks */
    bool closing;
    /* every call not yet closed: nghttp2_session_del runs no stream-close callback, so a
     * connection that drops closes its calls itself (epp_grpc_session_end) */
    epp_grpc_call *calls;
    bool fake; /* epp_grpc_feed: no socket, output discarded, freed by the feeder */
    SSL *ssl;  /* TLS (limits.tls), on memory BIOs: rbio takes socket bytes, wbio gives them */
    BIO *rbio, *wbio;
    bool hs_done;
} epp_grpc_conn;

/* epp_grpc_conn.c */

/* Ends the connection (idempotent): unlinks it, ends its session and calls
 * (epp_grpc_session_end), closes the socket; freed once libuv is done with it (a fed one is
 * freed by its feeder). */
void epp_grpc_conn_close(epp_grpc_conn *c);
/* Hands what the session has to send to the socket (through TLS), up to EPP_GRPC_WRITE_HIGH
 * unsent bytes; applies back-pressure; closes a connection nghttp2 is done with. Does nothing
 * inside mem_recv (nghttp2's callbacks), on a closing connection or before the handshake. */
void epp_grpc_conn_flush(epp_grpc_conn *c);

/* epp_grpc.c */

/* The nghttp2 server session of c (c->ng) with the call callbacks, and our SETTINGS queued.
 * 0, or -1 (c->ng NULL). */
int epp_grpc_session_new(epp_grpc_conn *c);
/* Closes every call still open on c as cancelled (on_close runs; epp_grpc_send / finish on
 * them do nothing), then deletes the session. */
void epp_grpc_session_end(epp_grpc_conn *c);

#endif
