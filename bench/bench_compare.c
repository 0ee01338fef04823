/* kvr-bench compare: the same trace slice against kv routing with 3 routers and with 1 router,
 * the frontend's round-robin mode, and HAProxy leastconn in front of the workers — each on a
 * fresh cluster started with kvrctl (fresh workers, empty caches). */
#define _GNU_SOURCE
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ceiling.h"
#include "kvr_bench.h"
#include "run_cluster.h"
#include "run_replay.h"

int run_parse_common(run_cfg *cfg, int argc, char **argv, int *i, const char **json_out,
                     const char **plot_dir);

static volatile int cmp_stop;
static void cmp_on_signal(int sig)
{
    (void)sig;
    cmp_stop = 1;
}

/* agg and disagg (issue 15): one router, the same workers all role both, or half prefill and
 * half decode (kvrctl --prefill-workers/--decode-workers): the disaggregation trade.
 * disagg-len: the conditional rule on prompt length alone (no prefill queue limit, as llm-d's
 * PrefixBasedPDDecider): under bursty arrivals the default queue limit (2) keeps most long
 * prompts of a burst on the decode workers, which brings prefill interference back there.
 * disagg-always: the same disaggregated cluster with routers that never keep a prefill on the
 * decode worker (--max-local-prefill 0 and no prefill queue limit), as current Dynamo does:
 * the conditional rule's gain on short prompts. */
static const char *all_modes[] = {"kv3", "kv1",    "round_robin", "haproxy",
                                  "agg", "disagg", "disagg-len",  "disagg-always"};
#define N_MODES 8
enum { M_KV3, M_KV1, M_RR, M_HAPROXY, M_AGG, M_DISAGG, M_LEN, M_ALWAYS };

static bool is_disagg(int m)
{
    return m == M_DISAGG || m == M_LEN || m == M_ALWAYS;
}

/* What the workers' steps held and where the prefills ran, scraped after a replay of the agg
 * and disagg modes (deltas are not needed: every mode starts on fresh processes). */
typedef struct dg_stats {
    bool have;
    double remote, local, fallback; /* frontend: the path each request took */
    double dec_prefill_tok, dec_steps_decode, dec_steps_mixed; /* decode (or both) workers */
    double pre_prefill_tok;                                    /* prefill workers */
    double pulls_ok, pulls_empty, pulls_other; /* decode workers: all but ok/empty recompute */
    double xfer_s, xfer_n;                     /* successful pulls: seconds, count */
    double short_ttft_p50, short_ttft_p99;     /* requests of at most short_tokens */
    long n_short;
} dg_stats;

/* Sum of the samples of metric `name` whose label set contains `label` (NULL: all). */
static double prom_get(const char *text, size_t len, const char *name, const char *label)
{
    size_t nl = strlen(name);
    double sum = 0;
    for (const char *p = text, *end = text + len; p < end;) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol)
            eol = end;
        if ((size_t)(eol - p) > nl && memcmp(p, name, nl) == 0 && (p[nl] == ' ' || p[nl] == '{')) {
            const char *v = p + nl;
            bool match = !label;
            if (*v == '{') {
                const char *close = memchr(v, '}', (size_t)(eol - v));
                if (!close)
                    close = eol;
                if (label && memmem(v, (size_t)(close - v), label, strlen(label)))
                    match = true;
                v = close < eol ? close + 1 : eol;
            }
            if (match)
                sum += strtod(v, NULL);
        }
        p = eol + 1;
    }
    return sum;
}

static bool proc_has_arg(const run_proc *p, const char *flag, const char *val)
{
    for (int i = 0; i + 1 < p->argc; i++)
        if (strcmp(p->argv[i], flag) == 0 && strcmp(p->argv[i + 1], val) == 0)
            return true;
    return false;
}

