/* kvr-epp: the pick: route-and-reserve over kvr.route (tries, timeouts), local least-loaded
 * fallback, endpoint subsets, the destination list, bookings and route events. */
#define _GNU_SOURCE /* memmem */
#include "epp_priv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* "http://10.0.0.5:8000/x" → "10.0.0.5:8000" (the gateway dials ip:port itself). */
void epp_url_hostport(const char *url, char *out, size_t cap)
{
    const char *p = strstr(url, "://");
    p = p ? p + 3 : url;
    size_t n = strcspn(p, "/?#");
    if (n >= cap)
        n = cap - 1;
    memcpy(out, p, n);
    out[n] = 0;
}

static bool in_subset(const xs *x, const char *hostport)
{
    if (!x->has_subset)
        return true;
    size_t hl = strlen(hostport);
    const char *p = x->subset;
    while (*p) {
        while (*p == ' ' || *p == ',')
            p++;
        size_t n = strcspn(p, ",");
        size_t m = n;
        while (m && p[m - 1] == ' ')
            m--;
        if (m == hl && memcmp(p, hostport, hl) == 0)
            return true;
        p += n;
    }
    return false;
}

static bool worker_ok(const fe_worker *w, const char *ns, const char *model, int64_t now)
{
    if (!E.pool.blind && now - w->last_seen_ms > E.pool.ttl_ms)
        return false;
    if (strcmp(w->role, "prefill") == 0)
        return false;
    if (ns && strcmp(ns, w->ns) != 0)
        return false;
    return !model || strcmp(model, w->model) == 0;
}

/* The least-loaded live worker of (ns, model) in the subset, skipping the n_ex ip:ports in ex. */
fe_worker *epp_local_pick(const xs *x, const char *ns, const char *model, const char **ex,
                          size_t n_ex)
{
    int64_t now = kvr_mono_ms();
    fe_worker *best = NULL;
    for (size_t i = 0; i < E.pool.n; i++) {
        fe_worker *w = &E.pool.w[i];
        if (!worker_ok(w, ns, model, now))
            continue;
        /* a worker announcing another model card than the tokenizer loaded is never chosen */
        if (x->filt.mdc_sum && x->filt.mdc_sum[0] && w->mdc_sum[0] &&
            strcmp(x->filt.mdc_sum, w->mdc_sum) != 0)
            continue;
        char hp[FE_URL_MAX];
        epp_url_hostport(w->url, hp, sizeof hp);
        if (!in_subset(x, hp))
            continue;
        bool skip = false;
        for (size_t j = 0; j < n_ex; j++)
            if (strcmp(ex[j], hp) == 0)
                skip = true;
        if (skip)
            continue;
        if (!best ||
            w->inflight + w->active + w->waiting < best->inflight + best->active + best->waiting)
            best = w;
    }
    return best;
}

void epp_publish_event(xs *x, kvr_route_event_type type)
{
    if (!x->booked || !E.nats_on)
        return;
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_route_event ev = {.type = type};
    memcpy(ev.request_id, x->rid, sizeof ev.request_id);
    /* to the leader first, as the pick went (bookings_raft.c leader_events_update) */
    if (kvr_route_event_encode(&b, &ev) == 0)
        (void)(kvr_route_target_events_to_leader(&E.route_target, kvr_mono_ms())
                   ? kvr_nats_publish_fallback(&E.nats, KVR_ROUTE_LEADER_EVENT_SUBJECT,
                                               KVR_ROUTE_EVENT_SUBJECT, b.base, b.len)
                   : kvr_nats_publish(&E.nats, KVR_ROUTE_EVENT_SUBJECT, b.base, b.len));
    kvr_buf_free(&b);
}

static void worker_inflight(xs *x, int d)
{
    if (!x->url[0])
        return;
    fe_worker *w = fe_pool_find_url(&E.pool, x->url);
    if (w && (d > 0 || w->inflight > 0))
        w->inflight = (uint32_t)((int)w->inflight + d);
}

/* Frees the booking (router and local count). Idempotent. */
void epp_release(xs *x)
{
    if (x->booked)
        epp_publish_event(x, KVR_ROUTE_EVENT_FREE);
    x->booked = false;
    worker_inflight(x, -1);
    x->url[0] = 0;
}

/* dest = pick[,fallback…]: the next least-loaded live workers of the model, in the subset. */
void epp_build_dest(xs *x, const char *model, char *dest, size_t cap)
{
    snprintf(dest, cap, "%s", x->pick);
    char hps[EPP_MAX_FALLBACKS + 1][FE_URL_MAX];
    const char *ex[EPP_MAX_FALLBACKS + 1];
    size_t n_ex = 0;
    ex[n_ex++] = x->pick;
    for (int i = 0; i < E.max_fallbacks; i++) {
        fe_worker *w = epp_local_pick(x, x->ns[0] ? x->ns : NULL, model, ex, n_ex);
        if (!w)
            break;
        char hp[FE_URL_MAX];
        epp_url_hostport(w->url, hp, sizeof hp);
        size_t l = strlen(dest);
        if (l + strlen(hp) + 2 > cap)
            break;
        snprintf(dest + l, cap - l, ",%s", hp);
        snprintf(hps[n_ex], sizeof hps[n_ex], "%s", hp);
        ex[n_ex] = hps[n_ex];
        n_ex++;
    }
}

