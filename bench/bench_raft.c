/* kvr-bench raft: dispatcher (--mode process|inprocess), and the in-process variant:
 * route-and-reserve through an in-process 3-node kvr_sync group (one uv loop, loopback TCP,
 * real data dirs), requests spread over all three nodes with many in flight; the same load
 * applied to one local FSM; and a simulation of best-effort booking broadcast (Dynamo's
 * replicas) counting decisions made on stale load. The default, --mode process, drives real
 * kvr-routerd processes (raftbench_proc.c). */
#define _GNU_SOURCE
#include "kvr_bench.h"
#include "raftbench.h"

#include "fsm.h"
#include "kvr_log.h"
#include "sync.h"

#include <ftw.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#define NODES 3

typedef struct bench {
    uv_loop_t loop;
    kvr_sync *nodes[NODES + 1];
    uint32_t n_workers;
    uint64_t n_requests, inflight, submitted, answered, frees_answered, errors, local_answers;
    int64_t *lat_us;
    int64_t t0_ns;
    uint64_t seed;
    uint64_t digest[NODES + 1]; /* as compared by digests_equal */
    char model[8], ns[8];
} bench;

typedef struct req {
    bench *b;
    uint64_t idx;
    int64_t start_ns;
    int node;
} req;

static void submit_next(bench *b);

static void on_free(kvr_sync *s, int status, const kvr_fsm_result *res, kvr_sync_mode mode, void *data)
{
    (void)s;
    (void)res;
    (void)mode;
    bench *b = data;
    if (status != 0)
        b->errors++;
    b->frees_answered++;
}

static void on_route(kvr_sync *s, int status, const kvr_fsm_result *res, kvr_sync_mode mode, void *data)
{
    req *r = data;
    bench *b = r->b;
    b->lat_us[r->idx] = (kvr_mono_ns() - r->start_ns) / 1000;
    b->answered++;
    if (status != 0 || !res || (res->outcome != KVR_OUT_OK && res->outcome != KVR_OUT_DUPLICATE))
        b->errors++;
    if (mode == KVR_SYNC_LOCAL)
        b->local_answers++;
    /* the request finishes at once: FREE keeps the booking table small (2 commands/request) */
    kvr_cmd f = {.type = KVR_CMD_FREE};
    memcpy(f.u.request_id, &r->idx, 8);
    memcpy(f.u.request_id + 8, &b->seed, 8);
    if (kvr_sync_submit(s, &f, on_free, b) != 0)
        b->errors++;
    free(r);
    submit_next(b);
}

static void submit_next(bench *b)
{
    if (b->submitted >= b->n_requests)
        return;
    uint64_t i = b->submitted++;
    req *r = malloc(sizeof *r);
    r->b = b;
    r->idx = i;
    r->node = 1 + (int)(i % NODES);
    kvr_route_candidate cand[4];
    kvr_cmd c = raftbench_make_route(i, b->seed, b->n_workers, cand, b->model, b->ns);
    r->start_ns = kvr_mono_ns();
    if (kvr_sync_route(b->nodes[r->node], &c.u.route, on_route, r) != 0) {
        b->errors++;
        b->answered++;
        free(r);
    }
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static void wake(uv_timer_t *t)
{
    (void)t;
}

static bool run_until(bench *b, bool (*cond)(bench *), int timeout_ms)
{
    uv_timer_t t;
    uv_timer_init(&b->loop, &t);
    uv_timer_start(&t, wake, 10, 10);
    int64_t end = kvr_mono_ms() + timeout_ms;
    bool ok = false;
    while (kvr_mono_ms() < end) {
        if (cond(b)) {
            ok = true;
            break;
        }
        uv_run(&b->loop, UV_RUN_ONCE);
    }
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&b->loop, UV_RUN_NOWAIT);
    return ok;
}

static bool has_leader(bench *b)
{
    for (int i = 1; i <= NODES; i++) {
        kvr_sync_state st;
        kvr_sync_get_state(b->nodes[i], &st);
        if (st.leader_id == 0)
            return false;
    }
    return true;
}

static bool all_answered(bench *b)
{
    return b->answered >= b->n_requests && b->frees_answered >= b->answered;
}

