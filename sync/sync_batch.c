/* sync_batch: the leader's side of proposing. Commands queue for the next Raft entry (entry.h),
 * lazy ones (FREE, PREFILL_DONE) may wait coalesce_us for company, entries are proposed from the
 * prepare phase, and the committed entries' apply (on every replica) answers the pending
 * commands and records hop metrics. Also the consensus FSM callbacks (apply, snapshot,
 * restore). Loop thread only (sync_int.h). */
#include "sync_int.h"

#include "kvr_log.h"

#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>

/* ---------------------------------------------------------------------------------------- */
/* Leader side: batching */

void sync_batch_free(batch *b)
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

/* sync.h log_fenced_cb. A failed append fences the disk log (disklog.h): raft writes nothing
 * more, so the node applies nothing more, until a leader's snapshot lifts the fence or the
 * process restarts and raft reloads its files (contiguous up to the last good write). A term
 * or vote not stored mutes the node (termguard.h) until a restart; kvr_consensus_log_fenced
 * reports both. The owner is told once the fence has stood LOG_FENCED_MS (a snapshot already
 * on its way may lift it) and the data dir has LOG_FENCED_MIN_FREE free: with less, a reload
 * would fail the same way. */
#define LOG_FENCED_MS 1000
#define LOG_FENCED_MIN_FREE ((uint64_t)32 << 20)

void sync_check_log_fenced(kvr_sync *s, int64_t now)
{
    if (s->fenced_told || !s->cons)
        return;
    if (!kvr_consensus_log_fenced(s->cons)) {
        s->fenced_since_ms = 0;
        return;
    }
    if (!s->fenced_since_ms)
        s->fenced_since_ms = now;
    if (now - s->fenced_since_ms < LOG_FENCED_MS)
        return;
    struct statvfs sv;
    if (statvfs(s->data_dir, &sv) != 0 || (uint64_t)sv.f_bavail * sv.f_frsize < LOG_FENCED_MIN_FREE)
        return;
    s->fenced_told = true;
    KVR_LOG_ERROR("sync raft log fenced since a failed write: it needs a reload",
                  "seconds=%lld applied=%llu commit=%llu",
                  (long long)(now - s->fenced_since_ms) / 1000,
                  (unsigned long long)kvr_consensus_applied_index(s->cons),
                  (unsigned long long)kvr_consensus_commit_index(s->cons));
    if (s->o.log_fenced_cb)
        s->o.log_fenced_cb(s->o.log_fenced_data);
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
                sync_hop(s, KVR_SYNC_HOP_COMMIT, p->t_prop_ns, now_ns);
                p->t_commit_ns = now_ns;
            }
            p->status = 0;
            p->mode = KVR_SYNC_RAFT;
            sync_pending_finish(s, p);
        } else if (s->closing) {
            p->status = KVR_ECLOSED;
            sync_pending_finish(s, p);
        } else if (p->from) {
            /* tell the follower to retry (with the same request id) */
            p->status = KVR_EAGAIN;
            p->have_res = false;
            sync_pending_finish(s, p);
        } else {
            p->state = P_WAIT; /* may or may not commit: retried, idempotent */
            p->have_res = false;
        }
    }
    sync_batch_free(b);
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

void sync_flush_batches(kvr_sync *s)
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
                sync_hop(s, KVR_SYNC_HOP_QUEUE, p->t_queued_ns, now_ns);
                p->t_prop_ns = now_ns;
            }
        }
        b->n = n;
        b->req.data = b;
        int rc = kvr_consensus_propose(s->cons, &b->req, e.base, e.len, batch_cb);
        kvr_buf_free(&e);
        if (rc != 0) {
            sync_batch_free(b);
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
            sync_batch_free(b);
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
        sync_flush_batches(s);
}

void sync_enqueue_batch(kvr_sync *s, pending *p)
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

void sync_fsm_apply_cb(void *data, uint64_t index, const void *buf, size_t len)
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

int sync_fsm_snapshot_cb(void *data, kvr_buf *out)
{
    kvr_sync *s = data;
    return kvr_fsm_snapshot(s->fsm, out, NULL);
}

int sync_fsm_restore_cb(void *data, const void *buf, size_t len)
{
    kvr_sync *s = data;
    kvr_err e;
    int rc = kvr_fsm_restore(s->fsm, buf, len, &e);
    if (rc)
        KVR_LOG_ERROR("sync snapshot restore failed", "err=\"%s\"", e.msg);
    return rc;
}
