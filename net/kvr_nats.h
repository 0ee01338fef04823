/* kvr_nats: NATS for one libuv loop. Core traffic and JetStream take different paths.
 *
 * Core (subscriptions, publishes, requests, the user's state callbacks): kvroute's own client
 * for the NATS protocol (kvr_nats_core.h) on the loop thread, TLS included. A message is
 * delivered in the read callback that parsed it; what the loop publishes in one turn leaves in
 * one write.
 *
 * JetStream: a second connection, cnats. Blocking cnats calls (connect, close, every JetStream
 * management call, consumer creation) run off the loop thread (uv_queue_work), never on it.
 * Consumer messages arrive on cnats' threads, one delivery thread per consumer, which copy
 * each message into a mutex-protected FIFO and wake the loop with one uv_async_t. The loop
 * drains it for at most ~2 ms per turn, so an event backlog never delays the route requests
 * the core client reads on the same loop. The FIFO is bounded: when the loop falls behind, the
 * consumer's delivery thread blocks on a condition variable (backpressure) instead of
 * dropping; a consumer's backpressure holds up only its own thread. (NOT the cnats libuv
 * adapter: docs/DEPENDENCIES.md 2.) State callbacks follow the core connection; a JetStream
 * reconnect re-creates the consumers.
 *
 * Threads: every function here must be called on the loop thread, except where noted.
 * Memory: a kvr_nats is caller-allocated and must stay valid until the close callback has
 * run. Message memory handed to a callback is valid during that callback only. Strings in
 * kvr_nats_opts are copied by kvr_nats_init.
 *
 * Connection: reconnects forever with backoff (reconnect_wait_ms doubling up to
 * max_reconnect_wait_ms, plus jitter); the first connect is retried forever too, so
 * kvr_nats_init succeeds even when the server is not up yet. Subscriptions survive
 * reconnects (both clients replay them). Publishes while disconnected are kept (8 MiB); past
 * that, publish returns KVR_EAGAIN. Core delivery is at most once, as NATS core is: what was
 * in flight when a connection dropped is lost. */
#ifndef KVR_NATS_H
#define KVR_NATS_H

#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct kvr_nats kvr_nats;
typedef struct kvr_nats_impl kvr_nats_impl;
typedef struct kvr_nats_sub kvr_nats_sub;
typedef struct kvr_nats_consumer kvr_nats_consumer;

/* Status of a request with no responders (the server told us nobody listens). */
#define KVR_NATS_NO_RESPONDERS KVR_ENOTFOUND

typedef enum kvr_nats_state {
    KVR_NATS_CONNECTED = 1,    /* first successful connect */
    KVR_NATS_DISCONNECTED = 2, /* connection lost; the client is reconnecting */
    KVR_NATS_RECONNECTED = 3,  /* back; subscriptions were re-established */
    KVR_NATS_CLOSED = 4,       /* closed for good (only after kvr_nats_close) */
} kvr_nats_state;
const char *kvr_nats_state_name(kvr_nats_state s);

/* One inbound message. All pointers valid during the callback only; subject and reply are
 * NUL-terminated (reply is NULL when the message has none); data is not NUL-terminated. */
typedef struct kvr_nats_msg {
    const char *subject;
    const char *reply;
    const char *data;
    size_t len;
    /* JetStream consumers only (0 otherwise): stream sequence and messages still pending in
     * the consumer after this one (from the message metadata). */
    uint64_t stream_seq;
    uint64_t num_pending;
} kvr_nats_msg;

/* Loop thread. */
typedef void (*kvr_nats_msg_cb)(const kvr_nats_msg *msg, void *data);
typedef void (*kvr_nats_state_cb)(kvr_nats *kn, kvr_nats_state state, void *data);
/* Request reply, loop thread, exactly once per accepted request. status 0: data/len is the
 * reply payload; KVR_ETIMEDOUT; KVR_NATS_NO_RESPONDERS; KVR_ECLOSED (connection closed
 * before an answer). data is NULL when status != 0. */
typedef void (*kvr_nats_reply_cb)(int status, const char *data, size_t len, void *cbdata);
typedef void (*kvr_nats_close_cb)(kvr_nats *kn);

