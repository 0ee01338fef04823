/* kvr-bridge: a sidecar that puts a real vLLM or SGLang engine behind kvroute (issue 13).
 *
 * One loop thread owns everything: the engine's ZMQ sockets (polled through ZMQ_FD with a
 * uv_poll_t; ZMQ_FD is edge-triggered, so every wake-up drains until ZMQ_EVENTS has no
 * POLLIN, and every send re-checks), the NATS connection, the metrics scrape (libcurl multi
 * on libuv) and the timers. Each data-parallel rank r is its own worker (id + r), with its own
 * SUB (engine port + r), replay DEALER (replay port + r) and JetStream outbox. The wire
 * format is in frame.h (with the vLLM/SGLang sources it was checked in). */
#include "frame.h"
#include "js_outbox.h"
#include "kv_event.h"
#include "kvr_buf.h"
#include "kvr_curl.h"
#include "kvr_err.h"
#include "kvr_flags.h"
#include "kvr_heartbeat.h"
#include "kvr_log.h"
#include "kvr_nats.h"
#include "kvr_nats_flags.h"
#include "kvr_model_card.h"
#include "scrape.h"

#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>
#include <zmq.h>

#define MAX_RANKS 64
#define DRAIN_BUDGET 4096             /* messages per wake-up before yielding to the loop */
#define MAX_PENDING_BYTES (64u << 20) /* live batches held while a replay runs */
#define MAX_FRAMES 5

typedef struct bridge bridge;

typedef struct pending {
    struct pending *next;
    uint64_t seq;
    size_t len;
    char data[];
} pending;

/* A ZMQ socket and the uv_poll_t on its ZMQ_FD; freed (socket closed) after uv_close. */
typedef struct zpoll {
    uv_poll_t h;
    struct rank *rk;
    void *sock;
} zpoll;

typedef struct rank {
    bridge *br;
    int r;
    uint64_t wid;
    void *sub, *dealer;
    struct zpoll *sub_zp, *dealer_zp;
    uv_timer_t replay_timer;
    uv_timer_t probe_timer; /* follow-up replays from `next` after a resync (probe_tail) */
    int probes_left;
    bool have_live;     /* last_live is meaningful */
    uint64_t last_live; /* seq of the last live batch (the live stream never goes back) */
    bool known;     /* next is meaningful */
    uint64_t next;  /* next expected seq */
    bool replaying; /* a replay request is out; live batches wait in pending */
    pending *ph, *pt;
    size_t pending_bytes;
    js_outbox ob;
    char subj_kv[256], subj_hb[256], sub_ep[512], replay_ep[512];
    kvr_bridge_scrape stats;
    /* counters (logged) */
    uint64_t batches, events, bad_events, garbage, malformed, gaps, replays, replayed, clears,
        restarts;
} rank;

struct bridge {
    uv_loop_t *loop;
    void *zctx;
    kvr_nats nats;
    kvr_curl curl;
    bool curl_up;
    kvr_kv_decoder dec;
    kvr_buf out, scratch, enc;
    rank ranks[MAX_RANKS];
    int n;
    uv_idle_t idle;
    uv_timer_t hb_timer, scrape_timer, stats_timer, announce_timer;
    uv_signal_t sigterm, sigint;
    bool announced, closing;
    /* The engine restarted (seq went back): events wait until a heartbeat with the new
     * engine's start has gone out, else routers, seeing started_ms change after the new
     * events, would drop them with the old engine's blocks. Until hold_until_ms at most. */
    bool hold;
    int64_t hold_until_ms;
    double sent_start_s; /* process_start_time_seconds in the last heartbeat */
    double hold_start_s; /* ... when the hold began (the old engine's) */
    int scrapes_inflight;
    bool metrics_ok, health_ok;
    int64_t last_ok_ms;
    int64_t started_ms;
    char mdc_sum[32]; /* --model-dir: tokenizer + chat template checksum (kvr_model_card.h) */
    kvr_buf metrics_body;
    /* flags */
    const char *engine_url, *zmq_ep, *replay, *topic, *nats_url, *ns, *engine, *model_dir,
        *log_level, *model;
    int64_t dp, scrape_ms, stats_ms, block_size, announce_ms, replay_timeout_ms, max_inflight,
        outbox_bytes;
    uint64_t id;
    kvr_nats_flags nf;
};

/* ------------------------------------------------------------------ publishing */

