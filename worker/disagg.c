/* disagg: kvr-worker's prefill and decode roles and the KV side channel (see disagg.h for the
 * protocol, kv_xfer.h for the wire format). Loop thread only. */
#include "disagg.h"
#include "kv_xfer.h"
#include "peer_auth.h" /* kvr_auth_key_load: the secret file policy the routers use */
#include "worker.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#define DG_MAX_CONNS 64        /* side channel connections at once; more are closed at accept */
#define DG_MAX_HOLDS 65536     /* past it the oldest hold is dropped */
#define DG_BUCKETS 4096        /* hold table: chained, keyed by XXH3 of the request id */
#define DG_REQ_TIMEOUT_MS 5000 /* accept to a whole REQ */
#define DG_STALL_MS 10000      /* a transfer with no byte moving for this long is abandoned */
#define DG_CHUNK_MAX 65536u    /* one write in flight per transfer, at most this many bytes */
#define DG_READ_BUF 65536u

enum { SND_OK, SND_AUTH, SND_UNKNOWN, SND_BLOCKS, SND_BAD, SND_BUSY, SND_FAILED };
static const char *const SND_LABELS[] = {"ok",        "bad_secret", "unknown", "blocks",
                                         "malformed", "busy",       "failed",  NULL};
enum {
    PULL_OK,
    PULL_EMPTY,
    PULL_INVALID,
    PULL_REFUSED,
    PULL_FAILED,
    PULL_MISMATCH,
    PULL_CANCELLED
};
static const char *const PULL_LABELS[] = {"ok",     "empty",    "invalid",   "refused",
                                          "failed", "mismatch", "cancelled", NULL};
enum { HOLD_READ, HOLD_EXPIRED, HOLD_ABORTED, HOLD_DROPPED };
static const char *const HOLD_LABELS[] = {"read", "expired", "aborted", "dropped", NULL};
static const char *const DIR_LABELS[] = {"sent", "received", NULL};

typedef struct dg_hold {
    struct dg_hold *hnext;         /* bucket chain */
    struct dg_hold *fprev, *fnext; /* by deadline (one timeout for all: insertion order) */
    uint64_t key;
    int64_t deadline_ms;
    uint32_t n;
    uint32_t *blocks; /* engine references, dropped by kvr_engine_unhold */
    char rid[KVX_MAX_ID + 1];
} dg_hold;

typedef struct wk_dg wk_dg;

/* server side: one decoder's transfer */
typedef struct dg_conn {
    wk_dg *d;
    struct dg_conn *prev, *next;
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wr;
    int open; /* handles not closed yet */
    bool writing, closing, close_after_write, sending;
    uint8_t ns[KVX_NONCE];
    uint8_t hello[KVX_HELLO_LEN], resp[KVX_RESP_LEN];
    uint8_t *in; /* the REQ, KVX_REQ_HEAD then exactly its length */
    size_t in_len, in_cap, need;
    uint8_t sink[64]; /* reads after the REQ: the decoder sends nothing more */
    dg_hold *hold;    /* owned while sending */
    uint32_t n, bpb;
    uint32_t *ids;
    uint64_t *ext;
    uint64_t total, sent;
    uint64_t t0_ns;
    int64_t last_ms;
    uint8_t *chunk;
} dg_conn;

/* decoder side: one request's pull */
typedef struct dg_pull {
    wk_dg *d;
    struct dg_pull *prev, *next;
    wreq *r; /* NULL once abandoned */
    uv_getaddrinfo_t gai;
    uv_connect_t creq;
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wr;
    int open;
    bool tcp_on, resolving, connecting, done;
    int phase; /* 0 hello, 1 resp, 2 data */
    uint8_t ns[KVX_NONCE], mac_c[KVX_MAC];
    uint8_t hb[KVX_RESP_LEN];
    size_t hgot;
    kvr_buf reqb;
    char host[256], port_s[8];
    char rid[KVX_MAX_ID + 1], eng[KVX_MAX_ID + 1];
    uint32_t *ids; /* asked, n_ask */
    uint64_t *ext; /* expected ext hash of each asked block */
    uint32_t n_ask, first, k;
    uint32_t bpb;
    uint64_t total, got;
    uint8_t bh[KVX_BLOCK_HEAD];
    uint64_t t0_ns;
    int64_t deadline_ms, last_ms;
    uint32_t *prompt;
    uint32_t n_prompt, max_tokens, lora;
    uint8_t rbuf[DG_READ_BUF];
} dg_pull;

/* a request's state (wreq.dg) */
enum { DGR_PREFILL = 1, DGR_DECODE = 2 };
typedef struct wk_dgreq {
    int kind;
    /* prefill leg: prompt kept until the finish holds its blocks; then the answer's params */
    uint32_t *prompt;
    uint32_t n_prompt, lora;
    bool held;
    uint32_t *blocks;
    uint32_t n_blocks;
    char rid[KVX_MAX_ID + 1];
    /* decode: the pull while it runs; then the imported blocks' references */
    dg_pull *pull;
    uint32_t *imp;
    uint32_t n_imp;
} wk_dgreq;

