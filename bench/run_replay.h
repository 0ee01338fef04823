/* run_replay: open-loop trace replay against OpenAI-compatible /v1/completions endpoints with
 * SSE streaming, as used by `kvr-bench run` and `kvr-bench compare`.
 *
 * Requests are sent at trace timestamp / speedup (never waiting for earlier ones), spread
 * round-robin over the URLs; each is a real streaming HTTP client (libcurl multi, one thread).
 * Optionally a failover thread SIGKILLs a router (leader or follower) from the cluster in
 * cfg->cluster_dir at kill_at_s, restarts it restart_after_s later with the same command line,
 * and measures the time until its /ready is 200.
 *
 * Memory: run_result owns its sample arrays (run_result_free). Threads: run_replay blocks the
 * calling thread for the run; the failover thread is internal and joined before it returns. */
#ifndef RUN_REPLAY_H
#define RUN_REPLAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "kvr_err.h"

typedef struct run_cfg {
    const char *trace_path;
    const char *urls[16];
    int n_urls;
    double speedup;          /* default 1 */
    double duration_s;       /* wall-clock seconds of trace to replay; 0 = whole trace */
    long max_requests;       /* 0 = no cap */
    unsigned trace_block_size; /* default 512 */
    long max_output;         /* cap on max_tokens; 0 = none */
    long max_input;          /* cap on prompt tokens; 0 = none */
    const char *model;       /* NULL: from cluster.json, else "sim" */
    const char *cluster_dir; /* NULL: no worker metrics, no failover */
    double kill_at_s;        /* < 0: no failover */
    double restart_after_s;
    const char *kill_role;   /* "leader" (default) or "follower" */
    double request_timeout_s; /* default 300 */
    bool progress;           /* progress line on stderr */
    const char *label;       /* for the progress line */
    volatile int *stop;      /* optional: when it becomes non-zero (e.g. from a signal
                              * handler) the run stops sending and aborts what is in flight */
} run_cfg;

void run_cfg_init(run_cfg *c);

enum { RUN_FAIL_CONNECT, RUN_FAIL_HTTP, RUN_FAIL_STREAM, RUN_FAIL_TIMEOUT, RUN_FAIL_CLASSES };

typedef struct run_sample {
    double sent_s;  /* seconds from the start of the run */
    double ttft_ms; /* < 0 when no token arrived */
    double e2e_ms;
    int fail_class; /* -1 ok */
    unsigned prompt_tokens; /* as sent (after --max-input) */
} run_sample;

typedef struct run_result {
    long requests, completed, failed;
    long failures[RUN_FAIL_CLASSES];
    double ttft_p50, ttft_p90, ttft_p99, ttft_mean;
    double itl_p50, itl_p99;
    double e2e_p50, e2e_p99;
    double output_tokens, output_tokens_per_s, duration_s;
    double prompt_tokens_sent;
    bool have_hit_rate;
    double prefix_hit_rate, prompt_delta, cached_delta;
    /* why hits were missed, from the frontends' /metrics (issue 14 item 5; deltas over the
     * run): tokens the routers predicted cached, tokens the chosen workers had, and the
     * requests whose index was stale or that went to a worker with less than the best overlap */
    bool have_hit_reasons;
    double predicted_tokens, routed_cached_tokens, miss_index_stale, miss_other_worker;
    char first_error[256];
    /* failover */
    bool failover;
    int killed_router;
    char killed_role[16]; /* what the router was when killed: leader/follower */
    double killed_at_s, restarted_at_s;
    double ready_after_restart_ms; /* < 0: never became ready */
    long failed_during;
    bool digests_equal;
    char failover_error[256];
    /* per-request samples, in send order */
    run_sample *samples;
    size_t n_samples;
} run_result;

/* Runs the replay. Returns 0 when the run took place (failed requests are counted in the
 * result, not an error), or a KVR_E* code for set-up problems (trace unreadable, …). */
int run_replay(const run_cfg *cfg, run_result *res, kvr_err *err);
void run_result_free(run_result *res);

/* Prints the human table / writes the JSON object (no trailing newline) for one result. */
void run_result_print(FILE *out, const char *title, const run_result *r);
void run_result_json(FILE *out, const run_result *r, const run_cfg *cfg);

/* Writes gnuplot data + script into dir and runs gnuplot: ttft_over_time.png, ttft_cdf.png. */
int run_result_plot(const run_result *r, const char *dir, kvr_err *err);

#endif
