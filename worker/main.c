/* kvr-worker: a simulated inference engine behind an OpenAI-compatible HTTP API that
 * publishes real KV-cache events and heartbeats on NATS (DESIGN 3, 4, 9).
 *
 * One libuv loop thread owns everything: the engine (worker/engine.h), the HTTP server, the
 * NATS bridge (its callbacks arrive on this thread), the timers.
 *
 * Clocks: the engine runs on a simulated clock in ns. `drive()` maps it onto the monotonic
 * wall clock (uv_hrtime since start): it runs a step whenever the engine's clock is at or
 * behind the wall clock, and delivers a step's tokens when the wall clock reaches the step's
 * end. When idle the engine clock jumps to the wall clock. If steps take more CPU than the
 * simulated time they stand for, the engine falls behind: lag = wall - sim at the start of a
 * step, exported as kvr_worker_sim_lag_seconds (and _max); kvr_worker_clock_seconds{clock=
 * "sim"|"wall"} exports both clocks, so over a saturated window 1 - d(sim)/d(wall) is the
 * fraction of time the engine lost (an idle engine's clock jumps to the wall clock).
 *
 * Output granularity: tokens a stream gets in one delivery (normally one step; several when
 * the timer wakes after several short steps, e.g. at high --speedup) go out as one SSE chunk,
 * whose choices[0].text and token_ids hold all of them. */
#include "engine.h"
#include "kv_event.h"
#include "kvr_buf.h"
#include "kvr_err.h"
#include "kvr_heartbeat.h"
#include "kvr_http.h"
#include "kvr_log.h"
#include "kvr_metrics.h"
#include "kvr_nats.h"
#include "kvr_nats_flags.h"
#include "kvr_tok.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>
#include <xxhash.h>

#define MAX_PROMPT_TOKENS (1u << 20)
#define EVENT_MAX_TOKENS_PER_PAYLOAD 65536u /* bounds one payload to ~200-400 KiB */
#define DRIVE_BUDGET_NS 5000000             /* yield to I/O after 5 ms of stepping */
#define DRAIN_TIMEOUT_MS 10000

typedef struct opts {
    const char *listen, *nats, *ns, *model, *role, *event_format, *hash_format, *log_level;
    const char *advertise;
    uint64_t id, seed, event_buffer_max, resync_after_ms, announce_delay_ms, stream_interval;
    uint64_t block_size, capacity_blocks, max_num_seqs, max_batched_tokens, max_model_len;
    double speedup;
    kvr_nats_flags nats_sec; /* --nats-user, --nats-creds, --nats-tls-ca, ... */
} opts;

/* A completion request received but not parsed yet: parsing (JSON, tokens, engine add) is
 * done from drive(), a few requests between engine steps, so a burst of arrivals does not
 * stall the simulated clock for the whole burst. */
typedef struct preq {
    kvr_http_req *req;
    bool chat, gone;
    struct preq *next;
} preq;

typedef struct wreq wreq;

typedef struct worker {
    opts o;
    uv_loop_t *loop;
    kvr_engine *eng;
    kvr_http_server http;
    kvr_nats nats;
    bool nats_ok;
    kvr_metrics *metrics;
    uv_timer_t drive_timer, hb_timer, drain_timer, flush_timer;
    bool flush_pending; /* connected, but events wait until the routers have seen a heartbeat */
    uv_signal_t sigterm, sigint;
    uint64_t t0;
    int64_t started_ms;
    char url[160];
    char subj_kv[256], subj_hb[256];
    kvr_kv_format efmt;
    kvr_kv_hash_format hfmt;
    /* streams with tokens to deliver: `future` ones are due at the engine's clock, `ready`
     * ones now */
    wreq **ready, **future;
    size_t n_ready, cap_ready, n_future, cap_future;
    uint64_t next_req;
    size_t live_reqs;
    wreq *live;
    preq *pend_head, *pend_tail;
    size_t n_pend;
    /* event buffer while NATS is away */
    kvr_buf *evbuf;
    size_t n_evbuf, cap_evbuf;
    bool need_resync;
    int64_t disconnected_at; /* kvr_mono_ms of the last disconnect, 0 while connected */
    kvr_buf scratch;
    /* clocks */
    int64_t lag_ns, lag_max_ns; /* at the start of the last step; the largest */
    int64_t lag_erased_ns;      /* lag forgiven by idle jumps, total */
    int64_t last_drive_end;
    bool draining, closing;
    /* metrics */
    kvr_metric *m_prompt, *m_cached, *m_gen, *m_running, *m_waiting, *m_used, *m_cached_blocks,
        *m_capacity, *m_steps, *m_preempt, *m_requests, *m_finished, *m_cancelled, *m_lag,
        *m_lag_max, *m_lag_erased, *m_busy, *m_ev_pub, *m_ev_batches, *m_ev_dropped, *m_resyncs, *m_evbuf,
        *m_bad_req, *m_stored, *m_removed, *m_hb;
} worker;

struct wreq {
    worker *w;
    wreq *lprev, *lnext; /* every live request */
    kvr_http_req *http;  /* NULL once finished */
    kvr_engine_seq *seq; /* NULL once finished or cancelled */
    bool chat, stream, include_usage, echo_model;
    bool gone, done_future, done_ready, in_ready, in_future, role_sent, started;
    uint32_t prompt_tokens, cached_tokens, completion_tokens;
    kvr_buf toks; /* u32 tokens not yet written */
    size_t n_ready_toks;
    size_t n_written;
    kvr_buf all; /* non-streaming: every token */
    char id[64];
    char model[128];
    int64_t created;
};

static worker W;

static int64_t wall_ns(worker *w)
{
    return (int64_t)(uv_hrtime() - w->t0);
}

/* ------------------------------------------------------------------ flags */

static int parse_u64(const char *s, uint64_t *v)
{
    char *end;
    errno = 0;
    unsigned long long x = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-')
        return -1;
    *v = x;
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvr-worker --listen ADDR --nats URL --namespace NS --model M --id N\n"
            "  [--block-size 64] [--capacity-blocks 16384] [--max-num-seqs 256]\n"
            "  [--max-batched-tokens 8192] [--max-model-len 131072] [--speedup 1.0]\n"
            "  [--role both|prefill|decode] [--event-format array|map] [--hash-format int|bytes]\n"
            "  [--seed S] [--log-level info] [--event-buffer-max 10000] [--resync-after-ms 2500]\n"
            "  [--announce-delay-ms 1500] [--stream-interval 1] [--advertise-url URL]\n"
            "  [--nats-user U --nats-password-file F | --nats-token-file F | --nats-nkey F |\n"
            "   --nats-creds F] [--nats-tls-ca F [--nats-tls-cert F --nats-tls-key F]]\n");
}