struct wk_dg {
    worker *w;
    const wk_dg_opts *o;
    bool prefill, decode, closing;
    kvr_auth_key key;
    kvx_key kk;
    char engine_id[64];
    char host[128], adv[128];
    int port;
    uv_tcp_t srv;
    bool srv_on;
    uv_timer_t hold_timer;
    bool hold_timer_on;
    dg_hold *buckets[DG_BUCKETS];
    dg_hold *fhead, *ftail;
    size_t n_holds;
    uint64_t held_blocks;
    dg_conn *conns;
    size_t n_conns;
    dg_pull *pulls;
    uint32_t n_pulls; /* in flight: their requests wait, as vLLM's WAITING_FOR_REMOTE_KVS do */
    kvr_metric *m_sends, *m_pulls, *m_bytes, *m_secs, *m_held, *m_holds, *m_hold_n;
};

static wk_dg DG;

void wk_dg_opts_default(wk_dg_opts *o)
{
    *o = (wk_dg_opts){.kv_port = 0,
                      .kv_bytes_per_block = 65536,
                      .kv_bandwidth = 1e9,
                      .kv_hold_timeout = 480,
                      .kv_pull_timeout = 30};
}

int wk_dg_opts_check(const wk_dg_opts *o, const char *role, kvr_err *err)
{
    bool both = strcmp(role, "both") == 0;
    if (!both && !o->kv_secret_file)
        return kvr_err_set(err, KVR_EINVAL,
                           "--role %s needs --kv-secret-file (the KV side channel is "
                           "authenticated; docs/SECURITY.md)",
                           role);
    if (o->kv_port > 65535)
        return kvr_err_set(err, KVR_EINVAL, "--kv-port must be in 0..65535");
    if (o->kv_bytes_per_block < KVX_BLOCK_HEAD || o->kv_bytes_per_block > KVX_MAX_BLOCK_BYTES)
        return kvr_err_set(err, KVR_EINVAL, "--kv-bytes-per-block must be in %d..%u",
                           KVX_BLOCK_HEAD, KVX_MAX_BLOCK_BYTES);
    if (!(o->kv_bandwidth >= 0) || o->kv_bandwidth > 1e12)
        return kvr_err_set(err, KVR_EINVAL, "--kv-bandwidth must be in 0..1e12 bytes/s");
    if (!(o->kv_hold_timeout > 0) || o->kv_hold_timeout > 86400)
        return kvr_err_set(err, KVR_EINVAL, "--kv-hold-timeout must be in (0, 86400] s");
    if (!(o->kv_pull_timeout > 0) || o->kv_pull_timeout > 3600)
        return kvr_err_set(err, KVR_EINVAL, "--kv-pull-timeout must be in (0, 3600] s");
    if ((o->kv_host && strlen(o->kv_host) >= 128) ||
        (o->kv_advertise && (strlen(o->kv_advertise) == 0 || strlen(o->kv_advertise) >= 128 ||
                             strpbrk(o->kv_advertise, "\"\\ \t\r\n"))))
        return kvr_err_set(err, KVR_EINVAL, "--kv-host and --kv-advertise-host: 1..127 chars");
    return 0;
}

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
static void hold_unlink(wk_dg *d, dg_hold *h)
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
static void hold_release(wk_dg *d, dg_hold *h, int why)
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
        hold_unlink(d, h);
        hold_release(d, h, HOLD_EXPIRED);
    }
    hold_arm(d);
}

/* Registers the blocks a finished prefill leg holds (takes blocks[]). */
static void hold_add(wk_dg *d, const char *rid, uint32_t *blocks, uint32_t n)
{
    if (d->n_holds >= DG_MAX_HOLDS) {
        dg_hold *old = d->fhead;
        KVR_LOG_WARN_RL(5, "kv holds full: dropping the oldest", "rid=%s", old->rid);
        hold_unlink(d, old);
        hold_release(d, old, HOLD_DROPPED);
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

static void conn_close(dg_conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    wk_dg *d = c->d;
    if (c->hold) { /* a transfer that did not finish: the blocks are not kept for a retry */
        hold_release(d, c->hold, HOLD_ABORTED);
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
    conn_close(c);
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
        conn_close(c);
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
        conn_close(c);
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
        hold_release(d, c->hold, HOLD_READ);
        c->hold = NULL;
    }
    KVR_LOG_DEBUG("kv blocks sent", "blocks=%u bytes=%" PRIu64 " secs=%.4f", c->n, c->total, secs);
    conn_close(c);
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
    hold_unlink(d, h);
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
            conn_close(c);
        return;
    }
    if (c->sending && conn_write(c, c->resp, sizeof c->resp) != 0)
        conn_fail(c, SND_FAILED, "write");
}

static void on_side_conn(uv_stream_t *srv, int status)
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
        conn_close(c);
        return;
    }
    if (d->n_conns > DG_MAX_CONNS || d->closing) {
        kvr_metric_add(d->m_sends, SND_BUSY, 1);
        conn_close(c);
        return;
    }
    c->in = malloc(KVX_REQ_HEAD);
    if (!c->in || RAND_bytes(c->ns, sizeof c->ns) != 1) {
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    kvx_hello_encode(c->hello, c->ns);
    uv_buf_t b = uv_buf_init((char *)c->hello, sizeof c->hello);
    c->wr.data = c;
    if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, &b, 1, on_hello_written) != 0) {
        conn_close(c);
        return;
    }
    c->writing = true;
    uv_timer_start(&c->timer, conn_tick, DG_REQ_TIMEOUT_MS, 0);
    uv_read_start((uv_stream_t *)&c->tcp, conn_alloc, conn_read);
}

