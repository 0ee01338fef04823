/* kvrctl's private header: what its files share (nothing outside tools/ includes it).
 *   kvrctl.c       usage, argument parsing, main
 *   kvrctl_util.c  time, the binaries' directory, readiness of a started process
 *   kvrctl_up.c    `up`: ports, argv of each process, start-up order and waits
 *   kvrctl_ops.c   `status`, `kill`, `restart`, `down` on a running cluster (cluster.json)
 * Single-threaded: kvrctl runs one command and exits. Each cmd_* returns the exit status. */
#ifndef KVR_KVRCTL_H
#define KVR_KVRCTL_H

#include <stdbool.h>
#include <stdio.h>

#include "kvr_err.h"
#include "kvr_nats_flags.h"
#include "run_cluster.h"

#define DEFAULT_DIR "./cluster"

typedef struct up_opts {
    int routers, workers, frontends;
    int base_port;
    double speedup;
    const char *ns, *model;
    const char *worker_args, *router_args, *frontend_args;
    bool haproxy, raft_flags;
    bool bridge; /* workers publish KV events on ZMQ (vLLM's framing), a kvr-bridge beside each */
    int timeout_s;
    const char *nats_url; /* --nats: an external NATS; NULL: start nats-server in D/nats */
    kvr_nats_flags nf;    /* --nats-*: forwarded to every process that connects to NATS */
    /* --scale-to-zero: the routers get a pools file with (ns, model) and the local exec scaler
     * (kvr-local-scaler, workers started and stopped in D/scaler); --idle-after D for them */
    bool scale_to_zero;
    const char *idle_after;
    /* --prefill-workers N --decode-workers M: disaggregated workers (kvr-worker --role
     * prefill|decode with a shared KV side-channel secret D/kv-secret), after the --workers
     * ones (role both) */
    int prefill_workers, decode_workers;
} up_opts;

/* kvrctl_util.c */
void sleep_ms(int ms);
long long mono_ms(void);
/* Where binaries come from: opt (--bin-dir), else $KVR_BIN, else kvrctl's own directory. */
void init_bin_dir(const char *opt);
/* Full path of one of our binaries (ours: in the binaries' directory), or of a system one on PATH.
 */
int find_binary(const char *name, bool ours, char *out, size_t cap, kvr_err *err);
/* True when a NATS server greets a client on 127.0.0.1:port. */
bool nats_answers(int port);
/* 1 when p answers its readiness check (/ready, /health, or NATS's greeting). */
int proc_ready(run_proc *p);
/* Prints the log tail of the process that made the last wait_ready fail, if any. */
void print_fail_tail(void);
/* Waits until processes [from, to) of c are ready, at most timeout_s; 0 or -1 with err set. */
int wait_ready(run_cluster *c, int from, int to, int timeout_s, kvr_err *err);

/* kvrctl_up.c: o's nf is freed before it returns. */
int cmd_up(const char *dir, up_opts *o);

/* kvrctl_ops.c */
int cmd_status(const char *dir, bool json);
int cmd_kill(const char *dir, const char *role, const char *which);
int cmd_transfer(const char *dir, const char *to, int timeout_s);
int cmd_restart(const char *dir, const char *role, const char *which, bool wait, int timeout_s);
int cmd_down(const char *dir, int timeout_s);

#endif
