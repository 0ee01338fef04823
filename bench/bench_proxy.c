/* kvr-bench proxy: what the frontend costs on the request path.
 *
 * Starts its own nats-server, one kvr-worker (fast simulated clock), one kvr-frontend
 * (--router-mode round-robin: pure proxy path, no router) and HAProxy 2.6 (generated config,
 * `balance leastconn`) in front of the same worker. Then:
 *   1. TTFT: sequential streaming requests, interleaved direct / frontend / haproxy so all
 *      three see the same noise; median and p90 of each; overheads = median(via) - median(direct).
 *   2. CPU per proxied streaming request: frontend utime+stime (/proc/<pid>/stat) over a batch.
 *   3. Throughput: closed loop with C concurrent streams through the frontend for S seconds;
 *      requests/s and the frontend's CPU utilisation (requests/s per core = rps / util).
 * TTFT is measured at the first body byte holding an SSE data event.
 *
 *   kvr-bench proxy [--bin DIR] [--requests 300] [--prompt-len 256] [--max-tokens 4]
 *                   [--cpu-requests 2000] [--load-seconds 10] [--load-concurrency 64]
 *                   [--speedup 1000] [--router-mode round-robin|kv] [--json OUT] [--keep]
 * With --router-mode kv one kvr-routerd (local mode) is started too and every frontend request
 * asks it over NATS (kvr.route), so the figures include the route round trip. */
