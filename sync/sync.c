#include "sync_int.h"

#include "kvr_log.h"

#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------------------- */
/* Options and the list of pending commands */

void kvr_sync_options_default(kvr_sync_options *o)
{
    memset(o, 0, sizeof *o);
    o->degraded_after_ms = 500;
    o->forward_timeout_ms = 1000;
    o->max_wait_ms = 5000;
    o->election_timeout_ms = 1000;
    o->heartbeat_timeout_ms = 100;
    o->snapshot_threshold = 8192;
    o->snapshot_trailing = 2048;
    o->max_batch = 512;
    o->max_inflight = 1;
    o->housekeeping_ms = 1000;
    o->lease_ttl_ms = 10000;
    o->max_request_age_ms = 600000;
    o->port_wait_ms = 10000;
    o->coalesce_us = 1000;
    o->fsm.cost = kvr_cost_params_default();
}

const char *kvr_sync_mode_name(kvr_sync_mode m)
{
    return m == KVR_SYNC_LOCAL ? "local" : "raft";
}

void sync_plist_add(kvr_sync *s, pending *p)
{
    p->next = &s->head;
    p->prev = s->head.prev;
    s->head.prev->next = p;
    s->head.prev = p;
    s->n_pending++;
}

static void plist_del(kvr_sync *s, pending *p)
{
    p->prev->next = p->next;
    p->next->prev = p->prev;
    p->prev = p->next = NULL;
    s->n_pending--;
}

