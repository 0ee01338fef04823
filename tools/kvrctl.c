/* kvrctl: start, inspect, break and stop a local kvroute cluster (DESIGN section 10).
 *
 *   kvrctl up --routers N --workers M --frontends K [--dir D] [--base-port P] …
 *   kvrctl status | kill router 2|leader|follower | transfer [2] | restart router 2 | down
 *   [--dir D]
 *
 * Every process runs in its own session (setsid) with its log in D/logs/<role>-<id>.log, so it
 * outlives kvrctl; D/cluster.json records pid + start time + command line, which is how every
 * later command finds (and can re-run) it. Process and HTTP helpers live in launcher/run_cluster.c
 * because `kvr-bench run` kills and restarts routers the same way. */
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

static void usage(FILE *out)
{
    fprintf(
        out,
        "usage: kvrctl COMMAND [options]\n"
        "  up --routers N --workers M --frontends K [--dir D] [--base-port P] [--speedup X]\n"
        "     [--namespace NS] [--model M] [--worker-args \"…\"] [--router-args \"…\"]\n"
        "     [--frontend-args \"…\"] [--haproxy] [--no-raft-flags] [--bin-dir DIR] [--timeout S]\n"
        "     [--bridge]  (each worker as a vLLM stand-in: --kv-events zmq, and a kvr-bridge\n"
        "                  beside it that forwards its events and heartbeats)\n"
        "     [--prefill-workers N --decode-workers M]  disaggregated workers (--role prefill|\n"
        "                  decode, a KV side channel secret in D/kv-secret) besides --workers\n"
        "     [--scale-to-zero [--idle-after D]]  the pool sleeps when idle and wakes on\n"
        "                  demand: routers run kvr-local-scaler, which starts and stops\n"
        "                  kvr-workers in D/scaler (use --workers 0 to start asleep)\n"
        "     [--nats URL[,URL…]]  use this NATS (with JetStream) instead of starting one\n"
        "     [--nats-user U --nats-password-file F | --nats-token-file F | --nats-nkey F |\n"
        "      --nats-creds F] [--nats-tls-ca F [--nats-tls-cert F --nats-tls-key F]]\n"
        "                  NATS credentials, given to every process that connects to NATS\n"
        "                  (files only: secrets never go on a command line)\n"
        "  status [--dir D] [--json]\n"
        "  kill ROLE ID|leader|follower [--dir D]     (SIGKILL; prints the id it killed)\n"
        "  transfer [ID] [--dir D] [--timeout S]      (the Raft leadership to router ID, or\n"
        "                  the most up-to-date one, as planned maintenance; prints the leader)\n"
        "  restart ROLE ID [--dir D] [--no-wait] [--timeout S]\n"
        "  down [--dir D] [--timeout S]\n"
        "Default --dir is %s. Binaries come from --bin-dir, $KVR_BIN, or kvrctl's own directory.\n",
        DEFAULT_DIR);
}

/* ---------- main ---------- */

