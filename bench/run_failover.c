/* run_failover.c: the failover scenario of run_replay (run_replay.h): a thread that kills a
 * router (the leader, or a given one) at --kill-at and restarts it --restart-after later, and the
 * check that every router's FSM digest agrees at the end. */
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

static bool wait_until(failover *f, double t_rel)
{
    while (!atomic_load(&f->stop)) {
        double left = f->rp->t0 + t_rel - rr_now_s();
        if (left <= 0)
            return true;
        rr_sleep_s(left > 0.05 ? 0.05 : left);
    }
    return false;
}

void *rr_failover_main(void *arg)
{
    failover *f = arg;
    replay *rp = f->rp;
    const run_cfg *cfg = rp->cfg;
    run_result *res = rp->res;
    kvr_err err = {0};
    run_cluster c;
    if (!wait_until(f, cfg->kill_at_s))
        return NULL;
    if (run_cluster_load(&c, cfg->cluster_dir, &err) != 0) {
        snprintf(res->failover_error, sizeof res->failover_error, "%s", err.msg);
        return NULL;
    }
    int idx = run_cluster_pick_router(&c, cfg->kill_role, &err);
    if (idx < 0) {
        snprintf(res->failover_error, sizeof res->failover_error, "choosing a router: %s", err.msg);
        run_cluster_free(&c);
        return NULL;
    }
    run_proc *p = &c.procs[idx];
    res->killed_router = p->id;
    snprintf(res->killed_role, sizeof res->killed_role, "%s", cfg->kill_role);
    atomic_store(&rp->kill_at, rr_now_s() - rp->t0);
    res->killed_at_s = atomic_load(&rp->kill_at);
    run_proc_signal(p, SIGKILL);
    for (int i = 0; i < 100 && run_proc_alive(p); i++)
        rr_sleep_s(0.01);
    fprintf(stderr, "\nfailover: SIGKILL router-%d (%s) at %.1f s\n", p->id, cfg->kill_role,
            res->killed_at_s);
    if (!wait_until(f, res->killed_at_s + cfg->restart_after_s)) {
        run_cluster_free(&c);
        return NULL;
    }
    double t_restart = rr_now_s();
    res->restarted_at_s = t_restart - rp->t0;
    if (run_proc_spawn(p, &err) != 0 || run_cluster_save(&c, &err) != 0) {
        snprintf(res->failover_error, sizeof res->failover_error, "restarting router-%d: %s", p->id,
                 err.msg);
        run_cluster_free(&c);
        return NULL;
    }
    fprintf(stderr, "\nfailover: restarted router-%d (pid %d) at %.1f s\n", p->id, p->pid,
            res->restarted_at_s);
    while (!atomic_load(&f->stop) && rr_now_s() - t_restart < 120) {
        if (run_http_ok(p->url, "/ready", 500)) {
            res->ready_after_restart_ms = (rr_now_s() - t_restart) * 1000.0;
            atomic_store(&rp->ready_at, rr_now_s() - rp->t0);
            fprintf(stderr, "\nfailover: router-%d ready %.0f ms after restart\n", p->id,
                    res->ready_after_restart_ms);
            break;
        }
        if (!run_proc_alive(p)) {
            snprintf(res->failover_error, sizeof res->failover_error,
                     "router-%d exited after restart (see %s)", p->id, p->log);
            break;
        }
        rr_sleep_s(0.02);
    }
    run_cluster_free(&c);
    return NULL;
}

/* Polls every live router's index digest until all agree (bounded). */
bool rr_digests_agree(const char *dir, double timeout_s, char *why, size_t whycap)
{
    double end = rr_now_s() + timeout_s;
    for (;;) {
        run_cluster c;
        bool equal = true;
        int n = 0;
        char first[32] = "";
        why[0] = 0;
        if (run_cluster_load(&c, dir, NULL) != 0) {
            snprintf(why, whycap, "cannot read %s/cluster.json", dir);
            return false;
        }
        for (int i = 0; i < c.n; i++) {
            run_proc *p = &c.procs[i];
            if (strcmp(p->role, "router") != 0)
                continue;
            run_router_state st;
            if (!run_proc_alive(p) || run_router_get_state(p, 1000, &st, NULL) != 0 ||
                !st.digest[0]) {
                equal = false;
                snprintf(why, whycap, "router-%d: no state", p->id);
                continue;
            }
            if (n++ == 0)
                snprintf(first, sizeof first, "%s", st.digest);
            else if (strcmp(first, st.digest) != 0) {
                equal = false;
                snprintf(why, whycap, "router-%d digest %s != %s", p->id, st.digest, first);
            }
        }
        run_cluster_free(&c);
        if (equal && n > 0)
            return true;
        if (rr_now_s() > end)
            return false;
        rr_sleep_s(0.25);
    }
}
