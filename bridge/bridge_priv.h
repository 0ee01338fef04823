/* kvr-bridge's private header: the state the bridge's files share (not a public interface;
 * nothing outside bridge/ includes it).
 *
 * One loop thread owns everything below: every function declared here runs on it.
 *   main.c    flags, start-up, shutdown
 *   seq.c     sequence and replay tracking: live and replayed batches in order, gaps, engine
 *             restarts, AllBlocksCleared, and forwarding into the JetStream outbox
 *   intake.c  the engine's ZMQ sockets (SUB and replay DEALER) polled on the loop
 *   health.c  engine /metrics and /health scrapes, heartbeats, the counters' log line */
#ifndef KVR_BRIDGE_PRIV_H
#define KVR_BRIDGE_PRIV_H

#include "frame.h"
#include "js_outbox.h"
#include "kv_event.h"
#include "kvr_buf.h"
#include "kvr_curl.h"
#include "kvr_nats.h"
#include "kvr_nats_flags.h"
#include "scrape.h"

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

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
    uv_timer_t probe_timer; /* follow-up replays from `next` after a resync (br_probe_tail) */
    int probes_left;
    bool have_live;     /* last_live is meaningful */
    uint64_t last_live; /* seq of the last live batch (the live stream never goes back) */
    bool known;         /* next is meaningful */
    uint64_t next;      /* next expected seq */
    bool replaying;     /* a replay request is out; live batches wait in pending */
    uint64_t replay_from, replay_got; /* the request out: its start seq, batches answered so far */
    /* next at the last re-asked gap among batches queued behind a replay: one re-ask per gap,
     * so a batch the engine no longer has clears the worker instead of looping */
    bool reasked;
    uint64_t reasked_at;
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
    const char *role; /* the engine's role in heartbeats: both|prefill|decode (disaggregation) */
    int64_t dp, scrape_ms, stats_ms, block_size, announce_ms, replay_timeout_ms, max_inflight,
        outbox_bytes;
    uint64_t id;
    kvr_nats_flags nf;
};

/* seq.c */
/* Drops the rank's queued batches and queues an AllBlocksCleared (why is logged). */
void br_publish_clear(rank *rk, const char *why);
/* js_outbox loss callback: data is the rank. */
void br_on_loss(js_outbox *ob, int status, void *data);
void br_pending_free(rank *rk);
/* Asks the replay socket for every batch from `from`; live batches wait until it ends. */
void br_start_replay(rank *rk, uint64_t from);
/* Follow-up replays from `next` 1, 2 and 3 s after a replay from 0 (see seq.c). */
void br_probe_tail(rank *rk);
/* Pauses every outbox until a heartbeat with the new engine's start has gone out. */
void br_hold_begin(bridge *br);
/* The engine restarted: clear the worker and replay the new engine from 0. */
void br_resync_from_zero(rank *rk);
/* One live (SUB) batch, and one replayed batch (seq KVR_BRIDGE_SEQ_END ends the replay). */
void br_on_live(rank *rk, uint64_t seq, const void *p, size_t len);
void br_on_replayed(rank *rk, uint64_t seq, const void *p, size_t len);

/* intake.c */
/* Reads every rank's sockets from the loop's next idle pass, never from inside the caller
 * (after a send on the dealer: the send can consume ZMQ_FD's edge). */
void br_drain_soon(bridge *br);
/* (Re)opens the replay DEALER (a no-op without --replay); the old one is closed. */
int br_open_dealer(rank *rk);
int br_open_sub(rank *rk, const char *topic);
/* Stops and closes the poll handle and its socket (NULL is fine). */
void br_zpoll_close(zpoll *z);

/* health.c: timer callbacks (data is the bridge) and the counters' log line. */
void br_on_scrape(uv_timer_t *t);
void br_on_hb_timer(uv_timer_t *t);
void br_on_stats_timer(uv_timer_t *t);
void br_log_stats(bridge *br);

#endif