static int parse_int(const char *flag, const char *v, int lo, int hi, int *out)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *v == 0 || *end || x < lo || x > hi) {
        fprintf(stderr, "kvrctl: %s wants an integer in [%d, %d], got '%s'\n", flag, lo, hi, v);
        return -1;
    }
    *out = (int)x;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    signal(SIGPIPE, SIG_IGN);
    /* The nats-server kvrctl starts shares the host with every router, worker and frontend:
     * Go's scheduler on every core then spends a third of its CPU handing goroutines between
     * threads. At most half the cores (kvr-bench raft on 2 cores: nats-server's CPU per
     * decision -30 to -40%, decisions/s +8 to +27%). GOMAXPROCS set by the caller wins; the
     * C processes ignore it. */
    if (!getenv("GOMAXPROCS")) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        char gmp[24];
        snprintf(gmp, sizeof gmp, "%ld", ncpu > 1 ? ncpu / 2 : 1);
        setenv("GOMAXPROCS", gmp, 0);
    }
    const char *cmd = argv[1];
    const char *dir = DEFAULT_DIR, *bin = NULL;
    up_opts o = {.routers = 1, .workers = 1, .frontends = 1, .speedup = 1.0, .ns = "kvr",
                 .model = "sim", .raft_flags = true, .timeout_s = 30};
    bool json = false, wait = true;
    int timeout_set = 0;
    const char *pos[4] = {0};
    int npos = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEED_VALUE                                                                                 \
    if (!v) {                                                                                      \
        fprintf(stderr, "kvrctl: %s needs a value\n", a);                                          \
        return 2;                                                                                  \
    }                                                                                              \
    i++;
        if (strcmp(a, "--dir") == 0) {
            NEED_VALUE dir = v;
        } else if (strcmp(a, "--routers") == 0) {
            NEED_VALUE if (parse_int(a, v, 0, 64, &o.routers)) return 2;
        } else if (strcmp(a, "--workers") == 0) {
            NEED_VALUE if (parse_int(a, v, 0, 256, &o.workers)) return 2;
        } else if (strcmp(a, "--frontends") == 0) {
            NEED_VALUE if (parse_int(a, v, 0, 64, &o.frontends)) return 2;
        } else if (strcmp(a, "--base-port") == 0) {
            NEED_VALUE if (parse_int(a, v, 1024, 65000, &o.base_port)) return 2;
        } else if (strcmp(a, "--timeout") == 0) {
            NEED_VALUE if (parse_int(a, v, 1, 3600, &o.timeout_s)) return 2;
            timeout_set = 1;
        } else if (strcmp(a, "--speedup") == 0) {
            NEED_VALUE char *end;
            o.speedup = strtod(v, &end);
            if (*end || !(o.speedup > 0) || o.speedup > 1e6) {
                fprintf(stderr, "kvrctl: --speedup wants a positive number, got '%s'\n", v);
                return 2;
            }
        } else if (strcmp(a, "--namespace") == 0) {
            NEED_VALUE o.ns = v;
        } else if (strcmp(a, "--model") == 0) {
            NEED_VALUE o.model = v;
        } else if (strcmp(a, "--worker-args") == 0) {
            NEED_VALUE o.worker_args = v;
        } else if (strcmp(a, "--router-args") == 0) {
            NEED_VALUE o.router_args = v;
        } else if (strcmp(a, "--frontend-args") == 0) {
            NEED_VALUE o.frontend_args = v;
        } else if (strcmp(a, "--nats") == 0) {
            NEED_VALUE o.nats_url = v;
        } else if (strncmp(a, "--nats-", 7) == 0 && v &&
                   kvr_nats_flags_set(&o.nf, a + 2, strlen(a + 2), v) == 1) {
            i++;
        } else if (strcmp(a, "--bin-dir") == 0) {
            NEED_VALUE bin = v;
        } else if (strcmp(a, "--haproxy") == 0) {
            o.haproxy = true;
        } else if (strcmp(a, "--bridge") == 0) {
            o.bridge = true;
        } else if (strcmp(a, "--prefill-workers") == 0) {
            NEED_VALUE if (parse_int(a, v, 0, 128, &o.prefill_workers)) return 2;
        } else if (strcmp(a, "--decode-workers") == 0) {
            NEED_VALUE if (parse_int(a, v, 0, 128, &o.decode_workers)) return 2;
        } else if (strcmp(a, "--scale-to-zero") == 0) {
            o.scale_to_zero = true;
        } else if (strcmp(a, "--idle-after") == 0) {
            NEED_VALUE o.idle_after = v;
        } else if (strcmp(a, "--no-raft-flags") == 0) {
            o.raft_flags = false;
        } else if (strcmp(a, "--json") == 0) {
            json = true;
        } else if (strcmp(a, "--no-wait") == 0) {
            wait = false;
        } else if (a[0] == '-' && a[1] == '-') {
            fprintf(stderr, "kvrctl: unknown option %s\n", a);
            usage(stderr);
            return 2;
        } else if (npos < 4) {
            pos[npos++] = a;
        } else {
            fprintf(stderr, "kvrctl: too many arguments\n");
            return 2;
        }
#undef NEED_VALUE
    }
    init_bin_dir(bin);
    run_http_global_init();
    if (strcmp(cmd, "up") == 0 && npos == 0)
        return cmd_up(dir, &o);
    if (strcmp(cmd, "status") == 0 && npos == 0)
        return cmd_status(dir, json);
    if (strcmp(cmd, "kill") == 0 && npos == 2)
        return cmd_kill(dir, pos[0], pos[1]);
    if (strcmp(cmd, "transfer") == 0 && npos <= 1)
        return cmd_transfer(dir, npos ? pos[0] : NULL, timeout_set ? o.timeout_s : 30);
    if (strcmp(cmd, "restart") == 0 && npos == 2)
        return cmd_restart(dir, pos[0], pos[1], wait, o.timeout_s);
    if (strcmp(cmd, "down") == 0 && npos == 0)
        return cmd_down(dir, timeout_set ? o.timeout_s : 10);
    fprintf(stderr, "kvrctl: bad command line for '%s'\n", cmd);
    usage(stderr);
    return 2;
}
