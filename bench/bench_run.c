/* kvr-bench run: replay a Mooncake trace through frontends as SSE clients; optionally kill and
 * restart a router mid-run (DESIGN section 10). The engine is run_replay.c. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvr_bench.h"
#include "run_cluster.h"
#include "run_replay.h"

static void run_usage(FILE *out)
{
    fprintf(out,
            "usage: kvr-bench run --trace FILE --url URL[,URL…] --json OUT [options]\n"
            "  --speedup X             replay X times faster than the trace (default 1)\n"
            "  --duration S            replay the first S seconds (after speed-up) of the trace\n"
            "  --max-requests N        at most N requests\n"
            "  --trace-block-size B    tokens per trace hash id (default 512)\n"
            "  --max-output N          cap max_tokens at N\n"
            "  --max-input N           cap prompts at N tokens\n"
            "  --model M               model name (default: cluster.json's, else \"sim\")\n"
            "  --cluster D             kvrctl cluster dir: worker metrics (prefix hit rate), failover\n"
            "  --kill-router-at S --restart-after S [--kill-role leader|follower]\n"
            "  --request-timeout S     per request (default 300)\n"
            "  --plot-dir DIR          gnuplot data, script and PNGs (TTFT over time, TTFT CDF)\n"
            "  --quiet                 no progress line\n"
            "Exit status: 0 when every request completed (and, for failover runs, the restarted\n"
            "router became ready and the digests agreed), 1 otherwise, 2 on a bad command line.\n");
}

static int parse_num(const char *flag, const char *v, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double x = v ? strtod(v, &end) : 0;
    if (!v || errno || *v == 0 || *end || !(x >= lo && x <= hi)) {
        fprintf(stderr, "kvr-bench run: %s wants a number in [%g, %g], got '%s'\n", flag, lo, hi,
                v ? v : "(nothing)");
        return -1;
    }
    *out = x;
    return 0;
}

static char url_store[4096];
static volatile int run_stop;
static void on_signal(int sig)
{
    (void)sig;
    run_stop = 1;
}

/* Shared by run and compare: parses the flags common to both into cfg. Returns 1 when the
 * flag was consumed (with *i advanced), 0 when unknown, -1 on a bad value. */
int run_parse_common(run_cfg *cfg, int argc, char **argv, int *i, const char **json_out,
                     const char **plot_dir);
int run_parse_common(run_cfg *cfg, int argc, char **argv, int *i, const char **json_out,
                     const char **plot_dir)
{
    const char *a = argv[*i];
    const char *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    double x;
#define TAKE(lo, hi)                                                                               \
    do {                                                                                           \
        if (parse_num(a, v, lo, hi, &x) != 0)                                                      \
            return -1;                                                                             \
        (*i)++;                                                                                    \
    } while (0)
    if (strcmp(a, "--trace") == 0 && v) {
        cfg->trace_path = v;
        (*i)++;
    } else if (strcmp(a, "--json") == 0 && v) {
        *json_out = v;
        (*i)++;
    } else if (strcmp(a, "--plot-dir") == 0 && v) {
        *plot_dir = v;
        (*i)++;
    } else if (strcmp(a, "--model") == 0 && v) {
        cfg->model = v;
        (*i)++;
    } else if (strcmp(a, "--speedup") == 0) {
        TAKE(1e-3, 1e6);
        cfg->speedup = x;
    } else if (strcmp(a, "--duration") == 0) {
        TAKE(0, 1e7);
        cfg->duration_s = x;
    } else if (strcmp(a, "--max-requests") == 0) {
        TAKE(0, 1e8);
        cfg->max_requests = (long)x;
    } else if (strcmp(a, "--trace-block-size") == 0) {
        TAKE(1, 1 << 20);
        cfg->trace_block_size = (unsigned)x;
    } else if (strcmp(a, "--max-output") == 0) {
        TAKE(0, 1e7);
        cfg->max_output = (long)x;
    } else if (strcmp(a, "--max-input") == 0) {
        TAKE(0, 1 << 20);
        cfg->max_input = (long)x;
    } else if (strcmp(a, "--request-timeout") == 0) {
        TAKE(0.1, 86400);
        cfg->request_timeout_s = x;
    } else if (strcmp(a, "--quiet") == 0) {
        cfg->progress = false;
    } else {
        return 0;
    }
#undef TAKE
    return 1;
}

