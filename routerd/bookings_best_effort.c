/* bookings_best_effort.c: --best-effort (no --peers; bookings.h), the scheme kvroute's Raft
 * mode replaces, kept to measure what it avoids: each router books on its own FSM as in local
 * mode and broadcasts every booking (pinned to the worker it chose), PREFILL_DONE and FREE on
 * kvr.route.bcast; it applies the other routers' broadcasts to its own FSM as they arrive.
 * Decisions made before a peer's booking arrives see stale load. */
#include "bcast_wire.h"
#include "bookings.h"
#include "routerd_int.h"

/* Best-effort mode: tells the other routers what this one just applied. A ROUTE goes out
 * pinned to the worker chosen here, so every router books the same worker for it. Payload:
 * sync/bcast_wire.h. */
static void broadcast(kvr_routerd *rd, const kvr_cmd *cmd, const kvr_fsm_result *res)
{
    kvr_cmd c = *cmd;
    if (c.type == KVR_CMD_ROUTE) {
        if (res->outcome != KVR_OUT_OK)
            return;
        c.u.route.pin_worker = res->worker_id;
    } else if (c.type != KVR_CMD_FREE && c.type != KVR_CMD_PREFILL_DONE) {
        return;
    }
    kvr_buf b;
    kvr_buf_init(&b);
    if (kvr_bcast_encode(&b, rd->cfg.id, &c) == 0)
        kvr_nats_publish(&rd->nats, "kvr.route.bcast", b.base, b.len);
    kvr_buf_free(&b);
}

/* Best-effort mode: another router's booking, prefill_done or free. */
static void on_bcast(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    uint64_t from;
    kvr_cmd cmd;
    kvr_route_candidate cand[KVR_FSM_MAX_CANDIDATES];
    if (kvr_bcast_decode(m->data, m->len, &from, &cmd, cand) != 0) {
        kvr_metric_inc(rd->m_bcast_rejected);
        KVR_LOG_WARN_RL(5, "bad booking broadcast", "len=%zu", m->len);
        return;
    }
    if (from == rd->cfg.id)
        return;
    kvr_fsm_result res;
    kvr_fsm_set_local_now(rd->fsm, kvr_mono_ms());
    kvr_fsm_apply(rd->fsm, &cmd, &res);
}


static int best_effort_submit(kvr_routerd *rd, const kvr_cmd *cmd, rd_cmd_cb cb, void *data)
{
    kvr_fsm_result res;
    rd_local_apply(rd, cmd, &res);
    broadcast(rd, cmd, &res);
    if (cb)
        cb(rd, 0, &res, RD_DECIDED_LOCAL, data);
    return 0;
}

static int best_effort_subscribe(kvr_routerd *rd, kvr_err *err)
{
    return kvr_nats_subscribe(&rd->nats, "kvr.route.bcast", NULL, on_bcast, rd, NULL, err);
}

const rd_bookings_ops rd_bookings_best_effort = {
    .mode = RD_BOOKINGS_BEST_EFFORT,
    .name = "best_effort",
    .subscribe = best_effort_subscribe,
    .submit = best_effort_submit,
    .route = best_effort_submit,
    .state = rd_local_state,
    .state_json = rd_local_state_json,
    .owns_liveness = rd_local_owns_liveness,
    .commits_liveness = rd_local_owns_liveness,
    .worker_heard = rd_local_worker_heard,
    .liveness_hold = rd_local_liveness_hold,
    .frontend_seen = rd_local_frontend_seen,
};
