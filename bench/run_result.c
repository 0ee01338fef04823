/* run_result.c: a run_replay result (run_replay.h) printed as text, written as JSON, and
 * plotted (gnuplot, when installed); freeing it. */
#define _GNU_SOURCE
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include "run_replay_int.h"

#include <cjson/cJSON.h>

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvr_buf.h"
#include "run_cluster.h"

/* ---------- output ---------- */

static void jnum(FILE *out, double v)
{
    if (isnan(v) || isinf(v))
        fputs("null", out);
    else
        fprintf(out, "%.3f", v);
}

void run_result_print(FILE *out, const char *title, const run_result *r)
{
    fprintf(out, "%s\n", title ? title : "kvr-bench run");
    fprintf(out,
            "  requests %ld   completed %ld   failed %ld (connect %ld, http %ld, stream %ld, "
            "timeout %ld)\n",
            r->requests, r->completed, r->failed, r->failures[RUN_FAIL_CONNECT],
            r->failures[RUN_FAIL_HTTP], r->failures[RUN_FAIL_STREAM],
            r->failures[RUN_FAIL_TIMEOUT]);
    if (r->first_error[0])
        fprintf(out, "  first failure: %s\n", r->first_error);
    fprintf(out, "  %-22s %10s %10s %10s\n", "", "p50", "p90", "p99");
    fprintf(out, "  %-22s %10.1f %10.1f %10.1f\n", "TTFT ms", r->ttft_p50, r->ttft_p90,
            r->ttft_p99);
    fprintf(out, "  %-22s %10.2f %10s %10.2f\n", "inter-token ms", r->itl_p50, "", r->itl_p99);
    fprintf(out, "  %-22s %10.1f %10s %10.1f\n", "end-to-end ms", r->e2e_p50, "", r->e2e_p99);
    fprintf(out, "  output tokens/s %.1f over %.1f s (%.0f tokens)\n", r->output_tokens_per_s,
            r->duration_s, r->output_tokens);
    if (r->have_hit_rate)
        fprintf(out,
                "  prefix hit rate %.1f %% (cached %.0f / prompt %.0f tokens at the workers)\n",
                r->prefix_hit_rate * 100, r->cached_delta, r->prompt_delta);
    else
        fprintf(out, "  prefix hit rate: n/a (no --cluster, or workers' /metrics unreadable)\n");
    if (r->have_hit_reasons)
        fprintf(out,
                "  routed: predicted %.0f cached tokens, workers had %.0f; missed hits: index "
                "stale %.0f, another worker had more %.0f\n",
                r->predicted_tokens, r->routed_cached_tokens, r->miss_index_stale,
                r->miss_other_worker);
    if (r->failover) {
        fprintf(out,
                "  failover: killed router-%d (%s) at %.1f s, restarted at %.1f s, ready after "
                "%.0f ms, "
                "%ld failed during, digests %s\n",
                r->killed_router, r->killed_role, r->killed_at_s, r->restarted_at_s,
                r->ready_after_restart_ms, r->failed_during, r->digests_equal ? "equal" : "DIFFER");
        if (r->failover_error[0])
            fprintf(out, "  failover problem: %s\n", r->failover_error);
    }
}