static void choose_local(xs *x, int fb)
{
    if (fb >= 0)
        kvr_metric_add(E.m_fallback, (size_t)fb, 1);
    fe_worker *w = epp_local_pick(x, x->ns[0] ? x->ns : NULL,
                                  x->pool_model[0] ? x->pool_model : NULL, NULL, 0);
    if (!w) {
        if (x->cold_status == 404)
            epp_immediate(x, 404, ERR_404, "model not served by any live worker");
        else
            epp_immediate(x, 503, ERR_503,
                          x->has_subset ? "no live worker in the endpoint subset"
                                        : "no live worker");
        return;
    }
    snprintf(x->url, sizeof x->url, "%s", w->url);
    epp_url_hostport(w->url, x->pick, sizeof x->pick);
    x->worker_id = w->id;
    worker_inflight(x, +1);
    epp_decided(x);
}

static void send_route(xs *x);

static void on_route_reply(int status, const char *data, size_t len, void *cbdata)
{
    xs *x = cbdata;
    x->route_pending = false;
    E.pending_picks--;
    if (status == 0 && x->t_route_ns)
        kvr_metric_observe(E.m_route, 0, (double)(kvr_mono_ns() - x->t_route_ns) / 1e9);
    if (!x->call || x->state != XS_DECIDING) {
        if (status == 0)
            x->booked = true; /* a router may have booked it: free it */
        epp_xs_maybe_free(x);
        return;
    }
    if (status == KVR_ETIMEDOUT && x->tries < E.route_tries) {
        send_route(x);
        return;
    }
    if (status == KVR_NATS_NO_RESPONDERS &&
        kvr_route_target_no_responders(&E.route_target, x->route_subject, kvr_mono_ms())) {
        x->tries--; /* no leader answers right now: any router, at once, as the same try */
        send_route(x);
        return;
    }
    if (status != 0 && status != KVR_NATS_NO_RESPONDERS)
        x->booked = true; /* a slow router may still book it (fe_route.c says why) */
    if (status != 0) {
        choose_local(x, status == KVR_ETIMEDOUT            ? FB_TIMEOUT
                        : status == KVR_NATS_NO_RESPONDERS ? FB_NO_RESPONDERS
                                                           : FB_NATS_DOWN);
        return;
    }
    kvr_route_reply rep;
    kvr_err err = {0};
    if (kvr_route_reply_decode(data, len, &rep, &err)) {
        x->booked = true;
        choose_local(x, FB_BAD_REPLY);
        return;
    }
    if (!rep.ok && rep.pool_waking) {
        /* the router started waking the pool: the stream waits (epp_hold.c) */
        if (!epp_hold_waking(x, rep.retry_after_ms))
            epp_immediate(x, 503, ERR_503, "too many picks held for waking pools");
        return;
    }
    if (!rep.ok && x->cold_status) { /* no worker anywhere: the answer it would have had */
        choose_local(x, -1);
        return;
    }
    if (!rep.ok || rep.url.len >= sizeof x->url) {
        if (rep.ok)
            x->booked = true;
        choose_local(x, rep.ok ? FB_BAD_REPLY : FB_ROUTER_ERROR);
        return;
    }
    x->booked = true;
    memcpy(x->url, rep.url.base, rep.url.len);
    x->url[rep.url.len] = 0;
    epp_url_hostport(x->url, x->pick, sizeof x->pick);
    x->worker_id = rep.worker_id;
    if (!in_subset(x, x->pick)) {
        /* the routers do not know the gateway's subset: their pick outside it is given back */
        epp_release(x);
        choose_local(x, FB_SUBSET);
        return;
    }
    kvr_metric_inc(E.m_routed);
    worker_inflight(x, +1);
    epp_hold_routed(x);
    epp_decided(x);
}

/* The block size live workers of (ns, model) announce, else --block-size (as the frontend). */
static uint32_t block_size_of(const char *ns, const char *model)
{
    int64_t now = kvr_mono_ms();
    for (size_t i = 0; i < E.pool.n; i++) {
        const fe_worker *w = &E.pool.w[i];
        if (w->block_size && !strcmp(w->ns, ns) && !strcmp(w->model, model) &&
            (E.pool.blind || now - w->last_seen_ms <= E.pool.ttl_ms))
            return w->block_size;
    }
    return E.block_size;
}

