/* kvr-bench route: route requests over NATS (kvr.route request/reply) against one real
 * kvr-routerd whose index was preloaded through JetStream.
 *
 *   kvr-bench route [--entries 1000000] [--workers 8] [--blocks 256] [--inflight 128]
 *                   [--duration 10] [--routerd PATH] [--keep] [--json OUT]
 *
 * Starts nats-server -js and kvr-routerd (local mode), preloads --entries index entries as
 * KV events (bench_ingest.c's layout: each prefix stored whole by one worker and half by the
 * next), heartbeats the workers, then keeps --inflight requests outstanding for --duration
 * seconds from one libuv loop (kvr_nats async requests). Every request asks for a whole
 * preloaded prefix (--blocks seq hashes); every answered booking is freed right away
 * (kvr.route.event "free") so the router's booking table stays at its steady state.
 * Reports routes/s and client-side latency percentiles (request sent -> reply on the loop).
 * --pin: the router on CPU 0, nats-server and this client on CPU 1 (every thread, before the
 * timed run): on the 2-core dev machine this avoids cross-CPU wake-ups and migrations between
 * the three processes' threads, which cost more than the routing itself. */
#define _GNU_SOURCE /* sched_setaffinity, CPU_SET */
#include "kv_event.h"
#include "kvr_buf.h"
#include "kvr_hash.h"
#include "kvr_log.h"
#include "kvr_mp.h"
#include "kvr_nats.h"
#include "route_msg.h"

#include <curl/curl.h>
#include <dirent.h>
#include <inttypes.h>
#include <sched.h>
#include <limits.h>
#include <nats/nats.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* helpers from bench_ingest.c */
typedef struct benchrd_env {
    char dir[PATH_MAX];
    char routerd[PATH_MAX];
    int nats_port, http_port;
    pid_t nats_pid, router_pid;
    char nats_url[64];
    bool keep;
} benchrd_env;
typedef struct benchrd_layout {
    uint32_t workers, block_size, blocks_per_prefix, blocks_per_event;
    uint64_t n_prefixes;
} benchrd_layout;
typedef struct benchrd_hb benchrd_hb;
int benchrd_setup(benchrd_env *e, const char *argv0, const char *routerd, bool keep);
int benchrd_start_router(benchrd_env *e, const char *snapshot_interval);
void benchrd_teardown(benchrd_env *e);
int64_t benchrd_wait_ready(benchrd_env *e, int timeout_ms);
int64_t benchrd_wait_seq(benchrd_env *e, uint64_t last_seq, int timeout_ms);
int benchrd_state(benchrd_env *e, uint64_t *stream_seq, uint64_t *entries, char *digest, size_t dcap);
uint64_t benchrd_publish(benchrd_env *e, const benchrd_layout *L, uint64_t *last_seq,
                         double *publish_s, int64_t *t_first_ms);
uint32_t benchrd_tok(uint64_t p, uint64_t k);
benchrd_hb *benchrd_hb_start(benchrd_env *e, uint32_t workers, uint32_t block_size);
void benchrd_hb_stop(benchrd_hb *h);
long benchrd_http_get(int port, const char *path, kvr_buf *body);

#define N_QUERY_PREFIXES 512

typedef struct rb {
    uv_loop_t loop;
    kvr_nats nats;
    uv_timer_t stop_timer;
    bool stopping;
    int inflight, max_inflight;
    uint64_t sent, ok, errors, timeouts, overlap_sum;
    uint64_t next_id;
    kvr_buf *payloads; /* N_QUERY_PREFIXES pre-encoded requests (request id patched) */
    size_t rid_off[N_QUERY_PREFIXES];
    double *lat_us;
    size_t n_lat, cap_lat;
    uint64_t rng;
    int64_t t0_ns, t_end_ns;
    uint64_t mode_local, mode_raft;
} rb;

typedef struct rq {
    rb *b;
    int64_t t0_ns;
    uint8_t rid[16];
} rq;

static uint64_t rnd(rb *b)
{
    b->rng ^= b->rng << 13;
    b->rng ^= b->rng >> 7;
    b->rng ^= b->rng << 17;
    return b->rng;
}

