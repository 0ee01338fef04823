/* kvr-epp's private header: the state kvr-epp's files share (not a public interface; nothing
 * outside epp/ includes it; epp_grpc.h is the public one).
 *
 * One loop thread owns everything below: every function declared here runs on it.
 *   main.c        flags, start-up, shutdown (signals)
 *   epp_stream.c  the ext_proc message flow of one stream (headers, body, response, trailers),
 *                 immediate responses, the gRPC call handlers (ext_proc and health)
 *   epp_pick.c    the pick: route-and-reserve over kvr.route (tries, timeouts), local least-loaded
 *                 fallback, endpoint subsets, the destination list, bookings and route events
 *   epp_health.c  gRPC health status, worker heartbeats, NATS state, the lease tick
 *   epp_metrics.c the metrics (registration, collection) and the /metrics HTTP handler
 *   epp_hold.c    picks held while a router wakes their pool from zero */
#ifndef KVR_EPP_PRIV_H
#define KVR_EPP_PRIV_H

#include "epp_grpc.h"
#include "epp/proto/ext_proc_min.pb-c.h"
#include "epp/proto/health_min.pb-c.h"

#include "fe_core.h"
#include "fe_pool.h"
#include "fe_tokenize.h"
#include "fe_chat.h"
#include "kvr_flags.h"
#include "kvr_hash.h"
#include "kvr_heartbeat.h"
#include "kvr_http.h"
#include "kvr_json.h"
#include "kvr_log.h"
#include "kvr_metrics.h"
#include "kvr_mp.h"
#include "kvr_nats.h"
#include "kvr_nats_flags.h"
#include "route_msg.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define EPP_CHUNK 62000 /* GIE's BodyByteLimit: body replies are cut at this size */
#define EPP_DEST_HDR "x-gateway-destination-endpoint"
#define EPP_SERVED_KEY "x-gateway-destination-endpoint-served"
#define EPP_SUBSET_NS "envoy.lb.subset_hint"
#define EPP_SUBSET_KEY "x-gateway-destination-endpoint-subset"
#define EPP_MAX_FALLBACKS 8 /* --max-fallbacks bound */
#define EXT_PROC_PATH "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
#define HEALTH_PATH "/grpc.health.v1.Health/Check"

/* error_code label indexes (labels: epp_metrics.c, the reference EPP's errutil names) */
enum { ERR_400 = 0, ERR_404, ERR_413, ERR_503, ERR_500, ERR_429 };
/* kvr_epp_route_fallback_total reason indexes (labels: epp_metrics.c) */
enum { FB_TIMEOUT = 0, FB_NO_RESPONDERS, FB_ROUTER_ERROR, FB_NATS_DOWN, FB_BAD_REPLY, FB_SUBSET };

/* The process state, owned by the loop thread (defined in main.c). */
struct epp_state {
    uv_loop_t *loop;
    kvr_nats nats;
    bool nats_on;
    bool ready_without_workers; /* --ready-without-workers: readiness ignores live workers */
    fe_pool pool;
    kvr_cidr_list worker_cidrs;
    epp_grpc_server grpc, health;
    bool health_on;
    kvr_http_server http;
    kvr_metrics *metrics;
    uv_timer_t tick;
    uv_signal_t sigint, sigterm;
    uv_timer_t stop_timer;
    bool stopping;
    uint64_t id;
    char lease_subject[64];
    int64_t route_timeout_ms, route_tries;
    kvr_route_target route_target; /* kvr.route.leader first (route_msg.h) */
    uint32_t block_size;
    int max_fallbacks;
    size_t max_body;
    uint32_t open_streams;
    /* picks in flight: kvr.route requests out (retries included). A pick that would pass
     * max_pending_picks is shed with 429 instead of queueing behind slow routers. */
    uint32_t pending_picks, max_pending_picks;
    kvr_metric *m_req, *m_err, *m_dur, *m_ready, *m_pick, *m_route, *m_fallback, *m_mismatch, *m_streams,
        *m_buffered, *m_routed, *m_cancelled, *m_pending;
};
extern struct epp_state E;

