/* kvr-epp: picks held while a router wakes their pool from zero (DESIGN 13, scale-to-zero).
 *
 * A router answers a pick for a pool scaled to zero with {"ok":false,"pool_state":"waking",
 * "retry_after_ms":N} once it has started the wake. The gateway's stream then waits: kvr-epp
 * sends no HeadersResponse until a router answers ok (Envoy holds the client's request, as it
 * does while any pick is out), or until --wake-timeout from the first "waking", when the pick
 * gets 503 ("model is starting"). Per pool (namespace, model) the held picks wait in a FIFO;
 * only one of them at a time asks again (the pool's probe), when the router's retry_after_ms
 * (bounded 100 ms..2 s) has passed or at once when a heartbeat of a live worker of the pool
 * arrives, so 1,000 held picks cost one kvr.route per interval. When any pick of the pool is
 * routed ok, every held pick of the pool asks again at once; one answered "waking" again goes
 * back to the queue with its first deadline. At most --max-held picks are held in all; past
 * that a waking answer gets 503 at once. A held pick's body is already bounded by --max-body.
 *
 * The frontend does the same for HTTP clients (frontend/fe_hold.c), on its own call type.
 * Loop thread only. */
#include "epp_priv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HOLD_MAX_POOLS 1024
#define HOLD_TICK_MS 50
#define HOLD_RETRY_MIN_MS 100
#define HOLD_RETRY_MAX_MS 2000

typedef struct hold_pool {
    struct hold_pool *next;
    char ns[FE_NS_MAX];
    char model[FE_MODEL_MAX];
    xs *head, *tail; /* queued picks, oldest first (not the probe) */
    xs *probe;       /* the pick asking a router again for the pool */
    int64_t next_probe_ms;
    uint32_t retry_ms;
} hold_pool;

static struct {
    hold_pool *pools;
    size_t n_pools, n_held;
    uv_timer_t timer;
    bool timer_init, timer_on;
    size_t max_held;
    int64_t wake_timeout_ms;
    kvr_metric *m_held, *m_result;
} H = {.max_held = 1024, .wake_timeout_ms = 60000};

enum { HR_SERVED, HR_TIMEOUT, HR_FULL, HR_GONE, HR_FAILED };
static const char *const result_labels[] = {"served",      "timeout", "rejected_full",
                                            "client_gone", "failed",  NULL};

void epp_hold_configure(size_t max_held, int64_t wake_timeout_ms)
{
    H.max_held = max_held;
    H.wake_timeout_ms = wake_timeout_ms;
}

int epp_hold_metrics(kvr_metrics *m)
{
    H.m_held =
        kvr_metrics_gauge(m, "kvr_epp_held_picks",
                          "picks held while a router wakes their pool from zero", NULL, NULL);
    H.m_result = kvr_metrics_counter(m, "kvr_epp_held_total", "held picks by how the hold ended",
                                     "result", result_labels);
    return H.m_held && H.m_result ? 0 : KVR_ENOMEM;
}

static hold_pool *pool_of(const char *ns, const char *model, bool create)
{
    for (hold_pool *p = H.pools; p; p = p->next)
        if (!strcmp(p->ns, ns) && !strcmp(p->model, model))
            return p;
    if (!create || H.n_pools >= HOLD_MAX_POOLS)
        return NULL;
    hold_pool *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    snprintf(p->ns, sizeof p->ns, "%s", ns);
    snprintf(p->model, sizeof p->model, "%s", model);
    p->next = H.pools;
    H.pools = p;
    H.n_pools++;
    return p;
}

static void queue_push(hold_pool *p, xs *x)
{
    x->hold_next = NULL;
    x->hold_prev = p->tail;
    if (p->tail)
        p->tail->hold_next = x;
    else
        p->head = x;
    p->tail = x;
}

static void queue_remove(hold_pool *p, xs *x)
{
    if (x->hold_prev)
        x->hold_prev->hold_next = x->hold_next;
    else if (p->head == x)
        p->head = x->hold_next;
    if (x->hold_next)
        x->hold_next->hold_prev = x->hold_prev;
    else if (p->tail == x)
        p->tail = x->hold_prev;
    x->hold_next = x->hold_prev = NULL;
}

/* x leaves the hold (whatever the reason); result < 0: not counted */
static void leave(xs *x, int result)
{
    hold_pool *p = x->hold_pool;
    if (!p)
        return;
    if (p->probe == x)
        p->probe = NULL;
    else
        queue_remove(p, x);
    x->hold_pool = NULL;
    H.n_held--;
    kvr_metric_set(H.m_held, 0, (double)H.n_held);
    if (result >= 0)
        kvr_metric_add(H.m_result, (size_t)result, 1);
}

