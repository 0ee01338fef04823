/* kvr-epp: an endpoint picker (Gateway API Inference Extension) for Envoy's external processing
 * (envoy.service.ext_proc.v3.ExternalProcessor/Process, FULL_DUPLEX_STREAMED bodies).
 *
 * One libuv loop thread owns everything: the gRPC servers (epp_grpc: ext_proc port, health
 * port), the /metrics HTTP server (kvr_http), NATS (kvr_nats: route replies and worker
 * heartbeats), the worker table (fe_pool, shared with kvr-frontend) and every stream. Per
 * ext_proc stream (protocol: docs/DESIGN.md, epp/README.md):
 *   request headers (stored; a headers-only request is answered at once with a local pick)
 *   → body chunks (buffered, bounded) → at end_of_stream: parse + tokenize exactly as the
 *   frontend does (fe_parse_request) → kvr.route (route-and-reserve, per-try timeout, N tries,
 *   local least-loaded fallback) → deferred HeadersResponse (clear_route_cache, header
 *   x-gateway-destination-endpoint: ip:port[,fallbacks], dynamic_metadata envoy.lb) → the body
 *   echoed as StreamedBodyResponse chunks ≤ 62,000 bytes → response headers / body / trailers
 *   answered in order; prefill_done at the first response body chunk; free at the end of the
 *   response, or when the stream ends or is cancelled. */
#include "epp_priv.h"

#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct epp_state E;

static void on_stop_timer(uv_timer_t *t)
{
    (void)t;
    uv_stop(E.loop);
}

/* First signal: every connection is closed, so every open stream ends as if cancelled and its
 * booking's "free" is published (routers would otherwise hold it until the lease expires,
 * 10 s); the loop runs 300 ms more for NATS to send them. A second signal stops at once. */
static void on_signal(uv_signal_t *s, int sig)
{
    (void)s;
    if (E.stopping) {
        uv_stop(E.loop);
        return;
    }
    E.stopping = true;
    KVR_LOG_INFO("signal: stopping", "signal=%d open_streams=%u", sig, E.open_streams);
    epp_grpc_close(&E.grpc);
    if (E.health_on)
        epp_grpc_close(&E.health);
    uv_timer_init(E.loop, &E.stop_timer);
    uv_timer_start(&E.stop_timer, on_stop_timer, E.nats_on ? 300 : 0, 0);
}