void run_result_json(FILE *out, const run_result *r, const run_cfg *cfg)
{
    fprintf(out, "{\"requests\":%ld,\"completed\":%ld,\"failed\":%ld,", r->requests, r->completed,
            r->failed);
    fprintf(out,
            "\"failures\":{\"connect\":%ld,\"http_status\":%ld,\"stream\":%ld,\"timeout\":%ld},",
            r->failures[RUN_FAIL_CONNECT], r->failures[RUN_FAIL_HTTP], r->failures[RUN_FAIL_STREAM],
            r->failures[RUN_FAIL_TIMEOUT]);
    fputs("\"ttft_ms\":{\"p50\":", out);
    jnum(out, r->ttft_p50);
    fputs(",\"p90\":", out);
    jnum(out, r->ttft_p90);
    fputs(",\"p99\":", out);
    jnum(out, r->ttft_p99);
    fputs(",\"mean\":", out);
    jnum(out, r->ttft_mean);
    fputs("},\"itl_ms\":{\"p50\":", out);
    jnum(out, r->itl_p50);
    fputs(",\"p99\":", out);
    jnum(out, r->itl_p99);
    fputs("},\"e2e_ms\":{\"p50\":", out);
    jnum(out, r->e2e_p50);
    fputs(",\"p99\":", out);
    jnum(out, r->e2e_p99);
    fputs("},\"output_tokens_per_s\":", out);
    jnum(out, r->output_tokens_per_s);
    fputs(",\"output_tokens\":", out);
    jnum(out, r->output_tokens);
    fputs(",\"duration_s\":", out);
    jnum(out, r->duration_s);
    fputs(",\"prefix_hit_rate\":", out);
    if (r->have_hit_rate)
        fprintf(out, "%.6f", r->prefix_hit_rate);
    else
        fputs("null", out);
    fputs(",\"worker_prompt_tokens\":", out);
    jnum(out, r->have_hit_rate ? r->prompt_delta : NAN);
    fputs(",\"worker_cached_tokens\":", out);
    jnum(out, r->have_hit_rate ? r->cached_delta : NAN);
    if (r->have_hit_reasons)
        fprintf(out,
                ",\"hit_reasons\":{\"predicted_tokens\":%.0f,\"cached_tokens\":%.0f,"
                "\"index_stale\":%.0f,\"other_worker_had_more\":%.0f}",
                r->predicted_tokens, r->routed_cached_tokens, r->miss_index_stale,
                r->miss_other_worker);
    if (r->failover) {
        fprintf(out, ",\"failover\":{\"killed_router\":%d,\"killed_role\":\"%s\",\"killed_at_s\":",
                r->killed_router, r->killed_role);
        jnum(out, r->killed_at_s);
        fputs(",\"restarted_at_s\":", out);
        jnum(out, r->restarted_at_s);
        fputs(",\"ready_after_restart_ms\":", out);
        jnum(out, r->ready_after_restart_ms >= 0 ? r->ready_after_restart_ms : NAN);
        fprintf(out, ",\"failed_during\":%ld,\"digests_equal\":%s", r->failed_during,
                r->digests_equal ? "true" : "false");
        if (r->failover_error[0]) {
            cJSON *js = cJSON_CreateString(r->failover_error);
            char *e = js ? cJSON_PrintUnformatted(js) : NULL;
            fprintf(out, ",\"error\":%s", e ? e : "null");
            free(e);
            cJSON_Delete(js);
        }
        fputs("}", out);
    }
    if (cfg) {
        fprintf(out,
                ",\"config\":{\"speedup\":%g,\"duration_s\":%g,\"max_requests\":%ld,"
                "\"trace_block_size\":%u,\"max_output\":%ld,\"urls\":%d}",
                cfg->speedup, cfg->duration_s, cfg->max_requests, cfg->trace_block_size,
                cfg->max_output, cfg->n_urls);
    }
    fputs("}", out);
}