void sync_fwd_slot_clear(kvr_sync *s, pending *p)
{
    if (p->state == P_FWD && s->fwd_slots[p->rpc_id & (FWD_SLOTS - 1)] == p)
        s->fwd_slots[p->rpc_id & (FWD_SLOTS - 1)] = NULL;
    p->via = NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* Completion */

void sync_hop(kvr_sync *s, int h, int64_t from_ns, int64_t now_ns)
{
    if (s->o.hop_cb && from_ns > 0 && now_ns >= from_ns)
        s->o.hop_cb(s->o.hop_data, h, (double)(now_ns - from_ns) / 1e9);
}

/* Finished pendings are kept for reuse: every decision makes two or three on each router
 * (the ROUTE and the FREE, on the router that took them and again on the leader), and each
 * was a calloc of ~450 bytes plus a malloc for its command bytes. Buffers of big commands
 * are not kept. */
#define PENDING_POOL_MAX 1024
#define PENDING_POOL_CMD_MAX 4096

static void pending_free(kvr_sync *s, pending *p)
{
    if (s->closing || s->n_pool >= PENDING_POOL_MAX) {
        free(p->cmd);
        free(p);
        return;
    }
    if (p->cmd_cap > PENDING_POOL_CMD_MAX) {
        free(p->cmd);
        p->cmd = NULL;
        p->cmd_cap = 0;
    }
    p->next = s->pool;
    s->pool = p;
    s->n_pool++;
}

static void pool_drain(kvr_sync *s)
{
    while (s->pool) {
        pending *p = s->pool;
        s->pool = p->next;
        free(p->cmd);
        free(p);
    }
    s->n_pool = 0;
}

/* Answers p now (from a callback context, never from inside a submit call). */
void sync_pending_finish(kvr_sync *s, pending *p)
{
    if (p->prev)
        plist_del(s, p);
    sync_fwd_slot_clear(s, p);
    if (p->t_commit_ns && p->status == 0 && s->o.hop_cb) {
        int64_t now = kvr_mono_ns();
        sync_hop(s, KVR_SYNC_HOP_REPLY, p->t_commit_ns, now);
        sync_hop(s, KVR_SYNC_HOP_LEADER, p->t_in_ns, now);
    }
    if (p->from) {
        sync_send_reply(p->from, p->from_rpc, p->status, p->have_res ? &p->res : NULL);
    } else if (p->cb) {
        p->cb(s, p->status, p->status == 0 ? &p->res : NULL, p->mode, p->data);
    } else if (p->internal && p->status != 0) {
        KVR_LOG_WARN_RL(5, "sync reconcile command dropped", "status=%d", p->status);
    }
    pending_free(s, p);
}

/* Marks p answered; the check handle delivers it at the end of this loop turn. */
void sync_pending_ready(kvr_sync *s, pending *p)
{
    sync_fwd_slot_clear(s, p);
    p->state = P_DONE;
}

pending *sync_pending_new(kvr_sync *s, const char *cmd, size_t len)
{
    pending *p = s->pool;
    char *buf = NULL;
    size_t cap = 0;
    if (p) {
        s->pool = p->next;
        s->n_pool--;
        buf = p->cmd;
        cap = p->cmd_cap;
    } else if (!(p = malloc(sizeof *p))) {
        return NULL;
    }
    if (!buf || cap < len) {
        size_t want = len < 256 ? 256 : len;
        char *nb = realloc(buf, want);
        if (!nb) {
            free(buf);
            free(p);
            return NULL;
        }
        buf = nb;
        cap = want;
    }
    memset(p, 0, sizeof *p);
    p->cmd = buf;
    p->cmd_cap = cap;
    memcpy(p->cmd, cmd, len);
    p->cmd_len = len;
    p->s = s;
    kvr_cmd_type type = kvr_cmd_peek_type(cmd, len);
    p->lazy = type == KVR_CMD_FREE || type == KVR_CMD_PREFILL_DONE;
    p->start_ms = kvr_mono_ms();
    return p;
}

/* ---------------------------------------------------------------------------------------- */
/* Dispatch */

void sync_dispatch(kvr_sync *s, pending *p)
{
    if (s->degraded && !p->internal) {
        sync_apply_local(s, p);
        return;
    }
    kvr_consensus_role role = kvr_consensus_get_role(s->cons);
    if (role == KVR_ROLE_LEADER) {
        sync_enqueue_batch(s, p);
        return;
    }
    const char *addr = NULL;
    uint32_t leader = kvr_consensus_leader(s->cons, &addr);
    if (leader && leader != s->o.id && addr) {
        sync_forward(s, p, leader, addr);
        return;
    }
    p->state = P_WAIT;
}

static void submit_internal(kvr_sync *s, const kvr_cmd *cmd)
{
    kvr_buf b;
    kvr_buf_init(&b);
    pending *p;
    if (kvr_cmd_encode(cmd, &b, NULL) == 0 && (p = sync_pending_new(s, b.base, b.len))) {
        p->internal = true;
        sync_plist_add(s, p);
        sync_dispatch(s, p);
    }
    kvr_buf_free(&b);
}

/* Leader only: WORKER_DOWN for every worker up in the replicated registry that this leader
 * has not heard for worker_ttl_ms (liveness.h): the one owner of worker liveness. */
static void workers_liveness(kvr_sync *s, int64_t mono_now)
{
    if (s->o.worker_ttl_ms == 0)
        return; /* off: this user reports no heartbeats */
    uint64_t ids[64];
    uint32_t n = kvr_live_due(&s->live, s->fsm, mono_now, s->o.worker_ttl_ms, ids, 64);
    for (uint32_t i = 0; i < n; i++) {
        kvr_cmd c = {.type = KVR_CMD_WORKER_DOWN, .u.worker_id = ids[i]};
        submit_internal(s, &c);
        KVR_LOG_WARN("sync worker down: not heard", "worker=%llu ttl_ms=%u",
                     (unsigned long long)ids[i], s->o.worker_ttl_ms);
    }
}

void kvr_sync_worker_seen(kvr_sync *s, uint64_t worker_id)
{
    if (!s->closing && worker_id)
        kvr_live_heard(&s->live, worker_id, kvr_mono_ms());
}

void kvr_sync_worker_forget(kvr_sync *s, uint64_t worker_id)
{
    kvr_live_forget(&s->live, worker_id);
}

void kvr_sync_liveness_hold(kvr_sync *s)
{
    kvr_live_hold(&s->live, kvr_mono_ms());
}

uint32_t kvr_sync_pending(kvr_sync *s)
{
    return s->n_pending;
}

bool kvr_sync_owns_liveness(kvr_sync *s)
{
    if (!s->started || s->closing)
        return false;
    return s->degraded || kvr_consensus_get_role(s->cons) == KVR_ROLE_LEADER;
}

/* Leader only: expire silent frontends' leases and over-age bookings (see sync.h). */
static void housekeeping(kvr_sync *s, int64_t mono_now)
{
    if (s->o.housekeeping_ms == UINT32_MAX ||
        mono_now - s->last_housekeeping_ms < (int64_t)s->o.housekeeping_ms)
        return;
    s->last_housekeeping_ms = mono_now;
    if (kvr_consensus_get_role(s->cons) != KVR_ROLE_LEADER)
        return;
    uint64_t now = (uint64_t)kvr_now_ms();
    /* Silence is measured on this leader's monotonic clock (lease.h): a wall-clock step on
     * any router expires nothing early. now (wall) only labels the command. */
    uint64_t ids[64];
    uint32_t n = kvr_lease_due(&s->leases, s->fsm, mono_now, s->o.lease_ttl_ms, ids, 64);
    for (uint32_t i = 0; i < n; i++) {
        kvr_cmd c = {.type = KVR_CMD_FRONTEND_EXPIRE};
        c.u.frontend.frontend_id = ids[i];
        c.u.frontend.now_ms = now;
        submit_internal(s, &c);
        KVR_LOG_INFO("sync frontend lease expired", "frontend=%llu ttl_ms=%u",
                     (unsigned long long)ids[i], s->o.lease_ttl_ms);
    }
    workers_liveness(s, mono_now);
    /* EXPIRE only when this leader's replica (it has applied everything it committed) holds
     * a booking it would free: an idle group commits nothing (defect 13: one log entry per
     * second per router before). Age is measured on this leader's monotonic clock, never by
     * comparing a proposer's wall-clock stamp with this leader's wall clock (liveness.h). */
    uint64_t before;
    if (kvr_live_expire_due(s->fsm, mono_now, s->live.office_ms, s->o.max_request_age_ms,
                            &before)) {
        kvr_cmd c = {.type = KVR_CMD_EXPIRE, .u.before_ms = before};
        submit_internal(s, &c);
    }
}

static void on_tick(uv_timer_t *t)
{
    kvr_sync *s = t->data;
    if (s->closing)
        return;
    int64_t now = kvr_mono_ms();
    for (conn *c = s->conns, *nx; c; c = nx) {
        nx = c->next;
        if (c->authing && kvr_auth_expired(&c->hs, now)) {
            if (c->inbound)
                s->auth_refused++;
            KVR_LOG_WARN_RL(5, "sync forward: handshake timed out", "inbound=%d", c->inbound);
            sync_conn_close(c);
        }
    }
    uint32_t leader = kvr_consensus_leader(s->cons, NULL);
    bool is_leader = kvr_consensus_get_role(s->cons) == KVR_ROLE_LEADER;
    if (is_leader != s->was_leader) {
        s->was_leader = is_leader;
        kvr_lease_set_leader(&s->leases, is_leader, now);
        kvr_live_set_leader(&s->live, is_leader, now);
    }
    /* its own flag: was_leader may also flip in kvr_sync_frontend_seen, a call into this
     * module where calling back out would re-enter the caller */
    if (is_leader != s->leader_told) {
        s->leader_told = is_leader;
        if (s->o.leader_cb)
            s->o.leader_cb(s->o.leader_data, is_leader);
    }
    if (leader != s->last_leader) {
        if (leader)
            s->m.elections++;
        KVR_LOG_INFO("sync leader changed", "from=%u to=%u term=%llu", s->last_leader, leader,
                     (unsigned long long)kvr_consensus_term(s->cons));
        s->last_leader = leader;
    }
    if (leader == 0) {
        if (s->no_leader_since == 0)
            s->no_leader_since = now;
        if (!s->degraded && now - s->no_leader_since >= (int64_t)s->o.degraded_after_ms) {
            s->degraded = true;
            KVR_LOG_WARN("sync degraded: no quorum, answering locally", "after_ms=%lld",
                         (long long)(now - s->no_leader_since));
        }
    } else {
        s->no_leader_since = 0;
        s->had_leader = true;
        if (s->degraded) {
            s->degraded = false;
            KVR_LOG_INFO("sync quorum back", "leader=%u", leader);
        }
        if (s->local)
            sync_reconcile(s);
        housekeeping(s, now);
    }
    sync_check_log_fenced(s, now);
    /* Retry, time out, or answer locally. Newly reconciled commands sit at the list's tail. */
    for (pending *p = s->head.next, *nx; p != &s->head; p = nx) {
        nx = p->next;
        if (p->state == P_FWD && now >= p->try_deadline_ms) {
            sync_fwd_slot_clear(s, p);
            p->state = P_WAIT;
            s->m.forward_retries++;
        }
        if (p->state != P_WAIT)
            continue;
        if (p->from) { /* a follower's command we could not propose: it retries elsewhere */
            p->status = KVR_EAGAIN;
            sync_pending_ready(s, p);
            continue;
        }
        bool expired =
            now - p->start_ms >= (p->reconcile ? RECONCILE_WAIT_MS : (int64_t)s->o.max_wait_ms);
        if (p->internal && expired) {
            p->status = KVR_ETIMEDOUT;
            sync_pending_ready(s, p);
            continue;
        }
        /* Locally only without a quorum: a group that has a leader decides every command,
         * and a command applied to this node's copy alone (then re-proposed) while the group
         * commits others is how replicas drifted apart with a full disk. A late command is
         * answered as timed out; its caller retries or falls back. */
        if (!p->internal && s->degraded) {
            sync_apply_local(s, p);
            continue;
        }
        if (!p->internal && expired) {
            p->status = KVR_ETIMEDOUT;
            sync_pending_ready(s, p);
            continue;
        }
        sync_dispatch(s, p);
    }
}

static void on_check(uv_check_t *h)
{
    kvr_sync *s = h->data;
    /* answers ready from local mode / errors */
    for (pending *p = s->head.next, *nx; p != &s->head; p = nx) {
        nx = p->next;
        if (p->state == P_DONE)
            sync_pending_finish(s, p);
    }
}

/* Proposals go out just before the loop sleeps, one phase after the answers: NATS replies
 * were flushed in the check phase (kvr_nats_core) before the next entry costs the leader two
 * AppendEntries sends. The forward connections are written here, once per loop turn, after
 * the proposal: a follower then finds the leader's answers and the AppendEntries that
 * carries their commit in one wake-up more often, instead of waking for each (measured under
 * kvr-bench raft: fewer context switches per decision on the followers, less CPU per
 * decision on every router; the answers wait only for the proposal's two sends). Nothing
 * waits longer: the loop goes from here straight to polling. */
static void on_prepare(uv_prepare_t *h)
{
    kvr_sync *s = h->data;
    if (!s->closing)
        sync_flush_batches(s);
    for (conn *c = s->conns; c; c = c->next)
        sync_conn_flush(c);
}

/* ---------------------------------------------------------------------------------------- */
/* Public API */

int kvr_sync_init(kvr_sync **out, uv_loop_t *loop, const kvr_sync_options *o, kvr_err *err)
{
    int rc;
    kvr_sync *s = calloc(1, sizeof *s);
    if (!s)
        return kvr_err_set(err, KVR_ENOMEM, "sync: out of memory");
    s->loop = loop;
    s->o = *o;
    /* A peer closing a socket must not kill the router: writes report EPIPE instead. */
    struct sigaction sa;
    if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
        signal(SIGPIPE, SIG_IGN);
    kvr_sync_options def;
    kvr_sync_options_default(&def);
#define DEF(f)                                                                                     \
    if (!s->o.f)                                                                                   \
    s->o.f = def.f
    DEF(degraded_after_ms);
    DEF(coalesce_us);
    DEF(forward_timeout_ms);
    DEF(max_wait_ms);
    DEF(election_timeout_ms);
    DEF(heartbeat_timeout_ms);
    DEF(snapshot_threshold);
    DEF(snapshot_trailing);
    DEF(max_batch);
    DEF(max_inflight);
    DEF(housekeeping_ms);
    DEF(lease_ttl_ms);
    DEF(max_request_age_ms);
    DEF(worker_ttl_ms);
    DEF(port_wait_ms);
#undef DEF
    if (s->o.max_batch > KVR_ENTRY_MAX_COMMANDS)
        s->o.max_batch = KVR_ENTRY_MAX_COMMANDS;
    s->head.next = s->head.prev = &s->head;
    s->raft_addr = strdup(o->raft_addr ? o->raft_addr : "");
    s->peers = strdup(o->peers ? o->peers : "");
    s->data_dir = strdup(o->data_dir ? o->data_dir : "");
    s->fwd_slots = calloc(FWD_SLOTS, sizeof *s->fwd_slots);
    s->fsm = kvr_fsm_new(&o->fsm);
    if (!s->raft_addr || !s->peers || !s->data_dir || !s->fwd_slots || !s->fsm) {
        rc = kvr_err_set(err, KVR_ENOMEM, "sync: out of memory");
        goto fail;
    }
    s->o.raft_addr = s->raft_addr;
    s->o.peers = s->peers;
    s->o.data_dir = s->data_dir;
    if (o->auth_key)
        s->key = *o->auth_key;
    s->o.auth_key = NULL; /* the copy in s->key is the one used */
    if (getrandom(&s->nonce, sizeof s->nonce, 0) != sizeof s->nonce)
        s->nonce = (uint64_t)kvr_mono_ns() ^ ((uint64_t)o->id << 48);
    s->cfsm = (kvr_consensus_fsm){s, sync_fsm_apply_cb, sync_fsm_snapshot_cb, sync_fsm_restore_cb};
    kvr_consensus_options co = {
        .id = o->id,
        .addr = s->raft_addr,
        .peers = s->peers,
        .data_dir = s->data_dir,
        .join = o->join,
        .election_timeout_ms = s->o.election_timeout_ms,
        .heartbeat_timeout_ms = s->o.heartbeat_timeout_ms,
        .snapshot_threshold = s->o.snapshot_threshold,
        .snapshot_trailing = s->o.snapshot_trailing,
        .auth_key = s->key.len ? &s->key : NULL,
        .memory_log = o->memory_log,
        .memory_hold_ms = o->memory_hold_ms,
    };
    if ((rc = kvr_consensus_init(&s->cons, loop, &co, &s->cfsm, err)) != 0) {
        kvr_err_wrap(err, rc, "sync node %u", o->id);
        goto fail;
    }
    uv_timer_init(loop, &s->tick);
    s->tick.data = s;
    uv_check_init(loop, &s->check);
    s->check.data = s;
    uv_prepare_init(loop, &s->prep);
    s->prep.data = s;
    uv_timer_init(loop, &s->coalesce);
    s->coalesce.data = s;
    uv_tcp_init(loop, &s->listener);
    s->listener.data = s;
    s->handles_open = 5;
    *out = s;
    return 0;
fail:
    kvr_fsm_free(s->fsm);
    free(s->fwd_slots);
    free(s->raft_addr);
    free(s->peers);
    free(s->data_dir);
    free(s);
    return rc;
}

/* 0 once a socket can bind and listen on sa, else -errno. */
static int port_probe(const struct sockaddr_in *sa)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1, rc = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one); /* as libuv does */
    if (bind(fd, (const struct sockaddr *)sa, sizeof *sa) != 0 || listen(fd, 1) != 0)
        rc = -errno;
    close(fd);
    return rc;
}