int main(int argc, char **argv)
{
    const char *nats_url = NULL, *ns = NULL, *prefix = NULL, *log_level = "info",
               *worker_cidr = "private", *pool_name = "", *pool_ns = "", *cert_path = "",
               *client_ca = "";
    const char *bind_host = "";
    kvr_nats_flags nats_sec = {0};
    int64_t grpc_port = 9002, health_port = 9003, metrics_port = 9090, block_size = 64,
            route_timeout = 200, route_tries = 3, max_body = 4 << 20, max_fallbacks = 2,
            max_pending = 1024, max_held = 1024, wake_timeout = 60000;
    uint64_t id = 1;
    bool secure = true, route_leader_first = true, ready_without_workers = false;
    kvr_flag flags[] = {
        {"grpc-port", KVR_FLAG_INT, &grpc_port, "ext_proc gRPC port (0: any)", 0},
        {"grpc-health-port", KVR_FLAG_INT, &health_port, "gRPC health port (-1: off)", 0},
        {"metrics-port", KVR_FLAG_INT, &metrics_port, "Prometheus /metrics port (-1: off)", 0},
        {"bind", KVR_FLAG_STRING, &bind_host, "listen host (default all)", 0},
        {"secure-serving", KVR_FLAG_BOOL, &secure,
         "TLS (ALPN h2) on the ext_proc port; false: plaintext h2c", 0},
        {"cert-path", KVR_FLAG_STRING, &cert_path,
         "directory with tls.crt and tls.key (default: a self-signed certificate made at start)",
         0},
        {"client-ca-file", KVR_FLAG_STRING, &client_ca,
         "with TLS: only clients with a certificate this PEM CA signed (mutual TLS; none: any "
         "caller that reaches the port)",
         0},
        {"pool-name", KVR_FLAG_STRING, &pool_name, "InferencePool name (logged)", 0},
        {"pool-namespace", KVR_FLAG_STRING, &pool_ns, "InferencePool namespace (logged)", 0},
        {"nats", KVR_FLAG_STRING, &nats_url, "NATS URL (routers and heartbeats)", 0},
        {"id", KVR_FLAG_U64, &id, "lease id >= 1 (kvr.frontends.<id>; distinct from frontends)", 0},
        {"namespace", KVR_FLAG_STRING, &ns, "worker namespace (default \"default\")", 0},
        {"namespace-prefix", KVR_FLAG_STRING, &prefix, "serve namespaces P and P-<suffix>", 0},
        {"block-size", KVR_FLAG_INT, &block_size, "tokens per KV block (when no worker says)", 0},
        {"route-timeout", KVR_FLAG_DURATION, &route_timeout, "per-try kvr.route timeout", 0},
        {"route-tries", KVR_FLAG_INT, &route_tries, "kvr.route tries before local fallback", 0},
        {"route-leader-first", KVR_FLAG_BOOL, &route_leader_first,
         "ask the Raft leader (kvr.route.leader) on a pick's first try, any router after "
         "(default true; --no-route-leader-first)",
         0},
        {"ready-without-workers", KVR_FLAG_BOOL, &ready_without_workers,
         "gRPC readiness SERVING with NATS up even when no worker is live (default: a live "
         "worker is needed)",
         0},
        {"max-body", KVR_FLAG_SIZE, &max_body, "request body limit (default 4MiB)", 0},
        {"max-fallbacks", KVR_FLAG_INT, &max_fallbacks,
         "next least-loaded live workers listed after the pick (0-8)", 0},
        {"max-pending-picks", KVR_FLAG_INT, &max_pending,
         "picks in flight (kvr.route out) before new ones get 429", 0},
        {"max-held", KVR_FLAG_INT, &max_held,
         "picks held (in all) while routers wake their pool from zero; past it: 503 at once", 0},
        {"wake-timeout", KVR_FLAG_DURATION, &wake_timeout,
         "how long one pick may wait for its pool to wake (default 60s); then 503. The "
         "gateway's ext_proc message timeout must allow it",
         0},
        {"worker-cidr", KVR_FLAG_STRING, &worker_cidr,
         "CIDRs a worker's heartbeat url must be in (private, any, or a list)", 0},
        {"log-level", KVR_FLAG_STRING, &log_level, "debug|info|warn|error", 0},
        KVR_NATS_FLAG_ENTRIES(&nats_sec),
    };
    size_t nflags = sizeof flags / sizeof *flags;
    kvr_err err = {0};
    if (fe_tok_take_flags(&argc, argv, &err)) {
        fprintf(stderr, "kvr-epp: %s\n", err.msg);
        return 2;
    }
    fe_set_tok_lookup(fe_tok_for);
    int rv = kvr_flags_parse(flags, nflags, argc - 1, argv + 1, NULL, 0, NULL, &err);
    if (rv == KVR_FLAGS_HELP) {
        kvr_flags_usage(stdout, "kvr-epp", flags, nflags);
        printf(
            "  --tokenizer NAME=DIR|byte  tokenizer for model NAME (repeatable; default byte)\n");
        return 0;
    }
    if (rv < 0) {
        fprintf(stderr, "kvr-epp: %s\n", err.msg);
        return 2;
    }
    kvr_log_level lvl;
    if (kvr_log_parse_level(log_level, &lvl)) {
        fprintf(stderr, "kvr-epp: --log-level %s: want debug|info|warn|error\n", log_level);
        return 2;
    }
    static char idbuf[24];
    snprintf(idbuf, sizeof idbuf, "%" PRIu64, id);
    kvr_log_setup("epp", idbuf, lvl);
    if (id == 0 || (ns && prefix) || block_size < 1 || route_tries < 1 || route_tries > 100 ||
        route_timeout < 1 || max_body < 1 || max_fallbacks < 0 ||
        max_fallbacks > EPP_MAX_FALLBACKS || max_pending < 1 || max_pending > 1000000 ||
        max_held < 0 || max_held > 1000000 || wake_timeout < 1 || grpc_port < 0 ||
        grpc_port > 65535 || health_port > 65535 || metrics_port > 65535) {
        fprintf(stderr, "kvr-epp: bad flags (--id >= 1; --namespace and --namespace-prefix are "
                        "exclusive; sizes and ports in range)\n");
        return 2;
    }
    if (kvr_nats_flags_load(&nats_sec, &err)) {
        fprintf(stderr, "kvr-epp: %s\n", err.msg);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    E.loop = uv_default_loop();
    E.id = id;
    E.ready_without_workers = ready_without_workers;
    E.route_timeout_ms = route_timeout;
    E.route_tries = route_tries;
    E.route_target.leader_first = route_leader_first;
    E.max_body = (size_t)max_body;
    E.max_fallbacks = (int)max_fallbacks;
    E.max_pending_picks = (uint32_t)max_pending;
    epp_hold_configure((size_t)max_held, wake_timeout);
    snprintf(E.lease_subject, sizeof E.lease_subject, "kvr.frontends.%" PRIu64, id);
    if (kvr_cidr_list_add_csv(&E.worker_cidrs, worker_cidr, &err)) {
        fprintf(stderr, "kvr-epp: --worker-cidr: %s\n", err.msg);
        return 2;
    }
    if (fe_pool_init(&E.pool,
                     prefix ? prefix
                     : ns   ? ns
                            : "default",
                     prefix != NULL, (uint64_t)kvr_now_ms() ^ (id * 0x9e3779b97f4a7c15ull))) {
        fprintf(stderr, "kvr-epp: bad namespace\n");
        return 2;
    }
    E.pool.allow = &E.worker_cidrs;
    E.block_size = (uint32_t)block_size;
    E.metrics = kvr_metrics_new();
    if (!E.metrics || epp_register_metrics()) {
        fprintf(stderr, "kvr-epp: metrics init failed\n");
        return 1;
    }
    epp_grpc_handlers h = {.on_call = epp_on_call,
                           .on_message = epp_on_message,
                           .on_half_close = epp_on_half_close,
                           .on_close = epp_on_close};
    epp_grpc_limits lim = {.max_message = E.max_body + 4096};
    if (!secure && client_ca[0]) {
        fprintf(stderr, "kvr-epp: --client-ca-file needs TLS (--secure-serving)\n");
        return 2;
    }
    if (secure && epp_grpc_tls_ctx(cert_path, client_ca, &lim.tls, &err)) {
        fprintf(stderr, "kvr-epp: tls: %s\n", err.msg);
        return 1;
    }
    char addr[300];
    snprintf(addr, sizeof addr, "%s:%d", bind_host, (int)grpc_port);
    if (epp_grpc_init(&E.grpc, E.loop, &h, &lim) || epp_grpc_listen(&E.grpc, addr, &err)) {
        fprintf(stderr, "kvr-epp: ext_proc port: %s\n", err.msg);
        return 1;
    }
    if (health_port >= 0) {
        snprintf(addr, sizeof addr, "%s:%d", bind_host, (int)health_port);
        if (epp_grpc_init(&E.health, E.loop, &h, NULL) || epp_grpc_listen(&E.health, addr, &err)) {
            fprintf(stderr, "kvr-epp: health port: %s\n", err.msg);
            return 1;
        }
        E.health_on = true;
    }
    if (metrics_port >= 0) {
        kvr_http_config hc = {.on_request = epp_on_http,
                              .max_body_bytes = 4096,
                              .header_timeout_ms = 10000,
                              .idle_timeout_ms = 60000,
                              .max_connections = 64};
        snprintf(addr, sizeof addr, "%s:%d", bind_host, (int)metrics_port);
        if (kvr_http_server_init(&E.http, E.loop, &hc) || kvr_http_listen(&E.http, addr, &err)) {
            fprintf(stderr, "kvr-epp: metrics port: %s\n", err.msg);
            return 1;
        }
    }
    if (nats_url) {
        kvr_nats_opts no = {.url = nats_url, .name = "kvr-epp", .on_state = epp_on_nats_state};
        /* kvr-epp holds a frontend credential (lease kvr.frontends.<id>) */
        char inbox[KVR_NATS_INBOX_PREFIX_MAX + 1];
        no.inbox_prefix = kvr_nats_role_inbox(inbox, sizeof inbox, "frontend", NULL, id);
        kvr_nats_flags_fill(&nats_sec, &no);
        if (kvr_nats_init(&E.nats, E.loop, &no, &err)) {
            fprintf(stderr, "kvr-epp: nats: %s\n", err.msg);
            return 1;
        }
        E.nats_on = true;
        if (kvr_nats_subscribe(&E.nats, "kvr.workers.>", NULL, epp_on_heartbeat, NULL, NULL,
                               &err)) {
            fprintf(stderr, "kvr-epp: subscribing kvr.workers.>: %s\n", err.msg);
            return 1;
        }
    } else {
        KVR_LOG_WARN("no --nats", "msg2=\"no heartbeats: no worker will be known\"");
    }
    uv_timer_init(E.loop, &E.tick);
    uv_timer_start(&E.tick, epp_on_tick, 0, 1000);
    uv_signal_init(E.loop, &E.sigint);
    uv_signal_init(E.loop, &E.sigterm);
    uv_signal_start(&E.sigint, on_signal, SIGINT);
    uv_signal_start(&E.sigterm, on_signal, SIGTERM);
    KVR_LOG_INFO("listening", "grpc_port=%d tls=%s health_port=%d metrics_port=%d pool=%s/%s",
                 E.grpc.port,
                 !secure        ? "off"
                 : cert_path[0] ? cert_path
                                : "self-signed",
                 E.health_on ? E.health.port : -1,
                 metrics_port >= 0 ? kvr_http_server_port(&E.http) : -1, pool_ns, pool_name);
    uv_run(E.loop, UV_RUN_DEFAULT);
    /* stopped by a signal: process exit closes the sockets */
    if (E.nats_on)
        kvr_nats_global_shutdown(2000);
    return 0;
}