int run_result_plot(const run_result *r, const char *dir, kvr_err *err)
{
    char path[600];
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return kvr_err_set(err, KVR_EIO, "mkdir %s: %s", dir, strerror(errno));
    snprintf(path, sizeof path, "%s/ttft.dat", dir);
    FILE *f = fopen(path, "w");
    if (!f)
        return kvr_err_set(err, KVR_EIO, "writing %s: %s", path, strerror(errno));
    fprintf(f, "# sent_s ttft_ms ok(1)/failed(0)\n");
    dvec ok = {0};
    for (size_t i = 0; i < r->n_samples; i++) {
        const run_sample *s = &r->samples[i];
        if (s->fail_class < 0) {
            fprintf(f, "%.3f %.3f 1\n", s->sent_s, s->ttft_ms);
            dvec_push(&ok, s->ttft_ms);
        } else {
            fprintf(f, "%.3f %.3f 0\n", s->sent_s, s->e2e_ms);
        }
    }
    fclose(f);
    dvec_sort(&ok);
    snprintf(path, sizeof path, "%s/ttft_cdf.dat", dir);
    f = fopen(path, "w");
    if (!f) {
        free(ok.v);
        return kvr_err_set(err, KVR_EIO, "writing %s: %s", path, strerror(errno));
    }
    fprintf(f, "# ttft_ms fraction\n");
    for (size_t i = 0; i < ok.n; i++)
        fprintf(f, "%.3f %.6f\n", ok.v[i], (double)(i + 1) / (double)ok.n);
    fclose(f);
    free(ok.v);
    snprintf(path, sizeof path, "%s/plot.gp", dir);
    f = fopen(path, "w");
    if (!f)
        return kvr_err_set(err, KVR_EIO, "writing %s: %s", path, strerror(errno));
    fprintf(f,
            "set terminal pngcairo size 1000,500 noenhanced\n"
            "set datafile commentschars '#'\n"
            "set grid\n"
            "set output 'ttft_over_time.png'\n"
            "set title 'TTFT over time (%ld requests, %ld failed)'\n"
            "set xlabel 'request sent at (s)'\nset ylabel 'TTFT (ms)'\n",
            r->requests, r->failed);
    if (r->failover) {
        fprintf(f,
                "set arrow from %.3f, graph 0 to %.3f, graph 1 nohead lc rgb 'red' lw 2\n"
                "set label 'kill router-%d (%s)' at %.3f, graph 0.95 tc rgb 'red' offset 0.5,0\n",
                r->killed_at_s, r->killed_at_s, r->killed_router, r->killed_role, r->killed_at_s);
        if (r->restarted_at_s > 0)
            fprintf(
                f,
                "set arrow from %.3f, graph 0 to %.3f, graph 1 nohead lc rgb 'dark-green' lw 2\n"
                "set label 'restart' at %.3f, graph 0.88 tc rgb 'dark-green' offset 0.5,0\n",
                r->restarted_at_s, r->restarted_at_s, r->restarted_at_s);
        if (r->restarted_at_s > 0 && r->ready_after_restart_ms >= 0) {
            double ready = r->restarted_at_s + r->ready_after_restart_ms / 1000.0;
            fprintf(f,
                    "set arrow from %.3f, graph 0 to %.3f, graph 1 nohead dt 2 lc rgb 'dark-green' "
                    "lw 1\n"
                    "set label 'ready (+%.0f ms)' at %.3f, graph 0.81 tc rgb 'dark-green' offset "
                    "0.5,0\n",
                    ready, ready, r->ready_after_restart_ms, ready);
        }
    }
    fprintf(f, "plot 'ttft.dat' using 1:($3==1?$2:1/0) with points pt 7 ps 0.5 lc rgb 'blue' title "
               "'ok', \\\n"
               "     'ttft.dat' using 1:($3==0?$2:1/0) with points pt 2 ps 1 lc rgb 'red' title "
               "'failed (e2e)'\n"
               "unset arrow\nunset label\n"
               "set output 'ttft_cdf.png'\n"
               "set title 'TTFT CDF'\nset xlabel 'TTFT (ms)'\nset ylabel 'fraction of requests'\n"
               "set yrange [0:1]\nset logscale x\n"
               "plot 'ttft_cdf.dat' using 1:2 with lines lw 2 lc rgb 'blue' title 'TTFT'\n");
    fclose(f);
    char cmd[800];
    snprintf(cmd, sizeof cmd, "cd '%s' && gnuplot plot.gp 2>gnuplot.err", dir);
    int st = system(cmd);
    if (st != 0)
        return kvr_err_set(err, KVR_EIO, "gnuplot failed (status %d); see %s/gnuplot.err", st, dir);
    return 0;
}