static void send_one(rb *b);

static void on_reply(int status, const char *data, size_t len, void *cbdata)
{
    rq *q = cbdata;
    rb *b = q->b;
    b->inflight--;
    int64_t now = kvr_mono_ns();
    if (status == 0) {
        kvr_route_reply rep;
        bool ok = kvr_route_reply_decode(data, len, &rep, NULL) == 0 && rep.ok;
        uint64_t overlap = ok ? rep.overlap_blocks : 0;
        kvr_slice mode = ok ? rep.mode : (kvr_slice){0};
        if (ok) {
            b->ok++;
            b->overlap_sum += overlap;
            if (kvr_slice_eq_cstr(mode, "raft"))
                b->mode_raft++;
            else
                b->mode_local++;
            if (b->n_lat < b->cap_lat)
                b->lat_us[b->n_lat++] = (double)(now - q->t0_ns) / 1000.0;
            /* free the booking */
            kvr_buf ev;
            kvr_buf_init(&ev);
            kvr_route_event fe = {.type = KVR_ROUTE_EVENT_FREE};
            memcpy(fe.request_id, q->rid, sizeof fe.request_id);
            if (kvr_route_event_encode(&ev, &fe) == 0)
                kvr_nats_publish(&b->nats, "kvr.route.event", ev.base, ev.len);
            kvr_buf_free(&ev);
        } else {
            b->errors++;
        }
    } else if (status == KVR_ETIMEDOUT) {
        b->timeouts++;
    } else {
        b->errors++;
    }
    free(q);
    if (!b->stopping)
        send_one(b);
}

static void send_one(rb *b)
{
    size_t k = (size_t)(rnd(b) % N_QUERY_PREFIXES);
    rq *q = malloc(sizeof(*q));
    if (!q)
        return;
    q->b = b;
    uint64_t id = ++b->next_id;
    memset(q->rid, 0, 16);
    memcpy(q->rid, &id, 8);
    memcpy(q->rid + 8, "kvrbench", 8);
    memcpy(b->payloads[k].base + b->rid_off[k], q->rid, 16);
    q->t0_ns = kvr_mono_ns();
    int rc = kvr_nats_request(&b->nats, "kvr.route", b->payloads[k].base, b->payloads[k].len, 5000,
                              on_reply, q);
    if (rc != 0) {
        free(q);
        b->errors++;
        return;
    }
    b->inflight++;
    b->sent++;
}

static void on_stop(uv_timer_t *t)
{
    rb *b = t->data;
    b->stopping = true;
    b->t_end_ns = kvr_mono_ns();
}

/* Keeps the index changing so that the router has something to snapshot every interval. */
static uv_timer_t touch_timer;
static uint64_t touch_n;
static void on_touch(uv_timer_t *t)
{
    rb *b = t->data;
    if (b->stopping)
        return;
    uint64_t p = 1000000000ull + touch_n++;
    uint64_t h = p;
    uint32_t toks[64];
    for (uint32_t j = 0; j < 64; j++)
        toks[j] = benchrd_tok(p, j);
    kvr_kv_event ev = {.type = KVR_KV_STORED, .n_hashes = 1, .hashes = &h, .n_tokens = 64,
                       .tokens = toks, .block_size = 64};
    kvr_kv_batch batch = {.ts = 1.0, .n_events = 1, .events = &ev};
    kvr_buf out;
    kvr_buf_init(&out);
    kvr_kv_encode(&out, &batch, KVR_KV_FORMAT_ARRAY, KVR_KV_HASH_INT);
    kvr_nats_publish(&b->nats, "kvr.kv.bench.1", out.base, out.len);
    kvr_buf_free(&out);
}

static bool conn_up;
static void on_state(kvr_nats *kn, kvr_nats_state st, void *data)
{
    if (st == KVR_NATS_CONNECTED || st == KVR_NATS_RECONNECTED)
        conn_up = true;
}

static bool nats_closed;
static void on_closed(kvr_nats *kn)
{
    nats_closed = true;
}

