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
 * half decode (kvrctl --prefill-workers/--decode-workers): the disaggregation trade. */
static const char *all_modes[] = {"kv3", "kv1", "round_robin", "haproxy", "agg", "disagg"};
#define N_MODES 6

static void cmp_usage(FILE *out)
{
    fprintf(out,
            "usage: kvr-bench compare --trace FILE --json OUT [options]\n"
            "  --workers N (default 8) --speedup X --duration S --max-requests N\n"
            "  --trace-block-size B --max-output N --max-input N --request-timeout S\n"
            "  --modes kv3,kv1,round_robin,haproxy,agg,disagg (default: the first four)\n"
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
        char cdir[PATH_MAX + 32], fa[1024];
        snprintf(cdir, sizeof cdir, "%s/%s", workdir, all_modes[m]);
        const char *routers = m == 0 ? "3" : "1";
        const char *frontends = m == 3 ? "0" : "1";
        snprintf(fa, sizeof fa, "%s%s", fargs, m == 2 ? " --router-mode round-robin" : "");
        /* disagg: the same number of workers, half prefill (at least 1), the rest decode */
        char wpre[16], wdec[16];
        int npre = workers / 2 > 0 ? workers / 2 : 1;
        snprintf(wpre, sizeof wpre, "%d", npre);
        snprintf(wdec, sizeof wdec, "%d", workers - npre > 0 ? workers - npre : 1);
        char *up[RUN_MAX_ARGS + 1] = {"up", "--dir", cdir, "--routers", (char *)routers,
                                      "--workers", m == 5 ? "0" : wstr, "--frontends", (char *)frontends,
                                      "--speedup", speed, "--worker-args", (char *)wargs,
                                      "--router-args", (char *)rargs, "--frontend-args", fa};
        int nup = 17;
        if (m == 3)
            up[nup++] = "--haproxy";
        if (m == 5) {
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
            url = proc_url(&c, m == 3 ? "haproxy" : "frontend");
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
    if (have[4] && have[5])
        printf("disagg vs agg: ITL p99 %.1f vs %.1f ms (%.2fx), TTFT p50 %.1f vs %.1f ms\n",
               results[5].itl_p99, results[4].itl_p99,
               results[4].itl_p99 > 0 ? results[5].itl_p99 / results[4].itl_p99 : 0,
               results[5].ttft_p50, results[4].ttft_p50);
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
        for (int m = 0; m < N_MODES; m++)
            if (have[m] && results[m].have_hit_rate && pooled.hit_rate > 0)
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
        fprintf(f, "},\"config\":{\"workers\":%d,\"worker_speedup\":%g,\"speedup\":%g,\"duration_s\":%g,\"max_requests\":%ld,"
                   "\"trace_block_size\":%u,\"max_output\":%ld}",
                workers, worker_speedup > 0 ? worker_speedup : base.speedup, base.speedup, base.duration_s, base.max_requests, base.trace_block_size,
                base.max_output);
        if (have_ceiling) {
            fprintf(f, ",\"pooled_ceiling_hit_rate\":%.6f,\"infinite_hit_rate\":%.6f,"
                       "\"pooled_capacity_blocks\":%llu,\"block_size\":%u,\"ceiling_share\":{",
                    pooled.hit_rate, infinite.hit_rate, (unsigned long long)pool_capacity,
                    pool_block_size);
            first = true;
            for (int m = 0; m < N_MODES; m++) {
                if (!have[m] || !results[m].have_hit_rate || !(pooled.hit_rate > 0))
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