/* One ext_proc stream. Lives until its call is closed and no route request is out. */
typedef struct xs {
    epp_grpc_call *call; /* NULL once the call is gone */
    int state;           /* XS_* */
    char path[128];      /* the request's :path */
    kvr_buf body;        /* request body so far */
    kvr_buf deferred;    /* messages that arrived while the pick was out: [u32 len][bytes] */
    bool has_subset;
    char subset[1024]; /* comma list of ip:port (has_subset) */
    uint8_t rid[KVR_ROUTE_ID_LEN];
    char rid_hex[2 * KVR_ROUTE_ID_LEN + 1];
    fe_req req;
    /* the pool's model: the request's, or the base model of the LoRA adapter it names (then
     * lora is the adapter), as the frontend maps them (fe_handlers.c) */
    char pool_model[FE_MODEL_MAX];
    char lora[FE_MODEL_MAX];
    fe_filter filt;
    char ns[FE_NS_MAX];
    int tries;
    bool route_pending, booked, prefill_sent, response_done;
    uint64_t worker_id;
    char url[FE_URL_MAX];
    char pick[FE_URL_MAX]; /* ip:port */
    int64_t t_start_ns, t_body_ns;
    int64_t t_route_ns;        /* the last kvr.route request went out */
    const char *route_subject; /* of that request (a static string) */
    /* no live worker of the model when the pick started: the routers were asked anyway (the
     * pool may be scaled to zero); the status to answer when none says "waking" (404/503) */
    int cold_status;
    /* held for a waking pool (epp_hold.c): its pool, queue links, deadline */
    void *hold_pool;
    struct xs *hold_next, *hold_prev;
    int64_t hold_deadline_ms;
} xs;

enum { XS_COLLECT = 0, XS_DECIDING, XS_PASS, XS_DONE };

/* epp_stream.c */
void epp_decided(xs *x);
void epp_immediate(xs *x, int status, int err_li, const char *msg);
int epp_on_call(epp_grpc_call *call, const char *path);
void epp_on_close(epp_grpc_call *call, bool finished);
void epp_on_half_close(epp_grpc_call *call);
void epp_on_message(epp_grpc_call *call, const uint8_t *msg, size_t len);
void epp_xs_maybe_free(xs *x);

/* epp_pick.c */
void epp_build_dest(xs *x, const char *model, char *dest, size_t cap);
fe_worker *epp_local_pick(const xs *x, const char *ns, const char *model, const char **ex,
                          size_t n_ex);
void epp_publish_event(xs *x, kvr_route_event_type type);
void epp_release(xs *x);
void epp_start_pick(xs *x);
/* A held pick asks the routers again (its tries start over). */
void epp_route_again(xs *x);

/* epp_hold.c: picks held while a router wakes their pool from zero */
void epp_hold_configure(size_t max_held, int64_t wake_timeout_ms);
int epp_hold_metrics(kvr_metrics *m);
/* A router answered x "pool waking": true when x is held (or still is), false when the holds
 * are full (the caller answers 503). */
bool epp_hold_waking(xs *x, uint32_t retry_after_ms);
/* A router routed x ok: if x was held, the other held picks of its pool ask again now. */
void epp_hold_routed(xs *x);
/* x got its answer (served: a destination) or its call went: it leaves the hold, if held. */
void epp_hold_end(xs *x, bool served);
void epp_hold_client_gone(xs *x);
/* A heartbeat of a live worker of (ns, model): that pool's held picks ask now. */
void epp_hold_worker_heard(const char *ns, const char *model);
void epp_url_hostport(const char *url, char *out, size_t cap);

/* epp_health.c */
int epp_health_status(const char *s);
void epp_on_heartbeat(const kvr_nats_msg *m, void *data);
void epp_on_nats_state(kvr_nats *kn, kvr_nats_state st, void *data);
void epp_on_tick(uv_timer_t *t);

/* epp_metrics.c */
void epp_on_http(kvr_http_req *req);
int epp_register_metrics(void);

#endif
