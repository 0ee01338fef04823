/* kvr-epp: gRPC health status, worker heartbeats, NATS state, the lease tick. */
#include "epp_priv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* SERVING 1 / NOT_SERVING 2, or -1 for an unknown service. Ready = NATS (the routers' and
 * the heartbeats' bus) connected and some worker live, so a gateway stops sending picks to an
 * EPP that could only answer 503. --ready-without-workers drops the second condition, for a
 * gateway that must keep calling the picker while a pool is at zero workers. */
int epp_health_status(const char *s)
{
    if (!s[0] || strcmp(s, "liveness") == 0)
        return 1;
    if (strcmp(s, "readiness") == 0 || strcmp(s, "inference-extension") == 0 ||
        strcmp(s, "envoy.service.ext_proc.v3.ExternalProcessor") == 0) {
        if (E.nats_on && !kvr_nats_connected(&E.nats))
            return 2;
        return E.ready_without_workers || fe_pool_live(&E.pool, NULL, kvr_mono_ms()) > 0 ? 1 : 2;
    }
    return -1;
}

void epp_on_heartbeat(const kvr_nats_msg *m, void *data)
{
    (void)data;
    kvr_err err = {0};
    if (fe_pool_heartbeat(&E.pool, m->data, m->len, kvr_mono_ms(), &err)) {
        KVR_LOG_WARN_RL(10, "bad worker heartbeat", "subject=%s err=\"%s\"", m->subject, err.msg);
        return;
    }
    kvr_heartbeat hb;
    char ns[FE_NS_MAX];
    if (kvr_heartbeat_decode(m->data, m->len, &hb) != 0 || hb.ns.len >= sizeof ns)
        return;
    memcpy(ns, hb.ns.base, hb.ns.len);
    ns[hb.ns.len] = 0;
    fe_worker *w = fe_pool_find(&E.pool, ns, hb.id);
    /* a worker of a pool waking from zero is up: its held picks ask now (epp_hold.c) */
    if (w)
        epp_hold_worker_heard(ns, w->model);
    /* a request naming one of its adapters tokenizes as its base model does (as the frontend) */
    if (!hb.n_loras)
        return;
    for (uint32_t i = 0; w && i < hb.n_loras; i++)
        fe_tok_note_lora(hb.loras[i].base, hb.loras[i].len, w->model);
}

void epp_on_nats_state(kvr_nats *kn, kvr_nats_state st, void *data)
{
    (void)kn;
    (void)data;
    KVR_LOG_INFO("nats", "state=%s workers=%zu", kvr_nats_state_name(st), E.pool.n);
    if (st == KVR_NATS_DISCONNECTED)
        fe_pool_set_blind(&E.pool, true, kvr_mono_ms());
    else if (st == KVR_NATS_CONNECTED || st == KVR_NATS_RECONNECTED)
        fe_pool_set_blind(&E.pool, false, kvr_mono_ms());
}

void epp_on_tick(uv_timer_t *t)
{
    (void)t;
    fe_pool_expire(&E.pool, kvr_mono_ms());
    if (E.nats_on && kvr_nats_connected(&E.nats)) {
        /* the lease routers free a dead picker's bookings by (kvr.frontends.<id>) */
        kvr_buf b;
        kvr_buf_init(&b);
        kvr_mp_write_map(&b, 3);
        kvr_mp_write_cstr(&b, "frontend_id");
        kvr_mp_write_uint(&b, E.id);
        kvr_mp_write_cstr(&b, "ts_ms");
        kvr_mp_write_uint(&b, (uint64_t)kvr_now_ms());
        kvr_mp_write_cstr(&b, "active");
        kvr_mp_write_uint(&b, E.open_streams);
        kvr_nats_publish(&E.nats, E.lease_subject, b.base, b.len);
        kvr_buf_free(&b);
    }
}
