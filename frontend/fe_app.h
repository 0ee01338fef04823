/* fe_app: the state kvr-frontend's loop thread owns (one process, one loop) and the calls
 * between its parts: fe_call.c (a call's responses, its upstream transfer and relay), fe_route.c
 * (kvr.route and the local choice), fe_handlers.c (the HTTP endpoints), fe_loop.c (loop time,
 * heartbeats, lease, shutdown) and main.c (flags, metrics, start-up).
 *
 * Everything here is touched on the loop thread only. */
#ifndef FE_APP_H
#define FE_APP_H

#include "fe_core.h"
#include "fe_pool.h"

#include "kvr_access.h"
#include "kvr_curl.h"
#include "kvr_http.h"
#include "kvr_loop_stat.h"
#include "kvr_metrics.h"
#include "kvr_nats.h"
#include "kvr_sse.h"
#include "kvr_tok.h"
#include "route_msg.h"

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

enum { R_COMPLETIONS, R_CHAT, R_MODELS, R_HEALTH, R_METRICS, R_OTHER, R_N };
enum { FB_TIMEOUT, FB_NO_RESPONDERS, FB_ROUTER_ERROR, FB_DISCONNECTED, FB_BAD_REPLY };
enum { UE_CONNECT, UE_STATUS, UE_AFTER_FIRST, UE_MALFORMED };
/* metric label sets (main.c), NULL-terminated, indexed by the enums above */
extern const char *route_labels[];
extern const char *status_labels[];
extern const char *fallback_labels[];
extern const char *uerr_labels[];

typedef struct fe_app {
    uv_loop_t *loop;
    kvr_http_server http;
    kvr_curl curl;
    kvr_nats nats;
    bool nats_on;
    kvr_metrics *metrics;
    fe_pool pool;
    const kvr_tokenizer *tok;
    uv_timer_t tick;
    uv_signal_t sigint, sigterm;
    bool stopping;
    /* config */
    uint64_t frontend_id;
    fe_mode mode;
    const char *api_key;
    uint32_t block_size;
    int64_t route_timeout_ms;
    int64_t route_tries;
    kvr_route_target route_target; /* kvr.route.leader first (route_msg.h) */
    kvr_loop_stat loop_stat;       /* kvr_frontend_loop_busy_seconds */
    uint64_t boot_ms;
    uint64_t next_req;
    char lease_subject[64];
    /* metrics */
    kvr_metric *m_requests, *m_responses, *m_ttft, *m_e2e, *m_route_lat, *m_route_rtt, *m_active, *m_upstream_err,
        *m_fallback, *m_route_tries, *m_retries, *m_route_mode, *m_workers, *m_hb_rejected,
        *m_disconnects;
    uint64_t active_streams;
    /* FREE route events that may have reached no router (fe_call.c, fe_free_resend_*): core
     * NATS keeps what is published while disconnected and sends it on reconnect, but if the
     * frontend reconnects before the routers have resubscribed, the server drops it. */
    struct fe_resend *resend;
    uint32_t n_resend, cap_resend;
    int64_t reconnect_ms; /* monotonic ms of the last (re)connect, 0 before any */
    kvr_metric *m_free_resent;
    /* issue 14: predicted vs actual prefix hits (fe_hits.c) */
    kvr_metric *m_hit_predicted, *m_hit_cached, *m_hit_misses;
    /* issue 18 edges: drain, stalls, admission (docs/SECURITY.md 5) */
    struct fe_call *calls; /* every live call (doubly linked), ended at the drain deadline */
    size_t n_calls;
    bool draining, closed;
    uv_timer_t drain_timer;
    int64_t drain_timeout_ms;
    int64_t upstream_stall_ms;
    /* stall compensation (note_loop_time), monotonic ms */
    int64_t read_ms;         /* the loop could read up to here (accounted) */
    int64_t lost_ms;         /* time it could not, not yet compensated */
    int64_t poll_start_ms;   /* the last poll began */
    int64_t poll_timeout_ms; /* with this timeout (-1: none) */
    bool poll_pending;       /* that poll's return is not accounted yet */
    uv_prepare_t prepare;
    kvr_cidr_list worker_cidrs;
    kvr_metric *m_hb_refused_url, *m_stalls, *m_drain_cut;
    kvr_metric *m_remote_tok;   /* {result}: ok, error */
    kvr_metric *m_mdc_mismatch; /* workers whose model card differs from our tokenizer's */
    bool forward_body;          /* --forward body (fe_forward.c) */
} fe_app;

