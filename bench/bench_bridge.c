/* kvr-bench bridge: how fast one kvr-bridge forwards an engine's ZMQ KV events into JetStream.
 *
 *   kvr-bench bridge [--blocks 1000000] [--blocks-per-batch 64] [--rate 10000] [--duration 10]
 *                    [--block-size 16] [--bridge PATH] [--routerd PATH] [--keep]
 *
 * Starts nats-server -js and one kvr-routerd (it creates the KVR_EVENTS stream), serves a
 * minimal engine /metrics + /health (a thread), binds a ZMQ PUB in vLLM's framing, and runs
 * kvr-bridge against them. Then:
 * 1. throughput: --blocks blocks in batches of --blocks-per-batch, published as fast as the PUB
 *    takes them; blocks/s = blocks / (first send .. last batch seen on the subject);
 * 2. latency at --rate blocks/s for --duration s (batches of 10 blocks every 10/rate s): per
 *    batch, ZMQ send -> the batch delivered on kvr.kv.<ns>.<id> by nats-server (a core
 *    subscription; the stream stores the same message as it delivers it, and the bridge's ack
 *    wait is the stream's), p50/p99/max;
 * and the bridge's CPU (utime+stime from /proc over each phase) and peak RSS (VmHWM).
 * Batches are identified by their first block hash (batch index + 1). */
#include "bench_util.h"
#include "kv_event.h"
#include "kvr_buf.h"
#include "kvr_mp.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <nats/nats.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

/* from bench_ingest.c */
typedef struct benchrd_env {
    char dir[PATH_MAX];
    char routerd[PATH_MAX];
    int nats_port, http_port;
    pid_t nats_pid, router_pid;
    char nats_url[64];
    bool keep;
} benchrd_env;
int benchrd_setup(benchrd_env *e, const char *argv0, const char *routerd, bool keep);
int benchrd_start_router(benchrd_env *e, const char *snapshot_interval);
int64_t benchrd_wait_ready(benchrd_env *e, int timeout_ms);
void benchrd_teardown(benchrd_env *e);

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* ------------------------------------------------------------------ the engine's /metrics */

static int http_fd = -1;
static int block_size = 16;

static void *http_main(void *arg)
{
    (void)arg;
    for (;;) {
        int c = accept(http_fd, NULL, NULL);
        if (c < 0)
            return NULL;
        char req[4096];
        ssize_t n = recv(c, req, sizeof req - 1, 0);
        (void)n;
        char body[512], resp[1024];
        snprintf(body, sizeof body,
                 "process_start_time_seconds 1700000000.0\n"
                 "vllm:num_requests_running{model_name=\"bench\",engine=\"0\"} 0.0\n"
                 "vllm:num_requests_waiting{model_name=\"bench\",engine=\"0\"} 0.0\n"
                 "vllm:kv_cache_usage_perc{model_name=\"bench\",engine=\"0\"} 0.0\n"
                 "vllm:cache_config_info{block_size=\"%d\",engine=\"0\",num_gpu_blocks="
                 "\"1000000\"} 1.0\n",
                 block_size);
        int len = snprintf(resp, sizeof resp,
                           "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                           "%zu\r\nConnection: close\r\n\r\n%s",
                           strlen(body), body);
        if (send(c, resp, (size_t)len, MSG_NOSIGNAL) < 0)
            perror("bench http");
        close(c);
    }
}

/* ------------------------------------------------------------------ the subject's subscriber */

static int64_t *sent_ns, *seen_ns;
static uint64_t n_slots;
static atomic_uint_fast64_t n_seen;
static atomic_bool sub_stop;

static void *sub_main(void *arg)
{
    natsSubscription *sub = arg;
    kvr_kv_decoder d;
    kvr_kv_decoder_init(&d, NULL);
    while (!atomic_load(&sub_stop)) {
        natsMsg *m = NULL;
        if (natsSubscription_NextMsg(&m, sub, 200) != NATS_OK)
            continue;
        int64_t t = now_ns();
        kvr_kv_batch b;
        if (kvr_kv_decode(&d, natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m), &b, NULL,
                          NULL) == 0 &&
            b.n_events > 0 && b.events[0].type == KVR_KV_STORED && b.events[0].n_hashes > 0) {
            uint64_t i = b.events[0].hashes[0] - 1;
            if (i < n_slots && seen_ns[i] == 0) {
                seen_ns[i] = t;
                atomic_fetch_add(&n_seen, 1);
            }
        }
        natsMsg_Destroy(m);
    }
    kvr_kv_decoder_free(&d);
    return NULL;
}

