/* raftbench_scrape.c: what `kvr-bench raft` reads from the routers and the machine: a
 * router's /metrics reduced to the route counters and latency histogram, its /v1/state, a
 * process's CPU time and the load average. Blocking (libcurl easy), bench thread only. */
#define _GNU_SOURCE
#pragma GCC diagnostic ignored "-Wformat-truncation" /* error texts are cut on purpose */
#include "raftbench_int.h"

#include "kvr_json.h"
#include "kvr_log.h"
#include "kvr_mp.h"
#include "raftbench.h"
#include "route_msg.h"
#include "run_cluster.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Value of the sample line that starts exactly with `key` followed by a space. */
static bool prom_value(const char *text, size_t len, const char *key, double *out)
{
    size_t kl = strlen(key);
    const char *p = text, *end = text + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        if ((size_t)(le - p) > kl && !memcmp(p, key, kl) && p[kl] == ' ') {
            *out = strtod(p + kl + 1, NULL);
            return true;
        }
        p = le + 1;
    }
    return false;
}

static void prom_parse(const char *text, size_t len, rb_prom *m)
{
    memset(m, 0, sizeof *m);
    m->ok = prom_value(text, len, "kvr_routerd_route_decisions_total{mode=\"raft\"}", &m->raft);
    prom_value(text, len, "kvr_routerd_route_decisions_total{mode=\"local\"}", &m->local);
    double v;
    static const char *const reasons[] = {"backend", "no_worker", "bad_request"};
    char key[128];
    for (size_t i = 0; i < 3; i++) {
        snprintf(key, sizeof key, "kvr_routerd_route_errors_total{reason=\"%s\"}", reasons[i]);
        if (prom_value(text, len, key, &v))
            m->errors += v;
    }
    prom_value(text, len, "kvr_routerd_route_latency_seconds_sum", &m->lat_sum);
    prom_value(text, len, "kvr_routerd_route_latency_seconds_count", &m->lat_count);
    static const char pfx[] = "kvr_routerd_route_latency_seconds_bucket{le=\"";
    const char *p = text, *end = text + len;
    while (p < end && m->nb < RB_NBUCKETS) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *e = nl ? nl : end;
        if ((size_t)(e - p) > sizeof pfx && !memcmp(p, pfx, sizeof pfx - 1)) {
            char *q;
            double le = strtod(p + sizeof pfx - 1, &q); /* "+Inf" parses as inf */
            const char *sp = memchr(p, ' ', (size_t)(e - p));
            if (sp) {
                m->le[m->nb] = le;
                m->cum[m->nb] = strtod(sp + 1, NULL);
                m->nb++;
            }
        }
        p = e + 1;
    }
}

int rb_prom_scrape(const char *url, rb_prom *m)
{
    char u[256];
    snprintf(u, sizeof u, "%s/metrics", url);
    kvr_buf b;
    kvr_buf_init(&b);
    long st = 0;
    int rc = run_http_get(u, 3000, &st, &b);
    if (rc == 0 && st == 200)
        prom_parse(b.base ? b.base : "", b.len, m);
    else
        memset(m, 0, sizeof *m);
    kvr_buf_free(&b);
    return m->ok ? 0 : -1;
}

int rb_state_get(const char *url, rb_state *s)
{
    memset(s, 0, sizeof *s);
    char u[256];
    snprintf(u, sizeof u, "%s/v1/state", url);
    kvr_buf b;
    kvr_buf_init(&b);
    long st = 0;
    int rc = -1;
    cJSON *root = NULL;
    kvr_err err = {0};
    if (run_http_get(u, 3000, &st, &b) == 0 && st == 200 &&
        kvr_json_parse((kvr_slice){b.base, b.len}, 0, 0, &root, &err) == 0) {
        const cJSON *raft = NULL, *workers = NULL;
        const char *str = NULL;
        kvr_json_get_u64(root, "bookings", false, &s->bookings, &err);
        if (kvr_json_get_object(root, "raft", true, &raft, &err) == 0) {
            if (kvr_json_get_string(raft, "role", false, &str, &err) == 0)
                snprintf(s->role, sizeof s->role, "%s", str);
            if (kvr_json_get_string(raft, "fsm_digest", true, &str, &err) == 0) {
                snprintf(s->fsm_digest, sizeof s->fsm_digest, "%s", str);
                rc = 0;
            }
            kvr_json_get_u64(raft, "leader", false, &s->leader, &err);
            kvr_json_get_bool(raft, "degraded", false, &s->degraded, &err);
            kvr_json_get_u64(raft, "applied_index", false, &s->applied, &err);
        }
        if (kvr_json_get_array(root, "workers", false, &workers, &err) == 0) {
            const cJSON *w;
            cJSON_ArrayForEach(w, workers)
            {
                bool up = false;
                if (kvr_json_get_bool(w, "up", false, &up, &err) == 0 && up)
                    s->workers_up++;
            }
        }
    }
    if (root)
        cJSON_Delete(root);
    kvr_buf_free(&b);
    return rc;
}


double rb_loadavg1(void)
{
    double l = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &l) != 1)
            l = -1;
        fclose(f);
    }
    return l;
}
