/* raftbench_int.h: private to bench/raftbench_*.c, the process variant of `kvr-bench raft`:
 * its options, one router's metrics and state as scraped (raftbench_scrape.c), the NATS load
 * generator (raftbench_load.c) and one phase's results (raftbench_proc.c runs the phases).
 *
 * Threads: one (the bench's); rb_stop is set from the signal handler. */
#ifndef RAFTBENCH_INT_H
#define RAFTBENCH_INT_H

#include "bench_util.h"
#include "kvr_buf.h"
#include "kvr_nats.h"
#include "route_msg.h"

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

/* Set by SIGINT/SIGTERM: every wait and the load stop early. */
extern volatile sig_atomic_t rb_stop;

#define RB_MAX_ROUTERS 9
#define RB_TEMPLATES 256
#define RB_NBUCKETS 32

typedef struct rb_opts {
    int routers, workers, inflight, duration_s, blocks, timeout_ms;
    int free_after_ms;     /* 0: free each booking as soon as it is answered */
    uint64_t max_requests; /* 0: only the duration limits */
    const char *json, *dir, *router_args;
    bool skip_local, skip_best_effort, keep;
    bool any_router; /* --any-router: kvr.route only (followers forward), not the leader first */
    double be_delay_ms, be_hold_ms, be_rate;
} rb_opts;

/* --- one router's /metrics, reduced --- */
typedef struct rb_prom {
    bool ok;
    double raft, local;        /* kvr_routerd_route_decisions_total{mode} */
    double errors;             /* kvr_routerd_route_errors_total (all reasons) */
    double lat_sum, lat_count; /* kvr_routerd_route_latency_seconds_{sum,count} */
    int nb;                    /* histogram buckets (cumulative, le bounds) */
    double le[RB_NBUCKETS], cum[RB_NBUCKETS];
} rb_prom;

/* --- a router's /v1/state, reduced --- */
typedef struct rb_state {
    char role[16];
    char fsm_digest[24];
    uint64_t leader, bookings, applied;
    int workers_up;
    bool degraded;
} rb_state;

/* --- the load: K route requests in flight over NATS --- */
typedef struct rb_run {
    /* config */
    const rb_opts *o;
    const char *nats_url, *model, *ns;
    uint64_t tag;
    /* loop */
    uv_loop_t loop;
    kvr_nats nats;
    uv_timer_t stop_timer, poll_timer;
    bool conn_up, nats_closed, stopping;
    int inflight;
    kvr_route_target target; /* as the frontends: kvr.route.leader first */
    uint64_t leader_fallbacks; /* no responders on kvr.route.leader: asked kvr.route */
    /* payloads */
    kvr_buf tpl[RB_TEMPLATES];
    size_t rid_off[RB_TEMPLATES];
    uint64_t rng, next_id;
    /* results */
    uint64_t sent, ok, mode_raft, mode_local, mode_other, failed, timeouts, no_responders, closed,
        frees, free_errors;
    uint64_t by_router[RB_MAX_ROUTERS + 1], by_router_other;
    char first_error[160];
    int64_t *lat_us;
    size_t n_lat, cap_lat;
    int64_t t0_ns, t_end_ns;
    /* best-effort phase: every local-mode decision with the chosen worker's bookings as the
     * deciding router saw them, its time, and when this client freed it */
    bool record_be;
    struct be_rec {
        uint64_t worker;
        int64_t decided_ns, free_ns;
        uint32_t seen; /* bookings on the worker the router knew of, this one excluded */
    } * be;
    size_t n_be, cap_be;
    /* --free-after-ms: frees waiting for their time, oldest first (all wait equally long) */
    uv_timer_t free_timer;
    struct held_free {
        uint8_t rid[16];
        int64_t due_ns;
        size_t be_idx; /* its record in be, or SIZE_MAX */
    } * held;
    size_t held_head, n_held, cap_held;
} rb_run;

typedef struct rb_req {
    rb_run *r;
    int64_t t0_ns;
    uint8_t rid[16];
    size_t tpl;          /* its request template */
    const char *subject; /* where it went (route_msg.h kvr_route_target) */
} rb_req;

/* --- one phase: cluster up, load, metrics, digests, down --- */
typedef struct rb_phase {
    const char *name; /* "raft" | "local" */
    bool ran;         /* the load ran */
    char error[300];
    int routers;
    double secs, decisions_per_s;
    uint64_t decisions; /* answers in the phase's own mode */
    int64_t p50, p90, p99, max;
    double mean_us;
    double r_p50_us, r_p99_us, r_mean_us; /* router-side, all routers' histograms */
    struct {
        int id;
        char role[16];
        double raft, local, errors;
        uint64_t client_answers;
        double p50_us, p99_us, mean_us;
        double cpu_s; /* CPU seconds used during the load */
    } per[RB_MAX_ROUTERS];
    double cpu_nats_s, cpu_workers_s, cpu_client_s, load_before, load_after;
    uint64_t log_entries; /* Raft log entries applied during the load (router 1's applied_index) */
    bool spread_ok, digests_equal, down_ok;
    char digest[24];
    uint64_t bookings_left;
    bool raft, best_effort;          /* kind: Raft group, or local mode (+ booking broadcast) */
    uint64_t be_decisions, be_stale; /* best-effort: decisions, and those made on stale load */
    rb_run run;
} rb_phase;

int rb_prom_scrape(const char *url, rb_prom *m);
int rb_state_get(const char *url, rb_state *s);
double rb_loadavg1(void);
int rb_cmp_i64(const void *a, const void *b);
int64_t rb_pct(const int64_t *v, size_t n, double p);
int rb_load(rb_run *r);
size_t rb_lower(const int64_t *v, size_t n, int64_t x, bool strict);
void rb_be_analyse(rb_phase *ph);

#endif