static int parse_flags(opts *o, int argc, char **argv, kvr_err *err)
{
    *o = (opts){.listen = "127.0.0.1:9001", .nats = "nats://127.0.0.1:4222", .ns = "default",
                .model = "sim", .role = "both", .event_format = "array", .hash_format = "int",
                .log_level = "info", .id = 1, .seed = 0, .event_buffer_max = 10000, .resync_after_ms = 2500, .announce_delay_ms = 1500, .stream_interval = 1,
                .block_size = 64, .capacity_blocks = 16384, .max_num_seqs = 256,
                .max_batched_tokens = 8192, .max_model_len = 131072, .speedup = 1.0};
    struct {
        const char *name;
        int kind; /* 0 str, 1 u64, 2 double */
        void *dst;
    } fl[] = {
        {"listen", 0, &o->listen},
        {"nats", 0, &o->nats},
        {"namespace", 0, &o->ns},
        {"model", 0, &o->model},
        {"role", 0, &o->role},
        {"event-format", 0, &o->event_format},
        {"hash-format", 0, &o->hash_format},
        {"log-level", 0, &o->log_level},
        {"advertise-url", 0, &o->advertise},
        {"id", 1, &o->id},
        {"seed", 1, &o->seed},
        {"event-buffer-max", 1, &o->event_buffer_max},
        {"resync-after-ms", 1, &o->resync_after_ms},
        {"announce-delay-ms", 1, &o->announce_delay_ms},
        {"stream-interval", 1, &o->stream_interval},
        {"block-size", 1, &o->block_size},
        {"capacity-blocks", 1, &o->capacity_blocks},
        {"max-num-seqs", 1, &o->max_num_seqs},
        {"max-batched-tokens", 1, &o->max_batched_tokens},
        {"max-model-len", 1, &o->max_model_len},
        {"speedup", 2, &o->speedup},
    };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help"))
            return 1;
        if (strncmp(a, "--", 2) != 0)
            return kvr_err_set(err, KVR_EINVAL, "unexpected argument '%s'", a);
        a += 2;
        const char *eq = strchr(a, '=');
        size_t nlen = eq ? (size_t)(eq - a) : strlen(a);
        const char *val = eq ? eq + 1 : NULL;
        size_t k;
        for (k = 0; k < sizeof fl / sizeof fl[0]; k++)
            if (strlen(fl[k].name) == nlen && !strncmp(fl[k].name, a, nlen))
                break;
        if (k == sizeof fl / sizeof fl[0]) {
            if (!kvr_nats_flags_set(&o->nats_sec, a, nlen, NULL))
                return kvr_err_set(err, KVR_EINVAL, "unknown flag --%.*s", (int)nlen, a);
            if (!val && i + 1 >= argc)
                return kvr_err_set(err, KVR_EINVAL, "flag --%.*s needs a value", (int)nlen, a);
            kvr_nats_flags_set(&o->nats_sec, a, nlen, val ? val : argv[++i]);
            continue;
        }
        if (!val) {
            if (i + 1 >= argc)
                return kvr_err_set(err, KVR_EINVAL, "flag --%s needs a value", fl[k].name);
            val = argv[++i];
        }
        if (fl[k].kind == 0) {
            *(const char **)fl[k].dst = val;
        } else if (fl[k].kind == 1) {
            if (parse_u64(val, fl[k].dst))
                return kvr_err_set(err, KVR_EINVAL, "--%s: '%s' is not a non-negative integer",
                                   fl[k].name, val);
        } else {
            char *end;
            double d = strtod(val, &end);
            if (end == val || *end)
                return kvr_err_set(err, KVR_EINVAL, "--%s: '%s' is not a number", fl[k].name, val);
            *(double *)fl[k].dst = d;
        }
    }
    if (strcmp(o->role, "both") && strcmp(o->role, "prefill") && strcmp(o->role, "decode"))
        return kvr_err_set(err, KVR_EINVAL, "--role must be both, prefill or decode");
    if (strcmp(o->event_format, "array") && strcmp(o->event_format, "map"))
        return kvr_err_set(err, KVR_EINVAL, "--event-format must be array or map");
    if (strcmp(o->hash_format, "int") && strcmp(o->hash_format, "bytes"))
        return kvr_err_set(err, KVR_EINVAL, "--hash-format must be int or bytes");
    if (o->stream_interval < 1 || o->stream_interval > 1000000)
        return kvr_err_set(err, KVR_EINVAL, "--stream-interval must be in 1..1000000 tokens");
    if (o->event_buffer_max < 1 || o->event_buffer_max > 10000000)
        return kvr_err_set(err, KVR_EINVAL, "--event-buffer-max must be in 1..10000000");
    uint64_t lim32[] = {o->block_size, o->capacity_blocks, o->max_num_seqs,
                        o->max_batched_tokens, o->max_model_len};
    for (size_t i = 0; i < 5; i++)
        if (lim32[i] == 0 || lim32[i] > UINT32_MAX)
            return kvr_err_set(err, KVR_EINVAL, "sizes must be in 1..2^32-1");
    if (strlen(o->ns) == 0 || strlen(o->ns) > 100 || strpbrk(o->ns, ". *>\t\r\n"))
        return kvr_err_set(err, KVR_EINVAL, "--namespace must be 1..100 chars without . * > or spaces");
    if (strlen(o->model) > 100)
        return kvr_err_set(err, KVR_EINVAL, "--model is longer than 100 chars");
    return kvr_nats_flags_load(&o->nats_sec, err);
}

/* ------------------------------------------------------------------ NATS: events, heartbeat */

static void ev_buffer_drop(worker *w)
{
    for (size_t i = 0; i < w->n_evbuf; i++)
        kvr_buf_free(&w->evbuf[i]);
    w->n_evbuf = 0;
    kvr_metric_set(w->m_evbuf, 0, 0);
}

/* Publishes or buffers one encoded payload (takes ownership of *b's memory). */
static void ev_send(worker *w, kvr_buf *b)
{
    if (w->need_resync) { /* the buffer overflowed: the resync will carry the state */
        kvr_buf_free(b);
        return;
    }
    if (w->n_evbuf == 0 && !w->flush_pending && kvr_nats_connected(&w->nats)) {
        int rc = kvr_nats_publish(&w->nats, w->subj_kv, b->base, b->len);
        if (rc == 0) {
            kvr_metric_inc(w->m_ev_batches);
            kvr_buf_free(b);
            return;
        }
        KVR_LOG_WARN_RL(5, "event publish failed, buffering", "err=\"%s\"", kvr_strerror(rc));
    }
    if (w->n_evbuf >= w->o.event_buffer_max) {
        KVR_LOG_WARN("event buffer full: dropping it, will resync on reconnect",
                     "buffered=%zu", w->n_evbuf);
        kvr_metric_add(w->m_ev_dropped, 0, w->n_evbuf + 1);
        ev_buffer_drop(w);
        kvr_buf_free(b);
        w->need_resync = true;
        return;
    }
    if (w->n_evbuf == w->cap_evbuf) {
        size_t nc = w->cap_evbuf ? w->cap_evbuf * 2 : 64;
        kvr_buf *n = realloc(w->evbuf, nc * sizeof *n);
        if (!n) {
            kvr_buf_free(b);
            ev_buffer_drop(w);
            w->need_resync = true;
            return;
        }
        w->evbuf = n;
        w->cap_evbuf = nc;
    }
    w->evbuf[w->n_evbuf++] = *b;
    kvr_buf_init(b);
    kvr_metric_set(w->m_evbuf, 0, (double)w->n_evbuf);
}

