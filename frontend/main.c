/* kvr-frontend: stateless OpenAI-compatible gateway (DESIGN section 8). This file: flags,
 * metrics and start-up; the parts and the state they share are described in fe_app.h.
 *
 * One libuv loop thread owns everything: the HTTP server (kvr_http), the upstream client
 * (kvr_curl), NATS (kvr_nats: its core client reads route replies and heartbeats on this loop;
 * the frontend uses no JetStream), the worker table (fe_pool) and every in-flight call. Flow
 * per request:
 *   parse → tokenize → seq hashes → pick pool → route (kvr.route, per-try timeout, N tries,
 *   local least-loaded fallback) → POST worker /v1/completions (stream; with --forward body,
 *   the client's JSON to the endpoint it called) → relay SSE → prefill_done at first token,
 *   free at the end / on error / on client disconnect. */
#include "fe_app.h"
#include "fe_proxy.h"
#include "fe_chat.h"
#include "fe_tokenize.h"

#include "beat_msg.h"
#include "kvr_flags.h"
#include "kvr_log.h"
#include "kvr_nats_flags.h"

#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <uv.h>

const char *route_labels[] = {
    "completions", "chat_completions", "models", "health", "metrics", "other", NULL};
const char *status_labels[] = {"200", "400", "401", "404", "405",   "413",
                               "499", "500", "502", "503", "other", NULL};
const char *fallback_labels[] = {"timeout",   "no_responders", "router_error",
                                 "nats_down", "bad_reply",     NULL};
const char *uerr_labels[] = {"before_first_token", "http_status", "after_first_token", "malformed",
                             NULL};

fe_app app;

/* ---------- main ---------- */