static void publish_clear(rank *rk, const char *why)
{
    bridge *br = rk->br;
    js_outbox_drop_queued(&rk->ob);
    rk->clears++;
    KVR_LOG_WARN("publishing AllBlocksCleared", "worker=%" PRIu64 " why=\"%s\"", rk->wid, why);
    if (kvr_bridge_encode_clear(&br->enc, (double)kvr_now_ms() / 1000.0, rk->r) != 0 ||
        js_outbox_push(&rk->ob, br->enc.base, br->enc.len) != 0)
        KVR_LOG_ERROR("cannot queue AllBlocksCleared", "worker=%" PRIu64, rk->wid);
}

static void on_loss(js_outbox *ob, int status, void *data)
{
    publish_clear(data, "a JetStream publish failed");
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
        publish_clear(rk, "outbox full");
}

/* ------------------------------------------------------------------ sequence tracking */

static void pending_free(rank *rk)
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
        publish_clear(rk, "batches lost (not in the replay buffer)");
    }
    rk->known = true;
    rk->next = seq + 1;
    forward(rk, p, len);
}

static int open_dealer(rank *rk);
static void drain(rank *rk, void *sock);

static void replay_done(rank *rk)
{
    rk->replaying = false;
    uv_timer_stop(&rk->replay_timer);
    pending *p = rk->ph;
    rk->ph = rk->pt = NULL;
    rk->pending_bytes = 0;
    while (p) {
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
    open_dealer(rk);
    replay_done(rk);
}

static void start_replay(rank *rk, uint64_t from)
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
    rk->known = true;
    rk->next = from;
    uv_timer_start(&rk->replay_timer, on_replay_timeout, (uint64_t)rk->br->replay_timeout_ms, 0);
    drain(rk, rk->dealer); /* ZMQ_FD is edge-triggered: a send can consume the edge */
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
    start_replay(rk, rk->next);
}

static void probe_tail(rank *rk)
{
    rk->probes_left = TAIL_PROBES;
    uv_timer_start(&rk->probe_timer, on_probe, 1000, 1000);
}

static void hold_begin(bridge *br)
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
static void resync_from_zero(rank *rk)
{
    rk->restarts++;
    if (rk->replaying) {
        open_dealer(rk); /* the old request's answer must not be read as this one's */
        rk->replaying = false;
        uv_timer_stop(&rk->replay_timer);
    }
    pending_free(rk);
    rk->have_live = false; /* the new engine numbers from 0 */
    publish_clear(rk, "engine restarted (its start time changed)");
    if (rk->dealer) {
        start_replay(rk, 0);
        probe_tail(rk);
    } else {
        rk->known = false; /* the next live batch starts the count */
    }
}