static void scrape_dg(const char *cdir, dg_stats *st)
{
    run_cluster c;
    if (run_cluster_load(&c, cdir, NULL) != 0)
        return;
    kvr_buf b;
    kvr_buf_init(&b);
    for (int i = 0; i < c.n; i++) {
        run_proc *p = &c.procs[i];
        bool fe = strcmp(p->role, "frontend") == 0, wk = strcmp(p->role, "worker") == 0;
        if (!fe && !wk)
            continue;
        char url[300];
        snprintf(url, sizeof url, "%s/metrics", p->url);
        long code = 0;
        kvr_buf_reset(&b);
        if (run_http_get(url, 3000, &code, &b) != 0 || code != 200)
            continue;
        const char *t = b.base;
        size_t n = b.len;
        st->have = true;
        if (fe) {
            st->remote += prom_get(t, n, "kvr_frontend_disagg_requests_total", "path=\"remote\"");
            st->local += prom_get(t, n, "kvr_frontend_disagg_requests_total", "path=\"local\"");
            st->fallback +=
                prom_get(t, n, "kvr_frontend_disagg_requests_total", "path=\"fallback\"");
            continue;
        }
        if (proc_has_arg(p, "--role", "prefill")) {
            st->pre_prefill_tok += prom_get(t, n, "kvr_worker_prefill_tokens_total", NULL);
            continue;
        }
        st->dec_prefill_tok += prom_get(t, n, "kvr_worker_prefill_tokens_total", NULL);
        st->dec_steps_decode += prom_get(t, n, "kvr_worker_steps_by_kind_total", "kind=\"decode\"");
        st->dec_steps_mixed += prom_get(t, n, "kvr_worker_steps_by_kind_total", "kind=\"mixed\"");
        st->pulls_ok += prom_get(t, n, "kvr_worker_kv_pulls_total", "result=\"ok\"");
        st->pulls_empty += prom_get(t, n, "kvr_worker_kv_pulls_total", "result=\"empty\"");
        st->pulls_other += prom_get(t, n, "kvr_worker_kv_pulls_total", NULL);
        st->xfer_s += prom_get(t, n, "kvr_worker_kv_transfer_seconds_sum", "side=\"pull\"");
        st->xfer_n += prom_get(t, n, "kvr_worker_kv_transfer_seconds_count", "side=\"pull\"");
    }
    st->pulls_other -= st->pulls_ok + st->pulls_empty;
    kvr_buf_free(&b);
    run_cluster_free(&c);
}

