/* kvr-routerd: one router replica. See routerd.h and DESIGN sections 3-7. */
#include "kvr_access.h"
#include "kvr_err.h"
#include "kvr_flags.h"
#include "kvr_log.h"
#include "kvr_nats.h"
#include "kvr_nats_flags.h"
#include "cost.h"
#include "routerd.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

static kvr_routerd *g_rd;
static uv_signal_t g_sigterm, g_sigint;

static void on_stopped(void *data)
{
    uv_close((uv_handle_t *)&g_sigterm, NULL);
    uv_close((uv_handle_t *)&g_sigint, NULL);
}

static void on_signal(uv_signal_t *h, int signum)
{
    KVR_LOG_INFO("signal", "signal=%d", signum);
    uv_signal_stop(&g_sigterm);
    uv_signal_stop(&g_sigint);
    kvr_routerd_stop(g_rd, on_stopped, NULL);
}

int main(int argc, char **argv)
{
    uint64_t id = 1, block_size = 64;
    const char *nats = "nats://127.0.0.1:4222", *http = "127.0.0.1:8100", *data_dir = NULL;
    const char *ns = "all", *log_level = "info", *raft_addr = "", *peers = "";
    int64_t max_bytes = 1ll << 30;
    const char *admin_token_file = NULL, *worker_cidr = "private";
    int64_t snap_ms = 10000, max_age_ms = 3600000, misses = 3, degraded_ms = 500;
    int64_t stream_replicas = 1;
    int64_t election_ms = 500, raft_max_inflight = 0, raft_snapshot_threshold = 0;
    int64_t frontend_timeout_ms = 10000, max_request_age_ms = 600000;
    int64_t max_request_tokens = 131072;
    bool join = false, best_effort = false, insecure_cluster = false;
    bool no_lora_filter = false, no_mdc_filter = false;
    const char *pools_file = "", *scaler = "", *scaler_api_url = "", *scaler_token_file = "";
    const char *scaler_ca_file = "", *scaler_namespace = "";
    int64_t scaler_timeout_ms = 0, idle_after_ms = 300000, wake_timeout_ms = 300000;
    int64_t min_workers = 0, max_workers = 0;
    const char *cluster_secret_file = "";
    const char *raft_log = "memory";
    const char *index_mode = "events";
    int64_t approx_ttl_ms = 120000;
    uint64_t approx_capacity = 16384;
    int64_t max_local_prefill = 1000, max_prefill_queue = 2;
    /* Dynamo's formula with the booked blocks weighted 0.25 instead of 1: measured on the
     * shared trace at light and heavy load (docs/DESIGN.md 6), the best prefix-hit rate of
     * the weights tried and no worse TTFT. */
    kvr_cost_params cost = kvr_cost_params_default();
    cost.load_weight = 0.25;
    kvr_nats_flags nats_sec = {0};
    kvr_flag flags[] = {
        KVR_NATS_FLAG_ENTRIES(&nats_sec),
        {"id", KVR_FLAG_U64, &id, "router id (>= 1; also the Raft id)", false},
        {"nats", KVR_FLAG_STRING, &nats, "NATS URL(s)", false},
        {"http", KVR_FLAG_STRING, &http, "HTTP listen address host:port (default loopback only)", false},
        {"http-addr", KVR_FLAG_STRING, &http, "same as --http", false},
        {"admin-token-file", KVR_FLAG_STRING, &admin_token_file, "file holding the Bearer token every HTTP POST and /admin request needs (none: they answer 401)", false},
        {"worker-cidr", KVR_FLAG_STRING, &worker_cidr, "comma-separated CIDRs a worker's heartbeat url must be in; private = loopback + RFC 1918 + fc00::/7; any = no check", false},
        {"data-dir", KVR_FLAG_STRING, &data_dir, "data directory (snapshot, raft)", false},
        {"namespace", KVR_FLAG_STRING, &ns, "worker namespace to serve, or all", false},
        {"block-size", KVR_FLAG_U64, &block_size, "tokens per block", false},
        {"snapshot-interval", KVR_FLAG_DURATION, &snap_ms, "index snapshot interval (0: only on exit)", false},
        {"stream-max-age", KVR_FLAG_DURATION, &max_age_ms, "KVR_EVENTS max age when creating it", false},
        {"stream-max-bytes", KVR_FLAG_SIZE, &max_bytes, "KVR_EVENTS max bytes when creating it (1GiB)", false},
        {"stream-replicas", KVR_FLAG_INT, &stream_replicas, "KVR_EVENTS replicas when creating it (3 on a 3-node JetStream cluster)", false},
        {"heartbeat-misses", KVR_FLAG_INT, &misses, "missed 1 s heartbeats before a worker is down", false},
        {"frontend-timeout", KVR_FLAG_DURATION, &frontend_timeout_ms, "frontend lease timeout", false},
        {"max-request-age", KVR_FLAG_DURATION, &max_request_age_ms, "bookings older than this expire", false},
        {"log-level", KVR_FLAG_STRING, &log_level, "debug|info|warn|error", false},
        {"raft-addr", KVR_FLAG_STRING, &raft_addr, "Raft listen host:port (forwarding on port+1)", false},
        {"peers", KVR_FLAG_STRING, &peers, "initial voters 1@h:p,2@h:p,... (empty: local mode)", false},
        {"join", KVR_FLAG_BOOL, &join, "start without bootstrapping (node added at run time)", false},
        {"degraded-after", KVR_FLAG_DURATION, &degraded_ms, "answer locally after this long without quorum", false},
        {"best-effort", KVR_FLAG_BOOL, &best_effort, "without --peers: broadcast bookings to the other routers instead of agreeing on them (measurement baseline)", false},
        {"raft-max-inflight", KVR_FLAG_INT, &raft_max_inflight, "Raft log entries awaiting commit before new commands wait for the next (group commit; 0: default 1)", false},
        {"raft-snapshot-threshold", KVR_FLAG_INT, &raft_snapshot_threshold, "Raft log entries between snapshots (0: default 8192; a quarter of it is kept after each)", false},
        {"raft-log", KVR_FLAG_STRING, &raft_log, "memory|disk: where the Raft log and snapshots live (memory: term and vote still on disk, see docs/DESIGN.md)", false},
        {"election-timeout", KVR_FLAG_DURATION, &election_ms, "Raft election timeout (a dead leader is replaced within ~1-2x this)", false},
        {"max-request-tokens", KVR_FLAG_INT, &max_request_tokens, "token ids one route/match request may carry (sizes the HTTP body limit)", false},
        {"cluster-secret-file", KVR_FLAG_STRING, &cluster_secret_file, "shared secret (16-1024 bytes, mode 600) routers prove to each other on the Raft and forward ports", false},
        {"no-lora-filter", KVR_FLAG_BOOL, &no_lora_filter, "diagnostic: a request under a LoRA adapter may go to any worker of the model, not only those listing the adapter", false},
        {"no-mdc-filter", KVR_FLAG_BOOL, &no_mdc_filter, "diagnostic: route to workers whose model card checksum differs from the request's", false},
        {"pools-file", KVR_FLAG_STRING, &pools_file, "scale-to-zero: JSON {\"pools\":[{\"namespace\",\"model\",\"target\"}...]} (docs/DESIGN.md 13)", false},
        {"scaler", KVR_FLAG_STRING, &scaler, "scale-to-zero: exec:PATH (run PATH NAMESPACE MODEL REPLICAS) or kubernetes (PATCH the scale of TARGET: NAME or deployment/NAME, statefulset/NAME)", false},
        {"scaler-api-url", KVR_FLAG_STRING, &scaler_api_url, "kubernetes scaler: API server URL (default from KUBERNETES_SERVICE_HOST/PORT)", false},
        {"scaler-token-file", KVR_FLAG_STRING, &scaler_token_file, "kubernetes scaler: bearer token file, re-read before every request (default: the service account's)", false},
        {"scaler-ca-file", KVR_FLAG_STRING, &scaler_ca_file, "kubernetes scaler: CA bundle of the API server (default: the service account's)", false},
        {"scaler-namespace", KVR_FLAG_STRING, &scaler_namespace, "kubernetes scaler: the Deployments' namespace (default: the pod's)", false},
        {"scaler-timeout", KVR_FLAG_DURATION, &scaler_timeout_ms, "one scale attempt's timeout (0: 30s exec, 10s kubernetes)", false},
        {"idle-after", KVR_FLAG_DURATION, &idle_after_ms, "a pool with no request and nothing in flight this long is stopped (with --min-workers 0)", false},
        {"wake-timeout", KVR_FLAG_DURATION, &wake_timeout_ms, "a waking pool with no live worker after this long goes back to sleep", false},
        {"min-workers", KVR_FLAG_INT, &min_workers, "replicas a pool is never scaled below (> 0: it never sleeps)", false},
        {"max-workers", KVR_FLAG_INT, &max_workers, "replicas a wake never exceeds (0: no cap)", false},
        {"index", KVR_FLAG_STRING, &index_mode, "events|approx: index from the workers' KV events, or (approx, for engines without events) assume the worker a request was booked on holds its blocks; workers that publish events keep event entries", false},
        {"approx-ttl", KVR_FLAG_DURATION, &approx_ttl_ms, "--index approx: an assumed block not assumed again for this long is dropped", false},
        {"approx-capacity-blocks", KVR_FLAG_U64, &approx_capacity, "--index approx: blocks assumed per worker whose heartbeat gives no capacity (LRU beyond)", false},
        {"max-local-prefill", KVR_FLAG_INT, &max_local_prefill, "disaggregation: a prompt with at most this many uncached tokens (on the chosen decode worker) is prefilled there, not on a prefill worker", false},
        {"max-prefill-queue", KVR_FLAG_INT, &max_prefill_queue, "disaggregation: a prefill worker with this many outstanding prefills is passed over (the decode worker prefills itself)", false},
        {"overlap-weight", KVR_FLAG_DOUBLE, &cost.overlap_weight, "route cost: weight of the prefill blocks (the request's uncached ones plus those queued on the worker); > 0; the same on every router of a group", false},
        {"load-weight", KVR_FLAG_DOUBLE, &cost.load_weight, "route cost: weight of the worker's active (booked) blocks", false},
        {"queue-weight", KVR_FLAG_DOUBLE, &cost.queue_weight, "route cost: blocks added per request outstanding on the worker (queue depth)", false},
        {"overflow-weight", KVR_FLAG_DOUBLE, &cost.overflow_weight, "route cost: weight of the blocks the request would need beyond the worker's KV capacity (its heartbeat's) once its booked blocks are counted", false},
        {"tie-band", KVR_FLAG_DOUBLE, &cost.tie_band, "route cost: workers within this fraction of (best cost + request blocks) of the best count as tied; the request id's hash picks among them", false},
        {"route-temperature", KVR_FLAG_DOUBLE, &cost.temperature, "route cost: > 0 samples a worker by softmax over normalised costs, seeded by the request id (0: argmin)", false},
        {"insecure-cluster", KVR_FLAG_BOOL, &insecure_cluster, "allow a multi-router Raft group without --cluster-secret-file (anyone reaching the Raft/forward ports can change the state)", false},
    };
    size_t nf = sizeof(flags) / sizeof(flags[0]);
    kvr_err err = {0};
    int rv = kvr_flags_parse(flags, nf, argc - 1, argv + 1, NULL, 0, NULL, &err);
    if (rv == KVR_FLAGS_HELP) {
        kvr_flags_usage(stdout, "kvr-routerd", flags, nf);
        return 0;
    }
    if (rv < 0) {
        fprintf(stderr, "kvr-routerd: %s\n", err.msg);
        return 2;
    }
    kvr_log_level lvl;
    if (kvr_log_parse_level(log_level, &lvl) != 0) {
        fprintf(stderr, "kvr-routerd: bad --log-level %s\n", log_level);
        return 2;
    }
    if (kvr_nats_flags_load(&nats_sec, &err) != 0) {
        fprintf(stderr, "kvr-routerd: %s\n", err.msg);
        return 2;
    }
    if (!data_dir || !*data_dir) {
        fprintf(stderr, "kvr-routerd: --data-dir is required\n");
        return 2;
    }
    if (id == 0 || id > UINT32_MAX || block_size == 0 || block_size > 4096 || misses < 1) {
        fprintf(stderr, "kvr-routerd: --id must be >= 1, --block-size in [1, 4096], --heartbeat-misses >= 1\n");
        return 2;
    }
    if (max_request_tokens < 1 || max_request_tokens > 16777216) {
        fprintf(stderr, "kvr-routerd: --max-request-tokens must be in [1, 16777216]\n");
        return 2;
    }
    if (stream_replicas < 1 || stream_replicas > 5) {
        fprintf(stderr, "kvr-routerd: --stream-replicas must be in [1, 5] (JetStream's limit)\n");
        return 2;
    }
    if (best_effort && *peers) {
        fprintf(stderr, "kvr-routerd: --best-effort is for routers without --peers\n");
        return 2;
    }
    if (strcmp(raft_log, "memory") != 0 && strcmp(raft_log, "disk") != 0) {
        fprintf(stderr, "kvr-routerd: --raft-log must be memory or disk\n");
        return 2;
    }
    if (max_local_prefill < 0 || max_local_prefill > UINT32_MAX || max_prefill_queue < 0 ||
        max_prefill_queue > UINT32_MAX) {
        fprintf(stderr, "kvr-routerd: --max-local-prefill and --max-prefill-queue must be in [0, 2^32)\n");
        return 2;
    }
    /* the same check as the replicated ROUTE_POLICY's (sync/cost.h), so the leader's flags
     * can always be proposed */
    if (!kvr_cost_params_valid(&cost)) {
        fprintf(stderr, "kvr-routerd: --overlap-weight must be > 0; --load-weight, --queue-weight, "
                        "--overflow-weight, --tie-band and --route-temperature finite and >= 0\n");
        return 2;
    }
    if (strcmp(index_mode, "events") != 0 && strcmp(index_mode, "approx") != 0) {
        fprintf(stderr, "kvr-routerd: --index must be events or approx\n");
        return 2;
    }
    if (approx_ttl_ms < 1 || approx_capacity < 1 || approx_capacity > (1u << 22)) {
        fprintf(stderr, "kvr-routerd: --approx-ttl must be > 0, --approx-capacity-blocks in [1, 4194304]\n");
        return 2;
    }
    if (*peers && !*raft_addr) {
        fprintf(stderr, "kvr-routerd: --peers needs --raft-addr\n");
        return 2;
    }
    /* One router alone (peers naming only itself) has no peer to trust; any more and the Raft
     * and forward ports would accept commands from anyone who can reach them. */
    if (*peers && !*cluster_secret_file && !insecure_cluster && strchr(peers, ',')) {
        fprintf(stderr, "kvr-routerd: a Raft group of several routers needs --cluster-secret-file "
                        "(or --insecure-cluster to run without peer authentication)\n");
        return 2;
    }
    char *admin_token = NULL;
    if (admin_token_file && *admin_token_file &&
        kvr_token_file_read(admin_token_file, &admin_token, &err) != 0) {
        fprintf(stderr, "kvr-routerd: --admin-token-file: %s\n", err.msg);
        return 2;
    }
    static char idbuf[24];
    snprintf(idbuf, sizeof(idbuf), "%llu", (unsigned long long)id);
    kvr_log_setup("routerd", idbuf, lvl);
    signal(SIGPIPE, SIG_IGN);

    kvr_routerd_config cfg = {
        .id = (uint32_t)id,
        .nats_url = nats,
        .nats_flags = &nats_sec,
        .http_addr = http,
        .data_dir = data_dir,
        .ns = ns,
        .block_size = (uint32_t)block_size,
        .snapshot_interval_ms = snap_ms,
        .stream_max_age_ms = max_age_ms,
        .stream_max_bytes = max_bytes,
        .stream_replicas = stream_replicas,
        .heartbeat_misses = misses,
        .frontend_timeout_ms = frontend_timeout_ms,
        .max_request_age_ms = max_request_age_ms,
        .raft_addr = raft_addr,
        .peers = peers,
        .join = join,
        .degraded_after_ms = degraded_ms,
        .election_timeout_ms = election_ms,
        .raft_max_inflight = raft_max_inflight,
        .raft_snapshot_threshold = raft_snapshot_threshold,
        .raft_log_memory = strcmp(raft_log, "memory") == 0,
        .max_request_tokens = max_request_tokens,
        .best_effort = best_effort,
        .cluster_secret_file = *cluster_secret_file ? cluster_secret_file : NULL,
        .admin_token = admin_token,
        .worker_cidrs = worker_cidr,
        .no_lora_filter = no_lora_filter,
        .no_mdc_filter = no_mdc_filter,
        .pools_file = *pools_file ? pools_file : NULL,
        .scaler = scaler,
        .scaler_api_url = *scaler_api_url ? scaler_api_url : NULL,
        .scaler_token_file = *scaler_token_file ? scaler_token_file : NULL,
        .scaler_ca_file = *scaler_ca_file ? scaler_ca_file : NULL,
        .scaler_namespace = *scaler_namespace ? scaler_namespace : NULL,
        .scaler_timeout_ms = scaler_timeout_ms,
        .idle_after_ms = idle_after_ms,
        .wake_timeout_ms = wake_timeout_ms,
        .min_workers = min_workers,
        .max_workers = max_workers,
        .index_approx = strcmp(index_mode, "approx") == 0,
        .approx_ttl_ms = approx_ttl_ms,
        .approx_capacity_blocks = approx_capacity,
        .max_local_prefill = (uint32_t)max_local_prefill,
        .max_prefill_queue = (uint32_t)max_prefill_queue,
        .has_cost = true,
        .cost_overlap_weight = cost.overlap_weight,
        .cost_load_weight = cost.load_weight,
        .cost_queue_weight = cost.queue_weight,
        .cost_overflow_weight = cost.overflow_weight,
        .cost_tie_band = cost.tie_band,
        .cost_temperature = cost.temperature,
        .argv = argv, /* the parser only reads it; argv[argc] is NULL (C11 5.1.2.2.1) */
    };
    uv_loop_t *loop = uv_default_loop();
    int rc = kvr_routerd_start(&g_rd, loop, &cfg);
    if (rc != 0) {
        KVR_LOG_ERROR("start failed", "error=\"%s\"", kvr_strerror(rc));
        return 1;
    }
    uv_signal_init(loop, &g_sigterm);
    uv_signal_init(loop, &g_sigint);
    uv_signal_start(&g_sigterm, on_signal, SIGTERM);
    uv_signal_start(&g_sigint, on_signal, SIGINT);
    uv_run(loop, UV_RUN_DEFAULT);
    kvr_routerd_free(g_rd);
    free(admin_token);
    uv_loop_close(loop);
    kvr_nats_global_shutdown(2000);
    kvr_nats_flags_free(&nats_sec);
    KVR_LOG_INFO("exited", "id=%llu", (unsigned long long)id);
    return 0;
}
