/* kvr_nats_js.c: JetStream for kvr_nats (kvr_nats.h): publish with acks (over the core
 * connection), stream management and ordered push consumers on the cnats JetStream connection.
 * Blocking cnats calls run as uv_queue_work items, never on the loop thread; consumer messages
 * reach the loop through kvr_nats_queue.c; a watchdog re-creates a consumer that stalls.
 * Shared state: kvr_nats_int.h. */
#include "kvr_nats_int.h"

#include "kvr_log.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---------- JetStream publish ---------- */

typedef struct js_pub {
    kvr_nats_puback_cb cb;
    void *cbdata;
} js_pub;

int kvr_nats_parse_puback(const char *data, size_t len, uint64_t *seq, bool *duplicate)
{
    /* {"stream":"S","seq":N[,"duplicate":true]} or {"error":{"code":503,...}}: small, flat;
     * a scan of a bounded NUL-terminated copy is enough. */
    char b[1024];
    if (!data || len == 0 || len >= sizeof b)
        return KVR_ECORRUPT;
    memcpy(b, data, len);
    b[len] = 0;
    if (strstr(b, "\"error\""))
        return KVR_EAGAIN;
    const char *p = strstr(b, "\"seq\"");
    if (!p)
        return KVR_ECORRUPT;
    p += 5;
    while (*p == ' ' || *p == ':')
        p++;
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(p, &end, 10);
    if (errno || end == p || v == 0)
        return KVR_ECORRUPT;
    *seq = v;
    *duplicate = strstr(b, "\"duplicate\":true") || strstr(b, "\"duplicate\": true");
    return 0;
}

static void js_pub_reply(int status, const char *data, size_t len, void *cbdata)
{
    js_pub *jp = cbdata;
    uint64_t seq = 0;
    bool dup = false;
    if (status == 0)
        status = kvr_nats_parse_puback(data, len, &seq, &dup);
    kvr_nats_puback_cb cb = jp->cb;
    void *d = jp->cbdata;
    free(jp);
    cb(status, seq, dup, d);
}

int kvr_nats_js_publish(kvr_nats *kn, const char *subject, const char *msg_id, const void *data,
                        size_t len, uint32_t timeout_ms, kvr_nats_puback_cb cb, void *cbdata)
{
    if (!cb || (msg_id && (!*msg_id || strlen(msg_id) > 256 || strpbrk(msg_id, "\r\n"))))
        return KVR_EINVAL;
    js_pub *jp = malloc(sizeof *jp);
    if (!jp)
        return KVR_ENOMEM;
    jp->cb = cb;
    jp->cbdata = cbdata;
    int rc = kn_request_hdr(kn, subject, msg_id, data, len, timeout_ms, js_pub_reply, jp);
    if (rc != 0)
        free(jp);
    return rc;
}

/* ---------- JetStream work items ---------- */

typedef enum { W_ENSURE, W_INFO, W_CREATE, W_RETIRE, W_DESTROY, W_CHECK } work_op;

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
    kvr_nats_sub *sub;           /* W_CREATE: incarnation */
    kvr_nats_consumer *consumer; /* W_CREATE, W_CHECK */
    natsSubscription *ns;        /* W_RETIRE, W_DESTROY in; W_CREATE out */
    natsSubscription **old;      /* W_DESTROY: graveyard entries, owned by the work */
    size_t n_old;
    kvr_nats_stream_cb cb;
    void *data;
    /* out */
    int status;
    kvr_nats_stream_info info;
    char errmsg[256];
} js_work;

static void set_nats_err(js_work *w, natsStatus s, jsErrCode jerr, const char *what)
{
    w->status = kn_status_to_kvr(s);
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
    case W_CHECK:
        do_info(w);
        break;
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
        natsStatus s =
            js_Subscribe(&ns, ki->js, w->subjects, kn_on_nats_msg, w->sub, NULL, &so, &jerr);
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
    case W_RETIRE:
        /* Unsubscribe, not destroy: cnats 3.4.1's read loop can still be handing this
         * subscription a message (after a reconnect the server's recovered consumer delivers
         * at once), and a subscription freed under it crashes the read loop (nats.c #637,
         * fixed in 3.5) or its async error handler (#659). Unsubscribed, it leaves the
         * connection's table but stays allocated; it is destroyed later, from the graveyard,
         * long after the read loop last saw it. Unsubscribe also deletes the ephemeral
         * consumer (a blocking API request: fine on a pool thread). */
        if (w->ns)
            natsSubscription_Unsubscribe(w->ns);
        break;
    case W_DESTROY:
        for (size_t i = 0; i < w->n_old; i++)
            natsSubscription_Destroy(w->old[i]);
        free(w->old);
        w->old = NULL;
        w->n_old = 0;
        break;
    }
    /* cnats keeps an error stack per thread; libuv's pool threads never exit */
    nats_ReleaseThreadMemory();
}

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
    case W_CREATE:
        consumer_create_done(w);
        break;
    case W_CHECK:
        consumer_check_done(w);
        break;
    case W_RETIRE:
        /* owned by the graveyard from now on (destroyed at close, or later in a batch) */
        if (w->ns && kn_graveyard_add(ki, w->ns) != 0)
            KVR_LOG_WARN("nats: retired subscription not kept (out of memory)", "stream=%s",
                         w->name);
        kn_graveyard_trim(ki);
        break;
    case W_DESTROY:
        break;
    }
    free(w);
    if (ki->closing)
        kn_maybe_start_close(ki);
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

