/* routerd: one router replica (DESIGN sections 3-7). Internal to kvr-routerd.
 *
 * Threads: ONE libuv loop thread owns everything in a kvr_routerd (index, registry, bookings,
 * metrics). Core NATS traffic (route requests, heartbeats, route events) is read and answered
 * on that thread by kvr_nats' core client; KV events come from the JetStream consumer's cnats
 * thread, handed over through kvr_nats' queue (net/kvr_nats.h); snapshot writes run on the
 * libuv threadpool on an exported image, never touching live state.
 *
 * Ingestion policy (decided here, see DESIGN 3/4):
 *  - worker_id comes from the subject kvr.kv.<ns>.<worker_id>; a subject that does not parse
 *    is counted (reason "bad_subject") and skipped.
 *  - events from a worker never seen by heartbeat ARE applied (heartbeats may arrive after the
 *    first events; replay at start-up comes before any heartbeat).
 *  - events from a worker the registry knows is DOWN (missed beats) or REFUSED (block size
 *    differs from the router's) are ignored and counted ("worker_down", "refused_worker").
 *    A down worker's entries were removed when it went down.
 *  - with --namespace NS, events and heartbeats of other namespaces are ignored (counted
 *    "other_namespace").
 *  - the index records the stream sequence of every applied message, so replays and
 *    duplicate deliveries at or below it are harmless (kvr_nats filters them too).
 */
#ifndef KVR_ROUTERD_H
#define KVR_ROUTERD_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

typedef struct kvr_routerd_config {
    uint32_t id;
    const char *nats_url;
    const struct kvr_nats_flags *nats_flags; /* NATS credentials and TLS (may be NULL) */
    const char *http_addr;
    const char *data_dir;
    const char *ns; /* NULL or "all": every namespace */
    uint32_t block_size;
    int64_t snapshot_interval_ms;
    int64_t stream_max_age_ms;
    int64_t stream_max_bytes;
    int64_t stream_replicas; /* KVR_EVENTS replicas when creating it (0: 1) */
    int64_t heartbeat_misses;
    int64_t frontend_timeout_ms;
    int64_t max_request_age_ms;
    /* Raft (empty peers: local mode) */
    const char *raft_addr;
    const char *peers;
    bool join;
    int64_t degraded_after_ms;
    int64_t election_timeout_ms; /* 0: kvr_sync's default */
    int64_t raft_max_inflight;   /* 0: kvr_sync's default (entries awaiting commit) */
    int64_t raft_snapshot_threshold; /* 0: kvr_sync's default; trailing is a quarter of it */
    bool raft_log_memory;            /* --raft-log memory (the default) vs disk */
    /* Best-effort booking (only without peers), the scheme kvroute's Raft mode replaces and
     * kept to measure what it avoids: each router books on its own state machine and
     * broadcasts every booking (pinned to the worker it chose), prefill_done and free on
     * kvr.route.bcast; it applies the other routers' broadcasts to its own state as they
     * arrive. Decisions made before a peer's booking arrives see stale load. */
    bool best_effort;
    /* Token ids one route/match request may carry (HTTP token_ids, NATS "tokens"); also sizes
     * the HTTP body limit. 0 → 131072; capped at 65536 blocks. */
    int64_t max_request_tokens;
    /* Raft peers' shared secret (sync/peer_auth.h); NULL: no peer authentication, which
     * main.c allows for a multi-router group only with --insecure-cluster. */
    const char *cluster_secret_file;
    /* Access (docs/SECURITY.md 4, 5). admin_token: the secret every POST and /admin request
     * must present as "Authorization: Bearer <token>" (NULL: those endpoints answer 401);
     * owned by the caller, alive until kvr_routerd_free. worker_cidrs: comma-separated
     * CIDRs a heartbeat's url must be inside (NULL or "": "private", see kvr_access.h). */
    const char *admin_token;
    const char *worker_cidrs;
    /* Diagnostics (tests show the filters matter by turning them off): route a request under
     * a LoRA adapter to any worker of the model even when some list the adapter; route to
     * workers whose model card checksum differs from the request's. */
    bool no_lora_filter, no_mdc_filter;
    /* Scale-to-zero (DESIGN section 13, routerd/pools.c). pools_file: JSON
     * {"pools": [{"namespace", "model", "target"}...]} (NULL: no pools); scaler: "exec:PATH" or
     * "kubernetes" (with the scaler_* settings, scaler/scaler.h). A pool sleeps after
     * idle_after_ms without requests (only with min_workers 0), wakes to max(1, min_workers)
     * replicas (capped by max_workers when > 0), and a wake that has no live worker after
     * wake_timeout_ms returns it to sleeping. */
    const char *pools_file, *scaler;
    const char *scaler_api_url, *scaler_token_file, *scaler_ca_file, *scaler_namespace;
    int64_t scaler_timeout_ms; /* 0: the scaler's default */
    int64_t idle_after_ms, wake_timeout_ms, min_workers, max_workers;
    /* --index approx (issue 14 item 4): for engines without KV events, the worker a ROUTE
     * books is assumed to hold the request's blocks (indexer/approx.h), in the replicated
     * apply. approx_ttl_ms: 0 -> 120 s; approx_capacity_blocks: a worker's bound when its
     * heartbeat gives no capacity, 0 -> 16384. */
    bool index_approx;
    int64_t approx_ttl_ms;
    uint64_t approx_capacity_blocks;
    /* Conditional disaggregation (issue 15, fsm.h "Disaggregation"): a route for a model that
     * has live prefill or decode workers asks the FSM to book both legs; the prefill stays on
     * the decode worker when its uncached tokens are <= max_local_prefill (--max-local-prefill,
     * 1000) or the prefill worker has max_prefill_queue (--max-prefill-queue, 2) outstanding
     * prefills. Carried in each ROUTE command, so replicas never need equal flags. */
    uint32_t max_local_prefill, max_prefill_queue;
    /* The route cost's weights (sync/cost.h; --overlap-weight, --load-weight, --queue-weight,
     * --overflow-weight, --tie-band, --route-temperature). Unlike the two above they are NOT
     * in the command: the replicated apply reads them, so every router of a Raft group must
     * run the same ones (/v1/state "cost" shows them). has_cost false: the defaults. */
    bool has_cost;
    double cost_overlap_weight, cost_load_weight, cost_queue_weight, cost_overflow_weight,
        cost_tie_band, cost_temperature;
    /* The process's command line, NULL-terminated (not owned; must outlive the router): with
     * it the router restarts itself in place when its Raft log is unusable for good (sync.h
     * log_fenced_cb). NULL: it only logs that. */
    char *const *argv;
} kvr_routerd_config;

typedef struct kvr_routerd kvr_routerd;

/* Creates and starts the router on loop. Returns 0 or a KVR_E* code (logged). */
int kvr_routerd_start(kvr_routerd **out, uv_loop_t *loop, const kvr_routerd_config *cfg);
/* Graceful stop (SIGTERM): final snapshot, close every handle; done_cb(data) when all closed
 * (the loop then has nothing left to run). */
void kvr_routerd_stop(kvr_routerd *rd, void (*done_cb)(void *), void *data);
void kvr_routerd_free(kvr_routerd *rd);

#endif