/* A restarted router often finds its Raft or forward port still held for a moment (the old
 * process is still exiting, or a forked child has not closed it yet): wait for both with
 * backoff, up to PORT_WAIT_MS, instead of exiting. This runs once before the loop serves
 * anything, so sleeping here blocks nobody. */
static int wait_ports_free(kvr_sync *s, const struct sockaddr_in *fwd, kvr_err *err)
{
    struct sockaddr_in raft;
    char host[64];
    const char *colon = strrchr(s->raft_addr, ':');
    if (!colon || (size_t)(colon - s->raft_addr) >= sizeof host)
        return kvr_err_set(err, KVR_EINVAL, "sync: bad raft address \"%s\"", s->raft_addr);
    memcpy(host, s->raft_addr, (size_t)(colon - s->raft_addr));
    host[colon - s->raft_addr] = 0;
    if (uv_ip4_addr(host, atoi(colon + 1), &raft) != 0)
        return kvr_err_set(err, KVR_EINVAL, "sync: bad raft address \"%s\"", s->raft_addr);
    int64_t deadline = kvr_mono_ms() + s->o.port_wait_ms;
    unsigned delay_ms = 20;
    for (int tries = 0;; tries++) {
        const struct sockaddr_in *busy = NULL;
        int rc = port_probe(&raft);
        if (rc == 0 && (rc = port_probe(fwd)) != 0)
            busy = fwd;
        else if (rc != 0)
            busy = &raft;
        if (!busy)
            return 0;
        if (rc != -EADDRINUSE || kvr_mono_ms() + delay_ms > deadline)
            return kvr_err_set(err, KVR_EIO, "sync: port %d: %s%s", ntohs(busy->sin_port),
                               strerror(-rc),
                               rc == -EADDRINUSE ? " (still busy after waiting)" : "");
        if (tries == 0)
            KVR_LOG_WARN("sync: port busy, waiting for it", "port=%d max_wait_ms=%u",
                         ntohs(busy->sin_port), s->o.port_wait_ms);
        struct timespec ts = {delay_ms / 1000, (long)(delay_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        delay_ms = delay_ms * 2 > 1000 ? 1000 : delay_ms * 2;
    }
}

int kvr_sync_start(kvr_sync *s, kvr_err *err)
{
    struct sockaddr_in sa;
    if (sync_fwd_sockaddr(s->raft_addr, &sa) != 0)
        return kvr_err_set(err, KVR_EINVAL, "sync: bad raft address \"%s\"", s->raft_addr);
    int rc = wait_ports_free(s, &sa, err);
    if (rc != 0)
        return rc;
    rc = uv_tcp_bind(&s->listener, (const struct sockaddr *)&sa, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&s->listener, 128, sync_on_accept);
    if (rc != 0)
        return kvr_err_set(err, KVR_EIO, "sync: listening for forwards on port %d: %s",
                           ntohs(sa.sin_port), uv_strerror(rc));
    s->listening = true;
    if ((rc = kvr_consensus_start(s->cons, err)) != 0)
        return kvr_err_wrap(err, rc, "sync node %u", s->o.id);
    uv_timer_start(&s->tick, on_tick, TICK_MS, TICK_MS);
    uv_check_start(&s->check, on_check);
    uv_prepare_start(&s->prep, on_prepare);
    uv_unref((uv_handle_t *)&s->prep);
    s->started = true;
    s->no_leader_since = kvr_mono_ms();
    KVR_LOG_INFO("sync started", "id=%u raft=%s forward_port=%d", s->o.id, s->raft_addr,
                 ntohs(sa.sin_port));
    return 0;
}

void kvr_sync_frontend_seen(kvr_sync *s, uint64_t frontend_id)
{
    if (s->closing || !s->started || frontend_id == 0)
        return;
    bool leader = kvr_consensus_get_role(s->cons) == KVR_ROLE_LEADER;
    if (leader && !s->was_leader) { /* took office since the last tick */
        s->was_leader = true;
        kvr_lease_set_leader(&s->leases, true, kvr_mono_ms());
        kvr_live_set_leader(&s->live, true, kvr_mono_ms());
    }
    if (!kvr_lease_heard(&s->leases, s->fsm, frontend_id, kvr_mono_ms(), leader))
        return;
    kvr_cmd c = {.type = KVR_CMD_FRONTEND_SEEN};
    c.u.frontend.frontend_id = frontend_id;
    c.u.frontend.now_ms = (uint64_t)kvr_now_ms();
    submit_internal(s, &c);
}

static int submit_bytes(kvr_sync *s, const char *cmd, size_t len, kvr_sync_cb cb, void *data)
{
    if (s->closing || !s->started)
        return KVR_ECLOSED;
    pending *p = sync_pending_new(s, cmd, len);
    if (!p)
        return KVR_ENOMEM;
    p->cb = cb;
    p->data = data;
    sync_plist_add(s, p);
    sync_dispatch(s, p);
    return 0;
}

int kvr_sync_submit(kvr_sync *s, const kvr_cmd *cmd, kvr_sync_cb cb, void *data)
{
    /* encoded into a scratch buffer kept across calls: submit_bytes copies it before it
     * dispatches, and nothing it calls submits again */
    kvr_buf_reset(&s->enc);
    int rc = kvr_cmd_encode(cmd, &s->enc, NULL);
    if (rc == 0)
        rc = submit_bytes(s, s->enc.base, s->enc.len, cb, data);
    if (s->enc.cap > 64 * 1024)
        kvr_buf_free(&s->enc); /* a huge command's buffer is not kept */
    return rc;
}

int kvr_sync_route(kvr_sync *s, const kvr_route_cmd *rc, kvr_sync_cb cb, void *data)
{
    kvr_cmd c = {.type = KVR_CMD_ROUTE};
    c.u.route = *rc;
    return kvr_sync_submit(s, &c, cb, data);
}

static void maybe_finish_close(kvr_sync *s);

static void handle_closed(uv_handle_t *h)
{
    kvr_sync *s = h->data;
    s->handles_open--;
    maybe_finish_close(s);
}

static void cons_closed(void *data)
{
    kvr_sync *s = data;
    s->cons = NULL;
    /* anything raft did not call back for */
    while (s->inflight) {
        batch *b = s->inflight;
        s->inflight = b->next;
        for (uint32_t i = 0; i < b->n; i++) {
            b->items[i]->status = KVR_ECLOSED;
            sync_pending_finish(s, b->items[i]);
        }
        sync_batch_free(b);
    }
    s->n_inflight = 0;
    uv_close((uv_handle_t *)&s->tick, handle_closed);
    uv_close((uv_handle_t *)&s->check, handle_closed);
    uv_close((uv_handle_t *)&s->prep, handle_closed);
    uv_close((uv_handle_t *)&s->coalesce, handle_closed);
    uv_close((uv_handle_t *)&s->listener, handle_closed);
    while (s->conns)
        sync_conn_close(s->conns);
}

static void maybe_finish_close(kvr_sync *s)
{
    if (s->handles_open > 0 || s->cons)
        return;
    void (*cb)(void *) = s->close_cb;
    void *data = s->close_data;
    for (uint32_t i = 0; i < s->n_log; i++)
        free(s->log[i].cmd);
    free(s->log);
    kvr_fsm_free(s->local);
    kvr_fsm_free(s->fsm);
    pool_drain(s);
    kvr_buf_free(&s->enc);
    free(s->queue);
    free(s->fwd_slots);
    free(s->raft_addr);
    free(s->peers);
    free(s->data_dir);
    free(s);
    if (cb)
        cb(data);
}

void kvr_sync_close(kvr_sync *s, void (*close_cb)(void *data), void *data)
{
    if (s->closing)
        return;
    s->closing = true;
    s->close_cb = close_cb;
    s->close_data = data;
    uv_timer_stop(&s->tick);
    /* Everything not inside a proposed entry is answered now. */
    for (pending *p = s->head.next, *nx; p != &s->head; p = nx) {
        nx = p->next;
        if (p->state == P_BATCH) {
            bool queued = false;
            for (uint32_t i = 0; i < s->n_queue; i++)
                if (s->queue[i] == p)
                    queued = true;
            if (!queued)
                continue; /* in flight in raft: its batch callback answers */
        }
        p->status = KVR_ECLOSED;
        sync_pending_finish(s, p);
    }
    s->n_queue = 0;
    kvr_consensus_close(s->cons, cons_closed, s);
}

void kvr_sync_get_state(kvr_sync *s, kvr_sync_state *out)
{
    memset(out, 0, sizeof *out);
    out->id = s->o.id;
    if (s->cons) {
        out->role = kvr_consensus_role_name(kvr_consensus_get_role(s->cons));
        out->leader_id = kvr_consensus_leader(s->cons, NULL);
        out->term = kvr_consensus_term(s->cons);
        out->commit_index = kvr_consensus_commit_index(s->cons);
        out->applied_index = kvr_consensus_applied_index(s->cons);
        kvr_consensus_memlog_stats ms;
        kvr_consensus_memlog_stats_get(s->cons, &ms);
        out->log_memory = ms.memory_log;
        out->vote_restricted = ms.restricted && !ms.may_vote;
        out->votes_withheld = ms.withheld;
        out->log_fenced = kvr_consensus_log_fenced(s->cons);
    } else {
        out->role = "unavailable";
    }
    out->digest = kvr_fsm_digest(s->fsm);
    out->bookings = kvr_fsm_booking_count(s->fsm);
    out->workers = kvr_fsm_worker_count(s->fsm);
    out->degraded = s->degraded;
    out->local_pending = s->n_log;
    /* Lost, not "not found yet": a node that never knew a leader since it started (start-up,
     * a group still forming) never counts as having lost it. 2x the election timeout covers a
     * normal election (the followers notice after 1-2x, one round of votes follows); only a
     * split vote or a real loss of the majority lasts longer. Read from the Raft library now,
     * not from the last tick, so a leader found since then ends it at once. */
    if (s->cons && s->had_leader && out->leader_id == 0 && s->no_leader_since > 0) {
        int64_t since = s->no_leader_since + 2 * (int64_t)s->o.election_timeout_ms;
        if (kvr_mono_ms() > since) {
            out->quorum_lost = true;
            out->quorum_lost_since_ms = since;
        }
    }
}

uint64_t kvr_sync_digest(kvr_sync *s)
{
    return kvr_fsm_digest(s->fsm);
}

const kvr_fsm *kvr_sync_fsm(kvr_sync *s)
{
    return s->fsm;
}

void kvr_sync_get_metrics(kvr_sync *s, kvr_sync_metrics *out)
{
    *out = s->m;
}
