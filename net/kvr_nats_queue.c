/* kvr_nats_queue.c: the cnats side of kvr_nats (kvr_nats.h), which is only the JetStream
 * connection, and its hand-over to the loop: a consumer's delivery thread pushes each message
 * into one bounded FIFO and wakes the loop with one uv_async_t; the loop drains it on a time
 * budget per turn. Also the JetStream connection's cnats callbacks and the helpers the cnats
 * options need. Shared state: kvr_nats_int.h. */
#include "kvr_nats_int.h"

#include "kvr_log.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const char *kvr_nats_state_name(kvr_nats_state s)
{
    switch (s) {
    case KVR_NATS_CONNECTED:
        return "connected";
    case KVR_NATS_DISCONNECTED:
        return "disconnected";
    case KVR_NATS_RECONNECTED:
        return "reconnected";
    case KVR_NATS_CLOSED:
        return "closed";
    }
    return "unknown";
}

int kn_status_to_kvr(natsStatus s)
{
    switch (s) {
    case NATS_OK:
        return 0;
    case NATS_TIMEOUT:
        return KVR_ETIMEDOUT;
    case NATS_NO_RESPONDERS:
        return KVR_NATS_NO_RESPONDERS;
    case NATS_NOT_FOUND:
        return KVR_ENOTFOUND;
    case NATS_INVALID_ARG:
    case NATS_INVALID_SUBJECT:
        return KVR_EINVAL;
    case NATS_NO_MEMORY:
        return KVR_ENOMEM;
    case NATS_CONNECTION_CLOSED:
        return KVR_ECLOSED;
    case NATS_INSUFFICIENT_BUFFER:
    case NATS_NOT_YET_CONNECTED:
    case NATS_CONNECTION_DISCONNECTED:
    case NATS_STALE_CONNECTION:
        return KVR_EAGAIN;
    default:
        return KVR_EIO;
    }
}

/* ---------- queue (producers: cnats threads; consumer: loop) ---------- */

