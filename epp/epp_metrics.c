/* kvr-epp: the metrics (registration, collection) and the /metrics HTTP handler. */
#include "epp_priv.h"

#include <stdio.h>
#include <string.h>

/* error_code labels: the reference EPP's errutil names (429 is its
 * InferencePoolResourceExhausted) */
static const char *const err_labels[] = {"BadRequest",
                                         "NotFound",
                                         "PayloadTooLarge",
                                         "ServiceUnavailable",
                                         "Internal",
                                         "InferencePoolResourceExhausted",
                                         NULL};
static const char *const fb_labels[] = {
    "timeout", "no_responders", "router_error", "nats_down", "bad_reply", "subset", NULL};

void epp_on_http(kvr_http_req *req)
{
    if (kvr_slice_eq_cstr(req->path, "/metrics")) {
        kvr_metrics_respond(E.metrics, req);
        return;
    }
    kvr_http_respond_cstr(req, 404, "text/plain", "not found\n");
}

static void collect(kvr_metrics *m, void *arg)
{
    (void)m;
    (void)arg;
    kvr_metric_set(E.m_ready, 0, (double)fe_pool_live(&E.pool, NULL, kvr_mono_ms()));
    kvr_metric_set(E.m_streams, 0, (double)E.open_streams);
    kvr_metric_set(E.m_buffered, 0, (double)E.grpc.stats.buffered);
    kvr_metric_set(E.m_pending, 0, (double)E.pending_picks);
}

int epp_register_metrics(void)
{
    kvr_metrics *m = E.metrics;
    static const double pick_b[] = {0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.0025, 0.005,
                                    0.01,    0.025,  0.05,   0.1,    0.25,  1};
    E.m_req = kvr_metrics_counter(m, "inference_objective_request_total",
                                  "requests seen (request headers)", NULL, NULL);
    E.m_err = kvr_metrics_counter(m, "inference_objective_request_error_total",
                                  "requests answered with an error", "error_code", err_labels);
    E.m_dur = kvr_metrics_histogram(
        m, "inference_objective_request_duration_seconds", "request headers to end of response",
        kvr_metrics_latency_buckets_s, kvr_metrics_latency_buckets_s_n, NULL, NULL);
    E.m_ready =
        kvr_metrics_gauge(m, "inference_pool_ready_pods", "live workers (heartbeats)", NULL, NULL);
    E.m_pick = kvr_metrics_histogram(m, "kvr_epp_pick_seconds",
                                     "last request body chunk in to destination out", pick_b,
                                     sizeof pick_b / sizeof *pick_b, NULL, NULL);
    /* the part of a pick kvr-epp does not control: NATS both ways and the routers' Raft */
    E.m_route = kvr_metrics_histogram(m, "kvr_epp_route_seconds",
                                      "kvr.route request out to its answer in (answered ones)",
                                      pick_b, sizeof pick_b / sizeof *pick_b, NULL, NULL);
    E.m_fallback = kvr_metrics_counter(m, "kvr_epp_route_fallback_total",
                                       "local picks because no router answered (or subset)",
                                       "reason", fb_labels);
    E.m_routed =
        kvr_metrics_counter(m, "kvr_epp_routed_total", "picks made by a router", NULL, NULL);
    E.m_mismatch =
        kvr_metrics_counter(m, "kvr_epp_served_mismatch_total",
                            "responses served by another endpoint than the pick", NULL, NULL);
    E.m_cancelled =
        kvr_metrics_counter(m, "kvr_epp_streams_cancelled_total",
                            "ext_proc streams that ended before their response", NULL, NULL);
    E.m_streams = kvr_metrics_gauge(m, "kvr_epp_open_streams", "ext_proc streams open", NULL, NULL);
    E.m_buffered = kvr_metrics_gauge(m, "kvr_epp_grpc_buffered_bytes",
                                     "bytes held by the gRPC layer", NULL, NULL);
    E.m_pending = kvr_metrics_gauge(m, "kvr_epp_pending_picks",
                                    "kvr.route requests out (picks in flight)", NULL, NULL);
    if (!E.m_req || !E.m_err || !E.m_dur || !E.m_ready || !E.m_pick || !E.m_route ||
        !E.m_fallback || !E.m_routed || !E.m_mismatch || !E.m_cancelled || !E.m_streams ||
        !E.m_buffered || !E.m_pending || epp_hold_metrics(m) != 0)
        return KVR_EINVAL;
    kvr_metrics_on_collect(m, collect, NULL);
    return 0;
}
