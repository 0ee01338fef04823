/* kvr_metrics: registry and Prometheus text rendering. */
#include "kvr_metrics.h"
#include "kvr_http.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { M_COUNTER, M_GAUGE, M_HISTOGRAM };

typedef struct hist_cell {
    uint64_t *buckets; /* non-cumulative counts, n_bounds + 1 (last = +Inf) */
    uint64_t count;
    double sum;
} hist_cell;

struct kvr_metric {
    kvr_metric *next;
    int kind;
    char *name;
    char *help;
    char *label_name;
    char **label_values;
    size_t nlabels; /* cells: max(1, nlabels) */
    uint64_t *counters;
    double *gauges;
    hist_cell *hist;
    double *bounds;
    size_t nbounds;
};

#define MAX_HOOKS 16

struct kvr_metrics {
    kvr_metric *head, *tail;
    struct {
        kvr_metrics_collect_cb cb;
        void *arg;
    } hooks[MAX_HOOKS];
    size_t nhooks;
    void *owned[MAX_HOOKS]; /* hook state freed with the registry */
    size_t nhooks_owned;
};

const double kvr_metrics_latency_buckets_s[] = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
const size_t kvr_metrics_latency_buckets_s_n =
    sizeof kvr_metrics_latency_buckets_s / sizeof kvr_metrics_latency_buckets_s[0];

kvr_metrics *kvr_metrics_new(void)
{
    return calloc(1, sizeof(kvr_metrics));
}

static void metric_free(kvr_metric *f)
{
    if (f == NULL)
        return;
    free(f->name);
    free(f->help);
    free(f->label_name);
    for (size_t i = 0; i < f->nlabels; i++)
        free(f->label_values[i]);
    free(f->label_values);
    free(f->counters);
    free(f->gauges);
    if (f->hist) {
        size_t cells = f->nlabels ? f->nlabels : 1;
        for (size_t i = 0; i < cells; i++)
            free(f->hist[i].buckets);
        free(f->hist);
    }
    free(f->bounds);
    free(f);
}

void kvr_metrics_free(kvr_metrics *m)
{
    if (m == NULL)
        return;
    kvr_metric *f = m->head;
    while (f) {
        kvr_metric *n = f->next;
        metric_free(f);
        f = n;
    }
    for (size_t i = 0; i < m->nhooks_owned; i++)
        free(m->owned[i]);
    free(m);
}

static bool valid_name(const char *s)
{
    if (s == NULL || *s == '\0')
        return false;
    for (const char *p = s; *p; p++) {
        char c = *p;
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
                  (p != s && c >= '0' && c <= '9');
        if (!ok)
            return false;
    }
    return true;
}

static kvr_metric *family_new(kvr_metrics *m, int kind, const char *name, const char *help,
                              const char *label_name, const char *const *label_values)
{
    if (m == NULL || !valid_name(name))
        return NULL;
    for (kvr_metric *f = m->head; f; f = f->next)
        if (strcmp(f->name, name) == 0)
            return NULL;
    size_t nl = 0;
    if (label_name != NULL) {
        if (!valid_name(label_name) || label_values == NULL || strcmp(label_name, "le") == 0)
            return NULL;
        while (label_values[nl] != NULL)
            nl++;
        if (nl == 0 || nl > KVR_METRICS_MAX_LABEL_VALUES)
            return NULL;
    }
    kvr_metric *f = calloc(1, sizeof *f);
    if (f == NULL)
        return NULL;
    f->kind = kind;
    f->name = strdup(name);
    f->help = strdup(help ? help : "");
    if (f->name == NULL || f->help == NULL)
        goto fail;
    if (nl) {
        f->label_name = strdup(label_name);
        f->label_values = calloc(nl, sizeof(char *));
        if (f->label_name == NULL || f->label_values == NULL)
            goto fail;
        f->nlabels = nl;
        for (size_t i = 0; i < nl; i++)
            if ((f->label_values[i] = strdup(label_values[i])) == NULL)
                goto fail;
    }
    return f;
fail:
    metric_free(f);
    return NULL;
}

static void family_add(kvr_metrics *m, kvr_metric *f)
{
    if (m->tail)
        m->tail->next = f;
    else
        m->head = f;
    m->tail = f;
}

static size_t cells(const kvr_metric *f)
{
    return f->nlabels ? f->nlabels : 1;
}