/* bounded: a message; wait while the queue is full. A reconnect notice is never held back. */
static void enqueue(kvr_nats_impl *ki, qitem *it, bool bounded)
{
    pthread_mutex_lock(&ki->mu);
    if (bounded) {
        bool waited = false;
        while (!ki->q_closing && (ki->q_msgs >= ki->max_msgs || ki->q_bytes >= ki->max_bytes)) {
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
    if (ki->q_tail)
        ki->q_tail->next = it;
    else
        ki->q_head = it;
    ki->q_tail = it;
    ki->q_msgs++;
    ki->q_bytes += it->len;
    pthread_mutex_unlock(&ki->mu);
    uv_async_send(&ki->async);
}

/* A JetStream consumer's cnats delivery thread (one per consumer incarnation: a full queue
 * holds up only that consumer). */
void kn_on_nats_msg(natsConnection *nc, natsSubscription *ns, natsMsg *m, void *closure)
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
    jsMsgMetaData *md = NULL;
    if (natsMsg_GetMetaData(&md, m) != NATS_OK || !md) {
        /* not a stream message (should not happen on a push consumer's subscription) */
        natsMsg_Destroy(m);
        return;
    }
    qitem *it = malloc(sizeof(*it) + sl + 1 + rl + 1 + (size_t)len);
    if (!it) {
        KVR_LOG_ERROR_RL(5, "nats message dropped: out of memory", "subject=%s", subj ? subj : "");
        jsMsgMetaData_Destroy(md);
        natsMsg_Destroy(m);
        return;
    }
    memset(it, 0, sizeof(*it));
    it->kind = QI_MSG;
    it->sub = sub;
    it->seq = md->Sequence.Stream;
    it->cseq = md->Sequence.Consumer;
    it->pending = md->NumPending;
    jsMsgMetaData_Destroy(md);
    it->subject = it->buf;
    memcpy(it->subject, subj ? subj : "", sl + 1);
    if (reply && rl) {
        it->reply = it->buf + sl + 1;
        memcpy(it->reply, reply, rl + 1);
    }
    it->len = (size_t)len;
    if (len)
        memcpy(it->buf + sl + 1 + rl + 1, data, (size_t)len);
    natsMsg_Destroy(m);
    enqueue(ki, it, true);
}

/* cnats async-callback thread. The JetStream connection's state changes only re-create
 * consumers (after a reconnect); the user's state callback follows the core connection. */
void kn_on_js_reconnected(natsConnection *nc, void *closure)
{
    qitem *it = calloc(1, sizeof(*it));
    if (!it)
        return; /* the watchdog re-creates a consumer that stalls */
    it->kind = QI_JS_RECONNECTED;
    enqueue(closure, it, false);
}

void kn_on_js_conn_noop(natsConnection *nc, void *closure) {}

/* cnats async-callback thread. cnats delivers a connection's callbacks in order on one thread
 * and "closed" is the last: once it has run, no reconnected callback can still be on its way
 * to ki, so close may free it. */
void kn_on_js_closed(natsConnection *nc, void *closure)
{
    kvr_nats_impl *ki = closure;
    pthread_mutex_lock(&ki->mu);
    ki->jnc_closed = true;
    pthread_cond_broadcast(&ki->cv);
    pthread_mutex_unlock(&ki->mu);
}

void kn_on_nats_error(natsConnection *nc, natsSubscription *sub, natsStatus err, void *closure)
{
    KVR_LOG_WARN_RL(5, "nats async error", "error=\"%s\"", natsStatus_GetText(err));
}

int64_t kn_reconnect_delay(natsConnection *nc, int attempts, void *closure)
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
natsStatus kn_set_servers(natsOptions *no, const char *urls)
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

/* ---------- loop side ---------- */

static void deliver(kvr_nats_impl *ki, qitem *it)
{
    if (it->kind == QI_JS_RECONNECTED) {
        kn_js_reconnected(ki);
        return;
    }
    const char *data = it->buf + strlen(it->subject) + 1 + (it->reply ? strlen(it->reply) : 0) + 1;
    kvr_nats_msg m = {it->subject, it->reply, data, it->len, it->seq, it->pending};
    kn_consumer_deliver(ki, it->sub, &m, it->cseq);
}

/* Under ki->mu: detaches up to max items from the head of the queue. */
static qitem *take(kvr_nats_impl *ki, size_t max)
{
    qitem *first = ki->q_head, *last = NULL, *p = first;
    size_t n = 0, bytes = 0;
    while (p && n < max) {
        bytes += p->len;
        n++;
        last = p;
        p = p->next;
    }
    if (!last)
        return NULL;
    ki->q_head = last->next;
    if (!ki->q_head)
        ki->q_tail = NULL;
    last->next = NULL;
    ki->q_msgs -= n;
    ki->q_bytes -= bytes;
    return first;
}

#define KN_BATCH 32
/* Loop time per turn before yielding to I/O: a backlog of events (a replay after a restart)
 * must not hold up route requests, which the core client reads on this loop. */
#define KN_TURN_BUDGET_NS 2000000

void kn_on_async(uv_async_t *a)
{
    kvr_nats_impl *ki = a->data;
    int64_t t0 = kvr_mono_ns();
    bool more = false;
    for (;;) {
        pthread_mutex_lock(&ki->mu);
        qitem *batch = take(ki, KN_BATCH);
        more = ki->q_head != NULL;
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

/* After the last handle closed: nothing produces any more. */
void kn_queue_free(kvr_nats_impl *ki)
{
    pthread_mutex_lock(&ki->mu);
    qitem *p = ki->q_head;
    ki->q_head = ki->q_tail = NULL;
    ki->q_msgs = ki->q_bytes = 0;
    pthread_mutex_unlock(&ki->mu);
    while (p) {
        qitem *nx = p->next;
        free(p);
        p = nx;
    }
}

int kn_graveyard_add(kvr_nats_impl *ki, natsSubscription *ns)
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
