/* run_replay_int.h: private to bench/run_replay.c (the replay engine), run_failover.c (the
 * kill/restart thread and the digest check) and run_result.c (printing, JSON, plots), the
 * three parts of run_replay.h.
 *
 * Threads: the replay runs on the caller's thread with libcurl multi; the failover thread only
 * reads rp's config and cluster paths and sets its own flag. */
#ifndef RUN_REPLAY_INT_H
#define RUN_REPLAY_INT_H

#include "kvr_buf.h"
#include "run_replay.h"
#include "trace.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

#define MAX_INFLIGHT 4096
#define MAX_PROMPT_TOKENS (1u << 20)
#define SSE_LINE_MAX (1u << 20)
/* ---------- growable double arrays ---------- */

typedef struct dvec {
    double *v;
    size_t n, cap;
} dvec;
/* ---------- one streaming request ---------- */

typedef struct req {
    CURL *h;
    size_t index; /* in the trace */
    size_t sample;
    kvr_buf body;
    kvr_buf line;
    double sent, first_tok, last_tok;
    long tokens;
    bool done, stream_error, line_overflow;
    char err[160];
    struct replay *rp;
    struct curl_slist *hdrs;
    struct req *prev, *next; /* the replay's in-flight list */
} req;

typedef struct replay {
    const run_cfg *cfg;
    CURLM *multi;
    double t0;
    dvec ttft, itl, e2e;
    run_result *res;
    size_t inflight;
    req *live; /* in-flight requests */
    /* failover window (seconds since t0), published by the failover thread */
    _Atomic double kill_at, ready_at;
} replay;
/* ---------- failover thread ---------- */

typedef struct failover {
    replay *rp;
    pthread_t th;
    atomic_bool stop;
} failover;

double rr_now_s(void);
void rr_sleep_s(double s);
int dvec_push(dvec *d, double x);
void dvec_sort(dvec *d);
void *rr_failover_main(void *arg);
bool rr_digests_agree(const char *dir, double timeout_s, char *why, size_t whycap);

#endif
