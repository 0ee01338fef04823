/* kvrctl up: start a local cluster (kvrctl.h). Every process runs in its own session (setsid)
 * with its log in D/logs/<role>-<id>.log; D/cluster.json records how to find and re-run it. */
#define _GNU_SOURCE
/* Paths are bounded up front (cluster dir <= 300 bytes); snprintf truncation is the intended
 * behaviour for anything else. */
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
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

/* ---------- ports ---------- */

typedef struct port_alloc {
    int base;     /* 0: let the OS choose */
    int next;
    int held[256]; /* sockets kept bound until every port is chosen, so none repeats */
    int nheld;
} port_alloc;

static int bind_port(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* One port, or two consecutive ones (raft port + forwarding port) when pair.
 * With --base-port: laid out from it, unchecked. Otherwise the search starts at a base derived
 * from the cluster dir (so clusters in different dirs start apart) and skips any port that is
 * taken. Ports stay below the ephemeral range (32768+): a restarted process must be able to
 * bind its port again, and an ephemeral port may meanwhile be some outgoing connection's. */
static int alloc_port(port_alloc *pa, bool pair, kvr_err *err)
{
    if (pa->base) {
        int p = pa->next;
        pa->next += pair ? 2 : 1;
        if (pa->next > 65535)
            return kvr_err_set(err, KVR_ELIMIT, "--base-port %d leaves too few ports", pa->base);
        return p;
    }
    for (int p = pa->next; p + 1 < 32768; p++) {
        if (pa->nheld + 2 > (int)(sizeof pa->held / sizeof pa->held[0]))
            return kvr_err_set(err, KVR_ELIMIT, "too many ports");
        int fd = bind_port(p);
        if (fd < 0)
            continue;
        if (!pair) {
            pa->held[pa->nheld++] = fd;
            pa->next = p + 1;
            return p;
        }
        int fd2 = bind_port(p + 1);
        if (fd2 >= 0) {
            pa->held[pa->nheld++] = fd;
            pa->held[pa->nheld++] = fd2;
            pa->next = p + 2;
            return p;
        }
        close(fd);
    }
    return kvr_err_set(err, KVR_EIO, "no free port between %d and 32767", pa->next);
}

/* FNV-1a of the cluster dir -> a start port in [10000, 30000). */
static int derived_base(const char *dir)
{
    uint32_t h = 2166136261u;
    for (const unsigned char *c = (const unsigned char *)dir; *c; c++)
        h = (h ^ *c) * 16777619u;
    return 10000 + (int)(h % 20000u);
}

static void release_ports(port_alloc *pa)
{
    for (int i = 0; i < pa->nheld; i++)
        close(pa->held[i]);
    pa->nheld = 0;
}

/* Appends the --nats-* flags given to kvrctl (file paths, never secrets) to a child's argv. */
static int add_nats_flags(const up_opts *o, char **argv, int *argc, kvr_err *err)
{
    if (kvr_nats_flags_argv(&o->nf, argv, argc, RUN_MAX_ARGS) != 0)
        return kvr_err_set(err, KVR_ELIMIT, "too many arguments (at most %d)", RUN_MAX_ARGS);
    return 0;
}

/* Splits extra "…" arguments on whitespace (no quoting) and appends them. */
static int add_extra(char **argv, int *argc, char *extra, kvr_err *err)
{
    if (!extra)
        return 0;
    char *save = NULL;
    for (char *t = strtok_r(extra, " \t\n", &save); t; t = strtok_r(NULL, " \t\n", &save)) {
        if (*argc >= RUN_MAX_ARGS)
            return kvr_err_set(err, KVR_ELIMIT, "more than %d arguments", RUN_MAX_ARGS);
        argv[(*argc)++] = t;
    }
    return 0;
}

/* Workers announce themselves by heartbeat (1 s): routers and frontends only route to a worker
 * they have heard. "Ready" for the cluster means every router and frontend knows all of them,
 * otherwise the first requests of a benchmark fail with "no worker". */
/* fe_workers: how many of them a frontend counts live (it never routes to a prefill-only
 * worker, so it does not count one). */
static int wait_workers_known(run_cluster *c, int nworkers, int fe_workers, bool raft, int timeout_s,
                              kvr_err *err)
{
    long long deadline = mono_ms() + (long long)timeout_s * 1000;
    for (;;) {
        const run_proc *lagging = NULL;
        const char *why = "workers";
        int seen = 0;
        long long leader = 0;
        for (int i = 0; i < c->n && !lagging; i++) {
            run_proc *p = &c->procs[i];
            if (strcmp(p->role, "router") == 0) {
                run_router_state st;
                bool ok = run_router_get_state(p, 1000, &st, NULL) == 0;
                seen = ok ? st.workers_up : 0;
                if (seen < nworkers)
                    lagging = p;
                /* A router is /ready once caught up with the stream, which can be before the
                 * first election: until every router names the same leader, route answers
                 * would come back in degraded "local" mode. */
                if (!lagging && raft) {
                    if (!ok || st.leader == 0 || (leader != 0 && st.leader != leader)) {
                        lagging = p;
                        why = "raft leader";
                    }
                    leader = ok ? st.leader : 0;
                }
            } else if (strcmp(p->role, "frontend") == 0) {
                char url[256];
                kvr_buf b;
                kvr_buf_init(&b);
                long status = 0;
                double live = 0;
                snprintf(url, sizeof url, "%s/metrics", p->url);
                if (run_http_get(url, 1000, &status, &b) == 0 && status == 200 &&
                    run_prom_sum(b.base, b.len, "kvr_frontend_live_workers", &live) != 0)
                    live = fe_workers; /* a frontend without the gauge: trust /health */
                kvr_buf_free(&b);
                seen = (int)live;
                if (seen < fe_workers)
                    lagging = p;
            }
        }
        if (!lagging)
            return 0;
        if (mono_ms() > deadline) {
            if (strcmp(why, "raft leader") == 0)
                return kvr_err_set(err, KVR_ETIMEDOUT,
                                   "%s-%d (port %d) names no common raft leader after %d s",
                                   lagging->role, lagging->id, lagging->port, timeout_s);
            return kvr_err_set(err, KVR_ETIMEDOUT, "%s-%d (port %d) knows %d of %d workers after %d s",
                               lagging->role, lagging->id, lagging->port, seen, nworkers, timeout_s);
        }
        sleep_ms(100);
    }
}

static void teardown(run_cluster *c)
{
    for (int i = c->n - 1; i >= 0; i--)
        if (run_proc_alive(&c->procs[i]))
            run_proc_signal(&c->procs[i], SIGKILL);
    for (int i = c->n - 1; i >= 0; i--)
        run_proc_stop(&c->procs[i], 2000);
    run_reap();
}

static int write_text(const char *path, const char *text, kvr_err *err)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return kvr_err_set(err, KVR_EIO, "writing %s: %s", path, strerror(errno));
    fputs(text, f);
    if (fclose(f) != 0)
        return kvr_err_set(err, KVR_EIO, "writing %s: %s", path, strerror(errno));
    return 0;
}

