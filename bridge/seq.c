/* kvr-bridge: sequence and replay tracking (bridge_priv.h). Every batch the engine sends
 * is forwarded once, in order; what cannot be had again clears the worker first. */
#include "bridge_priv.h"
#include "kvr_err.h"
#include "kvr_log.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

/* ------------------------------------------------------------------ publishing */

void br_publish_clear(rank *rk, const char *why)
{
    bridge *br = rk->br;
    js_outbox_drop_queued(&rk->ob);
    rk->clears++;
    KVR_LOG_WARN("publishing AllBlocksCleared", "worker=%" PRIu64 " why=\"%s\"", rk->wid, why);
    if (kvr_bridge_encode_clear(&br->enc, (double)kvr_now_ms() / 1000.0, rk->r) != 0 ||
        js_outbox_push(&rk->ob, br->enc.base, br->enc.len) != 0)
        KVR_LOG_ERROR("cannot queue AllBlocksCleared", "worker=%" PRIu64, rk->wid);
}

void br_on_loss(js_outbox *ob, int status, void *data)
{
    br_publish_clear(data, "a JetStream publish failed");
}

/* Validates one batch and queues it for JetStream. */
static void forward(rank *rk, const void *p, size_t len)
{
    bridge *br = rk->br;
    kvr_bridge_check res;
    kvr_err err = {0};
    if (kvr_bridge_check_batch(&br->dec, p, len, &br->out, &br->scratch, &res, &err) != 0) {
        rk->garbage++;
        KVR_LOG_WARN_RL(5, "garbage batch dropped", "worker=%" PRIu64 " err=\"%s\"", rk->wid,
                        err.msg);
        return;
    }
    rk->batches++;
    rk->events += res.good;
    rk->bad_events += res.bad;
    if (res.bad)
        KVR_LOG_WARN_RL(5, "bad events dropped from a batch", "worker=%" PRIu64 " bad=%u good=%u",
                        rk->wid, res.bad, res.good);
    if (res.good == 0)
        return;
    const void *d = res.rewritten ? br->out.base : p;
    size_t n = res.rewritten ? br->out.len : len;
    if (js_outbox_push(&rk->ob, d, n) != 0)
        br_publish_clear(rk, "outbox full");
}

/* ------------------------------------------------------------------ sequence tracking */

void br_pending_free(rank *rk)
{
    while (rk->ph) {
        pending *p = rk->ph;
        rk->ph = p->next;
        free(p);
    }
    rk->pt = NULL;
    rk->pending_bytes = 0;
}

/* A batch in order after a replay (or when no replay can be had): anything skipped is lost. */
static void accept_final(rank *rk, uint64_t seq, const void *p, size_t len)
{
    if (rk->known && seq < rk->next)
        return; /* already forwarded (replay and live overlap) */
    if (rk->known && seq > rk->next) {
        rk->gaps++;
        br_publish_clear(rk, "batches lost (not in the replay buffer)");
    }
    rk->known = true;
    rk->next = seq + 1;
    forward(rk, p, len);
}

/* Ends a replay and forwards the live batches queued behind it. A replay answer is the
 * engine's buffer when it read the request: a batch dropped after that (a tail probe or an
 * earlier gap's request was out when it was published) is neither in the answer nor in the
 * queue, yet still in the engine's buffer. So a gap among the queued batches is asked for
 * once more (`may_reask`: the socket answered) before it is counted lost and clears the worker. */