/* ------------------------------------------------------------------ admission */

static int engine_add(worker *w, wreq *r, const uint32_t *prompt, uint32_t n, uint32_t max_tokens,
                      uint32_t lora, kvr_err *err)
{
    return kvr_engine_add_lora(w->eng, prompt, n, max_tokens, lora, r, &r->seq, err);
}

static void pull_finish(dg_pull *p, int result);

/* A pull ended (result) and its request still waits: import what came, then run it. */
static void pull_admit(dg_pull *p, int result)
{
    wreq *r = p->r;
    worker *w = p->d->w;
    wk_dgreq *g = r->dg;
    g->pull = NULL;
    p->r = NULL;
    if (r->gone) /* the client left; the next flush frees r (never hand the engine a gone r) */
        return;
    if (result == PULL_OK && p->k > 0) {
        g->imp = malloc(sizeof(uint32_t) * p->k);
        if (g->imp)
            g->n_imp =
                kvr_engine_hold_prompt(w->eng, p->prompt, p->n_prompt, p->lora, p->k, true, g->imp);
    }
    wk_engine_idle_jump(w, wk_wall_ns(w));
    kvr_err err = {0};
    if (engine_add(w, r, p->prompt, p->n_prompt, p->max_tokens, p->lora, &err) != 0) {
        /* cannot happen (the same checks passed before the pull), but answer, never leak */
        if (r->http) {
            kvr_http_req *req = r->http;
            req->data = NULL; /* r is freed below: its callbacks must not find it */
            req->on_close = NULL;
            req->on_drain = NULL;
            r->http = NULL;
            wk_respond_error(req, err.code == KVR_ENOMEM ? 500 : 400, "invalid_request_error",
                             "%s", err.msg);
        }
        wk_wreq_free(r);
        return;
    }
    wk_kick_drive(w);
}

/* A pull is freed when its last handle is closed and its resolve (a request, not a handle)
 * has called back: p->open counts both. */
static void pull_unref(dg_pull *p)
{
    if (--p->open > 0)
        return;
    kvr_buf_free(&p->reqb);
    free(p->ids);
    free(p->ext);
    free(p->prompt);
    free(p);
}

static void pull_closed(uv_handle_t *h)
{
    pull_unref(h->data);
}

static void pull_finish(dg_pull *p, int result)
{
    if (p->done)
        return;
    p->done = true;
    wk_dg *d = p->d;
    kvr_metric_add(d->m_pulls, (size_t)result, 1);
    if (result == PULL_OK)
        kvr_metric_observe(d->m_secs, 1, (double)(uv_hrtime() - p->t0_ns) / 1e9);
    d->n_pulls--;
    if (p->prev)
        p->prev->next = p->next;
    else
        d->pulls = p->next;
    if (p->next)
        p->next->prev = p->prev;
    p->prev = p->next = NULL;
    if (p->r)
        pull_admit(p, result);
    /* handles close (a resolve still running is cancelled; its callback then closes) */
    if (p->resolving)
        uv_cancel((uv_req_t *)&p->gai);
    uv_timer_stop(&p->timer);
    uv_close((uv_handle_t *)&p->timer, pull_closed);
    if (p->tcp_on)
        uv_close((uv_handle_t *)&p->tcp, pull_closed);
}

static void pull_fail(dg_pull *p, int result, const char *what)
{
    if (p->done)
        return;
    KVR_LOG_WARN_RL(5, "kv pull failed: recomputing the prefill",
                    "why=%s host=%s port=%s rid=%s got=%" PRIu64 "/%" PRIu64, what, p->host,
                    p->port_s, p->rid, p->got, p->total);
    pull_finish(p, result);
}