/* ------------------------------------------------------------------ publishing */

static uint64_t seq;
static void *pub;

/* One batch of nb blocks chained from the previous batch: hashes idx+1 (first), then unique. */
static int send_batch(kvr_buf *b, uint64_t idx, uint32_t nb, uint64_t *parent)
{
    kvr_buf_reset(b);
    kvr_mp_write_array(b, 3);
    kvr_mp_write_double(b, 0.0);
    kvr_mp_write_array(b, 1);
    kvr_mp_write_array(b, 8);
    kvr_mp_write_cstr(b, "BlockStored");
    kvr_mp_write_array(b, nb);
    kvr_mp_write_uint(b, idx + 1);
    for (uint32_t k = 1; k < nb; k++)
        kvr_mp_write_uint(b, (1ull << 62) + idx * 4096 + k);
    if (*parent)
        kvr_mp_write_uint(b, *parent);
    else
        kvr_mp_write_nil(b);
    kvr_mp_write_array(b, nb * (uint32_t)block_size);
    for (uint32_t k = 0; k < nb * (uint32_t)block_size; k++)
        kvr_mp_write_uint(b, (uint32_t)((idx * 7919 + k) & 0xffff));
    kvr_mp_write_uint(b, (uint64_t)block_size);
    kvr_mp_write_nil(b);
    kvr_mp_write_cstr(b, "GPU");
    kvr_mp_write_nil(b);
    kvr_mp_write_uint(b, 0);
    *parent = nb > 1 ? (1ull << 62) + idx * 4096 + nb - 1 : idx + 1;
    uint8_t s[8];
    for (int i = 0; i < 8; i++)
        s[i] = (uint8_t)(seq >> (56 - 8 * i));
    seq++;
    if (idx < n_slots)
        sent_ns[idx] = now_ns();
    if (zmq_send(pub, "", 0, ZMQ_SNDMORE) < 0 || zmq_send(pub, s, 8, ZMQ_SNDMORE) < 0 ||
        zmq_send(pub, b->base, b->len, 0) < 0)
        return -1;
    return 0;
}