kvr_metric *kvr_metrics_counter(kvr_metrics *m, const char *name, const char *help,
                                const char *label_name, const char *const *label_values)
{
    kvr_metric *f = family_new(m, M_COUNTER, name, help, label_name, label_values);
    if (f == NULL)
        return NULL;
    if ((f->counters = calloc(cells(f), sizeof(uint64_t))) == NULL) {
        metric_free(f);
        return NULL;
    }
    family_add(m, f);
    return f;
}

kvr_metric *kvr_metrics_gauge(kvr_metrics *m, const char *name, const char *help,
                              const char *label_name, const char *const *label_values)
{
    kvr_metric *f = family_new(m, M_GAUGE, name, help, label_name, label_values);
    if (f == NULL)
        return NULL;
    if ((f->gauges = calloc(cells(f), sizeof(double))) == NULL) {
        metric_free(f);
        return NULL;
    }
    family_add(m, f);
    return f;
}

kvr_metric *kvr_metrics_histogram(kvr_metrics *m, const char *name, const char *help,
                                  const double *bounds, size_t n_bounds, const char *label_name,
                                  const char *const *label_values)
{
    if (bounds == NULL || n_bounds == 0 || n_bounds > KVR_METRICS_MAX_BUCKETS)
        return NULL;
    for (size_t i = 0; i < n_bounds; i++)
        if (!isfinite(bounds[i]) || (i > 0 && bounds[i] <= bounds[i - 1]))
            return NULL;
    kvr_metric *f = family_new(m, M_HISTOGRAM, name, help, label_name, label_values);
    if (f == NULL)
        return NULL;
    f->nbounds = n_bounds;
    f->bounds = malloc(n_bounds * sizeof(double));
    f->hist = calloc(cells(f), sizeof(hist_cell));
    if (f->bounds == NULL || f->hist == NULL)
        goto fail;
    memcpy(f->bounds, bounds, n_bounds * sizeof(double));
    for (size_t i = 0; i < cells(f); i++)
        if ((f->hist[i].buckets = calloc(n_bounds + 1, sizeof(uint64_t))) == NULL)
            goto fail;
    family_add(m, f);
    return f;
fail:
    metric_free(f);
    return NULL;
}

void kvr_metric_add(kvr_metric *c, size_t li, uint64_t n)
{
    if (c && c->kind == M_COUNTER && li < cells(c))
        c->counters[li] += n;
}

void kvr_metric_add_atomic(kvr_metric *c, size_t li, uint64_t n)
{
    if (c && c->kind == M_COUNTER && li < cells(c))
        __atomic_fetch_add(&c->counters[li], n, __ATOMIC_RELAXED);
}

void kvr_metric_counter_set(kvr_metric *c, size_t li, uint64_t v)
{
    if (c && c->kind == M_COUNTER && li < cells(c))
        c->counters[li] = v;
}

void kvr_metric_set(kvr_metric *g, size_t li, double v)
{
    if (g && g->kind == M_GAUGE && li < cells(g))
        g->gauges[li] = v;
}

void kvr_metric_gauge_add(kvr_metric *g, size_t li, double delta)
{
    if (g && g->kind == M_GAUGE && li < cells(g))
        g->gauges[li] += delta;
}

void kvr_metric_observe(kvr_metric *h, size_t li, double v)
{
    if (h == NULL || h->kind != M_HISTOGRAM || li >= cells(h) || isnan(v))
        return;
    hist_cell *hc = &h->hist[li];
    size_t b = 0;
    while (b < h->nbounds && v > h->bounds[b])
        b++;
    hc->buckets[b]++;
    hc->count++;
    hc->sum += v;
}

uint64_t kvr_metric_counter_value(const kvr_metric *c, size_t li)
{
    if (c && c->kind == M_COUNTER && li < cells(c))
        return __atomic_load_n(&c->counters[li], __ATOMIC_RELAXED);
    return 0;
}

double kvr_metric_gauge_value(const kvr_metric *g, size_t li)
{
    if (g && g->kind == M_GAUGE && li < cells(g))
        return g->gauges[li];
    return 0;
}

uint64_t kvr_metric_histogram_count(const kvr_metric *h, size_t li)
{
    if (h && h->kind == M_HISTOGRAM && li < cells(h))
        return h->hist[li].count;
    return 0;
}

