/* kvr_metrics: Prometheus text exposition (format 0.0.4), hand-rolled.
 *
 * A registry holds metric families: counters (uint64), gauges (double) and histograms (fixed
 * upper bounds; rendered as cumulative _bucket{le=...}, _sum, _count). A family may have one
 * label with a small fixed set of values given at registration (e.g. label "reason" with
 * values {"truncated","bad_type"}); every update then names the value by its index. Families
 * render in registration order, label values in the given order. Names follow
 * kvr_<component>_<what>_<unit> (counters end in _total).
 *
 * Threads and ownership: the registry and its families are owned by the loop thread that
 * created them; register, update and render there with the plain functions (plain integers,
 * no locks). A COUNTER that must be bumped from other threads (e.g. cnats callbacks) must be
 * updated ONLY with kvr_metric_add_atomic() — from every thread, including the loop thread;
 * rendering reads counters with relaxed atomic loads, so that is race-free. Gauges and
 * histograms are loop-thread only. The registry owns the families (freed by
 * kvr_metrics_free); kvr_metric pointers stay valid until then. Name, help, label name and
 * values are copied. */
#ifndef KVR_METRICS_H
#define KVR_METRICS_H

#include "kvr_buf.h"
#include "kvr_err.h"

#include <stddef.h>
#include <stdint.h>

typedef struct kvr_metrics kvr_metrics;
typedef struct kvr_metric kvr_metric;
struct kvr_http_req;
struct kvr_http_server;

#define KVR_METRICS_MAX_LABEL_VALUES 64
#define KVR_METRICS_MAX_BUCKETS 64

/* Returns NULL on allocation failure. */
kvr_metrics *kvr_metrics_new(void);
void kvr_metrics_free(kvr_metrics *m);

/* Registration. label_name and label_values may be NULL (no label); label_values is a
 * NULL-terminated array. Returns NULL on a bad name (not [a-zA-Z_:][a-zA-Z0-9_:]*), a duplicate
 * name, too many label values or buckets, unsorted bounds, or no memory. */
kvr_metric *kvr_metrics_counter(kvr_metrics *m, const char *name, const char *help,
                                const char *label_name, const char *const *label_values);
kvr_metric *kvr_metrics_gauge(kvr_metrics *m, const char *name, const char *help,
                              const char *label_name, const char *const *label_values);
/* bounds: strictly increasing finite upper bounds; +Inf is implicit. */
kvr_metric *kvr_metrics_histogram(kvr_metrics *m, const char *name, const char *help,
                                  const double *bounds, size_t n_bounds, const char *label_name,
                                  const char *const *label_values);

/* Updates. `li` is the label value's index (0 for an unlabelled family); out-of-range indices
 * and updates of the wrong kind are ignored. All accept a NULL metric (no-op). */
void kvr_metric_add(kvr_metric *c, size_t li, uint64_t n);        /* counter, loop thread */
void kvr_metric_add_atomic(kvr_metric *c, size_t li, uint64_t n); /* counter, any thread */
static inline void kvr_metric_inc(kvr_metric *c)
{
    kvr_metric_add(c, 0, 1);
}
void kvr_metric_set(kvr_metric *g, size_t li, double v);           /* gauge */
void kvr_metric_gauge_add(kvr_metric *g, size_t li, double delta); /* gauge */
void kvr_metric_observe(kvr_metric *h, size_t li, double v);       /* histogram */
/* Counter: set to an absolute value (for mirroring a counter kept elsewhere, e.g. in a
 * collect hook). */
void kvr_metric_counter_set(kvr_metric *c, size_t li, uint64_t v);

/* Reads (mostly for tests). */
uint64_t kvr_metric_counter_value(const kvr_metric *c, size_t li);
double kvr_metric_gauge_value(const kvr_metric *g, size_t li);
uint64_t kvr_metric_histogram_count(const kvr_metric *h, size_t li);

/* A hook called (on the loop thread) at the start of every render, e.g. to copy stats kept
 * elsewhere into gauges. At most 16 hooks; returns 0 or KVR_ELIMIT. */
typedef void (*kvr_metrics_collect_cb)(kvr_metrics *m, void *arg);
int kvr_metrics_on_collect(kvr_metrics *m, kvr_metrics_collect_cb cb, void *arg);

/* Appends the text exposition of every family to out. Returns 0 or KVR_ENOMEM. */
int kvr_metrics_render(kvr_metrics *m, kvr_buf *out);

/* Common bucket sets (seconds). */
extern const double kvr_metrics_latency_buckets_s[]; /* 0.0005 … 30 */
extern const size_t kvr_metrics_latency_buckets_s_n;

/* Serves GET /metrics: renders m and responds 200 text/plain; version=0.0.4 (500 on no
 * memory), finishing req. Call from an on_request handler. */
void kvr_metrics_respond(kvr_metrics *m, struct kvr_http_req *req);

/* Registers <prefix>_connections (gauge), <prefix>_connections_total,
 * <prefix>_requests_total, <prefix>_responses_total{code="1xx".."5xx"},
 * <prefix>_parse_errors_total, <prefix>_timeouts_total, <prefix>_rejected_connections_total,
 * <prefix>_client_gone_total, refreshed from srv->stats at each render. prefix e.g.
 * "kvr_frontend_http". srv must outlive m's renders. Returns 0, KVR_EINVAL or KVR_ENOMEM. */
int kvr_metrics_add_http_server(kvr_metrics *m, const char *prefix, struct kvr_http_server *srv);

#endif
