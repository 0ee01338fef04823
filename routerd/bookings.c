/* routerd bookings: where they live (routerd_int.h). */
#include "routerd_int.h"

/* ------------------------------------------------------------------------------------------ */
/* bookings backend: local FSM or kvr_sync */


#ifdef KVR_ROUTERD_HAVE_SYNC
typedef struct sync_ctx {
    kvr_routerd *rd;
    rd_cmd_cb cb;
    void *data;
} sync_ctx;

static void on_sync_done(kvr_sync *s, int status, const kvr_fsm_result *res, kvr_sync_mode mode,
                         void *data)
{
    sync_ctx *c = data;
    if (c->cb)
        c->cb(c->rd, status, res, kvr_sync_mode_name(mode), c->data);
    free(c);
}
#endif

/* Best-effort mode: tells the other routers what this one just applied. A ROUTE goes out
 * pinned to the worker chosen here, so every router books the same worker for it. Frame:
 * msgpack [router_id, command bytes]. */
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
    kvr_buf cb, b;
    kvr_buf_init(&cb);
    kvr_buf_init(&b);
    if (kvr_cmd_encode(&c, &cb, NULL) == 0 && kvr_mp_write_array(&b, 2) == 0 &&
        kvr_mp_write_uint(&b, rd->cfg.id) == 0 && kvr_mp_write_bin(&b, cb.base, cb.len) == 0)
        kvr_nats_publish(&rd->nats, "kvr.route.bcast", b.base, b.len);
    kvr_buf_free(&cb);
    kvr_buf_free(&b);
}

