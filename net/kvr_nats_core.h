/* kvr_nats_core: the NATS client protocol for core messaging (CONNECT, PUB, SUB, UNSUB, MSG,
 * HMSG, PING/PONG) on one libuv TCP connection, entirely on the loop thread.
 *
 * Why not cnats for this: in its threaded mode every inbound message crosses two threads
 * (socket reader, then delivery thread) and a hand-over queue before it reaches the loop, and
 * every publish is a write of its own. On 2 cores that hand-over dominated a route request's
 * cost (measured in docs/ENGINEERING.md). Here a message is parsed and delivered in the read
 * callback that received it, and what is published during a loop turn goes out in one write
 * right after the turn's I/O callbacks (a uv_check handle) and again, for anything published
 * later, just before the loop sleeps (a uv_prepare handle, Redis' beforeSleep). kvr_nats keeps
 * cnats for JetStream.
 *
 * Authentication: user/password or token (options or URL), NKEY (the seed signs the server's
 * INFO nonce, kvr_nkey.h) or a user JWT with its seed (creds). TLS: OpenSSL on memory BIOs
 * driven from the libuv read and write callbacks, started after the server's INFO as the NATS
 * protocol does (never a blocking call on the loop); the server's certificate is verified
 * against tls_ca_file (else the system store) and its host name or IP against the URL's.
 *
 * Cluster: the servers a server names in INFO connect_urls are added to the pool (up to 64
 * servers); a lost connection retries the next server of the pool. A discovered server gets
 * the credentials of the URL it was learned from, and for TLS that URL's host name.
 *
 * Delivery is at most once, as in NATS core: frames handed to the kernel when the connection
 * drops are lost; publishes made while disconnected are kept (up to pending_max bytes) and
 * sent after the next handshake, behind CONNECT and the subscriptions.
 *
 * Connection: tries the URLs in turn, forever, with a doubling reconnect delay plus jitter;
 * CONNECT + PING, and the handshake is done at the server's PONG. Subscriptions are replayed
 * on every reconnect. Client PINGs every ping_interval_ms; max_pings_out unanswered means the
 * connection is stale and it is dropped and re-established.
 *
 * Bounds: a control line (INFO included) over 256 KiB, or a message over the server's
 * max_payload (plus 64 KiB of headers), is a protocol error: the connection is dropped and
 * re-established. Subjects and queue groups are refused (KVR_EINVAL) when empty, over 1024
 * bytes, or holding a space or control character (they would corrupt the protocol stream).
 *
 * Threads: every call and callback on the loop thread given to kvr_nats_core_init.
 * Memory: the caller's strings and payloads are copied before a call returns; slices in a
 * kvr_nats_core_msg are valid only during the callback. The kvr_nats_core is freed after its
 * close callback has run. */
#ifndef KVR_NATS_CORE_H
#define KVR_NATS_CORE_H

#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct kvr_nats_core kvr_nats_core;

typedef enum kvr_nats_core_event {
    KVR_NATS_CORE_CONNECTED = 1,    /* first handshake done */
    KVR_NATS_CORE_DISCONNECTED = 2, /* lost after a handshake; reconnecting */
    KVR_NATS_CORE_RECONNECTED = 3,  /* handshake done again; subscriptions replayed */
} kvr_nats_core_event;

typedef struct kvr_nats_core_msg {
    kvr_slice subject;
    kvr_slice reply; /* len 0: none */
    kvr_slice data;  /* payload without headers */
    int status;      /* HMSG status line code (503: no responders), 0 for MSG */
} kvr_nats_core_msg;