/* Every thread of pid (0: this process) on one CPU. Returns threads pinned, or -1. */
static int pin_process(pid_t pid, int cpu)
{
    char dir[64];
    if (pid > 0)
        snprintf(dir, sizeof(dir), "/proc/%d/task", (int)pid);
    else
        snprintf(dir, sizeof(dir), "/proc/self/task");
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] < '0' || de->d_name[0] > '9')
            continue;
        if (sched_setaffinity((pid_t)atoi(de->d_name), sizeof(set), &set) == 0)
            n++;
    }
    closedir(d);
    return n > 0 ? n : -1;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const double *v, size_t n, double p)
{
    if (n == 0)
        return 0;
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

static void usage(void)
{
    printf("usage: kvr-bench route [--entries 1000000] [--workers 8] [--blocks 256] [--inflight 128]\n"
           "                       [--duration 10] [--snapshot-interval 0|1s|...] [--routerd PATH]\n"
           "                       [--pin] [--keep] [--json OUT]\n"
           "  --pin: router on CPU 0, nats-server and this client on CPU 1 (needs 2 CPUs)\n"
           "  --snapshot-interval: the router's (0 = none during the run); snapshots only happen\n"
           "  when the index changed, so the bench re-publishes one event per interval to force them\n");
}

int kvr_bench_route(int argc, char **argv)
{
    uint64_t entries = 1000000;
    uint32_t workers = 8, blocks = 256;
    int inflight = 128, duration = 10;
    const char *routerd = NULL, *json = NULL, *snap = "0";
    bool keep = false, pin = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--pin"))
            pin = true;
        else if (!strcmp(a, "--entries") && v)
            entries = strtoull(v, NULL, 10), i++;
        else if (!strcmp(a, "--workers") && v)
            workers = (uint32_t)atoi(v), i++;
        else if (!strcmp(a, "--blocks") && v)
            blocks = (uint32_t)atoi(v), i++;
        else if (!strcmp(a, "--inflight") && v)
            inflight = atoi(v), i++;
        else if (!strcmp(a, "--duration") && v)
            duration = atoi(v), i++;
        else if (!strcmp(a, "--routerd") && v)
            routerd = v, i++;
        else if (!strcmp(a, "--snapshot-interval") && v)
            snap = v, i++;
        else if (!strcmp(a, "--json") && v)
            json = v, i++;
        else if (!strcmp(a, "--keep"))
            keep = true;
        else {
            usage();
            return strcmp(a, "--help") ? 2 : 0;
        }
    }
    if (workers < 2 || blocks == 0 || blocks > 4096 || inflight < 1 || duration < 1) {
        usage();
        return 2;
    }
    kvr_log_setup("bench", NULL, KVR_LOG_WARN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    benchrd_layout L = {.workers = workers, .block_size = 64, .blocks_per_prefix = blocks,
                        .blocks_per_event = 64};
    L.n_prefixes = entries * 2 / ((uint64_t)blocks * 3) + 1;
    benchrd_env e;
    benchrd_hb *hb = NULL;
    rb *b = calloc(1, sizeof(*b));
    int rc = 1;
    if (!b)
        return 1;
    if (benchrd_setup(&e, argv[0], routerd, keep) != 0)
        goto out;
    if (benchrd_start_router(&e, snap) != 0 || benchrd_wait_ready(&e, 20000) < 0) {
        fprintf(stderr, "kvr-bench: router did not become ready\n");
        goto out;
    }
    hb = benchrd_hb_start(&e, workers, 64);
    usleep(300000);
    uint64_t last_seq = 0, st_entries = 0, st_seq = 0;
    double pub_s = 0;
    int64_t t_first = 0;
    uint64_t nblocks = benchrd_publish(&e, &L, &last_seq, &pub_s, &t_first);
    if (benchrd_wait_seq(&e, last_seq, 300000) < 0) {
        fprintf(stderr, "kvr-bench: preload not applied\n");
        goto out;
    }
    benchrd_state(&e, &st_seq, &st_entries, NULL, 0);
    printf("preloaded %" PRIu64 " blocks -> %" PRIu64 " index entries (%u workers)\n", nblocks,
           st_entries, workers);

    /* pre-encode one request per query prefix */
    b->payloads = calloc(N_QUERY_PREFIXES, sizeof(kvr_buf));
    uint32_t *toks = malloc((size_t)blocks * 64 * sizeof(uint32_t));
    uint64_t *seq = malloc(blocks * sizeof(uint64_t));
    if (!b->payloads || !toks || !seq)
        goto out;
    b->rng = 0x9E3779B97F4A7C15ull;
    for (size_t k = 0; k < N_QUERY_PREFIXES; k++) {
        uint64_t p = rnd(b) % L.n_prefixes;
        for (uint64_t t = 0; t < (uint64_t)blocks * 64; t++)
            toks[t] = benchrd_tok(p, t);
        size_t ns = kvr_hash_seq(toks, (size_t)blocks * 64, 64, false, 0, seq, blocks);
        kvr_buf *pb = &b->payloads[k];
        kvr_buf_init(pb);
        kvr_route_req req = {.frontend_id = 1,
                            .model = {"m", 1},
                            .ns = {"bench", 5},
                            .role = {"both", 4},
                            .tokens = (uint32_t)blocks * 64,
                            .seq_hashes = seq,
                            .n_hashes = ns};
        memcpy(req.request_id, "0123456789abcdef", 16);
        if (kvr_route_req_encode(pb, &req) != 0)
            goto out;
        b->rid_off[k] = KVR_ROUTE_REQ_ID_OFFSET;
    }
    free(toks);
    free(seq);
    b->cap_lat = (size_t)duration * 200000 + 1000;
    b->lat_us = malloc(b->cap_lat * sizeof(double));
    if (!b->lat_us)
        goto out;

    if (pin) {
        if (pin_process(e.router_pid, 0) < 0 || pin_process(e.nats_pid, 1) < 0 ||
            pin_process(0, 1) < 0) {
            fprintf(stderr, "kvr-bench: --pin: setting CPU affinity failed (needs CPUs 0 and 1)\n");
            goto out;
        }
    }
    uv_loop_init(&b->loop);
    kvr_err err = {0};
    char tls_ca[PATH_MAX];
    snprintf(tls_ca, sizeof tls_ca, "%s/ca.crt", getenv("KVR_BENCH_NATS_TLS") ? getenv("KVR_BENCH_NATS_TLS") : "");
    kvr_nats_opts no = {.url = e.nats_url, .name = "kvr-bench-route", .on_state = on_state,
                        .tls_ca_file = getenv("KVR_BENCH_NATS_TLS") ? tls_ca : NULL};
    if (kvr_nats_init(&b->nats, &b->loop, &no, &err) != 0) {
        fprintf(stderr, "kvr-bench: %s\n", err.msg);
        goto out;
    }
    while (!conn_up)
        uv_run(&b->loop, UV_RUN_ONCE);
    /* warm-up: a few sequential requests (route subscription is known to the server) */
    b->max_inflight = inflight;
    uv_timer_init(&b->loop, &b->stop_timer);
    b->stop_timer.data = b;
    uv_timer_start(&b->stop_timer, on_stop, (uint64_t)duration * 1000, 0);
    uv_timer_init(&b->loop, &touch_timer);
    touch_timer.data = b;
    if (strcmp(snap, "0") != 0)
        uv_timer_start(&touch_timer, on_touch, 200, 200);
    b->t0_ns = kvr_mono_ns();
    for (int i = 0; i < inflight; i++)
        send_one(b);
    while (!b->stopping || b->inflight > 0)
        uv_run(&b->loop, UV_RUN_ONCE);
    double secs = (double)(b->t_end_ns - b->t0_ns) / 1e9;
    kvr_nats_close(&b->nats, on_closed);
    uv_close((uv_handle_t *)&b->stop_timer, NULL);
    uv_close((uv_handle_t *)&touch_timer, NULL);
    while (!nats_closed)
        uv_run(&b->loop, UV_RUN_ONCE);
    uv_run(&b->loop, UV_RUN_DEFAULT);
    uv_loop_close(&b->loop);

    qsort(b->lat_us, b->n_lat, sizeof(double), cmp_d);
    double p50 = pct(b->lat_us, b->n_lat, 0.50), p90 = pct(b->lat_us, b->n_lat, 0.90),
           p99 = pct(b->lat_us, b->n_lat, 0.99), mx = b->n_lat ? b->lat_us[b->n_lat - 1] : 0;
    double rps = (double)b->ok / secs;
    double avg_overlap = b->ok ? (double)b->overlap_sum / (double)b->ok : 0;
    printf("route: %" PRIu64 " ok, %" PRIu64 " errors, %" PRIu64 " timeouts in %.2f s: %.0f routes/s; "
           "latency us p50 %.0f p90 %.0f p99 %.0f max %.0f; inflight %d; %u blocks/request; "
           "avg overlap %.1f blocks; modes local %" PRIu64 " raft %" PRIu64 "\n",
           b->ok, b->errors, b->timeouts, secs, rps, p50, p90, p99, mx, inflight, blocks,
           avg_overlap, b->mode_local, b->mode_raft);
    /* the router's own view of its latency */
    kvr_buf mb;
    kvr_buf_init(&mb);
    benchrd_http_get(e.http_port, "/metrics", &mb);
    double r_sum = 0, r_cnt = 0;
    for (char *line = mb.base, *end = mb.base + mb.len; line && line < end;) {
        char *nl = memchr(line, '\n', (size_t)(end - line));
        if (!strncmp(line, "kvr_routerd_route_latency_seconds_sum ", 38))
            r_sum = strtod(line + 38, NULL);
        else if (!strncmp(line, "kvr_routerd_route_latency_seconds_count ", 40))
            r_cnt = strtod(line + 40, NULL);
        line = nl ? nl + 1 : NULL;
    }
    kvr_buf_free(&mb);
    double router_avg_us = r_cnt > 0 ? r_sum / r_cnt * 1e6 : 0;
    printf("router-side mean route latency %.1f us over %.0f routes\n", router_avg_us, r_cnt);
    kvr_buf sb;
    kvr_buf_init(&sb);
    benchrd_http_get(e.http_port, "/metrics", &sb);
    double snaps = 0;
    for (char *line = sb.base, *end = sb.base + sb.len; line && line < end;) {
        char *nl = memchr(line, '\n', (size_t)(end - line));
        if (!strncmp(line, "kvr_routerd_snapshots_total ", 28))
            snaps = strtod(line + 28, NULL);
        line = nl ? nl + 1 : NULL;
    }
    kvr_buf_free(&sb);
    printf("router snapshots written: %.0f (--snapshot-interval %s)\n", snaps, snap);
    if (json) {
        FILE *f = fopen(json, "w");
        if (f) {
            fprintf(f,
                    "{\"routes_per_s\":%.0f,\"ok\":%" PRIu64 ",\"errors\":%" PRIu64
                    ",\"timeouts\":%" PRIu64 ",\"duration_s\":%.3f,\"inflight\":%d,"
                    "\"blocks_per_request\":%u,\"workers\":%u,\"entries\":%" PRIu64 ","
                    "\"latency_us\":{\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"max\":%.1f},"
                    "\"avg_overlap_blocks\":%.2f,\"router_mean_latency_us\":%.1f,"
                    "\"snapshot_interval\":\"%s\",\"snapshots\":%.0f,\"pin\":%s}\n",
                    rps, b->ok, b->errors, b->timeouts, secs, inflight, blocks, workers,
                    st_entries, p50, p90, p99, mx, avg_overlap, router_avg_us, snap, snaps,
                    pin ? "true" : "false");
            fclose(f);
        }
    }
    rc = b->ok > 0 && b->errors == 0 && b->timeouts == 0 ? 0 : 1;
out:
    benchrd_hb_stop(hb);
    benchrd_teardown(&e);
    if (b->payloads) {
        for (size_t k = 0; k < N_QUERY_PREFIXES; k++)
            kvr_buf_free(&b->payloads[k]);
        free(b->payloads);
    }
    free(b->lat_us);
    free(b);
    kvr_nats_global_shutdown(2000);
    curl_global_cleanup();
    return rc;
}
