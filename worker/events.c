/* worker/events.c: kvr-worker's KV events and heartbeats on NATS (DESIGN 3, 4). Loop thread. */
#include "worker.h"

/* KV event publish contract (docs/DESIGN.md "KV events"): every payload is a JetStream
 * publish to kvr.kv.<ns>.<id> with Nats-Msg-Id "<id>-<started_ms>-<event seq>", kept in the
 * outbox until the stream acknowledges it. Up to EV_WINDOW publishes are in flight at once (they
 * leave in order on one connection); a timeout, no-responders or JetStream error puts the entry
 * back and pauses sending for a backoff, after which everything unacknowledged is sent again
 * in order (the stream drops the ones it already holds by their id). Entries leave the outbox
 * in event order once acked; if the stream sequences of our own events are not increasing
 * in that order (a retry landed after a later event), the routers may have applied them out
 * of order and a resync (AllBlocksCleared + the whole cache) repairs it. An outbox over
 * --event-buffer-max is dropped for a resync too. */
#define EV_WINDOW 256
#define EV_ACK_TIMEOUT_MS 2000
#define EV_BACKOFF_MIN_MS 50
#define EV_BACKOFF_MAX_MS 2000

static struct ev_entry *ob_at(worker *w, size_t i)
{
    return &w->ob[(w->ob_head + i) & (w->ob_cap - 1)];
}

void wk_ev_buffer_drop(worker *w)
{
    for (size_t i = 0; i < w->ob_n; i++)
        kvr_buf_free(&ob_at(w, i)->b);
    /* acks still in flight carry sequences below ob_seq now: ignored */
    w->ob_seq += w->ob_n;
    w->ob_head = w->ob_n = w->ob_scan = w->ob_inflight = 0;
    kvr_metric_set(w->m_evbuf, 0, 0);
}

static void ev_pump(worker *w);
static void ev_maybe_resync(worker *w);

static void on_retry_timer(uv_timer_t *t)
{
    worker *w = t->data;
    w->retry_wait = false;
    ev_maybe_resync(w);
    ev_pump(w);
}

static void ev_schedule_retry(worker *w)
{
    if (w->retry_wait || w->closing)
        return;
    w->retry_wait = true;
    if (w->backoff_ms < EV_BACKOFF_MIN_MS)
        w->backoff_ms = EV_BACKOFF_MIN_MS;
    uint32_t d = w->backoff_ms + (uint32_t)(rand() % (int)(w->backoff_ms / 4 + 1));
    uv_timer_start(&w->retry_timer, on_retry_timer, d, 0);
    w->backoff_ms = w->backoff_ms * 2 > EV_BACKOFF_MAX_MS ? EV_BACKOFF_MAX_MS : w->backoff_ms * 2;
}

static void on_puback(int status, uint64_t stream_seq, bool duplicate, void *cbdata)
{
    worker *w = &W; /* the one worker of this process; cbdata carries the event sequence */
    uint64_t ev = (uint64_t)(uintptr_t)cbdata;
    (void)duplicate;
    if (ev < w->ob_seq || ev - w->ob_seq >= w->ob_n)
        return; /* the outbox was dropped since */
    size_t i = (size_t)(ev - w->ob_seq);
    struct ev_entry *e = ob_at(w, i);
    if (e->st != EV_SENT)
        return;
    w->ob_inflight--;
    if (status != 0) {
        e->st = EV_WAIT;
        if (i < w->ob_scan)
            w->ob_scan = i;
        kvr_metric_inc(w->m_ev_retries);
        KVR_LOG_WARN_RL(5, "KV event publish not acknowledged, will retry",
                        "err=\"%s\" seq=%" PRIu64 " outbox=%zu", kvr_strerror(status), ev, w->ob_n);
        ev_schedule_retry(w);
        return;
    }
    e->st = EV_ACKED;
    e->stream_seq = stream_seq;
    w->backoff_ms = 0;
    bool reordered = false;
    size_t popped = 0;
    while (w->ob_n > 0 && ob_at(w, 0)->st == EV_ACKED) {
        struct ev_entry *h = ob_at(w, 0);
        if (h->stream_seq <= w->last_stream_seq)
            reordered = true;
        else
            w->last_stream_seq = h->stream_seq;
        kvr_buf_free(&h->b);
        w->ob_head = (w->ob_head + 1) & (w->ob_cap - 1);
        w->ob_n--;
        w->ob_seq++;
        popped++;
    }
    w->ob_scan = w->ob_scan > popped ? w->ob_scan - popped : 0;
    kvr_metric_set(w->m_evbuf, 0, (double)w->ob_n);
    if (popped)
        kvr_metric_add(w->m_ev_batches, 0, popped);
    if (reordered && !w->need_resync) {
        /* a later event of ours reached the stream before an earlier one */
        KVR_LOG_WARN("KV events reached the stream out of order: resyncing", "seq=%" PRIu64, ev);
        kvr_metric_inc(w->m_ev_reorders);
        w->need_resync = true;
        wk_ev_buffer_drop(w);
        ev_maybe_resync(w);
    }
    ev_pump(w);
}