typedef struct kvr_nats_opts {
    /* "nats://127.0.0.1:4222"; or a cluster's URLs, comma-separated. Required. Both
     * connections try them in the order given (first connect and every reconnect), and both
     * learn the cluster's other servers from INFO. */
    const char *url;
    const char *name; /* connection name shown by the server; may be NULL */
    const char *user, *password; /* may be NULL */
    const char *token;           /* may be NULL */
    /* NKEY: a file holding a user seed ("SU..."); creds: a .creds file (user JWT + seed, as
     * nsc writes it). At most one of the two. Read by kvr_nats_init (blocking, at startup). */
    const char *nkey_seed_file, *creds_file;
    /* TLS: any of these set (or tls=true, or a tls:// URL) enables TLS on both connections;
     * files are PEM. The server's certificate is verified against tls_ca_file (else the
     * system store) and the URL's host name or IP; cert+key: mutual TLS. */
    bool tls;
    const char *tls_ca_file, *tls_cert_file, *tls_key_file;
    int connect_timeout_ms;    /* 0 → 2000 */
    int reconnect_wait_ms;     /* 0 → 100: first reconnect delay; doubles per failed attempt */
    int max_reconnect_wait_ms; /* 0 → 2000 */
    int ping_interval_ms;      /* 0 → 2000; stale-connection detection */
    /* JetStream consumer messages waiting for the loop, before the delivery threads block */
    size_t queue_max_msgs;  /* 0 → 65536 */
    size_t queue_max_bytes; /* 0 → 256 MiB */
    kvr_nats_state_cb on_state; /* may be NULL; loop thread */
    void *state_data;
    /* Where replies to this process's requests go: "<prefix>.<nuid>.<n>" on both connections
     * (cnats' JetStream API replies too). NULL → "_INBOX". A role's prefix
     * (kvr_nats_role_inbox) lets the server confine each credential to its own replies
     * (deploy/nats/kvr-nats-auth.sh). Dot-separated tokens of [A-Za-z0-9_-], at most
     * KVR_NATS_INBOX_PREFIX_MAX bytes; copied. */
    const char *inbox_prefix;
} kvr_nats_opts;

#define KVR_NATS_INBOX_PREFIX_MAX 160

/* Writes the inbox prefix of a process in role `role` ("router", "frontend", "worker") into
 * out: "_INBOX.router", "_INBOX.frontend.<id>", "_INBOX.worker.<ns>.<id>" (ns NULL or
 * id 0: left out). The names deploy/nats/kvr-nats-auth.sh allows each role to subscribe
 * under. Returns out, or NULL when it does not fit or is not a valid prefix (ns with a dot or
 * a wildcard). Any thread. */
const char *kvr_nats_role_inbox(char *out, size_t cap, const char *role, const char *ns,
                                uint64_t id);

struct kvr_nats {
    void *data; /* user's */
    kvr_nats_impl *impl;
};

/* Copies urls into out with every credential (user:pass@, token@) replaced by "***@", for log
 * lines and error messages. Truncated to cap; returns out. Any thread. */
const char *kvr_nats_redact_url(const char *urls, char *out, size_t cap);

/* Starts connecting (in the background) and returns at once. err explains a failure (bad
 * options, out of memory). */
int kvr_nats_init(kvr_nats *kn, uv_loop_t *loop, const kvr_nats_opts *opts, kvr_err *err);

/* True while connected (any thread). */
bool kvr_nats_connected(const kvr_nats *kn);

/* Closes: pending requests complete with KVR_ECLOSED, no more message callbacks, then the
 * connection is flushed and closed off the loop thread, then close_cb (may be NULL) runs on
 * the loop thread; after it, kn may be freed. Calling anything else after close is an error
 * (KVR_ECLOSED). */
int kvr_nats_close(kvr_nats *kn, kvr_nats_close_cb close_cb);

/* Core subscription. queue_group may be NULL. on_msg runs on the loop thread. *out (may be
 * NULL) receives a handle for kvr_nats_unsubscribe; handles are freed by kvr_nats_close. */