static int register_metrics(void)
{
    kvr_metrics *m = app.metrics;
    const double *lb = kvr_metrics_latency_buckets_s;
    size_t nlb = kvr_metrics_latency_buckets_s_n;
    static const double route_b[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                     0.025,  0.05,    0.1,    0.25,  0.5,    1};
    static const char *const mode_labels[] = {"raft", "local", NULL};
    app.m_requests = kvr_metrics_counter(m, "kvr_frontend_requests_total", "HTTP requests by route",
                                         "route", route_labels);
    app.m_responses = kvr_metrics_counter(m, "kvr_frontend_responses_total",
                                          "HTTP responses by status", "status", status_labels);
    app.m_ttft =
        kvr_metrics_histogram(m, "kvr_frontend_ttft_seconds",
                              "time to first token seen by the frontend", lb, nlb, NULL, NULL);
    app.m_e2e = kvr_metrics_histogram(m, "kvr_frontend_e2e_seconds", "request arrival to last byte",
                                      lb, nlb, NULL, NULL);
    app.m_route_lat =
        kvr_metrics_histogram(m, "kvr_frontend_route_seconds", "route decision latency (all tries)",
                              route_b, sizeof route_b / sizeof *route_b, NULL, NULL);
    app.m_route_rtt = kvr_metrics_histogram(
        m, "kvr_frontend_route_rtt_seconds",
        "kvr.route round trip of one answered try (request published to reply received)", route_b,
        sizeof route_b / sizeof *route_b, NULL, NULL);
    app.m_active = kvr_metrics_gauge(m, "kvr_frontend_active_streams",
                                     "SSE streams open to clients", NULL, NULL);
    app.m_upstream_err = kvr_metrics_counter(m, "kvr_frontend_upstream_errors_total",
                                             "worker request failures", "kind", uerr_labels);
    app.m_fallback = kvr_metrics_counter(m, "kvr_frontend_route_fallback_total",
                                         "local routing decisions because no router answered",
                                         "reason", fallback_labels);
    app.m_route_tries = kvr_metrics_counter(m, "kvr_frontend_route_requests_total",
                                            "kvr.route requests sent (tries)", NULL, NULL);
    app.m_retries = kvr_metrics_counter(m, "kvr_frontend_upstream_retries_total",
                                        "requests retried on another worker", NULL, NULL);
    app.m_route_mode =
        kvr_metrics_counter(m, "kvr_frontend_routed_total",
                            "requests routed by a router, by its mode", "mode", mode_labels);
    app.m_workers = kvr_metrics_gauge(m, "kvr_frontend_live_workers",
                                      "live workers seen in heartbeats", NULL, NULL);
    app.m_hb_rejected = kvr_metrics_counter(m, "kvr_frontend_heartbeats_rejected_total",
                                            "malformed worker heartbeats", NULL, NULL);
    app.m_disconnects =
        kvr_metrics_counter(m, "kvr_frontend_client_disconnects_total",
                            "clients gone before the end of their request", NULL, NULL);
    app.m_free_resent =
        kvr_metrics_counter(m, "kvr_frontend_route_free_resent_total",
                            "FREE route events published again after a NATS reconnect", NULL, NULL);
    app.m_hb_refused_url =
        kvr_metrics_counter(m, "kvr_frontend_heartbeats_refused_url_total",
                            "heartbeats refused: worker url outside --worker-cidr", NULL, NULL);
    app.m_stalls =
        kvr_metrics_counter(m, "kvr_frontend_loop_stalls_total",
                            "late ticks whose duration was added to worker deadlines", NULL, NULL);
    app.m_drain_cut =
        kvr_metrics_counter(m, "kvr_frontend_drain_cut_total",
                            "calls ended by shutdown (drain timeout or second signal)", NULL, NULL);
    static const char *const remote_labels[] = {"ok", "error", NULL};
    app.m_remote_tok = kvr_metrics_counter(
        m, "kvr_frontend_remote_tokenize_total",
        "chat requests tokenized by a worker (--tokenizer-fallback remote), by result", "result",
        remote_labels);
    app.m_mdc_mismatch = kvr_metrics_counter(
        m, "kvr_frontend_mdc_mismatch_workers_total",
        "workers whose model card checksum differs from the tokenizer loaded for their model "
        "(never routed to; each counted once)",
        NULL, NULL);
    if (!app.m_hb_refused_url || !app.m_stalls || !app.m_drain_cut || !app.m_remote_tok ||
        !app.m_mdc_mismatch)
        return KVR_EINVAL;
    if (fe_hold_metrics(m) != 0)
        return KVR_EINVAL;
    if (fe_hits_metrics(m) != 0 || fe_disagg_metrics(m) != 0)
        return KVR_ENOMEM;
    if (!app.m_requests || !app.m_responses || !app.m_ttft || !app.m_e2e || !app.m_route_lat ||
        !app.m_route_rtt ||
        !app.m_active || !app.m_upstream_err || !app.m_fallback || !app.m_route_tries ||
        !app.m_retries || !app.m_route_mode || !app.m_workers || !app.m_hb_rejected ||
        !app.m_disconnects)
        return KVR_EINVAL;
    kvr_metrics_on_collect(m, collect, NULL);
    return kvr_metrics_add_http_server(m, "kvr_frontend_http", &app.http);
}