static void publish_engine_events(worker *w)
{
    kvr_kv_batch batch;
    while (kvr_engine_take_events(w->eng, EVENT_MAX_TOKENS_PER_PAYLOAD, &batch) > 0) {
        batch.ts = (double)kvr_now_ms() / 1000.0;
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

/* After a (re)connect: flush what was buffered, or send the whole cache after a drop. */
static void ev_flush_buffer(worker *w)
{
    if (!kvr_nats_connected(&w->nats))
        return;
    if (w->need_resync) {
        w->need_resync = false;
        ev_buffer_drop(w);
        if (kvr_engine_queue_resync(w->eng) != 0) {
            w->need_resync = true;
            return;
        }
        kvr_metric_inc(w->m_resyncs);
        KVR_LOG_INFO("resync: AllBlocksCleared + current cache", "subject=%s", w->subj_kv);
        publish_engine_events(w);
        return;
    }
    size_t i = 0;
    for (; i < w->n_evbuf; i++) {
        if (kvr_nats_publish(&w->nats, w->subj_kv, w->evbuf[i].base, w->evbuf[i].len) != 0)
            break;
        kvr_metric_inc(w->m_ev_batches);
        kvr_buf_free(&w->evbuf[i]);
    }
    if (i > 0 && i < w->n_evbuf)
        memmove(w->evbuf, w->evbuf + i, (w->n_evbuf - i) * sizeof *w->evbuf);
    w->n_evbuf -= i;
    kvr_metric_set(w->m_evbuf, 0, (double)w->n_evbuf);
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
                     w->n_evbuf);
        w->need_resync = true;
    }
    w->disconnected_at = 0;
    if (w->closing)
        return;
    send_heartbeat(w);
    w->flush_pending = true;
    uv_timer_start(&w->flush_timer, on_flush_timer, w->o.announce_delay_ms, 0);
}

static void on_nats_state(kvr_nats *kn, kvr_nats_state st, void *data)
{
    worker *w = data;
    KVR_LOG_INFO("nats", "state=%s", kvr_nats_state_name(st));
    if (st == KVR_NATS_DISCONNECTED && !w->disconnected_at)
        w->disconnected_at = kvr_mono_ms();
    if (st == KVR_NATS_CONNECTED || st == KVR_NATS_RECONNECTED)
        on_connected(w);
}

static void heartbeat(uv_timer_t *t)
{
    worker *w = t->data;
    if (!kvr_nats_connected(&w->nats))
        return;
    if ((w->disconnected_at || w->n_evbuf || w->need_resync) && !w->flush_pending) {
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
    char mdc[32];
    snprintf(mdc, sizeof mdc, "%016" PRIx64,
             XXH3_64bits_withSeed(w->o.model, strlen(w->o.model), w->o.block_size));
    kvr_heartbeat hb = {.id = w->o.id,
                        .ns = kvr_slice_of(w->o.ns),
                        .model = kvr_slice_of(w->o.model),
                        .role = kvr_slice_of(w->o.role),
                        .url = kvr_slice_of(w->url),
                        .mdc_sum = kvr_slice_of(mdc),
                        .block_size = w->o.block_size,
                        .capacity_blocks = w->o.capacity_blocks,
                        .active = st.running,
                        .waiting = st.waiting,
                        .used_blocks = st.used_blocks,
                        .started_ms = (uint64_t)w->started_ms};
    int rc = kvr_heartbeat_encode(b, &hb);
    if (rc == 0 && kvr_nats_publish(&w->nats, w->subj_hb, b->base, b->len) == 0)
        kvr_metric_inc(w->m_hb);
}

/* ------------------------------------------------------------------ responses */

static void append_text(kvr_buf *b, const uint32_t *t, size_t n)
{
    char tmp[256];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (t[i] < 256)
            tmp[k++] = (char)t[i];
        if (k == sizeof tmp || i + 1 == n) {
            kvr_tok_json_escape(b, tmp, k);
            k = 0;
        }
    }
}

/* "[1,2,3]" without printf: this runs for every token the worker streams */
static void append_ids(kvr_buf *b, const uint32_t *t, size_t n)
{
    if (kvr_buf_reserve(b, 2 + n * 11) != 0)
        return;
    char *p = b->base + b->len;
    *p++ = '[';
    for (size_t i = 0; i < n; i++) {
        if (i)
            *p++ = ',';
        char tmp[10];
        int k = 0;
        uint32_t v = t[i];
        do {
            tmp[k++] = (char)('0' + v % 10);
            v /= 10;
        } while (v);
        while (k)
            *p++ = tmp[--k];
    }
    *p++ = ']';
    b->len = (size_t)(p - b->base);
}

static void append_usage(kvr_buf *b, const wreq *r)
{
    kvr_buf_appendf(b,
                    "\"usage\":{\"prompt_tokens\":%u,\"completion_tokens\":%u,\"total_tokens\":%u,"
                    "\"prompt_tokens_details\":{\"cached_tokens\":%u}}",
                    r->prompt_tokens, r->completion_tokens, r->prompt_tokens + r->completion_tokens,
                    r->cached_tokens);
}

static void append_head(kvr_buf *b, const wreq *r, const char *object)
{
    kvr_buf_appendf(b, "{\"id\":\"%s\",\"object\":\"%s\",\"created\":%" PRId64 ",\"model\":\"", r->id,
                    object, r->created);
    kvr_tok_json_escape(b, r->model, strlen(r->model));
    kvr_buf_append_cstr(b, "\",");
}

static void wreq_free(wreq *r)
{
    worker *w = r->w;
    if (r->lprev)
        r->lprev->lnext = r->lnext;
    else
        w->live = r->lnext;
    if (r->lnext)
        r->lnext->lprev = r->lprev;
    w->live_reqs--;
    kvr_buf_free(&r->toks);
    kvr_buf_free(&r->all);
    free(r);
}