/* D/admin-token: the routers' HTTP admin token (POST and /admin need it), kept when it
 * exists so that a restarted cluster keeps its token; mode 0600, 32 random bytes in hex. */
static int ensure_admin_token(const char *path, kvr_err *err)
{
    if (access(path, R_OK) == 0)
        return 0;
    unsigned char rnd[32];
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, rnd, sizeof rnd) : -1;
    if (fd >= 0)
        close(fd);
    if (n != (ssize_t)sizeof rnd)
        return kvr_err_set(err, KVR_EIO, "reading /dev/urandom: %s", strerror(errno));
    char hex[2 * sizeof rnd + 2];
    for (size_t i = 0; i < sizeof rnd; i++)
        snprintf(hex + 2 * i, 3, "%02x", rnd[i]);
    hex[2 * sizeof rnd] = '\n';
    hex[2 * sizeof rnd + 1] = 0;
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return kvr_err_set(err, KVR_EIO, "creating %s: %s", path, strerror(errno));
    bool ok = write(fd, hex, strlen(hex)) == (ssize_t)strlen(hex);
    if (close(fd) != 0 || !ok)
        return kvr_err_set(err, KVR_EIO, "writing %s", path);
    return 0;
}

static int mkdir_p(const char *path, kvr_err *err)
{
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
                return kvr_err_set(err, KVR_EIO, "mkdir %s: %s", tmp, strerror(errno));
            *p = '/';
        }
    }
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
        return kvr_err_set(err, KVR_EIO, "mkdir %s: %s", tmp, strerror(errno));
    return 0;
}

