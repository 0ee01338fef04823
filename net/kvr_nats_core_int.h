/* kvr_nats_core_int.h: private to net/kvr_nats_core*.c (kvr_nats_core.h): the connection state
 * shared by the lifecycle and public API (kvr_nats_core.c), TLS through OpenSSL memory BIOs
 * (kvr_nats_core_tls.c) and the protocol, building and parsing (kvr_nats_core_proto.c).
 *
 * Threads: everything here runs on the client's loop thread. */
#ifndef KVR_NATS_CORE_INT_H
#define KVR_NATS_CORE_INT_H

#include "kvr_nats_core.h"

#include <openssl/ssl.h>

#define NC_LINE_MAX (256 * 1024)
#define NC_TOKEN_MAX 1024
#define NC_HDR_SLACK (64 * 1024)
#define NC_DEFAULT_MAX_PAYLOAD (1024 * 1024)
#define NC_FLUSH_AT (64 * 1024) /* write at once past this, not only before the loop sleeps */
#define NC_READ_CHUNK (64 * 1024)
#define NC_MAX_SERVERS 64 /* pool bound: INFO connect_urls cannot grow it further */
#define NC_TLS_CHUNK (256 * 1024)
#define NC_HDR_MAX 4096 /* outbound header block (HPUB) */

typedef struct nc_url {
    char host[256];
    int port;
    char *user, *pass, *token;
    bool tls;           /* tls:// */
    char tls_name[256]; /* name or IP the server's certificate must carry */
    bool discovered;    /* from INFO connect_urls */
} nc_url;

typedef struct nc_sub {
    uint64_t sid;
    char *subject, *queue;
    void *data;
    /* kvr_nats_core_drain: 0 while live; else the PONG (counted on this connection) that
     * answers the PING sent after its UNSUB: every message for it precedes that PONG */
    uint64_t drain_at;
} nc_sub;

/* One TCP connection attempt. Freed in its close callback, which libuv runs after the
 * callback of any write still pending on it. */
typedef struct nc_sock {
    uv_tcp_t tcp;
    uv_connect_t creq;
    uv_write_t wreq;
    kvr_buf wbuf; /* bytes handed to uv_write */
    bool writing;
    kvr_nats_core *c;
    /* TLS (after INFO): ssl reads what nc_on_read puts into rbio and writes records into wbio;
     * tls_out holds records not yet handed to the socket, raw is the read buffer. */
    SSL *ssl;
    BIO *rbio, *wbio;
    kvr_buf tls_out;
    char *raw;
} nc_sock;

typedef struct nc_resolve {
    uv_getaddrinfo_t req;
    kvr_nats_core *c;
    int port;
    uint64_t gen;
} nc_resolve;

enum { NC_IDLE, NC_RESOLVING, NC_TCP, NC_INFO_WAIT, NC_TLS, NC_HANDSHAKE, NC_UP };

struct kvr_nats_core {
    uv_loop_t *loop;
    kvr_nats_core_opts o;
    char *name, *user, *password, *token, *nkey_seed, *jwt;
    char *nonce;      /* from the current attempt's INFO, signed in CONNECT */
    SSL_CTX *ssl_ctx; /* NULL: TLS not configured */
    nc_url *urls;
    int n_urls, next_url, cur_url;
    nc_sock *sock;        /* current attempt or connection; NULL when idle */
    nc_resolve *resolve;  /* current name lookup, or NULL */
    int resolves_pending; /* lookups whose callback has not run (cancelled ones included) */
    uint64_t gen;         /* attempt number: stale lookups compare it */
    uv_timer_t retry_timer, ping_timer, hs_timer;
    uv_prepare_t flush_prep;
    uv_check_t flush_check;
    int st;
    bool ever_up, closing;
    int attempts; /* failed attempts since the last handshake */
    int pings_out;
    uint64_t ping_seq, pong_seq; /* PINGs sent and PONGs read on this connection */
    uint32_t n_draining;
    size_t max_payload;
    kvr_buf in, out;
    nc_sub **subs; /* by sid - 1; NULL once unsubscribed */
    uint64_t n_subs;
    uint64_t rng;
    int handles_open;
    void (*close_cb)(void *);
    void *close_data;
};

int nc_parse_one_url(const char *s, size_t len, nc_url *u, kvr_err *err);
void nc_flush(kvr_nats_core *c);
void nc_drop(kvr_nats_core *c, const char *why);
int nc_tls_encrypt(kvr_nats_core *c, nc_sock *s);
int nc_tls_start(kvr_nats_core *c, const nc_url *u);
int nc_tls_ctx_init(kvr_nats_core *c, const kvr_nats_core_opts *o, kvr_err *err);
void nc_on_prepare(uv_prepare_t *p);
void nc_on_check(uv_check_t *h);
int nc_tls_read(kvr_nats_core *c, nc_sock *s, size_t n);
int nc_append_sub(kvr_buf *b, const nc_sub *s);
int nc_send_handshake(kvr_nats_core *c);
/* Ends the drains of subscriptions whose last message has come (all of them: everything). */
void nc_end_drains(kvr_nats_core *c, bool all);
bool nc_parse(kvr_nats_core *c);
void nc_on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

#endif