static double proc_cpu_s(pid_t pid)
{
    char p[64], buf[1024];
    snprintf(p, sizeof p, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(p, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *r = strrchr(buf, ')');
    unsigned long ut = 0, st = 0;
    if (!r || sscanf(r + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static long proc_kb(pid_t pid, const char *key)
{
    char p[64], line[256];
    snprintf(p, sizeof p, "/proc/%d/status", (int)pid);
    FILE *f = fopen(p, "r");
    long v = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, key, strlen(key)) == 0)
            v = strtol(line + strlen(key), NULL, 10);
    if (f)
        fclose(f);
    return v;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static bool wait_seen(uint64_t want, int timeout_ms)
{
    for (int64_t end = now_ns() + (int64_t)timeout_ms * 1000000; now_ns() < end;) {
        if (atomic_load(&n_seen) >= want)
            return true;
        usleep(1000);
    }
    return false;
}

int kvr_bench_bridge(int argc, char **argv)
{
    uint64_t blocks = 1000000, bpb = 64, rate = 10000, duration = 10;
    const char *bridge = NULL, *routerd = NULL;
    bool keep = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--keep")) {
            keep = true;
            continue;
        }
        if (!v) {
            fprintf(stderr,
                    "usage: kvr-bench bridge [--blocks N] [--blocks-per-batch N] [--rate "
                    "BLOCKS/S] [--duration S] [--block-size N] [--bridge PATH] [--routerd PATH] "
                    "[--keep]\n");
            return 2;
        }
        i++;
        if (!strcmp(a, "--blocks"))
            blocks = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--blocks-per-batch"))
            bpb = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--rate"))
            rate = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--duration"))
            duration = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--block-size"))
            block_size = atoi(v);
        else if (!strcmp(a, "--bridge"))
            bridge = v;
        else if (!strcmp(a, "--routerd"))
            routerd = v;
        else {
            fprintf(stderr, "kvr-bench bridge: unknown flag %s\n", a);
            return 2;
        }
    }
    if (bpb < 1 || bpb > 4096 || blocks < bpb || rate < 10 || rate > 10000000 || duration < 1 ||
        block_size < 1 || block_size > 1024) {
        fprintf(stderr, "kvr-bench bridge: bad values\n");
        return 2;
    }
    uint64_t n_tp = blocks / bpb, n_lat = rate / 10 * duration;
    n_slots = n_tp + n_lat;
    sent_ns = calloc(n_slots, sizeof *sent_ns);
    seen_ns = calloc(n_slots, sizeof *seen_ns);
    if (!sent_ns || !seen_ns)
        return 1;
    benchrd_env e;
    if (benchrd_setup(&e, argv[0], routerd, keep) != 0)
        return 1;
    int rc = 1;
    pid_t bpid = -1;
    natsConnection *nc = NULL;
    natsSubscription *sub = NULL;
    pthread_t sub_th = 0;
    void *zctx = zmq_ctx_new();
    char bridge_bin[PATH_MAX];
    if (bridge)
        snprintf(bridge_bin, sizeof bridge_bin, "%s", bridge);
    else
        snprintf(bridge_bin, sizeof bridge_bin, "%.*s/kvr-bridge",
                 (int)(strlen(e.routerd) - strlen("/kvr-routerd")), e.routerd);
    if (benchrd_start_router(&e, "3600s") != 0 || benchrd_wait_ready(&e, 20000) < 0) {
        fprintf(stderr, "kvr-bench bridge: router not ready (see %s)\n", e.dir);
        goto out;
    }
    /* the engine: /metrics on an OS-picked port, PUB on another */
    http_fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof sa;
    if (http_fd < 0 || bind(http_fd, (struct sockaddr *)&sa, sizeof sa) != 0 ||
        listen(http_fd, 64) != 0 || getsockname(http_fd, (struct sockaddr *)&sa, &sl) != 0)
        goto out;
    pthread_t http_th;
    pthread_create(&http_th, NULL, http_main, NULL);
    pthread_detach(http_th);
    pub = zmq_socket(zctx, ZMQ_PUB);
    int hwm = 0, zero = 0;
    zmq_setsockopt(pub, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(pub, ZMQ_LINGER, &zero, sizeof zero);
    int zport = bench_free_port();
    char zep[64], eng[64], log[PATH_MAX + 16];
    snprintf(zep, sizeof zep, "tcp://127.0.0.1:%d", zport);
    snprintf(eng, sizeof eng, "http://127.0.0.1:%d", ntohs(sa.sin_port));
    if (zmq_bind(pub, zep) != 0) {
        fprintf(stderr, "kvr-bench bridge: bind %s: %s\n", zep, zmq_strerror(zmq_errno()));
        goto out;
    }
    /* the subscriber first, so it sees every batch the bridge publishes */
    natsOptions *no = NULL;
    natsOptions_Create(&no);
    natsOptions_SetURL(no, e.nats_url);
    natsOptions_SetMaxPendingMsgs(no, 10000000);
    if (natsConnection_Connect(&nc, no) != NATS_OK ||
        natsConnection_SubscribeSync(&sub, nc, "kvr.kv.bench.1") != NATS_OK ||
        natsSubscription_SetPendingLimits(sub, -1, -1) != NATS_OK) {
        natsOptions_Destroy(no);
        fprintf(stderr, "kvr-bench bridge: nats subscribe failed\n");
        goto out;
    }
    natsOptions_Destroy(no);
    natsConnection_Flush(nc);
    pthread_create(&sub_th, NULL, sub_main, sub);
    snprintf(log, sizeof log, "%s/bridge.log", e.dir);
    bpid = fork();
    if (bpid == 0) {
        setsid();
        FILE *f = freopen(log, "a", stdout);
        (void)f;
        dup2(1, 2);
        execl(bridge_bin, bridge_bin, "--engine-url", eng, "--zmq", zep, "--nats", e.nats_url,
              "--namespace", "bench", "--id", "1", "--scrape-interval", "250ms", "--announce-delay",
              "100ms", "--max-inflight", "4096", "--outbox-bytes", "512MiB", "--stats-interval",
              "1s", (char *)NULL);
        _exit(127);
    }
    /* until the bridge is subscribed and announced: send warm-up batches past n_slots (not
     * measured) until one comes out on the subject */
    kvr_buf b;
    kvr_buf_init(&b);
    uint64_t parent = 0;
    bool warm = false;
    for (int k = 0; k < 200 && !warm; k++) {
        send_batch(&b, n_slots + (uint64_t)k, 1, &parent);
        usleep(50000);
        /* the subscriber counts only measured batches: the bridge's stats line says it acks */
        FILE *f = fopen(log, "r");
        char line[1024];
        while (f && fgets(line, sizeof line, f))
            if (strstr(line, "msg=\"stats\"") && !strstr(line, " acked=0 "))
                warm = true;
        if (f)
            fclose(f);
    }
    if (!warm) {
        fprintf(stderr, "kvr-bench bridge: the bridge forwarded nothing (see %s)\n", log);
        goto out;
    }
    /* 1. throughput */
    double cpu0 = proc_cpu_s(bpid);
    int64_t t0 = now_ns();
    for (uint64_t i = 0; i < n_tp; i++)
        if (send_batch(&b, i, (uint32_t)bpb, &parent) != 0)
            goto out;
    int64_t t_sent = now_ns();
    bool all = wait_seen(n_tp, 120000);
    int64_t t_last = 0;
    for (uint64_t i = 0; i < n_tp; i++)
        if (seen_ns[i] > t_last)
            t_last = seen_ns[i];
    double cpu1 = proc_cpu_s(bpid);
    uint64_t got = atomic_load(&n_seen);
    double secs = (double)(t_last - t0) / 1e9;
    printf("throughput: %" PRIu64 " blocks in %" PRIu64 " batches of %" PRIu64 "; sent in %.3f s; "
           "%" PRIu64 " batches out on the subject%s; %.0f blocks/s; bridge CPU %.2f s (%.0f %% of "
           "a core)\n",
           n_tp * bpb, n_tp, bpb, (double)(t_sent - t0) / 1e9, got, all ? "" : " (MISSING SOME)",
           (double)got * (double)bpb / secs, cpu1 - cpu0, 100.0 * (cpu1 - cpu0) / secs);
    /* 2. latency at a fixed rate */
    uint64_t base = n_tp;
    int64_t period = (int64_t)(10.0 * 1e9 / (double)rate);
    cpu0 = proc_cpu_s(bpid);
    t0 = now_ns();
    for (uint64_t k = 0; k < n_lat; k++) {
        int64_t due = t0 + (int64_t)k * period;
        while (now_ns() < due) {
            int64_t w = (due - now_ns()) / 1000;
            if (w > 50)
                usleep((useconds_t)(w - 50));
        }
        if (send_batch(&b, base + k, 10, &parent) != 0)
            goto out;
    }
    wait_seen(n_tp + n_lat, 30000);
    cpu1 = proc_cpu_s(bpid);
    secs = (double)(now_ns() - t0) / 1e9;
    int64_t *lat = calloc(n_lat, sizeof *lat);
    uint64_t nl = 0;
    for (uint64_t k = 0; k < n_lat && lat; k++)
        if (seen_ns[base + k])
            lat[nl++] = seen_ns[base + k] - sent_ns[base + k];
    if (nl == 0) {
        fprintf(stderr, "kvr-bench bridge: no latency samples\n");
        free(lat);
        goto out;
    }
    qsort(lat, nl, sizeof *lat, cmp_i64);
    printf("latency at %" PRIu64 " blocks/s (batches of 10) for %" PRIu64 " s: %" PRIu64
           " of %" PRIu64 " batches seen; ZMQ send -> delivered on the subject p50 %.3f ms, "
           "p99 %.3f ms, max %.3f ms; bridge CPU %.0f %% of a core\n",
           rate, duration, nl, n_lat, lat[nl / 2] / 1e6, lat[nl * 99 / 100] / 1e6,
           lat[nl - 1] / 1e6, 100.0 * (cpu1 - cpu0) / secs);
    printf("bridge memory: RSS %ld KiB now, peak %ld KiB\n", proc_kb(bpid, "VmRSS:"),
           proc_kb(bpid, "VmHWM:"));
    free(lat);
    kvr_buf_free(&b);
    rc = all ? 0 : 1;
out:
    if (bpid > 0) {
        kill(bpid, SIGTERM);
        waitpid(bpid, NULL, 0);
    }
    atomic_store(&sub_stop, true);
    if (sub_th)
        pthread_join(sub_th, NULL);
    natsSubscription_Destroy(sub);
    natsConnection_Destroy(nc);
    if (pub)
        zmq_close(pub);
    zmq_ctx_term(zctx);
    if (http_fd >= 0)
        close(http_fd);
    benchrd_teardown(&e);
    free(sent_ns);
    free(seen_ns);
    return rc;
}