static void pull_tick(uv_timer_t *t)
{
    dg_pull *p = t->data;
    if (p->done)
        return;
    int64_t now = kvr_mono_ms();
    if (now >= p->deadline_ms) {
        pull_fail(p, PULL_FAILED, "pull timeout");
        return;
    }
    if (now - p->last_ms >= DG_STALL_MS) {
        pull_fail(p, PULL_FAILED, "prefill worker stalled");
        return;
    }
    int64_t a = p->deadline_ms - now, b = DG_STALL_MS - (now - p->last_ms);
    uv_timer_start(&p->timer, pull_tick, (uint64_t)(a < b ? a : b), 0);
}

static void pull_alloc(uv_handle_t *h, size_t sug, uv_buf_t *buf)
{
    (void)sug;
    dg_pull *p = h->data;
    *buf = uv_buf_init((char *)p->rbuf, sizeof p->rbuf);
}

static void on_req_written(uv_write_t *wr, int status)
{
    dg_pull *p = wr->data;
    if (status < 0 && !p->done)
        pull_fail(p, PULL_FAILED, uv_strerror(status));
}

/* Payload bytes: check each block's header against what this prompt's block must be. */
static int pull_data(dg_pull *p, const uint8_t *in, size_t len)
{
    if (len > p->total - p->got)
        return PULL_FAILED; /* more than announced */
    while (len > 0) {
        uint32_t i = (uint32_t)(p->got / p->bpb), off = (uint32_t)(p->got % p->bpb);
        size_t take;
        if (off < KVX_BLOCK_HEAD) {
            take = KVX_BLOCK_HEAD - off;
            if (take > len)
                take = len;
            memcpy(p->bh + off, in, take);
            if (off + take == KVX_BLOCK_HEAD) {
                uint64_t ext = 0;
                uint32_t id = 0, idx = 0;
                for (int k = 0; k < 8; k++)
                    ext |= (uint64_t)p->bh[k] << (8 * k);
                for (int k = 0; k < 4; k++) {
                    id |= (uint32_t)p->bh[8 + k] << (8 * k);
                    idx |= (uint32_t)p->bh[12 + k] << (8 * k);
                }
                if (ext != p->ext[i] || id != p->ids[i] || idx != i)
                    return PULL_MISMATCH;
            }
        } else {
            take = p->bpb - off;
            if (take > len)
                take = len;
        }
        in += take;
        len -= take;
        p->got += take;
    }
    return PULL_OK;
}

static void pull_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    dg_pull *p = s->data;
    (void)buf;
    if (p->done)
        return;
    if (nread < 0) {
        pull_fail(p, PULL_FAILED,
                  nread == UV_EOF ? "prefill worker closed" : uv_strerror((int)nread));
        return;
    }
    const uint8_t *in = p->rbuf;
    size_t len = (size_t)nread;
    p->last_ms = kvr_mono_ms();
    while (len > 0 && !p->done) {
        if (p->phase < 2) {
            size_t want = (p->phase == 0 ? KVX_HELLO_LEN : KVX_RESP_LEN) - p->hgot;
            size_t take = len < want ? len : want;
            memcpy(p->hb + p->hgot, in, take);
            p->hgot += take;
            in += take;
            len -= take;
            if (p->hgot < (p->phase == 0 ? KVX_HELLO_LEN : KVX_RESP_LEN))
                break;
            p->hgot = 0;
            if (p->phase == 0) {
                if (len > 0) { /* the server speaks only after our REQ */
                    pull_fail(p, PULL_FAILED, "bytes after the hello");
                    return;
                }
                if (kvx_hello_parse(p->hb, KVX_HELLO_LEN, p->ns) != 0) {
                    pull_fail(p, PULL_FAILED, "not a KV side channel");
                    return;
                }
                kvr_buf_reset(&p->reqb);
                if (kvx_req_encode(&p->reqb, &p->d->kk, p->ns, p->rid, p->eng, p->ids, p->n_ask) !=
                    0) {
                    pull_fail(p, PULL_FAILED, "request encoding");
                    return;
                }
                memcpy(p->mac_c, p->reqb.base + p->reqb.len - KVX_MAC, KVX_MAC);
                uv_buf_t b = uv_buf_init(p->reqb.base, (unsigned)p->reqb.len);
                p->wr.data = p;
                if (uv_write(&p->wr, s, &b, 1, on_req_written) != 0) {
                    pull_fail(p, PULL_FAILED, "write");
                    return;
                }
                p->phase = 1;
                continue;
            }
            kvx_resp r;
            int rc = kvx_resp_parse(p->hb, KVX_RESP_LEN, &p->d->kk, p->ns, p->mac_c, &r);
            if (rc != 0) {
                pull_fail(p, rc == KVR_ECORRUPT ? PULL_REFUSED : PULL_FAILED,
                          rc == KVR_ECORRUPT ? "answer not signed with our secret"
                                             : "malformed answer");
                return;
            }
            if (r.status != KVX_OK) {
                pull_fail(p, PULL_REFUSED, kvx_status_name(r.status));
                return;
            }
            if (r.n != p->n_ask) {
                pull_fail(p, PULL_FAILED, "block count differs");
                return;
            }
            p->bpb = r.bytes_per_block;
            p->total = (uint64_t)r.n * r.bytes_per_block;
            p->phase = 2;
        } else {
            int rc = pull_data(p, in, len);
            if (rc != PULL_OK) {
                pull_fail(p, rc, rc == PULL_MISMATCH ? "a block is not this prompt's" : "overrun");
                return;
            }
            kvr_metric_add(p->d->m_bytes, 1, len);
            len = 0;
        }
        if (p->phase == 2 && p->got == p->total) {
            pull_finish(p, PULL_OK);
            return;
        }
    }
}

