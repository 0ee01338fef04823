/* kvr_metrics: implementation in progress (first commit: interface only). */
#include "kvr_metrics.h"

const double kvr_metrics_latency_buckets_s[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
const size_t kvr_metrics_latency_buckets_s_n = sizeof kvr_metrics_latency_buckets_s / sizeof kvr_metrics_latency_buckets_s[0];
kvr_metrics *kvr_metrics_new(void) { return NULL; }
void kvr_metrics_free(kvr_metrics *m) {}
kvr_metric *kvr_metrics_counter(kvr_metrics *m, const char *name, const char *help, const char *ln, const char *const *lv) { return NULL; }
kvr_metric *kvr_metrics_gauge(kvr_metrics *m, const char *name, const char *help, const char *ln, const char *const *lv) { return NULL; }
kvr_metric *kvr_metrics_histogram(kvr_metrics *m, const char *name, const char *help, const double *b, size_t nb, const char *ln, const char *const *lv) { return NULL; }
void kvr_metric_add(kvr_metric *c, size_t li, uint64_t n) {}
void kvr_metric_add_atomic(kvr_metric *c, size_t li, uint64_t n) {}
void kvr_metric_set(kvr_metric *g, size_t li, double v) {}
void kvr_metric_gauge_add(kvr_metric *g, size_t li, double d) {}
void kvr_metric_observe(kvr_metric *h, size_t li, double v) {}
void kvr_metric_counter_set(kvr_metric *c, size_t li, uint64_t v) {}
uint64_t kvr_metric_counter_value(const kvr_metric *c, size_t li) { return 0; }
double kvr_metric_gauge_value(const kvr_metric *g, size_t li) { return 0; }
uint64_t kvr_metric_histogram_count(const kvr_metric *h, size_t li) { return 0; }
int kvr_metrics_on_collect(kvr_metrics *m, kvr_metrics_collect_cb cb, void *arg) { return KVR_EUNSUPPORTED; }
int kvr_metrics_render(kvr_metrics *m, kvr_buf *out) { return KVR_EUNSUPPORTED; }
void kvr_metrics_respond(kvr_metrics *m, struct kvr_http_req *req) {}
int kvr_metrics_add_http_server(kvr_metrics *m, const char *prefix, struct kvr_http_server *srv) { return KVR_EUNSUPPORTED; }
