/* kvr-bench ingest: end-to-end KV-event ingestion through JetStream into one kvr-routerd, then
 * warm restart (snapshot + replay) vs cold rebuild (whole stream) to /ready.
 *
 *   kvr-bench ingest [--blocks 1000000] [--workers 8] [--blocks-per-event 64] [--block-size 64]
 *                    [--routerd PATH] [--keep] [--json OUT]
 *
 * Starts its own nats-server -js (temp dir, OS-chosen port) and kvr-routerd (next to
 * kvr-bench unless --routerd). Ingestion: the router is up and ready first; the bench then
 * publishes all events (JetStream async publish) and measures from the first publish until
 * the router's applied stream sequence (GET /v1/state) reaches the last acked sequence.
 *
 * Also holds the helpers bench_route.c uses (benchrd_*): process spawn, HTTP state, preload. */
#include "bench_util.h"
#include "kv_event.h"
#include "kvr_buf.h"
#include "kvr_log.h"
#include "kvr_mp.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <nats/nats.h>
#include <pthread.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct benchrd_env {
    char dir[PATH_MAX];
    char routerd[PATH_MAX];
    int nats_port, http_port;
    pid_t nats_pid, router_pid;
    char nats_url[64];
    bool keep;
} benchrd_env;


static pid_t spawn(const char *log, char *const argv[])
{
    pid_t pid = fork();
    if (pid == 0) {
        setsid();
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execvp(argv[0], argv);
        _exit(127);
    }
    return pid;
}

static int wait_port(int port, int timeout_ms)
{
    int64_t end = kvr_mono_ms() + timeout_ms;
    while (kvr_mono_ms() < end) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        int rc = connect(fd, (struct sockaddr *)&a, sizeof(a));
        close(fd);
        if (rc == 0)
            return 0;
        usleep(20000);
    }
    return -1;
}

/* Sets up the temp dir, finds kvr-routerd, starts nats-server. */
int benchrd_setup(benchrd_env *e, const char *argv0, const char *routerd, bool keep)
{
    memset(e, 0, sizeof(*e));
    e->keep = keep;
    snprintf(e->dir, sizeof(e->dir), "%s/kvr-bench-rd.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(e->dir)) {
        perror("mkdtemp");
        return -1;
    }
    if (routerd) {
        snprintf(e->routerd, sizeof(e->routerd), "%s", routerd);
    } else {
        char self[PATH_MAX - 32];
        ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
        self[n > 0 ? n : 0] = 0;
        char *slash = strrchr(self, '/');
        if (slash)
            *slash = 0;
        snprintf(e->routerd, sizeof(e->routerd), "%s/kvr-routerd", n > 0 ? self : ".");
    }
    if (access(e->routerd, X_OK) != 0) {
        fprintf(stderr, "kvr-bench: %s is not executable (use --routerd)\n", e->routerd);
        return -1;
    }
    e->nats_port = bench_free_port();
    char conf[PATH_MAX + 64], js[PATH_MAX + 8];
    snprintf(conf, sizeof(conf), "%s/nats.conf", e->dir);
    snprintf(js, sizeof(js), "%s/js", e->dir);
    FILE *f = fopen(conf, "w");
    if (!f)
        return -1;
    fprintf(f, "listen: 127.0.0.1:%d\njetstream {\n  store_dir: \"%s\"\n  max_memory_store: 256MB\n"
               "  max_file_store: 8GB\n}\nmax_payload: 8MB\n", e->nats_port, js);
    /* KVR_BENCH_NATS_TLS=DIR (server.crt, server.key, ca.crt for 127.0.0.1): nats-server
     * TLS-only, router and client verify it with DIR/ca.crt (measuring TLS's cost) */
    const char *tls = getenv("KVR_BENCH_NATS_TLS");
    if (tls)
        fprintf(f, "tls {\n  cert_file: \"%s/server.crt\"\n  key_file: \"%s/server.key\"\n}\n", tls,
                tls);
    fclose(f);
    char log[PATH_MAX + 16];
    snprintf(log, sizeof(log), "%s/nats.log", e->dir);
    char *args[] = {"nats-server", "-c", conf, NULL};
    e->nats_pid = spawn(log, args);
    snprintf(e->nats_url, sizeof(e->nats_url), "nats://127.0.0.1:%d", e->nats_port);
    if (wait_port(e->nats_port, 10000) != 0) {
        fprintf(stderr, "kvr-bench: nats-server did not start (see %s)\n", log);
        return -1;
    }
    e->http_port = bench_free_port();
    return 0;
}

