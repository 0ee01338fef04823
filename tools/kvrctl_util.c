/* kvrctl: helpers every command uses (kvrctl.h). */
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

void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

long long mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---------- binaries ---------- */

static char bin_dir[PATH_MAX];

void init_bin_dir(const char *opt)
{
    const char *env = getenv("KVR_BIN");
    if (opt && *opt) {
        snprintf(bin_dir, sizeof bin_dir, "%s", opt);
    } else if (env && *env) {
        snprintf(bin_dir, sizeof bin_dir, "%s", env);
    } else {
        ssize_t n = readlink("/proc/self/exe", bin_dir, sizeof bin_dir - 1);
        bin_dir[n > 0 ? n : 0] = 0;
        char *slash = strrchr(bin_dir, '/');
        if (slash)
            *slash = 0;
        else
            snprintf(bin_dir, sizeof bin_dir, ".");
    }
    char real[PATH_MAX];
    if (realpath(bin_dir, real))
        snprintf(bin_dir, sizeof bin_dir, "%s", real);
}

/* Full path of one of our binaries, or of a system one found on PATH (+ /usr/sbin, /sbin). */
int find_binary(const char *name, bool ours, char *out, size_t cap, kvr_err *err)
{
    if (ours) {
        snprintf(out, cap, "%s/%s", bin_dir, name);
        if (access(out, X_OK) == 0)
            return 0;
        return kvr_err_set(err, KVR_ENOTFOUND, "%s not found in %s (build it, or pass --bin-dir)",
                           name, bin_dir);
    }
    const char *path = getenv("PATH");
    char buf[4096];
    snprintf(buf, sizeof buf, "%s:/usr/sbin:/sbin:/usr/local/sbin", path ? path : "/usr/bin:/bin");
    char *save = NULL;
    for (char *d = strtok_r(buf, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
        snprintf(out, cap, "%s/%s", d, name);
        if (access(out, X_OK) == 0)
            return 0;
    }
    return kvr_err_set(err, KVR_ENOTFOUND, "%s not found on PATH", name);
}

/* True when a NATS server answers on port: it greets every client with "INFO {…}" at once
 * (a plain TCP connect could reach some other process holding the port). */
bool nats_answers(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return false;
    struct timeval tv = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    char buf[8] = {0};
    bool ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0 && recv(fd, buf, 5, MSG_WAITALL) == 5 &&
              memcmp(buf, "INFO ", 5) == 0;
    close(fd);
    return ok;
}

int proc_ready(run_proc *p)
{
    if (strcmp(p->role, "nats") == 0)
        return nats_answers(p->port);
    if (strcmp(p->role, "router") == 0)
        return run_http_ok(p->url, "/ready", 1000);
    return run_http_ok(p->url, "/health", 1000);
}

static const char *ready_path(const run_proc *p)
{
    if (strcmp(p->role, "nats") == 0)
        return " (TCP)";
    return strcmp(p->role, "router") == 0 ? "/ready" : "/health";
}

/* The last log lines of the process that made wait_ready fail (too long for a kvr_err). */
static char fail_tail[4096];

void print_fail_tail(void)
{
    if (fail_tail[0])
        fprintf(stderr, "%s%s", fail_tail, fail_tail[strlen(fail_tail) - 1] == '\n' ? "" : "\n");
}

/* Waits until every process from index `from` on is ready; on failure names the process. */
int wait_ready(run_cluster *c, int from, int to, int timeout_s, kvr_err *err)
{
    long long deadline = mono_ms() + (long long)timeout_s * 1000;
    for (;;) {
        bool all = true;
        for (int i = from; i < to; i++) {
            run_proc *p = &c->procs[i];
            run_reap();
            if (!run_proc_alive(p)) {
                run_tail_file(p->log, 15, fail_tail, sizeof fail_tail);
                return kvr_err_set(err, KVR_EIO,
                                   "%s-%d (pid %d, port %d) exited during start-up; last lines of "
                                   "%s:",
                                   p->role, p->id, p->pid, p->port, p->log);
            }
            if (!proc_ready(p)) {
                all = false;
                if (mono_ms() > deadline) {
                    run_tail_file(p->log, 15, fail_tail, sizeof fail_tail);
                    return kvr_err_set(err, KVR_ETIMEDOUT,
                                       "%s-%d (pid %d, port %d) not ready (%s%s) after %d s; last "
                                       "lines of %s:",
                                       p->role, p->id, p->pid, p->port, p->url, ready_path(p),
                                       timeout_s, p->log);
                }
                break;
            }
        }
        if (all)
            return 0;
        sleep_ms(100);
    }
}