/* Best-effort mode: another router's booking, prefill_done or free. */
void rd_on_bcast(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, m->data, m->len);
    uint32_t n;
    uint64_t from;
    kvr_slice bin;
    kvr_cmd cmd;
    kvr_route_candidate cand[KVR_FSM_MAX_CANDIDATES];
    if (kvr_mp_read_array(&r, &n) != 0 || n != 2 || kvr_mp_read_uint(&r, &from) != 0 ||
        kvr_mp_read_bin(&r, &bin) != 0 ||
        kvr_cmd_decode(bin.base, bin.len, &cmd, cand, NULL) != 0) {
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


/* Submits cmd; cb (may be NULL) runs once, possibly before this returns (local mode). */
int rd_submit(kvr_routerd *rd, const kvr_cmd *cmd, rd_cmd_cb cb, void *data)
{
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (rd->sync) {
        sync_ctx *c = malloc(sizeof(*c));
        if (!c)
            return KVR_ENOMEM;
        c->rd = rd;
        c->cb = cb;
        c->data = data;
        int rc = kvr_sync_submit(rd->sync, cmd, on_sync_done, c);
        if (rc != 0)
            free(c);
        return rc;
    }
#endif
    kvr_fsm_result res;
    kvr_fsm_set_local_now(rd->fsm, kvr_mono_ms()); /* booking age on one clock (liveness.h) */
    kvr_fsm_apply(rd->fsm, cmd, &res);
    /* without Raft this router's FSM is the one that commits: it publishes the clear */
    if (res.type == KVR_CMD_WORKER_DOWN && res.down_seq != 0)
        rd_queue_clear(rd, res.worker_id, res.down_seq);
    if (rd->cfg.best_effort)
        broadcast(rd, cmd, &res);
    if (cb)
        cb(rd, 0, &res, "local", data);
    return 0;
}

/* Submits a ROUTE (cmd->type KVR_CMD_ROUTE): with Raft through kvr_sync_route, which
 * forwards it to the leader; else as rd_submit. */
int rd_submit_route(kvr_routerd *rd, const kvr_cmd *cmd, rd_cmd_cb cb, void *data)
{
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (rd->sync) {
        sync_ctx *sc = malloc(sizeof(*sc));
        if (!sc)
            return KVR_ENOMEM;
        sc->rd = rd;
        sc->cb = cb;
        sc->data = data;
        int rc = kvr_sync_route(rd->sync, &cmd->u.route, on_sync_done, sc);
        if (rc != 0)
            free(sc);
        return rc;
    }
#endif
    return rd_submit(rd, cmd, cb, data);
}

const kvr_fsm *rd_fsm(kvr_routerd *rd)
{
#ifdef KVR_ROUTERD_HAVE_SYNC
    if (rd->sync)
        return kvr_sync_fsm(rd->sync);
#endif
    return rd->fsm;
}

void rd_log_cmd_failure(kvr_routerd *rd, int status, const kvr_fsm_result *res,
                            const char *mode, void *data)
{
    const char *what = data;
    if (status != 0)
        KVR_LOG_WARN_RL(5, "command failed", "cmd=%s status=\"%s\"", what, kvr_strerror(status));
}

#ifdef KVR_ROUTERD_HAVE_SYNC
/* kvr.routers.quorum: "<router id>" from a router that is in the kvr.route queue group and
 * knows a Raft leader, sent every tick. */
void rd_on_quorum_beacon(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    char buf[16];
    if (m->len == 0 || m->len >= sizeof buf)
        return;
    memcpy(buf, m->data, m->len);
    buf[m->len] = '\0';
    char *end;
    unsigned long id = strtoul(buf, &end, 10);
    if (*end != '\0' || id == 0 || id == rd->cfg.id)
        return;
    rd->peer_quorum_ms = kvr_mono_ms();
}

static void send_quorum_beacon(kvr_routerd *rd, const kvr_sync_state *ss)
{
    if (!rd->ready || rd->groups_left || !rd->sub_route || ss->leader_id == 0 || !rd->nats_up)
        return;
    char buf[16];
    int n = snprintf(buf, sizeof buf, "%u", (unsigned)rd->cfg.id);
    (void)kvr_nats_publish(&rd->nats, "kvr.routers.quorum", buf, (size_t)n);
}

/* A router that has LOST its Raft group's quorum (cut off from the majority, but maybe not
 * from NATS) leaves the routers' queue groups, so route requests and route events go to
 * routers that can commit them: before, a partitioned leader kept taking its share of them
 * into its local copy, the majority held bookings whose FREE it never saw, and those FREEs
 * reached it only at reconcile. It leaves only while both hold:
 *  - kvr_sync says the quorum is lost: a leader was known since start and none has been for
 *    more than 2x the election timeout (monotonic clock). Start-up and ordinary elections do
 *    not count: leaving on plain "degraded" (500 ms without a leader) emptied the queue
 *    group during elections and the frontends got "no responders".
 *  - another router said, after this one lost its quorum and within the last
 *    RD_PEER_QUORUM_TTL_MS, that it has a leader and is in the kvr.route queue group. So
 *    the group never empties on its own account: when every router is without a quorum (all
 *    partitioned from each other, the majority down) nobody hears such a beacon and all keep
 *    answering in local mode.
 * It rejoins as soon as either stops holding (a leader is known again, or the beacons stop).
 * While out it still hears every route event (a plain subscription): they go into its local
 * copy and are re-proposed when the quorum is back. */
void rd_follow_quorum(kvr_routerd *rd)
{
    if (!rd->sync)
        return;
    kvr_sync_state ss;
    kvr_sync_get_state(rd->sync, &ss);
    int64_t now = kvr_mono_ms();
    bool peer = rd_peer_has_quorum(rd, now);
    bool leave = ss.quorum_lost && peer && rd->peer_quorum_ms > ss.quorum_lost_since_ms;
    send_quorum_beacon(rd, &ss);
    if (rd->n_relay > 0 && (ss.leader_id != 0 || !peer))
        rd->n_relay = 0; /* nobody to relay to, or a leader to reconcile with */
    if (leave == rd->groups_left)
        return;
    kvr_err err = {0};
    if (leave) {
        if (kvr_nats_subscribe(&rd->nats, "kvr.route.event", NULL, rd_on_route_event_all, rd,
                               &rd->sub_event_all, &err) != 0) {
            KVR_LOG_WARN_RL(5, "subscribing to kvr.route.event", "error=\"%s\"", err.msg);
            return;
        }
        if (rd->sub_route)
            kvr_nats_unsubscribe(rd->sub_route);
        if (rd->sub_event)
            kvr_nats_unsubscribe(rd->sub_event);
        rd->sub_route = rd->sub_event = NULL;
        rd->groups_left = true;
        rd->groups_left_n++;
        for (uint32_t i = 0; i < rd->n_relay; i++)
            rd_relay_route_event(rd, &rd->relay_q[i]);
        if (rd->n_relay)
            KVR_LOG_INFO("route events answered locally relayed", "n=%u", rd->n_relay);
        rd->n_relay = 0;
        KVR_LOG_WARN("quorum lost, another router has one: left the routers' queue groups",
                     "ready=%d no_leader_ms=%lld", rd->ready,
                     (long long)(now - ss.quorum_lost_since_ms));
        return;
    }
    if (kvr_nats_subscribe(&rd->nats, "kvr.route.event", "kvr-routers", rd_on_route_event, rd,
                           &rd->sub_event, &err) != 0 ||
        (rd->ready && kvr_nats_subscribe(&rd->nats, "kvr.route", "kvr-routers", rd_on_route_nats, rd,
                                         &rd->sub_route, &err) != 0)) {
        KVR_LOG_WARN_RL(5, "rejoining the routers' queue groups", "error=\"%s\"", err.msg);
        if (rd->sub_event)
            kvr_nats_unsubscribe(rd->sub_event);
        rd->sub_event = NULL;
        return;
    }
    if (rd->sub_event_all)
        kvr_nats_unsubscribe(rd->sub_event_all);
    rd->sub_event_all = NULL;
    rd->groups_left = false;
    KVR_LOG_INFO("rejoined the routers' queue groups", "ready=%d leader=%u peer_with_quorum=%d",
                 rd->ready, ss.leader_id, peer);
}
#endif

#ifdef KVR_ROUTERD_HAVE_SYNC
/* kvr_sync's per-hop latencies (sync.h KVR_SYNC_HOP_*: same order as the label values). */
void rd_raft_hop_observe(void *data, int hop, double seconds)
{
    kvr_routerd *rd = data;
    if (rd->m_raft_hop)
        kvr_metric_observe(rd->m_raft_hop, (size_t)hop, seconds);
}
#endif

