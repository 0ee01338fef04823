/* kvr_nats: see kvr_nats.h. cnats threads → one locked FIFO → uv_async_t → loop thread. */
#include "kvr_nats.h"

#include "kvr_log.h"
#include "kvr_nats_core.h"
#include "kvr_nkey.h"

#include <errno.h>
#include <inttypes.h>
#include <nats/nats.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define KN_SUBJECT_MAX 1024
#define KN_REQ_BUCKETS 4096
#define KN_DRAIN_PER_TURN 2048
#define KN_JS_WAIT_MS 5000
#define KN_WATCHDOG_MS 1000

typedef enum { QI_MSG = 1, QI_STATE = 2 } qi_kind;

typedef struct qitem {
    struct qitem *next;
    qi_kind kind;
    kvr_nats_sub *sub;
    kvr_nats_state state;
    bool no_responders;
    bool js_conn; /* QI_STATE: from the JetStream connection */
    uint64_t seq, pending, cseq;
    size_t len;
    char *subject;
    char *reply;
    char buf[]; /* subject\0 reply\0 data */
} qitem;

struct kvr_nats_sub {
    kvr_nats_impl *ki;
    natsSubscription *ns;
    uint64_t sid; /* on the native core connection (0: none) */
    kvr_nats_msg_cb cb;
    void *data;
    kvr_nats_consumer *consumer; /* set for one incarnation of a JetStream consumer */
    bool dead;                   /* loop thread: no more callbacks */
    bool is_inbox;
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
    /* core traffic (subscriptions, publishes, requests): the loop-native client, or, with TLS,
     * a cnats connection (shared delivery thread) */
    kvr_nats_core *core;
    natsConnection *nc;
    natsConnection *jnc; /* JetStream: management calls and consumers (own delivery threads) */
    jsCtx *js;           /* on jnc */
    kvr_nats_state_cb on_state;
    void *state_data;

    /* queue shared with cnats threads */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* two lanes: [0] core subscriptions, replies and state changes, [1] JetStream consumers.
     * The loop serves lane 0 first and gives lane 1 a time budget per turn, so a backlog of
     * events never queues route requests behind it. Each lane has its own bound. */
    struct {
        qitem *head, *tail;
        size_t msgs, bytes;
    } lane[2];
    size_t max_msgs, max_bytes;
    bool q_closing;
    uint64_t bp_waits;
    uv_async_t async;

    _Atomic bool connected;
    bool nc_closed;  /* cnats delivered the closed callback (under mu) */
    bool jnc_closed; /* same for the JetStream connection */
    /* loop thread: the core connection's last state delivered was (re)connected. Consumer
     * re-creations wait for it, so events are applied only once the user has seen the core
     * connection back (reconnect counters, queue-group subscriptions). */
    bool core_up;
    bool closing;      /* loop thread */
    bool close_started;
    kvr_nats_close_cb close_cb;
    int works;         /* outstanding uv_queue_work items */
    uv_work_t close_work;
    uv_timer_t watchdog;
    int handles_open;

    kvr_nats_sub *subs;         /* every sub ever made; freed at close */
    kvr_nats_consumer *consumers;
    natsSubscription **graveyard; /* natsSubscriptions to destroy at close */
    size_t n_graveyard, cap_graveyard;

    /* requests */
    kvr_nats_sub *inbox_sub;
    char inbox[128];
    uint64_t next_req_id;
    kn_req *req_buckets[KN_REQ_BUCKETS];

    kvr_nats_stats stats;
    int64_t reconnect_wait_ms, max_reconnect_wait_ms;
    /* batch_publishes: the flush helper thread */
    bool batch;
    pthread_t kick_th;
    bool kick_started;
    pthread_mutex_t kick_mu;
    pthread_cond_t kick_cv;
    bool kick_pending, kick_stop;
};

/* Flush helper: cnats 3.4.1's own flusher waits 1 ms to batch; this flushes at once and lets
 * writes pile up only while a flush is in flight. */
static void *kick_main(void *arg)
{
    kvr_nats_impl *ki = arg;
    pthread_mutex_lock(&ki->kick_mu);
    for (;;) {
        while (!ki->kick_pending && !ki->kick_stop)
            pthread_cond_wait(&ki->kick_cv, &ki->kick_mu);
        if (ki->kick_stop)
            break;
        ki->kick_pending = false;
        pthread_mutex_unlock(&ki->kick_mu);
        if (atomic_load(&ki->connected))
            natsConnection_FlushTimeout(ki->nc, 1000);
        pthread_mutex_lock(&ki->kick_mu);
    }
    pthread_mutex_unlock(&ki->kick_mu);
    nats_ReleaseThreadMemory();
    return NULL;
}

static void kick(kvr_nats_impl *ki)
{
    if (!ki->batch)
        return;
    pthread_mutex_lock(&ki->kick_mu);
    if (!ki->kick_pending) {
        ki->kick_pending = true;
        pthread_cond_signal(&ki->kick_cv);
    }
    pthread_mutex_unlock(&ki->kick_mu);
}

static void kick_stop(kvr_nats_impl *ki)
{
    if (!ki->kick_started)
        return;
    pthread_mutex_lock(&ki->kick_mu);
    ki->kick_stop = true;
    pthread_cond_signal(&ki->kick_cv);
    pthread_mutex_unlock(&ki->kick_mu);
    pthread_join(ki->kick_th, NULL);
    ki->kick_started = false;
}

const char *kvr_nats_state_name(kvr_nats_state s)
{
    switch (s) {
    case KVR_NATS_CONNECTED: return "connected";
    case KVR_NATS_DISCONNECTED: return "disconnected";
    case KVR_NATS_RECONNECTED: return "reconnected";
    case KVR_NATS_CLOSED: return "closed";
    }
    return "unknown";
}

static int status_to_kvr(natsStatus s)
{
    switch (s) {
    case NATS_OK: return 0;
    case NATS_TIMEOUT: return KVR_ETIMEDOUT;
    case NATS_NO_RESPONDERS: return KVR_NATS_NO_RESPONDERS;
    case NATS_NOT_FOUND: return KVR_ENOTFOUND;
    case NATS_INVALID_ARG:
    case NATS_INVALID_SUBJECT: return KVR_EINVAL;
    case NATS_NO_MEMORY: return KVR_ENOMEM;
    case NATS_CONNECTION_CLOSED: return KVR_ECLOSED;
    case NATS_INSUFFICIENT_BUFFER:
    case NATS_NOT_YET_CONNECTED:
    case NATS_CONNECTION_DISCONNECTED:
    case NATS_STALE_CONNECTION: return KVR_EAGAIN;
    default: return KVR_EIO;
    }
}

/* ---------- queue (producers: cnats threads; consumer: loop) ---------- */

static void enqueue(kvr_nats_impl *ki, qitem *it, bool bounded)
{
    int l = it->sub && it->sub->consumer ? 1 : 0;
    pthread_mutex_lock(&ki->mu);
    if (bounded) {
        bool waited = false;
        while (!ki->q_closing &&
               (ki->lane[l].msgs >= ki->max_msgs || ki->lane[l].bytes >= ki->max_bytes)) {
            if (!waited) {
                ki->bp_waits++;
                waited = true;
            }
            pthread_cond_wait(&ki->cv, &ki->mu);
        }
    }
    if (ki->q_closing) {
        pthread_mutex_unlock(&ki->mu);
        free(it);
        return;
    }
    it->next = NULL;
    if (ki->lane[l].tail)
        ki->lane[l].tail->next = it;
    else
        ki->lane[l].head = it;
    ki->lane[l].tail = it;
    ki->lane[l].msgs++;
    ki->lane[l].bytes += it->len;
    pthread_mutex_unlock(&ki->mu);
    uv_async_send(&ki->async);
}