static void replay_done(rank *rk, bool may_reask)
{
    /* one line per replay (rare): a cleared worker's log then tells what each answer held */
    KVR_LOG_INFO("replay done",
                 "worker=%" PRIu64 " from=%" PRIu64 " batches=%" PRIu64 " next=%" PRIu64
                 " answered=%d queued=%s",
                 rk->wid, rk->replay_from, rk->replay_got, rk->next, may_reask,
                 rk->ph ? "yes" : "no");
    rk->replaying = false;
    uv_timer_stop(&rk->replay_timer);
    pending *p = rk->ph, *tail = rk->pt;
    rk->ph = rk->pt = NULL;
    rk->pending_bytes = 0;
    while (p) {
        if (may_reask && rk->dealer && rk->known && p->seq > rk->next &&
            !(rk->reasked && rk->reasked_at == rk->next)) {
            rk->reasked = true;
            rk->reasked_at = rk->next;
            KVR_LOG_INFO("gap behind a replay: asking again",
                         "worker=%" PRIu64 " from=%" PRIu64 " to=%" PRIu64, rk->wid, rk->next,
                         p->seq);
            br_start_replay(rk, rk->next);
            if (rk->replaying) {
                rk->ph = p; /* still queued, in order, behind the new request */
                rk->pt = tail;
                for (pending *q = p; q; q = q->next)
                    rk->pending_bytes += q->len;
                return;
            }
        }
        pending *nx = p->next;
        accept_final(rk, p->seq, p->data, p->len);
        free(p);
        p = nx;
    }
}

static void on_replay_timeout(uv_timer_t *t)
{
    rank *rk = t->data;
    KVR_LOG_WARN("replay: no (complete) answer in time", "worker=%" PRIu64 " endpoint=%s", rk->wid,
                 rk->replay_ep);
    /* A late answer must not be read as the answer to the next request: new socket. A replay
     * socket that does not answer is not probed again (each probe would hold live batches
     * back for the whole timeout). */
    rk->probes_left = 0;
    br_open_dealer(rk);
    replay_done(rk, false);
}

