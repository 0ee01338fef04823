#include "sync.h"

#include "consensus.h"
#include "entry.h"
#include "kvr_log.h"
#include "kvr_mp.h"
#include "lease.h"
#include "liveness.h"
#include "peer_auth.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FWD_MAX_FRAME (64 * 1024)
#define FWD_MAX_AUTHING 32 /* inbound forward-port handshakes at once; more are closed */
#define FWD_SLOTS (1u << 16)
#define TICK_MS 10
#define RPC_REQ 1
#define RPC_REP 2

typedef struct pending pending;
typedef struct conn conn;
typedef struct batch batch;

enum { P_WAIT, P_BATCH, P_FWD, P_DONE };

struct pending {
    kvr_sync *s;
    pending *prev, *next;
    char *cmd;
    size_t cmd_len;
    kvr_sync_cb cb;
    void *data;
    conn *from; /* forwarded to us by a follower: answer there */
    uint64_t from_rpc;
    bool internal; /* a reconcile re-proposal: nobody waits */
    bool reconcile; /* re-proposes local-mode state: waits RECONCILE_WAIT_MS, not max_wait_ms */
    bool lazy;      /* FREE or PREFILL_DONE: may wait coalesce_us for company in an entry */
    int state;
    int64_t start_ms, try_deadline_ms;
    int64_t fwd_start_us;
    /* hop stamps (kvr_mono_ns; 0: not reached): arrival on the leader, queued, proposed,
     * committed */
    int64_t t_in_ns, t_queued_ns, t_prop_ns, t_commit_ns;
    uint64_t rpc_id;
    conn *via;
    kvr_sync_mode mode;
    int status;
    bool have_res;
    kvr_fsm_result res;
};

struct conn {
    kvr_sync *s;
    uv_tcp_t tcp;
    conn *next;
    bool inbound, connected, closing;
    bool authing; /* peer_auth handshake running: nothing is read or sent as a frame */
    kvr_auth_hs hs;
    uint32_t peer; /* outbound: the peer id */
    kvr_buf in, out;
    uv_write_t wreq;
    bool writing;
    kvr_buf wbuf; /* bytes handed to uv_write */
};

struct batch {
    kvr_consensus_req req;
    kvr_sync *s;
    batch *next;
    uint64_t seq;
    int64_t proposed_ms;
    uint32_t n, applied;
    pending **items;
};

typedef struct local_rec {
    char *cmd;
    size_t len;
} local_rec;

struct kvr_sync {
    uv_loop_t *loop;
    kvr_sync_options o;
    char *raft_addr, *peers, *data_dir;
    kvr_consensus *cons;
    kvr_consensus_fsm cfsm;
    kvr_fsm *fsm;
    uint64_t nonce, next_seq, next_rpc;
    pending head; /* circular list of outstanding commands */
    uint32_t n_pending;
    pending **fwd_slots;
    batch *inflight, *inflight_tail;
    uint32_t n_inflight;
    pending **queue; /* commands for the next batch */
    uint32_t n_queue, cap_queue;
    uv_timer_t tick;
    uv_check_t check;
    uv_prepare_t prep;
    uv_timer_t coalesce; /* wakes flush_batches for a queue of lazy commands */
    uv_tcp_t listener;
    bool listening, started, closing;
    kvr_auth_key key;   /* len 0: forward port unauthenticated (--insecure-cluster) */
    uint32_t n_authing; /* inbound handshakes running */
    uint64_t auth_refused;
    conn *conns;
    conn *clients[KVR_CONSENSUS_MAX_PEERS + 1]; /* by slot, lookup by peer id */
    uint32_t last_leader;
    int64_t no_leader_since;
    bool had_leader; /* a leader was known since start: only then can the quorum be "lost" */
    int64_t last_housekeeping_ms;
    kvr_lease_tracker leases; /* the leader's frontend-lease policy (lease.h) */
    kvr_live_tracker live;    /* the leader's worker-liveness policy (liveness.h) */
    bool was_leader;
    bool degraded;
    bool io_transfer; /* a leadership transfer after a failed log write is running */
    kvr_consensus_transfer io_treq;
    int64_t io_error_ms; /* last failed log write (mono), 0: none */
    kvr_fsm *local;
    local_rec *log;
    uint32_t n_log, cap_log;
    kvr_sync_metrics m;
    int handles_open;
    void (*close_cb)(void *);
    void *close_data;
};

static const uint32_t LOCAL_LOG_MAX = 200000;
/* A reconcile command dropped after max_wait_ms (5 s) was a leaked booking or a lost FREE:
 * right after a partition heals, forwarding connections to the leader are still being
 * re-established (the old ones died silently) and the leader may change again, so these
 * commands get a minute before they are given up. */
static const int64_t RECONCILE_WAIT_MS = 60000;

/* ---------------------------------------------------------------------------------------- */

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

static void plist_add(kvr_sync *s, pending *p)
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