#define _GNU_SOURCE /* memmem */
#include "bench_util.h"
#include "kvr_bench.h"
#include "kvr_buf.h"
#include "kvr_flags.h"
#include "kvr_log.h"
#include "run_cluster.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum { T_DIRECT, T_FRONTEND, T_HAPROXY, T_N };
static const char *tname[T_N] = {"direct", "frontend", "haproxy"};

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof a;
    int port = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &l) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p)
{
    if (!n)
        return 0;
    qsort(v, n, sizeof *v, cmp_d);
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

static long rss_kb(int pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    long v = -1;
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld", &v) == 1)
            break;
    fclose(f);
    return v;
}

/* ---- one transfer ---- */
typedef struct xfer {
    CURL *h;
    int64_t t0_ns, t_first_ns;
    size_t bytes;
    char tail[8];
    bool done_seen;
    struct curl_slist *hdrs;
    kvr_buf body;
    int target;
} xfer;

static size_t on_write(char *ptr, size_t size, size_t nmemb, void *ud)
{
    xfer *x = ud;
    size_t n = size * nmemb;
    if (!x->t_first_ns && n && memmem(ptr, n, "data: {", 7))
        x->t_first_ns = kvr_mono_ns();
    if (memmem(ptr, n, "[DONE]", 6))
        x->done_seen = true;
    x->bytes += n;
    return n;
}

static void xfer_setup(xfer *x, const char *url, const char *body, size_t len)
{
    if (!x->h)
        x->h = curl_easy_init();
    curl_easy_setopt(x->h, CURLOPT_URL, url);
    curl_easy_setopt(x->h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(x->h, CURLOPT_POSTFIELDSIZE, (long)len);
    if (!x->hdrs) {
        x->hdrs = curl_slist_append(NULL, "Content-Type: application/json");
        x->hdrs = curl_slist_append(x->hdrs, "Expect:");
    }
    curl_easy_setopt(x->h, CURLOPT_HTTPHEADER, x->hdrs);
    curl_easy_setopt(x->h, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(x->h, CURLOPT_WRITEDATA, x);
    curl_easy_setopt(x->h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(x->h, CURLOPT_TIMEOUT_MS, 60000L);
    x->t0_ns = kvr_mono_ns();
    x->t_first_ns = 0;
    x->bytes = 0;
    x->done_seen = false;
}

static void make_body(kvr_buf *b, unsigned seed, int prompt_len, int max_tokens)
{
    kvr_buf_reset(b);
    kvr_buf_appendf(b, "{\"model\":\"bench\",\"stream\":true,\"max_tokens\":%d,\"prompt\":[",
                    max_tokens);
    /* unique per request: no prefix-cache luck for any target */
    uint64_t s = 0x9e3779b97f4a7c15ull * (seed + 1);
    for (int i = 0; i < prompt_len; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        kvr_buf_appendf(b, i ? ",%u" : "%u", (unsigned)(97 + s % 26));
    }
    kvr_buf_append_cstr(b, "]}");
}

static bool wait_http(const char *base, const char *path, int secs)
{
    for (int i = 0; i < secs * 20; i++) {
        if (run_http_ok(base, path, 500))
            return true;
        usleep(50000);
    }
    return false;
}

static bool frontend_sees_worker(const char *base)
{
    for (int i = 0; i < 200; i++) {
        long st = 0;
        kvr_buf b;
        kvr_buf_init(&b);
        char url[256];
        snprintf(url, sizeof url, "%s/v1/models", base);
        run_http_get(url, 500, &st, &b);
        bool ok = st == 200 && b.len && memmem(b.base, b.len, "\"bench\"", 7);
        kvr_buf_free(&b);
        if (ok)
            return true;
        usleep(50000);
    }
    return false;
}

static bool router_sees_worker(const char *base)
{
    if (!wait_http(base, "/ready", 15))
        return false;
    for (int i = 0; i < 200; i++) {
        long st = 0;
        kvr_buf b;
        kvr_buf_init(&b);
        char url[256];
        snprintf(url, sizeof url, "%s/v1/state", base);
        run_http_get(url, 500, &st, &b);
        bool ok = st == 200 && b.len && memmem(b.base, b.len, "\"url\"", 5);
        kvr_buf_free(&b);
        if (ok)
            return true;
        usleep(50000);
    }
    return false;
}

static int spawn(run_proc *p, const char *role, const char *dir, char **argv, int argc)
{
    kvr_err err = {0};
    snprintf(p->role, sizeof p->role, "%s", role);
    snprintf(p->log, sizeof p->log, "%s/%s.log", dir, role);
    if (run_proc_set_argv(p, argv, argc, &err) || run_proc_spawn(p, &err)) {
        fprintf(stderr, "proxy: starting %s: %s\n", role, err.msg);
        return -1;
    }
    return 0;
}

int kvr_bench_proxy(int argc, char **argv)
{
    const char *bin = NULL, *json_out = NULL;
    int64_t requests = 300, prompt_len = 256, max_tokens = 4, cpu_requests = 2000,
            load_seconds = 10, load_conc = 64;
    double speedup = 1000;
    bool keep = false;
    const char *router_mode = "round-robin";
    kvr_flag flags[] = {
        {"router-mode", KVR_FLAG_STRING, &router_mode,
         "frontend --router-mode (kv starts a kvr-routerd)", 0},
        {"bin", KVR_FLAG_STRING, &bin,
         "directory of kvr-worker/kvr-frontend (default: next to kvr-bench)", 0},
        {"requests", KVR_FLAG_INT, &requests, "TTFT samples per target", 0},
        {"prompt-len", KVR_FLAG_INT, &prompt_len, "prompt tokens", 0},
        {"max-tokens", KVR_FLAG_INT, &max_tokens, "output tokens per request", 0},
        {"cpu-requests", KVR_FLAG_INT, &cpu_requests, "requests for the CPU-per-request figure", 0},
        {"load-seconds", KVR_FLAG_INT, &load_seconds, "duration of the throughput phase", 0},
        {"load-concurrency", KVR_FLAG_INT, &load_conc, "streams in flight in the throughput phase",
         0},
        {"speedup", KVR_FLAG_DOUBLE, &speedup, "worker clock speedup", 0},
        {"json", KVR_FLAG_STRING, &json_out, "write results as JSON here", 0},
        {"keep", KVR_FLAG_BOOL, &keep, "keep the temp dir (logs)", 0},
    };
    size_t nf = sizeof flags / sizeof *flags;
    kvr_err err = {0};
    int rv = kvr_flags_parse(flags, nf, argc - 1, argv + 1, NULL, 0, NULL, &err);
    if (rv == KVR_FLAGS_HELP) {
        kvr_flags_usage(stdout, "kvr-bench proxy", flags, nf);
        return 0;
    }
    if (rv < 0) {
        fprintf(stderr, "kvr-bench proxy: %s\n", err.msg);
        return 2;
    }
    bool kv = strcmp(router_mode, "kv") == 0;
    if (!kv && strcmp(router_mode, "round-robin") && strcmp(router_mode, "least-loaded") &&
        strcmp(router_mode, "random")) {
        fprintf(stderr, "kvr-bench proxy: --router-mode kv|round-robin|least-loaded|random\n");
        return 2;
    }
    if (requests < 1 || prompt_len < 1 || max_tokens < 1 || load_conc < 1 || load_conc > 4096) {
        fprintf(stderr, "kvr-bench proxy: counts must be positive (concurrency <= 4096)\n");
        return 2;
    }
    char bindir[PATH_MAX];
    if (bin) {
        snprintf(bindir, sizeof bindir, "%s", bin);
    } else {
        ssize_t n = readlink("/proc/self/exe", bindir, sizeof bindir - 1);
        if (n <= 0)
            return 2;
        bindir[n] = 0;
        char *s = strrchr(bindir, '/');
        if (s)
            *s = 0;
    }
    char dir[] = "/tmp/kvr-bench-proxy.XXXXXX";
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    run_http_global_init();

    int nport = free_port(), wport = free_port(), fport = free_port(), hport = free_port(),
        rport = free_port();
    char natsconf[600], natsurl[64], wlisten[64], flisten[64], hcfg[600], sbuf[32];
    snprintf(natsconf, sizeof natsconf, "%s/nats.conf", dir);
    snprintf(natsurl, sizeof natsurl, "nats://127.0.0.1:%d", nport);
    FILE *f = fopen(natsconf, "w");
    if (!f)
        return 1;
    fprintf(f,
            "listen: 127.0.0.1:%d\njetstream {\n  store_dir: \"%s/js\"\n  max_memory_store: 256MB\n"
            "  max_file_store: 2GB\n}\n",
            nport, dir);
    fclose(f);
    snprintf(hcfg, sizeof hcfg, "%s/haproxy.cfg", dir);
    f = fopen(hcfg, "w");
    if (!f)
        return 1;
    fprintf(f,
            "global\n  maxconn 8000\n  nbthread 1\n"
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 120s\n"
            "  timeout server 120s\n  option http-keep-alive\n  option http-no-delay\n"
            "frontend fe\n  bind 127.0.0.1:%d\n  default_backend workers\n"
            "backend workers\n  balance leastconn\n  server w1 127.0.0.1:%d\n",
            hport, wport);
    fclose(f);
    snprintf(wlisten, sizeof wlisten, "127.0.0.1:%d", wport);
    snprintf(flisten, sizeof flisten, "127.0.0.1:%d", fport);
    snprintf(sbuf, sizeof sbuf, "%g", speedup);
    char wbin[PATH_MAX + 16], fbin[PATH_MAX + 16], rbin[PATH_MAX + 16], rhttp[64], rdir[600],
        rbase[64];
    snprintf(rbin, sizeof rbin, "%s/kvr-routerd", bindir);
    snprintf(rhttp, sizeof rhttp, "127.0.0.1:%d", rport);
    snprintf(rbase, sizeof rbase, "http://127.0.0.1:%d", rport);
    snprintf(rdir, sizeof rdir, "%s/router", dir);
    snprintf(wbin, sizeof wbin, "%s/kvr-worker", bindir);
    snprintf(fbin, sizeof fbin, "%s/kvr-frontend", bindir);

    run_proc procs[5];
    memset(procs, 0, sizeof procs);
    int np = 0, rc = 1;
    char *nargv[] = {"/usr/sbin/nats-server", "-c", natsconf};
    char *wargv[] = {wbin,          "--listen",  wlisten,   "--nats", natsurl,
                     "--namespace", "default",   "--model", "bench",  "--id",
                     "1",           "--speedup", sbuf};
    char *fargv[] = {fbin,          "--listen",      flisten,
                     "--nats",      natsurl,         "--id",
                     "1",           "--router-mode", (char *)router_mode,
                     "--log-level", "warn"};
    char *rargv[] = {rbin,  "--id",       "1",  "--nats",      natsurl, "--http",
                     rhttp, "--data-dir", rdir, "--log-level", "warn"};
    char *hargv[] = {"/usr/sbin/haproxy", "-db", "-f", hcfg};
    if (spawn(&procs[np++], "nats", dir, nargv, 3) ||
        spawn(&procs[np++], "worker", dir, wargv, (int)(sizeof wargv / sizeof *wargv)) ||
        spawn(&procs[np++], "frontend", dir, fargv, (int)(sizeof fargv / sizeof *fargv)) ||
        spawn(&procs[np++], "haproxy", dir, hargv, 4) ||
        (kv && spawn(&procs[np++], "router", dir, rargv, (int)(sizeof rargv / sizeof *rargv))))
        goto out;
    char base[T_N][64];
    snprintf(base[T_DIRECT], 64, "http://127.0.0.1:%d", wport);
    snprintf(base[T_FRONTEND], 64, "http://127.0.0.1:%d", fport);
    snprintf(base[T_HAPROXY], 64, "http://127.0.0.1:%d", hport);
    if (!wait_http(base[T_DIRECT], "/health", 10) || !wait_http(base[T_FRONTEND], "/health", 10) ||
        !wait_http(base[T_HAPROXY], "/health", 10) || !frontend_sees_worker(base[T_FRONTEND]) ||
        (kv && !router_sees_worker(rbase))) {
        fprintf(stderr, "proxy: processes did not come up (logs in %s)\n", dir);
        keep = true;
        goto out;
    }
    int fe_pid = procs[2].pid;

    /* 1. TTFT, interleaved */
    double *ttft[T_N];
    size_t nt[T_N] = {0};
    int fails[T_N] = {0};
    for (int t = 0; t < T_N; t++)
        ttft[t] = calloc((size_t)requests, sizeof(double));
    xfer xs[T_N];
    memset(xs, 0, sizeof xs);
    kvr_buf body;
    kvr_buf_init(&body);
    char url[T_N][128];
    for (int t = 0; t < T_N; t++)
        snprintf(url[t], sizeof url[t], "%.64s/v1/completions", base[t]);
    for (int w = 0; w < 20; w++) /* warm-up: connections, caches */
        for (int t = 0; t < T_N; t++) {
            make_body(&body, 1000000u + (unsigned)(w * T_N + t), (int)prompt_len, (int)max_tokens);
            xfer_setup(&xs[t], url[t], body.base, body.len);
            curl_easy_perform(xs[t].h);
        }
    for (int64_t i = 0; i < requests; i++) {
        for (int k = 0; k < T_N; k++) {
            int t = (int)((i + k) % T_N); /* rotate the order too */
            make_body(&body, (unsigned)(i * T_N + t), (int)prompt_len, (int)max_tokens);
            xfer_setup(&xs[t], url[t], body.base, body.len);
            CURLcode cc = curl_easy_perform(xs[t].h);
            long st = 0;
            curl_easy_getinfo(xs[t].h, CURLINFO_RESPONSE_CODE, &st);
            if (cc != CURLE_OK || st != 200 || !xs[t].t_first_ns || !xs[t].done_seen) {
                fails[t]++;
                continue;
            }
            ttft[t][nt[t]++] = (double)(xs[t].t_first_ns - xs[t].t0_ns) / 1e6;
        }
    }
    double med[T_N], p90[T_N];
    for (int t = 0; t < T_N; t++) {
        med[t] = pct(ttft[t], nt[t], 0.5);
        p90[t] = pct(ttft[t], nt[t], 0.9);
    }
    double ov_fe = med[T_FRONTEND] - med[T_DIRECT], ov_ha = med[T_HAPROXY] - med[T_DIRECT];

    /* 2. CPU per proxied streaming request (sequential, so nothing else runs in the frontend) */
    double cpu0 = bench_proc_cpu_s(fe_pid);
    int cpu_ok = 0;
    for (int64_t i = 0; i < cpu_requests; i++) {
        make_body(&body, 5000000u + (unsigned)i, (int)prompt_len, (int)max_tokens);
        xfer_setup(&xs[T_FRONTEND], url[T_FRONTEND], body.base, body.len);
        if (curl_easy_perform(xs[T_FRONTEND].h) == CURLE_OK && xs[T_FRONTEND].done_seen)
            cpu_ok++;
    }
    double cpu_per_req_us = cpu_ok ? (bench_proc_cpu_s(fe_pid) - cpu0) * 1e6 / cpu_ok : 0;

    /* 3. Throughput, closed loop */
    CURLM *m = curl_multi_init();
    curl_multi_setopt(m, CURLMOPT_MAX_HOST_CONNECTIONS, (long)load_conc);
    xfer *lx = calloc((size_t)load_conc, sizeof *lx);
    kvr_buf *lb = calloc((size_t)load_conc, sizeof *lb);
    unsigned seed = 9000000u;
    for (int64_t i = 0; i < load_conc; i++) {
        kvr_buf_init(&lb[i]);
        make_body(&lb[i], seed++, (int)prompt_len, (int)max_tokens);
        xfer_setup(&lx[i], url[T_FRONTEND], lb[i].base, lb[i].len);
        curl_easy_setopt(lx[i].h, CURLOPT_PRIVATE, &lx[i]);
        curl_multi_add_handle(m, lx[i].h);
    }
    long rss0 = rss_kb(fe_pid);
    long rss_peak = rss0;
    double lcpu0 = bench_proc_cpu_s(fe_pid);
    int64_t lt0 = kvr_mono_ns(), lend = lt0 + load_seconds * 1000000000LL;
    uint64_t done_ok = 0, done_bad = 0;
    int running = 1;
    while (running) {
        curl_multi_perform(m, &running);
        curl_multi_poll(m, NULL, 0, 100, NULL);
        CURLMsg *msg;
        int left;
        bool stop = kvr_mono_ns() >= lend;
        while ((msg = curl_multi_info_read(m, &left))) {
            if (msg->msg != CURLMSG_DONE)
                continue;
            xfer *x;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&x);
            if (msg->data.result == CURLE_OK && x->done_seen)
                done_ok++;
            else
                done_bad++;
            curl_multi_remove_handle(m, x->h);
            if (!stop) {
                size_t idx = (size_t)(x - lx);
                make_body(&lb[idx], seed++, (int)prompt_len, (int)max_tokens);
                xfer_setup(x, url[T_FRONTEND], lb[idx].base, lb[idx].len);
                curl_multi_add_handle(m, x->h);
                running = 1;
            }
        }
        long r = rss_kb(fe_pid);
        if (r > rss_peak)
            rss_peak = r;
    }
    double lsecs = (double)(kvr_mono_ns() - lt0) / 1e9;
    double lcpu = bench_proc_cpu_s(fe_pid) - lcpu0;
    double rps = (double)done_ok / lsecs, util = lcpu / lsecs;
    for (int64_t i = 0; i < load_conc; i++) {
        curl_easy_cleanup(lx[i].h);
        curl_slist_free_all(lx[i].hdrs);
        kvr_buf_free(&lb[i]);
    }
    free(lx);
    free(lb);
    curl_multi_cleanup(m);

    printf("kvr-bench proxy: frontend --router-mode %s, prompt %lld tokens, %lld output tokens, "
           "worker speedup %g\n",
           router_mode, (long long)prompt_len, (long long)max_tokens, speedup);
    printf("%-10s %8s %10s %10s %6s\n", "target", "samples", "ttft_p50", "ttft_p90", "fails");
    for (int t = 0; t < T_N; t++)
        printf("%-10s %8zu %8.3fms %8.3fms %6d\n", tname[t], nt[t], med[t], p90[t], fails[t]);
    printf("overhead (median TTFT minus direct): frontend %.3f ms, haproxy %.3f ms, ratio %.2f\n",
           ov_fe, ov_ha, ov_ha != 0 ? ov_fe / ov_ha : 0);
    printf("frontend CPU per streaming request: %.1f us (user+sys, %d requests)\n", cpu_per_req_us,
           cpu_ok);
    printf("throughput: %.0f req/s with %lld streams in flight, frontend CPU %.0f%% → %.0f req/s "
           "per core; %llu failed; RSS %ld → %ld KiB\n",
           rps, (long long)load_conc, util * 100, util > 0 ? rps / util : 0,
           (unsigned long long)done_bad, rss0, rss_peak);
    if (json_out) {
        FILE *jf = fopen(json_out, "w");
        if (jf) {
            fprintf(
                jf,
                "{\"router_mode\":\"%s\",\"prompt_len\":%lld,\"max_tokens\":%lld,\"speedup\":%g,"
                "\"ttft_ms\":{\"direct\":{\"p50\":%.4f,\"p90\":%.4f,\"n\":%zu},"
                "\"frontend\":{\"p50\":%.4f,\"p90\":%.4f,\"n\":%zu},"
                "\"haproxy\":{\"p50\":%.4f,\"p90\":%.4f,\"n\":%zu}},"
                "\"overhead_ms\":{\"frontend\":%.4f,\"haproxy\":%.4f,\"ratio\":%.3f},"
                "\"cpu_us_per_request\":%.2f,"
                "\"throughput\":{\"rps\":%.1f,\"concurrency\":%lld,\"cpu_util\":%.3f,"
                "\"rps_per_core\":%.1f,\"failed\":%llu,\"rss_kb_before\":%ld,\"rss_kb_peak\":%ld}}"
                "\n",
                router_mode, (long long)prompt_len, (long long)max_tokens, speedup, med[0], p90[0],
                nt[0], med[1], p90[1], nt[1], med[2], p90[2], nt[2], ov_fe, ov_ha,
                ov_ha != 0 ? ov_fe / ov_ha : 0, cpu_per_req_us, rps, (long long)load_conc, util,
                util > 0 ? rps / util : 0, (unsigned long long)done_bad, rss0, rss_peak);
            fclose(jf);
        }
    }
    rc = (nt[T_FRONTEND] && nt[T_DIRECT]) ? 0 : 1;
    for (int t = 0; t < T_N; t++) {
        free(ttft[t]);
        if (xs[t].h)
            curl_easy_cleanup(xs[t].h);
        curl_slist_free_all(xs[t].hdrs);
    }
    kvr_buf_free(&body);
out:
    for (int i = np - 1; i >= 0; i--)
        run_proc_stop(&procs[i], 3000);
    run_reap();
    if (keep)
        fprintf(stderr, "proxy: logs kept in %s\n", dir);
    else {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0)
            fprintf(stderr, "proxy: could not remove %s\n", dir);
    }
    return rc;
}