/* cnats delivery thread */
static void on_nats_msg(natsConnection *nc, natsSubscription *ns, natsMsg *m, void *closure)
{
    kvr_nats_sub *sub = closure;
    kvr_nats_impl *ki = sub->ki;
    const char *subj = natsMsg_GetSubject(m);
    const char *reply = natsMsg_GetReply(m);
    const char *data = natsMsg_GetData(m);
    int len = natsMsg_GetDataLength(m);
    size_t sl = subj ? strlen(subj) : 0, rl = reply ? strlen(reply) : 0;
    if (len < 0)
        len = 0;
    qitem *it = malloc(sizeof(*it) + sl + 1 + rl + 1 + (size_t)len);
    if (!it) {
        KVR_LOG_ERROR_RL(5, "nats message dropped: out of memory", "subject=%s", subj ? subj : "");
        natsMsg_Destroy(m);
        return;
    }
    memset(it, 0, sizeof(*it));
    it->kind = QI_MSG;
    it->sub = sub;
    it->subject = it->buf;
    memcpy(it->subject, subj ? subj : "", sl + 1);
    if (reply && rl) {
        it->reply = it->buf + sl + 1;
        memcpy(it->reply, reply, rl + 1);
    }
    it->len = (size_t)len;
    if (len)
        memcpy(it->buf + sl + 1 + rl + 1, data, (size_t)len);
    if (sub->is_inbox)
        it->no_responders = natsMsg_IsNoResponders(m);
    if (sub->consumer) {
        jsMsgMetaData *md = NULL;
        if (natsMsg_GetMetaData(&md, m) == NATS_OK && md) {
            it->seq = md->Sequence.Stream;
            it->cseq = md->Sequence.Consumer;
            it->pending = md->NumPending;
            jsMsgMetaData_Destroy(md);
        } else {
            /* not a stream message (should not happen for an ordered consumer) */
            natsMsg_Destroy(m);
            free(it);
            return;
        }
    }
    natsMsg_Destroy(m);
    enqueue(ki, it, true);
}

static void push_state(kvr_nats_impl *ki, kvr_nats_state st, bool js_conn)
{
    qitem *it = calloc(1, sizeof(*it));
    if (!it)
        return;
    it->kind = QI_STATE;
    it->state = st;
    it->js_conn = js_conn;
    enqueue(ki, it, false);
}

static void on_connected(natsConnection *nc, void *closure)
{
    kvr_nats_impl *ki = closure;
    atomic_store(&ki->connected, true);
    push_state(ki, KVR_NATS_CONNECTED, false);
}

static void on_disconnected(natsConnection *nc, void *closure)
{
    kvr_nats_impl *ki = closure;
    atomic_store(&ki->connected, false);
    push_state(ki, KVR_NATS_DISCONNECTED, false);
}

static void on_reconnected(natsConnection *nc, void *closure)
{
    kvr_nats_impl *ki = closure;
    atomic_store(&ki->connected, true);
    push_state(ki, KVR_NATS_RECONNECTED, false);
}

/* cnats async-callback thread. cnats delivers a connection's callbacks in order on one thread
 * and "closed" is the last: once it has run, no disconnected/reconnected callback can still
 * be on its way to ki, so close may free it. */
static void on_nats_closed(natsConnection *nc, void *closure)
{
    kvr_nats_impl *ki = closure;
    pthread_mutex_lock(&ki->mu);
    ki->nc_closed = true;
    pthread_cond_broadcast(&ki->cv);
    pthread_mutex_unlock(&ki->mu);
}

/* The JetStream connection's state changes only re-create consumers (after a reconnect); the
 * user's state callback follows the core connection. */
static void on_js_reconnected(natsConnection *nc, void *closure)
{
    push_state(closure, KVR_NATS_RECONNECTED, true);
}

static void on_js_conn_noop(natsConnection *nc, void *closure)
{
}

static void on_js_closed(natsConnection *nc, void *closure)
{
    kvr_nats_impl *ki = closure;
    pthread_mutex_lock(&ki->mu);
    ki->jnc_closed = true;
    pthread_cond_broadcast(&ki->cv);
    pthread_mutex_unlock(&ki->mu);
}

static void on_nats_error(natsConnection *nc, natsSubscription *sub, natsStatus err, void *closure)
{
    KVR_LOG_WARN_RL(5, "nats async error", "error=\"%s\"", natsStatus_GetText(err));
}

static int64_t reconnect_delay(natsConnection *nc, int attempts, void *closure)
{
    kvr_nats_impl *ki = closure;
    int64_t base = ki->reconnect_wait_ms, cap = ki->max_reconnect_wait_ms;
    int64_t d = base;
    for (int i = 1; i < attempts && d < cap; i++)
        d *= 2;
    if (d > cap)
        d = cap;
    return d + (rand() % (d / 4 + 1));
}

/* cnats takes one URL per natsOptions_SetURL (a comma-separated list is read as one bad
 * URL, and the connection then retries it forever): a cluster's URLs go in as a server list.
 * Spaces around the commas are dropped. */
static natsStatus set_servers(natsOptions *no, const char *urls)
{
    char *copy = strdup(urls);
    const char *list[64];
    int n = 0;
    if (!copy)
        return NATS_NO_MEMORY;
    for (char *save = NULL, *t = strtok_r(copy, ",", &save); t && n < 64;
         t = strtok_r(NULL, ",", &save)) {
        while (*t == ' ')
            t++;
        size_t l = strlen(t);
        while (l > 0 && t[l - 1] == ' ')
            t[--l] = 0;
        if (*t)
            list[n++] = t;
    }
    natsStatus s = n > 0 ? natsOptions_SetServers(no, list, n) : NATS_INVALID_ARG;
    free(copy);
    return s;
}

/* ---------- the core connection, either kind ---------- */

static int pub(kvr_nats_impl *ki, const char *subject, const char *reply, const void *data,
               size_t len)
{
    if (ki->core)
        return kvr_nats_core_publish(ki->core, subject, reply, data, len);
    natsStatus s = reply ? natsConnection_PublishRequest(ki->nc, subject, reply, data, (int)len)
                         : natsConnection_Publish(ki->nc, subject, data, (int)len);
    if (s != NATS_OK)
        return status_to_kvr(s);
    kick(ki);
    return 0;
}

static void deliver_state(kvr_nats_impl *ki, kvr_nats_state state, bool js_conn);
static void deliver_msg(kvr_nats_impl *ki, kvr_nats_sub *sub, const kvr_nats_msg *m,
                        bool no_responders, uint64_t cseq);

/* Native core connection callbacks: already on the loop thread, no queue. The slices point
 * into the read buffer; subject and reply are copied to NUL-terminated strings (the API
 * promises C strings), the payload is passed as it is. */
static void core_on_msg(void *cb_data, void *sub_data, const kvr_nats_core_msg *cm)
{
    kvr_nats_impl *ki = cb_data;
    char subject[KN_SUBJECT_MAX + 1], reply[KN_SUBJECT_MAX + 1];
    if (cm->subject.len > KN_SUBJECT_MAX || cm->reply.len > KN_SUBJECT_MAX)
        return;
    memcpy(subject, cm->subject.base, cm->subject.len);
    subject[cm->subject.len] = 0;
    if (cm->reply.len)
        memcpy(reply, cm->reply.base, cm->reply.len);
    reply[cm->reply.len] = 0;
    kvr_nats_msg m = {subject, cm->reply.len ? reply : NULL, cm->data.base, cm->data.len, 0, 0};
    deliver_msg(ki, sub_data, &m, cm->status == 503 && cm->data.len == 0, 0);
}

static void core_on_event(void *cb_data, kvr_nats_core_event ev)
{
    kvr_nats_impl *ki = cb_data;
    kvr_nats_state st = ev == KVR_NATS_CORE_CONNECTED      ? KVR_NATS_CONNECTED
                        : ev == KVR_NATS_CORE_RECONNECTED ? KVR_NATS_RECONNECTED
                                                          : KVR_NATS_DISCONNECTED;
    atomic_store(&ki->connected, st != KVR_NATS_DISCONNECTED);
    deliver_state(ki, st, false);
}