int kvr_metrics_on_collect(kvr_metrics *m, kvr_metrics_collect_cb cb, void *arg)
{
    if (m->nhooks >= MAX_HOOKS)
        return KVR_ELIMIT;
    m->hooks[m->nhooks].cb = cb;
    m->hooks[m->nhooks].arg = arg;
    m->nhooks++;
    return 0;
}

/* Prometheus float formatting: integers plainly, others shortest round-trip, +Inf/-Inf/NaN. */
static int fmt_double(char *out, size_t cap, double v)
{
    if (isnan(v))
        return snprintf(out, cap, "NaN");
    if (isinf(v))
        return snprintf(out, cap, v > 0 ? "+Inf" : "-Inf");
    int n = snprintf(out, cap, "%.15g", v);
    if (strtod(out, NULL) != v)
        n = snprintf(out, cap, "%.17g", v);
    return n;
}

/* Label values and help text escaping (\\, \", \n; help does not escape quotes). */
static int append_escaped(kvr_buf *out, const char *s, bool quotes)
{
    for (const char *p = s; *p; p++) {
        int rv;
        if (*p == '\\')
            rv = kvr_buf_append(out, "\\\\", 2);
        else if (*p == '\n')
            rv = kvr_buf_append(out, "\\n", 2);
        else if (quotes && *p == '"')
            rv = kvr_buf_append(out, "\\\"", 2);
        else
            rv = kvr_buf_append(out, p, 1);
        if (rv)
            return rv;
    }
    return 0;
}

static int render_family(kvr_metric *f, kvr_buf *out)
{
    static const char *types[] = {"counter", "gauge", "histogram"};
    int rv = kvr_buf_appendf(out, "# HELP %s ", f->name);
    rv = rv ? rv : append_escaped(out, f->help, false);
    rv = rv ? rv : kvr_buf_appendf(out, "\n# TYPE %s %s\n", f->name, types[f->kind]);
    char num[64];
    for (size_t i = 0; rv == 0 && i < cells(f); i++) {
        /* label prefix: {name="value" */
        kvr_buf lbl;
        kvr_buf_init(&lbl);
        if (f->nlabels) {
            rv = kvr_buf_appendf(&lbl, "%s=\"", f->label_name);
            rv = rv ? rv : append_escaped(&lbl, f->label_values[i], true);
            rv = rv ? rv : kvr_buf_append(&lbl, "\"", 1);
        }
        const char *lb = lbl.base ? lbl.base : "";
        int ll = (int)lbl.len;
        if (rv == 0 && f->kind == M_COUNTER) {
            uint64_t v = __atomic_load_n(&f->counters[i], __ATOMIC_RELAXED);
            rv = f->nlabels ? kvr_buf_appendf(out, "%s{%.*s} %" PRIu64 "\n", f->name, ll, lb, v)
                            : kvr_buf_appendf(out, "%s %" PRIu64 "\n", f->name, v);
        } else if (rv == 0 && f->kind == M_GAUGE) {
            fmt_double(num, sizeof num, f->gauges[i]);
            rv = f->nlabels ? kvr_buf_appendf(out, "%s{%.*s} %s\n", f->name, ll, lb, num)
                            : kvr_buf_appendf(out, "%s %s\n", f->name, num);
        } else if (rv == 0) {
            hist_cell *hc = &f->hist[i];
            uint64_t cum = 0;
            const char *sep = f->nlabels ? "," : "";
            for (size_t b = 0; rv == 0 && b <= f->nbounds; b++) {
                cum += hc->buckets[b];
                if (b < f->nbounds)
                    fmt_double(num, sizeof num, f->bounds[b]);
                else
                    strcpy(num, "+Inf");
                rv = kvr_buf_appendf(out, "%s_bucket{%.*s%sle=\"%s\"} %" PRIu64 "\n", f->name, ll,
                                     lb, sep, num, cum);
            }
            fmt_double(num, sizeof num, hc->sum);
            if (rv == 0)
                rv = f->nlabels
                         ? kvr_buf_appendf(out, "%s_sum{%.*s} %s\n%s_count{%.*s} %" PRIu64 "\n",
                                           f->name, ll, lb, num, f->name, ll, lb, hc->count)
                         : kvr_buf_appendf(out, "%s_sum %s\n%s_count %" PRIu64 "\n", f->name, num,
                                           f->name, hc->count);
        }
        kvr_buf_free(&lbl);
    }
    return rv ? KVR_ENOMEM : 0;
}