static void respond_error(kvr_http_req *req, int status, const char *type, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void respond_error(kvr_http_req *req, int status, const char *type, const char *fmt, ...)
{
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_buf_append_cstr(&b, "{\"error\":{\"message\":\"");
    kvr_tok_json_escape(&b, msg, strlen(msg));
    kvr_buf_appendf(&b, "\",\"type\":\"%s\",\"param\":null,\"code\":%d}}", type, status);
    if (status == 503)
        kvr_http_add_header(req, "Retry-After", "1");
    kvr_http_respond(req, status, "application/json", b.base, b.len);
    kvr_buf_free(&b);
}

/* Writes what is ready for r; finishes and frees r when it is done. Returns true if freed. */
static bool wreq_flush(wreq *r)
{
    worker *w = r->w;
    if (r->gone) {
        if (r->http) {
            if (r->started)
                kvr_http_stream_end(r->http);
            else
                kvr_http_respond(r->http, 499, NULL, NULL, 0);
            r->http = NULL;
        }
        wreq_free(r);
        return true;
    }
    const uint32_t *toks = (const uint32_t *)(const void *)r->toks.base;
    size_t n = r->n_ready_toks;
    kvr_buf *b = &w->scratch;
    if (!r->stream) {
        if (n)
            kvr_buf_append(&r->all, toks, n * sizeof(uint32_t));
        kvr_buf_consume(&r->toks, n * sizeof(uint32_t));
        r->n_ready_toks = 0;
        if (!r->done_ready)
            return false;
        const uint32_t *all = (const uint32_t *)(const void *)r->all.base;
        size_t na = r->all.len / sizeof(uint32_t);
        kvr_buf_reset(b);
        append_head(b, r, r->chat ? "chat.completion" : "text_completion");
        kvr_buf_append_cstr(b, "\"choices\":[{\"index\":0,");
        if (r->chat) {
            kvr_buf_append_cstr(b, "\"message\":{\"role\":\"assistant\",\"content\":\"");
            append_text(b, all, na);
            kvr_buf_append_cstr(b, "\"},");
        } else {
            kvr_buf_append_cstr(b, "\"text\":\"");
            append_text(b, all, na);
            kvr_buf_append_cstr(b, "\",");
        }
        kvr_buf_append_cstr(b, "\"token_ids\":");
        append_ids(b, all, na);
        kvr_buf_append_cstr(b, ",\"logprobs\":null,\"finish_reason\":\"length\"}],");
        append_usage(b, r);
        kvr_buf_append_cstr(b, "}");
        kvr_http_respond(r->http, 200, "application/json", b->base, b->len);
        r->http = NULL;
        wreq_free(r);
        return true;
    }
    if (!r->started) {
        r->started = true;
        kvr_http_stream_start(r->http, 200, "text/event-stream");
    }
    /* like vLLM's --stream-interval: a chunk carries at least that many tokens (or the end) */
    if (!r->done_ready && n < w->o.stream_interval)
        return false;
    if (!r->done_ready && kvr_http_stream_should_pause(r->http))
        return false; /* on_drain brings us back; tokens wait in r->toks (bounded by max_tokens) */
    kvr_buf_reset(b);
    if (n || (r->chat && !r->role_sent)) {
        kvr_buf_append_cstr(b, "data: ");
        append_head(b, r, r->chat ? "chat.completion.chunk" : "text_completion");
        kvr_buf_append_cstr(b, "\"choices\":[{\"index\":0,");
        if (r->chat) {
            kvr_buf_append_cstr(b, "\"delta\":{");
            if (!r->role_sent) {
                kvr_buf_append_cstr(b, "\"role\":\"assistant\",");
                r->role_sent = true;
            }
            kvr_buf_append_cstr(b, "\"content\":\"");
            append_text(b, toks, n);
            kvr_buf_append_cstr(b, "\"},");
        } else {
            kvr_buf_append_cstr(b, "\"text\":\"");
            append_text(b, toks, n);
            kvr_buf_append_cstr(b, "\",");
        }
        kvr_buf_append_cstr(b, "\"token_ids\":");
        append_ids(b, toks, n);
        kvr_buf_appendf(b, ",\"logprobs\":null,\"finish_reason\":%s}]}\n\n",
                        r->done_ready ? "\"length\"" : "null");
    }
    kvr_buf_consume(&r->toks, n * sizeof(uint32_t));
    r->n_ready_toks = 0;
    if (r->done_ready) {
        if (r->include_usage) {
            kvr_buf_append_cstr(b, "data: ");
            append_head(b, r, r->chat ? "chat.completion.chunk" : "text_completion");
            kvr_buf_append_cstr(b, "\"choices\":[],");
            append_usage(b, r);
            kvr_buf_append_cstr(b, "}\n\n");
        }
        kvr_buf_append_cstr(b, "data: [DONE]\n\n");
    }
    if (b->len)
        kvr_http_stream_write(r->http, b->base, b->len);
    if (r->done_ready) {
        kvr_http_stream_end(r->http);
        r->http = NULL;
        wreq_free(r);
        return true;
    }
    return false;
}

static int list_add(wreq ***arr, size_t *n, size_t *cap, wreq *r)
{
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 256;
        wreq **a = realloc(*arr, nc * sizeof *a);
        if (!a)
            return KVR_ENOMEM;
        *arr = a;
        *cap = nc;
    }
    (*arr)[(*n)++] = r;
    return 0;
}

static void mark_ready(worker *w, wreq *r)
{
    if (r->in_ready)
        return;
    if (list_add(&w->ready, &w->n_ready, &w->cap_ready, r) == 0)
        r->in_ready = true;
}

/* Outputs of steps whose end the wall clock has reached become ready. */
static void promote_future(worker *w)
{
    for (size_t i = 0; i < w->n_future; i++) {
        wreq *r = w->future[i];
        r->in_future = false;
        r->n_ready_toks = r->toks.len / sizeof(uint32_t);
        r->done_ready = r->done_future;
        mark_ready(w, r);
    }
    w->n_future = 0;
}

static void flush_ready(worker *w)
{
    /* a flush never adds to `ready`, but can free entries: take the list first */
    for (size_t i = 0; i < w->n_ready; i++) {
        wreq *r = w->ready[i];
        r->in_ready = false;
        if (r->in_future) { /* more tokens due later: keep r alive until then */
            if (!r->gone)
                wreq_flush(r);
            continue;
        }
        wreq_flush(r);
    }
    w->n_ready = 0;
}

/* ------------------------------------------------------------------ driving the engine */

/* An idle engine's clock jumps to the wall clock. If its last step had started late, that
 * lag is forgiven by the jump: count it, so "how far behind" stays honest across idle gaps. */
static void engine_idle_jump(worker *w, int64_t now)
{
    if (kvr_engine_has_work(w->eng))
        return;
    if (w->lag_ns > 0)
        w->lag_erased_ns += w->lag_ns;
    w->lag_ns = 0;
    kvr_engine_idle_until(w->eng, now);
}

static void on_outputs(worker *w, const kvr_engine_output *o, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        wreq *r = o[i].data;
        if (!r)
            continue;
        r->completion_tokens++;
        r->prompt_tokens = o[i].prompt_tokens;
        r->cached_tokens = o[i].cached_tokens;
        kvr_buf_append(&r->toks, &o[i].token, sizeof(uint32_t));
        if (o[i].finished) {
            r->done_future = true;
            r->seq = NULL;
        }
        if (!r->in_future && list_add(&w->future, &w->n_future, &w->cap_future, r) == 0)
            r->in_future = true;
    }
}

static void admit_pending(worker *w, size_t max);

static void drive(uv_timer_t *t)
{
    worker *w = t->data;
    int64_t start = wall_ns(w);
    int64_t now = start;
    if (kvr_engine_now_ns(w->eng) <= now)
        promote_future(w);
    for (;;) {
        admit_pending(w, 16);
        if (!kvr_engine_has_work(w->eng)) {
            engine_idle_jump(w, now);
            if (w->n_pend)
                continue;
            break;
        }
        int64_t sim = kvr_engine_now_ns(w->eng);
        if (sim > now)
            break;
        promote_future(w);
        w->lag_ns = now - sim;
        if (w->lag_ns > w->lag_max_ns)
            w->lag_max_ns = w->lag_ns;
        if (w->lag_ns > 100000000) {
            kvr_engine_stats es;
            kvr_engine_get_stats(w->eng, &es);
            KVR_LOG_WARN_RL(1, "simulated clock behind", "lag_ms=%.1f since_last_drive_ms=%.1f "
                            "pending=%zu running=%u waiting=%u live=%zu",
                            (double)w->lag_ns / 1e6, (double)(start - w->last_drive_end) / 1e6,
                            w->n_pend, es.running, es.waiting, w->live_reqs);
        }
        kvr_engine_step_info info;
        const kvr_engine_output *outs;
        size_t n_outs;
        if (kvr_engine_step(w->eng, &info, &outs, &n_outs) != 0)
            KVR_LOG_ERROR_RL(5, "engine step failed", "err=\"%s\"", kvr_strerror(KVR_ENOMEM));
        on_outputs(w, outs, n_outs);
        publish_engine_events(w);
        now = wall_ns(w);
        if (now - start > DRIVE_BUDGET_NS)
            break;
    }
    flush_ready(w);
    w->last_drive_end = wall_ns(w);
    if (w->closing)
        return;
    if (kvr_engine_has_work(w->eng) || w->n_future || w->n_pend) {
        int64_t due = kvr_engine_now_ns(w->eng) - wall_ns(w);
        uint64_t ms = due <= 0 || w->n_pend ? 0 : (uint64_t)((due + 999999) / 1000000);
        uv_timer_start(&w->drive_timer, drive, ms, 0);
    }
}