/* ---------- requests ---------- */

static kn_req **req_slot(kvr_nats_impl *ki, uint64_t id)
{
    kn_req **pp = &ki->req_buckets[id & (KN_REQ_BUCKETS - 1)];
    while (*pp && (*pp)->id != id)
        pp = &(*pp)->next;
    return pp;
}

static void req_timer_closed(uv_handle_t *h)
{
    free(h->data);
}

static void req_finish(kn_req *r, int status, const char *data, size_t len)
{
    kvr_nats_impl *ki = r->ki;
    kn_req **pp = req_slot(ki, r->id);
    if (*pp == r)
        *pp = r->next;
    uv_timer_stop(&r->timer);
    uv_close((uv_handle_t *)&r->timer, req_timer_closed);
    if (status == KVR_ETIMEDOUT)
        ki->stats.request_timeouts++;
    else if (status == KVR_NATS_NO_RESPONDERS)
        ki->stats.request_no_responders++;
    r->cb(status, status == 0 ? data : NULL, status == 0 ? len : 0, r->cbdata);
}

static void req_timeout(uv_timer_t *t)
{
    req_finish(t->data, KVR_ETIMEDOUT, NULL, 0);
}

static void inbox_msg(kvr_nats_impl *ki, const char *subject, bool no_responders,
                      const char *data, size_t len)
{
    const char *dot = strrchr(subject, '.');
    if (!dot)
        return;
    char *end = NULL;
    errno = 0;
    unsigned long long id = strtoull(dot + 1, &end, 10);
    if (errno || !end || *end)
        return;
    kn_req **pp = req_slot(ki, id);
    if (!*pp)
        return; /* late reply after a timeout */
    if (no_responders)
        req_finish(*pp, KVR_NATS_NO_RESPONDERS, NULL, 0);
    else
        req_finish(*pp, 0, data, len);
}

int kvr_nats_request(kvr_nats *kn, const char *subject, const void *data, size_t len,
                     uint32_t timeout_ms, kvr_nats_reply_cb cb, void *cbdata)
{
    kvr_nats_impl *ki = kn->impl;
    if (!ki || ki->closing)
        return KVR_ECLOSED;
    if (!subject || !*subject || !cb || len > INT32_MAX)
        return KVR_EINVAL;
    kn_req *r = calloc(1, sizeof(*r));
    if (!r)
        return KVR_ENOMEM;
    r->id = ++ki->next_req_id;
    r->ki = ki;
    r->cb = cb;
    r->cbdata = cbdata;
    char reply[sizeof(ki->inbox) + 24];
    snprintf(reply, sizeof(reply), "%s.%" PRIu64, ki->inbox, r->id);
    int rc = pub(ki, subject, reply, data, len);
    if (rc != 0) {
        free(r);
        return rc;
    }
    uv_timer_init(ki->loop, &r->timer);
    r->timer.data = r;
    uv_timer_start(&r->timer, req_timeout, timeout_ms ? timeout_ms : 1, 0);
    kn_req **pp = &ki->req_buckets[r->id & (KN_REQ_BUCKETS - 1)];
    r->next = *pp;
    *pp = r;
    ki->stats.requests++;
    ki->stats.msgs_out++;
    ki->stats.bytes_out += len;
    return 0;
}

/* ---------- loop side ---------- */

static void consumer_restart(kvr_nats_consumer *c, const char *why);

static void deliver_state(kvr_nats_impl *ki, kvr_nats_state state, bool js_conn)
{
    if (js_conn) {
        if (state == KVR_NATS_RECONNECTED)
            for (kvr_nats_consumer *c = ki->consumers; c; c = c->next)
                if (!c->stopped && c->active)
                    consumer_restart(c, "reconnected");
        return;
    }
    if (state == KVR_NATS_RECONNECTED)
        ki->stats.reconnects++;
    ki->core_up = state == KVR_NATS_CONNECTED || state == KVR_NATS_RECONNECTED;
    if (ki->on_state && !ki->closing)
        ki->on_state(ki->kn, state, ki->state_data);
    if (ki->core_up)
        for (kvr_nats_consumer *c = ki->consumers; c; c = c->next)
            if (c->restart_deferred)
                consumer_restart(c, "reconnected");
}

/* One message for sub, from either connection kind. */
static void deliver_msg(kvr_nats_impl *ki, kvr_nats_sub *sub, const kvr_nats_msg *m,
                        bool no_responders, uint64_t cseq)
{
    if (sub->dead || ki->closing)
        return;
    if (sub->is_inbox) {
        inbox_msg(ki, m->subject, no_responders, m->data, m->len);
        return;
    }
    if (sub->consumer) {
        kvr_nats_consumer *c = sub->consumer;
        if (c->stopped || c->current != sub || c->restart_deferred)
            return; /* a deferred re-creation starts again after the last applied sequence */
        /* a push consumer numbers its deliveries 1, 2, 3...: a jump means cnats dropped
         * messages (slow consumer) or the server lost some; start again after the last one
         * applied rather than apply past a hole */
        if (cseq != c->last_cseq + 1) {
            consumer_restart(c, "delivery gap");
            return;
        }
        c->last_cseq = cseq;
        if (m->stream_seq <= c->last_seq)
            return;
        c->last_seq = m->stream_seq;
        c->stalled_ticks = 0;
        ki->stats.msgs_in++;
        ki->stats.bytes_in += m->len;
        c->cb(m, c->data);
        return;
    }
    ki->stats.msgs_in++;
    ki->stats.bytes_in += m->len;
    sub->cb(m, sub->data);
}

static void deliver(kvr_nats_impl *ki, qitem *it)
{
    if (it->kind == QI_STATE) {
        deliver_state(ki, it->state, it->js_conn);
        return;
    }
    const char *data = it->buf + strlen(it->subject) + 1 + (it->reply ? strlen(it->reply) : 0) + 1;
    kvr_nats_msg m = {it->subject, it->reply, data, it->len, it->seq, it->pending};
    deliver_msg(ki, it->sub, &m, it->no_responders, it->cseq);
}

/* Under ki->mu: detaches up to max items from the head of lane l. */
static qitem *take(kvr_nats_impl *ki, int l, size_t max)
{
    qitem *first = ki->lane[l].head, *last = NULL, *p = first;
    size_t n = 0, bytes = 0;
    while (p && n < max) {
        bytes += p->len;
        n++;
        last = p;
        p = p->next;
    }
    if (!last)
        return NULL;
    ki->lane[l].head = last->next;
    if (!ki->lane[l].head)
        ki->lane[l].tail = NULL;
    last->next = NULL;
    ki->lane[l].msgs -= n;
    ki->lane[l].bytes -= bytes;
    return first;
}

#define KN_LANE1_BATCH 32
#define KN_TURN_BUDGET_NS 2000000 /* loop time per turn before yielding to I/O */

static void on_async(uv_async_t *a)
{
    kvr_nats_impl *ki = a->data;
    int64_t t0 = kvr_mono_ns();
    bool more = false;
    for (;;) {
        pthread_mutex_lock(&ki->mu);
        qitem *batch = take(ki, 0, KN_DRAIN_PER_TURN);
        if (!batch)
            batch = take(ki, 1, KN_LANE1_BATCH);
        more = ki->lane[0].head || ki->lane[1].head;
        if (batch)
            pthread_cond_broadcast(&ki->cv);
        pthread_mutex_unlock(&ki->mu);
        if (!batch)
            break;
        while (batch) {
            qitem *nx = batch->next;
            deliver(ki, batch);
            free(batch);
            batch = nx;
        }
        if (!more || ki->close_started || kvr_mono_ns() - t0 > KN_TURN_BUDGET_NS)
            break;
    }
    if (more && !ki->close_started)
        uv_async_send(&ki->async); /* yield to I/O, then continue */
}