extern fe_app app;

typedef struct fe_call {
    struct fe_call *prev, *next; /* app.calls */
    kvr_http_req *req;           /* NULL once finished */
    fe_req r;
    fe_relay relay;
    kvr_sse sse;
    kvr_buf out;    /* scratch for SSE bytes to the client */
    kvr_buf upbody; /* upstream request body */
    uint8_t rid[16];
    char rid_hex[33];
    char ns[FE_NS_MAX];
    /* the model whose pool serves the call: r.model, or the base model of the LoRA adapter
     * r.model names (then lora = r.model; the upstream body keeps the adapter's name) */
    char pool_model[FE_MODEL_MAX];
    char lora[FE_MODEL_MAX];
    fe_filter filt; /* lora and the model card checksum of pool_model's tokenizer */
    int route;      /* R_* */
    /* routing */
    int tries;
    const char *route_subject; /* of the try in flight (a static string) */
    bool route_pending;
    bool booked; /* a router booked it, or may have: send events */
    int64_t t_start_ns, t_route_ns, t_first_ns;
    int64_t t_try_ns; /* the current kvr.route try was sent (kvr_frontend_route_rtt_seconds) */
    /* upstream */
    kvr_curl_req *up;
    char url[FE_URL_MAX];
    uint64_t worker_id;
    bool have_worker;
    /* what the router predicted (route reply), in tokens of the pool's block size; compared
     * with the worker's cached_tokens when the call ends (fe_hits.c) */
    bool have_prediction;
    uint32_t predicted_tokens, best_predicted_tokens;
    int attempts;
    long up_status;
    bool got_done;
    bool client_gone;
    bool stream_started;
    bool failed_after_first;
    char up_err[256];
    /* parse on the thread pool (big bodies): nothing answers req while it runs */
    uv_work_t work;
    bool parse_pending;
    int parse_rc;
    fe_http_error perr;
    /* remote tokenize (--tokenizer-fallback remote): c->up is the worker's /tokenize */
    void (*tok_next)(struct fe_call *c);
    /* --forward body: the worker's Content-Type, relayed */
    char up_ctype[128];
    bool up_is_sse;
    uint64_t tok_worker_id;
    /* held for a pool waking from zero (fe_hold.c) */
    struct fe_hold_pool *hold; /* its pool while held (queued or asking again), else NULL */
    struct fe_call *hold_prev, *hold_next;
    bool hold_queued;
    bool waited; /* it was held: x-kvroute-cold-start */
    size_t hold_bytes;
    int64_t t_hold_ns;
    int64_t hold_deadline_ms, hold_keepalive_ms; /* monotonic */
    /* no live worker of the model was known when it arrived (404 or 503): it was routed in
     * case a router knows its pool as sleeping; answered so if no router takes it */
    int cold_status;
    /* disaggregation (fe_disagg.c): the prefill leg's state and worker */
    uint8_t dg_state;
    int64_t dg_t0_ns, dg_work_ns; /* prefill leg start; the frontend's own time on it */
    bool prefill_done_sent; /* PREFILL_DONE published (once: prefill leg end or first token) */
    uint64_t prefill_worker_id;
    char prefill_url[FE_URL_MAX];
} fe_call;

/* fe_hold.c: requests held for a pool waking from zero (loop thread). */
void fe_hold_configure(size_t max_held, size_t max_bytes, int64_t wake_timeout_ms,
                       int64_t keepalive_ms);
int fe_hold_metrics(kvr_metrics *m);
/* A router answered c "pool waking": c is held (or answered 503 when its pool is full). */
void fe_hold_waking(fe_call *c, uint32_t retry_after_ms);
/* Any kvr.route reply for c (before it is handled). */
void fe_hold_reply_seen(fe_call *c);
/* c goes to a worker: its hold ends; routed (a router chose it): the pool's other held calls
 * ask again now. */
