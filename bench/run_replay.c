#define _GNU_SOURCE
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include "run_replay_int.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvr_buf.h"
#include "run_cluster.h"
#include "trace.h"


void run_cfg_init(run_cfg *c)
{
    memset(c, 0, sizeof *c);
    c->speedup = 1.0;
    c->trace_block_size = 512;
    c->kill_at_s = -1;
    c->restart_after_s = 5;
    c->kill_role = "leader";
    c->request_timeout_s = 300;
    c->progress = true;
}

double rr_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void rr_sleep_s(double s)
{
    if (s <= 0)
        return;
    struct timespec ts = {(time_t)s, (long)((s - floor(s)) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}


int dvec_push(dvec *d, double x)
{
    if (d->n == d->cap) {
        size_t nc = d->cap ? d->cap * 2 : 1024;
        double *nv = realloc(d->v, nc * sizeof *nv);
        if (!nv)
            return KVR_ENOMEM;
        d->v = nv;
        d->cap = nc;
    }
    d->v[d->n++] = x;
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

void dvec_sort(dvec *d)
{
    if (d->n > 1) /* qsort's base must not be NULL, even for 0 elements */
        qsort(d->v, d->n, sizeof(double), cmp_double);
}

/* Nearest-rank percentile of a sorted array; NAN when empty. */
static double pct(const dvec *d, double p)
{
    if (d->n == 0)
        return NAN;
    size_t k = (size_t)ceil(p / 100.0 * (double)d->n);
    if (k < 1)
        k = 1;
    if (k > d->n)
        k = d->n;
    return d->v[k - 1];
}


/* One SSE line (without the newline). */
static void sse_line(req *r, const char *s, size_t n)
{
    if (n < 5 || memcmp(s, "data:", 5) != 0)
        return; /* comments, event:, id:, blank separators */
    s += 5;
    n -= 5;
    while (n && *s == ' ')
        s++, n--;
    if (n == 6 && memcmp(s, "[DONE]", 6) == 0) {
        r->done = true;
        return;
    }
    cJSON *j = cJSON_ParseWithLength(s, n);
    if (!j) {
        r->stream_error = true;
        snprintf(r->err, sizeof r->err, "SSE data is not JSON: %.60s", s);
        return;
    }
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    if (e && !cJSON_IsNull(e)) {
        r->stream_error = true;
        const cJSON *m = cJSON_IsObject(e) ? cJSON_GetObjectItemCaseSensitive(e, "message") : e;
        snprintf(r->err, sizeof r->err, "stream error: %.120s",
                 cJSON_IsString(m) ? m->valuestring : "(no message)");
        cJSON_Delete(j);
        return;
    }
    long ntok = 0;
    const cJSON *choices = cJSON_GetObjectItemCaseSensitive(j, "choices");
    const cJSON *c0 = cJSON_IsArray(choices) ? cJSON_GetArrayItem(choices, 0) : NULL;
    if (c0) {
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(c0, "token_ids");
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(c0, "text");
        const cJSON *delta = cJSON_GetObjectItemCaseSensitive(c0, "delta");
        if (cJSON_IsArray(ids))
            ntok = cJSON_GetArraySize(ids);
        else if (cJSON_IsString(text) && text->valuestring[0])
            ntok = 1;
        else if (cJSON_IsObject(delta)) {
            const cJSON *ct = cJSON_GetObjectItemCaseSensitive(delta, "content");
            ntok = cJSON_IsString(ct) && ct->valuestring[0] ? 1 : 0;
        }
    }
    cJSON_Delete(j);
    if (ntok <= 0)
        return;
    double t = rr_now_s();
    if (r->tokens == 0) {
        r->first_tok = t;
    } else {
        double gap_ms = (t - r->last_tok) * 1000.0 / (double)ntok;
        for (long k = 0; k < ntok; k++)
            dvec_push(&r->rp->itl, gap_ms);
    }
    r->last_tok = t;
    r->tokens += ntok;
}

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *ud)
{
    req *r = ud;
    size_t n = size * nmemb;
    long status = 0;
    curl_easy_getinfo(r->h, CURLINFO_RESPONSE_CODE, &status);
    if (status != 200) {
        /* Keep the start of an error body for the report. */
        if (r->err[0] == 0)
            snprintf(r->err, sizeof r->err, "HTTP %ld: %.*s", status, (int)(n < 120 ? n : 120), ptr);
        return n;
    }
    for (size_t i = 0; i < n; i++) {
        char ch = ptr[i];
        if (ch == '\n') {
            size_t len = r->line.len;
            if (len && r->line.base[len - 1] == '\r')
                len--;
            if (len)
                sse_line(r, r->line.base, len);
            kvr_buf_reset(&r->line);
        } else if (r->line.len < SSE_LINE_MAX) {
            if (kvr_buf_append(&r->line, &ch, 1) != 0)
                return 0;
        } else {
            r->line_overflow = true;
            return 0;
        }
    }
    return n;
}

static int start_request(replay *rp, const kvr_trace *tr, size_t index, uint32_t *tokbuf, kvr_err *err)
{
    const run_cfg *cfg = rp->cfg;
    const kvr_trace_req *tq = &tr->reqs[index];
    req *r = calloc(1, sizeof *r);
    if (!r)
        return kvr_err_set(err, KVR_ENOMEM, "request state");
    r->rp = rp;
    r->index = index;
    kvr_buf_init(&r->body);
    kvr_buf_init(&r->line);
    size_t maxin = cfg->max_input > 0 && (size_t)cfg->max_input < MAX_PROMPT_TOKENS ? (size_t)cfg->max_input
                                                                                   : MAX_PROMPT_TOKENS;
    size_t n = kvr_trace_prompt(tq, index, cfg->trace_block_size, tokbuf, maxin);
    long max_tokens = tq->output_length;
    if (cfg->max_output > 0 && max_tokens > cfg->max_output)
        max_tokens = cfg->max_output;
    if (max_tokens < 1)
        max_tokens = 1;
    int rc = kvr_buf_reserve(&r->body, n * 7 + 256);
    if (rc == 0)
        rc = kvr_buf_appendf(&r->body, "{\"model\":\"%s\",\"stream\":true,\"max_tokens\":%ld,"
                                       "\"ignore_eos\":true,\"prompt\":[",
                             cfg->model ? cfg->model : "sim", max_tokens);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        char num[16];
        int l = snprintf(num, sizeof num, i ? ",%u" : "%u", tokbuf[i]);
        rc = kvr_buf_append(&r->body, num, (size_t)l);
    }
    if (rc == 0)
        rc = kvr_buf_append_cstr(&r->body, "]}");
    if (rc != 0) {
        kvr_buf_free(&r->body);
        free(r);
        return kvr_err_set(err, KVR_ENOMEM, "request body");
    }
    rp->res->prompt_tokens_sent += (double)n;

    char url[300];
    snprintf(url, sizeof url, "%s/v1/completions", cfg->urls[index % (size_t)cfg->n_urls]);
    r->h = curl_easy_init();
    r->hdrs = curl_slist_append(NULL, "Content-Type: application/json");
    r->hdrs = curl_slist_append(r->hdrs, "Accept: text/event-stream");
    curl_easy_setopt(r->h, CURLOPT_URL, url);
    curl_easy_setopt(r->h, CURLOPT_HTTPHEADER, r->hdrs);
    curl_easy_setopt(r->h, CURLOPT_POSTFIELDS, r->body.base);
    curl_easy_setopt(r->h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->body.len);
    curl_easy_setopt(r->h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(r->h, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(r->h, CURLOPT_PRIVATE, r);
    curl_easy_setopt(r->h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(r->h, CURLOPT_NOPROXY, "*");
    curl_easy_setopt(r->h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(r->h, CURLOPT_CONNECTTIMEOUT_MS, 5000L);
    curl_easy_setopt(r->h, CURLOPT_TIMEOUT_MS, (long)(cfg->request_timeout_s * 1000));
    /* Do not let curl wait for "100 Continue" on large prompts. */
    r->hdrs = curl_slist_append(r->hdrs, "Expect:");

    run_sample s = {.sent_s = rr_now_s() - rp->t0,
                    .ttft_ms = -1,
                    .e2e_ms = -1,
                    .fail_class = -1,
                    .prompt_tokens = (unsigned)n};
    run_result *res = rp->res;
    r->sample = res->n_samples;
    res->samples[res->n_samples++] = s;
    r->sent = rr_now_s();
    res->requests++;
    rp->inflight++;
    r->next = rp->live;
    if (rp->live)
        rp->live->prev = r;
    rp->live = r;
    curl_multi_add_handle(rp->multi, r->h);
    return 0;
}

static void finish_request(replay *rp, req *r, CURLcode cc)
{
    run_result *res = rp->res;
    double t = rr_now_s();
    long status = 0;
    curl_easy_getinfo(r->h, CURLINFO_RESPONSE_CODE, &status);
    int cls = -1;
    if (cc == CURLE_COULDNT_CONNECT || cc == CURLE_COULDNT_RESOLVE_HOST)
        cls = RUN_FAIL_CONNECT;
    else if (cc == CURLE_OPERATION_TIMEDOUT)
        cls = RUN_FAIL_TIMEOUT;
    else if (cc == CURLE_OK && status != 200)
        cls = RUN_FAIL_HTTP;
    else if (cc != CURLE_OK || r->stream_error || !r->done || r->tokens == 0 || r->line_overflow)
        cls = RUN_FAIL_STREAM;
    run_sample *s = &res->samples[r->sample];
    if (cls < 0) {
        res->completed++;
        s->ttft_ms = (r->first_tok - r->sent) * 1000.0;
        s->e2e_ms = (t - r->sent) * 1000.0;
        dvec_push(&rp->ttft, s->ttft_ms);
        dvec_push(&rp->e2e, s->e2e_ms);
        res->output_tokens += (double)r->tokens;
    } else {
        res->failed++;
        res->failures[cls]++;
        if (r->tokens > 0)
            s->ttft_ms = (r->first_tok - r->sent) * 1000.0;
        s->e2e_ms = (t - r->sent) * 1000.0;
        if (res->first_error[0] == 0) {
            const char *why = r->err[0]           ? r->err
                              : cc != CURLE_OK    ? curl_easy_strerror(cc)
                              : !r->done          ? "stream ended without [DONE]"
                                                  : "no tokens in the stream";
            snprintf(res->first_error, sizeof res->first_error, "request %zu: %s", r->index, why);
        }
        /* A failure whose life overlaps the kill..ready window counts as failed during failover. */
        double ka = atomic_load(&rp->kill_at), ra = atomic_load(&rp->ready_at);
        double sent_rel = r->sent - rp->t0, end_rel = t - rp->t0;
        if (ka >= 0 && end_rel >= ka && (ra < 0 || sent_rel <= ra))
            res->failed_during++;
    }
    s->fail_class = cls;
    if (r->prev)
        r->prev->next = r->next;
    else
        rp->live = r->next;
    if (r->next)
        r->next->prev = r->prev;
    curl_multi_remove_handle(rp->multi, r->h);
    curl_easy_cleanup(r->h);
    curl_slist_free_all(r->hdrs);
    kvr_buf_free(&r->body);
    kvr_buf_free(&r->line);
    free(r);
    rp->inflight--;
}

/* ---------- worker metrics ---------- */

static int scrape_workers(const char *dir, double *prompt, double *cached)
{
    run_cluster c;
    if (run_cluster_load(&c, dir, NULL) != 0)
        return KVR_ENOTFOUND;
    *prompt = *cached = 0;
    int nw = 0;
    for (int i = 0; i < c.n; i++) {
        run_proc *p = &c.procs[i];
        if (strcmp(p->role, "worker") != 0)
            continue;
        char url[256];
        snprintf(url, sizeof url, "%s/metrics", p->url);
        kvr_buf b;
        kvr_buf_init(&b);
        long st = 0;
        double pv = 0, cv = 0;
        if (run_http_get(url, 3000, &st, &b) == 0 && st == 200 &&
            run_prom_sum(b.base, b.len, "kvr_worker_prompt_tokens_total", &pv) == 0 &&
            run_prom_sum(b.base, b.len, "kvr_worker_cached_tokens_total", &cv) == 0) {
            *prompt += pv;
            *cached += cv;
            nw++;
        }
        kvr_buf_free(&b);
    }
    run_cluster_free(&c);
    return nw > 0 ? 0 : KVR_ENOTFOUND;
}

/* The frontends' prefix-hit accounting (frontend/fe_hits.c), summed over the cluster. */
enum { FH_PRED, FH_CACHED, FH_STALE, FH_OTHER, FH_N };
static int scrape_frontends(const char *dir, double v[FH_N])
{
    static const char *names[FH_N] = {
        "kvr_frontend_prefix_predicted_tokens_total", "kvr_frontend_prefix_cached_tokens_total",
        "kvr_frontend_prefix_misses_total{kind=\"index_stale\"}",
        "kvr_frontend_prefix_misses_total{kind=\"other_worker_had_more\"}"};
    run_cluster c;
    if (run_cluster_load(&c, dir, NULL) != 0)
        return KVR_ENOTFOUND;
    int nf = 0;
    for (int k = 0; k < FH_N; k++)
        v[k] = 0;
    for (int i = 0; i < c.n; i++) {
        run_proc *p = &c.procs[i];
        if (strcmp(p->role, "frontend") != 0)
            continue;
        char url[256];
        snprintf(url, sizeof url, "%s/metrics", p->url);
        kvr_buf b;
        kvr_buf_init(&b);
        long st = 0;
        double x[FH_N];
        bool ok = run_http_get(url, 3000, &st, &b) == 0 && st == 200;
        for (int k = 0; ok && k < FH_N; k++)
            ok = run_prom_sum(b.base, b.len, names[k], &x[k]) == 0;
        if (ok) {
            for (int k = 0; k < FH_N; k++)
                v[k] += x[k];
            nf++;
        }
        kvr_buf_free(&b);
    }
    run_cluster_free(&c);
    return nf > 0 ? 0 : KVR_ENOTFOUND;
}

/* ---------- the run ---------- */

int run_replay(const run_cfg *cfg_in, run_result *res, kvr_err *err)
{
    run_cfg cfgv = *cfg_in;
    const run_cfg *cfg = &cfgv;
    kvr_trace tr = {0};
    uint32_t *tokbuf = NULL;
    replay rp = {0};
    failover fo = {0};
    bool fo_started = false;
    int rc;
    char model[64];

    memset(res, 0, sizeof *res);
    res->ready_after_restart_ms = -1;
    if (cfg->n_urls < 1)
        return kvr_err_set(err, KVR_EINVAL, "no --url given");
    if (!(cfg->speedup > 0))
        return kvr_err_set(err, KVR_EINVAL, "--speedup must be positive");
    if (!cfg->model && cfg->cluster_dir) {
        run_cluster c;
        if (run_cluster_load(&c, cfg->cluster_dir, NULL) == 0) {
            snprintf(model, sizeof model, "%s", c.model);
            cfgv.model = model;
            run_cluster_free(&c);
        }
    }
    if ((rc = kvr_trace_load(cfg->trace_path, NULL, &tr, err)) != 0)
        return kvr_err_wrap(err, rc, "loading trace");
    /* The slice: requests whose scaled timestamp falls inside the duration. */
    size_t n = kvr_trace_slice(&tr, cfg->speedup, cfg->duration_s, cfg->max_requests);
    int64_t ts0 = tr.n ? tr.reqs[0].timestamp_ms : 0;
    if (n == 0) {
        rc = kvr_err_set(err, KVR_EINVAL, "the trace slice is empty");
        goto out;
    }
    tokbuf = malloc(MAX_PROMPT_TOKENS * sizeof *tokbuf);
    res->samples = calloc(n, sizeof *res->samples);
    rp.multi = curl_multi_init();
    if (!tokbuf || !res->samples || !rp.multi) {
        rc = kvr_err_set(err, KVR_ENOMEM, "replay state");
        goto out;
    }
    curl_multi_setopt(rp.multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, 0L);
    curl_multi_setopt(rp.multi, CURLMOPT_MAX_HOST_CONNECTIONS, 0L);
    rp.cfg = cfg;
    rp.res = res;
    atomic_store(&rp.kill_at, -1.0);
    atomic_store(&rp.ready_at, -1.0);

    double prompt0 = 0, cached0 = 0;
    bool have_metrics = cfg->cluster_dir && scrape_workers(cfg->cluster_dir, &prompt0, &cached0) == 0;
    double fh0[FH_N];
    bool have_fh = cfg->cluster_dir && scrape_frontends(cfg->cluster_dir, fh0) == 0;

    rp.t0 = rr_now_s();
    if (cfg->cluster_dir && cfg->kill_at_s >= 0) {
        res->failover = true;
        fo.rp = &rp;
        if (pthread_create(&fo.th, NULL, rr_failover_main, &fo) != 0) {
            rc = kvr_err_set(err, KVR_EIO, "starting the failover thread");
            goto out;
        }
        fo_started = true;
    }
    size_t next = 0;
    double last_progress = 0, last_done = rp.t0;
    bool tty = isatty(2);
    while (next < n || rp.inflight > 0) {
        double t = rr_now_s() - rp.t0;
        if (cfg->stop && *cfg->stop) {
            rc = kvr_err_set(err, KVR_ECLOSED, "interrupted after %.1f s", t);
            goto out;
        }
        while (next < n && rp.inflight < MAX_INFLIGHT &&
               (double)(tr.reqs[next].timestamp_ms - ts0) / 1000.0 / cfg->speedup <= t) {
            if ((rc = start_request(&rp, &tr, next, tokbuf, err)) != 0)
                goto out;
            next++;
        }
        int running = 0;
        curl_multi_perform(rp.multi, &running);
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(rp.multi, &left))) {
            if (m->msg != CURLMSG_DONE)
                continue;
            req *r = NULL;
            curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
            CURLcode cc = m->data.result;
            finish_request(&rp, r, cc);
            last_done = rr_now_s();
        }
        t = rr_now_s() - rp.t0;
        if (cfg->progress && t - last_progress >= (tty ? 1.0 : 5.0)) {
            last_progress = t;
            fprintf(stderr, "%s%s%st=%5.1fs sent=%ld/%zu done=%ld failed=%ld in-flight=%zu   %s",
                    tty ? "\r" : "", cfg->label ? cfg->label : "", cfg->label ? " " : "", t,
                    res->requests, n, res->completed, res->failed, rp.inflight, tty ? "" : "\n");
        }
        double wait_ms = 100;
        if (next < n) {
            double due = (double)(tr.reqs[next].timestamp_ms - ts0) / 1000.0 / cfg->speedup - t;
            if (due * 1000 < wait_ms)
                wait_ms = due > 0 ? due * 1000 : 0;
        }
        curl_multi_poll(rp.multi, NULL, 0, (int)wait_ms, NULL);
    }
    if (cfg->progress)
        fprintf(stderr, "%s%s%sall %ld requests finished after %.1f s%s\n", tty ? "\r" : "",
                cfg->label ? cfg->label : "", cfg->label ? " " : "", res->requests,
                last_done - rp.t0, tty ? "                              " : "");
    res->duration_s = last_done - rp.t0;
    if (fo_started) {
        /* The failover thread runs to its end even if the replay finished first. */
        pthread_join(fo.th, NULL);
        fo_started = false;
        char why[160];
        res->digests_equal = rr_digests_agree(cfg->cluster_dir, 20, why, sizeof why);
        if (!res->digests_equal && !res->failover_error[0])
            snprintf(res->failover_error, sizeof res->failover_error, "digests differ: %s", why);
    }
    if (have_metrics) {
        double p1 = 0, c1 = 0;
        if (scrape_workers(cfg->cluster_dir, &p1, &c1) == 0) {
            res->have_hit_rate = true;
            res->prompt_delta = p1 - prompt0;
            res->cached_delta = c1 - cached0;
            res->prefix_hit_rate = res->prompt_delta > 0 ? res->cached_delta / res->prompt_delta : 0;
        }
    }
    double fh1[FH_N];
    if (have_fh && scrape_frontends(cfg->cluster_dir, fh1) == 0) {
        res->have_hit_reasons = true;
        res->predicted_tokens = fh1[FH_PRED] - fh0[FH_PRED];
        res->routed_cached_tokens = fh1[FH_CACHED] - fh0[FH_CACHED];
        res->miss_index_stale = fh1[FH_STALE] - fh0[FH_STALE];
        res->miss_other_worker = fh1[FH_OTHER] - fh0[FH_OTHER];
    }
    dvec_sort(&rp.ttft);
    dvec_sort(&rp.itl);
    dvec_sort(&rp.e2e);
    res->ttft_p50 = pct(&rp.ttft, 50);
    res->ttft_p90 = pct(&rp.ttft, 90);
    res->ttft_p99 = pct(&rp.ttft, 99);
    double sum = 0;
    for (size_t i = 0; i < rp.ttft.n; i++)
        sum += rp.ttft.v[i];
    res->ttft_mean = rp.ttft.n ? sum / (double)rp.ttft.n : NAN;
    res->itl_p50 = pct(&rp.itl, 50);
    res->itl_p99 = pct(&rp.itl, 99);
    res->e2e_p50 = pct(&rp.e2e, 50);
    res->e2e_p99 = pct(&rp.e2e, 99);
    res->output_tokens_per_s = res->duration_s > 0 ? res->output_tokens / res->duration_s : 0;
    rc = 0;
out:
    if (fo_started) {
        atomic_store(&fo.stop, true);
        pthread_join(fo.th, NULL);
    }
    if (rp.multi) {
        /* Abort whatever is still in flight (only on early exits). */
        while (rp.live)
            finish_request(&rp, rp.live, CURLE_ABORTED_BY_CALLBACK);
        curl_multi_cleanup(rp.multi);
    }
    free(rp.ttft.v);
    free(rp.itl.v);
    free(rp.e2e.v);
    free(tokbuf);
    kvr_trace_free(&tr);
    if (rc != 0)
        run_result_free(res);
    run_reap();
    return rc;
}

void run_result_free(run_result *res)
{
    free(res->samples);
    res->samples = NULL;
    res->n_samples = 0;
}
