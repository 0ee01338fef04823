/* kvrctl status | kill | transfer | restart | down: act on a running cluster found through
 * D/cluster.json (kvrctl.h). */
#define _GNU_SOURCE
/* Paths are bounded up front (cluster dir <= 300 bytes); snprintf truncation is the intended
 * behaviour for anything else. */
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvr_nats.h"
#include "kvr_nats_flags.h"
#include "run_cluster.h"

#include "kvrctl.h"

/* ---------- status / kill / restart / down ---------- */

static int load_or_die(run_cluster *c, const char *dir)
{
    kvr_err err = {0};
    if (run_cluster_load(c, dir, &err) != 0) {
        fprintf(stderr, "kvrctl: %s\n", err.msg);
        return 1;
    }
    return 0;
}

int cmd_status(const char *dir, bool json)
{
    run_cluster c;
    if (load_or_die(&c, dir))
        return 1;
    if (!json)
        printf("%-8s %3s %8s %-5s %-5s %-9s %-6s %-20s %s\n", "ROLE", "ID", "PID", "ALIVE", "READY",
               "RAFT", "LEADER", "DIGEST", "URL");
    else
        printf("{\"processes\":[");
    int alive_n = 0;
    for (int i = 0; i < c.n; i++) {
        run_proc *p = &c.procs[i];
        bool alive = run_proc_alive(p);
        bool ready = alive && proc_ready(p);
        run_router_state st = {0};
        bool have_st = false;
        if (alive && strcmp(p->role, "router") == 0)
            have_st = run_router_get_state(p, 1000, &st, NULL) == 0;
        alive_n += alive;
        char leader[24] = "-";
        if (have_st && st.leader)
            snprintf(leader, sizeof leader, "%lld", st.leader);
        if (!json) {
            printf("%-8s %3d %8d %-5s %-5s %-9s %-6s %-20s %s\n", p->role, p->id, p->pid,
                   alive ? "yes" : "no", ready ? "yes" : "no", have_st && st.role[0] ? st.role : "-",
                   leader, have_st && st.digest[0] ? st.digest : "-", p->url);
        } else {
            printf("%s{\"role\":\"%s\",\"id\":%d,\"pid\":%d,\"alive\":%s,\"ready\":%s", i ? "," : "",
                   p->role, p->id, p->pid, alive ? "true" : "false", ready ? "true" : "false");
            if (have_st)
                printf(",\"raft_role\":\"%s\",\"leader\":%lld,\"digest\":\"%s\"", st.role, st.leader,
                       st.digest);
            printf(",\"url\":\"%s\"}", p->url);
        }
    }
    if (json)
        printf("]}\n");
    run_cluster_free(&c);
    return 0;
}

int cmd_kill(const char *dir, const char *role, const char *which)
{
    run_cluster c;
    kvr_err err = {0};
    if (load_or_die(&c, dir))
        return 1;
    int idx;
    if (strcmp(role, "router") == 0) {
        idx = run_cluster_pick_router(&c, which, &err);
    } else {
        char *end;
        long id = strtol(which, &end, 10);
        run_proc *p = (*which && !*end) ? run_cluster_find(&c, role, (int)id) : NULL;
        idx = p ? (int)(p - c.procs) : kvr_err_set(&err, KVR_ENOTFOUND, "no %s '%s' in %s/cluster.json", role, which, dir);
    }
    if (idx < 0) {
        fprintf(stderr, "kvrctl kill: %s\n", err.msg);
        run_cluster_free(&c);
        return 1;
    }
    run_proc *p = &c.procs[idx];
    if (!run_proc_alive(p)) {
        fprintf(stderr, "kvrctl kill: %s-%d (pid %d) is not running\n", p->role, p->id, p->pid);
        run_cluster_free(&c);
        return 1;
    }
    run_proc_signal(p, SIGKILL);
    for (int i = 0; i < 100 && run_proc_alive(p); i++)
        sleep_ms(20);
    printf("%d\n", p->id);
    fprintf(stderr, "killed %s-%d (pid %d) with SIGKILL\n", p->role, p->id, p->pid);
    run_cluster_free(&c);
    return 0;
}

/* POST /admin/raft/transfer to the leader with D/admin-token: leadership to router `to`
 * (NULL: the most up-to-date voter). A transfer that timed out (a target still catching up,
 * e.g. just restarted: 500 "try again") or a leader that changed meanwhile (409) is tried
 * again until timeout_s. Prints the new leader's id. */
