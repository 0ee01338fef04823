/* raftbench_sim.c: the workload and the simulations of `kvr-bench raft` that need no cluster:
 * the request stream (raftbench_make_route), the same stream applied to one local FSM, and the
 * best-effort broadcast simulation. Used by the in-process variant (bench_raft.c) and the
 * process variant (raftbench_proc.c), which therefore no longer call each other. */
#include "raftbench.h"

#include "kvr_log.h"

#include <stdlib.h>
#include <string.h>
#include <stdio.h>

#define NODES 3

static uint64_t mix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

kvr_cmd raftbench_make_route(uint64_t i, uint64_t seed, uint32_t n_workers,
                             kvr_route_candidate cand[4], const char *model, const char *ns)
{
    kvr_cmd c = {.type = KVR_CMD_ROUTE};
    uint64_t h = mix(i ^ seed);
    memcpy(c.u.route.request_id, &i, 8);
    memcpy(c.u.route.request_id + 8, &seed, 8);
    c.u.route.frontend_id = 1 + (h & 3);
    c.u.route.now_ms = i;
    c.u.route.request_blocks = 8 + (uint32_t)((h >> 8) % 25);
    c.u.route.model = kvr_slice_of(model);
    c.u.route.ns = kvr_slice_of(ns);
    uint32_t nc = 1 + (uint32_t)((h >> 16) % 4);
    for (uint32_t k = 0; k < nc; k++)
        cand[k] = (kvr_route_candidate){1 + mix(h + k) % n_workers,
                                        (uint32_t)(mix(h ^ k) % c.u.route.request_blocks)};
    c.u.route.candidates = cand;
    c.u.route.n_candidates = nc;
    return c;
}

/* --- local FSM: the same commands, encoded, applied to one replica --- */
double raftbench_local_rate(uint64_t n, uint64_t seed, uint32_t n_workers, const char *model,
                            const char *ns)
{
    kvr_fsm *f = kvr_fsm_new(NULL);
    char url[64];
    kvr_fsm_result r;
    for (uint32_t w = 1; w <= n_workers; w++) {
        snprintf(url, sizeof url, "http://127.0.0.1:%u", 9000 + w);
        kvr_cmd c = {.type = KVR_CMD_WORKER_UP};
        c.u.worker = (kvr_worker_info){
            w, kvr_slice_of(ns), kvr_slice_of(model), kvr_slice_of(url), KVR_ROLE_BOTH, 64, 16384};
        kvr_fsm_apply(f, &c, &r);
    }
    kvr_buf b;
    kvr_buf_init(&b);
    int64_t t0 = kvr_mono_ns();
    for (uint64_t i = 0; i < n; i++) {
        kvr_route_candidate cand[4];
        kvr_cmd c = raftbench_make_route(i, seed, n_workers, cand, model, ns);
        b.len = 0;
        kvr_cmd_encode(&c, &b, NULL);
        kvr_fsm_apply_bytes(f, b.base, b.len, &r);
        kvr_cmd fr = {.type = KVR_CMD_FREE};
        memcpy(fr.u.request_id, c.u.route.request_id, 16);
        b.len = 0;
        kvr_cmd_encode(&fr, &b, NULL);
        kvr_fsm_apply_bytes(f, b.base, b.len, &r);
    }
    double secs = (double)(kvr_mono_ns() - t0) / 1e9;
    kvr_buf_free(&b);
    kvr_fsm_free(f);
    return (double)n / secs;
}

/* --- best-effort broadcast simulation (simulated time, no sockets) ---
 * 3 routers, each deciding on its own FSM copy; each booking (and each free) reaches the
 * other routers bcast_delay_ms later. A decision is counted when the deciding router's view of
 * the chosen worker's load is below the true load at that instant (bookings by other routers
 * on it not yet received) — the double booking Raft's single decision point prevents. */
typedef struct ev {
    int64_t t_us;
    int router;      /* origin */
    uint64_t idx;    /* request */
    uint64_t worker; /* booked worker */
    bool is_free;
} ev;

