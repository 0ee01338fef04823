/* routerd metrics: registration and the index gauges (routerd_int.h). */
#include "routerd_int.h"

const char *const rd_route_err_names[] = {"backend", "no_worker", "bad_request", NULL};

const char *const rd_rej_names[] = {"truncated",     "bad_type",       "limit",
                                     "unknown_event", "invalid",        "trailing",
                                     "bad_subject",   "other_namespace", "worker_down",
                                     "refused_worker", "unknown_parent", "block_size",
                                     "over_bound",    "no_slot",        NULL};

void rd_update_index_gauges(kvr_routerd *rd)
{
    kvr_index_stats st;
    kvr_index_stats_get(rd->idx, &st);
    kvr_metric_set(rd->m_index_entries, 0, (double)st.entries);
    kvr_metric_set(rd->m_index_blocks, 0, (double)st.blocks);
    kvr_metric_set(rd->m_index_bytes, 0, (double)st.bytes);
    uint64_t seq = kvr_index_stream_seq(rd->idx);
    kvr_metric_set(rd->m_stream_seq, 0, (double)seq);
    uint64_t lag = rd->last_pending;
    if (rd->target_seq > seq && rd->target_seq - seq > lag)
        lag = rd->target_seq - seq;
    kvr_metric_set(rd->m_stream_lag, 0, (double)lag);
    rd_approx_metrics(rd);
}

/* ------------------------------------------------------------------------------------------ */
/* metrics */