int main(int argc, char **argv)
{
    const char *listen = ":8000", *nats_url = NULL, *ns = NULL, *prefix = NULL, *mode = "kv",
               *api_key = getenv("KVR_API_KEY"), *log_level = "info";
    kvr_nats_flags nats_sec = {0};
    uint64_t id = 1;
    int64_t block_size = 64, route_timeout = 200, route_tries = 3, max_conns = 10000,
            header_timeout = 10000, idle_timeout = 60000;
    int64_t upstream_stall = 10000, drain_timeout = 30000, max_body = 4 << 20;
    const char *worker_cidr = "private", *tok_fallback = "none", *forward = "tokens";
    bool trust_tmpl = false;
    bool route_leader_first = true;
    const char *catalogue = NULL, *proxy_key_file = NULL;
    int64_t max_held = 1024, max_held_bytes = 64 << 20, wake_timeout = 300000,
            hold_keepalive = 10000;
    kvr_flag flags[] = {
        {"listen", KVR_FLAG_STRING, &listen, "HTTP listen address (host:port or :port)", 0},
        {"nats", KVR_FLAG_STRING, &nats_url, "NATS URL (required for kv mode and heartbeats)", 0},
        {"id", KVR_FLAG_U64, &id, "frontend id >= 1 (lease kvr.frontends.<id>)", 0},
        {"namespace", KVR_FLAG_STRING, &ns, "worker namespace (default \"default\")", 0},
        {"namespace-prefix", KVR_FLAG_STRING, &prefix, "serve namespaces P and P-<suffix>", 0},
        {"router-mode", KVR_FLAG_STRING, &mode, "kv|round-robin|random|least-loaded", 0},
        {"api-key", KVR_FLAG_STRING, &api_key, "Bearer key required from clients (env KVR_API_KEY)",
         0},
        {"block-size", KVR_FLAG_INT, &block_size, "tokens per KV block for seq hashes", 0},
        {"route-timeout", KVR_FLAG_DURATION, &route_timeout, "per-try kvr.route timeout", 0},
        {"route-tries", KVR_FLAG_INT, &route_tries, "kvr.route tries before local fallback", 0},
        {"route-leader-first", KVR_FLAG_BOOL, &route_leader_first,
         "ask the Raft leader (kvr.route.leader) on a call's first try, any router after "
         "(default true; --no-route-leader-first)",
         0},
        {"max-body", KVR_FLAG_SIZE, &max_body,
         "request body limit (default 4MiB; a 128Ki-token prompt needs well under 2MiB)", 0},
        {"max-connections", KVR_FLAG_INT, &max_conns, "client connection limit", 0},
        {"header-timeout", KVR_FLAG_DURATION, &header_timeout, "request header timeout", 0},
        {"idle-timeout", KVR_FLAG_DURATION, &idle_timeout, "keep-alive idle timeout", 0},
        {"log-level", KVR_FLAG_STRING, &log_level, "debug|info|warn|error", 0},
        {"upstream-stall-timeout", KVR_FLAG_DURATION, &upstream_stall,
         "a worker that sends no byte for this long has failed (before the first token: retried "
         "elsewhere; after: SSE error; 0: off)",
         0},
        {"drain-timeout", KVR_FLAG_DURATION, &drain_timeout,
         "on SIGTERM, how long in-flight streams may finish (then they get an SSE error and "
         "[DONE])",
         0},
        {"worker-cidr", KVR_FLAG_STRING, &worker_cidr,
         "comma-separated CIDRs a worker's heartbeat url must be in; private = loopback + RFC 1918 "
         "+ fc00::/7; any = no check",
         0},
        {"trust-request-chat-template", KVR_FLAG_BOOL, &trust_tmpl,
         "let a chat request's own 'chat_template' replace the model's (as vLLM's flag)", 0},
        {"tokenizer-fallback", KVR_FLAG_STRING, &tok_fallback,
         "none|remote: for a model whose chat template this frontend cannot render, remote asks "
         "a live worker of the pool (vLLM POST /tokenize) for the ids",
         0},
        {"forward", KVR_FLAG_STRING, &forward,
         "tokens|body: tokens POSTs token ids to the worker's /v1/completions and rewrites its "
         "stream; body sends the client's JSON unchanged to the worker's same endpoint and relays "
         "its answer unchanged (real engines)",
         0},
        {"max-held", KVR_FLAG_INT, &max_held,
         "requests held per pool while it wakes from zero; past it: 503 at once", 0},
        {"max-held-bytes", KVR_FLAG_SIZE, &max_held_bytes,
         "request bodies held per pool while it wakes (default 64MiB); past it: 503 at once", 0},
        {"wake-timeout", KVR_FLAG_DURATION, &wake_timeout,
         "how long one request may wait for its pool to wake (default 300s); then 503", 0},
        {"hold-keepalive", KVR_FLAG_DURATION, &hold_keepalive,
         "interval of the SSE comment lines a held stream gets (default 10s)", 0},
        {"model-catalogue", KVR_FLAG_STRING, &catalogue,
         "JSON {\"models\": [{\"id\", \"namespace\", \"model\", \"engine_args\"}]}: the "
         "models the /proxy/ API can switch between",
         0},
        {"proxy-api-key-file", KVR_FLAG_STRING, &proxy_key_file,
         "file holding the Bearer key of the /proxy/ API (default: --api-key; neither: the API "
         "answers 403)",
         0},
        KVR_NATS_FLAG_ENTRIES(&nats_sec),
    };
    size_t nflags = sizeof flags / sizeof *flags;
    kvr_err err = {0};
    /* --tokenizer NAME=DIR is repeatable, which kvr_flags is not: taken out first */
    if (fe_tok_take_flags(&argc, argv, &err)) {
        fprintf(stderr, "kvr-frontend: %s\n", err.msg);
        return 2;
    }
    fe_set_tok_lookup(fe_tok_for);
    int rv = kvr_flags_parse(flags, nflags, argc - 1, argv + 1, NULL, 0, NULL, &err);
    if (rv == KVR_FLAGS_HELP) {
        kvr_flags_usage(stdout, "kvr-frontend", flags, nflags);
        printf("  --tokenizer NAME=DIR|byte  tokenizer for served model NAME: a Hugging Face "
               "model directory (repeatable; default byte)\n");
        return 0;
    }
    if (rv < 0) {
        fprintf(stderr, "kvr-frontend: %s\n", err.msg);
        return 2;
    }
    kvr_log_level lvl;
    if (kvr_log_parse_level(log_level, &lvl)) {
        fprintf(stderr, "kvr-frontend: --log-level %s: want debug|info|warn|error\n", log_level);
        return 2;
    }
    static char idbuf[24];
    snprintf(idbuf, sizeof idbuf, "%" PRIu64, id);
    kvr_log_setup("frontend", idbuf, lvl);
    if (strcmp(tok_fallback, "none") && strcmp(tok_fallback, "remote")) {
        fprintf(stderr, "kvr-frontend: --tokenizer-fallback %s: want none|remote\n", tok_fallback);
        return 2;
    }
    fe_chat_set_options(trust_tmpl, !strcmp(tok_fallback, "remote"));
    if (strcmp(forward, "tokens") && strcmp(forward, "body")) {
        fprintf(stderr, "kvr-frontend: --forward %s: want tokens|body\n", forward);
        return 2;
    }
    fe_chat_log_models();
    signal(SIGPIPE, SIG_IGN);
    /* Each client stream holds two sockets (client + worker): raise the fd limit. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    memset(&app, 0, sizeof app);
    app.loop = uv_default_loop();
    app.frontend_id = id;
    app.forward_body = !strcmp(forward, "body");
    app.api_key = api_key && api_key[0] ? api_key : NULL;
    if (fe_mode_parse(mode, &app.mode)) {
        fprintf(stderr, "kvr-frontend: --router-mode %s: want kv|round-robin|random|least-loaded\n",
                mode);
        return 2;
    }
    if (id == 0) {
        fprintf(stderr, "kvr-frontend: --id must be >= 1 (routers ignore lease 0)\n");
        return 2;
    }
    if (ns && prefix) {
        fprintf(stderr, "kvr-frontend: --namespace and --namespace-prefix are exclusive\n");
        return 2;
    }
    if (block_size < 1 || block_size > 1 << 20 || route_tries < 1 || route_tries > 100 ||
        route_timeout < 1 || max_conns < 1) {
        fprintf(stderr, "kvr-frontend: --block-size, --route-tries, --route-timeout and "
                        "--max-connections must be positive\n");
        return 2;
    }
    if (kvr_nats_flags_load(&nats_sec, &err)) {
        fprintf(stderr, "kvr-frontend: %s\n", err.msg);
        return 2;
    }
    if (!nats_url && app.mode == FE_MODE_KV)
        KVR_LOG_WARN("no --nats", "msg2=\"kv mode without NATS: every request is a fallback\"");
    if (upstream_stall < 0 || drain_timeout < 0) {
        fprintf(stderr,
                "kvr-frontend: --upstream-stall-timeout and --drain-timeout must be >= 0\n");
        return 2;
    }
    if (max_held < 0 || max_held_bytes < 0 || wake_timeout < 1 || hold_keepalive < 1) {
        fprintf(stderr, "kvr-frontend: --max-held and --max-held-bytes must be >= 0, "
                        "--wake-timeout and --hold-keepalive positive\n");
        return 2;
    }
    fe_hold_configure((size_t)max_held, (size_t)max_held_bytes, wake_timeout, hold_keepalive);
    app.upstream_stall_ms = upstream_stall;
    app.drain_timeout_ms = drain_timeout;
    if (kvr_cidr_list_add_csv(&app.worker_cidrs, worker_cidr, &err)) {
        fprintf(stderr, "kvr-frontend: --worker-cidr: %s\n", err.msg);
        return 2;
    }
    app.block_size = (uint32_t)block_size;
    app.route_timeout_ms = route_timeout;
    app.route_tries = route_tries;
    app.route_target.leader_first = route_leader_first;
    app.boot_ms = (uint64_t)kvr_now_ms();
    app.tok = kvr_tok_byte();
    (void)kvr_lease_subject(app.lease_subject, sizeof app.lease_subject, id); /* 64 bytes fit */
    if (fe_pool_init(&app.pool,
                     prefix ? prefix
                     : ns   ? ns
                            : "default",
                     prefix != NULL, app.boot_ms ^ (id * 0x9e3779b97f4a7c15ull))) {
        fprintf(stderr, "kvr-frontend: bad namespace\n");
        return 2;
    }
    app.pool.allow = &app.worker_cidrs;

    app.metrics = kvr_metrics_new();
    kvr_http_config hc = {
        .on_request = on_request,
        .max_body_bytes = (size_t)max_body,
        .header_timeout_ms = (uint64_t)header_timeout,
        .idle_timeout_ms = (uint64_t)idle_timeout,
        .max_connections = (uint32_t)max_conns,
    };
    if (!app.metrics || kvr_http_server_init(&app.http, app.loop, &hc) || register_metrics() ||
        kvr_loop_stat_start(&app.loop_stat, app.loop, app.metrics, "kvr_frontend")) {
        fprintf(stderr, "kvr-frontend: init failed\n");
        return 1;
    }
    if (fe_proxy_configure(catalogue, proxy_key_file, app.metrics, &err)) {
        fprintf(stderr, "kvr-frontend: %s\n", err.msg);
        return 2;
    }
    kvr_curl_config cc = {.max_host_connections = 4096, .connect_timeout_ms = 1000};
    if (kvr_curl_init(&app.curl, app.loop, &cc, &err)) {
        fprintf(stderr, "kvr-frontend: http client: %s\n", err.msg);
        return 1;
    }
    if (nats_url) {
        kvr_nats_opts no = {.url = nats_url, .name = "kvr-frontend", .on_state = on_nats_state};
        char inbox[KVR_NATS_INBOX_PREFIX_MAX + 1];
        no.inbox_prefix = kvr_nats_role_inbox(inbox, sizeof inbox, "frontend", NULL, id);
        kvr_nats_flags_fill(&nats_sec, &no);
        if (kvr_nats_init(&app.nats, app.loop, &no, &err)) {
            fprintf(stderr, "kvr-frontend: nats: %s\n", err.msg);
            return 1;
        }
        app.nats_on = true;
        if (kvr_nats_subscribe(&app.nats, "kvr.workers.>", NULL, on_heartbeat, NULL, NULL, &err)) {
            fprintf(stderr, "kvr-frontend: subscribing kvr.workers.>: %s\n", err.msg);
            return 1;
        }
    } else {
        KVR_LOG_WARN("no --nats", "msg2=\"no heartbeats: no worker will be known\"");
    }
    if (kvr_http_listen(&app.http, listen, &err)) {
        fprintf(stderr, "kvr-frontend: listen %s: %s\n", listen, err.msg);
        return 1;
    }
    uv_timer_init(app.loop, &app.tick);
    uv_timer_start(&app.tick, on_tick, 0, 1000);
    uv_prepare_init(app.loop, &app.prepare);
    uv_prepare_start(&app.prepare, on_prepare);
    uv_unref((uv_handle_t *)&app.prepare); /* it must not keep the loop alive on shutdown */
    uv_timer_init(app.loop, &app.drain_timer);
    uv_signal_init(app.loop, &app.sigint);
    uv_signal_init(app.loop, &app.sigterm);
    uv_signal_start(&app.sigint, on_signal, SIGINT);
    uv_signal_start(&app.sigterm, on_signal, SIGTERM);
    char nats_red[512];
    KVR_LOG_INFO("listening", "addr=%s port=%d mode=%s namespace=%s%s nats=%s", listen,
                 kvr_http_server_port(&app.http), fe_mode_name(app.mode),
                 prefix ? prefix
                 : ns   ? ns
                        : "default",
                 prefix ? "-*" : "",
                 nats_url ? kvr_nats_redact_url(nats_url, nats_red, sizeof nats_red) : "none");
    uv_run(app.loop, UV_RUN_DEFAULT);
    if (app.nats_on)
        kvr_nats_global_shutdown(2000);
    fe_pool_free(&app.pool);
    fe_free_resend_free();
    fe_proxy_free();
    kvr_metrics_free(app.metrics);
    uv_loop_close(app.loop);
    return 0;
}