int kvr_nats_js_ensure_stream(kvr_nats *kn, const kvr_nats_stream_cfg *cfg, kvr_nats_stream_cb cb,
                              void *data)
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
            w->op = W_RETIRE;
            w->ns = sub->ns;
            sub->ns = NULL;
            if (submit(ki, w) != 0) {
                kn_graveyard_add(ki, w->ns);
                free(w);
            }
        } else {
            kn_graveyard_add(ki, sub->ns);
            sub->ns = NULL;
        }
    }
}

/* Past KN_GRAVEYARD_KEEP retired subscriptions, the oldest half is destroyed on a pool
 * thread: they were unsubscribed many re-creations ago, so the read loop no longer knows them.
 * Bounds the memory a router that reconnects for weeks keeps. */
#ifndef KN_GRAVEYARD_KEEP
#define KN_GRAVEYARD_KEEP 64
#endif
void kn_graveyard_trim(kvr_nats_impl *ki)
{
    if (ki->closing || ki->n_graveyard < KN_GRAVEYARD_KEEP)
        return;
    size_t n = ki->n_graveyard / 2;
    js_work *w = calloc(1, sizeof(*w));
    natsSubscription **old = malloc(n * sizeof(*old));
    if (!w || !old) {
        free(w);
        free(old);
        return;
    }
    memcpy(old, ki->graveyard, n * sizeof(*old));
    w->op = W_DESTROY;
    w->old = old;
    w->n_old = n;
    if (submit(ki, w) != 0) {
        free(old);
        free(w);
        return;
    }
    memmove(ki->graveyard, ki->graveyard + n, (ki->n_graveyard - n) * sizeof(*old));
    ki->n_graveyard -= n;
    KVR_LOG_INFO("nats: destroying retired consumer subscriptions", "count=%zu kept=%zu", n,
                 ki->n_graveyard);
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
        /* current from now on: the new consumer's messages may be queued before
         * consumer_create_done runs on the loop, and they must not be dropped as coming from a
         * stale one */
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
            KVR_LOG_WARN("jetstream consumer creation failed, retrying",
                         "stream=%s from_seq=%" PRIu64 " error=\"%s\"", c->stream, w->start_seq,
                         w->errmsg);
        return;
    }
    w->sub->ns = w->ns;
    if (c->stopped || ki->closing || c->current != w->sub) {
        if (ki->closing) {
            kn_graveyard_add(ki, w->ns);
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

void kn_consumer_restart(kvr_nats_consumer *c, const char *why)
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
    KVR_LOG_INFO("re-creating jetstream consumer", "stream=%s reason=%s from_seq=%" PRIu64,
                 c->stream, why, c->last_seq + 1);
    ki->stats.consumer_restarts++;
    destroy_incarnation(ki, c->current);
    c->current = NULL;
    consumer_create(c);
}

/* A consumer incarnation's message, taken off the queue. */
void kn_consumer_deliver(kvr_nats_impl *ki, kvr_nats_sub *sub, const kvr_nats_msg *m, uint64_t cseq)
{
    kvr_nats_consumer *c = sub->consumer;
    if (sub->dead || ki->closing || !c)
        return;
    if (c->stopped || c->current != sub || c->restart_deferred)
        return; /* a deferred re-creation starts again after the last applied sequence */
    /* a push consumer numbers its deliveries 1, 2, 3...: a jump means cnats dropped messages
     * (slow consumer) or the server lost some; start again after the last one applied rather
     * than apply past a hole */
    if (cseq != c->last_cseq + 1) {
        kn_consumer_restart(c, "delivery gap");
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
}

/* The JetStream connection is back: its push consumers' subscriptions did not survive. */
void kn_js_reconnected(kvr_nats_impl *ki)
{
    for (kvr_nats_consumer *c = ki->consumers; c; c = c->next)
        if (!c->stopped && c->active)
            kn_consumer_restart(c, "reconnected");
}

/* The core connection is (back) up: re-creations that waited for it go ahead. */
void kn_consumers_core_up(kvr_nats_impl *ki)
{
    for (kvr_nats_consumer *c = ki->consumers; c; c = c->next)
        if (c->restart_deferred)
            kn_consumer_restart(c, "reconnected");
}

static void consumer_check_done(js_work *w)
{
    kvr_nats_consumer *c = w->consumer;
    c->checking = false;
    if (c->stopped || w->ki->closing || w->status != 0)
        return;
    if (w->info.last_seq > c->last_seq && c->last_seq == w->start_seq && c->stalled_ticks >= 2)
        kn_consumer_restart(c, "stalled");
}

void kn_on_watchdog(uv_timer_t *t)
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