int cmd_transfer(const char *dir, const char *to, int timeout_s)
{
    run_cluster c;
    kvr_err err = {0};
    if (load_or_die(&c, dir))
        return 1;
    int rc = 1;
    long target = 0;
    char *end;
    char path[PATH_MAX + 16], token[256] = "";
    if (to && (!*to || (target = strtol(to, &end, 10), *end) || target < 1)) {
        fprintf(stderr, "kvrctl transfer: a router id >= 1, got '%s'\n", to);
        goto out;
    }
    snprintf(path, sizeof path, "%s/admin-token", c.dir);
    FILE *f = fopen(path, "r");
    if (!f || !fgets(token, sizeof token, f)) {
        fprintf(stderr, "kvrctl transfer: cannot read %s\n", path);
        if (f)
            fclose(f);
        goto out;
    }
    fclose(f);
    token[strcspn(token, "\r\n")] = 0;
    long long deadline = mono_ms() + (long long)timeout_s * 1000;
    for (int attempt = 1;; attempt++) {
        int idx = run_cluster_pick_router(&c, "leader", &err);
        if (idx < 0 && mono_ms() < deadline) { /* an election in progress */
            sleep_ms(200);
            continue;
        }
        if (idx < 0) {
            fprintf(stderr, "kvrctl transfer: %s\n", err.msg);
            goto out;
        }
        const run_proc *lp = &c.procs[idx];
        if (target == lp->id) {
            printf("%d\n", lp->id);
            fprintf(stderr, "router-%d leads\n", lp->id);
            rc = 0;
            goto out;
        }
        char url[320], body[48];
        snprintf(url, sizeof url, "%s/admin/raft/transfer", lp->url);
        snprintf(body, sizeof body, "{\"id\":%ld}", target);
        kvr_buf resp;
        kvr_buf_init(&resp);
        long st = 0;
        int hr = run_http_post(url, token, body, 10000, &st, &resp);
        bool again =
            hr == 0 &&
            (st == 409 || (st == 500 && resp.base && memmem(resp.base, resp.len, "try again", 9)));
        if (hr != 0 || (st != 200 && (!again || mono_ms() >= deadline))) {
            fprintf(stderr, "kvrctl transfer: router-%d answered %ld: %.*s\n", lp->id, st,
                    (int)(resp.len > 300 ? 300 : resp.len), resp.base ? resp.base : "");
            kvr_buf_free(&resp);
            goto out;
        }
        kvr_buf_free(&resp);
        if (st != 200) {
            fprintf(stderr, "router-%d: transfer attempt %d not done (%ld), again\n", lp->id,
                    attempt, st);
            sleep_ms(300);
            continue;
        }
        /* it stepped down: name the winner */
        while (mono_ms() < deadline + 5000) {
            run_router_state rs;
            if (run_router_get_state(lp, 1000, &rs, &err) == 0 && rs.leader &&
                rs.leader != lp->id) {
                if (target && rs.leader != target)
                    break; /* another router won: ask again */
                printf("%lld\n", rs.leader);
                fprintf(stderr, "leadership moved from router-%d to router-%lld\n", lp->id,
                        rs.leader);
                rc = 0;
                goto out;
            }
            sleep_ms(100);
        }
        if (mono_ms() >= deadline) {
            fprintf(stderr, "kvrctl transfer: no leader as asked within %d s\n", timeout_s);
            goto out;
        }
    }
out:
    explicit_bzero(token, sizeof token);
    run_cluster_free(&c);
    return rc;
}

