/* bookings_local.c: bookings on this router's own FSM (no --peers; bookings.h). The router
 * owns every policy of that state itself: worker liveness through its own tracker
 * (liveness.h), lease and request expiry from its tick (routerd.c), and as the only one that
 * commits, the clears of the workers it declares down (ingest.c). */
#include "bookings.h"
#include "routerd_int.h"

void rd_local_apply(kvr_routerd *rd, const kvr_cmd *cmd, kvr_fsm_result *res)
{
    kvr_fsm_set_local_now(rd->fsm, kvr_mono_ms()); /* booking age on one clock (liveness.h) */
    kvr_fsm_apply(rd->fsm, cmd, res);
    /* without Raft this router's FSM is the one that commits: it publishes the clear */
    if (res->type == KVR_CMD_WORKER_DOWN && res->down_seq != 0)
        rd_queue_clear(rd, res->worker_id, res->down_seq);
}

static int local_submit(kvr_routerd *rd, const kvr_cmd *cmd, rd_cmd_cb cb, void *data)
{
    kvr_fsm_result res;
    rd_local_apply(rd, cmd, &res);
    if (cb)
        cb(rd, 0, &res, RD_DECIDED_LOCAL, data);
    return 0;
}

const kvr_fsm *rd_local_state(kvr_routerd *rd)
{
    return rd->fsm;
}

void rd_local_state_json(kvr_routerd *rd, kvr_jw *w)
{
    kvr_jw_key(w, "role");
    kvr_jw_str(w, "local");
    kvr_jw_key(w, "leader");
    kvr_jw_u64(w, 0);
    kvr_jw_key(w, "term");
    kvr_jw_u64(w, 0);
    kvr_jw_key(w, "commit_index");
    kvr_jw_u64(w, 0);
    kvr_jw_key(w, "applied_index");
    kvr_jw_u64(w, 0);
    kvr_jw_key(w, "fsm_digest");
    char d[24];
    snprintf(d, sizeof(d), "%016" PRIx64, kvr_fsm_digest(rd->fsm));
    kvr_jw_str(w, d);
}

bool rd_local_owns_liveness(kvr_routerd *rd)
{
    (void)rd;
    return true;
}

void rd_local_worker_heard(kvr_routerd *rd, uint64_t id, bool valid)
{
    if (valid)
        kvr_live_heard(&rd->live, id, kvr_mono_ms());
    else
        kvr_live_forget(&rd->live, id);
}

void rd_local_liveness_hold(kvr_routerd *rd)
{
    kvr_live_hold(&rd->live, kvr_mono_ms());
}

void rd_local_frontend_seen(kvr_routerd *rd, uint64_t frontend_id)
{
    kvr_cmd cmd = {.type = KVR_CMD_FRONTEND_SEEN};
    cmd.u.frontend.frontend_id = frontend_id;
    cmd.u.frontend.now_ms = (uint64_t)kvr_now_ms();
    rd->bk->submit(rd, &cmd, NULL, NULL);
}

const rd_bookings_ops rd_bookings_local = {
    .mode = RD_BOOKINGS_LOCAL,
    .name = "local",
    .submit = local_submit,
    .route = local_submit,
    .state = rd_local_state,
    .state_json = rd_local_state_json,
    .owns_liveness = rd_local_owns_liveness,
    .commits_liveness = rd_local_owns_liveness,
    .worker_heard = rd_local_worker_heard,
    .liveness_hold = rd_local_liveness_hold,
    .frontend_seen = rd_local_frontend_seen,
};