static void on_timer(uv_timer_t *t);

static void timer_arm(void)
{
    if (!H.timer_init) {
        uv_timer_init(E.loop, &H.timer);
        H.timer_init = true;
    }
    if (!H.timer_on && H.n_held) {
        uv_timer_start(&H.timer, on_timer, HOLD_TICK_MS, HOLD_TICK_MS);
        H.timer_on = true;
    }
}

bool epp_hold_waking(xs *x, uint32_t retry_after_ms)
{
    int64_t now = kvr_mono_ms();
    uint32_t retry = retry_after_ms < HOLD_RETRY_MIN_MS   ? HOLD_RETRY_MIN_MS
                     : retry_after_ms > HOLD_RETRY_MAX_MS ? HOLD_RETRY_MAX_MS
                                                          : retry_after_ms;
    hold_pool *p = x->hold_pool;
    if (p) { /* the probe, or a released pick, answered "waking" again: back in the queue */
        if (p->probe == x) {
            p->probe = NULL;
            p->next_probe_ms = now + retry;
            p->retry_ms = retry;
        }
        queue_push(p, x);
        return true;
    }
    if (H.n_held >= H.max_held || !(p = pool_of(x->ns, x->pool_model, true))) {
        kvr_metric_add(H.m_result, HR_FULL, 1);
        return false;
    }
    x->hold_pool = p;
    x->hold_deadline_ms = now + H.wake_timeout_ms;
    H.n_held++;
    kvr_metric_set(H.m_held, 0, (double)H.n_held);
    queue_push(p, x);
    if (!p->probe && !p->head->hold_next) /* the pool's first: wait the router's interval */
        p->next_probe_ms = now + retry;
    p->retry_ms = retry;
    KVR_LOG_DEBUG("pick held: pool waking", "request=%s model=%s retry_ms=%u", x->rid_hex,
                  x->pool_model, retry);
    timer_arm();
    return true;
}

void epp_hold_routed(xs *x)
{
    hold_pool *p = x->hold_pool;
    if (!p)
        return;
    leave(x, HR_SERVED);
    if (!p->head)
        return;
    /* the pool is up: every queued pick asks again now (each is held again if it hears
     * "waking") */
    KVR_LOG_INFO("pool woke: held picks ask again", "namespace=%s model=%s", p->ns, p->model);
    xs *q = p->head;
    p->head = p->tail = NULL;
    while (q) {
        xs *next = q->hold_next;
        q->hold_next = q->hold_prev = NULL;
        /* not in the queue while its request is out; still held (hold_pool set) */
        epp_route_again(q);
        q = next;
    }
}

void epp_hold_end(xs *x, bool served)
{
    leave(x, served ? HR_SERVED : HR_FAILED);
}

void epp_hold_client_gone(xs *x)
{
    leave(x, HR_GONE);
}

/* The probe or a released pick is out: not in the queue. A pick whose request is out is found
 * neither in the queue nor as the probe, so a heartbeat or the timer never sends it twice. */
static void probe(hold_pool *p, int64_t now)
{
    xs *x = p->head;
    if (!x || p->probe)
        return;
    queue_remove(p, x);
    p->probe = x;
    p->next_probe_ms = now + p->retry_ms;
    epp_route_again(x);
}

void epp_hold_worker_heard(const char *ns, const char *model)
{
    hold_pool *p = pool_of(ns, model, false);
    if (p && p->head && !p->probe)
        probe(p, kvr_mono_ms());
}

static void on_timer(uv_timer_t *t)
{
    (void)t;
    int64_t now = kvr_mono_ms();
    for (hold_pool *p = H.pools; p; p = p->next) {
        /* deadlines: the oldest first; a pick whose request is out ends on its reply */
        for (xs *x = p->head; x;) {
            xs *next = x->hold_next;
            if (now >= x->hold_deadline_ms) {
                leave(x, HR_TIMEOUT);
                char msg[FE_MODEL_MAX + 64];
                snprintf(msg, sizeof msg, "model %s is starting; try again", x->pool_model);
                epp_immediate(x, 503, ERR_503, msg);
                epp_xs_maybe_free(x);
            }
            x = next;
        }
        if (p->head && !p->probe && now >= p->next_probe_ms)
            probe(p, now);
    }
    if (!H.n_held && H.timer_on) {
        uv_timer_stop(&H.timer);
        H.timer_on = false;
    }
}
