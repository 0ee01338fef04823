/* js_outbox: see js_outbox.h. */
#define _GNU_SOURCE
#include "js_outbox.h"

#include "kvr_err.h"
#include "kvr_log.h"

#include <stdlib.h>
#include <string.h>

struct js_outbox_entry {
    js_outbox_entry *next;
    size_t len;
    char data[];
};

/* One request in flight: a heap context owned by the request's reply callback, which frees
 * it. A reply that comes after js_outbox_free finds its outbox gone from the live table below
 * and touches nothing else. */
typedef struct req_ctx {
    js_outbox *ob;
    uint64_t epoch;
    int64_t t0;
} req_ctx;

/* Outboxes are few and long-lived (one per DP rank, loop thread only): the live ones are
 * listed here so a late reply never touches a freed one. (An outbox re-initialised at the
 * same address would take such a reply as its own; kvr-bridge never does that.) */
#define MAX_OUTBOXES 64
static js_outbox *live[MAX_OUTBOXES];

static bool alive(js_outbox *ob)
{
    for (int i = 0; i < MAX_OUTBOXES; i++)
        if (live[i] == ob)
            return true;
    return false;
}

static void pump(js_outbox *ob);

static void on_reply(int status, const char *data, size_t len, void *cbdata)
{
    req_ctx *c = cbdata;
    js_outbox *ob = c->ob;
    uint64_t epoch = c->epoch;
    int64_t t0 = c->t0;
    free(c);
    if (!alive(ob))
        return;
    ob->st.inflight--;
    /* PubAck JSON: {"stream":"KVR_EVENTS","seq":12} or {"error":{"code":503,...}}. */
    if (status == 0 && (len == 0 || memmem(data, len, "\"error\"", 7) != NULL))
        status = KVR_EIO;
    if (status == 0) {
        ob->st.acked++;
        if (ob->lat_cap) {
            ob->lat[ob->lat_n % ob->lat_cap] = kvr_mono_ns() - t0;
            ob->lat_n++;
        }
    } else {
        ob->st.failed++;
        if (epoch == ob->epoch) { /* first failure of this epoch: report it once */
            ob->epoch++;
            KVR_LOG_WARN_RL(5, "JetStream publish failed", "subject=%s status=%s reply=\"%.*s\"",
                            ob->subject, kvr_strerror(status), (int)(len > 200 ? 200 : len),
                            data ? data : "");
            js_outbox_drop_queued(ob);
            if (ob->on_loss)
                ob->on_loss(ob, status, ob->data);
        }
    }
    pump(ob);
}

static void pump(js_outbox *ob)
{
    while (!ob->paused && ob->head && ob->st.inflight < ob->max_inflight) {
        js_outbox_entry *e = ob->head;
        req_ctx *c = malloc(sizeof *c);
        if (!c)
            return;
        *c = (req_ctx){.ob = ob, .epoch = ob->epoch, .t0 = kvr_mono_ns()};
        int rc =
            kvr_nats_request(ob->nats, ob->subject, e->data, e->len, ob->timeout_ms, on_reply, c);
        if (rc != 0) { /* disconnected and kvr_nats' buffer full: try again on the next push */
            free(c);
            KVR_LOG_WARN_RL(5, "JetStream request not accepted", "status=%s", kvr_strerror(rc));
            return;
        }
        ob->head = e->next;
        if (!ob->head)
            ob->tail = NULL;
        ob->st.queued--;
        ob->st.queued_bytes -= e->len;
        ob->st.inflight++;
        free(e);
    }
}

int js_outbox_init(js_outbox *ob, kvr_nats *kn, const char *subject, size_t max_inflight,
                   size_t max_bytes, uint32_t timeout_ms, js_outbox_loss_cb on_loss, void *data)
{
    memset(ob, 0, sizeof *ob);
    if (strlen(subject) >= sizeof ob->subject)
        return KVR_EINVAL;
    int slot = -1;
    for (int i = 0; i < MAX_OUTBOXES && slot < 0; i++)
        if (!live[i])
            slot = i;
    if (slot < 0)
        return KVR_ELIMIT;
    live[slot] = ob;
    ob->nats = kn;
    strcpy(ob->subject, subject);
    ob->max_inflight = max_inflight ? max_inflight : 256;
    ob->max_bytes = max_bytes ? max_bytes : (64u << 20);
    ob->timeout_ms = timeout_ms ? timeout_ms : 5000;
    ob->on_loss = on_loss;
    ob->data = data;
    ob->paused = true;
    return 0;
}

int js_outbox_push(js_outbox *ob, const void *data, size_t len)
{
    if (len > ob->max_bytes || ob->st.queued_bytes > ob->max_bytes - len)
        return KVR_ELIMIT;
    js_outbox_entry *e = malloc(sizeof *e + len);
    if (!e)
        return KVR_ENOMEM;
    e->next = NULL;
    e->len = len;
    memcpy(e->data, data, len);
    if (ob->tail)
        ob->tail->next = e;
    else
        ob->head = e;
    ob->tail = e;
    ob->st.queued++;
    ob->st.queued_bytes += len;
    ob->st.pushed++;
    pump(ob);
    return 0;
}

void js_outbox_resume(js_outbox *ob)
{
    ob->paused = false;
    pump(ob);
}

void js_outbox_pause(js_outbox *ob)
{
    ob->paused = true;
}

void js_outbox_drop_queued(js_outbox *ob)
{
    while (ob->head) {
        js_outbox_entry *e = ob->head;
        ob->head = e->next;
        free(e);
        ob->st.dropped++;
    }
    ob->tail = NULL;
    ob->st.queued = 0;
    ob->st.queued_bytes = 0;
}

void js_outbox_get_stats(const js_outbox *ob, js_outbox_stats *out)
{
    *out = ob->st;
}

int js_outbox_track_latency(js_outbox *ob, size_t cap)
{
    int64_t *l = calloc(cap, sizeof *l);
    if (!l)
        return KVR_ENOMEM;
    free(ob->lat);
    ob->lat = l;
    ob->lat_cap = cap;
    ob->lat_n = 0;
    return 0;
}

void js_outbox_free(js_outbox *ob)
{
    js_outbox_drop_queued(ob);
    for (int i = 0; i < MAX_OUTBOXES; i++)
        if (live[i] == ob)
            live[i] = NULL;
    free(ob->lat);
    ob->lat = NULL;
}