double raftbench_best_effort_sim(uint64_t n, uint64_t seed, uint32_t n_workers, double rate_per_s,
                                 double delay_ms, double hold_ms, const char *model, const char *ns,
                                 uint64_t *stale_out)
{
    kvr_fsm *view[NODES], *truth = kvr_fsm_new(NULL);
    char url[64];
    kvr_fsm_result r;
    for (int k = 0; k < NODES; k++)
        view[k] = kvr_fsm_new(NULL);
    for (uint32_t w = 1; w <= n_workers; w++) {
        snprintf(url, sizeof url, "http://127.0.0.1:%u", 9000 + w);
        kvr_cmd c = {.type = KVR_CMD_WORKER_UP};
        c.u.worker = (kvr_worker_info){
            w, kvr_slice_of(ns), kvr_slice_of(model), kvr_slice_of(url), KVR_ROLE_BOTH, 64, 16384};
        kvr_fsm_apply(truth, &c, &r);
        for (int k = 0; k < NODES; k++)
            kvr_fsm_apply(view[k], &c, &r);
    }
    /* deliveries and frees are FIFO (constant delay / hold): one ring each */
    size_t cap = (size_t)n * 2 + 16;
    ev *deliv = calloc(cap, sizeof *deliv), *frees = calloc(n + 1, sizeof *frees);
    size_t dh = 0, dt = 0, fh = 0, ft = 0;
    uint64_t stale = 0;
    int64_t gap_us = (int64_t)(1e6 / rate_per_s), delay_us = (int64_t)(delay_ms * 1000),
            hold_us = (int64_t)(hold_ms * 1000);
    for (uint64_t i = 0; i < n; i++) {
        int64_t now = (int64_t)i * gap_us;
        /* process everything due before now, in time order */
        for (;;) {
            bool d_due = dh < dt && deliv[dh].t_us <= now, f_due = fh < ft && frees[fh].t_us <= now;
            if (!d_due && !f_due)
                break;
            ev e;
            if (d_due && (!f_due || deliv[dh].t_us <= frees[fh].t_us)) {
                e = deliv[dh++];
                for (int k = 0; k < NODES; k++) {
                    if (k == e.router)
                        continue;
                    kvr_cmd c;
                    kvr_route_candidate cand[4];
                    if (e.is_free) {
                        c = (kvr_cmd){.type = KVR_CMD_FREE};
                        memcpy(c.u.request_id, &e.idx, 8);
                        memcpy(c.u.request_id + 8, &seed, 8);
                    } else {
                        c = raftbench_make_route(e.idx, seed, n_workers, cand, model, ns);
                        c.u.route.pin_worker = e.worker;
                    }
                    kvr_fsm_apply(view[k], &c, &r);
                }
            } else {
                e = frees[fh++];
                kvr_cmd c = {.type = KVR_CMD_FREE};
                memcpy(c.u.request_id, &e.idx, 8);
                memcpy(c.u.request_id + 8, &seed, 8);
                kvr_fsm_apply(view[e.router], &c, &r);
                kvr_fsm_apply(truth, &c, &r);
                deliv[dt++] = (ev){e.t_us + delay_us, e.router, e.idx, e.worker, true};
            }
        }
        int k = (int)(i % NODES);
        kvr_route_candidate cand[4];
        kvr_cmd c = raftbench_make_route(i, seed, n_workers, cand, model, ns);
        kvr_fsm_apply(view[k], &c, &r);
        if (r.outcome != KVR_OUT_OK)
            continue;
        kvr_fsm_worker_view vv, tv;
        kvr_fsm_worker_get(view[k], r.worker_id, &vv);
        kvr_fsm_worker_get(truth, r.worker_id, &tv);
        /* The view already includes this booking, the truth does not yet. A view lower than the
         * truth means bookings by other routers on this worker were not yet seen: the router
         * piled onto a slot someone else had just taken. (Unseen frees make the view higher,
         * which only costs balance, and are not counted.) */
        if (vv.active_blocks < tv.active_blocks + r.request_blocks)
            stale++;
        c.u.route.pin_worker = r.worker_id;
        kvr_fsm_apply(truth, &c, &r);
        deliv[dt++] = (ev){now + delay_us, k, i, r.worker_id, false};
        frees[ft++] = (ev){now + hold_us, k, i, r.worker_id, true};
    }
    free(deliv);
    free(frees);
    for (int k = 0; k < NODES; k++)
        kvr_fsm_free(view[k]);
    kvr_fsm_free(truth);
    *stale_out = stale;
    return (double)stale / (double)n;
}

double raftbench_best_effort_rate(uint64_t n, uint64_t seed, uint32_t n_workers, double rate_per_s,
                                  double delay_ms, double hold_ms, uint64_t *stale_out)
{
    return raftbench_best_effort_sim(n, seed, n_workers, rate_per_s, delay_ms, hold_ms, "m", "ns",
                                     stale_out);
}