static void on_live(rank *rk, uint64_t seq, const void *p, size_t len)
{
    /* strictly below: on_live queues a batch behind a replay by calling itself again */
    bool went_back = rk->have_live && seq < rk->last_live;
    rk->have_live = true;
    rk->last_live = seq;
    if (went_back && rk->replaying) {
        /* The engine restarted while a replay was out: the answer, and the live batches
         * queued behind it, are numbered like the old engine's; the restart branch below
         * clears the worker and replays the new engine from 0. */
        open_dealer(rk);
        rk->replaying = false;
        uv_timer_stop(&rk->replay_timer);
        pending_free(rk);
        rk->known = true;
        rk->next = seq + 1;
    }
    if (rk->replaying) {
        if (rk->pending_bytes + len > MAX_PENDING_BYTES) {
            KVR_LOG_WARN("replay too slow: live batches over the bound", "worker=%" PRIu64,
                         rk->wid);
            open_dealer(rk);
            rk->replaying = false;
            uv_timer_stop(&rk->replay_timer);
            pending_free(rk);
            rk->known = false;
            publish_clear(rk, "replay overrun");
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
        hold_begin(rk->br);
        publish_clear(rk, "engine restarted (seq went back)");
        rk->next = 0; /* what the new engine sent before this batch is asked for below */
    }
    if (seq > rk->next) {
        rk->gaps++;
        if (rk->dealer) {
            KVR_LOG_INFO("gap: asking for a replay",
                         "worker=%" PRIu64 " from=%" PRIu64 " to=%" PRIu64, rk->wid, rk->next, seq);
            uint64_t from = rk->next;
            start_replay(rk, from);
            if (rk->replaying) {
                on_live(rk, seq, p, len); /* queued behind the replay */
                return;
            }
        }
        publish_clear(rk, "batches lost and no replay socket");
    }
    rk->next = seq + 1;
    forward(rk, p, len);
}

static void on_replayed(rank *rk, uint64_t seq, const void *p, size_t len)
{
    if (!rk->replaying)
        return; /* stale */
    rk->replayed++;
    /* silence, not total time, ends a replay (uv_timer_again would stop a one-shot timer) */
    uv_timer_start(&rk->replay_timer, on_replay_timeout, (uint64_t)rk->br->replay_timeout_ms, 0);
    if (seq == KVR_BRIDGE_SEQ_END) {
        replay_done(rk);
        return;
    }
    accept_final(rk, seq, p, len);
}

/* ------------------------------------------------------------------ ZMQ */

static void handle_msg(rank *rk, bool is_sub, zmq_msg_t *f, int n)
{
    kvr_bridge_frame fr[MAX_FRAMES];
    for (int i = 0; i < n; i++)
        fr[i] = (kvr_bridge_frame){zmq_msg_data(&f[i]), zmq_msg_size(&f[i])};
    uint64_t seq;
    if (is_sub) {
        if (n != 3 || kvr_bridge_read_seq(fr[1].data, fr[1].len, &seq) != 0) {
            rk->malformed++;
            KVR_LOG_WARN_RL(5, "malformed live message", "worker=%" PRIu64 " frames=%d", rk->wid,
                            n);
            return;
        }
        on_live(rk, seq, fr[2].data, fr[2].len);
        return;
    }
    kvr_bridge_frame payload;
    kvr_err err = {0};
    if (n < 1 || fr[0].len != 0 ||
        kvr_bridge_parse_replay(fr + 1, (size_t)n - 1, &seq, &payload, &err) != 0) {
        rk->malformed++;
        KVR_LOG_WARN_RL(5, "malformed replay message", "worker=%" PRIu64 " frames=%d err=\"%s\"",
                        rk->wid, n, err.msg);
        return;
    }
    on_replayed(rk, seq, payload.data, payload.len);
}

/* Reads whole multipart messages until the socket has none or the budget is spent. Returns
 * true when messages may remain (ZMQ_FD will not signal them again: edge-triggered). */
static bool drain_sock(rank *rk, void *sock, int *budget)
{
    bool is_sub = sock == rk->sub;
    while (sock && *budget > 0) {
        int ev = 0;
        size_t sz = sizeof ev;
        if (zmq_getsockopt(sock, ZMQ_EVENTS, &ev, &sz) != 0 || !(ev & ZMQ_POLLIN))
            return false;
        zmq_msg_t f[MAX_FRAMES];
        int n = 0, more = 1;
        bool over = false;
        while (more) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&m);
                break;
            }
            more = zmq_msg_more(&m);
            if (n < MAX_FRAMES) {
                f[n++] = m;
            } else {
                over = true;
                zmq_msg_close(&m);
            }
        }
        (*budget)--;
        if (over)
            rk->malformed++;
        else
            handle_msg(rk, is_sub, f, n);
        for (int i = 0; i < n; i++)
            zmq_msg_close(&f[i]);
        if (!is_sub && sock != rk->dealer)
            return false; /* the dealer was replaced while handling */
    }
    return sock && *budget <= 0;
}

static void on_idle(uv_idle_t *h)
{
    bridge *br = h->data;
    bool more = false;
    for (int i = 0; i < br->n; i++) {
        rank *rk = &br->ranks[i];
        int budget = DRAIN_BUDGET / 2;
        more |= drain_sock(rk, rk->dealer, &budget);
        budget = DRAIN_BUDGET / 2;
        more |= drain_sock(rk, rk->sub, &budget);
    }
    if (!more)
        uv_idle_stop(h);
}

static void drain(rank *rk, void *sock)
{
    int budget = DRAIN_BUDGET;
    if (drain_sock(rk, sock, &budget))
        uv_idle_start(&rk->br->idle, on_idle);
}

static void on_zpoll(uv_poll_t *p, int status, int events)
{
    zpoll *z = (zpoll *)p;
    drain(z->rk, z->sock);
}

static void on_zpoll_closed(uv_handle_t *h)
{
    zpoll *z = (zpoll *)h;
    zmq_close(z->sock);
    free(z);
}

static void zpoll_close(zpoll *z)
{
    if (!z)
        return;
    uv_poll_stop(&z->h);
    uv_close((uv_handle_t *)&z->h, on_zpoll_closed);
}

