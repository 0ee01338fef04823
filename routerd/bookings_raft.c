/* bookings_raft.c: bookings on the replicated FSM through kvr_sync (--peers; bookings.h).
 * Also what only a Raft group has: the quorum beacons and the queue groups a router without
 * quorum leaves (follow_quorum), membership changes, the per-hop latencies. */
#include "beat_msg.h"
#include "bookings.h"
#include "routerd_int.h"
#include "sync.h"

typedef struct sync_ctx {
    kvr_routerd *rd;
    rd_cmd_cb cb;
    void *data;
} sync_ctx;

static void on_sync_done(kvr_sync *s, int status, const kvr_fsm_result *res, kvr_sync_mode mode,
                         void *data)
{
    (void)s;
    sync_ctx *c = data;
    if (c->cb)
        c->cb(c->rd, status, res, mode == KVR_SYNC_RAFT ? RD_DECIDED_RAFT : RD_DECIDED_LOCAL,
              c->data);
    free(c);
}

/* After kvr_sync closed (rd->sync NULL, shutting down) every call falls back on the local FSM,
 * as the router did before the modes had an interface. */
static int raft_submit(kvr_routerd *rd, const kvr_cmd *cmd, rd_cmd_cb cb, void *data)
{
    if (!rd->sync)
        return rd_bookings_local.submit(rd, cmd, cb, data);
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

/* The route policy (DESIGN section 6 "Route policy", fsm.h): the cost's weights are
 * replicated configuration. The leader proposes its own flags as a ROUTE_POLICY whenever the
 * applied policy differs from them (none yet, another leader's, or a stale one committed
 * late), so after an election the new leader's flags rule. A ROUTE leaves its weights out
 * (cmd.h has_cost) once the policy it would be decided by is applied on this router: the
 * ROUTE is then after that policy in the log, so every replica decides it with the same
 * weights, whatever their flags. On the leader that is its own policy (until then its ROUTEs
 * carry its flags, which the policy will say anyway); on a follower it is whatever policy
 * was applied (the group's, not this router's flags). With no policy applied every ROUTE
 * carries its router's weights, as before this command existed. */
static bool route_policy_covers(kvr_routerd *rd)
{
    kvr_cost_params pol;
    if (!kvr_fsm_policy(kvr_sync_fsm(rd->sync), &pol, NULL))
        return false;
    if (!rd->raft_leader)
        return true;
    kvr_fsm_options fo;
    rd_fsm_options(rd, &fo);
    return kvr_cost_params_equal(&pol, &fo.cost);
}

static void on_policy_done(kvr_routerd *rd, int status, const kvr_fsm_result *res, rd_decided how,
                           void *data)
{
    (void)data;
    rd->policy_inflight = false;
    if (status != 0 || !res || res->outcome != KVR_OUT_OK)
        KVR_LOG_WARN_RL(5, "route policy not applied", "status=%d outcome=%s how=%s", status,
                        res ? kvr_outcome_name(res->outcome) : "-", rd_decided_name(how));
}

/* On the leader in office (not degraded): proposes this router's weights when the applied
 * policy differs. One proposal at a time; the tick retries. */
static void route_policy_follow(kvr_routerd *rd)
{
    if (!rd->sync || rd->stopping || rd->policy_inflight || !rd->raft_leader)
        return;
    kvr_sync_state ss;
    kvr_sync_get_state(rd->sync, &ss);
    if (ss.leader_id != rd->cfg.id || ss.degraded)
        return;
    kvr_fsm_options fo;
    rd_fsm_options(rd, &fo);
    kvr_cost_params pol;
    bool has = kvr_fsm_policy(kvr_sync_fsm(rd->sync), &pol, NULL);
    if (has && kvr_cost_params_equal(&pol, &fo.cost))
        return;
    kvr_cmd cmd = {.type = KVR_CMD_ROUTE_POLICY};
    cmd.u.policy.set_by = rd->cfg.id;
    cmd.u.policy.cost = fo.cost;
    sync_ctx *c = malloc(sizeof(*c));
    if (!c)
        return;
    c->rd = rd;
    c->cb = on_policy_done;
    c->data = NULL;
    rd->policy_inflight = true;
    if (kvr_sync_submit(rd->sync, &cmd, on_sync_done, c) != 0) {
        rd->policy_inflight = false;
        free(c);
        return;
    }
    KVR_LOG_INFO("proposing route policy",
                 "replacing=%s overlap_weight=%g load_weight=%g queue_weight=%g "
                 "overflow_weight=%g tie_band=%g temperature=%g",
                 has ? "another" : "none", fo.cost.overlap_weight, fo.cost.load_weight,
                 fo.cost.queue_weight, fo.cost.overflow_weight, fo.cost.tie_band,
                 fo.cost.temperature);
}

/* kvr_sync_route forwards a follower's ROUTE to the leader (sync.h). */
static int raft_route(kvr_routerd *rd, const kvr_cmd *cmd, rd_cmd_cb cb, void *data)
{
    if (!rd->sync)
        return rd_bookings_local.route(rd, cmd, cb, data);
    sync_ctx *sc = malloc(sizeof(*sc));
    if (!sc)
        return KVR_ENOMEM;
    sc->rd = rd;
    sc->cb = cb;
    sc->data = data;
    kvr_route_cmd r = cmd->u.route; /* encoded at submission: a copy may drop the weights */
    if (r.has_cost && route_policy_covers(rd))
        r.has_cost = false;
    int rc = kvr_sync_route(rd->sync, &r, on_sync_done, sc);
    if (rc != 0)
        free(sc);
    return rc;
}

static const kvr_fsm *raft_state(kvr_routerd *rd)
{
    return rd->sync ? kvr_sync_fsm(rd->sync) : rd->fsm;
}

static void raft_state_json(kvr_routerd *rd, kvr_jw *w)
{
    if (!rd->sync) {
        rd_bookings_local.state_json(rd, w);
        return;
    }
    kvr_sync_state ss;
    kvr_sync_get_state(rd->sync, &ss);
    kvr_jw_key(w, "role");
    kvr_jw_str(w, ss.role);
    kvr_jw_key(w, "leader");
    kvr_jw_u64(w, ss.leader_id);
    kvr_jw_key(w, "term");
    kvr_jw_u64(w, ss.term);
    kvr_jw_key(w, "commit_index");
    kvr_jw_u64(w, ss.commit_index);
    kvr_jw_key(w, "applied_index");
    kvr_jw_u64(w, ss.applied_index);
    kvr_jw_key(w, "degraded");
    kvr_jw_bool(w, ss.degraded);
    kvr_jw_key(w, "quorum_lost");
    kvr_jw_bool(w, ss.quorum_lost);
    kvr_jw_key(w, "queue_groups_left");
    kvr_jw_u64(w, rd->groups_left_n);
    kvr_jw_key(w, "in_queue_groups");
    kvr_jw_bool(w, !rd->groups_left);
    kvr_jw_key(w, "leader_subject"); /* answering kvr.route.leader */
    kvr_jw_bool(w, rd->sub_route_leader != NULL);
    kvr_jw_key(w, "leader_event_subject"); /* taking kvr.route.leader.event */
    kvr_jw_bool(w, rd->sub_event_leader != NULL);
    kvr_jw_key(w, "fsm_digest");
    char d[24];
    snprintf(d, sizeof(d), "%016" PRIx64, ss.digest);
    kvr_jw_str(w, d);
    kvr_jw_key(w, "log");
    kvr_jw_str(w, ss.log_memory ? "memory" : "disk");
    kvr_jw_key(w, "vote_restricted");
    kvr_jw_bool(w, ss.vote_restricted);
    kvr_jw_key(w, "votes_withheld");
    kvr_jw_u64(w, ss.votes_withheld);
    kvr_jw_key(w, "log_fenced");
    kvr_jw_bool(w, ss.log_fenced);
}

/* kvr_sync_options.worker_down_cb: on the leader, in the apply of the committed entry. */
static void on_worker_down_committed(void *data, uint64_t worker_id, uint64_t down_seq)
{
    rd_queue_clear(data, worker_id, down_seq);
}

/* kvr_sync's per-hop latencies (sync.h KVR_SYNC_HOP_*: same order as the label values). */
static void raft_hop_observe(void *data, int hop, double seconds)
{
    kvr_routerd *rd = data;
    if (rd->m_raft_hop)
        kvr_metric_observe(rd->m_raft_hop, (size_t)hop, seconds);
}

/* The leader's two subjects, in the queue group kvr-route-leader of their own, so two routers
 * that both think they lead for a moment still take each message once:
 *  - kvr.route.leader: the same requests as kvr.route, sent there first by frontends, kvr-epp
 *    and kvr-bench so that a decision skips the forward to the leader and back, two of the
 *    five process wake-ups a follower's answer costs (kvr-bench raft: client mean 491 µs with
 *    followers answering two thirds, see docs/DESIGN.md 4 for the figures). No responders (no
 *    leader, or one that is not ready) sends the client to kvr.route at once.
 *  - kvr.route.leader.event: route events (prefill done, free), for the same reason: a
 *    follower that takes one from kvr.route.event forwards it (two more wake-ups and a TCP
 *    round trip per event, two events per request). Clients publish with kvr.route.event as
 *    the fallback when nobody listens (kvr_nats_publish_fallback), so an event sent during an
 *    election is not lost.
 * Leaving either drains it: what the server already routed here is still taken, and a deposed
 * leader forwards it like any follower, so a step-down (a planned transfer too) costs no
 * request its client's route timeout and loses no event. */
static void leader_subject_set(kvr_routerd *rd, kvr_nats_sub **sub, const char *subject,
                               kvr_nats_msg_cb on_msg, bool want)
{
    if (want == (*sub != NULL))
        return;
    if (!want) {
        (void)kvr_nats_drain(*sub, NULL, NULL); /* an error unsubscribed it */
        *sub = NULL;
        KVR_LOG_INFO("left the leader subject", "subject=%s leader=%d ready=%d", subject,
                     rd->raft_leader, rd->ready);
        return;
    }
    kvr_err err = {0};
    if (kvr_nats_subscribe(&rd->nats, subject, "kvr-route-leader", on_msg, rd, sub, &err) != 0) {
        *sub = NULL;
        KVR_LOG_WARN_RL(5, "subscribing to the leader subject", "subject=%s error=\"%s\"", subject,
                        err.msg);
        return;
    }
    KVR_LOG_INFO("taking the leader subject", "subject=%s id=%u", subject, rd->cfg.id);
}

void rd_leader_route_update(kvr_routerd *rd)
{
    bool want = rd->raft_leader && rd->ready && !rd->groups_left && !rd->stopping;
    leader_subject_set(rd, &rd->sub_event_leader, KVR_ROUTE_LEADER_EVENT_SUBJECT, rd_on_route_event,
                       want);
    leader_subject_set(rd, &rd->sub_route_leader, KVR_ROUTE_LEADER_SUBJECT, rd_on_route_nats, want);
}

static void on_leader_change(void *data, bool leader)
{
    kvr_routerd *rd = data;
    rd->raft_leader = leader;
    rd_leader_route_update(rd);
    route_policy_follow(rd);
}

static void on_raft_log_fenced(void *data)
{
    rd_restart_in_place(data, "the Raft log is fenced since a failed write (full disk?) and the "
                              "data dir has room again: reloading Raft from its files");
}

static int raft_open(kvr_routerd *rd)
{
    kvr_err err = {0};
    int rc;
    kvr_sync_options so;
    kvr_sync_options_default(&so);
    so.id = rd->cfg.id;
    so.raft_addr = rd->cfg.raft_addr;
    so.peers = rd->cfg.peers;
    so.join = rd->cfg.join;
    char raft_dir[4096];
    snprintf(raft_dir, sizeof(raft_dir), "%s/raft", rd->data_dir);
    so.data_dir = raft_dir;
    so.memory_log = rd->cfg.raft_log_memory;
    rd_fsm_options(rd, &so.fsm); /* --index approx: the ROUTE apply's hooks */
    so.hop_cb = raft_hop_observe;
    so.hop_data = rd;
    so.leader_cb = on_leader_change;
    so.leader_data = rd;
    so.log_fenced_cb = on_raft_log_fenced;
    so.log_fenced_data = rd;
    /* tests only: shorten memlog's post-catch-up hold */
    const char *hold = getenv("KVR_TEST_MEMLOG_HOLD_MS");
    if (hold && *hold)
        so.memory_hold_ms = (uint32_t)strtoul(hold, NULL, 10);
    if (rd->cfg.degraded_after_ms > 0)
        so.degraded_after_ms = (uint32_t)rd->cfg.degraded_after_ms;
    if (rd->cfg.raft_max_inflight > 0)
        so.max_inflight = (uint32_t)rd->cfg.raft_max_inflight;
    if (rd->cfg.raft_snapshot_threshold > 0) {
        so.snapshot_threshold = (uint32_t)rd->cfg.raft_snapshot_threshold;
        so.snapshot_trailing = so.snapshot_threshold / 4 ? so.snapshot_threshold / 4 : 1;
    }
    if (rd->cfg.election_timeout_ms > 0) {
        so.election_timeout_ms = (uint32_t)rd->cfg.election_timeout_ms;
        if (so.heartbeat_timeout_ms * 5 > so.election_timeout_ms)
            so.heartbeat_timeout_ms = so.election_timeout_ms / 5;
    }
    /* Defect 13: both policies reach the leader's housekeeping (sync.h), the only place
     * that proposes lease and request expiry with Raft. */
    if (rd->cfg.frontend_timeout_ms > 0)
        so.lease_ttl_ms = rd->cfg.frontend_timeout_ms > UINT32_MAX - 1
                              ? UINT32_MAX - 1
                              : (uint32_t)rd->cfg.frontend_timeout_ms;
    if (rd->cfg.max_request_age_ms > 0)
        so.max_request_age_ms = rd->cfg.max_request_age_ms > UINT32_MAX - 1
                                    ? UINT32_MAX - 1
                                    : (uint32_t)rd->cfg.max_request_age_ms;
    /* Worker liveness with Raft: the leader alone, same bound as without (liveness.h). */
    so.worker_ttl_ms = rd->cfg.heartbeat_misses > 0 ? (uint32_t)rd->cfg.heartbeat_misses * 1000 : 3000;
    so.worker_down_cb = on_worker_down_committed;
    so.worker_down_data = rd;
    kvr_auth_key key;
    if (rd->cfg.cluster_secret_file) {
        rc = kvr_auth_key_load(&key, rd->cfg.cluster_secret_file, &err);
        if (rc != 0) {
            KVR_LOG_ERROR("starting raft", "error=\"%s\"", err.msg);
            return rc;
        }
        so.auth_key = &key;
    } else {
        KVR_LOG_WARN("raft peers are not authenticated (--insecure-cluster or a single router)",
                     "raft_addr=%s", rd->cfg.raft_addr);
    }
    rc = kvr_sync_init(&rd->sync, rd->loop, &so, &err);
    memset(&key, 0, sizeof key); /* kvr_sync keeps its own copy */
    if (rc == 0)
        rc = kvr_sync_start(rd->sync, &err);
    if (rc != 0) {
        KVR_LOG_ERROR("starting raft", "error=\"%s\"", err.msg);
        return rc;
    }
    KVR_LOG_INFO("raft started", "id=%u raft_addr=%s peers=%s", rd->cfg.id, rd->cfg.raft_addr,
                 rd->cfg.peers);
    return 0;
}

/* kvr.routers.quorum (proto/beat_msg.h): "<router id>" from a router that is in the kvr.route
 * queue group and knows a Raft leader, sent every tick. */
static void on_quorum_beacon(const kvr_nats_msg *m, void *data)
{
    kvr_routerd *rd = data;
    uint64_t id;
    if (kvr_quorum_beacon_decode(m->data, m->len, &id) != 0 || id == rd->cfg.id)
        return;
    rd->peer_quorum_ms = kvr_mono_ms();
}

static void send_quorum_beacon(kvr_routerd *rd, const kvr_sync_state *ss)
{
    if (!rd->ready || rd->groups_left || !rd->sub_route || ss->leader_id == 0 || !rd->nats_up)
        return;
    char buf[KVR_BEACON_MAX];
    int n = kvr_quorum_beacon_encode(buf, sizeof buf, rd->cfg.id);
    if (n > 0)
        (void)kvr_nats_publish(&rd->nats, KVR_QUORUM_SUBJECT, buf, (size_t)n);
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
static void follow_quorum(kvr_routerd *rd, int64_t tick_now)
{
    (void)tick_now;
    if (!rd->sync || rd->handing_over)
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
        rd_leader_route_update(rd);
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
    rd_leader_route_update(rd);
    KVR_LOG_INFO("rejoined the routers' queue groups", "ready=%d leader=%u peer_with_quorum=%d",
                 rd->ready, ss.leader_id, peer);
}

static void raft_tick(kvr_routerd *rd, int64_t now)
{
    route_policy_follow(rd); /* a refused or lost proposal is retried here */
    follow_quorum(rd, now);
}

static int raft_subscribe(kvr_routerd *rd, kvr_err *err)
{
    return kvr_nats_subscribe(&rd->nats, KVR_QUORUM_SUBJECT, NULL, on_quorum_beacon, rd, NULL, err);
}

static void sync_closed(void *data)
{
    kvr_routerd *rd = data;
    rd->sync = NULL;
    rd_closed_one(rd);
}

static bool raft_close(kvr_routerd *rd)
{
    if (!rd->sync)
        return false;
    kvr_sync_close(rd->sync, sync_closed, rd);
    return true;
}

/* Worker liveness with Raft (liveness.h): the leader alone proposes; every router tells its
 * kvr_sync what it hears, and the one in office uses it. */
static bool raft_owns_liveness(kvr_routerd *rd)
{
    return rd->sync ? kvr_sync_owns_liveness(rd->sync) : true;
}

static bool raft_commits_liveness(kvr_routerd *rd)
{
    if (!rd->sync)
        return true;
    kvr_sync_state ss;
    kvr_sync_get_state(rd->sync, &ss);
    return ss.leader_id == rd->cfg.id && !ss.degraded;
}

static void raft_worker_heard(kvr_routerd *rd, uint64_t id, bool valid)
{
    if (!rd->sync)
        rd_bookings_local.worker_heard(rd, id, valid);
    else if (valid)
        kvr_sync_worker_seen(rd->sync, id);
    else
        kvr_sync_worker_forget(rd->sync, id);
}

static void raft_liveness_hold(kvr_routerd *rd)
{
    if (rd->sync)
        kvr_sync_liveness_hold(rd->sync);
    else
        rd_bookings_local.liveness_hold(rd);
}

/* Defect 13: not R routers x F beats per second through Raft; the leader alone proposes, and
 * only when the replicated lease table lacks this frontend. */
static void raft_frontend_seen(kvr_routerd *rd, uint64_t frontend_id)
{
    if (rd->sync)
        kvr_sync_frontend_seen(rd->sync, frontend_id);
    else
        rd_bookings_local.frontend_seen(rd, frontend_id);
}

typedef struct member_ctx {
    rd_member_cb cb;
    void *data;
} member_ctx;

static void on_member_done(kvr_sync *s, int status, void *data)
{
    (void)s;
    member_ctx *c = data;
    c->cb(status, c->data);
    free(c);
}

static int raft_membership(kvr_routerd *rd, rd_member_op op, uint32_t id, const char *addr,
                           rd_member_cb cb, void *data, uint32_t *leader)
{
    if (!rd->sync)
        return KVR_ECLOSED;
    member_ctx *c = malloc(sizeof *c);
    if (!c)
        return KVR_ENOMEM;
    c->cb = cb;
    c->data = data;
    int rc =
        op == RD_MEMBER_ADD       ? kvr_sync_add_node(rd->sync, id, addr, on_member_done, c, leader)
        : op == RD_MEMBER_PROMOTE ? kvr_sync_promote_node(rd->sync, id, on_member_done, c, leader)
        : op == RD_MEMBER_REMOVE  ? kvr_sync_remove_node(rd->sync, id, on_member_done, c, leader)
                                  : kvr_sync_transfer(rd->sync, id, on_member_done, c, leader);
    if (rc != 0)
        free(c);
    return rc;
}

const rd_bookings_ops rd_bookings_raft = {
    .mode = RD_BOOKINGS_RAFT,
    .name = "raft",
    .leader_housekeeping = true,
    .open = raft_open,
    .subscribe = raft_subscribe,
    .submit = raft_submit,
    .route = raft_route,
    .state = raft_state,
    .state_json = raft_state_json,
    .close = raft_close,
    .owns_liveness = raft_owns_liveness,
    .commits_liveness = raft_commits_liveness,
    .worker_heard = raft_worker_heard,
    .liveness_hold = raft_liveness_hold,
    .frontend_seen = raft_frontend_seen,
    .tick = raft_tick,
    .membership = raft_membership,
};