/* Every replica has applied the same index and holds the same state. The digests compared are
 * kept in b->digest: run_until turns the loop once more after the condition holds, and the
 * leader may apply a housekeeping entry in that turn, so reading them again afterwards could
 * compare a newer leader with followers that learn that commit only at the next heartbeat. */
static bool digests_equal(bench *b)
{
    kvr_sync_state s1, si;
    kvr_sync_get_state(b->nodes[1], &s1);
    b->digest[1] = s1.digest;
    for (int i = 2; i <= NODES; i++) {
        kvr_sync_get_state(b->nodes[i], &si);
        b->digest[i] = si.digest;
        if (si.digest != s1.digest || si.applied_index != s1.applied_index)
            return false;
    }
    return true;
}

static uint64_t workers_done;
static void on_worker(kvr_sync *s, int status, const kvr_fsm_result *res, kvr_sync_mode mode, void *data)
{
    (void)s;
    (void)res;
    (void)mode;
    (void)data;
    if (status == 0)
        workers_done++;
}
static bool workers_registered(bench *b)
{
    return workers_done >= b->n_workers;
}

static int port_free(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int ok = bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
    close(fd);
    return ok;
}

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int closed;
static void on_closed(void *d)
{
    (void)d;
    closed++;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: kvr-bench raft --mode inprocess [--routers 3] [--requests N] [--inflight K] [--workers W]\n"
            "                      [--bcast-delay-ms D] [--hold-ms H] [--rate R] [--snapshot-threshold N]\n"
            "                      [--json OUT]\n"
            "In-process: 3 kvr_sync nodes on one loop over loopback TCP (temp data dirs).\n");
}


static int raft_inprocess(int argc, char **argv);

int kvr_bench_raft(int argc, char **argv)
{
    /* --mode process (default) | inprocess; removed from argv before the variant parses it */
    const char *mode = "process";
    char *args[256];
    int n = 0;
    if (argc > 250) {
        fprintf(stderr, "kvr-bench raft: too many arguments\n");
        return 2;
    }
    for (int i = 0; i < argc; i++) {
        if (i > 0 && !strcmp(argv[i], "--mode")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "kvr-bench raft: --mode wants process or inprocess\n");
                return 2;
            }
            mode = argv[++i];
            continue;
        }
        args[n++] = argv[i];
    }
    args[n] = NULL;
    if (!strcmp(mode, "inprocess") || !strcmp(mode, "in-process"))
        return raft_inprocess(n, args);
    if (!strcmp(mode, "process"))
        return raftbench_process(n, args);
    fprintf(stderr, "kvr-bench raft: --mode wants process or inprocess, not '%s'\n", mode);
    return 2;
}