int benchrd_start_router(benchrd_env *e, const char *snapshot_interval)
{
    char http[64], data[PATH_MAX + 8], log[PATH_MAX + 16];
    snprintf(http, sizeof(http), "127.0.0.1:%d", e->http_port);
    snprintf(data, sizeof(data), "%s/r1", e->dir);
    snprintf(log, sizeof(log), "%s/router.log", e->dir);
    char ca[PATH_MAX];
    const char *tls = getenv("KVR_BENCH_NATS_TLS");
    snprintf(ca, sizeof ca, "%s/ca.crt", tls ? tls : "");
    char *args[] = {e->routerd, "--id", "1", "--nats", e->nats_url, "--http", http,
                    "--data-dir", data, "--snapshot-interval", (char *)snapshot_interval,
                    "--stream-max-bytes", "8GiB", "--heartbeat-misses", "30",
                    tls ? "--nats-tls-ca" : NULL, ca, NULL};
    e->router_pid = spawn(log, args);
    return wait_port(e->http_port, 10000);
}

/* SIGTERM (graceful: final snapshot) or SIGKILL; waits for the exit. */
int benchrd_stop_router(benchrd_env *e, int sig)
{
    if (e->router_pid <= 0)
        return 0;
    kill(e->router_pid, sig);
    int st = 0;
    waitpid(e->router_pid, &st, 0);
    e->router_pid = 0;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

void benchrd_teardown(benchrd_env *e)
{
    if (e->router_pid > 0)
        benchrd_stop_router(e, SIGKILL);
    if (e->nats_pid > 0) {
        kill(e->nats_pid, SIGKILL);
        waitpid(e->nats_pid, NULL, 0);
        e->nats_pid = 0;
    }
    if (!e->keep && e->dir[0]) {
        char cmd[PATH_MAX + 16];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", e->dir);
        if (system(cmd) != 0)
            fprintf(stderr, "kvr-bench: could not remove %s\n", e->dir);
    } else if (e->dir[0]) {
        fprintf(stderr, "kvr-bench: kept %s\n", e->dir);
    }
}

static size_t curl_sink(char *p, size_t sz, size_t n, void *ud)
{
    kvr_buf_append(ud, p, sz * n);
    return sz * n;
}

/* GET http://127.0.0.1:port/path. Returns the HTTP status (0 on failure); body appended. */
long benchrd_http_get(int port, const char *path, kvr_buf *body)
{
    char url[256];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", port, path);
    CURL *c = curl_easy_init();
    if (!c)
        return 0;
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 3000L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, curl_sink);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, body);
    long code = 0;
    if (curl_easy_perform(c) == CURLE_OK)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(c);
    return code;
}

/* index.stream_seq and index.entries from /v1/state; -1 on failure. */
int benchrd_state(benchrd_env *e, uint64_t *stream_seq, uint64_t *entries, char *digest, size_t dcap)
{
    kvr_buf b;
    kvr_buf_init(&b);
    long code = benchrd_http_get(e->http_port, "/v1/state", &b);
    int rc = -1;
    if (code == 200) {
        cJSON *j = cJSON_ParseWithLength(b.base, b.len);
        cJSON *idx = j ? cJSON_GetObjectItem(j, "index") : NULL;
        if (idx) {
            cJSON *s = cJSON_GetObjectItem(idx, "stream_seq");
            cJSON *en = cJSON_GetObjectItem(idx, "entries");
            cJSON *d = cJSON_GetObjectItem(idx, "digest");
            if (cJSON_IsNumber(s) && cJSON_IsNumber(en)) {
                *stream_seq = (uint64_t)s->valuedouble;
                *entries = (uint64_t)en->valuedouble;
                if (digest && dcap && cJSON_IsString(d))
                    snprintf(digest, dcap, "%s", d->valuestring);
                rc = 0;
            }
        }
        cJSON_Delete(j);
    }
    kvr_buf_free(&b);
    return rc;
}