static void on_pull_connect(uv_connect_t *cr, int status)
{
    dg_pull *p = cr->data;
    p->connecting = false;
    if (p->done)
        return;
    if (status < 0) {
        pull_fail(p, PULL_FAILED, uv_strerror(status));
        return;
    }
    uv_tcp_nodelay(&p->tcp, 1);
    if (uv_read_start((uv_stream_t *)&p->tcp, pull_alloc, pull_read) != 0)
        pull_fail(p, PULL_FAILED, "read");
}

static void on_pull_resolved(uv_getaddrinfo_t *g, int status, struct addrinfo *res)
{
    dg_pull *p = g->data;
    p->resolving = false;
    if (p->done || status < 0 || !res) {
        if (!p->done)
            pull_fail(p, PULL_FAILED, status < 0 ? uv_strerror(status) : "no address");
        if (res)
            uv_freeaddrinfo(res);
        pull_unref(p);
        return;
    }
    p->open--; /* the resolve's reference; the timer's keeps p (the tcp handle adds one) */
    uv_tcp_init(p->d->w->loop, &p->tcp);
    p->tcp.data = p;
    p->tcp_on = true;
    p->open++;
    p->creq.data = p;
    int rc = uv_tcp_connect(&p->creq, &p->tcp, res->ai_addr, on_pull_connect);
    uv_freeaddrinfo(res);
    if (rc != 0) {
        pull_fail(p, PULL_FAILED, uv_strerror(rc));
        return;
    }
    p->connecting = true;
}

/* ------------------------------------------------------------------ params */

static bool json_u32(const cJSON *v, uint32_t *out)
{
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 4294967295.0 ||
        v->valuedouble != (double)(int64_t)v->valuedouble)
        return false;
    *out = (uint32_t)v->valuedouble;
    return true;
}

static bool json_str(const cJSON *o, const char *k, char *out, size_t cap)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!cJSON_IsString(v) || !v->valuestring[0] || strlen(v->valuestring) >= cap)
        return false;
    snprintf(out, cap, "%s", v->valuestring);
    return true;
}

/* Decode role: do_remote_prefill params -> 0: a pull started (it adds r when it ends); else
 * r is not added yet and recomputes: a PULL_* reason to count, or -1 (already counted). */