static void kick_drive(worker *w)
{
    if (!w->closing && !uv_is_active((uv_handle_t *)&w->drive_timer))
        uv_timer_start(&w->drive_timer, drive, 0, 0);
    else if (!w->closing && uv_timer_get_due_in(&w->drive_timer) > 0)
        uv_timer_start(&w->drive_timer, drive, 0, 0);
}

/* ------------------------------------------------------------------ requests */

static void on_req_gone(kvr_http_req *req)
{
    wreq *r = req->data;
    if (!r || r->gone)
        return;
    r->gone = true;
    if (r->seq) {
        kvr_engine_cancel(r->w->eng, r->seq);
        r->seq = NULL;
    }
    /* finishing the request happens in the next flush, outside the server's callback */
    mark_ready(r->w, r);
    kick_drive(r->w);
}

static void on_req_drain(kvr_http_req *req)
{
    wreq *r = req->data;
    if (!r || r->gone)
        return;
    r->n_ready_toks = r->in_future ? r->n_ready_toks : r->toks.len / sizeof(uint32_t);
    mark_ready(r->w, r);
    kick_drive(r->w);
}

/* Tokens of the request body: "prompt" (string or token-id array) or chat "messages". */
static int request_tokens(const cJSON *root, bool chat, kvr_buf *toks, kvr_err *err)
{
    const kvr_tokenizer *tok = kvr_tok_byte();
    if (chat) {
        const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
        if (!cJSON_IsArray(msgs))
            return kvr_err_set(err, KVR_EINVAL, "'messages' must be an array");
        int n = cJSON_GetArraySize(msgs);
        if (n < 1 || n > KVR_TOK_MAX_MESSAGES)
            return kvr_err_set(err, KVR_EINVAL, "'messages' must hold 1..%d messages",
                               KVR_TOK_MAX_MESSAGES);
        kvr_chat_msg *cm = calloc((size_t)n, sizeof *cm);
        if (!cm)
            return kvr_err_set(err, KVR_ENOMEM, "messages");
        int i = 0, rc = 0;
        const cJSON *m;
        cJSON_ArrayForEach(m, msgs)
        {
            const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
            const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
            if (!cJSON_IsString(role) || !cJSON_IsString(content)) {
                rc = kvr_err_set(err, KVR_EINVAL,
                                 "messages[%d] needs string 'role' and 'content'", i);
                break;
            }
            cm[i].role = kvr_slice_of(role->valuestring);
            cm[i].content = kvr_slice_of(content->valuestring);
            i++;
        }
        kvr_buf text;
        kvr_buf_init(&text);
        if (rc == 0)
            rc = kvr_tok_chat(tok, cm, (size_t)n, 1, &text, err);
        if (rc == 0)
            rc = kvr_tok_encode(tok, (kvr_slice){text.base, text.len}, toks, err);
        kvr_buf_free(&text);
        free(cm);
        return rc;
    }
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "prompt");
    if (cJSON_IsString(p))
        return kvr_tok_encode(tok, kvr_slice_of(p->valuestring), toks, err);
    if (!cJSON_IsArray(p))
        return kvr_err_set(err, KVR_EINVAL, "'prompt' must be a string or an array of token ids");
    int n = cJSON_GetArraySize(p);
    if ((unsigned)n > MAX_PROMPT_TOKENS)
        return kvr_err_set(err, KVR_ELIMIT, "prompt of %d tokens is over %u", n, MAX_PROMPT_TOKENS);
    if (kvr_buf_reserve(toks, (size_t)n * sizeof(uint32_t)))
        return kvr_err_set(err, KVR_ENOMEM, "prompt");
    int i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, p)
    {
        double d = it->valuedouble;
        if (!cJSON_IsNumber(it) || d < 0 || d > 2147483647.0 || d != (double)(int64_t)d)
            return kvr_err_set(err, KVR_EINVAL, "prompt[%d] is not a token id (0..2^31-1)", i);
        uint32_t t = (uint32_t)d;
        kvr_buf_append(toks, &t, sizeof t);
        i++;
    }
    return 0;
}

static void handle_completion(worker *w, kvr_http_req *req, bool chat)
{
    kvr_err err = {0};
    cJSON *root = cJSON_ParseWithLength(req->body.base, req->body.len);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        kvr_metric_inc(w->m_bad_req);
        respond_error(req, 400, "invalid_request_error", "body is not a JSON object");
        return;
    }
    kvr_buf toks;
    kvr_buf_init(&toks);
    wreq *r = NULL;
    int64_t max_tokens = 16;
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, chat ? "max_completion_tokens" : "max_tokens");
    if (!mt && chat)
        mt = cJSON_GetObjectItemCaseSensitive(root, "max_tokens");
    if (mt && !cJSON_IsNull(mt)) {
        if (!cJSON_IsNumber(mt) || mt->valuedouble < 1 || mt->valuedouble > (double)w->o.max_model_len ||
            mt->valuedouble != (double)(int64_t)mt->valuedouble) {
            respond_error(req, 400, "invalid_request_error", "max_tokens must be an integer in 1..%" PRIu64,
                          w->o.max_model_len);
            goto bad;
        }
        max_tokens = (int64_t)mt->valuedouble;
    }
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(root, "stream");
    if (st && !cJSON_IsNull(st) && !cJSON_IsBool(st)) {
        respond_error(req, 400, "invalid_request_error", "'stream' must be a boolean");
        goto bad;
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (model && !cJSON_IsNull(model) && !cJSON_IsString(model)) {
        respond_error(req, 400, "invalid_request_error", "'model' must be a string");
        goto bad;
    }
    if (request_tokens(root, chat, &toks, &err) != 0) {
        respond_error(req, err.code == KVR_ENOMEM ? 500 : 400, "invalid_request_error", "%s", err.msg);
        goto bad;
    }
    size_t n = kvr_tok_count(&toks);
    if (n == 0) {
        respond_error(req, 400, "invalid_request_error", "empty prompt");
        goto bad;
    }
    r = calloc(1, sizeof *r);
    if (!r) {
        respond_error(req, 500, "server_error", "out of memory");
        goto bad;
    }
    r->w = w;
    w->live_reqs++;
    r->lnext = w->live;
    if (w->live)
        w->live->lprev = r;
    w->live = r;
    r->http = req;
    r->chat = chat;
    r->stream = cJSON_IsTrue(st);
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    r->include_usage = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(so, "include_usage"));
    snprintf(r->model, sizeof r->model, "%s",
             cJSON_IsString(model) ? model->valuestring : w->o.model);
    snprintf(r->id, sizeof r->id, "%s-%" PRIu64 "-%" PRIu64, chat ? "chatcmpl" : "cmpl", w->o.id,
             ++w->next_req);
    r->created = kvr_now_ms() / 1000;
    r->prompt_tokens = (uint32_t)n;
    kvr_buf_init(&r->toks);
    kvr_buf_init(&r->all);
    engine_idle_jump(w, wall_ns(w));
    if (kvr_engine_add(w->eng, kvr_tok_ids(&toks), (uint32_t)n, (uint32_t)max_tokens, r, &r->seq,
                       &err) != 0) {
        respond_error(req, err.code == KVR_ENOMEM ? 500 : 400, "invalid_request_error", "%s", err.msg);
        wreq_free(r);
        goto bad;
    }
    req->data = r;
    req->on_close = on_req_gone;
    req->on_drain = on_req_drain;
    kvr_buf_free(&toks);
    cJSON_Delete(root);
    kick_drive(w);
    return;