/* Polls /ready until 200; returns ms waited or -1 on timeout. */
int64_t benchrd_wait_ready(benchrd_env *e, int timeout_ms)
{
    int64_t t0 = kvr_mono_ms();
    while (kvr_mono_ms() - t0 < timeout_ms) {
        kvr_buf b;
        kvr_buf_init(&b);
        long code = benchrd_http_get(e->http_port, "/ready", &b);
        kvr_buf_free(&b);
        if (code == 200)
            return kvr_mono_ms() - t0;
        usleep(5000);
    }
    return -1;
}

uint32_t benchrd_tok(uint64_t p, uint64_t k)
{
    return (uint32_t)((p * 1000003ull + k) & 0x7fffffffu);
}

/* Prefix layout shared with bench_route: prefix p (p = 0..n_prefixes-1) has blocks_per_prefix
 * blocks and is stored by workers (p % workers) + 1 and ((p + 1) % workers) + 1, the second
 * one only its first half. */
typedef struct benchrd_layout {
    uint32_t workers, block_size, blocks_per_prefix, blocks_per_event;
    uint64_t n_prefixes;
} benchrd_layout;

static uint64_t ext_hash(uint64_t w, uint64_t p, uint64_t b)
{
    return (w << 48) ^ (p << 16) ^ (b + 1);
}

/* cnats options for the bench's own helper connections (TLS with KVR_BENCH_NATS_TLS). */
static natsOptions *bench_nats_options(benchrd_env *e)
{
    natsOptions *o = NULL;
    natsOptions_Create(&o);
    natsOptions_SetURL(o, e->nats_url);
    const char *tls = getenv("KVR_BENCH_NATS_TLS");
    if (tls) {
        char ca[PATH_MAX];
        snprintf(ca, sizeof ca, "%s/ca.crt", tls);
        natsOptions_SetSecure(o, true);
        natsOptions_LoadCATrustedCertificates(o, ca);
    }
    return o;
}

/* Publishes the layout's store events with JetStream async publish; returns the number of
 * blocks, sets *last_seq and *publish_s. */