static int start_pull(wk_dg *d, wreq *r, const cJSON *kvp, const uint32_t *prompt, uint32_t n,
                      uint32_t max_tokens, uint32_t lora)
{
    worker *w = d->w;
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(kvp, "remote_block_ids");
    /* vLLM's hybrid allocator sends one list per KV cache group: one group is the same */
    if (cJSON_IsArray(ids) && cJSON_GetArraySize(ids) == 1 && cJSON_IsArray(ids->child))
        ids = ids->child;
    if (!ids || cJSON_IsNull(ids) || (cJSON_IsArray(ids) && cJSON_GetArraySize(ids) == 0))
        return PULL_EMPTY; /* prompt under one block: nothing to pull (vLLM: no transfer) */
    dg_pull *p = calloc(1, sizeof *p);
    if (!p)
        return PULL_FAILED;
    int n_ids = cJSON_IsArray(ids) ? cJSON_GetArraySize(ids) : -1;
    const cJSON *port = cJSON_GetObjectItemCaseSensitive(kvp, "remote_port");
    uint32_t port_v = 0;
    if (n_ids < 1 || (uint32_t)n_ids > KVX_MAX_BLOCKS ||
        !json_str(kvp, "remote_engine_id", p->eng, sizeof p->eng) ||
        !json_str(kvp, "remote_request_id", p->rid, sizeof p->rid) ||
        !json_str(kvp, "remote_host", p->host, sizeof p->host) || !json_u32(port, &port_v) ||
        port_v < 1 || port_v > 65535) {
        free(p);
        KVR_LOG_WARN_RL(5, "invalid kv_transfer_params: recomputing the prefill", "req=%s", r->id);
        return PULL_INVALID;
    }
    uint32_t B = (uint32_t)w->o.block_size;
    p->k = (uint32_t)n_ids < n / B ? (uint32_t)n_ids : n / B;
    p->first = kvr_engine_cached_blocks(w->eng, prompt, n, lora);
    if (p->first > p->k)
        p->first = p->k;
    p->n_ask = p->k - p->first;
    p->ids = malloc(sizeof(uint32_t) * (p->n_ask ? p->n_ask : 1));
    p->ext = malloc(sizeof(uint64_t) * (p->k ? p->k : 1));
    p->prompt = malloc(sizeof(uint32_t) * n);
    if (!p->ids || !p->ext || !p->prompt) {
        free(p->ids);
        free(p->ext);
        free(p->prompt);
        free(p);
        return PULL_FAILED;
    }
    uint32_t i = 0;
    const cJSON *it;
    bool ok = true;
    cJSON_ArrayForEach(it, ids)
    {
        uint32_t v;
        if (!json_u32(it, &v)) {
            ok = false;
            break;
        }
        if (i >= p->first && i < p->k)
            p->ids[i - p->first] = v;
        i++;
    }
    if (!ok) {
        free(p->ids);
        free(p->ext);
        free(p->prompt);
        free(p);
        KVR_LOG_WARN_RL(5, "invalid kv_transfer_params: recomputing the prefill", "req=%s", r->id);
        return PULL_INVALID;
    }
    /* expected ext hash of each asked block: blocks first..k of this prompt */
    kvr_engine_prompt_ext(w->eng, prompt, n, lora, p->k, p->ext);
    memmove(p->ext, p->ext + p->first, sizeof(uint64_t) * p->n_ask);
    memcpy(p->prompt, prompt, sizeof(uint32_t) * n);
    p->n_prompt = n;
    p->max_tokens = max_tokens;
    p->lora = lora;
    p->d = d;
    p->r = r;
    snprintf(p->port_s, sizeof p->port_s, "%u", port_v);
    kvr_buf_init(&p->reqb);
    p->t0_ns = uv_hrtime();
    p->last_ms = kvr_mono_ms();
    p->deadline_ms = p->last_ms + (int64_t)(d->o->kv_pull_timeout * 1000.0);
    uv_timer_init(w->loop, &p->timer);
    p->timer.data = p;
    p->open = 1;
    p->gai.data = p;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    p->next = d->pulls;
    if (d->pulls)
        d->pulls->prev = p;
    d->pulls = p;
    d->n_pulls++;
    r->dg->pull = p;
    p->resolving = true;
    p->open++;
    int rc = uv_getaddrinfo(w->loop, &p->gai, on_pull_resolved, p->host, p->port_s, &hints);
    if (rc != 0) {
        p->resolving = false;
        p->open--;
        /* detached first: the caller adds r (admitting it from here would free r under the
         * caller if the add failed) */
        p->r = NULL;
        r->dg->pull = NULL;
        pull_fail(p, PULL_FAILED, uv_strerror(rc));
        return -1;
    }
    pull_tick(&p->timer);
    return 0;
}

int wk_dg_admit(worker *w, wreq *r, const cJSON *root, const uint32_t *prompt, uint32_t n_prompt,
                uint32_t max_tokens, uint32_t lora, kvr_err *err)
{
    wk_dg *d = w->dg;
    const cJSON *kvp = cJSON_GetObjectItemCaseSensitive(root, "kv_transfer_params");
    if (!d || !cJSON_IsObject(kvp))
        return engine_add(w, r, prompt, n_prompt, max_tokens, lora, err);
    if (d->prefill && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(kvp, "do_remote_decode")) &&
        !r->stream) {
        wk_dgreq *g = calloc(1, sizeof *g);
        uint32_t *cp = malloc(sizeof(uint32_t) * n_prompt);
        if (!g || !cp) {
            free(g);
            free(cp);
            return kvr_err_set(err, KVR_ENOMEM, "out of memory");
        }
        memcpy(cp, prompt, sizeof(uint32_t) * n_prompt);
        g->kind = DGR_PREFILL;
        g->prompt = cp;
        g->n_prompt = n_prompt;
        g->lora = lora;
        r->dg = g;
        return engine_add(w, r, prompt, n_prompt, max_tokens, lora, err);
    }
    if (d->decode && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(kvp, "do_remote_prefill"))) {
        /* the same checks the engine makes, before anything is pulled for a request that
         * could never run */
        uint64_t total = (uint64_t)n_prompt + max_tokens;
        if (total > w->o.max_model_len || n_prompt == 0 || max_tokens == 0)
            return engine_add(w, r, prompt, n_prompt, max_tokens, lora, err);
        wk_dgreq *g = calloc(1, sizeof *g);
        if (!g)
            return kvr_err_set(err, KVR_ENOMEM, "out of memory");
        g->kind = DGR_DECODE;
        r->dg = g;
        int res = start_pull(d, r, kvp, prompt, n_prompt, max_tokens, lora);
        if (res == 0)
            return 0;
        if (res > 0)
            kvr_metric_add(d->m_pulls, (size_t)res, 1);
        return engine_add(w, r, prompt, n_prompt, max_tokens, lora, err);
    }
    return engine_add(w, r, prompt, n_prompt, max_tokens, lora, err);
}