/* Wraps sock (owned from now on, closed on failure too). */
static zpoll *zpoll_open(rank *rk, void *sock)
{
    int fd;
    size_t sz = sizeof fd;
    zpoll *z = calloc(1, sizeof *z);
    if (!z || zmq_getsockopt(sock, ZMQ_FD, &fd, &sz) != 0 ||
        uv_poll_init(rk->br->loop, &z->h, fd) != 0) {
        free(z);
        zmq_close(sock);
        return NULL;
    }
    z->rk = rk;
    z->sock = sock;
    uv_poll_start(&z->h, UV_READABLE, on_zpoll);
    return z;
}

static int open_dealer(rank *rk)
{
    if (!rk->replay_ep[0])
        return 0;
    zpoll_close(rk->dealer_zp);
    rk->dealer_zp = NULL;
    rk->dealer = NULL;
    void *d = zmq_socket(rk->br->zctx, ZMQ_DEALER);
    if (!d)
        return KVR_EIO;
    int zero = 0;
    zmq_setsockopt(d, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_connect(d, rk->replay_ep) != 0) {
        KVR_LOG_ERROR("replay endpoint", "endpoint=%s err=\"%s\"", rk->replay_ep,
                      zmq_strerror(zmq_errno()));
        zmq_close(d);
        return KVR_EIO;
    }
    if (!(rk->dealer_zp = zpoll_open(rk, d)))
        return KVR_EIO;
    rk->dealer = d;
    return 0;
}

static int open_sub(rank *rk, const char *topic)
{
    void *s = zmq_socket(rk->br->zctx, ZMQ_SUB);
    if (!s)
        return KVR_EIO;
    int zero = 0, hwm = 100000; /* vLLM's own PUB hwm default */
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(s, ZMQ_SUBSCRIBE, topic, strlen(topic));
    if (zmq_connect(s, rk->sub_ep) != 0) {
        KVR_LOG_ERROR("zmq endpoint", "endpoint=%s err=\"%s\"", rk->sub_ep,
                      zmq_strerror(zmq_errno()));
        zmq_close(s);
        return KVR_EIO;
    }
    if (!(rk->sub_zp = zpoll_open(rk, s)))
        return KVR_EIO;
    rk->sub = s;
    return 0;
}

/* ------------------------------------------------------------------ engine metrics, heartbeat */

static void send_heartbeats(bridge *br);

static void on_announce(uv_timer_t *t)
{
    bridge *br = t->data;
    /* Routers take events only from a worker they have seen a heartbeat of. */
    for (int i = 0; i < br->n; i++)
        js_outbox_resume(&br->ranks[i].ob);
}

static void scrape_done(bridge *br)
{
    if (--br->scrapes_inflight > 0)
        return;
    if (br->metrics_ok && br->health_ok) {
        if (!br->last_ok_ms)
            KVR_LOG_INFO("engine up", "url=%s", br->engine_url);
        br->last_ok_ms = kvr_mono_ms();
        for (int i = 0; i < br->n; i++)
            kvr_bridge_parse_metrics(br->metrics_body.base, br->metrics_body.len, i, (int)br->dp,
                                     &br->ranks[i].stats);
        const kvr_bridge_scrape *s0 = &br->ranks[0].stats;
        if (!br->announced) {
            br->announced = true;
            send_heartbeats(br);
            uv_timer_start(&br->announce_timer, on_announce, (uint64_t)br->announce_ms, 0);
            return;
        }
        if (!br->hold && s0->has_start && br->sent_start_s != 0 &&
            s0->start_s != br->sent_start_s) {
            KVR_LOG_WARN("engine restarted: replaying it from seq 0",
                         "old_start_s=%.3f start_s=%.3f", br->sent_start_s, s0->start_s);
            hold_begin(br);
            for (int i = 0; i < br->n; i++)
                resync_from_zero(&br->ranks[i]);
        }
        if (br->hold) {
            const kvr_bridge_scrape *s = &br->ranks[0].stats;
            if (!s->has_start || s->start_s != br->hold_start_s ||
                kvr_mono_ms() > br->hold_until_ms) {
                br->hold = false;
                send_heartbeats(br);
                uv_timer_start(&br->announce_timer, on_announce, (uint64_t)br->announce_ms, 0);
            }
        }
    } else if (br->last_ok_ms) {
        KVR_LOG_WARN_RL(5, "engine scrape failed: no heartbeat", "metrics_ok=%d health_ok=%d",
                        br->metrics_ok, br->health_ok);
    }
}