typedef struct kvr_nats_core_opts {
    /* "nats://[user:pass@|token@]host:port", comma-separated; required. tls:// turns TLS on. */
    const char *urls;
    const char *name;                    /* connection name shown by the server; may be NULL */
    const char *user, *password, *token; /* may be NULL; URL credentials take precedence */
    const char *nkey_seed; /* user NKEY seed "SU..." or NULL; with jwt: creds authentication */
    const char *jwt;       /* user JWT or NULL (needs nkey_seed) */
    /* TLS: on when tls or any file is set (or a tls:// URL). PEM files, read by init. */
    bool tls;
    const char *tls_ca_file, *tls_cert_file, *tls_key_file;
    int connect_timeout_ms;    /* 0 → 2000: TCP connect through PONG */
    int reconnect_wait_ms;     /* 0 → 100 */
    int max_reconnect_wait_ms; /* 0 → 2000 */
    int ping_interval_ms;      /* 0 → 2000 */
    int max_pings_out;         /* 0 → 3 */
    size_t pending_max;        /* 0 → 8 MiB: bytes kept while disconnected */
    size_t out_max;            /* 0 → 64 MiB: bytes queued while connected */
    /* Callbacks, loop thread. on_msg: sub_data is what kvr_nats_core_subscribe was given.
     * A callback may publish, subscribe, unsubscribe or close. */
    void *cb_data;
    void (*on_msg)(void *cb_data, void *sub_data, const kvr_nats_core_msg *m);
    void (*on_event)(void *cb_data, kvr_nats_core_event ev);
    /* A kvr_nats_core_drain has ended: no message of that subscription comes after this. */
    void (*on_drained)(void *cb_data, void *sub_data);
    /* The server refused a publish on subject (-ERR 'Permissions Violation for Publish to
     * "subject"'; the connection stays up, the message is gone). subject is not
     * NUL-terminated. NULL: only logged. */
    void (*on_pub_denied)(void *cb_data, const char *subject, size_t len);
    /* A PONG was read on a connection that is up: pong_seq PINGs are answered (see
     * kvr_nats_core_ping). Numbers restart with each connection. NULL: not called. */
    void (*on_pong)(void *cb_data, uint64_t pong_seq);
} kvr_nats_core_opts;

/* Allocates and starts connecting (the first attempt begins on the next loop turn). Fails only
 * on bad options (unparsable URL, bad seed, unreadable TLS files) or memory. Blocking: reads
 * the TLS files; call at startup. */
int kvr_nats_core_init(kvr_nats_core **out, uv_loop_t *loop, const kvr_nats_core_opts *o,
                       kvr_err *err);

/* queue may be NULL. *sid (may be NULL) receives the subscription id. */
int kvr_nats_core_subscribe(kvr_nats_core *c, const char *subject, const char *queue,
                            void *sub_data, uint64_t *sid);
/* No message of sid reaches on_msg after this returns. Unknown sids are ignored. */
int kvr_nats_core_unsubscribe(kvr_nats_core *c, uint64_t sid);
/* Unsubscribes without losing what the server already sent: UNSUB then PING; messages of sid
 * still reach on_msg until the PONG, then on_drained runs (also when the connection drops
 * first: the server forgot the subscription with it). Returns 0 (on_drained will run), 1 when
 * not connected (unsubscribed at once, no on_drained), KVR_ENOTFOUND for an unknown or
 * draining sid, KVR_ENOMEM. */
int kvr_nats_core_drain(kvr_nats_core *c, uint64_t sid);
/* Queues a PING behind everything published so far and returns its number on this connection
 * (on_pong reports the number of the last PONG read: the server has handled everything sent
 * before PING n once PONG n is read); 0 when not connected or out of memory. */
uint64_t kvr_nats_core_ping(kvr_nats_core *c);

/* Queues a PUB (reply may be NULL). KVR_EINVAL: bad subject/reply; KVR_ELIMIT: payload over
 * the server's max_payload; KVR_EAGAIN: over pending_max (disconnected) or out_max;
 * KVR_ECLOSED after close. */
int kvr_nats_core_publish(kvr_nats_core *c, const char *subject, const char *reply,
                          const void *data, size_t len);
/* Same with a NATS header block (HPUB): hdr is the whole block, "NATS/1.0\r\n...\r\n\r\n",
 * at most 4 KiB (KVR_EINVAL otherwise); hlen 0 is a plain PUB. */
int kvr_nats_core_hpublish(kvr_nats_core *c, const char *subject, const char *reply,
                           const void *hdr, size_t hlen, const void *data, size_t len);

/* True between a handshake and the next disconnect. */
bool kvr_nats_core_connected(const kvr_nats_core *c);

/* Writes what is queued (best effort), closes every handle; close_cb(data) runs once all are
 * closed, after which c is freed. No callback runs after this returns. */
void kvr_nats_core_close(kvr_nats_core *c, void (*close_cb)(void *data), void *data);

/* Test and fuzzing hook: parses bytes as if the server had sent them on an established TCP
 * connection (none is needed; a pending connection attempt is cancelled). Returns 0, or
 * KVR_EINVAL once the bytes broke the protocol (the connection would then be dropped and
 * re-established), or KVR_ECLOSED when a callback closed c. */
int kvr_nats_core_feed(kvr_nats_core *c, const void *data, size_t len);

/* Subject/queue check used by publish and subscribe (exported for tests). */
bool kvr_nats_core_valid_token(const char *s);

#endif
