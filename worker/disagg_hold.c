/* disagg_hold.c: kvr-worker's prefill side: the blocks held for decoders and the KV side
 * channel server that sends them (disagg.h, kv_xfer.h for the wire format). Loop thread only. */
#include "disagg_priv.h"

#include <openssl/rand.h>

/* ------------------------------------------------------------------ holds (prefill) */

static uint64_t rid_key(const char *rid, size_t len)
{
    return XXH3_64bits(rid, len);
}

static void held_gauge(wk_dg *d)
{
    kvr_metric_set(d->m_held, 0, (double)d->held_blocks);
    kvr_metric_set(d->m_hold_n, 0, (double)d->n_holds);
}

/* Takes h out of the table and the deadline list (the caller frees or keeps it). */
void dg_hold_unlink(wk_dg *d, dg_hold *h)
{
    dg_hold **pp = &d->buckets[h->key % DG_BUCKETS];
    while (*pp && *pp != h)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = h->hnext;
    if (h->fprev)
        h->fprev->fnext = h->fnext;
    else
        d->fhead = h->fnext;
    if (h->fnext)
        h->fnext->fprev = h->fprev;
    else
        d->ftail = h->fprev;
    h->hnext = h->fprev = h->fnext = NULL;
    d->n_holds--;
}

/* Drops the engine references of an unlinked hold and frees it. */
void dg_hold_release(wk_dg *d, dg_hold *h, int why)
{
    kvr_engine_unhold(d->w->eng, h->blocks, h->n);
    d->held_blocks -= h->n;
    kvr_metric_add(d->m_holds, (size_t)why, 1);
    held_gauge(d);
    free(h->blocks);
    free(h);
}

static dg_hold *hold_find(wk_dg *d, const char *rid, size_t len)
{
    uint64_t k = rid_key(rid, len);
    for (dg_hold *h = d->buckets[k % DG_BUCKETS]; h; h = h->hnext)
        if (h->key == k && strlen(h->rid) == len && memcmp(h->rid, rid, len) == 0)
            return h;
    return NULL;
}

static void hold_tick(uv_timer_t *t);

static void hold_arm(wk_dg *d)
{
    if (d->closing || !d->fhead)
        return;
    int64_t due = d->fhead->deadline_ms - kvr_mono_ms();
    uv_timer_start(&d->hold_timer, hold_tick, due > 0 ? (uint64_t)due : 0, 0);
}

static void hold_tick(uv_timer_t *t)
{
    wk_dg *d = t->data;
    int64_t now = kvr_mono_ms();
    while (d->fhead && d->fhead->deadline_ms <= now) {
        dg_hold *h = d->fhead;
        KVR_LOG_RL_(KVR_LOG_INFO, 1, "kv hold expired", "rid=%s blocks=%u", h->rid, h->n);
        dg_hold_unlink(d, h);
        dg_hold_release(d, h, HOLD_EXPIRED);
    }
    hold_arm(d);
}

/* Registers the blocks a finished prefill leg holds (takes blocks[]). */
void dg_hold_add(wk_dg *d, const char *rid, uint32_t *blocks, uint32_t n)
{
    if (d->n_holds >= DG_MAX_HOLDS) {
        dg_hold *old = d->fhead;
        KVR_LOG_WARN_RL(5, "kv holds full: dropping the oldest", "rid=%s", old->rid);
        dg_hold_unlink(d, old);
        dg_hold_release(d, old, HOLD_DROPPED);
    }
    dg_hold *h = calloc(1, sizeof *h);
    if (!h) {
        kvr_engine_unhold(d->w->eng, blocks, n);
        free(blocks);
        return;
    }
    snprintf(h->rid, sizeof h->rid, "%s", rid);
    h->key = rid_key(h->rid, strlen(h->rid));
    h->blocks = blocks;
    h->n = n;
    h->deadline_ms = kvr_mono_ms() + (int64_t)(d->o->kv_hold_timeout * 1000.0);
    h->hnext = d->buckets[h->key % DG_BUCKETS];
    d->buckets[h->key % DG_BUCKETS] = h;
    h->fprev = d->ftail;
    if (d->ftail)
        d->ftail->fnext = h;
    else
        d->fhead = h;
    d->ftail = h;
    d->n_holds++;
    d->held_blocks += n;
    held_gauge(d);
    if (!uv_is_active((uv_handle_t *)&d->hold_timer))
        hold_arm(d);
}