static void on_metrics(kvr_curl_req *r, int result, long status, const char *errmsg, kvr_slice body)
{
    bridge *br = kvr_curl_req_data(r);
    br->metrics_ok = result == 0 && status == 200;
    kvr_buf_reset(&br->metrics_body);
    if (br->metrics_ok && kvr_buf_append(&br->metrics_body, body.base, body.len) != 0)
        br->metrics_ok = false;
    scrape_done(br);
}

static void on_health(kvr_curl_req *r, int result, long status, const char *errmsg, kvr_slice body)
{
    bridge *br = kvr_curl_req_data(r);
    br->health_ok = result == 0 && status == 200;
    scrape_done(br);
}

static void on_scrape(uv_timer_t *t)
{
    bridge *br = t->data;
    if (br->scrapes_inflight || br->closing)
        return; /* the previous scrape is still out: an engine that slow is not up */
    char murl[1024], hurl[1024];
    snprintf(murl, sizeof murl, "%s/metrics", br->engine_url);
    snprintf(hurl, sizeof hurl, "%s/health", br->engine_url);
    long to = br->scrape_ms * 4 > 2000 ? br->scrape_ms * 4 : 2000;
    kvr_curl_opts mo = {
        .url = murl, .timeout_ms = to, .data = br, .on_done = on_metrics, .max_body = 8u << 20};
    kvr_curl_opts ho = {
        .url = hurl, .timeout_ms = to, .data = br, .on_done = on_health, .max_body = 64 << 10};
    br->metrics_ok = br->health_ok = false;
    if (kvr_curl_start(&br->curl, &mo, NULL, NULL) == 0)
        br->scrapes_inflight++;
    if (kvr_curl_start(&br->curl, &ho, NULL, NULL) == 0)
        br->scrapes_inflight++;
}

static void send_heartbeats(bridge *br)
{
    kvr_buf *b = &br->enc;
    br->sent_start_s = br->ranks[0].stats.start_s;
    for (int i = 0; i < br->n; i++) {
        rank *rk = &br->ranks[i];
        kvr_bridge_scrape *s = &rk->stats;
        uint64_t bs = s->has_block_size ? s->block_size : (uint64_t)br->block_size;
        if (bs == 0) {
            KVR_LOG_WARN_RL(10,
                            "no block size (no cache_config_info, no --block-size): no heartbeat",
                            "worker=%" PRIu64, rk->wid);
            continue;
        }
        const char *model = br->model ? br->model : s->model[0] ? s->model : "unknown";
        kvr_heartbeat hb = {.id = rk->wid,
                            .ns = kvr_slice_of(br->ns),
                            .model = kvr_slice_of(model),
                            .role = kvr_slice_of("both"),
                            .url = kvr_slice_of(br->engine_url),
                            .mdc_sum = kvr_slice_of(br->mdc_sum),
                            .block_size = bs,
                            .capacity_blocks = s->capacity,
                            .active = (uint64_t)s->running,
                            .waiting = (uint64_t)s->waiting,
                            .used_blocks = (uint64_t)(s->usage * (double)s->capacity + 0.5),
                            /* the engine's start, never the bridge's: routers drop a worker's
                             * blocks when started_ms changes, and a restarted bridge must not
                             * do that. 0 (unknown) never counts as a restart. */
                            .started_ms = s->has_start ? (uint64_t)(s->start_s * 1000.0) : 0};
        for (uint32_t j = 0; j < s->n_loras; j++)
            hb.loras[hb.n_loras++] = kvr_slice_of(s->loras[j]);
        kvr_buf_reset(b);
        if (kvr_heartbeat_encode(b, &hb) == 0)
            kvr_nats_publish(&br->nats, rk->subj_hb, b->base, b->len);
    }
}

static void on_hb_timer(uv_timer_t *t)
{
    bridge *br = t->data;
    /* Engine down (no good scrape within 3 intervals, at least 2 s): no heartbeat, so the
     * routers expire the worker and drop its blocks. */
    int64_t stale = br->scrape_ms * 3 > 2000 ? br->scrape_ms * 3 : 2000;
    if (br->announced && br->last_ok_ms && kvr_mono_ms() - br->last_ok_ms <= stale)
        send_heartbeats(br);
}