int cmd_restart(const char *dir, const char *role, const char *which, bool wait, int timeout_s)
{
    run_cluster c;
    kvr_err err = {0};
    if (load_or_die(&c, dir))
        return 1;
    char *end;
    long id = strtol(which, &end, 10);
    run_proc *p = (*which && !*end) ? run_cluster_find(&c, role, (int)id) : NULL;
    if (!p) {
        fprintf(stderr, "kvrctl restart: no %s '%s' in %s/cluster.json\n", role, which, dir);
        run_cluster_free(&c);
        return 1;
    }
    if (run_proc_alive(p)) {
        fprintf(stderr, "kvrctl restart: %s-%d (pid %d) is still running; kill it first\n", p->role,
                p->id, p->pid);
        run_cluster_free(&c);
        return 1;
    }
    long long t0 = mono_ms();
    int rc = run_proc_spawn(p, &err);
    if (rc == 0)
        rc = run_cluster_save(&c, &err);
    if (rc == 0 && wait)
        rc = wait_ready(&c, (int)(p - c.procs), (int)(p - c.procs) + 1, timeout_s, &err);
    if (rc != 0) {
        fprintf(stderr, "kvrctl restart: %s\n", err.msg);
        print_fail_tail();
        run_cluster_free(&c);
        return 1;
    }
    printf("restarted %s-%d pid %d%s", p->role, p->id, p->pid, wait ? "" : "\n");
    if (wait)
        printf(", ready after %lld ms\n", mono_ms() - t0);
    run_cluster_free(&c);
    return 0;
}

/* --scale-to-zero: the workers the routers' scaler started (a pid file each under D/scaler, see
 * scripts/kvr-local-scaler) are not in cluster.json: SIGTERM, then SIGKILL after 5 s. */
static void stop_scaled_workers(const char *dir)
{
    char pattern[PATH_MAX + 32];
    snprintf(pattern, sizeof pattern, "%s/scaler/pool-*/*.pid", dir);
    glob_t g;
    if (glob(pattern, 0, NULL, &g) != 0)
        return;
    pid_t pids[256];
    size_t n = 0;
    for (size_t i = 0; i < g.gl_pathc && n < 256; i++) {
        FILE *f = fopen(g.gl_pathv[i], "r");
        long pid = 0;
        if (f && fscanf(f, "%ld", &pid) == 1 && pid > 1 && kill((pid_t)pid, SIGTERM) == 0)
            pids[n++] = (pid_t)pid;
        if (f)
            fclose(f);
        unlink(g.gl_pathv[i]);
    }
    globfree(&g);
    for (int t = 0; t < 100; t++) {
        size_t alive = 0;
        for (size_t i = 0; i < n; i++)
            alive += kill(pids[i], 0) == 0;
        if (alive == 0)
            return;
        sleep_ms(50);
    }
    for (size_t i = 0; i < n; i++)
        kill(pids[i], SIGKILL);
}

int cmd_down(const char *dir, int timeout_s)
{
    run_cluster c;
    if (load_or_die(&c, dir))
        return 1;
    /* Clients first, NATS last, so nothing logs a storm of reconnects. */
    static const char *order[] = {"haproxy", "frontend", "bridge", "worker", "router", "nats"};
    stop_scaled_workers(dir);
    for (size_t r = 0; r < sizeof order / sizeof order[0]; r++)
        for (int i = 0; i < c.n; i++)
            if (strcmp(c.procs[i].role, order[r]) == 0 && run_proc_alive(&c.procs[i]))
                run_proc_signal(&c.procs[i], SIGTERM);
    long long deadline = mono_ms() + (long long)timeout_s * 1000;
    for (;;) {
        int left = 0;
        for (int i = 0; i < c.n; i++)
            left += run_proc_alive(&c.procs[i]);
        if (left == 0 || mono_ms() > deadline)
            break;
        sleep_ms(50);
    }
    int killed = 0;
    for (int i = 0; i < c.n; i++) {
        if (run_proc_alive(&c.procs[i])) {
            fprintf(stderr, "kvrctl down: %s-%d (pid %d) ignored SIGTERM for %d s; SIGKILL\n",
                    c.procs[i].role, c.procs[i].id, c.procs[i].pid, timeout_s);
            run_proc_signal(&c.procs[i], SIGKILL);
            killed++;
        }
    }
    int left = 0;
    for (int wait = 0; wait < 60; wait++) {
        left = 0;
        for (int i = 0; i < c.n; i++)
            left += run_proc_alive(&c.procs[i]);
        if (left == 0)
            break;
        sleep_ms(50);
    }
    for (int i = 0; i < c.n; i++)
        if (run_proc_alive(&c.procs[i]))
            fprintf(stderr, "kvrctl down: %s-%d (pid %d) is STILL running\n", c.procs[i].role,
                    c.procs[i].id, c.procs[i].pid);
    printf("down: %d process(es) stopped%s%s\n", c.n - left, killed ? " (some with SIGKILL)" : "",
           left ? ", SOME STILL RUNNING" : ", nothing left running");
    run_cluster_free(&c);
    return left ? 1 : 0;
}