static int graveyard_add(kvr_nats_impl *ki, natsSubscription *ns)
{
    if (!ns)
        return 0;
    if (ki->n_graveyard == ki->cap_graveyard) {
        size_t nc = ki->cap_graveyard ? ki->cap_graveyard * 2 : 16;
        natsSubscription **g = realloc(ki->graveyard, nc * sizeof(*g));
        if (!g)
            return KVR_ENOMEM;
        ki->graveyard = g;
        ki->cap_graveyard = nc;
    }
    ki->graveyard[ki->n_graveyard++] = ns;
    return 0;
}

/* ---------- JetStream work items ---------- */

typedef enum { W_ENSURE, W_INFO, W_CREATE, W_DESTROY, W_CHECK } work_op;

typedef struct js_work {
    uv_work_t req;
    kvr_nats_impl *ki;
    work_op op;
    /* in */
    char name[256];
    char subjects[256];
    int64_t max_age_ms, max_bytes;
    bool memory;
    int replicas;
    uint64_t start_seq;
    kvr_nats_sub *sub;            /* W_CREATE: incarnation */
    kvr_nats_consumer *consumer;  /* W_CREATE, W_CHECK */
    natsSubscription *ns;         /* W_DESTROY in; W_CREATE out */
    kvr_nats_stream_cb cb;
    void *data;
    /* out */
    int status;
    kvr_nats_stream_info info;
    char errmsg[256];
} js_work;

static void set_nats_err(js_work *w, natsStatus s, jsErrCode jerr, const char *what)
{
    w->status = status_to_kvr(s);
    const char *last = nats_GetLastError(NULL);
    snprintf(w->errmsg, sizeof(w->errmsg), "%s: %s (jetstream error %d)%s%s", what,
             natsStatus_GetText(s), (int)jerr, last ? ": " : "", last ? last : "");
}

static void fill_info(js_work *w, jsStreamInfo *si)
{
    w->info.first_seq = si->State.FirstSeq;
    w->info.last_seq = si->State.LastSeq;
    w->info.msgs = si->State.Msgs;
    w->info.bytes = si->State.Bytes;
}

static void do_info(js_work *w)
{
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    natsStatus s = js_GetStreamInfo(&si, w->ki->js, w->name, NULL, &jerr);
    if (s == NATS_OK) {
        fill_info(w, si);
        jsStreamInfo_Destroy(si);
        w->status = 0;
    } else {
        set_nats_err(w, s, jerr, "stream info");
    }
}

static void work_run(uv_work_t *req)
{
    js_work *w = req->data;
    kvr_nats_impl *ki = w->ki;
    switch (w->op) {
    case W_INFO:
    case W_CHECK: do_info(w); break;
    case W_ENSURE: {
        do_info(w);
        if (w->status != KVR_ENOTFOUND)
            break;
        jsStreamConfig sc;
        jsStreamConfig_Init(&sc);
        const char *subj[1] = {w->subjects};
        sc.Name = w->name;
        sc.Subjects = subj;
        sc.SubjectsLen = 1;
        sc.Storage = w->memory ? js_MemoryStorage : js_FileStorage;
        sc.MaxAge = w->max_age_ms * 1000000LL;
        if (w->max_bytes > 0)
            sc.MaxBytes = w->max_bytes;
        if (w->replicas > 1)
            sc.Replicas = w->replicas;
        jsStreamInfo *si = NULL;
        jsErrCode jerr = 0;
        natsStatus s = js_AddStream(&si, ki->js, &sc, NULL, &jerr);
        if (s == NATS_OK) {
            fill_info(w, si);
            jsStreamInfo_Destroy(si);
            w->status = 0;
            w->errmsg[0] = 0;
        } else {
            set_nats_err(w, s, jerr, "adding stream");
            do_info(w); /* another router may have created it meanwhile */
        }
        break;
    }
    case W_CREATE: {
        /* A plain ephemeral push consumer, no acks, flow control: we re-create it ourselves
         * (from the last applied sequence + 1) on reconnects, gaps and stalls. Not cnats'
         * Ordered mode: its internal reset thread races with unsubscribe (use-after-free in
         * jsSub_deleteConsumer seen under ASan with cnats 3.4.1). */
        jsSubOptions so;
        jsSubOptions_Init(&so);
        so.Stream = w->name;
        so.Config.AckPolicy = js_AckNone;
        so.Config.FlowControl = true;
        so.Config.Heartbeat = 5000000000LL; /* ns */
        if (w->start_seq > 1) {
            so.Config.DeliverPolicy = js_DeliverByStartSequence;
            so.Config.OptStartSeq = w->start_seq;
        } else {
            so.Config.DeliverPolicy = js_DeliverAll;
        }
        jsErrCode jerr = 0;
        natsSubscription *ns = NULL;
        natsStatus s = js_Subscribe(&ns, ki->js, w->subjects, on_nats_msg, w->sub, NULL, &so, &jerr);
        if (s == NATS_OK) {
            /* our delivery thread blocks for backpressure; let cnats buffer generously */
            natsSubscription_SetPendingLimits(ns, 1 << 20, 512 << 20);
            w->ns = ns;
            w->status = 0;
        } else {
            set_nats_err(w, s, jerr, "creating ordered consumer");
        }
        break;
    }
    case W_DESTROY:
        /* Destroy only: it does not delete the ephemeral consumer (a blocking API request);
         * the server drops it once it has no interest */
        if (w->ns) {
            natsSubscription_Destroy(w->ns);
            w->ns = NULL;
        }
        break;
    }
    /* cnats keeps an error stack per thread; libuv's pool threads never exit */
    nats_ReleaseThreadMemory();
}

static void maybe_start_close(kvr_nats_impl *ki);

static void consumer_check_done(js_work *w);
static void consumer_create_done(js_work *w);

static void work_after(uv_work_t *req, int uvstatus)
{
    js_work *w = req->data;
    kvr_nats_impl *ki = w->ki;
    ki->works--;
    switch (w->op) {
    case W_ENSURE:
    case W_INFO:
        if (w->cb) {
            if (ki->closing)
                w->cb(KVR_ECLOSED, NULL, "closed", w->data);
            else
                w->cb(w->status, w->status == 0 ? &w->info : NULL, w->errmsg, w->data);
        }
        break;
    case W_CREATE: consumer_create_done(w); break;
    case W_CHECK: consumer_check_done(w); break;
    case W_DESTROY: break;
    }
    free(w);
    if (ki->closing)
        maybe_start_close(ki);
}

static int submit(kvr_nats_impl *ki, js_work *w)
{
    w->ki = ki;
    w->req.data = w;
    int rc = uv_queue_work(ki->loop, &w->req, work_run, work_after);
    if (rc != 0)
        return KVR_EIO; /* the caller still owns w */
    ki->works++;
    return 0;
}

static int stream_op(kvr_nats *kn, work_op op, const kvr_nats_stream_cfg *cfg, const char *name,
                     kvr_nats_stream_cb cb, void *data)
{
    kvr_nats_impl *ki = kn->impl;
    if (!ki || ki->closing)
        return KVR_ECLOSED;
    if (!name || !*name || strlen(name) >= 256)
        return KVR_EINVAL;
    js_work *w = calloc(1, sizeof(*w));
    if (!w)
        return KVR_ENOMEM;
    w->op = op;
    snprintf(w->name, sizeof(w->name), "%s", name);
    if (cfg) {
        if (!cfg->subjects || !*cfg->subjects || strlen(cfg->subjects) >= 256) {
            free(w);
            return KVR_EINVAL;
        }
        snprintf(w->subjects, sizeof(w->subjects), "%s", cfg->subjects);
        w->max_age_ms = cfg->max_age_ms;
        w->max_bytes = cfg->max_bytes;
        w->memory = cfg->memory;
        w->replicas = cfg->replicas;
    }
    w->cb = cb;
    w->data = data;
    int rc = submit(ki, w);
    if (rc != 0)
        free(w);
    return rc;
}