static int cmp_dbl(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* TTFT p50/p99 (nearest rank) of the completed requests of at most short_tokens prompt tokens. */
static void short_ttft(const run_result *r, unsigned short_tokens, dg_stats *st)
{
    double *v = malloc(sizeof(double) * (r->n_samples ? r->n_samples : 1));
    size_t n = 0;
    for (size_t i = 0; v && i < r->n_samples; i++)
        if (r->samples[i].fail_class < 0 && r->samples[i].ttft_ms >= 0 &&
            r->samples[i].prompt_tokens <= short_tokens)
            v[n++] = r->samples[i].ttft_ms;
    st->n_short = (long)n;
    st->short_ttft_p50 = st->short_ttft_p99 = -1;
    if (n) {
        qsort(v, n, sizeof *v, cmp_dbl);
        size_t k50 = (n + 1) / 2, k99 = (size_t)((double)n * 0.99 + 0.999999);
        st->short_ttft_p50 = v[(k50 ? k50 : 1) - 1];
        st->short_ttft_p99 = v[(k99 ? k99 : 1) - 1];
    }
    free(v);
}

static void cmp_usage(FILE *out)
{
    fprintf(out,
            "usage: kvr-bench compare --trace FILE --json OUT [options]\n"
            "  --workers N (default 8) --speedup X --duration S --max-requests N\n"
            "  --trace-block-size B --max-output N --max-input N --request-timeout S\n"
            "  --modes kv3,kv1,round_robin,haproxy,agg,disagg,disagg-len,disagg-always\n"
            "                   (default: the first four); disagg-len: routers with\n"
            "                   --max-prefill-queue 1000000 (local by prompt length only);\n"
            "                   disagg-always: also --max-local-prefill 0 (never local)\n"
            "  --prefill-workers N  disagg modes: N of the --workers are prefill workers, the\n"
            "                   rest decode (default: half, at least 1)\n"
            "  --short-prompt N  agg/disagg modes: TTFT of the prompts of at most N tokens\n"
            "                   apart (default 1000, the routers' --max-local-prefill)\n"
            "  --dir D          where the clusters live (default: a new temp dir)\n"
            "  --worker-args \"…\" --router-args \"…\" --frontend-args \"…\"  passed to kvrctl up\n"
            "  --plot-dir DIR   per-mode TTFT plots in DIR/<mode>/\n"
            "  --worker-speedup X  workers' clock speed-up (default: --speedup); a lower value\n"
            "                   than --speedup loads the workers harder than the real trace did\n"
            "  --kvrctl-args \"…\" extra arguments for every `kvrctl up`\n"
            "Each mode runs on a fresh cluster (kvrctl up … ; replay ; kvrctl down).\n");
}


/* The workers' pooled capacity and block size, read from their own /metrics while a cluster
 * is up (so --worker-args are taken into account without parsing them). */
static void scrape_capacity(run_cluster *c, uint64_t *capacity, uint32_t *block_size)
{
    kvr_buf b;
    kvr_buf_init(&b);
    uint64_t cap = 0;
    uint32_t bs = 0;
    for (int i = 0; i < c->n; i++) {
        if (strcmp(c->procs[i].role, "worker") != 0)
            continue;
        char url[300];
        snprintf(url, sizeof url, "%s/metrics", c->procs[i].url);
        long st = 0;
        double v = 0;
        kvr_buf_reset(&b);
        if (run_http_get(url, 3000, &st, &b) != 0 || st != 200 ||
            run_prom_sum(b.base, b.len, "kvr_worker_kv_blocks_capacity", &v) != 0)
            continue;
        cap += (uint64_t)v;
        const char *p = b.len ? memmem(b.base, b.len, "block_size=\"", 12) : NULL;
        if (p)
            bs = (uint32_t)strtoul(p + 12, NULL, 10);
    }
    kvr_buf_free(&b);
    if (cap && bs) {
        *capacity = cap;
        *block_size = bs;
    }
}

static const char *proc_url(run_cluster *c, const char *role)
{
    for (int i = 0; i < c->n; i++)
        if (strcmp(c->procs[i].role, role) == 0)
            return c->procs[i].url;
    return NULL;
}

int kvr_bench_compare(int argc, char **argv)
{
    run_cfg base;
    run_cfg_init(&base);
    const char *json_out = NULL, *plot_dir = NULL, *dir = NULL;
    const char *wargs = "", *rargs = "", *fargs = "", *kargs = "";
    double worker_speedup = 0;
    char modes_buf[256] = "kv3,kv1,round_robin,haproxy";
    int workers = 8;
    unsigned short_tokens = 1000;
    int prefill_workers = 0; /* 0: half */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int r = run_parse_common(&base, argc, argv, &i, &json_out, &plot_dir);
        if (r < 0)
            return 2;
        if (r > 0)
            continue;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            cmp_usage(stdout);
            return 0;
        } else if (strcmp(a, "--workers") == 0 && v) {
            char *end;
            long w = strtol(v, &end, 10);
            if (*end || w < 1 || w > 256) {
                fprintf(stderr, "kvr-bench compare: --workers wants 1..256\n");
                return 2;
            }
            workers = (int)w;
            i++;
        } else if (strcmp(a, "--prefill-workers") == 0 && v) {
            char *end;
            long p = strtol(v, &end, 10);
            if (*end || p < 1 || p > 255) {
                fprintf(stderr, "kvr-bench compare: --prefill-workers wants 1..255\n");
                return 2;
            }
            prefill_workers = (int)p;
            i++;
        } else if (strcmp(a, "--short-prompt") == 0 && v) {
            char *end;
            unsigned long sp = strtoul(v, &end, 10);
            if (*end || sp > 10000000) {
                fprintf(stderr, "kvr-bench compare: --short-prompt wants 0..10000000\n");
                return 2;
            }
            short_tokens = (unsigned)sp;
            i++;
        } else if (strcmp(a, "--modes") == 0 && v) {
            snprintf(modes_buf, sizeof modes_buf, "%s", v);
            i++;
        } else if (strcmp(a, "--dir") == 0 && v) {
            dir = v;
            i++;
        } else if (strcmp(a, "--worker-args") == 0 && v) {
            wargs = v;
            i++;
        } else if (strcmp(a, "--router-args") == 0 && v) {
            rargs = v;
            i++;
        } else if (strcmp(a, "--frontend-args") == 0 && v) {
            fargs = v;
            i++;
        } else if (strcmp(a, "--kvrctl-args") == 0 && v) {
            kargs = v;
            i++;
        } else if (strcmp(a, "--worker-speedup") == 0 && v) {
            char *end;
            worker_speedup = strtod(v, &end);
            if (*end || !(worker_speedup > 0) || worker_speedup > 1e6) {
                fprintf(stderr, "kvr-bench compare: --worker-speedup wants a positive number\n");
                return 2;
            }
            i++;
        } else {
            fprintf(stderr, "kvr-bench compare: unknown or incomplete option %s\n", a);
            cmp_usage(stderr);
            return 2;
        }
    }
    if (prefill_workers >= workers) {
        fprintf(stderr, "kvr-bench compare: --prefill-workers must leave a decode worker\n");
        return 2;
    }
    if (!base.trace_path || !json_out) {
        fprintf(stderr, "kvr-bench compare: --trace and --json are required\n");
        cmp_usage(stderr);
        return 2;
    }
    bool want[N_MODES] = {0};
    char *save = NULL;
    for (char *m = strtok_r(modes_buf, ",", &save); m; m = strtok_r(NULL, ",", &save)) {
        int k = 0;
        while (k < N_MODES && strcmp(all_modes[k], m) != 0)
            k++;
        if (k == N_MODES) {
            fprintf(stderr, "kvr-bench compare: unknown mode '%s'\n", m);
            return 2;
        }
        want[k] = true;
    }
    char workdir[PATH_MAX];
    if (dir) {
        snprintf(workdir, sizeof workdir, "%s", dir);
        if (mkdir(workdir, 0755) != 0 && errno != EEXIST) {
            fprintf(stderr, "kvr-bench compare: mkdir %s: %s\n", workdir, strerror(errno));
            return 1;
        }
    } else {
        const char *tmp = getenv("TMPDIR");
        snprintf(workdir, sizeof workdir, "%s/kvr-compare.XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(workdir)) {
            fprintf(stderr, "kvr-bench compare: mkdtemp: %s\n", strerror(errno));
            return 1;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, cmp_on_signal);
    signal(SIGTERM, cmp_on_signal);
    run_http_global_init();

    uint64_t pool_capacity = 0;
    uint32_t pool_block_size = 0;
    run_result results[N_MODES];
    dg_stats dgs[N_MODES];
    memset(dgs, 0, sizeof dgs);
    bool have[N_MODES] = {0};
    char errors[N_MODES][300];
    memset(errors, 0, sizeof errors);
    int rc = 0;
    char wstr[16];
    snprintf(wstr, sizeof wstr, "%d", workers);
    char speed[32];
    snprintf(speed, sizeof speed, "%g", worker_speedup > 0 ? worker_speedup : base.speedup);
    for (int m = 0; m < N_MODES && !cmp_stop; m++) {
        if (!want[m])
            continue;
        char cdir[PATH_MAX + 32], fa[1024], ra[1024];
        snprintf(cdir, sizeof cdir, "%s/%s", workdir, all_modes[m]);
        const char *routers = m == M_KV3 ? "3" : "1";
        const char *frontends = m == M_HAPROXY ? "0" : "1";
        snprintf(fa, sizeof fa, "%s%s", fargs, m == M_RR ? " --router-mode round-robin" : "");
        /* later flags win: the user's --router-args cannot undo always-disaggregate */
        snprintf(ra, sizeof ra, "%s%s%s", rargs,
                 m == M_LEN || m == M_ALWAYS ? " --max-prefill-queue 1000000" : "",
                 m == M_ALWAYS ? " --max-local-prefill 0" : "");
        /* disagg: the same number of workers, half prefill (at least 1), the rest decode */
        char wpre[16], wdec[16];
        int npre = prefill_workers ? prefill_workers : workers / 2 > 0 ? workers / 2 : 1;
        snprintf(wpre, sizeof wpre, "%d", npre);
        snprintf(wdec, sizeof wdec, "%d", workers - npre > 0 ? workers - npre : 1);
        char *up[RUN_MAX_ARGS + 1] = {"up", "--dir", cdir, "--routers", (char *)routers,
                                      "--workers", is_disagg(m) ? "0" : wstr, "--frontends",
                                      (char *)frontends, "--speedup", speed, "--worker-args",
                                      (char *)wargs, "--router-args", ra, "--frontend-args", fa};
        int nup = 17;
        if (m == M_HAPROXY)
            up[nup++] = "--haproxy";
        if (is_disagg(m)) {
            up[nup++] = "--prefill-workers";
            up[nup++] = wpre;
            up[nup++] = "--decode-workers";
            up[nup++] = wdec;
        }
        char kbuf[1024];
        snprintf(kbuf, sizeof kbuf, "%s", kargs);
        char *ksave = NULL;
        for (char *t = strtok_r(kbuf, " \t", &ksave); t && nup < RUN_MAX_ARGS; t = strtok_r(NULL, " \t", &ksave))
            up[nup++] = t;
        up[nup] = NULL;
        fprintf(stderr, "== %s: starting a fresh cluster in %s\n", all_modes[m], cdir);
        if (run_kvrctl("kvr-bench compare", up, false) != 0) {
            snprintf(errors[m], sizeof errors[m], "kvrctl up failed (logs in %s/logs)", cdir);
            fprintf(stderr, "== %s: %s\n", all_modes[m], errors[m]);
            rc = 1;
            continue;
        }
        run_cluster c;
        kvr_err err = {0};
        const char *url = NULL;
        char url_copy[128] = "";
        if (run_cluster_load(&c, cdir, &err) == 0) {
            url = proc_url(&c, m == M_HAPROXY ? "haproxy" : "frontend");
            if (!pool_capacity)
                scrape_capacity(&c, &pool_capacity, &pool_block_size);
            if (url)
                snprintf(url_copy, sizeof url_copy, "%s", url);
            run_cluster_free(&c);
        }
        if (!url_copy[0]) {
            snprintf(errors[m], sizeof errors[m], "no entry point in %s/cluster.json", cdir);
            rc = 1;
        } else {
            run_cfg cfg = base;
            cfg.urls[0] = url_copy;
            cfg.n_urls = 1;
            cfg.cluster_dir = cdir;
            cfg.kill_at_s = -1;
            cfg.label = all_modes[m];
            cfg.stop = &cmp_stop;
            if (run_replay(&cfg, &results[m], &err) != 0) {
                snprintf(errors[m], sizeof errors[m], "%s", err.msg);
                rc = 1;
            } else {
                have[m] = true;
                run_result_print(stderr, all_modes[m], &results[m]);
                if (m == M_AGG || is_disagg(m)) {
                    scrape_dg(cdir, &dgs[m]);
                    short_ttft(&results[m], short_tokens, &dgs[m]);
                }
                if (plot_dir) {
                    char pd[PATH_MAX + 32];
                    mkdir(plot_dir, 0755);
                    snprintf(pd, sizeof pd, "%s/%s", plot_dir, all_modes[m]);
                    if (run_result_plot(&results[m], pd, &err) != 0)
                        fprintf(stderr, "== %s: plots: %s\n", all_modes[m], err.msg);
                }
            }
        }
        char *down[] = {"down", "--dir", cdir, NULL};
        if (run_kvrctl("kvr-bench compare", down, false) != 0) {
            fprintf(stderr, "== %s: kvrctl down reported processes left running in %s\n",
                    all_modes[m], cdir);
            rc = 1;
        }
    }

    printf("kvr-bench compare: %d workers, trace speed-up %g, worker speed-up %g, %s\n", workers,
           base.speedup, worker_speedup > 0 ? worker_speedup : base.speedup, base.trace_path);
    printf("%-12s %9s %9s %9s %9s %11s %7s %7s\n", "mode", "requests", "hit rate", "TTFT p50",
           "TTFT p99", "out tok/s", "failed", "e2e p50");
    for (int m = 0; m < N_MODES; m++) {
        if (!want[m])
            continue;
        if (!have[m]) {
            printf("%-12s %s\n", all_modes[m], errors[m][0] ? errors[m] : "not run");
            continue;
        }
        run_result *r = &results[m];
        char hit[16];
        if (r->have_hit_rate)
            snprintf(hit, sizeof hit, "%.1f%%", r->prefix_hit_rate * 100);
        else
            snprintf(hit, sizeof hit, "n/a");
        printf("%-12s %9ld %9s %9.1f %9.1f %11.1f %7ld %7.0f\n", all_modes[m], r->requests, hit,
               r->ttft_p50, r->ttft_p99, r->output_tokens_per_s, r->failed, r->e2e_p50);
        if (r->failed)
            rc = 1;
    }
    for (int m = M_AGG; m < N_MODES; m++) {
        if (!have[m])
            continue;
        const dg_stats *d = &dgs[m];
        const run_result *r = &results[m];
        printf("%-13s ITL p50 %.1f p99 %.1f ms, TTFT p50 %.1f p99 %.1f ms; prompts <= %u tokens "
               "(%ld): TTFT p50 %.1f p99 %.1f ms\n",
               all_modes[m], r->itl_p50, r->itl_p99, r->ttft_p50, r->ttft_p99, short_tokens,
               d->n_short, d->short_ttft_p50, d->short_ttft_p99);
        if (!d->have)
            continue;
        double dsteps = d->dec_steps_decode + d->dec_steps_mixed;
        printf("%-13s %s workers: %.0f prompt tokens computed, %.0f decoding steps of which "
               "%.1f%% beside a prefill chunk\n",
               "", m == M_AGG ? "all" : "decode", d->dec_prefill_tok, dsteps,
               dsteps > 0 ? 100 * d->dec_steps_mixed / dsteps : 0);
        if (is_disagg(m))
            printf("%-13s paths remote %.0f local %.0f fallback %.0f; prefill workers computed "
                   "%.0f tokens; pulls ok %.0f empty %.0f recomputed %.0f; transfer mean %.1f ms\n",
                   "", d->remote, d->local, d->fallback, d->pre_prefill_tok, d->pulls_ok,
                   d->pulls_empty, d->pulls_other,
                   d->xfer_n > 0 ? 1000 * d->xfer_s / d->xfer_n : 0);
    }
    if (have[M_AGG] && have[M_DISAGG])
        printf("disagg vs agg: ITL p99 %.1f vs %.1f ms (%.2fx), TTFT p50 %.1f vs %.1f ms\n",
               results[M_DISAGG].itl_p99, results[M_AGG].itl_p99,
               results[M_AGG].itl_p99 > 0 ? results[M_DISAGG].itl_p99 / results[M_AGG].itl_p99 : 0,
               results[M_DISAGG].ttft_p50, results[M_AGG].ttft_p50);
    if (have[M_AGG] && have[M_LEN])
        printf("disagg-len vs agg: ITL p99 %.1f vs %.1f ms (%.2fx), TTFT p50 %.1f vs %.1f ms\n",
               results[M_LEN].itl_p99, results[M_AGG].itl_p99,
               results[M_AGG].itl_p99 > 0 ? results[M_LEN].itl_p99 / results[M_AGG].itl_p99 : 0,
               results[M_LEN].ttft_p50, results[M_AGG].ttft_p50);
    for (int m = M_DISAGG; m <= M_LEN; m++)
        if (have[m] && have[M_ALWAYS])
            printf("%s (conditional) vs always-disaggregate, prompts <= %u tokens: TTFT p50 %.1f "
                   "vs %.1f ms\n",
                   all_modes[m], short_tokens, dgs[m].short_ttft_p50, dgs[M_ALWAYS].short_ttft_p50);
    if (have[0] && have[2] && results[0].have_hit_rate && results[2].have_hit_rate &&
        results[2].prefix_hit_rate > 0 && results[2].ttft_p50 > 0)
        printf("kv3 vs round_robin: hit rate %.2fx, TTFT p50 %.2fx\n",
               results[0].prefix_hit_rate / results[2].prefix_hit_rate,
               results[0].ttft_p50 / results[2].ttft_p50);
    if (have[0] && have[1] && results[0].have_hit_rate && results[1].have_hit_rate &&
        results[1].prefix_hit_rate > 0)
        printf("kv3 vs kv1: hit rate %.1f%%\n",
               100 * results[0].prefix_hit_rate / results[1].prefix_hit_rate);

    /* The ceiling of this very configuration: same slice, same prompts, the workers' total
     * capacity as one cache (launcher/ceiling.h), and an infinite cache. */
    kvr_ceiling_result pooled = {0}, infinite = {0};
    bool have_ceiling = false;
    if (pool_capacity && pool_block_size) {
        kvr_trace tr;
        kvr_err cerr = {0};
        if (kvr_trace_load(base.trace_path, NULL, &tr, &cerr) == 0) {
            size_t n = kvr_trace_slice(&tr, base.speedup, base.duration_s, base.max_requests);
            kvr_ceiling_cfg cc = {.block_size = pool_block_size,
                                  .capacity_blocks = pool_capacity,
                                  .trace_block_size = base.trace_block_size,
                                  .max_input = base.max_input > 0 ? (size_t)base.max_input : 0};
            have_ceiling = kvr_ceiling_run(&tr, n, &cc, &pooled, &cerr) == 0;
            cc.capacity_blocks = 0;
            have_ceiling = have_ceiling && kvr_ceiling_run(&tr, n, &cc, &infinite, &cerr) == 0;
            kvr_trace_free(&tr);
        }
        if (!have_ceiling)
            fprintf(stderr, "kvr-bench compare: ceiling: %s\n", cerr.msg);
    }
    if (have_ceiling) {
        printf("ceiling: one pooled cache of %llu blocks of %u tokens %.1f%%, infinite cache "
               "%.1f%%\n",
               (unsigned long long)pool_capacity, pool_block_size, pooled.hit_rate * 100,
               infinite.hit_rate * 100);
        /* not the disagg modes: a decode worker counts the blocks it pulled as cached */
        for (int m = 0; m < N_MODES; m++)
            if (have[m] && !is_disagg(m) && results[m].have_hit_rate && pooled.hit_rate > 0)
                printf("  %-12s %.1f%% of the pooled ceiling\n", all_modes[m],
                       100 * results[m].prefix_hit_rate / pooled.hit_rate);
    }

    FILE *f = fopen(json_out, "w");
    if (!f) {
        fprintf(stderr, "kvr-bench compare: writing %s: %s\n", json_out, strerror(errno));
        rc = 1;
    } else {
        fprintf(f, "{\"modes\":{");
        bool first = true;
        for (int m = 0; m < N_MODES; m++) {
            if (!have[m])
                continue;
            fprintf(f, "%s\"%s\":", first ? "" : ",", all_modes[m]);
            run_result_json(f, &results[m], NULL);
            first = false;
        }
        fputc('}', f);
        /* per agg/disagg mode: where prefills ran and what the decoding steps held */
        fprintf(f, ",\"disagg\":{");
        first = true;
        for (int m = M_AGG; m < N_MODES; m++) {
            if (!have[m])
                continue;
            const dg_stats *d = &dgs[m];
            fprintf(f,
                    "%s\"%s\":{\"short_prompt_tokens\":%u,\"short_requests\":%ld,"
                    "\"short_ttft_ms\":{\"p50\":%.3f,\"p99\":%.3f},"
                    "\"paths\":{\"remote\":%.0f,\"local\":%.0f,\"fallback\":%.0f},"
                    "\"decode_prefill_tokens\":%.0f,\"decode_steps\":%.0f,"
                    "\"mixed_steps\":%.0f,\"prefill_worker_tokens\":%.0f,"
                    "\"pulls\":{\"ok\":%.0f,\"empty\":%.0f,\"recomputed\":%.0f},"
                    "\"transfer_mean_ms\":%.3f}",
                    first ? "" : ",", all_modes[m], short_tokens, d->n_short, d->short_ttft_p50,
                    d->short_ttft_p99, d->remote, d->local, d->fallback, d->dec_prefill_tok,
                    d->dec_steps_decode + d->dec_steps_mixed, d->dec_steps_mixed,
                    d->pre_prefill_tok, d->pulls_ok, d->pulls_empty, d->pulls_other,
                    d->xfer_n > 0 ? 1000 * d->xfer_s / d->xfer_n : 0);
            first = false;
        }
        fputc('}', f);
        fprintf(f,
                ",\"config\":{\"prefill_workers\":%d,\"workers\":%d,\"worker_speedup\":%g,"
                "\"speedup\":%g,\"duration_s\":%g,\"max_requests\":%ld,"
                "\"trace_block_size\":%u,\"max_output\":%ld}",
                prefill_workers   ? prefill_workers
                : workers / 2 > 0 ? workers / 2
                                  : 1,
                workers, worker_speedup > 0 ? worker_speedup : base.speedup, base.speedup,
                base.duration_s, base.max_requests, base.trace_block_size, base.max_output);
        if (have_ceiling) {
            fprintf(f, ",\"pooled_ceiling_hit_rate\":%.6f,\"infinite_hit_rate\":%.6f,"
                       "\"pooled_capacity_blocks\":%llu,\"block_size\":%u,\"ceiling_share\":{",
                    pooled.hit_rate, infinite.hit_rate, (unsigned long long)pool_capacity,
                    pool_block_size);
            first = true;
            for (int m = 0; m < N_MODES; m++) {
                if (!have[m] || is_disagg(m) || !results[m].have_hit_rate || !(pooled.hit_rate > 0))
                    continue;
                fprintf(f, "%s\"%s\":%.6f", first ? "" : ",", all_modes[m],
                        results[m].prefix_hit_rate / pooled.hit_rate);
                first = false;
            }
            fputc('}', f);
        }
        bool any_err = false;
        for (int m = 0; m < N_MODES; m++)
            any_err |= want[m] && !have[m];
        if (any_err) {
            fprintf(f, ",\"errors\":{");
            first = true;
            for (int m = 0; m < N_MODES; m++) {
                if (!want[m] || have[m])
                    continue;
                fprintf(f, "%s\"%s\":\"", first ? "" : ",", all_modes[m]);
                for (const char *p = errors[m]; *p; p++)
                    if (*p == '"' || *p == '\\')
                        fprintf(f, "\\%c", *p);
                    else if ((unsigned char)*p >= 0x20)
                        fputc(*p, f);
                fputc('"', f);
                first = false;
            }
            fputc('}', f);
        }
        fputs("}\n", f);
        fclose(f);
    }
    for (int m = 0; m < N_MODES; m++)
        if (have[m])
            run_result_free(&results[m]);
    if (cmp_stop)
        rc = 1;
    return rc;
}