bad:
    kvr_metric_inc(w->m_bad_req);
    kvr_buf_free(&toks);
    cJSON_Delete(root);
}

static void on_pending_gone(kvr_http_req *req)
{
    preq *p = req->data;
    if (p)
        p->gone = true;
}

static void enqueue_completion(worker *w, kvr_http_req *req, bool chat)
{
    if (w->draining) {
        respond_error(req, 503, "unavailable", "worker is shutting down");
        return;
    }
    preq *p = calloc(1, sizeof *p);
    if (!p) {
        respond_error(req, 500, "server_error", "out of memory");
        return;
    }
    p->req = req;
    p->chat = chat;
    req->data = p;
    req->on_close = on_pending_gone;
    if (w->pend_tail)
        w->pend_tail->next = p;
    else
        w->pend_head = p;
    w->pend_tail = p;
    w->n_pend++;
    kick_drive(w);
}

/* Parses and admits up to max queued requests (all with max 0). */
static void admit_pending(worker *w, size_t max)
{
    for (size_t k = 0; w->pend_head && (max == 0 || k < max); k++) {
        preq *p = w->pend_head;
        w->pend_head = p->next;
        if (!w->pend_head)
            w->pend_tail = NULL;
        w->n_pend--;
        kvr_http_req *req = p->req;
        req->data = NULL;
        req->on_close = NULL;
        if (p->gone || w->closing)
            respond_error(req, 503, "unavailable", "client gone or worker closing");
        else
            handle_completion(w, req, p->chat);
        free(p);
    }
}

/* GET /debug/cache: the cached blocks' kvroute seq hashes (DESIGN 2), so tests can compare
 * what the routers rebuilt from events with what the engine holds. */
static void cache_cb(void *arg, uint64_t ext, uint64_t seq, bool hp, uint64_t pe, uint32_t refs)
{
    kvr_buf *b = arg;
    kvr_buf_appendf(b, "%s\"%" PRIu64 "\"", b->base[b->len - 1] == '[' ? "" : ",", seq);
}

static void handle_debug_cache(worker *w, kvr_http_req *req)
{
    kvr_engine_stats st;
    kvr_engine_get_stats(w->eng, &st);
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_buf_appendf(&b,
                    "{\"worker_id\":%" PRIu64 ",\"block_size\":%" PRIu64 ",\"busy\":%s,"
                    "\"cached_blocks\":%u,\"used_blocks\":%u,\"seq_hashes\":[",
                    w->o.id, w->o.block_size, kvr_engine_has_work(w->eng) ? "true" : "false",
                    st.cached_blocks, st.used_blocks);
    kvr_engine_foreach_cached(w->eng, cache_cb, &b);
    kvr_buf_append_cstr(&b, "]}");
    if (!b.base)
        respond_error(req, 500, "server_error", "out of memory");
    else
        kvr_http_respond(req, 200, "application/json", b.base, b.len);
    kvr_buf_free(&b);
}

static void on_request(kvr_http_req *req)
{
    worker *w = req->server->data;
    bool get = kvr_slice_eq_cstr(req->method, "GET");
    bool post = kvr_slice_eq_cstr(req->method, "POST");
    if (kvr_slice_eq_cstr(req->path, "/v1/completions") && post)
        enqueue_completion(w, req, false);
    else if (kvr_slice_eq_cstr(req->path, "/v1/chat/completions") && post)
        enqueue_completion(w, req, true);
    else if (kvr_slice_eq_cstr(req->path, "/health") && get)
        kvr_http_respond_cstr(req, w->draining ? 503 : 200, "application/json",
                              w->draining ? "{\"status\":\"draining\"}" : "{\"status\":\"ok\"}");
    else if (kvr_slice_eq_cstr(req->path, "/debug/cache") && get)
        handle_debug_cache(w, req);
    else if (kvr_slice_eq_cstr(req->path, "/metrics") && get)
        kvr_metrics_respond(w->metrics, req);
    else if (kvr_slice_eq_cstr(req->path, "/v1/models") && get) {
        char body[400];
        snprintf(body, sizeof body,
                 "{\"object\":\"list\",\"data\":[{\"id\":\"%s\",\"object\":\"model\",\"owned_by\":\"kvroute\"}]}",
                 w->o.model);
        kvr_http_respond_cstr(req, 200, "application/json", body);
    } else if (kvr_slice_eq_cstr(req->path, "/v1/completions") ||
               kvr_slice_eq_cstr(req->path, "/v1/chat/completions"))
        respond_error(req, 405, "invalid_request_error", "method not allowed");
    else
        respond_error(req, 404, "invalid_request_error", "no such path");
}

/* ------------------------------------------------------------------ metrics */

static void collect(kvr_metrics *m, void *arg)
{
    worker *w = arg;
    kvr_engine_stats s;
    kvr_engine_get_stats(w->eng, &s);
    kvr_metric_counter_set(w->m_prompt, 0, s.prompt_tokens_total);
    kvr_metric_counter_set(w->m_cached, 0, s.cached_tokens_total);
    kvr_metric_counter_set(w->m_gen, 0, s.generated_tokens_total);
    kvr_metric_counter_set(w->m_steps, 0, s.steps);
    kvr_metric_counter_set(w->m_preempt, 0, s.preemptions);
    kvr_metric_counter_set(w->m_requests, 0, s.requests_total);
    kvr_metric_counter_set(w->m_finished, 0, s.finished_total);
    kvr_metric_counter_set(w->m_cancelled, 0, s.cancelled_total);
    kvr_metric_counter_set(w->m_stored, 0, s.stored_blocks_total);
    kvr_metric_counter_set(w->m_removed, 0, s.removed_blocks_total);
    kvr_metric_set(w->m_running, 0, s.running);
    kvr_metric_set(w->m_waiting, 0, s.waiting);
    kvr_metric_set(w->m_used, 0, s.used_blocks);
    kvr_metric_set(w->m_cached_blocks, 0, s.cached_blocks);
    kvr_metric_set(w->m_capacity, 0, s.capacity_blocks);
    /* lag now: if busy and behind, the distance between the wall and the engine clocks */
    int64_t lag = 0;
    if (kvr_engine_has_work(w->eng)) {
        lag = wall_ns(w) - kvr_engine_now_ns(w->eng);
        if (lag < 0)
            lag = 0;
    }
    kvr_metric_set(w->m_lag, 0, (double)lag / 1e9);
    kvr_metric_set(w->m_lag_max, 0, (double)w->lag_max_ns / 1e9);
    kvr_metric_set(w->m_lag_erased, 0, (double)w->lag_erased_ns / 1e9);
    kvr_metric_set(w->m_busy, 0, (double)kvr_engine_now_ns(w->eng) / 1e9);
    kvr_metric_set(w->m_busy, 1, (double)wall_ns(w) / 1e9);
}

