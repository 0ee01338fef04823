/* kvr-bench ceiling: the pooled-cache and infinite-cache prefix hit rates of a trace slice
 * (launcher/ceiling.h), without starting a cluster. `kvr-bench compare` reports the same figures
 * for its own configuration beside the modes it measured. */
#include "ceiling.h"
#include "kvr_bench.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *out)
{
    fprintf(out, "usage: kvr-bench ceiling --trace FILE [--workers N (8)] [--capacity-blocks C\n"
                 "  (per worker, 16384)] [--block-size B (64)] [--speedup X (1)] [--duration S]\n"
                 "  [--max-requests N] [--trace-block-size B (512)] [--max-input N]\n"
                 "Prints one JSON object: pooled_ceiling_hit_rate, infinite_hit_rate, counts.\n");
}

static int num(const char *flag, const char *v, double lo, double hi, double *out)
{
    char *end;
    double x = v ? strtod(v, &end) : 0;
    if (!v || *end || !(x >= lo && x <= hi)) {
        fprintf(stderr, "kvr-bench ceiling: %s wants a number in [%g, %g]\n", flag, lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

int kvr_bench_ceiling(int argc, char **argv)
{
    const char *trace = NULL;
    double workers = 8, cap = 16384, bs = 64, speedup = 1, duration = 0, maxreq = 0, tbs = 512,
           maxin = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int rc = 0;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--trace") && v) {
            trace = v;
        } else if (!strcmp(a, "--workers")) {
            rc = num(a, v, 1, 4096, &workers);
        } else if (!strcmp(a, "--capacity-blocks")) {
            rc = num(a, v, 1, 1e9, &cap);
        } else if (!strcmp(a, "--block-size")) {
            rc = num(a, v, 1, 65536, &bs);
        } else if (!strcmp(a, "--speedup")) {
            rc = num(a, v, 1e-6, 1e9, &speedup);
        } else if (!strcmp(a, "--duration")) {
            rc = num(a, v, 0, 1e9, &duration);
        } else if (!strcmp(a, "--max-requests")) {
            rc = num(a, v, 0, 1e9, &maxreq);
        } else if (!strcmp(a, "--trace-block-size")) {
            rc = num(a, v, 1, 65536, &tbs);
        } else if (!strcmp(a, "--max-input")) {
            rc = num(a, v, 0, 1 << 20, &maxin);
        } else {
            fprintf(stderr, "kvr-bench ceiling: unknown or incomplete option %s\n", a);
            usage(stderr);
            return 2;
        }
        if (rc != 0)
            return 2;
        i++;
    }
    if (!trace) {
        usage(stderr);
        return 2;
    }
    kvr_trace tr;
    kvr_err err = {0};
    if (kvr_trace_load(trace, NULL, &tr, &err) != 0) {
        fprintf(stderr, "kvr-bench ceiling: %s\n", err.msg);
        return 1;
    }
    size_t n = kvr_trace_slice(&tr, speedup, duration, (long)maxreq);
    kvr_ceiling_cfg cc = {.block_size = (uint32_t)bs,
                          .capacity_blocks = (uint64_t)(workers * cap),
                          .trace_block_size = (uint32_t)tbs,
                          .max_input = (size_t)maxin};
    kvr_ceiling_result pooled, inf;
    int rc = kvr_ceiling_run(&tr, n, &cc, &pooled, &err);
    cc.capacity_blocks = 0;
    if (rc == 0)
        rc = kvr_ceiling_run(&tr, n, &cc, &inf, &err);
    kvr_trace_free(&tr);
    if (rc != 0) {
        fprintf(stderr, "kvr-bench ceiling: %s\n", err.msg);
        return 1;
    }
    printf("{\"requests\":%zu,\"pooled_capacity_blocks\":%llu,\"block_size\":%u,"
           "\"prompt_tokens\":%.0f,\"pooled_cached_tokens\":%.0f,\"pooled_evictions\":%llu,"
           "\"pooled_ceiling_hit_rate\":%.6f,\"infinite_hit_rate\":%.6f}\n",
           n, (unsigned long long)(workers * cap), (uint32_t)bs, pooled.prompt_tokens,
           pooled.cached_tokens, (unsigned long long)pooled.evictions, pooled.hit_rate,
           inf.hit_rate);
    return 0;
}