static void send_route(xs *x)
{
    const char *model = x->pool_model;
    size_t nt = kvr_tok_count(&x->req.tokens);
    uint32_t bs = block_size_of(x->ns, model);
    size_t nb = bs ? nt / bs : 0;
    uint64_t *hs = nb ? malloc(nb * sizeof *hs) : NULL;
    if (nb && !hs) {
        choose_local(x, FB_ROUTER_ERROR);
        return;
    }
    if (nb)
        nb = kvr_hash_seq_seeded(kvr_tok_ids(&x->req.tokens), nt, bs, false, 0,
                                 kvr_hash_lora_seed(x->lora, strlen(x->lora)), hs, nb);
    kvr_route_req rq = {.frontend_id = E.id,
                        .model = {model, strlen(model)},
                        .lora = {x->lora, strlen(x->lora)},
                        .mdc_sum = {x->filt.mdc_sum, strlen(x->filt.mdc_sum)},
                        .ns = {x->ns, strlen(x->ns)},
                        .tokens = (uint32_t)nt,
                        .seq_hashes = hs,
                        .n_hashes = nb};
    memcpy(rq.request_id, x->rid, sizeof rq.request_id);
    kvr_buf b;
    kvr_buf_init(&b);
    int rc = kvr_route_req_encode(&b, &rq);
    free(hs);
    x->tries++;
    x->t_route_ns = kvr_mono_ns();
    x->route_subject = kvr_route_target_subject(&E.route_target, x->tries, kvr_mono_ms());
    if (!rc)
        rc = kvr_nats_request(&E.nats, x->route_subject, b.base, b.len, (uint32_t)E.route_timeout_ms,
                              on_route_reply, x);
    kvr_buf_free(&b);
    if (rc) {
        choose_local(x, FB_NATS_DOWN);
        return;
    }
    x->route_pending = true;
    E.pending_picks++;
}

void epp_route_again(xs *x)
{
    x->tries = 0;
    send_route(x);
}

/* The request body is complete: parse, tokenize, pick. */
void epp_start_pick(xs *x)
{
    x->state = XS_DECIDING;
    x->t_body_ns = kvr_mono_ns();
    bool is_chat = strstr(x->path, "/chat/") != NULL;
    if (!strstr(x->path, "completions"))
        is_chat = memmem(x->body.base, x->body.len, "\"messages\"", 10) != NULL;
    fe_http_error e;
    memset(&e, 0, sizeof e);
    if (fe_parse_request(x->body.base, x->body.len, is_chat, kvr_tok_byte(), &x->req, &e)) {
        epp_immediate(x, 400, ERR_400, e.message[0] ? e.message : "bad request body");
        return;
    }
    int64_t now = kvr_mono_ms();
    const char *base = fe_pool_lora_base(&E.pool, x->req.model, now);
    if (base && fe_pool_live(&E.pool, x->req.model, now) == 0) {
        snprintf(x->pool_model, sizeof x->pool_model, "%s", base);
        snprintf(x->lora, sizeof x->lora, "%s", x->req.model);
    } else {
        snprintf(x->pool_model, sizeof x->pool_model, "%s", x->req.model);
        x->lora[0] = 0;
    }
    x->filt.lora = x->lora;
    x->filt.mdc_sum = fe_tok_mdc_sum(x->pool_model);
    int rc = fe_pool_pick_ns_f(&E.pool, x->pool_model, now, &x->filt, x->ns);
    if ((rc == KVR_ENOTFOUND || rc == KVR_EAGAIN) && E.nats_on && kvr_nats_connected(&E.nats)) {
        /* No live worker of the model: its pool may be scaled to zero, which only the routers
         * know (as the frontend, fe_handlers.c). They are asked in kvr-epp's namespace (or its
         * prefix's first); one that answers "waking" has the pick held (epp_hold.c), else it
         * gets the answer it would have got at once. */
        x->cold_status = rc == KVR_ENOTFOUND ? 404 : 503;
        snprintf(x->ns, sizeof x->ns, "%s", E.pool.ns);
        rc = 0;
    }
    if (rc == KVR_ENOTFOUND) { /* workers are live, none of this model: the frontend's 404 */
        epp_immediate(x, 404, ERR_404, "model not served by any live worker");
        return;
    }
    if (rc) {
        epp_immediate(x, 503, ERR_503, "no live worker");
        return;
    }
    if (!E.nats_on || !kvr_nats_connected(&E.nats)) {
        choose_local(x, FB_NATS_DOWN);
        return;
    }
    if (E.pending_picks >= E.max_pending_picks) {
        /* shed now rather than queue: the gateway retries elsewhere or returns 429 at once */
        epp_immediate(x, 429, ERR_429, "too many picks in flight");
        return;
    }
    send_route(x);
}