uint64_t benchrd_publish(benchrd_env *e, const benchrd_layout *L, uint64_t *last_seq,
                         double *publish_s, int64_t *t_first_ms)
{
    natsConnection *nc = NULL;
    jsCtx *js = NULL;
    natsOptions *o = bench_nats_options(e);
    if (natsConnection_Connect(&nc, o) != NATS_OK) {
        natsOptions_Destroy(o);
        fprintf(stderr, "kvr-bench: connect %s failed\n", e->nats_url);
        return 0;
    }
    natsOptions_Destroy(o);
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.PublishAsync.MaxPending = 4096;
    natsConnection_JetStream(&js, nc, &jo);
    uint32_t bs = L->block_size, be = L->blocks_per_event;
    uint64_t *hashes = malloc(be * sizeof(uint64_t));
    uint32_t *toks = malloc((size_t)be * bs * sizeof(uint32_t));
    kvr_buf out;
    kvr_buf_init(&out);
    uint64_t blocks = 0;
    int64_t t0 = kvr_mono_ms();
    *t_first_ms = t0;
    for (uint64_t p = 0; p < L->n_prefixes; p++) {
        for (int copy = 0; copy < 2; copy++) {
            uint64_t w = ((p + (uint64_t)copy) % L->workers) + 1;
            uint32_t nb = copy == 0 ? L->blocks_per_prefix : L->blocks_per_prefix / 2;
            for (uint32_t b0 = 0; b0 < nb; b0 += be) {
                uint32_t n = nb - b0 < be ? nb - b0 : be;
                for (uint32_t i = 0; i < n; i++) {
                    hashes[i] = ext_hash(w, p, b0 + i);
                    for (uint32_t j = 0; j < bs; j++)
                        toks[i * bs + j] = benchrd_tok(p, (uint64_t)(b0 + i) * bs + j);
                }
                kvr_kv_event ev = {.type = KVR_KV_STORED, .n_hashes = n, .hashes = hashes,
                                   .has_parent = b0 > 0, .parent = b0 > 0 ? ext_hash(w, p, b0 - 1) : 0,
                                   .n_tokens = n * bs, .tokens = toks, .block_size = bs};
                kvr_kv_batch batch = {.ts = 1.0, .n_events = 1, .events = &ev};
                kvr_buf_reset(&out);
                kvr_kv_encode(&out, &batch, KVR_KV_FORMAT_ARRAY, KVR_KV_HASH_INT);
                char subj[64];
                snprintf(subj, sizeof(subj), "kvr.kv.bench.%" PRIu64, w);
                natsStatus s = js_PublishAsync(js, subj, out.base, (int)out.len, NULL);
                if (s != NATS_OK) {
                    fprintf(stderr, "kvr-bench: publish: %s\n", natsStatus_GetText(s));
                    goto done;
                }
                blocks += n;
            }
        }
    }
done:;
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MaxWait = 60000;
    js_PublishAsyncComplete(js, &po);
    *publish_s = (double)(kvr_mono_ms() - t0) / 1000.0;
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    if (js_GetStreamInfo(&si, js, "KVR_EVENTS", NULL, &jerr) == NATS_OK) {
        *last_seq = si->State.LastSeq;
        jsStreamInfo_Destroy(si);
    }
    kvr_buf_free(&out);
    free(hashes);
    free(toks);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    return blocks;
}

/* Publishes one heartbeat for each of the layout's workers (namespace "bench", model "m"). */
void benchrd_heartbeats(natsConnection *nc, uint32_t workers, uint32_t block_size)
{
    for (uint32_t w = 1; w <= workers; w++) {
        kvr_buf b;
        kvr_buf_init(&b);
        kvr_mp_write_map(&b, 7);
        kvr_mp_write_cstr(&b, "id");
        kvr_mp_write_uint(&b, w);
        kvr_mp_write_cstr(&b, "namespace");
        kvr_mp_write_cstr(&b, "bench");
        kvr_mp_write_cstr(&b, "model");
        kvr_mp_write_cstr(&b, "m");
        kvr_mp_write_cstr(&b, "url");
        kvr_mp_write_cstr(&b, "http://127.0.0.1:1/");
        kvr_mp_write_cstr(&b, "block_size");
        kvr_mp_write_uint(&b, block_size);
        kvr_mp_write_cstr(&b, "capacity_blocks");
        kvr_mp_write_uint(&b, 1u << 22);
        kvr_mp_write_cstr(&b, "started_ms");
        kvr_mp_write_uint(&b, 1);
        char subj[64];
        snprintf(subj, sizeof(subj), "kvr.workers.bench.%u", w);
        natsConnection_Publish(nc, subj, b.base, (int)b.len);
        kvr_buf_free(&b);
    }
    natsConnection_FlushTimeout(nc, 2000);
}

typedef struct benchrd_hb {
    pthread_t th;
    natsConnection *nc;
    uint32_t workers, block_size;
    volatile bool stop;
} benchrd_hb;

static void *hb_main(void *arg)
{
    benchrd_hb *h = arg;
    while (!h->stop) {
        benchrd_heartbeats(h->nc, h->workers, h->block_size);
        for (int i = 0; i < 10 && !h->stop; i++)
            usleep(50000);
    }
    return NULL;
}