void rd_register_metrics(kvr_routerd *rd)
{
    kvr_metrics *m = rd->metrics;
    rd->m_events_applied = kvr_metrics_counter(m, "kvr_routerd_events_applied_total",
                                               "KV events applied to the index", NULL, NULL);
    rd->m_blocks_applied = kvr_metrics_counter(m, "kvr_routerd_blocks_applied_total",
                                               "Blocks in applied BlockStored events", NULL, NULL);
    rd->m_events_rejected = kvr_metrics_counter(m, "kvr_routerd_events_rejected_total",
                                                "KV event payloads or events rejected, by reason",
                                                "reason", rd_rej_names);
    rd->m_clears_published = kvr_metrics_counter(
        m, "kvr_routerd_worker_clears_published_total",
        "AllBlocksCleared events published for workers whose WORKER_DOWN this router committed",
        NULL, NULL);
    rd->m_replayed = kvr_metrics_counter(m, "kvr_routerd_stream_messages_total",
                                         "Stream messages consumed since start", NULL, NULL);
    rd->m_stream_lag = kvr_metrics_gauge(m, "kvr_routerd_stream_lag_messages",
                                         "Stream messages not yet applied", NULL, NULL);
    rd->m_stream_seq = kvr_metrics_gauge(m, "kvr_routerd_stream_seq",
                                         "Last applied stream sequence", NULL, NULL);
    rd->m_route_decisions = kvr_metrics_counter(m, "kvr_routerd_route_decisions_total",
                                                "Route decisions by mode", "mode", rd_decided_names);
    rd->m_route_errors = kvr_metrics_counter(m, "kvr_routerd_route_errors_total",
                                             "Route requests not answered with a worker",
                                             "reason", rd_route_err_names);
    static const double route_buckets[] = {0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
                                           0.001,   0.0025,   0.005,   0.01,   0.025,   0.05,
                                           0.1,     0.25,     1.0};
    rd->m_route_latency = kvr_metrics_histogram(
        m, "kvr_routerd_route_latency_seconds",
        "Route request latency inside the router (request on the loop to reply sent)",
        route_buckets, sizeof(route_buckets) / sizeof(route_buckets[0]), NULL, NULL);
    static const char *const hops[] = {"queue", "commit", "reply", "leader", "forward", NULL};
    rd->m_raft_hop = kvr_metrics_histogram(
        m, "kvr_routerd_raft_hop_seconds",
        "Raft route-and-reserve per hop: queue (arrival on the leader to proposal), commit "
        "(proposal to applied), reply (applied to answer handed over), leader (whole stay on the "
        "leader), forward (follower: forward sent to answer received)",
        route_buckets, sizeof(route_buckets) / sizeof(route_buckets[0]), "hop", hops);
    rd->m_index_entries = kvr_metrics_gauge(m, "kvr_routerd_index_entries", "Index entries (worker x block)", NULL, NULL);
    rd->m_index_blocks = kvr_metrics_gauge(m, "kvr_routerd_index_blocks", "Distinct blocks in the index", NULL, NULL);
    rd->m_index_bytes = kvr_metrics_gauge(m, "kvr_routerd_index_bytes", "Heap bytes of the index", NULL, NULL);
    rd->m_snap_duration = kvr_metrics_histogram(m, "kvr_routerd_snapshot_duration_seconds",
                                                "Snapshot export+write time",
                                                kvr_metrics_latency_buckets_s,
                                                kvr_metrics_latency_buckets_s_n, NULL, NULL);
    rd->m_snap_export = kvr_metrics_gauge(m, "kvr_routerd_snapshot_export_seconds",
                                          "Loop time spent copying the index for the last snapshot",
                                          NULL, NULL);
    rd->m_snap_bytes = kvr_metrics_gauge(m, "kvr_routerd_snapshot_bytes", "Size of the last snapshot", NULL, NULL);
    rd->m_snaps = kvr_metrics_counter(m, "kvr_routerd_snapshots_total", "Snapshots written", NULL, NULL);
    rd->m_snap_failures = kvr_metrics_counter(m, "kvr_routerd_snapshot_failures_total", "Snapshots that failed", NULL, NULL);
    rd->m_ready_s = kvr_metrics_gauge(m, "kvr_routerd_time_to_ready_seconds", "Seconds from start to caught up", NULL, NULL);
    rd->m_workers_up = kvr_metrics_gauge(m, "kvr_routerd_workers_up", "Workers with a live heartbeat", NULL, NULL);
    rd->m_workers_refused = kvr_metrics_counter(m, "kvr_routerd_workers_refused_total",
                                                "Workers refused (block size differs)", NULL, NULL);
    rd->m_nats_reconnects = kvr_metrics_counter(m, "kvr_routerd_nats_reconnects_total", "NATS reconnects", NULL, NULL);
    rd->m_consumer_restarts = kvr_metrics_counter(m, "kvr_routerd_consumer_restarts_total",
                                                  "JetStream consumer re-creations", NULL, NULL);
    rd->m_nats_backpressure = kvr_metrics_counter(m, "kvr_routerd_nats_backpressure_total",
                                                  "Times a NATS delivery thread waited for the loop", NULL, NULL);
    rd->m_unknown_worker = kvr_metrics_counter(
        m, "kvr_routerd_events_unknown_worker_total",
        "Event messages from workers not (yet) announced by heartbeat (applied)", NULL, NULL);
    rd->m_unannounced_removed = kvr_metrics_counter(
        m, "kvr_routerd_unannounced_workers_removed_total",
        "Workers whose entries were removed because they never sent a heartbeat", NULL, NULL);
    rd->m_http_unauthorized = kvr_metrics_counter(
        m, "kvr_routerd_http_unauthorized_total",
        "HTTP POST and /admin requests refused for a missing or wrong admin token", NULL, NULL);
    rd->m_hb_refused_url = kvr_metrics_counter(
        m, "kvr_routerd_heartbeats_refused_url_total",
        "Heartbeats refused because the worker url is outside --worker-cidr", NULL, NULL);
    rd->m_workers_evicted = kvr_metrics_counter(
        m, "kvr_routerd_workers_evicted_total",
        "Down or never-announced workers evicted from the full worker table", NULL, NULL);
    rd->m_tick_stalls = kvr_metrics_counter(
        m, "kvr_routerd_loop_stalls_total",
        "Late ticks (loop stalls) whose duration was added to every liveness deadline", NULL,
        NULL);
    rd->m_bcast_rejected = kvr_metrics_counter(
        m, "kvr_routerd_booking_broadcasts_rejected_total",
        "Best-effort mode: booking broadcasts from other routers that did not decode", NULL, NULL);
    if (rd->approx) {
        rd->m_approx_entries = kvr_metrics_gauge(
            m, "kvr_routerd_approx_entries",
            "--index approx: (worker, block) pairs assumed cached", NULL, NULL);
        rd->m_approx_inserted = kvr_metrics_counter(
            m, "kvr_routerd_approx_inserted_total",
            "--index approx: pairs newly assumed by a ROUTE apply", NULL, NULL);
        rd->m_approx_evicted = kvr_metrics_counter(
            m, "kvr_routerd_approx_evicted_total",
            "--index approx: pairs dropped by a worker's capacity (LRU)", NULL, NULL);
        rd->m_approx_expired = kvr_metrics_counter(
            m, "kvr_routerd_approx_expired_total",
            "--index approx: pairs dropped by the TTL", NULL, NULL);
    }
    kvr_metrics_add_http_server(m, "kvr_routerd_http", &rd->http);
}