static void log_stats(bridge *br)
{
    for (int i = 0; i < br->n; i++) {
        rank *rk = &br->ranks[i];
        js_outbox_stats os;
        js_outbox_get_stats(&rk->ob, &os);
        KVR_LOG_INFO("stats",
                     "worker=%" PRIu64 " batches=%" PRIu64 " events=%" PRIu64 " bad_events=%" PRIu64
                     " garbage=%" PRIu64 " malformed=%" PRIu64 " gaps=%" PRIu64 " replays=%" PRIu64
                     " replayed=%" PRIu64 " clears=%" PRIu64 " restarts=%" PRIu64 " acked=%" PRIu64
                     " failed=%" PRIu64 " inflight=%zu queued=%zu next_seq=%" PRIu64,
                     rk->wid, rk->batches, rk->events, rk->bad_events, rk->garbage, rk->malformed,
                     rk->gaps, rk->replays, rk->replayed, rk->clears, rk->restarts, os.acked,
                     os.failed, os.inflight, os.queued, rk->next);
    }
}

static void on_stats_timer(uv_timer_t *t)
{
    log_stats(t->data);
}

/* ------------------------------------------------------------------ lifecycle */

static void close_walk(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void on_nats_closed(kvr_nats *kn)
{
    bridge *br = kn->data;
    uv_walk(br->loop, close_walk, NULL);
}

static void on_signal(uv_signal_t *s, int signum)
{
    bridge *br = s->data;
    if (br->closing)
        return;
    br->closing = true;
    KVR_LOG_INFO("stopping", "signal=%d", signum);
    log_stats(br);
    for (int i = 0; i < br->n; i++) {
        rank *rk = &br->ranks[i];
        zpoll_close(rk->sub_zp);
        zpoll_close(rk->dealer_zp);
        rk->sub_zp = rk->dealer_zp = NULL;
        rk->sub = rk->dealer = NULL;
        uv_timer_stop(&rk->replay_timer);
        uv_timer_stop(&rk->probe_timer);
    }
    uv_idle_stop(&br->idle);
    uv_timer_stop(&br->hb_timer);
    uv_timer_stop(&br->scrape_timer);
    uv_timer_stop(&br->stats_timer);
    uv_timer_stop(&br->announce_timer);
    uv_signal_stop(&br->sigterm);
    uv_signal_stop(&br->sigint);
    kvr_curl_close(&br->curl, NULL);
    kvr_nats_close(&br->nats, on_nats_closed);
}

/* vLLM's offset_endpoint_port: rank r adds r to the TCP port (inproc gets "_dp<r>"). */
static int offset_port(const char *ep, int r, char *out, size_t cap)
{
    if (r == 0 || strncmp(ep, "inproc://", 9) == 0) {
        int n = r == 0 ? snprintf(out, cap, "%s", ep) : snprintf(out, cap, "%s_dp%d", ep, r);
        return n > 0 && (size_t)n < cap ? 0 : KVR_EINVAL;
    }
    const char *c = strrchr(ep, ':');
    char *e;
    long port = c ? strtol(c + 1, &e, 10) : -1;
    if (!c || *e || port <= 0 || port + r > 65535)
        return KVR_EINVAL;
    int n = snprintf(out, cap, "%.*s:%ld", (int)(c - ep), ep, port + r);
    return n > 0 && (size_t)n < cap ? 0 : KVR_EINVAL;
}

int main(int argc, char **argv)
{
    static bridge B;
    bridge *br = &B;
    br->topic = "";
    br->ns = "default";
    br->engine = "vllm";
    br->log_level = "info";
    br->dp = 1;
    br->scrape_ms = 250;
    br->stats_ms = 10000;
    br->announce_ms = 500;
    br->replay_timeout_ms = 1000;
    br->max_inflight = 256;
    br->outbox_bytes = 64 << 20;
    kvr_flag flags[] = {
        {"engine-url", KVR_FLAG_STRING, &br->engine_url, "engine base URL (http://HOST:PORT)",
         false},
        {"zmq", KVR_FLAG_STRING, &br->zmq_ep, "engine's KV-event PUB endpoint (tcp://HOST:5557)",
         false},
        {"replay", KVR_FLAG_STRING, &br->replay, "engine's replay ROUTER endpoint (optional)",
         false},
        {"topic", KVR_FLAG_STRING, &br->topic, "topic prefix to subscribe to", false},
        {"data-parallel-size", KVR_FLAG_INT, &br->dp,
         "engine DP ranks: rank r = ports +r, worker id +r", false},
        {"nats", KVR_FLAG_STRING, &br->nats_url, "NATS URL(s)", false},
        {"namespace", KVR_FLAG_STRING, &br->ns, "kvroute namespace", false},
        {"id", KVR_FLAG_U64, &br->id, "worker id of rank 0", false},
        {"engine", KVR_FLAG_STRING, &br->engine, "vllm or sglang", false},
        {"model-dir", KVR_FLAG_STRING, &br->model_dir, "the engine's model directory: its tokenizer + chat template checksum goes in the heartbeat's mdc_sum",
         false},
        {"model", KVR_FLAG_STRING, &br->model, "model name (default: model_name from /metrics)",
         false},
        {"block-size", KVR_FLAG_INT, &br->block_size,
         "block size when /metrics has no cache_config_info", false},
        {"scrape-interval", KVR_FLAG_DURATION, &br->scrape_ms, "engine /metrics and /health period",
         false},
        {"announce-delay", KVR_FLAG_DURATION, &br->announce_ms, "first heartbeat to first event",
         false},
        {"replay-timeout", KVR_FLAG_DURATION, &br->replay_timeout_ms, "replay silence that ends it",
         false},
        {"max-inflight", KVR_FLAG_INT, &br->max_inflight, "JetStream publishes awaiting their ack",
         false},
        {"outbox-bytes", KVR_FLAG_SIZE, &br->outbox_bytes, "bound of queued event bytes per rank",
         false},
        {"stats-interval", KVR_FLAG_DURATION, &br->stats_ms, "period of the counters' log line",
         false},
        {"log-level", KVR_FLAG_STRING, &br->log_level, "debug|info|warn|error", false},
        KVR_NATS_FLAG_ENTRIES(&br->nf),
    };
    size_t nflags = sizeof flags / sizeof flags[0];
    kvr_err err = {0};
    int rv = kvr_flags_parse(flags, nflags, argc - 1, argv + 1, NULL, 0, NULL, &err);
    if (rv == KVR_FLAGS_HELP) {
        kvr_flags_usage(stdout, "kvr-bridge", flags, nflags);
        return 0;
    }
    if (rv < 0) {
        fprintf(stderr, "kvr-bridge: %s\n", err.msg);
        return 2;
    }
    const char *missing = !br->engine_url ? "--engine-url"
                          : !br->zmq_ep   ? "--zmq"
                          : !br->nats_url ? "--nats"
                          : !flags[7].set ? "--id"
                                          : NULL;
    if (missing) {
        fprintf(stderr, "kvr-bridge: %s is required\n", missing);
        return 2;
    }
    if (br->dp < 1 || br->dp > MAX_RANKS ||
        (strcmp(br->engine, "vllm") && strcmp(br->engine, "sglang")) || br->scrape_ms < 1 ||
        br->stats_ms < 1 || br->max_inflight < 1 || br->outbox_bytes < 4096 || br->block_size < 0 ||
        strlen(br->ns) > 64 || strlen(br->engine_url) > 900 || strlen(br->topic) > 255) {
        fprintf(stderr,
                "kvr-bridge: bad flag value (--data-parallel-size 1..%d, --engine vllm|sglang, "
                "--namespace up to 64 bytes, ...)\n",
                MAX_RANKS);
        return 2;
    }
    kvr_log_level lvl;
    if (kvr_log_parse_level(br->log_level, &lvl) != 0) {
        fprintf(stderr, "kvr-bridge: bad --log-level\n");
        return 2;
    }
    char idbuf[32];
    snprintf(idbuf, sizeof idbuf, "%" PRIu64, br->id);
    kvr_log_setup("bridge", idbuf, lvl);
    signal(SIGPIPE, SIG_IGN);
    if (kvr_nats_flags_load(&br->nf, &err) != 0) {
        fprintf(stderr, "kvr-bridge: %s\n", err.msg);
        return 2;
    }
    if (br->model_dir && kvr_model_card_sum(br->model_dir, br->mdc_sum, sizeof br->mdc_sum,
                                            &err) != 0) {
        fprintf(stderr, "kvr-bridge: --model-dir: %s\n", err.msg);
        return 2;
    }
    br->loop = uv_default_loop();
    br->started_ms = kvr_now_ms();
    br->zctx = zmq_ctx_new();
    kvr_kv_decoder_init(&br->dec, NULL);
    kvr_buf_init(&br->out);
    kvr_buf_init(&br->scratch);
    kvr_buf_init(&br->enc);
    kvr_buf_init(&br->metrics_body);
    kvr_nats_opts no = {.url = br->nats_url, .name = "kvr-bridge"};
    kvr_nats_flags_fill(&br->nf, &no);
    br->nats.data = br;
    if (kvr_nats_init(&br->nats, br->loop, &no, &err) != 0 ||
        kvr_curl_init(&br->curl, br->loop, NULL, &err) != 0) {
        fprintf(stderr, "kvr-bridge: %s\n", err.msg);
        return 1;
    }
    br->n = (int)br->dp;
    for (int i = 0; i < br->n; i++) {
        rank *rk = &br->ranks[i];
        rk->br = br;
        rk->r = i;
        rk->wid = br->id + (uint64_t)i;
        snprintf(rk->subj_kv, sizeof rk->subj_kv, "kvr.kv.%s.%" PRIu64, br->ns, rk->wid);
        snprintf(rk->subj_hb, sizeof rk->subj_hb, "kvr.workers.%s.%" PRIu64, br->ns, rk->wid);
        if (offset_port(br->zmq_ep, i, rk->sub_ep, sizeof rk->sub_ep) != 0 ||
            (br->replay && offset_port(br->replay, i, rk->replay_ep, sizeof rk->replay_ep) != 0)) {
            fprintf(stderr, "kvr-bridge: cannot offset the port of --zmq/--replay for rank %d\n",
                    i);
            return 2;
        }
        uv_timer_init(br->loop, &rk->replay_timer);
        rk->replay_timer.data = rk;
        uv_timer_init(br->loop, &rk->probe_timer);
        rk->probe_timer.data = rk;
        if (js_outbox_init(&rk->ob, &br->nats, rk->subj_kv, (size_t)br->max_inflight,
                           (size_t)br->outbox_bytes, 5000, on_loss, rk) != 0 ||
            open_sub(rk, br->topic) != 0 || open_dealer(rk) != 0) {
            fprintf(stderr, "kvr-bridge: cannot set up rank %d\n", i);
            return 1;
        }
        /* Resume: what this bridge (or its previous run) forwarded is unknown here, so ask
         * the engine for everything it still buffers. If that starts at seq 0 the index gets
         * the engine's whole history again (stores and removals re-applied in order leave the
         * same set); if it starts later, or there is no replay socket, earlier batches are
         * gone and the worker is cleared first. */
        if (rk->dealer) {
            start_replay(rk, 0);
            probe_tail(rk);
        } else {
            publish_clear(rk, "start without a replay socket");
        }
    }
    uv_idle_init(br->loop, &br->idle);
    br->idle.data = br;
    uv_timer_init(br->loop, &br->hb_timer);
    uv_timer_init(br->loop, &br->scrape_timer);
    uv_timer_init(br->loop, &br->stats_timer);
    uv_timer_init(br->loop, &br->announce_timer);
    br->hb_timer.data = br->scrape_timer.data = br->stats_timer.data = br->announce_timer.data = br;
    uv_timer_start(&br->scrape_timer, on_scrape, 0, (uint64_t)br->scrape_ms);
    uv_timer_start(&br->hb_timer, on_hb_timer, 1000, 1000);
    uv_timer_start(&br->stats_timer, on_stats_timer, (uint64_t)br->stats_ms,
                   (uint64_t)br->stats_ms);
    uv_signal_init(br->loop, &br->sigterm);
    uv_signal_init(br->loop, &br->sigint);
    br->sigterm.data = br->sigint.data = br;
    uv_signal_start(&br->sigterm, on_signal, SIGTERM);
    uv_signal_start(&br->sigint, on_signal, SIGINT);
    char red[512];
    KVR_LOG_INFO("started",
                 "engine=%s url=%s zmq=%s replay=%s ranks=%d nats=%s namespace=%s id=%" PRIu64,
                 br->engine, br->engine_url, br->zmq_ep, br->replay ? br->replay : "-", br->n,
                 kvr_nats_redact_url(br->nats_url, red, sizeof red), br->ns, br->id);
    uv_run(br->loop, UV_RUN_DEFAULT);
    for (int i = 0; i < br->n; i++) {
        pending_free(&br->ranks[i]);
        js_outbox_free(&br->ranks[i].ob);
    }
    kvr_kv_decoder_free(&br->dec);
    kvr_buf_free(&br->out);
    kvr_buf_free(&br->scratch);
    kvr_buf_free(&br->enc);
    kvr_buf_free(&br->metrics_body);
    zmq_ctx_term(br->zctx);
    kvr_nats_flags_free(&br->nf);
    kvr_nats_global_shutdown(2000);
    return 0;
}