static run_proc *new_proc(run_cluster *c, const char *role, int id, int port, kvr_err *err)
{
    run_proc *p = run_cluster_add(c);
    if (!p) {
        kvr_err_set(err, KVR_ENOMEM, "too many processes");
        return NULL;
    }
    snprintf(p->role, sizeof p->role, "%s", role);
    p->id = id;
    p->port = port;
    snprintf(p->url, sizeof p->url, "http://127.0.0.1:%d", port);
    snprintf(p->log, sizeof p->log, "%s/logs/%s-%d.log", c->dir, role, id);
    return p;
}

static int spawn_and_record(run_cluster *c, run_proc *p, char **argv, int argc, kvr_err *err)
{
    int rc = run_proc_set_argv(p, argv, argc, err);
    if (rc == 0)
        rc = run_proc_spawn(p, err);
    if (rc != 0)
        return kvr_err_wrap(err, rc, "starting %s-%d", p->role, p->id);
    /* Record at once: if kvrctl dies now, `down` still finds everything. */
    return run_cluster_save(c, err);
}

int cmd_up(const char *dir, up_opts *o)
{
    kvr_err err = {0};
    run_cluster c;
    port_alloc pa = {.base = o->base_port, .next = o->base_port};
    int rc = 0;
    char path[PATH_MAX], abs_dir[PATH_MAX];
    char scaler_bin[PATH_MAX];
    /* disaggregated workers come after the --workers ones; from here on o->workers counts all */
    int n_both = o->workers;
    o->workers += o->prefill_workers + o->decode_workers;
    char nats_bin[PATH_MAX], router_bin[PATH_MAX], worker_bin[PATH_MAX], frontend_bin[PATH_MAX],
        haproxy_bin[PATH_MAX], bridge_bin[PATH_MAX];

    if ((rc = mkdir_p(dir, &err)) != 0)
        goto fail_early;
    if (!realpath(dir, abs_dir)) {
        rc = kvr_err_set(&err, KVR_EIO, "realpath %s: %s", dir, strerror(errno));
        goto fail_early;
    }
    if (strlen(abs_dir) > 300) {
        rc = kvr_err_set(&err, KVR_ELIMIT, "cluster dir path %s is longer than 300 bytes", abs_dir);
        goto fail_early;
    }
    {
        run_cluster old;
        if (run_cluster_load(&old, abs_dir, NULL) == 0) {
            for (int i = 0; i < old.n; i++) {
                if (run_proc_alive(&old.procs[i])) {
                    rc = kvr_err_set(&err, KVR_EEXIST,
                                     "%s/cluster.json: %s-%d (pid %d) is still running; run "
                                     "`kvrctl down --dir %s` first",
                                     abs_dir, old.procs[i].role, old.procs[i].id, old.procs[i].pid,
                                     dir);
                    run_cluster_free(&old);
                    goto fail_early;
                }
            }
            run_cluster_free(&old);
        }
    }
    /* Checks the credential flags now (files readable, one method): a mistake fails here,
     * not as N processes that never connect. */
    if ((rc = kvr_nats_flags_load(&o->nf, &err)) != 0)
        goto fail_early;
    if ((!o->nats_url &&
         (rc = find_binary("nats-server", false, nats_bin, sizeof nats_bin, &err)) != 0) ||
        (o->routers > 0 &&
         (rc = find_binary("kvr-routerd", true, router_bin, sizeof router_bin, &err)) != 0) ||
        (o->workers > 0 &&
         (rc = find_binary("kvr-worker", true, worker_bin, sizeof worker_bin, &err)) != 0) ||
        (o->frontends > 0 &&
         (rc = find_binary("kvr-frontend", true, frontend_bin, sizeof frontend_bin, &err)) != 0) ||
        (o->haproxy && (rc = find_binary("haproxy", false, haproxy_bin, sizeof haproxy_bin, &err)) != 0) ||
        (o->bridge && o->workers > 0 &&
         (rc = find_binary("kvr-bridge", true, bridge_bin, sizeof bridge_bin, &err)) != 0) ||
        (o->scale_to_zero &&
         ((rc = find_binary("kvr-local-scaler", true, scaler_bin, sizeof scaler_bin, &err)) != 0 ||
          (rc = find_binary("kvr-worker", true, worker_bin, sizeof worker_bin, &err)) != 0)))
        goto fail_early;

    if (!pa.base)
        pa.next = derived_base(abs_dir);
    run_cluster_init(&c, abs_dir);
    snprintf(c.ns, sizeof c.ns, "%s", o->ns);
    snprintf(c.model, sizeof c.model, "%s", o->model);
    snprintf(path, sizeof path, "%s/logs", abs_dir);
    if ((rc = mkdir_p(path, &err)) != 0)
        goto fail;

    /* Choose every port first (held bound so none repeats), then release them and start. */
    int nats_port = o->nats_url ? 0 : alloc_port(&pa, false, &err);
    int router_http[64], router_raft[64], worker_port[256], frontend_port[64], haproxy_port = 0;
    int zmq_pub[256], zmq_replay[256]; /* --bridge: each worker's PUB and replay ROUTER ports */
    if (o->routers > 64 || o->workers > 256 || o->frontends > 64) {
        rc = kvr_err_set(&err, KVR_ELIMIT, "at most 64 routers, 256 workers, 64 frontends");
        goto fail;
    }
    if (nats_port < 0) {
        rc = nats_port;
        goto fail;
    }
    for (int i = 0; i < o->routers; i++) {
        if ((router_http[i] = alloc_port(&pa, false, &err)) < 0 ||
            (router_raft[i] = alloc_port(&pa, true, &err)) < 0) {
            rc = KVR_EIO;
            goto fail;
        }
    }
    for (int i = 0; i < o->workers; i++)
        if ((worker_port[i] = alloc_port(&pa, false, &err)) < 0 ||
            (o->bridge && ((zmq_pub[i] = alloc_port(&pa, false, &err)) < 0 ||
                           (zmq_replay[i] = alloc_port(&pa, false, &err)) < 0))) {
            rc = KVR_EIO;
            goto fail;
        }
    for (int i = 0; i < o->frontends; i++)
        if ((frontend_port[i] = alloc_port(&pa, false, &err)) < 0) {
            rc = KVR_EIO;
            goto fail;
        }
    if (o->haproxy && (haproxy_port = alloc_port(&pa, false, &err)) < 0) {
        rc = KVR_EIO;
        goto fail;
    }
    release_ports(&pa);

    /* nats-server with JetStream, store in D/nats; or the caller's (--nats). */
    char nats_dir[PATH_MAX + 16], conf[PATH_MAX + 32], conf_text[PATH_MAX * 2], nats_url[2048];
    if (o->nats_url) {
        if (strlen(o->nats_url) >= sizeof nats_url) {
            rc = kvr_err_set(&err, KVR_ELIMIT, "--nats is longer than %zu bytes", sizeof nats_url - 1);
            goto fail;
        }
        snprintf(nats_url, sizeof nats_url, "%s", o->nats_url);
        goto nats_ready;
    }
    snprintf(nats_dir, sizeof nats_dir, "%s/nats", abs_dir);
    if ((rc = mkdir_p(nats_dir, &err)) != 0)
        goto fail;
    snprintf(conf, sizeof conf, "%s/nats.conf", nats_dir);
    snprintf(conf_text, sizeof conf_text,
             "listen: 127.0.0.1:%d\njetstream {\n  store_dir: \"%s/js\"\n  max_memory_store: 256MB\n"
             "  max_file_store: 4GB\n}\nmax_payload: 8MB\n",
             nats_port, nats_dir);
    if ((rc = write_text(conf, conf_text, &err)) != 0)
        goto fail;
    snprintf(nats_url, sizeof nats_url, "nats://127.0.0.1:%d", nats_port);
    {
        run_proc *p = new_proc(&c, "nats", 0, nats_port, &err);
        if (!p) {
            rc = KVR_ENOMEM;
            goto fail;
        }
        snprintf(p->url, sizeof p->url, "%s", nats_url);
        snprintf(p->data_dir, sizeof p->data_dir, "%s", nats_dir);
        char *argv[] = {nats_bin, "-c", conf};
        if ((rc = spawn_and_record(&c, p, argv, 3, &err)) != 0 || (rc = wait_ready(&c, 0, c.n, o->timeout_s, &err)) != 0)
            goto fail;
    }
nats_ready:;

    /* Routers: one Raft group. */
    char peers[4096] = "";
    for (int i = 0; i < o->routers; i++) {
        size_t l = strlen(peers);
        snprintf(peers + l, sizeof peers - l, "%s%d@127.0.0.1:%d", i ? "," : "", i + 1, router_raft[i]);
    }
    /* Routers of one group prove a shared secret to each other (kvr-routerd refuses a group
     * without one unless --insecure-cluster): generate one per cluster, unless the caller's
     * router args bring their own choice. */
    char secret_path[PATH_MAX] = "";
    const char *ra = o->router_args ? o->router_args : "";
    if (o->raft_flags && o->routers > 1 && !strstr(ra, "--cluster-secret-file") &&
        !strstr(ra, "--insecure-cluster")) {
        snprintf(secret_path, sizeof secret_path, "%s/cluster.secret", abs_dir);
        unsigned char rnd[32];
        char hex[65];
        int sfd = -1;
        if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd ||
            (sfd = open(secret_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)) < 0) {
            rc = kvr_err_set(&err, KVR_EIO, "cluster secret %s: %s", secret_path, strerror(errno));
            goto fail;
        }
        for (int k = 0; k < 32; k++)
            snprintf(hex + 2 * k, 3, "%02x", rnd[k]);
        hex[64] = '\n';
        bool ok = write(sfd, hex, 65) == 65;
        close(sfd);
        if (!ok) {
            rc = kvr_err_set(&err, KVR_EIO, "cluster secret %s: short write", secret_path);
            goto fail;
        }
    }
    char token_file[PATH_MAX + 16];
    snprintf(token_file, sizeof token_file, "%s/admin-token", abs_dir);
    if (o->routers > 0 && (rc = ensure_admin_token(token_file, &err)) != 0)
        goto fail;
    /* Scale-to-zero: the routers' exec scaler inherits what it needs from their environment
     * (scripts/kvr-local-scaler); the pool is this cluster's one (namespace, model). */
    char pools_file[PATH_MAX + 16], scaler_flag[PATH_MAX + 8], scaler_dir[PATH_MAX + 16];
    if (o->scale_to_zero) {
        snprintf(pools_file, sizeof pools_file, "%s/pools.json", abs_dir);
        snprintf(scaler_dir, sizeof scaler_dir, "%s/scaler", abs_dir);
        snprintf(scaler_flag, sizeof scaler_flag, "exec:%s", scaler_bin);
        if ((rc = mkdir_p(scaler_dir, &err)) != 0)
            goto fail;
        FILE *pf = fopen(pools_file, "w");
        if (!pf) {
            rc = kvr_err_set(&err, KVR_EIO, "%s: %s", pools_file, strerror(errno));
            goto fail;
        }
        /* namespace and model are ours (flags), plain names: no JSON escaping needed beyond
         * refusing quotes and backslashes */
        if (strpbrk(o->ns, "\"\\") || strpbrk(o->model, "\"\\")) {
            fclose(pf);
            rc = kvr_err_set(&err, KVR_EINVAL, "--scale-to-zero: namespace/model with quotes");
            goto fail;
        }
        fprintf(pf, "{\"pools\": [{\"namespace\": \"%s\", \"model\": \"%s\", \"target\": \"%s\"}]}\n",
                o->ns, o->model, o->model);
        fclose(pf);
        char wargs[2400];
        snprintf(wargs, sizeof wargs, "--speedup %g %s", o->speedup,
                 o->worker_args ? o->worker_args : "");
        setenv("KVR_SCALER_DIR", scaler_dir, 1);
        setenv("KVR_SCALER_NATS", nats_url, 1);
        setenv("KVR_WORKER_BIN", worker_bin, 1);
        setenv("KVR_SCALER_ARGS", wargs, 1);
    }
    int stage = c.n;
    for (int i = 0; i < o->routers; i++) {
        run_proc *p = new_proc(&c, "router", i + 1, router_http[i], &err);
        if (!p) {
            rc = KVR_ENOMEM;
            goto fail;
        }
        p->raft_port = router_raft[i];
        snprintf(p->data_dir, sizeof p->data_dir, "%s/router-%d", abs_dir, i + 1);
        if ((rc = mkdir_p(p->data_dir, &err)) != 0)
            goto fail;
        char id[16], http[32], raft[32], extra[2048];
        snprintf(id, sizeof id, "%d", i + 1);
        snprintf(http, sizeof http, "127.0.0.1:%d", router_http[i]);
        snprintf(raft, sizeof raft, "127.0.0.1:%d", router_raft[i]);
        snprintf(extra, sizeof extra, "%s", o->router_args ? o->router_args : "");
        char *argv[RUN_MAX_ARGS + 1] = {router_bin, "--id", id, "--nats", nats_url, "--http", http,
                                        "--data-dir", p->data_dir, "--admin-token-file",
                                        token_file};
        int argc = 11;
        if (o->raft_flags) {
            argv[argc++] = "--raft-addr";
            argv[argc++] = raft;
            argv[argc++] = "--peers";
            argv[argc++] = peers;
            if (secret_path[0]) {
                argv[argc++] = "--cluster-secret-file";
                argv[argc++] = secret_path;
            }
        }
        if (o->scale_to_zero) {
            argv[argc++] = "--pools-file";
            argv[argc++] = pools_file;
            argv[argc++] = "--scaler";
            argv[argc++] = scaler_flag;
            if (o->idle_after) {
                argv[argc++] = "--idle-after";
                argv[argc++] = (char *)o->idle_after;
            }
        }
        if ((rc = add_nats_flags(o, argv, &argc, &err)) != 0 ||
            (rc = add_extra(argv, &argc, extra, &err)) != 0 ||
            (rc = spawn_and_record(&c, p, argv, argc, &err)) != 0)
            goto fail;
    }
    if ((rc = wait_ready(&c, stage, c.n, o->timeout_s, &err)) != 0)
        goto fail;

    /* Workers. */
    char kv_secret[PATH_MAX + 16];
    snprintf(kv_secret, sizeof kv_secret, "%s/kv-secret", abs_dir);
    if (o->workers > n_both && (rc = ensure_admin_token(kv_secret, &err)) != 0)
        goto fail;
    stage = c.n;
    char speed[32];
    snprintf(speed, sizeof speed, "%g", o->speedup);
    for (int i = 0; i < o->workers; i++) {
        run_proc *p = new_proc(&c, "worker", i + 1, worker_port[i], &err);
        if (!p) {
            rc = KVR_ENOMEM;
            goto fail;
        }
        char id[16], listen[32], extra[2048];
        snprintf(id, sizeof id, "%d", i + 1);
        snprintf(listen, sizeof listen, "127.0.0.1:%d", worker_port[i]);
        snprintf(extra, sizeof extra, "%s", o->worker_args ? o->worker_args : "");
        char *argv[RUN_MAX_ARGS + 1] = {worker_bin, "--listen", listen, "--nats", nats_url,
                                        "--namespace", (char *)o->ns, "--model", (char *)o->model,
                                        "--id", id, "--speedup", speed};
        int argc = 13;
        char zpub[48], zrep[48];
        if (o->bridge) { /* no NATS: the worker is an engine, its bridge speaks for it */
            snprintf(zpub, sizeof zpub, "tcp://127.0.0.1:%d", zmq_pub[i]);
            snprintf(zrep, sizeof zrep, "tcp://127.0.0.1:%d", zmq_replay[i]);
            argv[3] = "--kv-events";
            argv[4] = "zmq";
            argv[argc++] = "--zmq-endpoint";
            argv[argc++] = zpub;
            argv[argc++] = "--zmq-replay-endpoint";
            argv[argc++] = zrep;
        } else if ((rc = add_nats_flags(o, argv, &argc, &err)) != 0) {
            goto fail;
        }
        if (i >= n_both) {
            argv[argc++] = "--role";
            argv[argc++] = i < n_both + o->prefill_workers ? "prefill" : "decode";
            argv[argc++] = "--kv-secret-file";
            argv[argc++] = kv_secret;
        }
        if ((rc = add_extra(argv, &argc, extra, &err)) != 0 ||
            (rc = spawn_and_record(&c, p, argv, argc, &err)) != 0)
            goto fail;
    }
    if ((rc = wait_ready(&c, stage, c.n, o->timeout_s, &err)) != 0)
        goto fail;

    /* --bridge: a kvr-bridge per worker. Its "port" is its worker's: ready = the worker answers
     * (the bridge has no HTTP side); the routers knowing the workers below proves the bridges. */
    stage = c.n;
    for (int i = 0; o->bridge && i < o->workers; i++) {
        run_proc *p = new_proc(&c, "bridge", i + 1, worker_port[i], &err);
        if (!p) {
            rc = KVR_ENOMEM;
            goto fail;
        }
        char id[16], engine[48], zpub[48], zrep[48];
        snprintf(id, sizeof id, "%d", i + 1);
        snprintf(engine, sizeof engine, "http://127.0.0.1:%d", worker_port[i]);
        snprintf(zpub, sizeof zpub, "tcp://127.0.0.1:%d", zmq_pub[i]);
        snprintf(zrep, sizeof zrep, "tcp://127.0.0.1:%d", zmq_replay[i]);
        char *argv[RUN_MAX_ARGS + 1] = {bridge_bin, "--engine-url", engine, "--zmq", zpub,
                                        "--replay", zrep, "--nats", nats_url, "--namespace",
                                        (char *)o->ns, "--id", id, "--scrape-interval", "250ms"};
        int argc = 15;
        if ((rc = add_nats_flags(o, argv, &argc, &err)) != 0 ||
            (rc = spawn_and_record(&c, p, argv, argc, &err)) != 0)
            goto fail;
    }
    if ((rc = wait_ready(&c, stage, c.n, o->timeout_s, &err)) != 0)
        goto fail;

    /* Frontends. */
    stage = c.n;
    for (int i = 0; i < o->frontends; i++) {
        run_proc *p = new_proc(&c, "frontend", i + 1, frontend_port[i], &err);
        if (!p) {
            rc = KVR_ENOMEM;
            goto fail;
        }
        char id[16], listen[32], extra[2048];
        snprintf(id, sizeof id, "%d", i + 1);
        snprintf(listen, sizeof listen, "127.0.0.1:%d", frontend_port[i]);
        snprintf(extra, sizeof extra, "%s", o->frontend_args ? o->frontend_args : "");
        char *argv[RUN_MAX_ARGS + 1] = {frontend_bin, "--listen", listen, "--nats", nats_url,
                                        "--id", id, "--namespace", (char *)o->ns};
        int argc = 9;
        if ((rc = add_nats_flags(o, argv, &argc, &err)) != 0 ||
            (rc = add_extra(argv, &argc, extra, &err)) != 0 ||
            (rc = spawn_and_record(&c, p, argv, argc, &err)) != 0)
            goto fail;
    }
    if ((rc = wait_ready(&c, stage, c.n, o->timeout_s, &err)) != 0)
        goto fail;

    /* HAProxy (leastconn) in front of the workers, for baseline runs. */
    if (o->haproxy) {
        stage = c.n;
        char cfg[PATH_MAX + 32];
        kvr_buf t;
        kvr_buf_init(&t);
        kvr_buf_appendf(&t,
                        "global\n  maxconn 8192\n"
                        "defaults\n  mode http\n  timeout connect 2s\n  timeout client 600s\n"
                        "  timeout server 600s\n"
                        "frontend kvr_in\n  bind 127.0.0.1:%d\n  default_backend kvr_workers\n"
                        "backend kvr_workers\n  balance leastconn\n",
                        haproxy_port);
        for (int i = 0; i < c.n; i++)
            if (strcmp(c.procs[i].role, "worker") == 0)
                kvr_buf_appendf(&t, "  server w%d 127.0.0.1:%d\n", c.procs[i].id, c.procs[i].port);
        kvr_buf_append(&t, "", 1);
        snprintf(cfg, sizeof cfg, "%s/haproxy.cfg", abs_dir);
        rc = t.base ? write_text(cfg, t.base, &err) : kvr_err_set(&err, KVR_ENOMEM, "haproxy.cfg");
        kvr_buf_free(&t);
        if (rc != 0)
            goto fail;
        run_proc *p = new_proc(&c, "haproxy", 1, haproxy_port, &err);
        if (!p) {
            rc = KVR_ENOMEM;
            goto fail;
        }
        char *argv[] = {haproxy_bin, "-db", "-f", cfg};
        if ((rc = spawn_and_record(&c, p, argv, 4, &err)) != 0 ||
            (rc = wait_ready(&c, stage, c.n, o->timeout_s, &err)) != 0)
            goto fail;
    }

    if ((rc = wait_workers_known(&c, o->workers, o->workers - o->prefill_workers, o->raft_flags && o->routers > 1, o->timeout_s, &err)) != 0)
        goto fail;

    printf("cluster up in %s: %d router(s), %d worker(s), %d frontend(s)%s\n", abs_dir, o->routers,
           o->workers, o->frontends, o->haproxy ? ", haproxy" : "");
    if (o->nats_url) {
        char red[2048];
        printf("  nats     external %s\n", kvr_nats_redact_url(nats_url, red, sizeof red));
    }
    for (int i = 0; i < c.n; i++)
        printf("  %-8s %-3d pid %-7d %s\n", c.procs[i].role, c.procs[i].id, c.procs[i].pid,
               c.procs[i].url);
    run_cluster_free(&c);
    kvr_nats_flags_free(&o->nf);
    return 0;

fail:
    release_ports(&pa);
    fprintf(stderr, "kvrctl up: %s\n", err.msg);
    print_fail_tail();
    fprintf(stderr, "kvrctl up: stopping what was started\n");
    teardown(&c);
    run_cluster_save(&c, NULL);
    run_cluster_free(&c);
    kvr_nats_flags_free(&o->nf);
    return 1;
fail_early:
    fprintf(stderr, "kvrctl up: %s\n", err.msg);
    kvr_nats_flags_free(&o->nf);
    return 1;
}