void wk_dg_on_output(worker *w, wreq *r, const kvr_engine_output *o)
{
    wk_dgreq *g = r->dg;
    wk_dg *d = w->dg;
    if (!d || g->kind != DGR_PREFILL || !o->finished || g->held || !g->prompt)
        return;
    /* the prompt's full blocks were just released into the LRU list by this step: hold them
     * before any later step can evict one */
    uint32_t max = g->n_prompt / (uint32_t)w->o.block_size;
    uint32_t *b = malloc(sizeof(uint32_t) * (max ? max : 1));
    uint32_t *copy = malloc(sizeof(uint32_t) * (max ? max : 1));
    if (!b || !copy) {
        free(b);
        free(copy);
        return;
    }
    uint32_t n = kvr_engine_hold_prompt(w->eng, g->prompt, g->n_prompt, g->lora, max, false, b);
    memcpy(copy, b, sizeof(uint32_t) * n);
    snprintf(g->rid, sizeof g->rid, "%s", r->id);
    g->blocks = copy;
    g->n_blocks = n;
    g->held = true;
    free(g->prompt);
    g->prompt = NULL;
    if (n > 0)
        hold_add(d, g->rid, b, n);
    else
        free(b);
}

void wk_dg_append_params(wreq *r, kvr_buf *b)
{
    wk_dgreq *g = r->dg;
    wk_dg *d = r->w->dg;
    if (!d || g->kind != DGR_PREFILL || !g->held)
        return;
    kvr_buf_append_cstr(b, ",\"kv_transfer_params\":{\"do_remote_prefill\":true,"
                           "\"do_remote_decode\":false,\"remote_block_ids\":[");
    for (uint32_t i = 0; i < g->n_blocks; i++)
        kvr_buf_appendf(b, "%s%u", i ? "," : "", g->blocks[i]);
    kvr_buf_appendf(b,
                    "],\"remote_engine_id\":\"%s\",\"remote_request_id\":\"%s\","
                    "\"remote_host\":\"%s\",\"remote_port\":%d,\"tp_size\":1}",
                    d->engine_id, g->rid, d->adv, d->port);
}

void wk_dg_req_free(wreq *r)
{
    wk_dgreq *g = r->dg;
    if (!g)
        return;
    r->dg = NULL;
    if (g->pull) { /* the client went away during the pull */
        dg_pull *p = g->pull;
        p->r = NULL;
        pull_finish(p, PULL_CANCELLED);
    }
    if (g->n_imp)
        kvr_engine_unhold(r->w->eng, g->imp, g->n_imp);
    free(g->imp);
    free(g->prompt);
    free(g->blocks);
    free(g);
}

/* ------------------------------------------------------------------ start and close */

static void host_of(const char *listen, char *out, size_t cap)
{
    const char *colon = strrchr(listen, ':');
    size_t hl = colon ? (size_t)(colon - listen) : 0;
    if (hl == 0 || hl >= cap)
        snprintf(out, cap, "127.0.0.1");
    else
        snprintf(out, cap, "%.*s", (int)hl, listen);
    size_t l = strlen(out);
    if (l >= 2 && out[0] == '[' && out[l - 1] == ']') { /* [::1] */
        memmove(out, out + 1, l - 2);
        out[l - 2] = '\0';
    }
}