static int setup_metrics(worker *w)
{
    kvr_metrics *m = w->metrics = kvr_metrics_new();
    if (!m)
        return KVR_ENOMEM;
    static const char *const clocks[] = {"sim", "wall", NULL};
    w->m_prompt = kvr_metrics_counter(m, "kvr_worker_prompt_tokens_total", "Prompt tokens of admitted requests", NULL, NULL);
    w->m_cached = kvr_metrics_counter(m, "kvr_worker_cached_tokens_total", "Prompt tokens served from the prefix cache", NULL, NULL);
    w->m_gen = kvr_metrics_counter(m, "kvr_worker_generated_tokens_total", "Generated tokens", NULL, NULL);
    w->m_running = kvr_metrics_gauge(m, "kvr_worker_running_seqs", "Running sequences", NULL, NULL);
    w->m_waiting = kvr_metrics_gauge(m, "kvr_worker_waiting_seqs", "Waiting sequences", NULL, NULL);
    w->m_used = kvr_metrics_gauge(m, "kvr_worker_kv_blocks_used", "KV blocks referenced by sequences", NULL, NULL);
    w->m_cached_blocks = kvr_metrics_gauge(m, "kvr_worker_kv_blocks_cached", "Full (hashed) KV blocks in the cache", NULL, NULL);
    w->m_capacity = kvr_metrics_gauge(m, "kvr_worker_kv_blocks_capacity", "KV cache capacity in blocks", NULL, NULL);
    w->m_steps = kvr_metrics_counter(m, "kvr_worker_steps_total", "Engine steps", NULL, NULL);
    w->m_preempt = kvr_metrics_counter(m, "kvr_worker_preemptions_total", "Sequences preempted for lack of KV blocks", NULL, NULL);
    w->m_requests = kvr_metrics_counter(m, "kvr_worker_requests_total", "Requests accepted by the engine", NULL, NULL);
    w->m_finished = kvr_metrics_counter(m, "kvr_worker_requests_finished_total", "Requests finished", NULL, NULL);
    w->m_cancelled = kvr_metrics_counter(m, "kvr_worker_requests_cancelled_total", "Requests cancelled (client gone)", NULL, NULL);
    w->m_stored = kvr_metrics_counter(m, "kvr_worker_kv_blocks_stored_total", "Blocks stored (BlockStored)", NULL, NULL);
    w->m_removed = kvr_metrics_counter(m, "kvr_worker_kv_blocks_removed_total", "Blocks evicted (BlockRemoved)", NULL, NULL);
    w->m_lag = kvr_metrics_gauge(m, "kvr_worker_sim_lag_seconds", "How far the simulated clock is behind the wall clock now", NULL, NULL);
    w->m_lag_max = kvr_metrics_gauge(m, "kvr_worker_sim_lag_max_seconds", "Largest lag seen at the start of a step", NULL, NULL);
    w->m_lag_erased = kvr_metrics_gauge(m, "kvr_worker_sim_lag_erased_seconds", "Lag forgiven when the engine went idle (its last step had started late), total", NULL, NULL);
    w->m_busy = kvr_metrics_gauge(m, "kvr_worker_clock_seconds", "The engine's simulated clock and the wall clock, since start (sim falls behind wall only when steps cost more CPU than the time they stand for)", "clock", clocks);
    w->m_ev_pub = kvr_metrics_counter(m, "kvr_worker_kv_events_total", "KV events encoded", NULL, NULL);
    w->m_ev_batches = kvr_metrics_counter(m, "kvr_worker_kv_event_batches_published_total", "KV event payloads published", NULL, NULL);
    w->m_ev_dropped = kvr_metrics_counter(m, "kvr_worker_kv_event_batches_dropped_total", "KV event payloads dropped (buffer overflow while NATS was away)", NULL, NULL);
    w->m_resyncs = kvr_metrics_counter(m, "kvr_worker_kv_resyncs_total", "AllBlocksCleared + full cache republished", NULL, NULL);
    w->m_evbuf = kvr_metrics_gauge(m, "kvr_worker_kv_event_batches_buffered", "KV event payloads waiting for NATS", NULL, NULL);
    w->m_bad_req = kvr_metrics_counter(m, "kvr_worker_bad_requests_total", "Requests rejected as malformed", NULL, NULL);
    w->m_hb = kvr_metrics_counter(m, "kvr_worker_heartbeats_total", "Heartbeats published", NULL, NULL);
    kvr_metrics_on_collect(m, collect, w);
    kvr_metrics_add_http_server(m, "kvr_worker_http", &w->http);
    return 0;
}

/* ------------------------------------------------------------------ shutdown */

static void on_closed_handle(uv_handle_t *h)
{
    (void)h;
}

static void on_nats_closed(kvr_nats *kn)
{
    (void)kn;
    W.nats_ok = false;
}

static void on_http_closed(kvr_http_server *s)
{
    (void)s;
}

static void shutdown_all(worker *w)
{
    if (w->closing)
        return;
    /* whatever is still running is cancelled: clients see their streams end */
    for (size_t i = 0; i < w->n_future; i++) {
        wreq *r = w->future[i];
        r->in_future = false;
        r->n_ready_toks = r->toks.len / sizeof(uint32_t);
        r->done_ready = r->done_future;
        mark_ready(w, r);
    }
    w->n_future = 0;
    flush_ready(w);
    w->closing = true; /* pending requests get 503 */
    admit_pending(w, 0);
    w->closing = false;
    /* drain timeout or second signal: cut what is left */
    while (w->live) {
        wreq *r = w->live;
        if (r->seq)
            kvr_engine_cancel(w->eng, r->seq);
        r->seq = NULL;
        if (r->http) {
            r->http->data = NULL;
            if (r->started)
                kvr_http_stream_end(r->http);
            else
                respond_error(r->http, 503, "unavailable", "worker is shutting down");
            r->http = NULL;
        }
        wreq_free(r);
    }
    w->n_ready = 0;
    w->closing = true;
    publish_engine_events(w);
    uv_timer_stop(&w->drive_timer);
    uv_timer_stop(&w->hb_timer);
    uv_timer_stop(&w->drain_timer);
    uv_timer_stop(&w->flush_timer);
    uv_close((uv_handle_t *)&w->flush_timer, on_closed_handle);
    uv_close((uv_handle_t *)&w->drive_timer, on_closed_handle);
    uv_close((uv_handle_t *)&w->hb_timer, on_closed_handle);
    uv_close((uv_handle_t *)&w->drain_timer, on_closed_handle);
    uv_close((uv_handle_t *)&w->sigterm, on_closed_handle);
    uv_close((uv_handle_t *)&w->sigint, on_closed_handle);
    kvr_http_server_close(&w->http, on_http_closed);
    if (w->nats_ok)
        kvr_nats_close(&w->nats, on_nats_closed);
}