int kvr_bench_run(int argc, char **argv)
{
    run_cfg cfg;
    run_cfg_init(&cfg);
    const char *json_out = NULL, *plot_dir = NULL, *urls = NULL;
    double restart_after = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int r = run_parse_common(&cfg, argc, argv, &i, &json_out, &plot_dir);
        if (r < 0)
            return 2;
        if (r > 0)
            continue;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            run_usage(stdout);
            return 0;
        } else if (strcmp(a, "--url") == 0 && v) {
            urls = v;
            i++;
        } else if (strcmp(a, "--cluster") == 0 && v) {
            cfg.cluster_dir = v;
            i++;
        } else if (strcmp(a, "--kill-router-at") == 0) {
            if (parse_num(a, v, 0, 1e6, &cfg.kill_at_s) != 0)
                return 2;
            i++;
        } else if (strcmp(a, "--restart-after") == 0) {
            if (parse_num(a, v, 0, 1e6, &restart_after) != 0)
                return 2;
            i++;
        } else if (strcmp(a, "--kill-role") == 0 && v) {
            if (strcmp(v, "leader") != 0 && strcmp(v, "follower") != 0) {
                fprintf(stderr, "kvr-bench run: --kill-role wants leader or follower\n");
                return 2;
            }
            cfg.kill_role = v;
            i++;
        } else {
            fprintf(stderr, "kvr-bench run: unknown or incomplete option %s\n", a);
            run_usage(stderr);
            return 2;
        }
    }
    if (!cfg.trace_path || !urls || !json_out) {
        fprintf(stderr, "kvr-bench run: --trace, --url and --json are required\n");
        run_usage(stderr);
        return 2;
    }
    if (cfg.kill_at_s >= 0) {
        if (!cfg.cluster_dir || restart_after < 0) {
            fprintf(stderr, "kvr-bench run: --kill-router-at needs --restart-after and --cluster\n");
            return 2;
        }
        cfg.restart_after_s = restart_after;
    }
    snprintf(url_store, sizeof url_store, "%s", urls);
    char *save = NULL;
    for (char *u = strtok_r(url_store, ",", &save); u; u = strtok_r(NULL, ",", &save)) {
        if (cfg.n_urls >= 16) {
            fprintf(stderr, "kvr-bench run: at most 16 URLs\n");
            return 2;
        }
        size_t l = strlen(u);
        while (l && u[l - 1] == '/')
            u[--l] = 0;
        cfg.urls[cfg.n_urls++] = u;
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    cfg.stop = &run_stop;
    run_http_global_init();

    run_result res;
    kvr_err err = {0};
    if (run_replay(&cfg, &res, &err) != 0) {
        fprintf(stderr, "kvr-bench run: %s\n", err.msg);
        return 1;
    }
    run_result_print(stdout, "kvr-bench run", &res);
    FILE *f = fopen(json_out, "w");
    if (!f) {
        fprintf(stderr, "kvr-bench run: writing %s: %s\n", json_out, strerror(errno));
        run_result_free(&res);
        return 1;
    }
    run_result_json(f, &res, &cfg);
    fputc('\n', f);
    fclose(f);
    if (plot_dir) {
        if (run_result_plot(&res, plot_dir, &err) != 0)
            fprintf(stderr, "kvr-bench run: plots: %s\n", err.msg);
        else
            printf("  plots: %s/ttft_over_time.png %s/ttft_cdf.png\n", plot_dir, plot_dir);
    }
    int rc = res.failed == 0 && res.completed > 0 ? 0 : 1;
    if (res.failover && (res.ready_after_restart_ms < 0 || !res.digests_equal))
        rc = 1;
    run_result_free(&res);
    return rc;
}