int wk_dg_start(worker *w, kvr_err *err)
{
    wk_dg *d = &DG;
    memset(d, 0, sizeof *d);
    d->w = w;
    d->o = &w->o.dg;
    d->prefill = strcmp(w->o.role, "prefill") == 0;
    d->decode = strcmp(w->o.role, "decode") == 0;
    w->dg = d;
    uv_timer_init(w->loop, &d->hold_timer);
    d->hold_timer.data = d;
    d->m_sends = kvr_metrics_counter(w->metrics, "kvr_worker_kv_sends_total",
                                     "KV side channel requests served (prefill), by result",
                                     "result", SND_LABELS);
    d->m_pulls = kvr_metrics_counter(
        w->metrics, "kvr_worker_kv_pulls_total",
        "Requests with do_remote_prefill (decode), by result; all but ok and empty recompute",
        "result", PULL_LABELS);
    d->m_bytes = kvr_metrics_counter(w->metrics, "kvr_worker_kv_transfer_bytes_total",
                                     "KV side channel payload bytes", "dir", DIR_LABELS);
    static const double secs[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                  0.25,  0.5,    1,     2.5,  5,     10,   30};
    static const char *const sides[] = {"send", "pull", NULL};
    d->m_secs = kvr_metrics_histogram(w->metrics, "kvr_worker_kv_transfer_seconds",
                                      "Whole KV transfers that succeeded, request to last byte",
                                      secs, sizeof secs / sizeof secs[0], "side", sides);
    d->m_held = kvr_metrics_gauge(w->metrics, "kvr_worker_kv_held_blocks",
                                  "Blocks held for decoders (prefill)", NULL, NULL);
    d->m_hold_n = kvr_metrics_gauge(w->metrics, "kvr_worker_kv_holds",
                                    "Finished prefill legs whose blocks are held", NULL, NULL);
    d->m_holds = kvr_metrics_counter(w->metrics, "kvr_worker_kv_holds_total",
                                     "Holds ended: read by a decoder, expired (--kv-hold-timeout), "
                                     "aborted (transfer broken), dropped (table full)",
                                     "result", HOLD_LABELS);
    if (!d->prefill && !d->decode)
        return 0;
    kvr_err kerr = {0};
    int rc = kvr_auth_key_load(&d->key, d->o->kv_secret_file, &kerr);
    if (rc)
        return kvr_err_set(err, rc, "--kv-secret-file: %s", kerr.msg);
    d->kk = (kvx_key){d->key.k, d->key.len};
    uint8_t rnd[8];
    if (RAND_bytes(rnd, sizeof rnd) != 1)
        return kvr_err_set(err, KVR_EIO, "no random bytes");
    snprintf(d->engine_id, sizeof d->engine_id,
             "kvr-worker-%" PRIu64 "-%02x%02x%02x%02x%02x%02x%02x%02x", w->o.id, rnd[0], rnd[1],
             rnd[2], rnd[3], rnd[4], rnd[5], rnd[6], rnd[7]);
    if (!d->prefill)
        return 0;
    if (d->o->kv_host)
        snprintf(d->host, sizeof d->host, "%s", d->o->kv_host);
    else
        host_of(w->o.listen, d->host, sizeof d->host);
    struct sockaddr_storage ss;
    if (uv_ip4_addr(d->host, (int)d->o->kv_port, (struct sockaddr_in *)&ss) != 0 &&
        uv_ip6_addr(d->host, (int)d->o->kv_port, (struct sockaddr_in6 *)&ss) != 0)
        return kvr_err_set(err, KVR_EINVAL, "--kv-host %s is not an IP address", d->host);
    uv_tcp_init(w->loop, &d->srv);
    d->srv.data = d;
    d->srv_on = true;
    if ((rc = uv_tcp_bind(&d->srv, (struct sockaddr *)&ss, 0)) != 0 ||
        (rc = uv_listen((uv_stream_t *)&d->srv, 128, on_side_conn)) != 0)
        return kvr_err_set(err, KVR_EIO, "KV side channel %s:%" PRIu64 ": %s", d->host,
                           d->o->kv_port, uv_strerror(rc));
    struct sockaddr_storage bound;
    int blen = sizeof bound;
    uv_tcp_getsockname(&d->srv, (struct sockaddr *)&bound, &blen);
    d->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                : ((struct sockaddr_in *)&bound)->sin_port);
    if (d->o->kv_advertise)
        snprintf(d->adv, sizeof d->adv, "%s", d->o->kv_advertise);
    else if (strcmp(d->host, "0.0.0.0") == 0 || strcmp(d->host, "::") == 0)
        snprintf(d->adv, sizeof d->adv, "127.0.0.1");
    else
        snprintf(d->adv, sizeof d->adv, "%s", d->host);
    KVR_LOG_INFO("kv side channel",
                 "addr=%s port=%d remote_host=%s engine_id=%s bytes_per_block=%" PRIu64
                 " bandwidth=%g hold_timeout_s=%g",
                 d->host, d->port, d->adv, d->engine_id, d->o->kv_bytes_per_block,
                 d->o->kv_bandwidth, d->o->kv_hold_timeout);
    return 0;
}

static void noop_closed(uv_handle_t *h)
{
    (void)h;
}

void wk_dg_close(worker *w)
{
    wk_dg *d = w->dg;
    if (!d || d->closing)
        return;
    d->closing = true;
    while (d->pulls) /* requests were freed first; whatever is left is abandoned */
        pull_finish(d->pulls, PULL_CANCELLED);
    while (d->conns)
        conn_close(d->conns);
    while (d->fhead) {
        dg_hold *h = d->fhead;
        hold_unlink(d, h);
        hold_release(d, h, HOLD_DROPPED);
    }
    uv_timer_stop(&d->hold_timer);
    uv_close((uv_handle_t *)&d->hold_timer, noop_closed);
    if (d->srv_on)
        uv_close((uv_handle_t *)&d->srv, noop_closed);
    OPENSSL_cleanse(&d->key, sizeof d->key);
}

uint32_t wk_dg_waiting(const worker *w)
{
    return w->dg ? w->dg->n_pulls : 0;
}
