/* run_cluster: a local kvroute cluster as recorded in D/cluster.json (written by kvrctl), plus
 * the process and HTTP helpers that both kvrctl (tools/) and `kvr-bench run` (failover, metric
 * scrapes) need.
 *
 * cluster.json (DESIGN section 10, with extra fields so a process can be found and re-run):
 *   {"dir":…, "namespace":…, "model":…,
 *    "processes":[{"role":"nats"|"router"|"worker"|"frontend"|"haproxy", "id":N, "pid":P,
 *                  "start_time":T, "url":"http://127.0.0.1:…", "ports":{"http":…,"raft":…},
 *                  "log":"D/logs/<role>-<id>.log", "data_dir":…, "argv":[…]}…]}
 * `start_time` is the process start time from /proc/<pid>/stat (clock ticks since boot): a pid
 * is only taken as "ours" when it still matches, so a recycled pid is never signalled.
 *
 * Memory: a run_cluster owns everything it points to; run_cluster_free releases it.
 * Threads: no internal locking; use one object from one thread at a time. The HTTP helpers
 * are blocking (libcurl easy) and may be called from any thread (curl_global_init must have
 * run first: run_http_global_init does it once). */
#ifndef RUN_CLUSTER_H
#define RUN_CLUSTER_H

#include <stdbool.h>
#include <stdint.h>

#include "kvr_buf.h"
#include "kvr_err.h"

#define RUN_MAX_ARGS 64
#define RUN_PATH_MAX 512

typedef struct run_proc {
    char role[16];
    int id;
    int pid;
    long long start_time;
    char url[128];
    int port;      /* main port: HTTP (router, worker, frontend, haproxy) or client (nats) */
    int raft_port; /* routers only (raft port + 1 is the forwarding port); else 0 */
    char log[RUN_PATH_MAX];
    char data_dir[RUN_PATH_MAX];
    int argc;
    char *argv[RUN_MAX_ARGS + 1]; /* heap strings, NULL-terminated; argv[0] is a full path */
} run_proc;

typedef struct run_cluster {
    char dir[RUN_PATH_MAX];
    char ns[64];
    char model[64];
    run_proc *procs;
    int n, cap;
} run_cluster;

void run_cluster_init(run_cluster *c, const char *dir);
void run_cluster_free(run_cluster *c);
/* Appends a zeroed process (returned; valid until the next add). NULL when out of memory. */
run_proc *run_cluster_add(run_cluster *c);
int run_proc_set_argv(run_proc *p, char *const *argv, int argc, kvr_err *err);
run_proc *run_cluster_find(run_cluster *c, const char *role, int id);
int run_cluster_count(const run_cluster *c, const char *role);

/* Reads / writes D/cluster.json (write: temp file + rename). */
int run_cluster_load(run_cluster *c, const char *dir, kvr_err *err);
int run_cluster_save(const run_cluster *c, kvr_err *err);

/* Process start time (field 22 of /proc/<pid>/stat); 0 when the pid does not exist. */
long long run_pid_start_time(int pid);
/* True when the recorded pid is running (not a zombie) and is still the process we started. */
bool run_proc_alive(const run_proc *p);

/* Starts p->argv in a new session (setsid) with stdin from /dev/null and stdout/stderr
 * appended to p->log; fills p->pid and p->start_time. Only async-signal-safe calls run between
 * fork and exec, so this is safe from a multi-threaded process. The child is not reaped by
 * anyone but its parent: a caller that stays alive should reap it with run_reap(). */
int run_proc_spawn(run_proc *p, kvr_err *err);
/* Reaps any exited children of this process (non-blocking). */
void run_reap(void);
/* Sends sig to the process group of p (each process leads its own), only if run_proc_alive. */
int run_proc_signal(const run_proc *p, int sig);
/* SIGTERM, wait up to timeout_ms, then SIGKILL and wait up to 2 s more. Returns 0 when gone. */
int run_proc_stop(const run_proc *p, int timeout_ms);

/* HTTP GET with a total timeout. *status is 0 when no response arrived (connect error,
 * timeout). body may be NULL. Returns 0 when a response arrived, else KVR_EIO. */
void run_http_global_init(void);
int run_http_get(const char *url, long timeout_ms, long *status, kvr_buf *body);
/* HTTP POST of body (JSON, may be NULL: empty) with "Authorization: Bearer <token>" when
 * token is not NULL; otherwise as run_http_get. */
int run_http_post(const char *url, const char *token, const char *body, long timeout_ms,
                  long *status, kvr_buf *resp);
/* Convenience: GET base_url + path, true when it answered 200. */
bool run_http_ok(const char *base_url, const char *path, long timeout_ms);

/* A router's GET /v1/state, reduced to what tools need. */
typedef struct run_router_state {
    char role[16];   /* "leader", "follower", "candidate", … as the router says */
    long long leader; /* raft leader id, 0 when unknown */
    char digest[32]; /* index digest as printed by the router (raw JSON token) */
    long long blocks;
    long long applied_index;
    int workers_up;  /* entries of "workers" with "up": true */
} run_router_state;
int run_router_get_state(const run_proc *p, long timeout_ms, run_router_state *st, kvr_err *err);

/* Picks a live router: which = "leader", "follower" or a decimal id. For "leader" the router
 * that reports itself leader (or, failing that, the leader most routers name). Returns the
 * index in c->procs or a negative KVR_E* code with err filled. */
int run_cluster_pick_router(run_cluster *c, const char *which, kvr_err *err);

/* Last `lines` lines of a file into out (NUL-terminated, truncated to cap). */
void run_tail_file(const char *path, int lines, char *out, size_t cap);

/* Prometheus text: sum of every sample of metric `name` (with or without labels). Returns 0
 * and *out, or KVR_ENOTFOUND. */
int run_prom_sum(const char *text, size_t len, const char *name, double *out);

/* Runs the kvrctl binary that sits next to the running executable with args (NULL-terminated,
 * at most RUN_MAX_ARGS) and waits for it; kvrctl's stdout goes to our stderr so that our
 * stdout stays a report. With own_pgroup, kvrctl runs in its own process group with default
 * signal handling, so a terminal Ctrl-C reaches only the caller, which then tears down with
 * `kvrctl down` itself. `who` prefixes error messages. Returns kvrctl's exit status, 127 if it
 * could not be executed, 128 if it did not exit normally, -1 if fork failed. */
int run_kvrctl(const char *who, char *const *args, bool own_pgroup);

#endif