int kvr_nats_subscribe(kvr_nats *kn, const char *subject, const char *queue_group,
                       kvr_nats_msg_cb on_msg, void *data, kvr_nats_sub **out, kvr_err *err);
/* No callback runs for this subscription after this returns (queued messages are dropped). */
int kvr_nats_unsubscribe(kvr_nats_sub *sub);
/* Unsubscribes without losing a message the server already routed here (a queue group's
 * share, say): callbacks go on until the server has answered a PING sent after the UNSUB,
 * then drained_cb(data) runs on the loop thread, and no callback after it. Returns 0 (drain
 * under way), 1 when nothing was left to wait for (unsubscribed at once; drained_cb does not
 * run), KVR_ENOMEM (unsubscribed at once). Not for JetStream subscriptions. */
int kvr_nats_drain(kvr_nats_sub *sub, void (*drained_cb)(void *data), void *data);

/* Non-blocking publish (buffered by the core client, kvr_nats_core.h).
 * KVR_EINVAL for a bad subject, KVR_EAGAIN when the buffer is full while disconnected,
 * KVR_ECLOSED after close. */
int kvr_nats_publish(kvr_nats *kn, const char *subject, const void *data, size_t len);
/* Publishes to a message's reply subject (same as publish; a NULL/empty reply is KVR_EINVAL). */
int kvr_nats_respond(kvr_nats *kn, const char *reply, const void *data, size_t len);

/* Publishes data on subject for its subscribers; if nobody subscribes there (nats-server
 * answers no responders), publishes it again on fallback, from the loop a round trip later.
 * For messages that must reach someone, sent first where fewer hops serve them (kvr-epp and
 * kvr-frontend send route events to the Raft leader's subject, kvr.route.event behind it).
 * Subscribers on subject must not answer (the reply subject is this connection's inbox). The
 * message is held until a no-responders answer can no longer come: the server has answered a
 * PING sent after it (one or two round trips). While disconnected, when 4,096 are held, when
 * the server refuses subject by its permissions, or when memory is short, it goes to fallback
 * at once; a dropped connection sends the held ones there (a message may then arrive on both:
 * for idempotent messages). len at most 64 KiB. Returns as kvr_nats_publish. Loop thread. */
int kvr_nats_publish_fallback(kvr_nats *kn, const char *subject, const char *fallback,
                              const void *data, size_t len);

/* Asynchronous request/reply: one wildcard inbox subscription per connection, a unique reply
 * subject and a timer per request. When this returns 0, cb runs exactly once on the loop
 * thread (never from inside this call); when it returns an error, cb never runs. */
int kvr_nats_request(kvr_nats *kn, const char *subject, const void *data, size_t len,
                     uint32_t timeout_ms, kvr_nats_reply_cb cb, void *cbdata);

/* JetStream publish: a request to `subject` (captured by a stream) whose reply is the stream's
 * PubAck. msg_id (may be NULL; at most 256 chars, no CR/LF) goes in the Nats-Msg-Id header:
 * the stream drops a second message with the same id within its duplicate window, so a retry
 * after a lost ack stores nothing twice. cb runs exactly once on the loop thread when this
 * returned 0: status 0 with the stream sequence (duplicate: the stream already held msg_id,
 * seq is the original's); KVR_ETIMEDOUT (no ack: no stream leader, or the ack was lost);
 * KVR_NATS_NO_RESPONDERS (no stream captures the subject); KVR_EAGAIN (JetStream answered
 * with an error, e.g. 503); KVR_ECORRUPT (an unparsable ack); KVR_ECLOSED. Many may be in
 * flight at once; they leave in the order of the calls. */
typedef void (*kvr_nats_puback_cb)(int status, uint64_t seq, bool duplicate, void *cbdata);
int kvr_nats_js_publish(kvr_nats *kn, const char *subject, const char *msg_id, const void *data,
                        size_t len, uint32_t timeout_ms, kvr_nats_puback_cb cb, void *cbdata);
/* Parses a PubAck payload (exported for tests): 0 and seq/duplicate, KVR_EAGAIN for a
 * JetStream error reply, KVR_ECORRUPT for anything else. Any thread. */