static void fwd_slot_clear(kvr_sync *s, pending *p)
{
    if (p->state == P_FWD && s->fwd_slots[p->rpc_id & (FWD_SLOTS - 1)] == p)
        s->fwd_slots[p->rpc_id & (FWD_SLOTS - 1)] = NULL;
    p->via = NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* Wire helpers */

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void conn_flush(conn *c);

/* Appends a frame: placeholder length, body written by the caller, then patched. */
static size_t frame_begin(conn *c)
{
    size_t at = c->out.len;
    uint8_t z[4] = {0};
    if (kvr_buf_append(&c->out, z, 4) != 0)
        return (size_t)-1;
    return at;
}

static void frame_end(conn *c, size_t at)
{
    put_be32((uint8_t *)c->out.base + at, (uint32_t)(c->out.len - at - 4));
}

static int send_reply(conn *c, uint64_t rpc, int status, const kvr_fsm_result *r)
{
    if (!c || c->closing)
        return KVR_ECLOSED;
    size_t at = frame_begin(c);
    if (at == (size_t)-1)
        return KVR_ENOMEM;
    kvr_fsm_result zero;
    if (!r) {
        memset(&zero, 0, sizeof zero);
        r = &zero;
    }
    int rc = kvr_mp_write_array(&c->out, 11);
    rc |= kvr_mp_write_uint(&c->out, RPC_REP);
    rc |= kvr_mp_write_uint(&c->out, rpc);
    rc |= kvr_mp_write_int(&c->out, status);
    rc |= kvr_mp_write_uint(&c->out, r->outcome);
    rc |= kvr_mp_write_uint(&c->out, r->type);
    rc |= kvr_mp_write_uint(&c->out, r->worker_id);
    rc |= kvr_mp_write_uint(&c->out, r->overlap);
    rc |= kvr_mp_write_uint(&c->out, r->request_blocks);
    rc |= kvr_mp_write_uint(&c->out, r->freed);
    rc |= kvr_mp_write_cstr(&c->out, r->url);
    rc |= kvr_mp_write_double(&c->out, r->cost);
    if (rc) {
        c->out.len = at;
        return KVR_ENOMEM;
    }
    frame_end(c, at);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Completion */

static void hop(kvr_sync *s, int h, int64_t from_ns, int64_t now_ns)
{
    if (s->o.hop_cb && from_ns > 0 && now_ns >= from_ns)
        s->o.hop_cb(s->o.hop_data, h, (double)(now_ns - from_ns) / 1e9);
}

static void pending_free(pending *p)
{
    free(p->cmd);
    free(p);
}

/* Answers p now (from a callback context, never from inside a submit call). */
static void pending_finish(kvr_sync *s, pending *p)
{
    if (p->prev)
        plist_del(s, p);
    fwd_slot_clear(s, p);
    if (p->t_commit_ns && p->status == 0 && s->o.hop_cb) {
        int64_t now = kvr_mono_ns();
        hop(s, KVR_SYNC_HOP_REPLY, p->t_commit_ns, now);
        hop(s, KVR_SYNC_HOP_LEADER, p->t_in_ns, now);
    }
    if (p->from) {
        send_reply(p->from, p->from_rpc, p->status, p->have_res ? &p->res : NULL);
    } else if (p->cb) {
        p->cb(s, p->status, p->status == 0 ? &p->res : NULL, p->mode, p->data);
    } else if (p->internal && p->status != 0) {
        KVR_LOG_WARN_RL(5, "sync reconcile command dropped", "status=%d", p->status);
    }
    pending_free(p);
}

/* Marks p answered; the check handle delivers it at the end of this loop turn. */
static void pending_ready(kvr_sync *s, pending *p)
{
    fwd_slot_clear(s, p);
    p->state = P_DONE;
}

/* ---------------------------------------------------------------------------------------- */
/* Local (degraded) mode */

static int local_log_add(kvr_sync *s, const char *cmd, size_t len)
{
    if (s->n_log >= LOCAL_LOG_MAX) {
        KVR_LOG_WARN_RL(5, "sync local log full; command will not be reconciled", "max=%u", LOCAL_LOG_MAX);
        return KVR_ELIMIT;
    }
    if (s->n_log == s->cap_log) {
        uint32_t nc = s->cap_log ? s->cap_log * 2 : 256;
        local_rec *nl = realloc(s->log, nc * sizeof *nl);
        if (!nl)
            return KVR_ENOMEM;
        s->log = nl;
        s->cap_log = nc;
    }
    char *c = malloc(len ? len : 1);
    if (!c)
        return KVR_ENOMEM;
    memcpy(c, cmd, len);
    s->log[s->n_log++] = (local_rec){c, len};
    return 0;
}

static void apply_local(kvr_sync *s, pending *p)
{
    if (!s->local) {
        s->local = kvr_fsm_clone(s->fsm);
        if (!s->local) {
            p->status = KVR_ENOMEM;
            pending_ready(s, p);
            return;
        }
    }
    kvr_fsm_apply_bytes(s->local, p->cmd, p->cmd_len, &p->res);
    p->have_res = true;
    p->status = 0;
    p->mode = KVR_SYNC_LOCAL;
    if (p->res.outcome != KVR_OUT_INVALID)
        local_log_add(s, p->cmd, p->cmd_len);
    s->m.degraded_answers++;
    pending_ready(s, p);
}

static pending *pending_new(kvr_sync *s, const char *cmd, size_t len)
{
    pending *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->cmd = malloc(len ? len : 1);
    if (!p->cmd) {
        free(p);
        return NULL;
    }
    memcpy(p->cmd, cmd, len);
    p->cmd_len = len;
    p->s = s;
    /* kvr_cmd_encode: version byte, fixarray, then the type as a positive fixint */
    p->lazy = len >= 3 && ((uint8_t)cmd[1] & 0xf0) == 0x90 &&
              ((uint8_t)cmd[2] == KVR_CMD_FREE || (uint8_t)cmd[2] == KVR_CMD_PREFILL_DONE);
    p->start_ms = kvr_mono_ms();
    return p;
}

static void dispatch(kvr_sync *s, pending *p);

static int rid_cmp(const void *a, const void *b)
{
    return memcmp(a, b, KVR_REQUEST_ID_LEN);
}

/* Re-proposes what local mode did, now that a leader is back (see sync.h). */
static void reconcile(kvr_sync *s)
{
    kvr_fsm *lf = s->local;
    uint32_t n = s->n_log;
    local_rec *log = s->log;
    s->local = NULL;
    s->log = NULL;
    s->n_log = s->cap_log = 0;
    KVR_LOG_INFO("sync reconciling local commands", "count=%u", n);
    kvr_route_candidate *cand = malloc(KVR_FSM_MAX_CANDIDATES * sizeof *cand);
    kvr_buf b;
    kvr_buf_init(&b);
    /* Requests routed locally: their net effect is decided from the local replica, so their
     * own FREE/PREFILL_DONE records are folded into the pinned ROUTE below. */
    uint8_t *routed = malloc((size_t)(n ? n : 1) * KVR_REQUEST_ID_LEN);
    uint32_t n_routed = 0;
    for (uint32_t i = 0; cand && routed && i < n; i++) {
        kvr_cmd c;
        if (kvr_cmd_decode(log[i].cmd, log[i].len, &c, cand, NULL) == 0 && c.type == KVR_CMD_ROUTE)
            memcpy(routed + (size_t)n_routed++ * KVR_REQUEST_ID_LEN, c.u.route.request_id,
                   KVR_REQUEST_ID_LEN);
    }
    if (routed)
        qsort(routed, n_routed, KVR_REQUEST_ID_LEN, rid_cmp);
    for (uint32_t i = 0; cand && routed && i < n; i++) {
        kvr_cmd c;
        if (kvr_cmd_decode(log[i].cmd, log[i].len, &c, cand, NULL) != 0)
            continue;
        const uint8_t *rid = kvr_cmd_request_id(&c);
        if (rid && c.type != KVR_CMD_ROUTE &&
            bsearch(rid, routed, n_routed, KVR_REQUEST_ID_LEN, rid_cmp))
            continue;
        b.len = 0;
        if (c.type == KVR_CMD_ROUTE) {
            kvr_fsm_booking_view bv;
            if (kvr_fsm_booking_get(lf, c.u.route.request_id, &bv) != 0) {
                /* finished while local. The same ROUTE may also sit in this node's Raft log
                 * (proposed before the quorum was lost) and commit later: free it there. */
                kvr_cmd fr = {.type = KVR_CMD_FREE};
                memcpy(fr.u.request_id, c.u.route.request_id, KVR_REQUEST_ID_LEN);
                pending *p;
                if (kvr_cmd_encode(&fr, &b, NULL) == 0 && (p = pending_new(s, b.base, b.len))) {
                    p->internal = true;
                    p->reconcile = true;
                    plist_add(s, p);
                    dispatch(s, p);
                    s->m.reconciled++;
                }
                continue;
            }
            kvr_route_candidate pin = {bv.worker_id, bv.overlap};
            c.u.route.pin_worker = bv.worker_id;
            c.u.route.candidates = &pin;
            c.u.route.n_candidates = 1;
            if (kvr_cmd_encode(&c, &b, NULL) != 0)
                continue;
            pending *p = pending_new(s, b.base, b.len);
            if (p) {
                p->internal = true;
                p->reconcile = true;
                plist_add(s, p);
                dispatch(s, p);
                s->m.reconciled++;
            }
            if (bv.prefill_blocks == 0 && bv.blocks > bv.overlap) {
                kvr_cmd pd = {.type = KVR_CMD_PREFILL_DONE};
                memcpy(pd.u.request_id, bv.request_id, KVR_REQUEST_ID_LEN);
                b.len = 0;
                if (kvr_cmd_encode(&pd, &b, NULL) == 0 && (p = pending_new(s, b.base, b.len))) {
                    p->internal = true;
                    p->reconcile = true;
                    plist_add(s, p);
                    dispatch(s, p);
                }
            }
        } else {
            pending *p = pending_new(s, log[i].cmd, log[i].len);
            if (p) {
                p->internal = true;
                p->reconcile = true;
                plist_add(s, p);
                dispatch(s, p);
                s->m.reconciled++;
            }
        }
    }
    kvr_buf_free(&b);
    free(cand);
    free(routed);
    for (uint32_t i = 0; i < n; i++)
        free(log[i].cmd);
    free(log);
    kvr_fsm_free(lf);
}

/* ---------------------------------------------------------------------------------------- */
/* Leader side: batching */

static void batch_free(batch *b)
{
    free(b->items);
    free(b);
}

static void io_transfer_done(kvr_consensus_transfer *req)
{
    kvr_sync *s = req->data;
    s->io_transfer = false;
    KVR_LOG_INFO("sync leadership transfer after a failed log write finished", "role=%s",
                 kvr_consensus_get_role(s->cons) == KVR_ROLE_LEADER ? "leader" : "not-leader");
}

/* A leader whose own log write failed (a full or failing disk) must not go on leading: its
 * followers may commit entries it could not store, and every command it proposes fails the
 * same way. Leadership goes to the most up-to-date voter (raft_transfer with id 0); raft
 * refuses new proposals while the transfer runs, so commands are forwarded to the new leader
 * once it is known. Retried on each failure while this node still leads. */
static void io_error_step_down(kvr_sync *s, int status)
{
    s->io_error_ms = kvr_mono_ms();
    KVR_LOG_ERROR_RL(1, "sync raft log write failed", "status=%d raft=\"%s\" leader=%d", status,
                     kvr_consensus_errmsg(s->cons),
                     kvr_consensus_get_role(s->cons) == KVR_ROLE_LEADER);
    if (s->io_transfer || s->closing || kvr_consensus_get_role(s->cons) != KVR_ROLE_LEADER)
        return;
    s->io_treq.data = s;
    s->io_treq.cb = io_transfer_done;
    int rc = kvr_consensus_transfer_leadership(s->cons, &s->io_treq, 0);
    if (rc == 0) {
        s->io_transfer = true;
        KVR_LOG_WARN("sync stepping down: leadership transfer after a failed log write", "id=%u",
                     s->o.id);
    } else {
        KVR_LOG_WARN_RL(1, "sync leadership transfer refused", "status=%d", rc);
    }
}

static void batch_cb(kvr_consensus_req *req, int status)
{
    batch *b = req->data;
    kvr_sync *s = b->s;
    if (status == KVR_EIO || status == KVR_ENOMEM)
        io_error_step_down(s, status);
    /* unlink */
    batch **pp = &s->inflight;
    batch *prev = NULL;
    while (*pp && *pp != b) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (*pp) {
        *pp = b->next;
        if (s->inflight_tail == b)
            s->inflight_tail = prev;
        s->n_inflight--;
    }
    int64_t now_ns = s->o.hop_cb ? kvr_mono_ns() : 0;
    for (uint32_t i = 0; i < b->n; i++) {
        pending *p = b->items[i];
        if (status == 0 && p->have_res) {
            if (now_ns) {
                hop(s, KVR_SYNC_HOP_COMMIT, p->t_prop_ns, now_ns);
                p->t_commit_ns = now_ns;
            }
            p->status = 0;
            p->mode = KVR_SYNC_RAFT;
            pending_finish(s, p);
        } else if (s->closing) {
            p->status = KVR_ECLOSED;
            pending_finish(s, p);
        } else if (p->from) {
            /* tell the follower to retry (with the same request id) */
            p->status = KVR_EAGAIN;
            p->have_res = false;
            pending_finish(s, p);
        } else {
            p->state = P_WAIT; /* may or may not commit: retried, idempotent */
            p->have_res = false;
        }
    }
    batch_free(b);
}

/* Group commit: while max_inflight entries await their commit, new commands wait and go out
 * together in the next entry. Every entry costs an AppendEntries message to each follower, an
 * answer from each, and a disk write on every node, so under load this turns many small
 * entries into a few large ones, while an idle leader still proposes at once. An entry that
 * raft never answers (it should always, even on leadership loss) stops counting after a second
 * so a lost callback cannot stall proposals for good. */
static bool may_propose(kvr_sync *s)
{
    if (s->n_inflight < s->o.max_inflight)
        return true;
    return s->inflight && kvr_mono_ms() - s->inflight->proposed_ms > 1000;
}

static void coalesce_due(uv_timer_t *t);

/* True while the queue holds only lazy commands younger than coalesce_us (then the timer is
 * armed for the oldest one's deadline). */
static bool coalescing(kvr_sync *s)
{
    int64_t oldest = INT64_MAX;
    for (uint32_t i = 0; i < s->n_queue; i++) {
        if (!s->queue[i]->lazy)
            return false;
        if (s->queue[i]->t_queued_ns < oldest)
            oldest = s->queue[i]->t_queued_ns;
    }
    int64_t wait_ns = oldest + (int64_t)s->o.coalesce_us * 1000 - kvr_mono_ns();
    if (wait_ns <= 0)
        return false;
    if (!uv_is_active((uv_handle_t *)&s->coalesce))
        uv_timer_start(&s->coalesce, coalesce_due, (uint64_t)((wait_ns + 999999) / 1000000), 0);
    return true;
}

static void flush_batches(kvr_sync *s)
{
    if (s->n_queue > 0 && may_propose(s) && coalescing(s))
        return;
    while (s->n_queue > 0 && may_propose(s)) {
        uint32_t n = s->n_queue < s->o.max_batch ? s->n_queue : s->o.max_batch;
        batch *b = calloc(1, sizeof *b);
        kvr_buf e;
        kvr_buf_init(&e);
        if (!b || !(b->items = malloc(n * sizeof *b->items)))
            goto requeue;
        b->s = s;
        b->seq = ++s->next_seq;
        b->proposed_ms = kvr_mono_ms();
        int64_t now_ns = s->o.hop_cb ? kvr_mono_ns() : 0;
        if (kvr_entry_begin(&e, s->o.id, s->nonce, b->seq) != 0)
            goto requeue;
        for (uint32_t i = 0; i < n; i++) {
            pending *p = s->queue[i];
            if (kvr_entry_add(&e, 0, p->cmd, p->cmd_len) != 0)
                goto requeue;
            b->items[i] = p;
            if (now_ns) {
                hop(s, KVR_SYNC_HOP_QUEUE, p->t_queued_ns, now_ns);
                p->t_prop_ns = now_ns;
            }
        }
        b->n = n;
        b->req.data = b;
        int rc = kvr_consensus_propose(s->cons, &b->req, e.base, e.len, batch_cb);
        kvr_buf_free(&e);
        if (rc != 0) {
            batch_free(b);
            b = NULL;
            for (uint32_t i = 0; i < n; i++)
                s->queue[i]->state = P_WAIT; /* lost leadership: the tick re-dispatches */
        } else {
            s->m.proposals++;
            if (s->inflight_tail)
                s->inflight_tail->next = b;
            else
                s->inflight = b;
            s->inflight_tail = b;
            s->n_inflight++;
        }
        memmove(s->queue, s->queue + n, (s->n_queue - n) * sizeof *s->queue);
        s->n_queue -= n;
        continue;
    requeue:
        kvr_buf_free(&e);
        if (b)
            batch_free(b);
        for (uint32_t i = 0; i < s->n_queue; i++)
            s->queue[i]->state = P_WAIT;
        s->n_queue = 0;
        return;
    }
}

static void coalesce_due(uv_timer_t *t)
{
    kvr_sync *s = t->data;
    if (!s->closing)
        flush_batches(s);
}

static void enqueue_batch(kvr_sync *s, pending *p)
{
    if (s->n_queue == s->cap_queue) {
        uint32_t nc = s->cap_queue ? s->cap_queue * 2 : 1024;
        pending **nq = realloc(s->queue, nc * sizeof *nq);
        if (!nq) {
            p->state = P_WAIT;
            return;
        }
        s->queue = nq;
        s->cap_queue = nc;
    }
    s->queue[s->n_queue++] = p;
    p->state = P_BATCH;
    p->t_queued_ns = kvr_mono_ns();
    if (!p->t_in_ns)
        p->t_in_ns = p->t_queued_ns;
}

/* The FSM apply: every replica, every entry. */
typedef struct apply_ctx {
    kvr_sync *s;
    batch *b;
} apply_ctx;

static void on_result(void *data, uint32_t i, const kvr_fsm_result *res)
{
    apply_ctx *ax = data;
    ax->s->m.commands_applied++;
    /* The index is a function of the KV stream (routerd): the leader puts a down worker's
     * clear into that stream once the WORKER_DOWN is committed, never a router on its own. */
    if (res->type == KVR_CMD_WORKER_DOWN && res->down_seq != 0 && ax->s->o.worker_down_cb &&
        kvr_consensus_get_role(ax->s->cons) == KVR_ROLE_LEADER)
        ax->s->o.worker_down_cb(ax->s->o.worker_down_data, res->worker_id, res->down_seq);
    if (ax->b && i < ax->b->n) {
        pending *p = ax->b->items[i];
        p->res = *res;
        p->have_res = true;
    }
}

static void fsm_apply_cb(void *data, uint64_t index, const void *buf, size_t len)
{
    (void)index;
    kvr_sync *s = data;
    apply_ctx ax = {s, NULL};
    /* Find our own batch without decoding twice: the header is at a fixed place. */
    if (len >= KVR_ENTRY_HDR_LEN) {
        const uint8_t *h = buf;
        uint32_t origin = (uint32_t)h[4] | (uint32_t)h[5] << 8 | (uint32_t)h[6] << 16 | (uint32_t)h[7] << 24;
        uint64_t nonce = 0, seq = 0;
        for (int i = 0; i < 8; i++) {
            nonce |= (uint64_t)h[8 + i] << (8 * i);
            seq |= (uint64_t)h[16 + i] << (8 * i);
        }
        if (origin == s->o.id && nonce == s->nonce)
            for (batch *b = s->inflight; b; b = b->next)
                if (b->seq == seq) {
                    ax.b = b;
                    break;
                }
    }
    kvr_entry_header hdr;
    kvr_fsm_set_local_now(s->fsm, kvr_mono_ms()); /* local booking age (liveness.h) */
    if (kvr_entry_apply(s->fsm, buf, len, &hdr, on_result, &ax) != 0)
        KVR_LOG_WARN_RL(5, "sync malformed log entry ignored", "len=%zu head=%02x%02x%02x%02x", len,
                        len > 0 ? ((const uint8_t *)buf)[0] : 0, len > 1 ? ((const uint8_t *)buf)[1] : 0,
                        len > 2 ? ((const uint8_t *)buf)[2] : 0, len > 3 ? ((const uint8_t *)buf)[3] : 0);
    s->m.commits++;
    KVR_LOG_DEBUG("sync applied entry", "node=%u origin=%u seq=%llu commands=%u mine=%d bookings=%u",
                  s->o.id, hdr.origin, (unsigned long long)hdr.seq, hdr.count, ax.b != NULL,
                  kvr_fsm_booking_count(s->fsm));
}

static int fsm_snapshot_cb(void *data, kvr_buf *out)
{
    kvr_sync *s = data;
    return kvr_fsm_snapshot(s->fsm, out, NULL);
}

static int fsm_restore_cb(void *data, const void *buf, size_t len)
{
    kvr_sync *s = data;
    kvr_err e;
    int rc = kvr_fsm_restore(s->fsm, buf, len, &e);
    if (rc)
        KVR_LOG_ERROR("sync snapshot restore failed", "err=\"%s\"", e.msg);
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* Forwarding connections */

static void conn_closed(uv_handle_t *h)
{
    conn *c = h->data;
    kvr_sync *s = c->s;
    kvr_buf_free(&c->in);
    kvr_buf_free(&c->out);
    kvr_buf_free(&c->wbuf);
    free(c);
    s->handles_open--;
}

static void conn_close(conn *c)
{
    if (c->closing)
        return;
    kvr_sync *s = c->s;
    c->closing = true;
    if (c->authing) {
        c->authing = false;
        if (c->inbound)
            s->n_authing--;
    }
    c->tcp.data = c; /* the handshake may have pointed it at c->hs */
    /* unlink */
    for (conn **pp = &s->conns; *pp; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    for (int i = 0; i <= KVR_CONSENSUS_MAX_PEERS; i++)
        if (s->clients[i] == c)
            s->clients[i] = NULL;
    /* whoever waited on this connection retries or stops waiting */
    for (pending *p = s->head.next; p != &s->head; p = p->next) {
        if (p->from == c)
            p->from = NULL, p->internal = true; /* answer goes nowhere */
        if (p->via == c && p->state == P_FWD) {
            fwd_slot_clear(s, p);
            p->state = P_WAIT;
        }
    }
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)hint;
    conn *c = h->data;
    if (kvr_buf_reserve(&c->in, 65536) != 0) {
        buf->base = NULL;
        buf->len = 0;
        return;
    }
    buf->base = c->in.base + c->in.len;
    buf->len = c->in.cap - c->in.len;
}

static void handle_request(conn *c, kvr_mp_reader *r, uint32_t n)
{
    kvr_sync *s = c->s;
    uint64_t rpc;
    kvr_slice cmd;
    if (n < 3 || kvr_mp_read_uint(r, &rpc) || kvr_mp_read_bin(r, &cmd)) {
        KVR_LOG_WARN_RL(5, "sync malformed forwarded request", "peer=inbound");
        conn_close(c);
        return;
    }
    s->m.forwarded_in++;
    if (s->closing || kvr_consensus_get_role(s->cons) != KVR_ROLE_LEADER) {
        send_reply(c, rpc, KVR_EAGAIN, NULL);
        return;
    }
    pending *p = pending_new(s, cmd.base, cmd.len);
    if (!p) {
        send_reply(c, rpc, KVR_ENOMEM, NULL);
        return;
    }
    p->from = c;
    p->from_rpc = rpc;
    plist_add(s, p);
    enqueue_batch(s, p);
}

static void handle_reply(conn *c, kvr_mp_reader *r, uint32_t n)
{
    kvr_sync *s = c->s;
    uint64_t rpc, outcome, type, worker, overlap, blocks, freed;
    int64_t status;
    kvr_slice url;
    double cost = 0;
    if (n < 10 || kvr_mp_read_uint(r, &rpc) || kvr_mp_read_int(r, &status) ||
        kvr_mp_read_uint(r, &outcome) || kvr_mp_read_uint(r, &type) || kvr_mp_read_uint(r, &worker) ||
        kvr_mp_read_uint(r, &overlap) || kvr_mp_read_uint(r, &blocks) || kvr_mp_read_uint(r, &freed) ||
        kvr_mp_read_str(r, &url) || url.len > KVR_FSM_URL_MAX) {
        KVR_LOG_WARN_RL(5, "sync malformed forward reply", "peer=%u", c->peer);
        conn_close(c);
        return;
    }
    if (n >= 11)
        kvr_mp_read_double(r, &cost);
    pending *p = s->fwd_slots[rpc & (FWD_SLOTS - 1)];
    if (!p || p->rpc_id != rpc || p->state != P_FWD)
        return; /* late answer to a try we gave up on */
    fwd_slot_clear(s, p);
    if (status != 0) {
        p->state = P_WAIT; /* not leader any more, or it lost the entry: retry */
        s->m.forward_retries++;
        return;
    }
    int64_t now_ns = kvr_mono_ns();
    hop(s, KVR_SYNC_HOP_FORWARD, p->fwd_start_us * 1000, now_ns);
    s->m.forward_latency_us_sum += (uint64_t)(now_ns / 1000 - p->fwd_start_us);
    s->m.forward_latency_count++;
    memset(&p->res, 0, sizeof p->res);
    p->res.outcome = (kvr_outcome)outcome;
    p->res.type = (kvr_cmd_type)type;
    p->res.worker_id = worker;
    p->res.overlap = (uint32_t)overlap;
    p->res.request_blocks = (uint32_t)blocks;
    p->res.freed = (uint32_t)freed;
    p->res.cost = cost;
    memcpy(p->res.url, url.base, url.len);
    p->res.url[url.len] = 0;
    p->have_res = true;
    p->status = 0;
    p->mode = KVR_SYNC_RAFT;
    pending_finish(s, p);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    conn *c = st->data;
    if (nread < 0) {
        conn_close(c);
        return;
    }
    c->in.len += (size_t)nread;
    size_t off = 0;
    while (!c->closing && c->in.len - off >= 4) {
        uint32_t len = get_be32((const uint8_t *)c->in.base + off);
        if (len > FWD_MAX_FRAME) {
            KVR_LOG_WARN_RL(5, "sync forward frame too large", "len=%u", len);
            conn_close(c);
            return;
        }
        if (c->in.len - off - 4 < len)
            break;
        kvr_mp_reader r;
        kvr_mp_reader_init(&r, c->in.base + off + 4, len);
        off += 4 + len;
        uint32_t n;
        uint64_t kind;
        if (kvr_mp_read_array(&r, &n) || n < 1 || kvr_mp_read_uint(&r, &kind)) {
            conn_close(c);
            return;
        }
        if (kind == RPC_REQ && c->inbound)
            handle_request(c, &r, n);
        else if (kind == RPC_REP && !c->inbound)
            handle_reply(c, &r, n);
        else {
            conn_close(c);
            return;
        }
    }
    if (!c->closing)
        kvr_buf_consume(&c->in, off);
}

static void on_write(uv_write_t *w, int status)
{
    conn *c = w->data;
    c->writing = false;
    c->wbuf.len = 0;
    if (status < 0) {
        conn_close(c);
        return;
    }
    if (c->out.len && !c->closing)
        conn_flush(c);
}

static void conn_flush(conn *c)
{
    if (c->closing || c->writing || !c->connected || c->out.len == 0)
        return;
    /* Most of the time the socket takes everything at once: then there is no write request
     * whose callback (next loop turn) must run before the following frames can go. */
    uv_buf_t tb = uv_buf_init(c->out.base, (unsigned)c->out.len);
    int n = uv_try_write((uv_stream_t *)&c->tcp, &tb, 1);
    if (n < 0 && n != UV_EAGAIN) {
        conn_close(c);
        return;
    }
    if (n > 0)
        kvr_buf_consume(&c->out, (size_t)n);
    if (c->out.len == 0)
        return;
    /* swap out → wbuf so new frames can accumulate while this write is in flight */
    kvr_buf t = c->wbuf;
    c->wbuf = c->out;
    c->out = t;
    c->out.len = 0;
    uv_buf_t b = uv_buf_init(c->wbuf.base, (unsigned)c->wbuf.len);
    c->wreq.data = c;
    if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_write) != 0) {
        conn_close(c);
        return;
    }
    c->writing = true;
}

static conn *conn_new(kvr_sync *s, bool inbound)
{
    conn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->s = s;
    c->inbound = inbound;
    kvr_buf_init(&c->in);
    kvr_buf_init(&c->out);
    kvr_buf_init(&c->wbuf);
    uv_tcp_init(s->loop, &c->tcp);
    c->tcp.data = c;
    s->handles_open++;
    c->next = s->conns;
    s->conns = c;
    return c;
}

static void on_auth_done(kvr_auth_hs *hs, int status)
{
    conn *c = hs->data;
    kvr_sync *s = c->s;
    c->authing = false;
    if (c->inbound)
        s->n_authing--;
    if (status != 0) {
        if (c->inbound) {
            s->auth_refused++;
            KVR_LOG_WARN_RL(5, "sync forward port: peer refused, failed authentication",
                            "error=\"%s\"", kvr_strerror(status));
        } else {
            KVR_LOG_WARN_RL(5, "sync forward: leader failed authentication", "peer=%u error=\"%s\"",
                            c->peer, kvr_strerror(status));
        }
        conn_close(c);
        return;
    }
    c->connected = true;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    conn_flush(c);
}

static void on_accept(uv_stream_t *server, int status)
{
    kvr_sync *s = server->data;
    if (status < 0 || s->closing)
        return;
    conn *c = conn_new(s, true);
    if (!c)
        return;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    if (s->key.len) {
        /* Not one byte of a forwarded command is parsed before the peer proved the cluster
         * secret (defect 2: a raw EXPIRE here freed every booking on every replica). */
        if (s->n_authing >= FWD_MAX_AUTHING) {
            s->auth_refused++;
            KVR_LOG_WARN_RL(5, "sync forward port: too many handshakes at once, closing", "max=%d",
                            FWD_MAX_AUTHING);
            conn_close(c);
            return;
        }
        c->hs.data = c;
        if (kvr_auth_start(&c->hs, (uv_stream_t *)&c->tcp, &s->key, true, KVR_AUTH_CTX_FORWARD, 0,
                           NULL, on_auth_done) != 0) {
            conn_close(c);
            return;
        }
        c->authing = true;
        s->n_authing++;
        return;
    }
    c->connected = true;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

typedef struct connect_req {
    uv_connect_t req;
    conn *c;
} connect_req;

static void on_connect(uv_connect_t *req, int status)
{
    connect_req *cr = (connect_req *)req;
    conn *c = cr->c;
    free(cr);
    if (c->closing)
        return;
    if (status < 0) {
        KVR_LOG_DEBUG("sync forward connect failed", "peer=%u err=%s", c->peer, uv_strerror(status));
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    if (c->s->key.len) {
        /* frames queued meanwhile stay in c->out until the leader proved the secret too */
        c->hs.data = c;
        if (kvr_auth_start(&c->hs, (uv_stream_t *)&c->tcp, &c->s->key, false, KVR_AUTH_CTX_FORWARD,
                           c->s->o.id, c->s->raft_addr, on_auth_done) != 0) {
            conn_close(c);
            return;
        }
        c->authing = true;
        return;
    }
    c->connected = true;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    conn_flush(c);
}

/* host:port of a raft address → sockaddr of its forwarding port (port + 1). */
static int fwd_sockaddr(const char *raft_addr, struct sockaddr_in *sa)
{
    char host[64];
    const char *colon = strrchr(raft_addr, ':');
    if (!colon || (size_t)(colon - raft_addr) >= sizeof host)
        return KVR_EINVAL;
    memcpy(host, raft_addr, (size_t)(colon - raft_addr));
    host[colon - raft_addr] = 0;
    long port = strtol(colon + 1, NULL, 10);
    if (port <= 0 || port >= 65535)
        return KVR_EINVAL;
    return uv_ip4_addr(host, (int)port + 1, sa) == 0 ? 0 : KVR_EINVAL;
}

static conn *client_for(kvr_sync *s, uint32_t peer, const char *raft_addr)
{
    int slot = (int)(peer % (KVR_CONSENSUS_MAX_PEERS + 1));
    conn *c = s->clients[slot];
    if (c && c->peer == peer)
        return c;
    if (c)
        conn_close(c);
    struct sockaddr_in sa;
    if (!raft_addr || fwd_sockaddr(raft_addr, &sa) != 0)
        return NULL;
    c = conn_new(s, false);
    if (!c)
        return NULL;
    c->peer = peer;
    connect_req *cr = calloc(1, sizeof *cr);
    if (!cr) {
        conn_close(c);
        return NULL;
    }
    cr->c = c;
    if (uv_tcp_connect(&cr->req, &c->tcp, (const struct sockaddr *)&sa, on_connect) != 0) {
        free(cr);
        conn_close(c);
        return NULL;
    }
    s->clients[slot] = c;
    return c;
}

static void forward(kvr_sync *s, pending *p, uint32_t leader, const char *leader_addr)
{
    uint64_t rpc = ++s->next_rpc;
    uint32_t slot = (uint32_t)(rpc & (FWD_SLOTS - 1));
    if (s->fwd_slots[slot]) {
        p->state = P_WAIT; /* 65536 forwards in flight: wait for a slot */
        return;
    }
    conn *c = client_for(s, leader, leader_addr);
    if (!c) {
        p->state = P_WAIT;
        return;
    }
    size_t at = frame_begin(c);
    if (at == (size_t)-1) {
        p->state = P_WAIT;
        return;
    }
    int rc = kvr_mp_write_array(&c->out, 3);
    rc |= kvr_mp_write_uint(&c->out, RPC_REQ);
    rc |= kvr_mp_write_uint(&c->out, rpc);
    rc |= kvr_mp_write_bin(&c->out, p->cmd, p->cmd_len);
    if (rc) {
        c->out.len = at;
        p->state = P_WAIT;
        return;
    }
    frame_end(c, at);
    s->fwd_slots[slot] = p;
    p->rpc_id = rpc;
    p->via = c;
    p->state = P_FWD;
    p->fwd_start_us = kvr_mono_ns() / 1000;
    p->try_deadline_ms = kvr_mono_ms() + s->o.forward_timeout_ms;
    s->m.forwards++;
}

/* ---------------------------------------------------------------------------------------- */
/* Dispatch */

static void dispatch(kvr_sync *s, pending *p)
{
    if (s->degraded && !p->internal) {
        apply_local(s, p);
        return;
    }
    kvr_consensus_role role = kvr_consensus_get_role(s->cons);
    if (role == KVR_ROLE_LEADER) {
        enqueue_batch(s, p);
        return;
    }
    const char *addr = NULL;
    uint32_t leader = kvr_consensus_leader(s->cons, &addr);
    if (leader && leader != s->o.id && addr) {
        forward(s, p, leader, addr);
        return;
    }
    p->state = P_WAIT;
}

static void submit_internal(kvr_sync *s, const kvr_cmd *cmd)
{
    kvr_buf b;
    kvr_buf_init(&b);
    pending *p;
    if (kvr_cmd_encode(cmd, &b, NULL) == 0 && (p = pending_new(s, b.base, b.len))) {
        p->internal = true;
        plist_add(s, p);
        dispatch(s, p);
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
            conn_close(c);
        }
    }
    uint32_t leader = kvr_consensus_leader(s->cons, NULL);
    bool is_leader = kvr_consensus_get_role(s->cons) == KVR_ROLE_LEADER;
    if (is_leader != s->was_leader) {
        s->was_leader = is_leader;
        kvr_lease_set_leader(&s->leases, is_leader, now);
        kvr_live_set_leader(&s->live, is_leader, now);
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
            reconcile(s);
        housekeeping(s, now);
    }
    /* Retry, time out, or answer locally. Newly reconciled commands sit at the list's tail. */
    for (pending *p = s->head.next, *nx; p != &s->head; p = nx) {
        nx = p->next;
        if (p->state == P_FWD && now >= p->try_deadline_ms) {
            fwd_slot_clear(s, p);
            p->state = P_WAIT;
            s->m.forward_retries++;
        }
        if (p->state != P_WAIT)
            continue;
        if (p->from) { /* a follower's command we could not propose: it retries elsewhere */
            p->status = KVR_EAGAIN;
            pending_ready(s, p);
            continue;
        }
        bool expired =
            now - p->start_ms >= (p->reconcile ? RECONCILE_WAIT_MS : (int64_t)s->o.max_wait_ms);
        if (p->internal && expired) {
            p->status = KVR_ETIMEDOUT;
            pending_ready(s, p);
            continue;
        }
        /* Locally only without a quorum: a group that has a leader decides every command,
         * and a command applied to this node's copy alone (then re-proposed) while the group
         * commits others is how replicas drifted apart with a full disk. A late command is
         * answered as timed out; its caller retries or falls back. */
        if (!p->internal && s->degraded) {
            apply_local(s, p);
            continue;
        }
        if (!p->internal && expired) {
            p->status = KVR_ETIMEDOUT;
            pending_ready(s, p);
            continue;
        }
        dispatch(s, p);
    }
}

static void on_check(uv_check_t *h)
{
    kvr_sync *s = h->data;
    /* answers ready from local mode / errors */
    for (pending *p = s->head.next, *nx; p != &s->head; p = nx) {
        nx = p->next;
        if (p->state == P_DONE)
            pending_finish(s, p);
    }
    for (conn *c = s->conns; c; c = c->next)
        conn_flush(c);
}

/* Proposals go out just before the loop sleeps, one phase after the answers: the check phase
 * has flushed the forwarded replies (on_check) and NATS replies (kvr_nats_core flushes there
 * too) before the next entry costs the leader a disk submission and two AppendEntries sends.
 * Nothing waits longer for it: the loop goes from here straight to polling. */
static void on_prepare(uv_prepare_t *h)
{
    kvr_sync *s = h->data;
    if (!s->closing)
        flush_batches(s);
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
    s->cfsm = (kvr_consensus_fsm){s, fsm_apply_cb, fsm_snapshot_cb, fsm_restore_cb};
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
    if (fwd_sockaddr(s->raft_addr, &sa) != 0)
        return kvr_err_set(err, KVR_EINVAL, "sync: bad raft address \"%s\"", s->raft_addr);
    int rc = wait_ports_free(s, &sa, err);
    if (rc != 0)
        return rc;
    rc = uv_tcp_bind(&s->listener, (const struct sockaddr *)&sa, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&s->listener, 128, on_accept);
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
    pending *p = pending_new(s, cmd, len);
    if (!p)
        return KVR_ENOMEM;
    p->cb = cb;
    p->data = data;
    plist_add(s, p);
    dispatch(s, p);
    return 0;
}

int kvr_sync_submit(kvr_sync *s, const kvr_cmd *cmd, kvr_sync_cb cb, void *data)
{
    kvr_buf b;
    kvr_buf_init(&b);
    int rc = kvr_cmd_encode(cmd, &b, NULL);
    if (rc == 0)
        rc = submit_bytes(s, b.base, b.len, cb, data);
    kvr_buf_free(&b);
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
            pending_finish(s, b->items[i]);
        }
        batch_free(b);
    }
    s->n_inflight = 0;
    uv_close((uv_handle_t *)&s->tick, handle_closed);
    uv_close((uv_handle_t *)&s->check, handle_closed);
    uv_close((uv_handle_t *)&s->prep, handle_closed);
    uv_close((uv_handle_t *)&s->coalesce, handle_closed);
    uv_close((uv_handle_t *)&s->listener, handle_closed);
    while (s->conns)
        conn_close(s->conns);
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
        pending_finish(s, p);
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

/* --- membership --- */

typedef struct change_ctx {
    kvr_consensus_change req;
    kvr_consensus_transfer treq;
    kvr_sync *s;
    kvr_sync_change_cb cb;
    void *data;
} change_ctx;

static void change_done(kvr_consensus_change *req, int status)
{
    change_ctx *cx = req->data;
    if (cx->cb)
        cx->cb(cx->s, status, cx->data);
    free(cx);
}

static change_ctx *change_new(kvr_sync *s, kvr_sync_change_cb cb, void *data)
{
    change_ctx *cx = calloc(1, sizeof *cx);
    if (!cx)
        return NULL;
    cx->s = s;
    cx->cb = cb;
    cx->data = data;
    cx->req.cb = change_done;
    cx->req.data = cx;
    return cx;
}

static int not_leader(kvr_sync *s, uint32_t *leader)
{
    if (s->closing || !s->cons)
        return KVR_ECLOSED;
    if (kvr_consensus_get_role(s->cons) == KVR_ROLE_LEADER)
        return 0;
    if (leader)
        *leader = kvr_consensus_leader(s->cons, NULL);
    return KVR_EAGAIN;
}

int kvr_sync_add_node(kvr_sync *s, uint32_t id, const char *raft_addr, kvr_sync_change_cb cb,
                      void *data, uint32_t *leader)
{
    int rc = not_leader(s, leader);
    if (rc)
        return rc;
    change_ctx *cx = change_new(s, cb, data);
    if (!cx)
        return KVR_ENOMEM;
    if ((rc = kvr_consensus_add(s->cons, &cx->req, id, raft_addr)) != 0)
        free(cx);
    return rc;
}

int kvr_sync_promote_node(kvr_sync *s, uint32_t id, kvr_sync_change_cb cb, void *data,
                          uint32_t *leader)
{
    int rc = not_leader(s, leader);
    if (rc)
        return rc;
    change_ctx *cx = change_new(s, cb, data);
    if (!cx)
        return KVR_ENOMEM;
    if ((rc = kvr_consensus_assign_voter(s->cons, &cx->req, id)) != 0)
        free(cx);
    return rc;
}

int kvr_sync_remove_node(kvr_sync *s, uint32_t id, kvr_sync_change_cb cb, void *data,
                         uint32_t *leader)
{
    int rc = not_leader(s, leader);
    if (rc)
        return rc;
    change_ctx *cx = change_new(s, cb, data);
    if (!cx)
        return KVR_ENOMEM;
    if ((rc = kvr_consensus_remove(s->cons, &cx->req, id)) != 0)
        free(cx);
    return rc;
}

static void transfer_done(kvr_consensus_transfer *req)
{
    change_ctx *cx = req->data;
    uint32_t leader = cx->s->cons ? kvr_consensus_leader(cx->s->cons, NULL) : 0;
    if (cx->cb)
        cx->cb(cx->s, leader && leader != cx->s->o.id ? 0 : KVR_EAGAIN, cx->data);
    free(cx);
}

int kvr_sync_transfer(kvr_sync *s, uint32_t id, kvr_sync_change_cb cb, void *data)
{
    int rc = not_leader(s, NULL);
    if (rc)
        return rc;
    change_ctx *cx = change_new(s, cb, data);
    if (!cx)
        return KVR_ENOMEM;
    cx->treq.cb = transfer_done;
    cx->treq.data = cx;
    if ((rc = kvr_consensus_transfer_leadership(s->cons, &cx->treq, id)) != 0)
        free(cx);
    return rc;
}