int kvr_metrics_render(kvr_metrics *m, kvr_buf *out)
{
    for (size_t i = 0; i < m->nhooks; i++)
        m->hooks[i].cb(m, m->hooks[i].arg);
    for (kvr_metric *f = m->head; f; f = f->next) {
        int rv = render_family(f, out);
        if (rv)
            return rv;
    }
    return 0;
}

void kvr_metrics_respond(kvr_metrics *m, struct kvr_http_req *req)
{
    kvr_buf out;
    kvr_buf_init(&out);
    if (kvr_metrics_render(m, &out) != 0) {
        kvr_buf_free(&out);
        kvr_http_respond_cstr(req, 500, "text/plain", "out of memory\n");
        return;
    }
    kvr_http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", out.base, out.len);
    kvr_buf_free(&out);
}

/* ---------------------------------------------------------------- HTTP server stats */

typedef struct http_export {
    struct kvr_http_server *srv;
    kvr_metric *conns, *accepted, *requests, *responses, *parse_errors, *timeouts, *rejected, *gone;
    kvr_metric *shed;
} http_export;

static void http_collect(kvr_metrics *m, void *arg)
{
    http_export *e = arg;
    const kvr_http_stats *s = &e->srv->stats;
    kvr_metric_set(e->conns, 0, (double)s->connections_active);
    kvr_metric_counter_set(e->accepted, 0, s->connections_accepted);
    kvr_metric_counter_set(e->requests, 0, s->requests);
    for (size_t i = 0; i < 5; i++)
        kvr_metric_counter_set(e->responses, i, s->responses[i + 1]);
    kvr_metric_counter_set(e->parse_errors, 0, s->parse_errors);
    kvr_metric_counter_set(e->timeouts, 0, s->timeouts);
    kvr_metric_counter_set(e->rejected, 0, s->connections_rejected);
    kvr_metric_counter_set(e->gone, 0, s->client_gone);
    kvr_metric_counter_set(e->shed, 0, s->shed);
}

/* The export struct lives as long as the registry: it is kept in a counter family's slot. */
int kvr_metrics_add_http_server(kvr_metrics *m, const char *prefix, struct kvr_http_server *srv)
{
    static const char *const classes[] = {"1xx", "2xx", "3xx", "4xx", "5xx", NULL};
    char name[192];
    if (strlen(prefix) > 128)
        return KVR_EINVAL;
    http_export *e = calloc(1, sizeof *e);
    if (e == NULL)
        return KVR_ENOMEM;
    e->srv = srv;
#define REG(field, fn, suffix, help, ln, lv)                                                       \
    do {                                                                                           \
        snprintf(name, sizeof name, "%s_%s", prefix, suffix);                                      \
        e->field = fn(m, name, help, ln, lv);                                                      \
        if (e->field == NULL)                                                                      \
            goto fail;                                                                             \
    } while (0)
    REG(conns, kvr_metrics_gauge, "connections", "Open HTTP connections.", NULL, NULL);
    REG(accepted, kvr_metrics_counter, "connections_total", "Accepted HTTP connections.", NULL,
        NULL);
    REG(requests, kvr_metrics_counter, "requests_total", "Complete HTTP requests received.", NULL,
        NULL);
    REG(responses, kvr_metrics_counter, "responses_total", "HTTP responses by status class.",
        "code", classes);
    REG(parse_errors, kvr_metrics_counter, "parse_errors_total",
        "Requests rejected as malformed, too large or unsupported.", NULL, NULL);
    REG(timeouts, kvr_metrics_counter, "timeouts_total", "Connections closed by a timeout.", NULL,
        NULL);
    REG(rejected, kvr_metrics_counter, "rejected_connections_total",
        "Connections refused over the connection limit.", NULL, NULL);
    REG(gone, kvr_metrics_counter, "client_gone_total",
        "Requests whose client went away before the response ended.", NULL, NULL);
    REG(shed, kvr_metrics_counter, "shed_connections_total",
        "Connections dropped while still reading a request, to make room for new ones.", NULL,
        NULL);
#undef REG
    if (kvr_metrics_on_collect(m, http_collect, e) != 0)
        goto fail;
    /* Ownership of e: freed with the registry via a hidden hook list entry. */
    if (m->nhooks_owned < MAX_HOOKS)
        m->owned[m->nhooks_owned++] = e;
    return 0;
fail:
    free(e);
    return KVR_EINVAL;
}