static uint64_t drain_started;

static void drain_tick(uv_timer_t *t)
{
    worker *w = t->data;
    if (w->live_reqs == 0 && w->n_pend == 0) {
        KVR_LOG_INFO("drained, exiting", "live=%zu", w->live_reqs);
        shutdown_all(w);
        return;
    }
    if (uv_now(w->loop) - drain_started >= DRAIN_TIMEOUT_MS) {
        KVR_LOG_WARN("drain timeout: cancelling the rest", "live=%zu", w->live_reqs);
        shutdown_all(w);
    }
}

static void on_signal(uv_signal_t *s, int signum)
{
    worker *w = s->data;
    if (w->draining) {
        KVR_LOG_WARN("second signal: exiting now", "signal=%d", signum);
        shutdown_all(w);
        return;
    }
    w->draining = true;
    drain_started = uv_now(w->loop);
    KVR_LOG_INFO("draining", "signal=%d live=%zu", signum, w->live_reqs);
    uv_timer_start(&w->drain_timer, drain_tick, 0, 50);
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv)
{
    worker *w = &W;
    kvr_err err = {0};
    int rc = parse_flags(&w->o, argc, argv, &err);
    if (rc == 1) {
        usage(stdout);
        return 0;
    }
    if (rc < 0) {
        fprintf(stderr, "kvr-worker: %s\n", err.msg);
        usage(stderr);
        return 2;
    }
    kvr_log_level lvl;
    if (kvr_log_parse_level(w->o.log_level, &lvl) != 0) {
        fprintf(stderr, "kvr-worker: bad --log-level '%s'\n", w->o.log_level);
        return 2;
    }
    static char idbuf[32];
    snprintf(idbuf, sizeof idbuf, "%" PRIu64, w->o.id);
    kvr_log_setup("worker", idbuf, lvl);
    signal(SIGPIPE, SIG_IGN);

    kvr_engine_config ec;
    kvr_engine_config_default(&ec);
    ec.block_size = (uint32_t)w->o.block_size;
    ec.capacity_blocks = (uint32_t)w->o.capacity_blocks;
    ec.max_num_seqs = (uint32_t)w->o.max_num_seqs;
    ec.max_batched_tokens = (uint32_t)w->o.max_batched_tokens;
    ec.max_model_len = (uint32_t)w->o.max_model_len;
    ec.speedup = w->o.speedup;
    ec.seed = w->o.seed;
    if ((rc = kvr_engine_new(&ec, &w->eng, &err)) != 0) {
        fprintf(stderr, "kvr-worker: engine: %s\n", err.msg);
        return 2;
    }
    w->efmt = strcmp(w->o.event_format, "map") == 0 ? KVR_KV_FORMAT_MAP : KVR_KV_FORMAT_ARRAY;
    w->hfmt = strcmp(w->o.hash_format, "bytes") == 0 ? KVR_KV_HASH_BYTES : KVR_KV_HASH_INT;
    snprintf(w->subj_kv, sizeof w->subj_kv, "kvr.kv.%s.%" PRIu64, w->o.ns, w->o.id);
    snprintf(w->subj_hb, sizeof w->subj_hb, "kvr.workers.%s.%" PRIu64, w->o.ns, w->o.id);
    kvr_buf_init(&w->scratch);

    w->loop = uv_default_loop();
    w->t0 = uv_hrtime();
    w->started_ms = kvr_now_ms();

    kvr_http_config hc = {.on_request = on_request, .max_body_bytes = 64u << 20,
                          .max_connections = 20000};
    if (kvr_http_server_init(&w->http, w->loop, &hc) != 0) {
        fprintf(stderr, "kvr-worker: http init failed\n");
        return 2;
    }
    w->http.data = w;
    if (setup_metrics(w) != 0) {
        fprintf(stderr, "kvr-worker: out of memory\n");
        return 2;
    }
    if (kvr_http_listen(&w->http, w->o.listen, &err) != 0) {
        fprintf(stderr, "kvr-worker: listen %s: %s\n", w->o.listen, err.msg);
        return 2;
    }
    if (w->o.advertise) {
        snprintf(w->url, sizeof w->url, "%s", w->o.advertise);
    } else {
        const char *colon = strrchr(w->o.listen, ':');
        size_t hl = colon ? (size_t)(colon - w->o.listen) : 0;
        char host[128] = "127.0.0.1";
        if (hl > 0 && hl < sizeof host && strncmp(w->o.listen, "0.0.0.0", hl) != 0) {
            memcpy(host, w->o.listen, hl);
            host[hl] = 0;
        }
        snprintf(w->url, sizeof w->url, "http://%s:%d", host, kvr_http_server_port(&w->http));
    }

    kvr_nats_opts no = {.url = w->o.nats, .name = "kvr-worker", .on_state = on_nats_state,
                        .state_data = w};
    kvr_nats_flags_fill(&w->o.nats_sec, &no);
    if (kvr_nats_init(&w->nats, w->loop, &no, &err) != 0) {
        fprintf(stderr, "kvr-worker: nats: %s\n", err.msg);
        return 2;
    }
    w->nats_ok = true;

    /* The first thing the routers see from this incarnation: forget what an earlier one had. */
    kvr_engine_queue_resync(w->eng);
    publish_engine_events(w);

    uv_timer_init(w->loop, &w->drive_timer);
    w->drive_timer.data = w;
    uv_timer_init(w->loop, &w->hb_timer);
    w->hb_timer.data = w;
    uv_timer_init(w->loop, &w->drain_timer);
    w->drain_timer.data = w;
    uv_timer_init(w->loop, &w->flush_timer);
    w->flush_timer.data = w;
    uv_timer_start(&w->hb_timer, heartbeat, 0, 1000);
    uv_signal_init(w->loop, &w->sigterm);
    w->sigterm.data = w;
    uv_signal_start(&w->sigterm, on_signal, SIGTERM);
    uv_signal_init(w->loop, &w->sigint);
    w->sigint.data = w;
    uv_signal_start(&w->sigint, on_signal, SIGINT);

    char nats_red[512];
    KVR_LOG_INFO("listening", "addr=%s url=%s nats=%s ns=%s model=%s block_size=%" PRIu64
                 " capacity_blocks=%" PRIu64 " speedup=%g started_ms=%" PRId64,
                 w->o.listen, w->url, kvr_nats_redact_url(w->o.nats, nats_red, sizeof nats_red), w->o.ns, w->o.model, w->o.block_size,
                 w->o.capacity_blocks, w->o.speedup, w->started_ms);
    uv_run(w->loop, UV_RUN_DEFAULT);
    kvr_nats_global_shutdown(2000);
    ev_buffer_drop(w);
    kvr_metrics_free(w->metrics);
    free(w->evbuf);
    free(w->ready);
    free(w->future);
    kvr_buf_free(&w->scratch);
    kvr_engine_free(w->eng);
    uv_loop_close(w->loop);
    return 0;
}