int kvr_nats_parse_puback(const char *data, size_t len, uint64_t *seq, bool *duplicate);

/* Counters (loop thread). */
typedef struct kvr_nats_stats {
    uint64_t msgs_in, bytes_in;      /* delivered to callbacks */
    uint64_t msgs_out, bytes_out;    /* published */
    uint64_t backpressure_waits;     /* times a consumer's cnats thread blocked on a full queue */
    uint64_t requests, request_timeouts, request_no_responders;
    uint64_t fallbacks;     /* kvr_nats_publish_fallback messages nobody took, sent again */
    uint64_t fallback_busy; /* ... sent to their fallback at once (see above) */
    uint64_t reconnects;
    uint64_t consumer_restarts;      /* JetStream consumers re-created */
    size_t queue_len;                /* JetStream messages waiting for the loop */
} kvr_nats_stats;
void kvr_nats_get_stats(const kvr_nats *kn, kvr_nats_stats *out);

/* ---- JetStream (every management call runs on the libuv threadpool) ---- */

typedef struct kvr_nats_stream_cfg {
    const char *name;     /* "KVR_EVENTS" */
    const char *subjects; /* one subject filter, "kvr.kv.>" */
    int64_t max_age_ms;   /* 0: unlimited */
    int64_t max_bytes;    /* 0: unlimited */
    bool memory;          /* false: file storage */
    int replicas;         /* 0 → 1; 3 on a JetStream cluster survives the loss of a node */
} kvr_nats_stream_cfg;

typedef struct kvr_nats_stream_info {
    uint64_t first_seq, last_seq, msgs, bytes;
} kvr_nats_stream_info;

/* status 0 and info, or an error status with a message (errmsg NUL-terminated, valid during
 * the callback). Loop thread. */
typedef void (*kvr_nats_stream_cb)(int status, const kvr_nats_stream_info *info,
                                   const char *errmsg, void *data);

/* Creates the stream if missing (an existing one is left as it is and its info returned).
 * cb runs once on the loop thread. */
int kvr_nats_js_ensure_stream(kvr_nats *kn, const kvr_nats_stream_cfg *cfg,
                              kvr_nats_stream_cb cb, void *data);
/* Stream info (first/last sequence). KVR_ENOTFOUND when the stream does not exist. */
int kvr_nats_js_stream_info(kvr_nats *kn, const char *stream, kvr_nats_stream_cb cb,
                            void *data);

/* In-order push consumer (ephemeral, no acks, flow control) on `stream`, messages with
 * subjects matching `filter` (NULL: all), from stream sequence start_seq (0 or 1: from the start). Messages
 * reach on_msg on the loop thread in stream order with msg->stream_seq set; a sequence at or
 * below the last one delivered is never delivered twice (replays after a re-creation are
 * filtered). Sequences may skip (messages expired or purged from the stream).
 *
 * Self-healing: after a reconnect, a gap in the consumer's delivery sequence (cnats dropped
 * messages), or when the stream holds messages past the last delivered sequence and nothing
 * has arrived for ~2 s, the consumer is re-created from
 * last delivered + 1 (off the loop thread, retried until it succeeds). Creation itself is
 * asynchronous: this returns at once. */
int kvr_nats_js_consume(kvr_nats *kn, const char *stream, const char *filter,
                        uint64_t start_seq, kvr_nats_msg_cb on_msg, void *data,
                        kvr_nats_consumer **out, kvr_err *err);
/* Stream sequence of the last message handed to on_msg (or start_seq - 1). */
uint64_t kvr_nats_consumer_last_seq(const kvr_nats_consumer *c);
/* True once the consumer has been created on the server at least once. */
bool kvr_nats_consumer_active(const kvr_nats_consumer *c);
/* No callback runs after this returns; the server drops the ephemeral consumer once its
 * subscription is gone. */
int kvr_nats_consumer_stop(kvr_nats_consumer *c);

/* Process exit: waits (up to timeout_ms) for cnats' threads to end. Call once, after every
 * kvr_nats has been closed. Any thread. */
void kvr_nats_global_shutdown(int timeout_ms);

#endif