void fe_hold_served(fe_call *c, bool routed);
/* use_local_choice found no worker for c: true when fe_hold answered or held c. */
bool fe_hold_no_worker(fe_call *c, int fb_reason);
void fe_hold_client_gone(fe_call *c);
void fe_hold_detach(fe_call *c); /* before c is freed */
/* A heartbeat of a live worker of (ns, model) arrived: that pool's probe asks now. */
void fe_hold_worker_heard(const char *ns, const char *model);
/* GET /metrics: the registry plus kvr_frontend_held_requests{namespace,model}. */
void fe_hold_metrics_respond(kvr_http_req *req);
/* Draining (first SIGTERM): the queued held calls get 503 at once, held ones asking a router
 * get it when answered; they have no work to finish here and another frontend may serve
 * them. */
void fe_hold_drain(void);
void fe_hold_close(void);

/* fe_hits.c: registers the metrics; fe_hits_record is called once per call whose worker
 * reported its cached tokens. */
int fe_hits_metrics(kvr_metrics *m);
void fe_hits_record(fe_call *c);

/* fe_call.c */
size_t status_index(int status);
void respond_json(kvr_http_req *req, int route, int status, const kvr_buf *body);
void respond_error(kvr_http_req *req, int route, const fe_http_error *e);
void respond_simple_error(kvr_http_req *req, int route, int status, const char *type,
                          const char *code, const char *msg);
void worker_inflight(fe_call *c, int delta);
void release_worker(fe_call *c);
/* Publishes the request's PREFILL_DONE, once: at the end of a disaggregated request's prefill
 * leg (the prefill worker's booking then ends with its compute), else at the first token. */
void fe_call_prefill_done(fe_call *c);
void finish_error(fe_call *c, int status, const char *type, const char *code, const char *msg);
/* Frees c once nothing refers to it any more (client, route reply, upstream transfer). */
void call_maybe_free(fe_call *c);
/* Ends paused upstream transfers whose worker has been silent for the stall timeout (tick). */
void cut_hung_paused(int64_t now);
/* NATS state changes and the tick drive the FREE re-sends (loop thread). */
void fe_free_resend_on_state(bool connected, int64_t now);
void fe_free_resend_tick(int64_t now);
void fe_free_resend_free(void);
void on_client_close(kvr_http_req *req);
void on_client_drain(kvr_http_req *req);
/* kvr_sse callback: one upstream event relayed to the client */
int on_sse_event(void *arg, kvr_slice event, kvr_slice data);
void start_upstream(fe_call *c);

/* fe_remote.c: asks a live worker of c->ns for the ids of c->r.remote_body (vLLM POST
 * /tokenize), then calls next(c) with c->r.tokens filled; answers the client itself on failure. */
void fe_remote_tokenize(fe_call *c, void (*next)(fe_call *c));

/* fe_forward.c (--forward body): the worker's answer relayed byte for byte */
int fe_forward_header(kvr_curl_req *r, kvr_slice name, kvr_slice value);
int fe_forward_data(fe_call *c, const char *data, size_t len);
void fe_forward_end(fe_call *c);
/* The block size the pool's workers announce in their heartbeats (the first live one serving
 * model in ns), or --block-size when none says. */
uint32_t fe_pool_block_size(const char *ns, const char *model);

/* fe_disagg.c: the prefill leg of a disaggregated request. fe_disagg_strip drops client
 * kv_transfer_params from a forwarded body (0 or KVR_ENOMEM); fe_disagg_on_route notes the
 * route reply's path and prefill worker; fe_disagg_start, called by start_upstream, starts
 * the prefill leg when one is due (true: it runs, and calls start_upstream again when done). */
int fe_disagg_metrics(kvr_metrics *m);
int fe_disagg_strip(fe_call *c);
void fe_disagg_on_route(fe_call *c, const kvr_route_reply *rep);
bool fe_disagg_start(fe_call *c);

/* fe_route.c */
void use_local_choice(fe_call *c, int fb_reason);
void send_route(fe_call *c);

/* fe_handlers.c */
void on_request(kvr_http_req *req);

/* fe_loop.c */
void note_loop_time(int64_t now);
void on_prepare(uv_prepare_t *h);
void on_heartbeat(const kvr_nats_msg *m, void *data);
void on_nats_state(kvr_nats *kn, kvr_nats_state st, void *data);
void on_tick(uv_timer_t *t);
void collect(kvr_metrics *m, void *arg);
void on_signal(uv_signal_t *s, int signum);
void shutdown_now(void);

#endif