/* Sends what waits, oldest first, while fewer than EV_WINDOW are in flight. */
static void ev_pump(worker *w)
{
    if (!w->ob_n || w->retry_wait || w->flush_pending || !kvr_nats_connected(&w->nats))
        return;
    char id[96];
    while (w->ob_scan < w->ob_n && (w->ob_inflight < EV_WINDOW || w->closing)) {
        struct ev_entry *e = ob_at(w, w->ob_scan);
        if (e->st != EV_WAIT) {
            w->ob_scan++;
            continue;
        }
        uint64_t ev = w->ob_seq + w->ob_scan;
        snprintf(id, sizeof id, "%" PRIu64 "-%" PRId64 "-%" PRIu64, w->o.id, w->started_ms, ev);
        int rc = kvr_nats_js_publish(&w->nats, w->subj_kv, id, e->b.base, e->b.len,
                                     EV_ACK_TIMEOUT_MS, on_puback, (void *)(uintptr_t)ev);
        if (rc != 0) {
            KVR_LOG_WARN_RL(5, "KV event publish failed, will retry", "err=\"%s\"",
                            kvr_strerror(rc));
            ev_schedule_retry(w);
            return;
        }
        e->st = EV_SENT;
        w->ob_inflight++;
        w->ob_scan++;
    }
}

/* Publishes or buffers one encoded payload (takes ownership of *b's memory). */
static void ev_send(worker *w, kvr_buf *b)
{
    if (w->need_resync) { /* the outbox overflowed: the resync will carry the state */
        kvr_buf_free(b);
        return;
    }
    if (w->ob_n >= w->o.event_buffer_max) {
        KVR_LOG_WARN("event outbox full: dropping it, will resync", "buffered=%zu", w->ob_n);
        kvr_metric_add(w->m_ev_dropped, 0, w->ob_n + 1);
        wk_ev_buffer_drop(w);
        kvr_buf_free(b);
        w->need_resync = true;
        ev_schedule_retry(w); /* the resync happens when it fires */
        return;
    }
    if (w->ob_n == w->ob_cap) {
        size_t nc = w->ob_cap ? w->ob_cap * 2 : 64;
        struct ev_entry *n = malloc(nc * sizeof *n);
        if (!n) {
            kvr_buf_free(b);
            wk_ev_buffer_drop(w);
            w->need_resync = true;
            ev_schedule_retry(w);
            return;
        }
        for (size_t i = 0; i < w->ob_n; i++)
            n[i] = *ob_at(w, i);
        free(w->ob);
        w->ob = n;
        w->ob_cap = nc;
        w->ob_head = 0;
    }
    struct ev_entry *e = ob_at(w, w->ob_n++);
    e->b = *b;
    e->st = EV_WAIT;
    e->stream_seq = 0;
    kvr_buf_init(b);
    kvr_metric_set(w->m_evbuf, 0, (double)w->ob_n);
    ev_pump(w);
}

void wk_publish_engine_events(worker *w)
{
    kvr_kv_batch batch;
    while (kvr_engine_take_events(w->eng, EVENT_MAX_TOKENS_PER_PAYLOAD, &batch) > 0) {
        batch.ts = (double)kvr_now_ms() / 1000.0;
        if (w->zmq) {
            if (wk_zmq_publish(w->zmq, &batch) != 0)
                KVR_LOG_ERROR("encoding KV events failed", "events=%u", batch.n_events);
            else
                kvr_metric_inc(w->m_ev_batches);
            kvr_metric_add(w->m_ev_pub, 0, batch.n_events);
            continue;
        }
        kvr_buf b;
        kvr_buf_init(&b);
        if (kvr_kv_encode(&b, &batch, w->efmt, w->hfmt) != 0) {
            kvr_buf_free(&b);
            w->need_resync = true;
            KVR_LOG_ERROR("encoding KV events failed; will resync", "events=%u", batch.n_events);
            continue;
        }
        kvr_metric_add(w->m_ev_pub, 0, batch.n_events);
        ev_send(w, &b);
    }
}