/* ------------------------------------------------------------------ side channel server */

static void conn_closed(uv_handle_t *h)
{
    dg_conn *c = h->data;
    if (--c->open > 0)
        return;
    free(c->in);
    free(c->ids);
    free(c->ext);
    free(c->chunk);
    free(c);
}

void dg_conn_close(dg_conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    wk_dg *d = c->d;
    if (c->hold) { /* a transfer that did not finish: the blocks are not kept for a retry */
        dg_hold_release(d, c->hold, HOLD_ABORTED);
        c->hold = NULL;
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        d->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    d->n_conns--;
    uv_close((uv_handle_t *)&c->timer, conn_closed);
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
}

static void conn_fail(dg_conn *c, int why, const char *what)
{
    if (c->closing)
        return;
    kvr_metric_add(c->d->m_sends, (size_t)why, 1);
    KVR_LOG_WARN_RL(5, "kv side channel: transfer abandoned", "why=%s sent=%" PRIu64 "/%" PRIu64,
                    what, c->sent, c->total);
    dg_conn_close(c);
}

static void conn_tick(uv_timer_t *t);
static void conn_pump(dg_conn *c);

static void on_conn_write(uv_write_t *wr, int status)
{
    dg_conn *c = wr->data;
    c->writing = false;
    if (c->closing)
        return;
    if (status < 0) {
        conn_fail(c, SND_FAILED, uv_strerror(status));
        return;
    }
    c->last_ms = kvr_mono_ms();
    if (c->close_after_write) {
        dg_conn_close(c);
        return;
    }
    if (c->sending)
        conn_pump(c);
}

static int conn_write(dg_conn *c, const void *p, size_t len)
{
    uv_buf_t b = uv_buf_init((char *)p, (unsigned)len);
    c->wr.data = c;
    int rc = uv_write(&c->wr, (uv_stream_t *)&c->tcp, &b, 1, on_conn_write);
    if (rc == 0)
        c->writing = true;
    return rc;
}

/* Answers a refusal (bound to the REQ's MAC when there was one) and closes. */
static void conn_refuse(dg_conn *c, uint8_t status, int why, const uint8_t *mac_c)
{
    static const uint8_t zero[KVX_MAC];
    kvr_metric_add(c->d->m_sends, (size_t)why, 1);
    KVR_LOG_WARN_RL(5, "kv side channel: request refused", "status=%s", kvx_status_name(status));
    kvx_resp r = {.status = status};
    kvx_resp_encode(c->resp, &c->d->kk, c->ns, mac_c ? mac_c : zero, &r);
    c->close_after_write = true;
    uv_read_stop((uv_stream_t *)&c->tcp);
    if (c->writing) /* the HELLO is still going: the refusal follows it */
        return;
    if (conn_write(c, c->resp, sizeof c->resp) != 0)
        dg_conn_close(c);
}

static uint64_t conn_ext(void *arg, uint32_t i, uint32_t *id)
{
    dg_conn *c = arg;
    *id = c->ids[i];
    return c->ext[i];
}

static void conn_done(dg_conn *c)
{
    wk_dg *d = c->d;
    double secs = (double)(uv_hrtime() - c->t0_ns) / 1e9;
    kvr_metric_add(d->m_sends, SND_OK, 1);
    kvr_metric_observe(d->m_secs, 0, secs);
    if (c->hold) {
        dg_hold_release(d, c->hold, HOLD_READ);
        c->hold = NULL;
    }
    KVR_LOG_DEBUG("kv blocks sent", "blocks=%u bytes=%" PRIu64 " secs=%.4f", c->n, c->total, secs);
    dg_conn_close(c);
}

/* Sends the next chunk when the pacing allows and no write is in flight (the write queue of a
 * transfer never holds more than one chunk: a slow decoder slows only itself). */
static void conn_pump(dg_conn *c)
{
    if (c->writing || c->closing)
        return;
    if (c->sent == c->total) {
        conn_done(c);
        return;
    }
    double bw = c->d->o->kv_bandwidth;
    size_t chunk = DG_CHUNK_MAX;
    if (bw > 0 && bw / 100 < chunk) /* about 100 writes a second at low bandwidth */
        chunk = bw / 100 < 4096 ? 4096 : (size_t)(bw / 100);
    if (c->total - c->sent < chunk)
        chunk = (size_t)(c->total - c->sent);
    if (bw > 0) {
        double allowed = bw * (double)(uv_hrtime() - c->t0_ns) / 1e9;
        if ((double)c->sent > allowed) {
            uint64_t ms = (uint64_t)(((double)c->sent - allowed) / bw * 1000.0) + 1;
            uv_timer_start(&c->timer, conn_tick, ms, 0);
            return;
        }
    }
    kvx_fill(c->chunk, chunk, c->sent, c->bpb, conn_ext, c);
    uv_buf_t b = uv_buf_init((char *)c->chunk, (unsigned)chunk);
    c->wr.data = c;
    int rc = uv_write(&c->wr, (uv_stream_t *)&c->tcp, &b, 1, on_conn_write);
    if (rc != 0) {
        conn_fail(c, SND_FAILED, uv_strerror(rc));
        return;
    }
    c->writing = true;
    c->sent += chunk;
    kvr_metric_add(c->d->m_bytes, 0, chunk);
    uv_timer_start(&c->timer, conn_tick, DG_STALL_MS, 0); /* watchdog while the write waits */
}

static void conn_tick(uv_timer_t *t)
{
    dg_conn *c = t->data;
    if (c->closing)
        return;
    if (!c->sending) {
        conn_fail(c, SND_BAD, "no request in time");
        return;
    }
    if (c->writing) {
        int64_t idle = kvr_mono_ms() - c->last_ms;
        if (idle >= DG_STALL_MS) {
            conn_fail(c, SND_FAILED, "decoder stopped reading");
            return;
        }
        uv_timer_start(&c->timer, conn_tick, (uint64_t)(DG_STALL_MS - idle), 0);
        return;
    }
    conn_pump(c);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* A whole REQ is in c->in. */
static void conn_request(dg_conn *c)
{
    wk_dg *d = c->d;
    kvx_req q;
    if (kvx_req_parse(c->in, c->in_len, &q) != 0) {
        conn_refuse(c, KVX_EBAD, SND_BAD, NULL);
        return;
    }
    if (!kvx_req_verify(&d->kk, c->ns, c->in, c->in_len)) {
        conn_refuse(c, KVX_EAUTH, SND_AUTH, q.mac);
        return;
    }
    dg_hold *h = NULL;
    if (q.eng_len == strlen(d->engine_id) && memcmp(q.eng, d->engine_id, q.eng_len) == 0)
        h = hold_find(d, q.rid, q.rid_len);
    if (!h) {
        conn_refuse(c, KVX_EUNKNOWN, SND_UNKNOWN, q.mac);
        return;
    }
    /* every id asked must be one the hold has: a decoder asks for a subset (the blocks it
     * does not cache yet), never for blocks nobody holds for it */
    uint32_t *sorted = malloc(sizeof(uint32_t) * (h->n ? h->n : 1));
    c->ids = malloc(sizeof(uint32_t) * (q.n ? q.n : 1));
    c->ext = malloc(sizeof(uint64_t) * (q.n ? q.n : 1));
    c->chunk = malloc(DG_CHUNK_MAX);
    if (!sorted || !c->ids || !c->ext || !c->chunk) {
        free(sorted);
        conn_refuse(c, KVX_EBUSY, SND_BUSY, q.mac);
        return;
    }
    memcpy(sorted, h->blocks, sizeof(uint32_t) * h->n);
    qsort(sorted, h->n, sizeof *sorted, cmp_u32);
    for (uint32_t i = 0; i < q.n; i++) {
        uint32_t id = kvx_req_id(&q, i);
        if (!bsearch(&id, sorted, h->n, sizeof *sorted, cmp_u32)) {
            free(sorted);
            conn_refuse(c, KVX_EBLOCKS, SND_BLOCKS, q.mac);
            return;
        }
        c->ids[i] = id;
        c->ext[i] = kvr_engine_block_ext(d->w->eng, id);
    }
    free(sorted);
    /* the decoder reads them now: the hold leaves the table (a second read is unknown) */
    dg_hold_unlink(d, h);
    c->hold = h;
    c->n = q.n;
    c->bpb = (uint32_t)d->o->kv_bytes_per_block;
    c->total = (uint64_t)c->n * c->bpb;
    c->sending = true;
    c->t0_ns = uv_hrtime();
    c->last_ms = kvr_mono_ms();
    kvx_resp r = {.status = KVX_OK, .bytes_per_block = c->bpb, .n = c->n};
    kvx_resp_encode(c->resp, &d->kk, c->ns, q.mac, &r);
    /* the RESP is written ahead of the payload (after the HELLO if that is still in flight:
     * conn_after_hello), then on_conn_write pumps */
    if (!c->writing && conn_write(c, c->resp, sizeof c->resp) != 0)
        conn_fail(c, SND_FAILED, "write");
}

static void conn_alloc(uv_handle_t *h, size_t sug, uv_buf_t *buf)
{
    (void)sug;
    dg_conn *c = h->data;
    if (c->sending || c->close_after_write) {
        *buf = uv_buf_init((char *)c->sink, sizeof c->sink);
        return;
    }
    /* exactly what is missing of the REQ: its header, then the length the header gives */
    size_t want = (c->need ? c->need : KVX_REQ_HEAD) - c->in_len;
    *buf = uv_buf_init((char *)c->in + c->in_len, (unsigned)want);
}

static void conn_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    dg_conn *c = s->data;
    if (c->closing)
        return;
    if (nread < 0) {
        /* a decoder closes once it has every byte: if every byte is handed to the socket, that
         * is the end of a read (the last write's callback may come after this EOF) */
        if (c->sending && c->sent == c->total)
            conn_done(c);
        else
            conn_fail(c, c->sending ? SND_FAILED : SND_BAD, "decoder closed");
        return;
    }
    if (nread == 0)
        return;
    if (c->sending || c->close_after_write) {
        conn_fail(c, SND_BAD, "bytes after the request");
        return;
    }
    c->in_len += (size_t)nread;
    if (!c->need && c->in_len == KVX_REQ_HEAD) {
        size_t need;
        if (kvx_req_need(c->in, c->in_len, &need) != 0) {
            conn_refuse(c, KVX_EBAD, SND_BAD, NULL);
            return;
        }
        uint8_t *p = realloc(c->in, need);
        if (!p) {
            conn_refuse(c, KVX_EBUSY, SND_BUSY, NULL);
            return;
        }
        c->in = p;
        c->need = need;
    }
    if (c->need && c->in_len == c->need) {
        uv_read_stop(s);
        conn_request(c);
        if (!c->closing && c->sending)
            uv_read_start(s, conn_alloc, conn_read); /* to see the decoder go away */
    }
}

/* The HELLO's (or RESP's) write finished while a request was being answered. */
static void conn_after_hello(dg_conn *c);

static void on_hello_written(uv_write_t *wr, int status)
{
    dg_conn *c = wr->data;
    c->writing = false;
    if (c->closing)
        return;
    if (status < 0) {
        conn_fail(c, SND_FAILED, uv_strerror(status));
        return;
    }
    conn_after_hello(c);
}

static void conn_after_hello(dg_conn *c)
{
    if (c->close_after_write) { /* a refusal came while the HELLO was in flight */
        if (conn_write(c, c->resp, sizeof c->resp) != 0)
            dg_conn_close(c);
        return;
    }
    if (c->sending && conn_write(c, c->resp, sizeof c->resp) != 0)
        conn_fail(c, SND_FAILED, "write");
}

void dg_on_side_conn(uv_stream_t *srv, int status)
{
    wk_dg *d = srv->data;
    if (status < 0)
        return;
    dg_conn *c = calloc(1, sizeof *c);
    if (!c)
        return;
    c->d = d;
    uv_tcp_init(d->w->loop, &c->tcp);
    uv_timer_init(d->w->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->open = 2;
    c->next = d->conns;
    if (d->conns)
        d->conns->prev = c;
    d->conns = c;
    d->n_conns++;
    if (uv_accept(srv, (uv_stream_t *)&c->tcp) != 0) {
        dg_conn_close(c);
        return;
    }
    if (d->n_conns > DG_MAX_CONNS || d->closing) {
        kvr_metric_add(d->m_sends, SND_BUSY, 1);
        dg_conn_close(c);
        return;
    }
    c->in = malloc(KVX_REQ_HEAD);
    if (!c->in || RAND_bytes(c->ns, sizeof c->ns) != 1) {
        dg_conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    kvx_hello_encode(c->hello, c->ns);
    uv_buf_t b = uv_buf_init((char *)c->hello, sizeof c->hello);
    c->wr.data = c;
    if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, &b, 1, on_hello_written) != 0) {
        dg_conn_close(c);
        return;
    }
    c->writing = true;
    uv_timer_start(&c->timer, conn_tick, DG_REQ_TIMEOUT_MS, 0);
    uv_read_start((uv_stream_t *)&c->tcp, conn_alloc, conn_read);
}
