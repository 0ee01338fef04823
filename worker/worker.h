/* worker/worker.h: the state kvr-worker's files share (one process, one worker).
 *
 * Everything here is owned by the process's one libuv loop thread: main.c (flags, metrics,
 * shutdown), api*.c (HTTP requests and the engine's clock; api_priv.h), events.c (KV events and
 * heartbeats on NATS), zmq_pub.c (KV events on ZMQ in vLLM's framing, --kv-events zmq). */
#ifndef KVR_WORKER_H
#define KVR_WORKER_H

#include "disagg.h"
#include "engine.h"
#include "zmq_pub.h"
#include "kv_event.h"
#include "kvr_buf.h"
#include "kvr_err.h"
#include "kvr_heartbeat.h"
#include "kvr_http.h"
#include "kvr_log.h"
#include "kvr_metrics.h"
#include "kvr_nats.h"
#include "kvr_nats_flags.h"
#include "kvr_hftok.h"
#include "kvr_tmpl.h"
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
    const char *tokenizer; /* --tokenizer DIR: a Hugging Face model directory, or "byte" */
    const char *kv_events, *zmq_endpoint, *zmq_replay, *zmq_topic, *zmq_replay_layout;
    uint64_t zmq_buffer_steps;
    uint64_t id, seed, event_buffer_max, resync_after_ms, announce_delay_ms, stream_interval;
    uint64_t block_size, capacity_blocks, max_num_seqs, max_batched_tokens, max_model_len;
    double speedup;
    kvr_nats_flags nats_sec; /* --nats-user, --nats-creds, --nats-tls-ca, ... */
    /* --lora NAME (repeatable): adapters served; a request whose "model" is one runs under it */
    const char *loras[KVR_ENGINE_MAX_LORAS];
    uint32_t n_loras;
    /* heartbeat "mdc_sum": --mdc-sum, or computed from --model-dir (kvr_model_card.h); "" unknown
     */
    const char *mdc_sum_flag, *model_dir;
    char mdc_sum[64];
    wk_dg_opts dg; /* --kv-*: prefill/decode roles and the KV side channel (disagg.h) */
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

enum { EV_WAIT, EV_SENT, EV_ACKED };
struct ev_entry {
    kvr_buf b;
    uint64_t stream_seq; /* once acked */
    int st;
};

typedef struct worker {
    opts o;
    uv_loop_t *loop;
    kvr_engine *eng;
    kvr_http_server http;
    kvr_nats nats;
    bool nats_ok;
    wk_zmq *zmq; /* --kv-events zmq: events on ZMQ in vLLM's framing, no NATS at all */
    struct wk_dg *dg; /* roles: holds, the KV side channel, pulls (disagg.c) */
    kvr_metrics *metrics;
    uv_timer_t drive_timer, hb_timer, drain_timer, flush_timer, retry_timer;
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
    /* KV event outbox (see "NATS: events"): a ring of payloads in event order, from the oldest
     * not yet acknowledged by the stream. Entry i has event sequence ob_seq + i. */
    struct ev_entry *ob;
    size_t ob_cap, ob_head, ob_n; /* ob_cap: a power of two */
    size_t ob_scan;               /* entries before it are sent or acked */
    size_t ob_inflight;
    uint64_t ob_seq;          /* event sequence of the oldest entry */
    uint64_t last_stream_seq; /* stream sequence of the last event popped */
    uint32_t backoff_ms;
    bool retry_wait; /* a failed publish: nothing is sent until retry_timer fires */
    bool need_resync;
    int64_t disconnected_at; /* kvr_mono_ms of the last disconnect, 0 while connected */
    kvr_buf scratch;
    /* --tokenizer DIR: prompts encoded and chats templated as the model does, output decoded
     * with its vocabulary. NULL: the byte tokenizer and ChatML. Immutable after start. */
    kvr_tokenizer *tok_hf;
    const kvr_hftok *hf;
    kvr_chat_tmpl *tmpl;
    /* clocks */
    int64_t lag_ns, lag_max_ns; /* at the start of the last step; the largest */
    int64_t lag_erased_ns;      /* lag forgiven by idle jumps, total */
    int64_t last_drive_end;
    bool draining, closing;
    /* metrics */
    kvr_metric *m_prompt, *m_cached, *m_gen, *m_running, *m_waiting, *m_used, *m_cached_blocks,
        *m_capacity, *m_steps, *m_prefill_tok, *m_step_kind, *m_preempt, *m_requests, *m_finished,
        *m_cancelled, *m_lag, *m_lag_max, *m_lag_erased, *m_busy, *m_ev_pub, *m_ev_batches,
        *m_ev_dropped, *m_resyncs, *m_evbuf, *m_ev_retries, *m_ev_reorders, *m_bad_req, *m_stored,
        *m_removed, *m_hb;
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
    kvr_buf all;          /* non-streaming: every token */
    kvr_hftok_stream dec; /* --tokenizer: streamed text, never half a UTF-8 character */
    bool dec_on;
    char id[64];
    char model[128];
    int64_t created;
    struct wk_dgreq *dg; /* prefill leg or pull state (disagg.c); NULL for most requests */
};

/* the one worker of this process (main.c) */
extern worker W;

/* api.c, api_writer.c, api_drive.c (api_priv.h says which is where) */
int64_t wk_wall_ns(worker *w);
void wk_on_request(kvr_http_req *req);
void wk_mark_ready(worker *w, wreq *r);
void wk_flush_ready(worker *w);
void wk_admit_pending(worker *w, size_t max);
void wk_wreq_free(wreq *r);
void wk_respond_error(kvr_http_req *req, int status, const char *type, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* for a request admitted later (disagg.c, after its KV pull): the idle clock jump and the
 * drive timer kick handle_completion does */
void wk_engine_idle_jump(worker *w, int64_t now);
void wk_kick_drive(worker *w);

/* main.c: GET /metrics (kvroute's own families, plus vLLM's names for kvr-bridge) */
void wk_metrics_respond(worker *w, kvr_http_req *req);

/* events.c */
void wk_publish_engine_events(worker *w);
void wk_ev_buffer_drop(worker *w);
void wk_on_nats_state(kvr_nats *kn, kvr_nats_state st, void *data);
void wk_heartbeat(uv_timer_t *t);

#endif