/* The outbox was dropped (overflow, a long absence, out-of-order arrival): replace it with
 * AllBlocksCleared + the current cache, once we may send. */
static void ev_maybe_resync(worker *w)
{
    if (!w->need_resync || w->flush_pending || w->closing || !kvr_nats_connected(&w->nats))
        return;
    w->need_resync = false;
    wk_ev_buffer_drop(w);
    if (kvr_engine_queue_resync(w->eng) != 0) {
        w->need_resync = true;
        ev_schedule_retry(w);
        return;
    }
    kvr_metric_inc(w->m_resyncs);
    KVR_LOG_INFO("resync: AllBlocksCleared + current cache", "subject=%s", w->subj_kv);
    wk_publish_engine_events(w);
}

/* After a (re)connect and the announcement delay: resync or send what waits. */
static void ev_flush_buffer(worker *w)
{
    if (!kvr_nats_connected(&w->nats))
        return;
    ev_maybe_resync(w);
    ev_pump(w);
}

static void send_heartbeat(worker *w);

static void on_flush_timer(uv_timer_t *t)
{
    worker *w = t->data;
    w->flush_pending = false;
    ev_flush_buffer(w);
}

/* Connected again (state callback, or a heartbeat that finds the connection up first).
 * Routers reject events of a worker they consider down (missed heartbeats during the
 * outage), so announce ourselves first and send the events a moment later. */
static void on_connected(worker *w)
{
    /* Away longer than routers wait for heartbeats (3 x 1 s by default): they may have
     * declared us down and dropped our entries, so deltas would not apply: resync. */
    if (w->disconnected_at && kvr_mono_ms() - w->disconnected_at > (int64_t)w->o.resync_after_ms &&
        !w->need_resync) {
        KVR_LOG_INFO("away longer than --resync-after-ms: resyncing instead of flushing",
                     "away_ms=%" PRId64 " buffered=%zu", kvr_mono_ms() - w->disconnected_at,
                     w->ob_n);
        w->need_resync = true;
    }
    w->disconnected_at = 0;
    if (w->closing)
        return;
    send_heartbeat(w);
    w->flush_pending = true;
    uv_timer_start(&w->flush_timer, on_flush_timer, w->o.announce_delay_ms, 0);
}

void wk_on_nats_state(kvr_nats *kn, kvr_nats_state st, void *data)
{
    worker *w = data;
    KVR_LOG_INFO("nats", "state=%s", kvr_nats_state_name(st));
    if (st == KVR_NATS_DISCONNECTED && !w->disconnected_at)
        w->disconnected_at = kvr_mono_ms();
    if (st == KVR_NATS_CONNECTED || st == KVR_NATS_RECONNECTED)
        on_connected(w);
}

void wk_heartbeat(uv_timer_t *t)
{
    worker *w = t->data;
    if (!kvr_nats_connected(&w->nats))
        return;
    if ((w->disconnected_at || w->need_resync) && !w->flush_pending) {
        on_connected(w); /* the state callback has not been seen yet; sends a beat */
        return;
    }
    send_heartbeat(w);
}

static void send_heartbeat(worker *w)
{
    kvr_engine_stats st;
    kvr_engine_get_stats(w->eng, &st);
    kvr_buf *b = &w->scratch;
    kvr_buf_reset(b);
    kvr_heartbeat hb = {.id = w->o.id,
                        .ns = kvr_slice_of(w->o.ns),
                        .model = kvr_slice_of(w->o.model),
                        .role = kvr_slice_of(w->o.role),
                        .url = kvr_slice_of(w->url),
                        .mdc_sum = kvr_slice_of(w->o.mdc_sum),
                        .block_size = w->o.block_size,
                        .capacity_blocks = w->o.capacity_blocks,
                        .active = st.running,
                        .waiting = st.waiting + wk_dg_waiting(w),
                        .used_blocks = st.used_blocks,
                        .started_ms = (uint64_t)w->started_ms};
    for (uint32_t i = 0; i < w->o.n_loras; i++)
        hb.loras[hb.n_loras++] = kvr_slice_of(w->o.loras[i]);
    int rc = kvr_heartbeat_encode(b, &hb);
    if (rc == 0 && kvr_nats_publish(&w->nats, w->subj_hb, b->base, b->len) == 0)
        kvr_metric_inc(w->m_hb);
}