void br_start_replay(rank *rk, uint64_t from)
{
    uint8_t s[8];
    for (int i = 0; i < 8; i++)
        s[i] = (uint8_t)(from >> (56 - 8 * i));
    /* vLLM's ROUTER wants exactly [identity, "", start_seq]: the DEALER sends ["", seq]. */
    if (zmq_send(rk->dealer, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(rk->dealer, s, 8, ZMQ_DONTWAIT) < 0) {
        KVR_LOG_WARN("replay request not sent", "worker=%" PRIu64 " err=\"%s\"", rk->wid,
                     zmq_strerror(zmq_errno()));
        rk->known = true;
        rk->next = from;
        return; /* accept_final will see the gap */
    }
    rk->replays++;
    rk->replaying = true;
    rk->replay_from = from;
    rk->replay_got = 0;
    rk->known = true;
    rk->next = from;
    uv_timer_start(&rk->replay_timer, on_replay_timeout, (uint64_t)rk->br->replay_timeout_ms, 0);
    /* ZMQ_FD is edge-triggered and a send can consume the edge, so the dealer must be read
     * again without a wake-up, but not here: the answer can already be in, and reading it now
     * would end this replay inside the caller, before the caller queued the live batch that
     * asked for it (which then cleared the worker as unrecoverable; bridge_path under ASan). */
    br_drain_soon(rk->br);
}

/* A replay from seq 0 (bridge start, engine restart) races the SUB's (re)connection: what the
 * engine publishes after answering the replay and before the SUB is connected again is dropped
 * by its PUB, and when nothing follows, no live seq ever shows the gap. So ask the replay
 * socket again from `next`, 1, 2 and 3 s later: nothing missing costs an empty answer. */
#define TAIL_PROBES 3

static void on_probe(uv_timer_t *t)
{
    rank *rk = t->data;
    if (rk->probes_left <= 0 || !rk->dealer) {
        uv_timer_stop(t);
        return;
    }
    if (rk->replaying || !rk->known)
        return; /* the next tick asks */
    rk->probes_left--;
    br_start_replay(rk, rk->next);
}

void br_probe_tail(rank *rk)
{
    rk->probes_left = TAIL_PROBES;
    uv_timer_start(&rk->probe_timer, on_probe, 1000, 1000);
}

void br_hold_begin(bridge *br)
{
    if (br->hold)
        return;
    br->hold = true;
    br->hold_until_ms = kvr_mono_ms() + 5000;
    br->hold_start_s = br->sent_start_s;
    for (int i = 0; i < br->n; i++)
        js_outbox_pause(&br->ranks[i].ob);
}

/* The engine restarted and no live batch said so: its PUB drops what it sends before our SUB
 * has reconnected, so a short burst after the restart can be all it published. Ask its
 * replay buffer for everything from seq 0, behind an AllBlocksCleared for the old engine. */
void br_resync_from_zero(rank *rk)
{
    rk->restarts++;
    if (rk->replaying) {
        br_open_dealer(rk); /* the old request's answer must not be read as this one's */
        rk->replaying = false;
        uv_timer_stop(&rk->replay_timer);
    }
    br_pending_free(rk);
    rk->have_live = false; /* the new engine numbers from 0 */
    br_publish_clear(rk, "engine restarted (its start time changed)");
    if (rk->dealer) {
        br_start_replay(rk, 0);
        br_probe_tail(rk);
    } else {
        rk->known = false; /* the next live batch starts the count */
    }
}

void br_on_live(rank *rk, uint64_t seq, const void *p, size_t len)
{
    /* strictly below: br_on_live queues a batch behind a replay by calling itself again */
    bool went_back = rk->have_live && seq < rk->last_live;
    rk->have_live = true;
    rk->last_live = seq;
    if (went_back && rk->replaying) {
        /* The engine restarted while a replay was out: the answer, and the live batches
         * queued behind it, are numbered like the old engine's; the restart branch below
         * clears the worker and replays the new engine from 0. */
        KVR_LOG_WARN("live seq went back during a replay",
                     "worker=%" PRIu64 " seq=%" PRIu64 " last=%" PRIu64, rk->wid, seq,
                     rk->last_live);
        br_open_dealer(rk);
        rk->replaying = false;
        uv_timer_stop(&rk->replay_timer);
        br_pending_free(rk);
        rk->known = true;
        rk->next = seq + 1;
    }
    if (rk->replaying) {
        if (rk->pending_bytes + len > MAX_PENDING_BYTES) {
            KVR_LOG_WARN("replay too slow: live batches over the bound", "worker=%" PRIu64,
                         rk->wid);
            br_open_dealer(rk);
            rk->replaying = false;
            uv_timer_stop(&rk->replay_timer);
            br_pending_free(rk);
            rk->known = false;
            br_publish_clear(rk, "replay overrun");
        } else {
            pending *q = malloc(sizeof *q + len);
            if (q) {
                q->next = NULL;
                q->seq = seq;
                q->len = len;
                memcpy(q->data, p, len);
                if (rk->pt)
                    rk->pt->next = q;
                else
                    rk->ph = q;
                rk->pt = q;
                rk->pending_bytes += len;
                return;
            }
        }
    }
    if (!rk->known) {
        rk->known = true;
        rk->next = seq;
    }
    if (seq < rk->next) {
        /* The live stream never repeats a seq: it went back, the engine restarted. */
        rk->restarts++;
        br_hold_begin(rk->br);
        br_publish_clear(rk, "engine restarted (seq went back)");
        rk->next = 0; /* what the new engine sent before this batch is asked for below */
    }
    if (seq > rk->next) {
        rk->gaps++;
        if (rk->dealer) {
            KVR_LOG_INFO("gap: asking for a replay",
                         "worker=%" PRIu64 " from=%" PRIu64 " to=%" PRIu64, rk->wid, rk->next, seq);
            uint64_t from = rk->next;
            br_start_replay(rk, from);
            if (rk->replaying) {
                br_on_live(rk, seq, p, len); /* queued behind the replay */
                return;
            }
        }
        br_publish_clear(rk, "batches lost and no replay socket");
    }
    rk->next = seq + 1;
    forward(rk, p, len);
}

void br_on_replayed(rank *rk, uint64_t seq, const void *p, size_t len)
{
    if (!rk->replaying)
        return; /* stale */
    rk->replayed++;
    /* silence, not total time, ends a replay (uv_timer_again would stop a one-shot timer) */
    uv_timer_start(&rk->replay_timer, on_replay_timeout, (uint64_t)rk->br->replay_timeout_ms, 0);
    if (seq == KVR_BRIDGE_SEQ_END) {
        replay_done(rk, true);
        return;
    }
    rk->replay_got++;
    accept_final(rk, seq, p, len);
}