int kvr_nats_js_ensure_stream(kvr_nats *kn, const kvr_nats_stream_cfg *cfg,
                              kvr_nats_stream_cb cb, void *data)
{
    if (!cfg)
        return KVR_EINVAL;
    return stream_op(kn, W_ENSURE, cfg, cfg->name, cb, data);
}

int kvr_nats_js_stream_info(kvr_nats *kn, const char *stream, kvr_nats_stream_cb cb, void *data)
{
    return stream_op(kn, W_INFO, NULL, stream, cb, data);
}

/* ---------- ordered consumers ---------- */

static void destroy_incarnation(kvr_nats_impl *ki, kvr_nats_sub *sub)
{
    if (!sub)
        return;
    sub->dead = true;
    if (sub->ns) {
        js_work *w = calloc(1, sizeof(*w));
        if (w) {
            w->op = W_DESTROY;
            w->ns = sub->ns;
            sub->ns = NULL;
            if (submit(ki, w) != 0) {
                graveyard_add(ki, w->ns);
                free(w);
            }
        } else {
            graveyard_add(ki, sub->ns);
            sub->ns = NULL;
        }
    }
}

static void consumer_create(kvr_nats_consumer *c)
{
    kvr_nats_impl *ki = c->ki;
    if (c->creating || c->stopped || ki->closing)
        return;
    kvr_nats_sub *sub = calloc(1, sizeof(*sub));
    js_work *w = calloc(1, sizeof(*w));
    if (!sub || !w) {
        free(sub);
        free(w);
        return;
    }
    sub->ki = ki;
    sub->consumer = c;
    sub->next_all = ki->subs;
    ki->subs = sub;
    w->op = W_CREATE;
    snprintf(w->name, sizeof(w->name), "%s", c->stream);
    snprintf(w->subjects, sizeof(w->subjects), "%s", c->filter);
    w->start_seq = c->last_seq + 1;
    w->sub = sub;
    w->consumer = c;
    if (submit(ki, w) == 0) {
        c->creating = true;
        c->last_cseq = 0;
        /* current from now on: the new consumer may deliver before consumer_create_done runs
         * on the loop, and those messages must not be dropped as coming from a stale one */
        c->current = sub;
    } else {
        sub->dead = true;
        free(w);
    }
}

static void consumer_create_done(js_work *w)
{
    kvr_nats_consumer *c = w->consumer;
    kvr_nats_impl *ki = w->ki;
    c->creating = false;
    if (w->status != 0) {
        w->sub->dead = true;
        if (c->current == w->sub)
            c->current = NULL;
        if (c->create_failures++ % 10 == 0)
            KVR_LOG_WARN("jetstream consumer creation failed, retrying", "stream=%s from_seq=%" PRIu64 " error=\"%s\"",
                         c->stream, w->start_seq, w->errmsg);
        return;
    }
    w->sub->ns = w->ns;
    if (c->stopped || ki->closing || c->current != w->sub) {
        if (ki->closing) {
            graveyard_add(ki, w->ns);
            w->sub->ns = NULL;
            w->sub->dead = true;
        } else {
            destroy_incarnation(ki, w->sub);
        }
        return;
    }
    c->create_failures = 0;
    c->active = true;
    c->current = w->sub;
    c->stalled_ticks = 0;
    KVR_LOG_INFO("jetstream consumer created", "stream=%s filter=%s from_seq=%" PRIu64, c->stream,
                 c->filter, w->start_seq);
}

static void consumer_restart(kvr_nats_consumer *c, const char *why)
{
    kvr_nats_impl *ki = c->ki;
    if (c->stopped || ki->closing)
        return;
    if (!ki->core_up) {
        c->restart_deferred = true;
        return;
    }
    if (c->creating)
        return;
    c->restart_deferred = false;
    KVR_LOG_INFO("re-creating jetstream consumer", "stream=%s reason=%s from_seq=%" PRIu64, c->stream,
                 why, c->last_seq + 1);
    ki->stats.consumer_restarts++;
    destroy_incarnation(ki, c->current);
    c->current = NULL;
    consumer_create(c);
}

static void consumer_check_done(js_work *w)
{
    kvr_nats_consumer *c = w->consumer;
    c->checking = false;
    if (c->stopped || w->ki->closing || w->status != 0)
        return;
    if (w->info.last_seq > c->last_seq && c->last_seq == w->start_seq && c->stalled_ticks >= 2)
        consumer_restart(c, "stalled");
}

static void on_watchdog(uv_timer_t *t)
{
    kvr_nats_impl *ki = t->data;
    if (ki->closing || !ki->core_up)
        return;
    for (kvr_nats_consumer *c = ki->consumers; c; c = c->next) {
        if (c->stopped || c->creating)
            continue;
        if (!c->current) {
            consumer_create(c);
            continue;
        }
        if (c->last_seq != c->tick_seq) {
            c->tick_seq = c->last_seq;
            c->stalled_ticks = 0;
            continue;
        }
        c->stalled_ticks++;
        if (c->stalled_ticks >= 2 && !c->checking) {
            js_work *w = calloc(1, sizeof(*w));
            if (!w)
                continue;
            w->op = W_CHECK;
            snprintf(w->name, sizeof(w->name), "%s", c->stream);
            w->consumer = c;
            w->start_seq = c->last_seq; /* progress marker */
            if (submit(ki, w) == 0)
                c->checking = true;
            else
                free(w);
        }
    }
}

int kvr_nats_js_consume(kvr_nats *kn, const char *stream, const char *filter, uint64_t start_seq,
                        kvr_nats_msg_cb on_msg, void *data, kvr_nats_consumer **out, kvr_err *err)
{
    kvr_nats_impl *ki = kn->impl;
    if (!ki || ki->closing)
        return kvr_err_set(err, KVR_ECLOSED, "nats connection closed");
    if (!stream || !*stream || strlen(stream) >= 256 || !on_msg ||
        (filter && strlen(filter) >= 256))
        return kvr_err_set(err, KVR_EINVAL, "bad consumer arguments");
    kvr_nats_consumer *c = calloc(1, sizeof(*c));
    if (!c)
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    c->stream = strdup(stream);
    c->filter = strdup(filter ? filter : ">");
    if (!c->stream || !c->filter) {
        free(c->stream);
        free(c->filter);
        free(c);
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    }
    c->ki = ki;
    c->cb = on_msg;
    c->data = data;
    c->last_seq = start_seq > 0 ? start_seq - 1 : 0;
    c->tick_seq = c->last_seq;
    c->next = ki->consumers;
    ki->consumers = c;
    consumer_create(c);
    if (out)
        *out = c;
    return 0;
}

uint64_t kvr_nats_consumer_last_seq(const kvr_nats_consumer *c)
{
    return c->last_seq;
}

bool kvr_nats_consumer_active(const kvr_nats_consumer *c)
{
    return c->active;
}

int kvr_nats_consumer_stop(kvr_nats_consumer *c)
{
    if (c->stopped)
        return 0;
    c->stopped = true;
    destroy_incarnation(c->ki, c->current);
    c->current = NULL;
    return 0;
}

/* ---------- core API ---------- */