static int raft_inprocess(int argc, char **argv)
{
    bench b;
    memset(&b, 0, sizeof b);
    b.n_requests = 50000;
    b.inflight = 256;
    b.n_workers = 16;
    b.seed = 42;
    snprintf(b.model, sizeof b.model, "m");
    snprintf(b.ns, sizeof b.ns, "ns");
    const char *json = NULL;
    double delay_ms = 2, hold_ms = 2000, rate = 2000;
    uint32_t snap_threshold = 8192;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            return 0;
        }
        if (!v) {
            usage();
            return 2;
        }
        if (!strcmp(a, "--requests"))
            b.n_requests = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--inflight"))
            b.inflight = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--workers"))
            b.n_workers = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--json"))
            json = v;
        else if (!strcmp(a, "--bcast-delay-ms"))
            delay_ms = atof(v);
        else if (!strcmp(a, "--hold-ms"))
            hold_ms = atof(v);
        else if (!strcmp(a, "--snapshot-threshold"))
            snap_threshold = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--rate"))
            rate = atof(v);
        else if (!strcmp(a, "--routers")) {
            if (atoi(v) != NODES) {
                fprintf(stderr, "kvr-bench raft: the in-process variant runs %d routers\n", NODES);
                return 2;
            }
        } else {
            usage();
            return 2;
        }
        i++;
    }
    if (b.n_requests == 0 || b.n_requests > 100000000 || b.inflight == 0 || b.n_workers == 0 ||
        b.n_workers > KVR_FSM_MAX_WORKERS || rate <= 0) {
        fprintf(stderr, "kvr-bench raft: bad arguments\n");
        return 2;
    }
    kvr_log_setup("bench", NULL, KVR_LOG_WARN);
    char dir[256];
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/kvr-bench-raft-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    int base = -1;
    for (int attempt = 0; attempt < 200 && base < 0; attempt++) {
        int p = 20000 + (int)((getpid() * 31u + (unsigned)attempt * 7919u) % 30000);
        int ok = 1;
        for (int k = 0; k < 2 * NODES && ok; k++)
            ok = port_free(p + k);
        if (ok)
            base = p;
    }
    char peers[256];
    snprintf(peers, sizeof peers, "1@127.0.0.1:%d,2@127.0.0.1:%d,3@127.0.0.1:%d", base, base + 2, base + 4);
    uv_loop_init(&b.loop);
    int rc = 1;
    for (int i = 1; i <= NODES; i++) {
        kvr_sync_options o;
        kvr_sync_options_default(&o);
        char addr[64], d[512];
        snprintf(addr, sizeof addr, "127.0.0.1:%d", base + 2 * (i - 1));
        snprintf(d, sizeof d, "%s/node%d", dir, i);
        o.id = (uint32_t)i;
        o.raft_addr = addr;
        o.peers = peers;
        o.data_dir = d;
        o.degraded_after_ms = 10000; /* measure Raft, not local mode */
        o.max_wait_ms = 30000;
        o.snapshot_threshold = snap_threshold;
        o.snapshot_trailing = snap_threshold / 4 ? snap_threshold / 4 : 1;
        kvr_err e = {0};
        if (kvr_sync_init(&b.nodes[i], &b.loop, &o, &e) || kvr_sync_start(b.nodes[i], &e)) {
            fprintf(stderr, "kvr-bench raft: node %d: %s\n", i, e.msg);
            goto out;
        }
    }
    if (!run_until(&b, has_leader, 15000)) {
        fprintf(stderr, "kvr-bench raft: no leader elected\n");
        goto out;
    }
    char url[64];
    for (uint32_t w = 1; w <= b.n_workers; w++) {
        snprintf(url, sizeof url, "http://127.0.0.1:%u", 9000 + w);
        kvr_cmd c = {.type = KVR_CMD_WORKER_UP};
        c.u.worker = (kvr_worker_info){w, kvr_slice_of(b.ns), kvr_slice_of(b.model), kvr_slice_of(url), KVR_ROLE_BOTH, 64, 16384};
        kvr_sync_submit(b.nodes[1 + w % NODES], &c, on_worker, NULL);
    }
    if (!run_until(&b, workers_registered, 15000)) {
        fprintf(stderr, "kvr-bench raft: workers not registered\n");
        goto out;
    }
    b.lat_us = calloc(b.n_requests, sizeof *b.lat_us);
    int64_t t0 = kvr_mono_ns();
    for (uint64_t k = 0; k < b.inflight; k++)
        submit_next(&b);
    if (!run_until(&b, all_answered, 600000)) {
        fprintf(stderr, "kvr-bench raft: timed out (%llu of %llu answered)\n",
                (unsigned long long)b.answered, (unsigned long long)b.n_requests);
        goto out;
    }
    double secs = (double)(kvr_mono_ns() - t0) / 1e9;
    qsort(b.lat_us, b.n_requests, sizeof *b.lat_us, cmp_i64);
    int64_t p50 = b.lat_us[b.n_requests / 2], p99 = b.lat_us[(b.n_requests * 99) / 100];
    double dps = (double)b.n_requests / secs;
    kvr_sync_metrics m[NODES + 1];
    uint64_t digest[NODES + 1];
    for (int i = 1; i <= NODES; i++)
        kvr_sync_get_metrics(b.nodes[i], &m[i]);
    /* replicas agree (followers learn the last commit index with the next heartbeat) */
    run_until(&b, digests_equal, 5000);
    for (int i = 1; i <= NODES; i++)
        digest[i] = b.digest[i];
    if (!(digest[1] == digest[2] && digest[2] == digest[3]))
        for (int i = 1; i <= NODES; i++) {
            kvr_sync_state st;
            kvr_sync_get_state(b.nodes[i], &st);
            fprintf(stderr, "node %d: %s commit %llu applied %llu bookings %u digest %016llx\n", i,
                    st.role, (unsigned long long)st.commit_index, (unsigned long long)st.applied_index,
                    st.bookings, (unsigned long long)st.digest);
        }
    uint64_t proposals = 0, commands = 0;
    for (int i = 1; i <= NODES; i++)
        proposals += m[i].proposals;
    commands = m[1].commands_applied;
    double local = raftbench_local_rate(b.n_requests, b.seed, b.n_workers, b.model, b.ns);
    uint64_t stale = 0;
    uint64_t sim_n = b.n_requests < 200000 ? b.n_requests : 200000;
    double be = raftbench_best_effort_sim(sim_n, b.seed, b.n_workers, rate, delay_ms, hold_ms, b.model, b.ns, &stale);

    printf("route-and-reserve, 3 nodes in one process over loopback TCP\n");
    printf("  requests           %llu (route + free each), in flight %llu, workers %u\n",
           (unsigned long long)b.n_requests, (unsigned long long)b.inflight, b.n_workers);
    printf("  decisions_per_s    %.0f\n", dps);
    printf("  commands_per_s     %.0f (route + free)\n", 2.0 * dps);
    printf("  latency_us         p50 %lld  p99 %lld\n", (long long)p50, (long long)p99);
    printf("  log entries        %llu (%.1f commands/entry)\n", (unsigned long long)proposals,
           proposals ? (double)commands / (double)proposals : 0.0);
    printf("  errors             %llu, local answers %llu\n", (unsigned long long)b.errors,
           (unsigned long long)b.local_answers);
    printf("  digests equal      %s\n", digest[1] == digest[2] && digest[2] == digest[3] ? "yes" : "NO");
    printf("local_decisions_per_s %.0f (one FSM, encoded commands)\n", local);
    printf("best_effort_double_booking_rate %.4f (%llu of %llu; %.0f req/s, broadcast delay %.1f ms, hold %.0f ms)\n",
           be, (unsigned long long)stale, (unsigned long long)sim_n, rate, delay_ms, hold_ms);
    if (json) {
        FILE *f = fopen(json, "w");
        if (!f) {
            perror(json);
            goto out;
        }
        fprintf(f,
                "{\"routers\":%d,\"mode\":\"in-process\",\"requests\":%llu,\"inflight\":%llu,\"workers\":%u,"
                "\"decisions_per_s\":%.1f,\"commands_per_s\":%.1f,\"latency_us\":{\"p50\":%lld,\"p99\":%lld},"
                "\"log_entries\":%llu,\"errors\":%llu,\"local_answers\":%llu,\"digests_equal\":%s,"
                "\"local_decisions_per_s\":%.1f,\"best_effort_double_booking_rate\":%.6f,"
                "\"best_effort\":{\"requests\":%llu,\"stale\":%llu,\"rate_per_s\":%.1f,\"broadcast_delay_ms\":%.2f,\"hold_ms\":%.1f}}\n",
                NODES, (unsigned long long)b.n_requests, (unsigned long long)b.inflight, b.n_workers, dps,
                2.0 * dps, (long long)p50, (long long)p99, (unsigned long long)proposals,
                (unsigned long long)b.errors, (unsigned long long)b.local_answers,
                digest[1] == digest[2] && digest[2] == digest[3] ? "true" : "false", local, be,
                (unsigned long long)sim_n, (unsigned long long)stale, rate, delay_ms, hold_ms);
        fclose(f);
    }
    rc = b.errors == 0 ? 0 : 1;
out:
    for (int i = 1; i <= NODES; i++)
        if (b.nodes[i])
            kvr_sync_close(b.nodes[i], on_closed, NULL);
    uv_run(&b.loop, UV_RUN_DEFAULT);
    uv_loop_close(&b.loop);
    free(b.lat_us);
    nftw(dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    return rc;
}
