/* fe_pool: the frontend's view of live workers (from kvr.workers.> heartbeats), pool
 * (namespace) selection for rolling updates, local worker choice (round-robin, random,
 * least-loaded; also the fallback when no router answers). The route API's codec is
 * proto/route_msg.h.
 *
 * Loop thread only. The table owns its entries; pointers returned into it stay valid until
 * the next fe_pool_heartbeat or fe_pool_expire call. */
#ifndef FE_POOL_H
#define FE_POOL_H

#include "kvr_access.h"
#include "kvr_buf.h"
#include "kvr_err.h"
#include "route_msg.h"

#include <stdbool.h>
#include <stdint.h>

#define FE_POOL_MAX_WORKERS 4096
#define FE_NS_MAX 128
#define FE_URL_MAX 256

typedef struct fe_worker {
    uint64_t id;
    char ns[FE_NS_MAX];
    char model[256];
    char url[FE_URL_MAX];
    char role[16];
    uint32_t block_size, capacity_blocks, active, waiting, used_blocks;
    uint64_t started_ms;
    int64_t last_seen_ms;                 /* monotonic */
    uint32_t inflight;                    /* requests this frontend has sent it and not finished */
    char mdc_sum[KVR_ROUTE_NAME_MAX + 1]; /* model card checksum; "" unknown */
    bool mdc_logged; /* its mismatch was logged and counted (fe_pool_mdc_mismatch) */
    /* LoRA adapters it serves (heartbeat "loras"): n_loras NUL-terminated names packed in
     * lora_names (heap, owned by the table), NULL when none */
    char *lora_names;
    uint32_t n_loras;
} fe_worker;

/* A request's worker filter (issue 13, items 3 and 4). lora: the adapter the request runs
 * under ("" none): when some live worker of the pool lists it, only those are chosen (when
 * none does, any: engines load adapters on demand). mdc_sum: the model card checksum the
 * frontend loaded for the model ("" none): a worker announcing another non-empty one is
 * never chosen. */
typedef struct fe_filter {
    const char *lora;
    const char *mdc_sum;
} fe_filter;

typedef enum { FE_MODE_KV = 0, FE_MODE_RR, FE_MODE_RANDOM, FE_MODE_LEAST } fe_mode;
int fe_mode_parse(const char *s, fe_mode *out);
const char *fe_mode_name(fe_mode m);

typedef struct fe_pool {
    fe_worker *w; /* n entries, cap FE_POOL_MAX_WORKERS */
    size_t n;
    /* Namespace filter: exact `ns`, or (prefix mode) `prefix` and `prefix-*`. */
    bool prefix_mode;
    char ns[FE_NS_MAX];
    int64_t ttl_ms; /* a worker unseen for this long is down (default 3000) */
    /* NATS is down: no heartbeat can reach us, so a missing one says nothing about a worker.
     * Workers keep their last known state and no age is judged (fe_pool_set_blind). */
    bool blind;
    uint64_t rr;       /* round-robin counter */
    uint64_t rng;      /* xorshift state */
    uint64_t rejected; /* malformed heartbeats */
    /* Worker URL allow-list (not owned; NULL: every URL). A heartbeat whose url is outside
     * is refused (KVR_EINVAL) and counted in refused_url. */
    const kvr_cidr_list *allow;
    uint64_t refused_url;
} fe_pool;

int fe_pool_init(fe_pool *p, const char *ns_or_prefix, bool prefix_mode, uint64_t seed);
void fe_pool_free(fe_pool *p);

/* True if namespace ns is served by this frontend. */
bool fe_pool_ns_match(const fe_pool *p, const char *ns, size_t len);

/* Applies one heartbeat (msgpack map, DESIGN 4) seen at monotonic time now_ms. Heartbeats
 * of other namespaces are ignored (return 0). Malformed → KVR_EINVAL/ETYPE/ETRUNC + err. */