/* A thread that beats for every worker twice a second until benchrd_hb_stop. */
benchrd_hb *benchrd_hb_start(benchrd_env *e, uint32_t workers, uint32_t block_size)
{
    benchrd_hb *h = calloc(1, sizeof(*h));
    natsOptions *o = h ? bench_nats_options(e) : NULL;
    if (!h || natsConnection_Connect(&h->nc, o) != NATS_OK) {
        natsOptions_Destroy(o);
        free(h);
        return NULL;
    }
    natsOptions_Destroy(o);
    h->workers = workers;
    h->block_size = block_size;
    pthread_create(&h->th, NULL, hb_main, h);
    return h;
}

void benchrd_hb_stop(benchrd_hb *h)
{
    if (!h)
        return;
    h->stop = true;
    pthread_join(h->th, NULL);
    natsConnection_Destroy(h->nc);
    free(h);
}

/* Waits until the router applied last_seq; returns the monotonic ms when it did, -1 on timeout. */
int64_t benchrd_wait_seq(benchrd_env *e, uint64_t last_seq, int timeout_ms)
{
    int64_t t0 = kvr_mono_ms();
    while (kvr_mono_ms() - t0 < timeout_ms) {
        uint64_t s = 0, en = 0;
        if (benchrd_state(e, &s, &en, NULL, 0) == 0 && s >= last_seq)
            return kvr_mono_ms();
        usleep(2000);
    }
    return -1;
}

static void usage(void)
{
    printf("usage: kvr-bench ingest [--blocks N (1000000)] [--workers 8] [--blocks-per-event 64]\n"
           "                        [--block-size 64] [--routerd PATH] [--keep] [--json OUT]\n");
}

