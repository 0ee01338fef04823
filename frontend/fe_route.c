/* kvr-frontend: routing a call: kvr.route (per-try timeout, N tries) and the local choice
 * that stands in when no router answers. */
#include "fe_app.h"

#include "kvr_hash.h"
#include "kvr_log.h"
#include "kvr_mp.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---------- routing ---------- */

void use_local_choice(fe_call *c, int fb_reason)
{
    /* no live worker when it arrived, no router took it: the old 404/503, not a fallback */
    if (c->cold_status && !c->hold && fe_hold_no_worker(c, fb_reason))
        return;
    if (fb_reason >= 0) {
        kvr_metric_add(app.m_fallback, (size_t)fb_reason, 1);
        KVR_LOG_INFO("route fallback", "request=%s reason=%s", c->rid_hex,
                     fallback_labels[fb_reason]);
    }
    fe_worker *w = fe_pool_choose_f(&app.pool, app.mode, c->ns, c->pool_model, kvr_mono_ms(), false,
                                    0, &c->filt);
    if (!w) {
        if (fe_hold_no_worker(c, fb_reason))
            return;
        finish_error(c, 503, "service_unavailable", "no_worker", "no live worker for this model");
        call_maybe_free(c);
        return;
    }
    snprintf(c->url, sizeof c->url, "%s", w->url);
    c->worker_id = w->id;
    c->have_worker = true;
    worker_inflight(c, +1);
    fe_hold_served(c, false);
    start_upstream(c);
}

static void on_route_reply(int status, const char *data, size_t len, void *cbdata)
{
    fe_call *c = cbdata;
    c->route_pending = false;
    fe_hold_reply_seen(c);
    if (status == 0 && c->t_try_ns)
        kvr_metric_observe(app.m_route_rtt, 0, (double)(kvr_mono_ns() - c->t_try_ns) / 1e9);
    if (!c->req || c->client_gone) {
        /* A router may have booked it: free it (routers ignore unknown ids). */
        if (status == 0) {
            c->booked = true;
            release_worker(c);
        }
        call_maybe_free(c);
        return;
    }
    if (status == KVR_ETIMEDOUT && c->tries < app.route_tries) {
        send_route(c);
        return;
    }
    if (status == KVR_NATS_NO_RESPONDERS &&
        kvr_route_target_no_responders(&app.route_target, c->route_subject, kvr_mono_ms())) {
        c->tries--; /* no leader answers right now: any router, at once, as the same try */
        send_route(c);
        return;
    }
    kvr_metric_observe(app.m_route_lat, 0, (double)(kvr_mono_ns() - c->t_route_ns) / 1e9);
    if (status != 0 && status != KVR_NATS_NO_RESPONDERS) {
        /* A try that timed out may still be applied later by a slow router (or be committed
         * by Raft after its leader died): treat the request as possibly booked so that its
         * events, "free" above all, are published. A FREE that arrives first is remembered by
         * the routers' state machine, so the late ROUTE books nothing. */
        c->booked = true;
    }
    if (status != 0) {
        use_local_choice(c, status == KVR_ETIMEDOUT            ? FB_TIMEOUT
                            : status == KVR_NATS_NO_RESPONDERS ? FB_NO_RESPONDERS
                                                               : FB_DISCONNECTED);
        return;
    }
    kvr_route_reply rep;
    kvr_err err = {0};
    if (kvr_route_reply_decode(data, len, &rep, &err)) {
        c->booked = true; /* a router answered something: it may have booked */
        KVR_LOG_WARN_RL(5, "bad route reply", "request=%s err=\"%s\"", c->rid_hex, err.msg);
        use_local_choice(c, FB_BAD_REPLY);
        return;
    }
    if (!rep.ok && rep.pool_waking) { /* scaled to zero, waking: held (fe_hold.c) */
        fe_hold_waking(c, rep.retry_after_ms);
        return;
    }
    if (!rep.ok) {
        if (!c->cold_status) /* a model no router knows is the client's mistake */
            KVR_LOG_WARN_RL(5, "router refused", "request=%s err=\"%.*s\"", c->rid_hex,
                            (int)rep.error.len, rep.error.base);
        use_local_choice(c, FB_ROUTER_ERROR);
        return;
    }
    if (rep.url.len >= sizeof c->url) {
        c->booked = true;
        KVR_LOG_WARN_RL(5, "bad route reply", "request=%s err=\"url too long\"", c->rid_hex);
        use_local_choice(c, FB_BAD_REPLY);
        return;
    }
    kvr_metric_add(app.m_route_mode, kvr_slice_eq_cstr(rep.mode, "local") ? 1 : 0, 1);
    memcpy(c->url, rep.url.base, rep.url.len);
    c->url[rep.url.len] = '\0';
    c->worker_id = rep.worker_id;
    c->have_worker = true;
    c->booked = true;
    fe_disagg_on_route(c, &rep);
    uint32_t pbs = fe_pool_block_size(c->ns, c->pool_model);
    c->have_prediction = pbs > 0;
    c->predicted_tokens = rep.overlap_blocks * pbs;
    c->best_predicted_tokens = rep.best_overlap_blocks * pbs;
    worker_inflight(c, +1);
    fe_hold_served(c, true);
    KVR_LOG_DEBUG("routed", "request=%s worker=%" PRIu64 " overlap=%u router=%u mode=%.*s",
                  c->rid_hex, rep.worker_id, rep.overlap_blocks, rep.router_id, (int)rep.mode.len,
                  rep.mode.base);
    start_upstream(c);
}

void send_route(fe_call *c)
{
    size_t nt = kvr_tok_count(&c->r.tokens);
    uint32_t bs = fe_pool_block_size(c->ns, c->pool_model);
    size_t nb = bs ? nt / bs : 0;
    uint64_t *hs = nb ? malloc(nb * sizeof *hs) : NULL;
    if (nb && !hs) {
        use_local_choice(c, FB_ROUTER_ERROR);
        return;
    }
    /* under an adapter, its blocks are its own: hashed under its seed, as the worker's
     * events are indexed (kvr_hash.h) */
    if (nb)
        nb = kvr_hash_seq_seeded(kvr_tok_ids(&c->r.tokens), nt, bs, false, 0,
                                 kvr_hash_lora_seed(c->lora, strlen(c->lora)), hs, nb);
    kvr_route_req rq = {.frontend_id = app.frontend_id,
                        .model = {c->pool_model, strlen(c->pool_model)},
                        .lora = {c->lora, strlen(c->lora)},
                        .mdc_sum = {c->filt.mdc_sum, strlen(c->filt.mdc_sum)},
                        .ns = {c->ns, strlen(c->ns)},
                        .tokens = (uint32_t)nt,
                        .seq_hashes = hs,
                        .n_hashes = nb};
    memcpy(rq.request_id, c->rid, sizeof rq.request_id);
    kvr_buf b;
    kvr_buf_init(&b);
    int rc = kvr_route_req_encode(&b, &rq);
    free(hs);
    c->tries++;
    c->t_try_ns = kvr_mono_ns();
    c->route_subject = kvr_route_target_subject(&app.route_target, c->tries, kvr_mono_ms());
    kvr_metric_inc(app.m_route_tries);
    if (!rc)
        rc = kvr_nats_request(&app.nats, c->route_subject, b.base, b.len,
                              (uint32_t)app.route_timeout_ms, on_route_reply, c);
    kvr_buf_free(&b);
    if (rc) {
        use_local_choice(c, FB_DISCONNECTED);
        return;
    }
    c->route_pending = true;
}