int fe_pool_heartbeat(fe_pool *p, const void *data, size_t len, int64_t now_ms, kvr_err *err);
/* Drops workers unseen for ttl_ms (nothing while blind). */
void fe_pool_expire(fe_pool *p, int64_t now_ms);
/* The NATS connection went down (blind = true) or came back (false) at now_ms. Going blind
 * first drops the workers already past ttl_ms; coming back gives every remaining worker a
 * full ttl_ms from now_ms to beat again (its own client may still be reconnecting) before
 * it expires. */
void fe_pool_set_blind(fe_pool *p, bool blind, int64_t now_ms);
/* A heartbeat of a new worker that finds the table full
 * drops them first, so a flood of one-shot heartbeats blocks new workers only while the
 * fakes are within their TTL (fe_pool_expire above). */
/* Moves every worker's last_seen on by delta_ms, never past now_ms: the loop stalled that
 * long and could not have read their heartbeats (liveness is judged on the time it had). */
void fe_pool_shift(fe_pool *p, int64_t delta_ms, int64_t now_ms);

/* Live workers serving model (NULL: any). */
size_t fe_pool_live(const fe_pool *p, const char *model, int64_t now_ms);

/* Chooses a pool (namespace) for model, with probability proportional to its live instance
 * count. Returns 0 and copies the namespace into ns_out, KVR_ENOTFOUND if some workers are
 * live but none serves model, KVR_EAGAIN if no worker is live at all. */
int fe_pool_pick_ns(fe_pool *p, const char *model, int64_t now_ms, char ns_out[FE_NS_MAX]);

/* Local choice within namespace ns (mode RR/RANDOM/LEAST; KV falls back to LEAST), skipping
 * worker `exclude_id` when has_exclude (retry on another worker; if it is the only one, it is
 * chosen). NULL if no live worker. */
fe_worker *fe_pool_choose(fe_pool *p, fe_mode mode, const char *ns, const char *model,
                          int64_t now_ms, bool has_exclude, uint64_t exclude_id);
fe_worker *fe_pool_find(fe_pool *p, const char *ns, uint64_t id);
fe_worker *fe_pool_find_url(fe_pool *p, const char *url);
/* True when worker id at url has not been heard from for silent_ms or more at now_ms: its
 * heartbeat is older, or it is gone from the table (expired, or replaced by a worker at
 * another url). False while blind: no heartbeat could have arrived. Used for upstream
 * transfers paused by a slow client, where the absence of response bytes says nothing. A
 * worker a request found unreachable (main.c sets its last_seen far back) counts as silent
 * until its next heartbeat. */
bool fe_pool_worker_silent(fe_pool *p, uint64_t id, const char *url, int64_t now_ms,
                           int64_t silent_ms);

/* fe_pool_pick_ns / fe_pool_choose under filter f (NULL: none). pick_ns prefers the pools
 * with workers listing f->lora; KVR_ENOTFOUND also when every live worker of the model has
 * another model card. */
int fe_pool_pick_ns_f(fe_pool *p, const char *model, int64_t now_ms, const fe_filter *f,
                      char ns_out[FE_NS_MAX]);
fe_worker *fe_pool_choose_f(fe_pool *p, fe_mode mode, const char *ns, const char *model,
                            int64_t now_ms, bool has_exclude, uint64_t exclude_id,
                            const fe_filter *f);
/* The base model of adapter `name` as some live worker lists it, or NULL. */
const char *fe_pool_lora_base(const fe_pool *p, const char *name, int64_t now_ms);
/* Whether w lists adapter `name`. */
bool fe_worker_has_lora(const fe_worker *w, const char *name);

/* Appends the distinct models of live workers as an OpenAI /v1/models body; adapters are
 * listed after their base models, vLLM style ("parent": the base model). */
int fe_pool_models_json(const fe_pool *p, int64_t now_ms, kvr_buf *out);

#endif