int kvr_bench_ingest(int argc, char **argv)
{
    uint64_t want_blocks = 1000000;
    benchrd_layout L = {.workers = 8, .block_size = 64, .blocks_per_prefix = 256, .blocks_per_event = 64};
    const char *routerd = NULL, *json = NULL;
    bool keep = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--blocks") && v)
            want_blocks = strtoull(v, NULL, 10), i++;
        else if (!strcmp(a, "--workers") && v)
            L.workers = (uint32_t)atoi(v), i++;
        else if (!strcmp(a, "--blocks-per-event") && v)
            L.blocks_per_event = (uint32_t)atoi(v), i++;
        else if (!strcmp(a, "--block-size") && v)
            L.block_size = (uint32_t)atoi(v), i++;
        else if (!strcmp(a, "--routerd") && v)
            routerd = v, i++;
        else if (!strcmp(a, "--json") && v)
            json = v, i++;
        else if (!strcmp(a, "--keep"))
            keep = true;
        else {
            usage();
            return strcmp(a, "--help") ? 2 : 0;
        }
    }
    if (L.workers < 2 || L.block_size == 0 || L.blocks_per_event == 0 || want_blocks == 0) {
        usage();
        return 2;
    }
    /* each prefix yields blocks_per_prefix * 1.5 blocks (one full copy, one half copy) */
    L.n_prefixes = want_blocks * 2 / (L.blocks_per_prefix * 3) + 1;
    kvr_log_setup("bench", NULL, KVR_LOG_WARN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    benchrd_env e;
    benchrd_hb *hb = NULL;
    int rc = 1;
    if (benchrd_setup(&e, argv[0], routerd, keep) != 0)
        goto out;
    if (benchrd_start_router(&e, "0") != 0 || benchrd_wait_ready(&e, 20000) < 0) {
        fprintf(stderr, "kvr-bench: router did not become ready\n");
        goto out;
    }
    hb = benchrd_hb_start(&e, L.workers, L.block_size);
    usleep(300000);
    uint64_t last_seq = 0;
    double pub_s = 0;
    int64_t t_first = 0;
    uint64_t blocks = benchrd_publish(&e, &L, &last_seq, &pub_s, &t_first);
    int64_t t_done = benchrd_wait_seq(&e, last_seq, 300000);
    if (t_done < 0) {
        fprintf(stderr, "kvr-bench: router never reached seq %" PRIu64 "\n", last_seq);
        goto out;
    }
    double ingest_s = (double)(t_done - t_first) / 1000.0;
    uint64_t seq = 0, entries = 0;
    char digest[32] = "";
    benchrd_state(&e, &seq, &entries, digest, sizeof(digest));
    printf("ingest: %" PRIu64 " blocks in %" PRIu64 " messages; published in %.2f s (%.0f blocks/s); "
           "applied in %.2f s: %.0f blocks/s; index entries %" PRIu64 "\n",
           blocks, last_seq, pub_s, blocks / pub_s, ingest_s, blocks / ingest_s, entries);

    /* warm restart: SIGTERM writes the final snapshot; restart loads it */
    int64_t t_stop = kvr_mono_ms();
    int st = benchrd_stop_router(&e, SIGTERM);
    double stop_s = (double)(kvr_mono_ms() - t_stop) / 1000.0;
    int64_t t_start = kvr_mono_ms();
    if (benchrd_start_router(&e, "0") != 0) {
        fprintf(stderr, "kvr-bench: restart failed\n");
        goto out;
    }
    int64_t warm_ms = benchrd_wait_ready(&e, 120000);
    warm_ms = warm_ms < 0 ? -1 : kvr_mono_ms() - t_start;
    uint64_t wseq = 0, wentries = 0;
    char wdigest[32] = "";
    benchrd_state(&e, &wseq, &wentries, wdigest, sizeof(wdigest));
    printf("warm restart: SIGTERM + final snapshot %.2f s (exit %d); start to /ready %" PRId64
           " ms; entries %" PRIu64 " digest %s (%s)\n",
           stop_s, st, warm_ms, wentries, wdigest, strcmp(wdigest, digest) ? "DIFFERS" : "equal");

    /* cold: no snapshot, rebuild from the whole stream */
    benchrd_stop_router(&e, SIGKILL);
    char snap[PATH_MAX + 32];
    snprintf(snap, sizeof(snap), "%s/r1/index/index.mdb", e.dir);
    unlink(snap);
    t_start = kvr_mono_ms();
    if (benchrd_start_router(&e, "0") != 0) {
        fprintf(stderr, "kvr-bench: restart failed\n");
        goto out;
    }
    int64_t cold_ms = benchrd_wait_ready(&e, 300000);
    cold_ms = cold_ms < 0 ? -1 : kvr_mono_ms() - t_start;
    uint64_t cseq = 0, centries = 0;
    char cdigest[32] = "";
    benchrd_state(&e, &cseq, &centries, cdigest, sizeof(cdigest));
    printf("cold rebuild: start to /ready %" PRId64 " ms; entries %" PRIu64 " digest %s (%s)\n",
           cold_ms, centries, cdigest, strcmp(cdigest, digest) ? "DIFFERS" : "equal");
    if (json) {
        FILE *f = fopen(json, "w");
        if (f) {
            fprintf(f,
                    "{\"blocks\":%" PRIu64 ",\"messages\":%" PRIu64 ",\"publish_s\":%.3f,"
                    "\"publish_blocks_per_s\":%.0f,\"ingest_s\":%.3f,\"blocks_per_s\":%.0f,"
                    "\"entries\":%" PRIu64 ",\"digest\":\"%s\",\"warm_restart_ms\":%" PRId64
                    ",\"warm_digest_equal\":%s,\"sigterm_snapshot_s\":%.3f,"
                    "\"cold_rebuild_ms\":%" PRId64 ",\"cold_digest_equal\":%s}\n",
                    blocks, last_seq, pub_s, blocks / pub_s, ingest_s, blocks / ingest_s, entries,
                    digest, warm_ms, strcmp(wdigest, digest) ? "false" : "true", stop_s, cold_ms,
                    strcmp(cdigest, digest) ? "false" : "true");
            fclose(f);
        }
    }
    rc = strcmp(wdigest, digest) || strcmp(cdigest, digest) ? 1 : 0;
out:
    benchrd_hb_stop(hb);
    benchrd_teardown(&e);
    nats_Close();
    curl_global_cleanup();
    return rc;
}