int kvr_nats_init(kvr_nats *kn, uv_loop_t *loop, const kvr_nats_opts *o, kvr_err *err)
{
    kn->impl = NULL;
    if (!o || !o->url || !*o->url)
        return kvr_err_set(err, KVR_EINVAL, "nats: url is required");
    kvr_nats_impl *ki = calloc(1, sizeof(*ki));
    if (!ki)
        return kvr_err_set(err, KVR_ENOMEM, "nats: out of memory");
    ki->kn = kn;
    ki->loop = loop;
    ki->on_state = o->on_state;
    ki->state_data = o->state_data;
    ki->max_msgs = o->queue_max_msgs ? o->queue_max_msgs : 65536;
    ki->max_bytes = o->queue_max_bytes ? o->queue_max_bytes : (256u << 20);
    pthread_mutex_init(&ki->mu, NULL);
    pthread_cond_init(&ki->cv, NULL);
    int rc = 0;
    char *seed = NULL, *jwt = NULL, nkey_pub[KVR_NKEY_PUB_LEN + 1];
    natsOptions *no = NULL;
    natsStatus s = natsOptions_Create(&no);
    if (s != NATS_OK) {
        rc = kvr_err_set(err, KVR_ENOMEM, "nats: creating options: %s", natsStatus_GetText(s));
        goto fail;
    }
    ki->reconnect_wait_ms = o->reconnect_wait_ms > 0 ? o->reconnect_wait_ms : 100;
    ki->max_reconnect_wait_ms = o->max_reconnect_wait_ms > 0 ? o->max_reconnect_wait_ms : 2000;
    if (ki->max_reconnect_wait_ms < ki->reconnect_wait_ms)
        ki->max_reconnect_wait_ms = ki->reconnect_wait_ms;
#define CHK(call, what)                                                                            \
    do {                                                                                           \
        s = (call);                                                                                \
        if (s != NATS_OK) {                                                                        \
            rc = kvr_err_set(err, KVR_EINVAL, "nats: %s: %s", what, natsStatus_GetText(s));        \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)
    CHK(set_servers(no, o->url), "url");
    /* the loop-native core client tries the URLs in the order given; cnats does the same, so
     * a process's core and JetStream connections sit on the same server, and the operator
     * spreads processes over a cluster by the order of their URLs */
    CHK(natsOptions_SetNoRandomize(no, true), "no randomize");
    if (o->name)
        CHK(natsOptions_SetName(no, o->name), "name");
    if (o->user || o->password)
        CHK(natsOptions_SetUserInfo(no, o->user, o->password), "user info");
    if (o->token)
        CHK(natsOptions_SetToken(no, o->token), "token");
    if (o->nkey_seed_file && o->creds_file) {
        rc = kvr_err_set(err, KVR_EINVAL, "nats: an NKEY seed file or a creds file, not both");
        goto fail;
    }
    /* read once here (startup, off any loop's hot path): the native client signs nonces with
     * the seed; cnats reads the files itself */
    if (o->nkey_seed_file) {
        rc = kvr_nkey_read_file(o->nkey_seed_file, &seed, err);
        if (rc == 0)
            rc = kvr_nkey_public(seed, nkey_pub, err);
        if (rc != 0) {
            kvr_err_wrap(err, rc, "nats nkey %s", o->nkey_seed_file);
            goto fail;
        }
        CHK(natsOptions_SetNKeyFromSeed(no, nkey_pub, o->nkey_seed_file), "nkey");
    }
    if (o->creds_file) {
        char *text = NULL;
        rc = kvr_nkey_read_file(o->creds_file, &text, err);
        if (rc == 0)
            rc = kvr_nkey_parse_creds(text, &jwt, &seed, err);
        if (rc == 0)
            rc = kvr_nkey_public(seed, nkey_pub, err);
        kvr_nkey_wipe(text);
        if (rc != 0) {
            kvr_err_wrap(err, rc, "nats creds %s", o->creds_file);
            goto fail;
        }
        CHK(natsOptions_SetUserCredentialsFromFiles(no, o->creds_file, NULL), "creds");
    }
    if (o->tls || o->tls_ca_file || o->tls_cert_file || o->tls_key_file) {
        CHK(natsOptions_SetSecure(no, true), "tls");
        if (o->tls_ca_file)
            CHK(natsOptions_LoadCATrustedCertificates(no, o->tls_ca_file), "tls ca file");
        if (o->tls_cert_file || o->tls_key_file) {
            if (!o->tls_cert_file || !o->tls_key_file) {
                rc = kvr_err_set(err, KVR_EINVAL, "nats: tls cert and key go together");
                goto fail;
            }
            CHK(natsOptions_LoadCertificatesChain(no, o->tls_cert_file, o->tls_key_file),
                "tls cert/key");
        }
    }
    CHK(natsOptions_SetTimeout(no, o->connect_timeout_ms > 0 ? o->connect_timeout_ms : 2000),
        "timeout");
    CHK(natsOptions_SetMaxReconnect(no, -1), "max reconnect");
    CHK(natsOptions_SetCustomReconnectDelay(no, reconnect_delay, ki), "reconnect delay");
    CHK(natsOptions_SetPingInterval(no, o->ping_interval_ms > 0 ? o->ping_interval_ms : 2000),
        "ping interval");
    CHK(natsOptions_SetMaxPingsOut(no, 3), "max pings out");
    CHK(natsOptions_SetReconnectBufSize(no, 8 << 20), "reconnect buffer");
    /* cnats otherwise leaves small publishes to its flusher thread, which adds ~1 ms to every
     * request/reply hop; routing is latency-bound */
    CHK(natsOptions_SetSendAsap(no, !o->batch_publishes), "send asap");
    CHK(natsOptions_SetDisconnectedCB(no, on_disconnected, ki), "disconnected cb");
    CHK(natsOptions_SetReconnectedCB(no, on_reconnected, ki), "reconnected cb");
    CHK(natsOptions_SetClosedCB(no, on_nats_closed, ki), "closed cb");
    CHK(natsOptions_SetErrorHandler(no, on_nats_error, ki), "error handler");
    CHK(natsOptions_SetRetryOnFailedConnect(no, true, on_connected, ki), "retry connect");
    /* Core connection: every subscription's messages are handed over by cnats' one shared
     * delivery thread instead of one thread per subscription (kvr.route and kvr.route.event
     * then share wake-ups). Measured with kvr-bench route (16 in flight): CPU per route
     * router 51 -> 23 us, client 36 -> 18 us, nats-server 54 -> 23 us; context switches per
     * route in the router 7.1 -> 4.3. */
    CHK(natsOptions_UseGlobalMessageDelivery(no, true), "global message delivery");
#undef CHK

    if (uv_async_init(loop, &ki->async, on_async) != 0) {
        rc = kvr_err_set(err, KVR_EIO, "nats: uv_async_init failed");
        goto fail;
    }
    ki->async.data = ki;
    ki->handles_open++;
    uv_timer_init(loop, &ki->watchdog);
    ki->watchdog.data = ki;
    ki->handles_open++;
    kn->impl = ki;

    if (!o->threaded_core) {
        kvr_nats_core_opts co = {
            .urls = o->url,
            .name = o->name,
            .user = o->user,
            .password = o->password,
            .token = o->token,
            .nkey_seed = seed,
            .jwt = jwt,
            .tls = o->tls,
            .tls_ca_file = o->tls_ca_file,
            .tls_cert_file = o->tls_cert_file,
            .tls_key_file = o->tls_key_file,
            .connect_timeout_ms = o->connect_timeout_ms,
            .reconnect_wait_ms = (int)ki->reconnect_wait_ms,
            .max_reconnect_wait_ms = (int)ki->max_reconnect_wait_ms,
            .ping_interval_ms = o->ping_interval_ms,
            .max_pings_out = 3,
            .cb_data = ki,
            .on_msg = core_on_msg,
            .on_event = core_on_event,
        };
        rc = kvr_nats_core_init(&ki->core, loop, &co, err);
        if (rc != 0)
            goto fail_handles;
        ki->handles_open++; /* until its close callback */
    } else {
        s = natsConnection_Connect(&ki->nc, no);
        if (s == NATS_OK) {
            atomic_store(&ki->connected, true);
            push_state(ki, KVR_NATS_CONNECTED, false);
        } else if (s != NATS_NOT_YET_CONNECTED) {
            char red[512];
            rc = kvr_err_set(err, KVR_EIO, "nats: connecting to %s: %s",
                             kvr_nats_redact_url(o->url, red, sizeof red), natsStatus_GetText(s));
            goto fail_handles;
        }
    }
    /* The JetStream connection: the same options (cnats copied them for the core connection),
     * per-subscription delivery threads (a consumer's backpressure, a blocking enqueue, holds
     * up only its own thread); its state changes only re-create consumers. */
    {
        char jname[256];
        snprintf(jname, sizeof(jname), "%s-js", o->name ? o->name : "kvr");
        if ((s = natsOptions_SetName(no, jname)) != NATS_OK ||
            (s = natsOptions_UseGlobalMessageDelivery(no, false)) != NATS_OK ||
            (s = natsOptions_SetSendAsap(no, true)) != NATS_OK ||
            (s = natsOptions_SetDisconnectedCB(no, on_js_conn_noop, ki)) != NATS_OK ||
            (s = natsOptions_SetReconnectedCB(no, on_js_reconnected, ki)) != NATS_OK ||
            (s = natsOptions_SetClosedCB(no, on_js_closed, ki)) != NATS_OK ||
            (s = natsOptions_SetRetryOnFailedConnect(no, true, on_js_conn_noop, ki)) != NATS_OK) {
            rc = kvr_err_set(err, KVR_EINVAL, "nats: jetstream connection options: %s",
                             natsStatus_GetText(s));
            goto fail_handles;
        }
    }
    s = natsConnection_Connect(&ki->jnc, no);
    if (s != NATS_OK && s != NATS_NOT_YET_CONNECTED) {
        char red[512];
        rc = kvr_err_set(err, KVR_EIO, "nats: connecting to %s: %s",
                         kvr_nats_redact_url(o->url, red, sizeof red), natsStatus_GetText(s));
        goto fail_handles;
    }
    natsOptions_Destroy(no);
    no = NULL;

    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = KN_JS_WAIT_MS;
    s = natsConnection_JetStream(&ki->js, ki->jnc, &jo);
    if (s != NATS_OK) {
        rc = kvr_err_set(err, KVR_EIO, "nats: jetstream context: %s", natsStatus_GetText(s));
        goto fail_handles;
    }

    ki->batch = o->batch_publishes;
    if (ki->batch) {
        pthread_mutex_init(&ki->kick_mu, NULL);
        pthread_cond_init(&ki->kick_cv, NULL);
        if (pthread_create(&ki->kick_th, NULL, kick_main, ki) != 0) {
            rc = kvr_err_set(err, KVR_EIO, "nats: starting the flush thread failed");
            goto fail_handles;
        }
        ki->kick_started = true;
    }

    /* the request inbox */
    natsInbox *inbox = NULL;
    s = natsInbox_Create(&inbox);
    if (s != NATS_OK) {
        rc = kvr_err_set(err, KVR_ENOMEM, "nats: inbox: %s", natsStatus_GetText(s));
        goto fail_handles;
    }
    snprintf(ki->inbox, sizeof(ki->inbox), "%s", (const char *)inbox);
    natsInbox_Destroy(inbox);
    char wild[sizeof(ki->inbox) + 4];
    snprintf(wild, sizeof(wild), "%s.*", ki->inbox);
    kvr_nats_sub *isub = NULL;
    rc = kvr_nats_subscribe(kn, wild, NULL, NULL, NULL, &isub, err);
    if (rc != 0)
        goto fail_handles;
    uv_timer_start(&ki->watchdog, on_watchdog, KN_WATCHDOG_MS, KN_WATCHDOG_MS);
    kvr_nkey_wipe(seed); /* the native client keeps its own copy */
    free(jwt);
    return 0;

fail_handles:
    /* the handles are closed by the caller's loop; simplest: mark and close synchronously */
    kick_stop(ki);
    kn->impl = NULL;
    if (ki->core)
        kvr_nats_core_close(ki->core, NULL, NULL);
    ki->core = NULL;
    if (ki->js)
        jsCtx_Destroy(ki->js);
    ki->js = NULL;
    if (no)
        natsOptions_Destroy(no);
    for (int i = 0; i < 2; i++) {
        natsConnection **pc = i ? &ki->jnc : &ki->nc;
        if (*pc) {
            natsConnection_Close(*pc);
            natsConnection_Destroy(*pc);
            *pc = NULL;
        }
    }
    /* handles must be closed before ki is freed; leak ki to keep the loop's handle list valid */
    uv_close((uv_handle_t *)&ki->async, NULL);
    uv_close((uv_handle_t *)&ki->watchdog, NULL);
    ki->close_started = true;
    ki->closing = true;
    kvr_nkey_wipe(seed);
    free(jwt);
    return rc;
fail:
    kvr_nkey_wipe(seed);
    free(jwt);
    if (no)
        natsOptions_Destroy(no);
    pthread_mutex_destroy(&ki->mu);
    pthread_cond_destroy(&ki->cv);
    free(ki);
    return rc;
}

bool kvr_nats_connected(const kvr_nats *kn)
{
    return kn->impl && atomic_load(&kn->impl->connected);
}

int kvr_nats_subscribe(kvr_nats *kn, const char *subject, const char *queue_group,
                       kvr_nats_msg_cb on_msg, void *data, kvr_nats_sub **out, kvr_err *err)
{
    kvr_nats_impl *ki = kn->impl;
    if (!ki || ki->closing)
        return kvr_err_set(err, KVR_ECLOSED, "nats connection closed");
    bool inbox = on_msg == NULL && ki->inbox_sub == NULL;
    if (!subject || !*subject || strlen(subject) > KN_SUBJECT_MAX || (!on_msg && !inbox))
        return kvr_err_set(err, KVR_EINVAL, "subscribe: bad subject or callback");
    kvr_nats_sub *sub = calloc(1, sizeof(*sub));
    if (!sub)
        return kvr_err_set(err, KVR_ENOMEM, "subscribe: out of memory");
    sub->ki = ki;
    sub->cb = on_msg;
    sub->data = data;
    sub->is_inbox = inbox;
    if (ki->core) {
        int rc = kvr_nats_core_subscribe(ki->core, subject, queue_group, sub, &sub->sid);
        if (rc != 0) {
            free(sub);
            return kvr_err_set(err, rc, "subscribing to %s: %s", subject, kvr_strerror(rc));
        }
    } else {
        natsStatus s;
        if (queue_group && *queue_group)
            s = natsConnection_QueueSubscribe(&sub->ns, ki->nc, subject, queue_group, on_nats_msg, sub);
        else
            s = natsConnection_Subscribe(&sub->ns, ki->nc, subject, on_nats_msg, sub);
        if (s != NATS_OK) {
            free(sub);
            return kvr_err_set(err, status_to_kvr(s), "subscribing to %s: %s", subject,
                               natsStatus_GetText(s));
        }
        natsSubscription_SetPendingLimits(sub->ns, 1 << 20, 512 << 20);
    }
    if (inbox)
        ki->inbox_sub = sub;
    sub->next_all = ki->subs;
    ki->subs = sub;
    if (out)
        *out = sub;
    return 0;
}

int kvr_nats_unsubscribe(kvr_nats_sub *sub)
{
    if (!sub || sub->dead)
        return 0;
    sub->dead = true;
    if (sub->sid && sub->ki->core) {
        kvr_nats_core_unsubscribe(sub->ki->core, sub->sid);
        sub->sid = 0;
    }
    if (sub->ns) {
        natsSubscription_Unsubscribe(sub->ns); /* core subscription: a protocol write only */
        graveyard_add(sub->ki, sub->ns);
        sub->ns = NULL;
    }
    return 0;
}

int kvr_nats_publish(kvr_nats *kn, const char *subject, const void *data, size_t len)
{
    kvr_nats_impl *ki = kn->impl;
    if (!ki || ki->closing)
        return KVR_ECLOSED;
    if (!subject || !*subject || len > INT32_MAX)
        return KVR_EINVAL;
    int rc = pub(ki, subject, NULL, data, len);
    if (rc != 0)
        return rc;
    ki->stats.msgs_out++;
    ki->stats.bytes_out += len;
    return 0;
}

int kvr_nats_respond(kvr_nats *kn, const char *reply, const void *data, size_t len)
{
    if (!reply || !*reply)
        return KVR_EINVAL;
    return kvr_nats_publish(kn, reply, data, len);
}

void kvr_nats_get_stats(const kvr_nats *kn, kvr_nats_stats *out)
{
    kvr_nats_impl *ki = kn->impl;
    memset(out, 0, sizeof(*out));
    if (!ki)
        return;
    *out = ki->stats;
    pthread_mutex_lock(&ki->mu);
    out->backpressure_waits = ki->bp_waits;
    out->queue_len = ki->lane[0].msgs + ki->lane[1].msgs;
    pthread_mutex_unlock(&ki->mu);
}

/* ---------- close ---------- */

static void close_run(uv_work_t *req)
{
    kvr_nats_impl *ki = req->data;
    kick_stop(ki);
    if (ki->jnc)
        natsConnection_Close(ki->jnc);
    if (ki->nc)
        natsConnection_Close(ki->nc);
    pthread_mutex_lock(&ki->mu);
    ki->jnc_closed |= ki->jnc == NULL;
    ki->nc_closed |= ki->nc == NULL; /* the native core connection has no cnats callbacks */
    pthread_mutex_unlock(&ki->mu);
    /* Wait (bounded) for cnats' closed callbacks: its disconnected callbacks are delivered
     * asynchronously and would otherwise touch ki after handle_closed freed it. */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 5;
    pthread_mutex_lock(&ki->mu);
    while (!ki->nc_closed || !ki->jnc_closed) {
        if (pthread_cond_timedwait(&ki->cv, &ki->mu, &until) != 0)
            break;
    }
    bool closed = ki->nc_closed && ki->jnc_closed;
    pthread_mutex_unlock(&ki->mu);
    if (!closed)
        KVR_LOG_WARN("nats: closed callback not delivered", "wait_s=%d", 5);
    for (kvr_nats_sub *s = ki->subs; s; s = s->next_all) {
        if (s->ns) {
            natsSubscription_Destroy(s->ns);
            s->ns = NULL;
        }
    }
    for (size_t i = 0; i < ki->n_graveyard; i++)
        natsSubscription_Destroy(ki->graveyard[i]);
    ki->n_graveyard = 0;
    if (ki->js)
        jsCtx_Destroy(ki->js);
    ki->js = NULL;
    if (ki->nc)
        natsConnection_Destroy(ki->nc);
    ki->nc = NULL;
    if (ki->jnc)
        natsConnection_Destroy(ki->jnc);
    ki->jnc = NULL;
    nats_ReleaseThreadMemory();
}

static void release(kvr_nats_impl *ki)
{
    if (--ki->handles_open > 0)
        return;
    kvr_nats *kn = ki->kn;
    kvr_nats_close_cb cb = ki->close_cb;
    pthread_mutex_lock(&ki->mu);
    for (int l = 0; l < 2; l++) {
        qitem *p = ki->lane[l].head;
        ki->lane[l].head = ki->lane[l].tail = NULL;
        while (p) {
            qitem *nx = p->next;
            free(p);
            p = nx;
        }
    }
    pthread_mutex_unlock(&ki->mu);
    for (kvr_nats_sub *s = ki->subs; s;) {
        kvr_nats_sub *nx = s->next_all;
        free(s);
        s = nx;
    }
    for (kvr_nats_consumer *c = ki->consumers; c;) {
        kvr_nats_consumer *nx = c->next;
        free(c->stream);
        free(c->filter);
        free(c);
        c = nx;
    }
    free(ki->graveyard);
    if (ki->batch) {
        pthread_mutex_destroy(&ki->kick_mu);
        pthread_cond_destroy(&ki->kick_cv);
    }
    pthread_mutex_destroy(&ki->mu);
    pthread_cond_destroy(&ki->cv);
    free(ki);
    kn->impl = NULL;
    if (cb)
        cb(kn);
}

static void handle_closed(uv_handle_t *h)
{
    release(h->data);
}

static void core_closed(void *data)
{
    kvr_nats_impl *ki = data;
    ki->core = NULL;
    release(ki);
}

static void close_after(uv_work_t *req, int status)
{
    kvr_nats_impl *ki = req->data;
    uv_close((uv_handle_t *)&ki->async, handle_closed);
    uv_close((uv_handle_t *)&ki->watchdog, handle_closed);
}

static void maybe_start_close(kvr_nats_impl *ki)
{
    if (ki->close_started || ki->works > 0)
        return;
    ki->close_started = true;
    ki->close_work.data = ki;
    if (uv_queue_work(ki->loop, &ki->close_work, close_run, close_after) != 0) {
        close_run(&ki->close_work);
        close_after(&ki->close_work, 0);
    }
}

int kvr_nats_close(kvr_nats *kn, kvr_nats_close_cb close_cb)
{
    kvr_nats_impl *ki = kn->impl;
    if (!ki || ki->closing)
        return KVR_ECLOSED;
    ki->closing = true;
    ki->close_cb = close_cb;
    uv_timer_stop(&ki->watchdog);
    pthread_mutex_lock(&ki->mu);
    ki->q_closing = true;
    pthread_cond_broadcast(&ki->cv);
    pthread_mutex_unlock(&ki->mu);
    for (size_t b = 0; b < KN_REQ_BUCKETS; b++)
        while (ki->req_buckets[b])
            req_finish(ki->req_buckets[b], KVR_ECLOSED, NULL, 0);
    for (kvr_nats_consumer *c = ki->consumers; c; c = c->next) {
        c->stopped = true;
        if (c->current && c->current->ns) {
            graveyard_add(ki, c->current->ns);
            c->current->ns = NULL;
        }
    }
    if (ki->core) {
        atomic_store(&ki->connected, false);
        kvr_nats_core_close(ki->core, core_closed, ki); /* no core callback after this */
    }
    if (ki->on_state)
        ki->on_state(kn, KVR_NATS_CLOSED, ki->state_data);
    maybe_start_close(ki);
    return 0;
}

void kvr_nats_global_shutdown(int timeout_ms)
{
    nats_CloseAndWait(timeout_ms > 0 ? timeout_ms : 2000);
}

/* ---------- redaction ---------- */

const char *kvr_nats_redact_url(const char *urls, char *out, size_t cap)
{
    if (cap == 0)
        return out;
    size_t o = 0;
    const char *p = urls ? urls : "";
    /* per comma-separated URL: everything between "://" (or the start) and the last '@'
     * before the next comma is a credential */
    while (*p && o + 1 < cap) {
        size_t len = strcspn(p, ",");
        const char *at = NULL;
        for (size_t i = 0; i < len; i++)
            if (p[i] == '@')
                at = p + i;
        const char *sep = NULL;
        for (size_t i = 0; i + 2 < len; i++)
            if (p[i] == ':' && p[i + 1] == '/' && p[i + 2] == '/') {
                sep = p + i + 3;
                break;
            }
        const char *cred = sep && (!at || sep <= at) ? sep : p;
        for (const char *q = p; q < p + len && o + 1 < cap;) {
            if (at && q == cred) {
                const char *mask = "***@";
                for (size_t k = 0; mask[k] && o + 1 < cap; k++)
                    out[o++] = mask[k];
                q = at + 1;
                continue;
            }
            out[o++] = *q++;
        }
        p += len;
        if (*p == ',' && o + 1 < cap)
            out[o++] = *p++;
    }
    out[o] = 0;
    return out;
}
