/* kvr_nats_int.h: private to net/kvr_nats*.c (kvr_nats.h): the state shared by the core API and
 * requests (kvr_nats.c, on the loop-native client), the JetStream-thread → loop queue
 * (kvr_nats_queue.c) and JetStream publish, management and consumers (kvr_nats_js.c).
 *
 * Threads: fields are the loop thread's unless a comment says "under mu" or the field is
 * atomic; functions named kn_on_nats_* and kn_on_js_* run on cnats threads (the JetStream
 * connection's), the rest on the loop thread. */
#ifndef KVR_NATS_INT_H
#define KVR_NATS_INT_H

#include "kvr_nats.h"
#include "kvr_nats_core.h"

#include <nats/nats.h>
#include <pthread.h>
#include <stdatomic.h>

#define KN_SUBJECT_MAX 1024
#define KN_REQ_BUCKETS 4096
#define KN_JS_WAIT_MS 5000
#define KN_WATCHDOG_MS 1000

/* What a cnats thread hands to the loop: a JetStream consumer's message, or the JetStream
 * connection's reconnect (its consumers must be re-created). */
typedef enum { QI_MSG = 1, QI_JS_RECONNECTED = 2 } qi_kind;

typedef struct qitem {
    struct qitem *next;
    qi_kind kind;
    kvr_nats_sub *sub; /* QI_MSG: the consumer incarnation it came through */
    uint64_t seq, pending, cseq;
    size_t len;
    char *subject;
    char *reply;
    char buf[]; /* subject\0 reply\0 data */
} qitem;

/* A core subscription (sid on the loop-native client) or one incarnation of a JetStream
 * consumer (ns on the cnats JetStream connection, consumer set). */
struct kvr_nats_sub {
    kvr_nats_impl *ki;
    natsSubscription *ns;
    uint64_t sid; /* on the core connection (0: none) */
    kvr_nats_msg_cb cb;
    void *data;
    kvr_nats_consumer *consumer; /* set for one incarnation of a JetStream consumer */
    bool dead;                   /* loop thread: no more callbacks */
    bool is_inbox;
    void (*drained_cb)(void *data); /* kvr_nats_drain */
    void *drained_data;
    struct kvr_nats_sub *next_all;
};

struct kvr_nats_consumer {
    kvr_nats_impl *ki;
    char *stream, *filter;
    kvr_nats_msg_cb cb;
    void *data;
    uint64_t last_seq;     /* last delivered to cb */
    kvr_nats_sub *current; /* live incarnation, or NULL */
    bool creating;         /* a create work item is in flight */
    bool checking;         /* a stream-info work item is in flight */
    bool active;
    bool stopped;
    uint64_t last_cseq; /* consumer sequence of the last message of the current incarnation */
    uint64_t tick_seq;  /* last_seq at the previous watchdog tick */
    int stalled_ticks;  /* ticks without progress */
    int create_failures;
    bool restart_deferred; /* a re-creation waits for the core connection */
    struct kvr_nats_consumer *next;
};

/* kvr_nats_publish_fallback's messages, held until a no-responders answer can no longer come
 * (kvr_nats_fallback.c: the PONG of a PING sent after them). A ring indexed by id: a slot
 * still held when its turn comes again sends the new message to its fallback at once. */
#define KN_FB_SLOTS 4096
#define KN_FB_PING_MS 2 /* a PING covers what was published in the last 2 ms, not each batch */
#define KN_FB_MAX_BYTES 65536
#define KN_FB_DENIED_MAX 8
typedef struct kn_fb {
    uint64_t id; /* 0: free */
    char *buf; /* the payload (len bytes), the fallback subject, the subject (NUL-terminated) */
    size_t len;
} kn_fb;

typedef struct kn_req {
    uint64_t id;
    uv_timer_t timer;
    kvr_nats_reply_cb cb;
    void *cbdata;
    struct kn_req *next; /* bucket chain */
    kvr_nats_impl *ki;
} kn_req;

struct kvr_nats_impl {
    kvr_nats *kn;
    uv_loop_t *loop;
    kvr_nats_core *core; /* core traffic: subscriptions, publishes, requests (NULL once closed) */
    natsConnection *jnc; /* JetStream: management calls and consumers (own delivery threads) */
    jsCtx *js;           /* on jnc */
    kvr_nats_state_cb on_state;
    void *state_data;

    /* the queue from the JetStream connection's cnats threads to the loop: one FIFO, bounded
     * for messages (a full queue blocks the delivery thread: backpressure, never a drop).
     * Under mu. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    qitem *q_head, *q_tail;
    size_t q_msgs, q_bytes;
    size_t max_msgs, max_bytes;
    bool q_closing;
    uint64_t bp_waits;
    uv_async_t async;

    _Atomic bool connected; /* the core connection */
    bool jnc_closed; /* cnats delivered the JetStream connection's closed callback (under mu) */
    /* loop thread: the core connection's last state delivered was (re)connected. Consumer
     * re-creations wait for it, so events are applied only once the user has seen the core
     * connection back (reconnect counters, queue-group subscriptions). */
    bool core_up;
    bool closing; /* loop thread */
    bool close_started;
    kvr_nats_close_cb close_cb;
    int works; /* outstanding uv_queue_work items */
    uv_work_t close_work;
    uv_timer_t watchdog;
    int handles_open;

    kvr_nats_sub *subs; /* every sub ever made; freed at close */
    kvr_nats_consumer *consumers;
    natsSubscription **graveyard; /* unsubscribed natsSubscriptions, destroyed at close or trimmed */
    size_t n_graveyard, cap_graveyard;

    /* requests */
    kvr_nats_sub *inbox_sub;
    char inbox[KVR_NATS_INBOX_PREFIX_MAX + 32]; /* prefix "." nuid (22) */
    uint64_t next_req_id;
    kn_req *req_buckets[KN_REQ_BUCKETS];
    kn_fb *fb; /* KN_FB_SLOTS, allocated at the first kvr_nats_publish_fallback */
    uint64_t next_fb_id;               /* the last id given */
    uv_timer_t fb_timer;               /* sends the next covering PING */
    uint64_t fb_ping_seq;              /* the PING covering ids up to fb_covered_id (0: none out) */
    uint64_t fb_covered_id;            /* ... */
    uint64_t fb_released_id;           /* every id up to this one is released */
    char *fb_denied[KN_FB_DENIED_MAX]; /* subjects the server refused: straight to fallback */
    int n_fb_denied;

    kvr_nats_stats stats;
    int64_t reconnect_wait_ms, max_reconnect_wait_ms;
};

void kn_inbox_msg(kvr_nats_impl *ki, const char *subject, bool no_responders, const char *data,
                  size_t len);
/* kvr_nats_fallback.c: an inbox message for <inbox>.f<id_str>; frees the held messages */
void kn_fallback_msg(kvr_nats_impl *ki, const char *id_str, bool no_responders);
void kn_fallback_free(kvr_nats_impl *ki);
/* the server refused a publish on subject (kvr_nats_core_opts.on_pub_denied) */
void kn_fallback_denied(kvr_nats_impl *ki, const char *subject, size_t len);
/* a PONG on the core connection (kvr_nats_core_opts.on_pong); the connection dropped */
void kn_fallback_pong(kvr_nats_impl *ki, uint64_t pong_seq);
void kn_fallback_reset(kvr_nats_impl *ki);
int kn_request_hdr(kvr_nats *kn, const char *subject, const char *msg_id, const void *data,
                   size_t len, uint32_t timeout_ms, kvr_nats_reply_cb cb, void *cbdata);
void kn_maybe_start_close(kvr_nats_impl *ki);
int kn_status_to_kvr(natsStatus s);
void kn_on_nats_msg(natsConnection *nc, natsSubscription *ns, natsMsg *m, void *closure);
void kn_on_js_reconnected(natsConnection *nc, void *closure);
void kn_on_js_conn_noop(natsConnection *nc, void *closure);
void kn_on_js_closed(natsConnection *nc, void *closure);
void kn_on_nats_error(natsConnection *nc, natsSubscription *sub, natsStatus err, void *closure);
int64_t kn_reconnect_delay(natsConnection *nc, int attempts, void *closure);
natsStatus kn_set_servers(natsOptions *no, const char *urls);
void kn_on_async(uv_async_t *a);
void kn_queue_free(kvr_nats_impl *ki);
int kn_graveyard_add(kvr_nats_impl *ki, natsSubscription *ns);
void kn_graveyard_trim(kvr_nats_impl *ki);
/* kvr_nats_js.c, loop thread */
void kn_consumer_deliver(kvr_nats_impl *ki, kvr_nats_sub *sub, const kvr_nats_msg *m,
                         uint64_t cseq);
void kn_js_reconnected(kvr_nats_impl *ki);
void kn_consumers_core_up(kvr_nats_impl *ki);
void kn_consumer_restart(kvr_nats_consumer *c, const char *why);
void kn_on_watchdog(uv_timer_t *t);

#endif
