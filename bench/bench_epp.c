/* kvr-bench epp: kvr-epp driven as Envoy's ext_proc filter drives it, from C.
 *
 * `kvrctl up --routers R --workers W --frontends 0` (nats-server -js, R kvr-routerd in one Raft
 * group, W kvr-workers), then kvr-epp (--secure-serving=false) on that NATS, driven by
 * epp_client (epp_client.h: K h2c connections, many concurrent streams each, one request per
 * stream as Envoy's FULL_DUPLEX_STREAMED filter sends it). Open loop at --rate R/s, or closed
 * loop with --concurrency C.
 *
 * Measures: requests/s, errors by kind (ImmediateResponse status, grpc-status, reset), the
 * client's pick latency (last byte of the body message handed to the socket → HeadersResponse
 * parsed), kvr-epp's own kvr_epp_pick_seconds histogram (scraped before/after), kvr-epp CPU
 * seconds per request (/proc/PID/stat utime+stime) and RSS per open stream (RSS with --hold N
 * streams held open after their headers vs none).
 *
 * Every cluster is torn down with `kvrctl down`, and kvr-epp stopped, on every path. */
#include "kvr_bench.h"
#include "bench_util.h"
#include "epp_client.h"
#include "kvr_buf.h"
#include "kvr_log.h"
#include "run_cluster.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>


static volatile sig_atomic_t be_stop;
static void be_on_signal(int sig)
{
    (void)sig;
    be_stop = 1;
}

/* ---------- kvr-epp's side: metrics, /proc ---------- */

/* CPU seconds kvr-epp has used; NAN when it is gone (the report then says so). */
static double proc_cpu_s(int pid)
{
    double s = bench_proc_cpu_s(pid);
    return s < 0 ? NAN : s;
}

static double proc_rss_kb(int pid)
{
    char p[64], line[256];
    snprintf(p, sizeof p, "/proc/%d/status", pid);
    FILE *f = fopen(p, "r");
    double kb = NAN;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %lf", &kb) == 1)
            break;
    if (f)
        fclose(f);
    return kb;
}

#define BEPP_CLIENT_E_NB 20
typedef struct {
    double le[BEPP_CLIENT_E_NB], cum[BEPP_CLIENT_E_NB], count, sum;
    int n;
} be_hist;

/* A histogram of kvr-epp's /metrics, and (gauge not NULL) kvr_epp_open_streams. */
static int scrape(int mport, const char *metric, be_hist *h, double *gauge)
{
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/metrics", mport);
    kvr_buf b;
    kvr_buf_init(&b);
    long status = 0;
    int rc = run_http_get(url, 3000, &status, &b);
    if (rc || status != 200) {
        kvr_buf_free(&b);
        return -1;
    }
    kvr_buf_append(&b, "", 1);
    memset(h, 0, sizeof *h);
    char name[128];
    snprintf(name, sizeof name, "%s_count", metric);
    run_prom_sum(b.base, b.len, name, &h->count);
    snprintf(name, sizeof name, "%s_sum", metric);
    run_prom_sum(b.base, b.len, name, &h->sum);
    if (gauge)
        run_prom_sum(b.base, b.len, "kvr_epp_open_streams", gauge);
    /* the buckets, in order (run_prom_sum would add them up) */
    char pre[128];
    snprintf(pre, sizeof pre, "%s_bucket{le=\"", metric);
    size_t pl = strlen(pre);
    for (char *line = b.base; line && *line && h->n < BEPP_CLIENT_E_NB;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = 0;
        if (!strncmp(line, pre, pl)) {
            char *q = line + pl;
            h->le[h->n] = strncmp(q, "+Inf", 4) == 0 ? INFINITY : strtod(q, NULL);
            char *sp = strrchr(line, ' ');
            h->cum[h->n++] = sp ? strtod(sp + 1, NULL) : 0;
        }
        line = nl ? nl + 1 : NULL;
    }
    kvr_buf_free(&b);
    return 0;
}

/* Quantile q of the bucket deltas (after - before), linear inside a bucket. */
static double hist_q(const be_hist *a, const be_hist *b, double q)
{
    if (b->count - a->count <= 0 || b->n != a->n)
        return NAN;
    double d[BEPP_CLIENT_E_NB];
    for (int i = 0; i < b->n; i++)
        d[i] = b->cum[i] - a->cum[i];
    return bench_hist_quantile(b->le, d, b->n, q);
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Percentile p of the sorted client latencies (NAN: none). */
static double pct(const epp_client *cl, double p)
{
    if (!cl->nlat)
        return NAN;
    size_t i = (size_t)(p * (double)(cl->nlat - 1) + 0.5);
    return cl->lat[i];
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvr-bench epp [--routers 3] [--workers 8] [--rate 5000 | --concurrency C]\n"
            "                     [--duration 10] [--conns 4] [--hold 1000] [--warmup 1]\n"
            "                     [--epp-args \"…\"] [--router-args \"…\"] [--dir D] [--keep]\n"
            "                     [--json OUT]\n\n"
            "kvrctl starts nats-server, R kvr-routerd in one Raft group and W kvr-workers; then\n"
            "kvr-epp --secure-serving=false, driven over K h2c connections as Envoy's ext_proc\n"
            "filter does (headers, body end_of_stream, wait for the pick and the echo, response\n"
            "headers + body end_of_stream). Open loop at --rate R/s, or closed loop with C\n"
            "streams always in flight. Reports requests/s, errors, the client's pick latency\n"
            "(last body byte out → HeadersResponse in), kvr-epp's kvr_epp_pick_seconds, CPU per\n"
            "request and RSS per open stream (--hold N streams held open after their headers).\n");
}

int kvr_bench_epp(int argc, char **argv)
{
    int routers = 3, workers = 8, conns = 4, hold = 1000;
    double rate = 5000, duration = 10, warmup = 1;
    long concurrency = 0;
    const char *json = NULL, *dir = NULL, *epp_args = "", *router_args = NULL;
    bool keep = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--keep")) {
            keep = true;
            continue;
        }
        if (!v) {
            usage(stderr);
            return 2;
        }
        i++;
        if (!strcmp(a, "--routers"))
            routers = atoi(v);
        else if (!strcmp(a, "--workers"))
            workers = atoi(v);
        else if (!strcmp(a, "--rate"))
            rate = atof(v);
        else if (!strcmp(a, "--concurrency"))
            concurrency = atol(v);
        else if (!strcmp(a, "--duration"))
            duration = atof(v);
        else if (!strcmp(a, "--warmup"))
            warmup = atof(v);
        else if (!strcmp(a, "--conns"))
            conns = atoi(v);
        else if (!strcmp(a, "--hold"))
            hold = atoi(v);
        else if (!strcmp(a, "--epp-args"))
            epp_args = v;
        else if (!strcmp(a, "--router-args")) /* kvrctl up --router-args: e.g. Raft knobs */
            router_args = v;
        else if (!strcmp(a, "--dir"))
            dir = v;
        else if (!strcmp(a, "--json"))
            json = v;
        else {
            usage(stderr);
            return 2;
        }
    }
    if (routers < 1 || workers < 1 || conns < 1 || conns > EPP_CLIENT_MAX_CONNS || rate <= 0 ||
        duration <= 0 || hold < 0 || hold > conns * EPP_CLIENT_STREAMS_PER_CONN ||
        concurrency < 0 || concurrency > (long)conns * EPP_CLIENT_STREAMS_PER_CONN) {
        fprintf(stderr,
                "kvr-bench epp: bad options (--conns 1-%d; --hold and --concurrency at "
                "most %d per connection)\n",
                EPP_CLIENT_MAX_CONNS, EPP_CLIENT_STREAMS_PER_CONN);
        return 2;
    }
    run_http_global_init();
    signal(SIGINT, be_on_signal);
    signal(SIGTERM, be_on_signal);
    signal(SIGPIPE, SIG_IGN);
    char cdir[RUN_PATH_MAX - 32], tmpl[] = "/tmp/kvr-bench-epp.XXXXXX";
    if (dir) {
        snprintf(cdir, sizeof cdir, "%s", dir);
        mkdir(cdir, 0755);
    } else {
        if (!mkdtemp(tmpl)) {
            perror("kvr-bench epp: mkdtemp");
            return 1;
        }
        snprintf(cdir, sizeof cdir, "%s", tmpl);
    }
    char rstr[16], wstr[16];
    snprintf(rstr, sizeof rstr, "%d", routers);
    snprintf(wstr, sizeof wstr, "%d", workers);
    char *up[] = {"up",        "--dir", cdir,          "--routers", rstr,
                  "--workers", wstr,    "--frontends", "0",         NULL, NULL, NULL};
    if (router_args && router_args[0]) {
        up[9] = "--router-args";
        up[10] = (char *)router_args;
    }
    fprintf(stderr, "== kvrctl up --routers %d --workers %d --frontends 0 in %s\n", routers,
            workers, cdir);
    int rc = 1;
    epp_client cl;
    bool cl_inited = false;
    run_cluster c;
    run_cluster_init(&c, cdir);
    run_proc epp;
    memset(&epp, 0, sizeof epp);
    bool epp_started = false;
    kvr_err err = {0};
    if (run_kvrctl("kvr-bench epp", up, true) != 0 || be_stop) {
        fprintf(stderr, "kvr-bench epp: kvrctl up failed (logs in %s/logs)\n", cdir);
        goto down;
    }
    if (run_cluster_load(&c, cdir, &err) != 0) {
        fprintf(stderr, "kvr-bench epp: %s\n", err.msg);
        goto down;
    }
    run_proc *nats = run_cluster_find(&c, "nats", 0);
    if (!nats) {
        fprintf(stderr, "kvr-bench epp: no nats in cluster.json\n");
        goto down;
    }
    /* kvr-epp sits next to this binary */
    char self[PATH_MAX], eppbin[PATH_MAX + 16];
    ssize_t sl = readlink("/proc/self/exe", self, sizeof self - 1);
    if (sl <= 0) {
        fprintf(stderr, "kvr-bench epp: /proc/self/exe unreadable\n");
        goto down;
    }
    self[sl] = 0;
    char *slash = strrchr(self, '/');
    if (slash)
        *slash = 0;
    snprintf(eppbin, sizeof eppbin, "%s/kvr-epp", self);
    int gport = bench_free_port(), mport = bench_free_port();
    char gp[16], mp[16];
    snprintf(gp, sizeof gp, "%d", gport);
    snprintf(mp, sizeof mp, "%d", mport);
    char *eargv[RUN_MAX_ARGS + 1] = {eppbin,
                                     "--secure-serving=false",
                                     "--grpc-port",
                                     gp,
                                     "--grpc-health-port",
                                     "-1",
                                     "--metrics-port",
                                     mp,
                                     "--bind",
                                     "127.0.0.1",
                                     "--nats",
                                     nats->url,
                                     "--namespace",
                                     c.ns[0] ? c.ns : "default",
                                     "--id",
                                     "900",
                                     "--log-level",
                                     "warn"};
    int eargc = 18;
    char eabuf[1024];
    snprintf(eabuf, sizeof eabuf, "%s", epp_args);
    for (char *t = strtok(eabuf, " "); t && eargc < RUN_MAX_ARGS; t = strtok(NULL, " "))
        eargv[eargc++] = t;
    snprintf(epp.role, sizeof epp.role, "epp");
    snprintf(epp.log, sizeof epp.log, "%s/logs/epp.log", cdir);
    if (run_proc_set_argv(&epp, eargv, eargc, &err) || run_proc_spawn(&epp, &err)) {
        fprintf(stderr, "kvr-bench epp: starting kvr-epp: %s\n", err.msg);
        goto down;
    }
    epp_started = true;
    /* ready: kvr-epp knows every worker */
    {
        char url[128];
        snprintf(url, sizeof url, "http://127.0.0.1:%d/metrics", mport);
        int64_t until = kvr_mono_ms() + 20000;
        double ready = 0;
        while (!be_stop && kvr_mono_ms() < until) {
            kvr_buf b;
            kvr_buf_init(&b);
            long st = 0;
            if (run_http_get(url, 1000, &st, &b) == 0 && st == 200 &&
                run_prom_sum(b.base, b.len, "inference_pool_ready_pods", &ready) == 0 &&
                ready >= workers) {
                kvr_buf_free(&b);
                break;
            }
            kvr_buf_free(&b);
            usleep(100000);
        }
        if (ready < workers) {
            fprintf(stderr, "kvr-bench epp: kvr-epp sees %.0f of %d workers (log %s)\n", ready,
                    workers, epp.log);
            goto down;
        }
    }
    /* the messages every stream sends */
    char body[512];
    snprintf(body, sizeof body,
             "{\"model\":\"%s\",\"messages\":[{\"role\":\"system\",\"content\":\"You are a "
             "helpful assistant.\"},{\"role\":\"user\",\"content\":\"Summarise the plot of "
             "Hamlet in three sentences.\"}],\"max_tokens\":16,\"stream\":true}",
             c.model[0] ? c.model : "m1");
    cl_inited = true;
    if (epp_client_init(&cl, body, "data: {\"choices\":[]}\n\ndata: [DONE]\n\n")) {
        fprintf(stderr, "kvr-bench epp: client set-up: %s\n", strerror(errno));
        goto down;
    }
    if (epp_client_connect(&cl, gport, conns)) {
        fprintf(stderr, "kvr-bench epp: connecting to kvr-epp: %s\n", strerror(errno));
        goto down;
    }
    /* warm-up (not measured), then the measured run */
    fprintf(stderr, "== kvr-epp pid %d, %d connections; %s %g for %g s (+%g s warm-up)\n", epp.pid,
            conns, concurrency ? "closed loop, concurrency" : "open loop, rate/s",
            concurrency ? (double)concurrency : rate, duration, warmup);
    be_hist h0, h1, r0, r1;
    memset(&r0, 0, sizeof r0);
    memset(&r1, 0, sizeof r1);
    double cpu0 = 0, cpu1 = 0, t_run = 0;
    uint64_t skipped = 0;
    for (int phase = 0; phase < 2 && !be_stop; phase++) {
        double len = phase ? duration : warmup;
        if (len <= 0)
            continue;
        if (phase) {
            while (cl.open_streams && !be_stop) /* the warm-up's streams end first */
                epp_client_pump(&cl, 10);
            if (scrape(mport, "kvr_epp_pick_seconds", &h0, NULL) ||
                scrape(mport, "kvr_epp_route_seconds", &r0, NULL)) {
                fprintf(stderr, "kvr-bench epp: /metrics scrape failed\n");
                goto down;
            }
            cpu0 = proc_cpu_s(epp.pid);
            cl.measuring = true;
        }
        int64_t t0 = kvr_mono_ns(), tend = t0 + (int64_t)(len * 1e9);
        uint64_t due0 = 0;
        for (;;) {
            int64_t now = kvr_mono_ns();
            if (now >= tend || be_stop)
                break;
            if (concurrency) {
                while (cl.open_streams < (uint64_t)concurrency && epp_client_start(&cl, false) == 0)
                    ;
            } else {
                uint64_t due = (uint64_t)((double)(now - t0) / 1e9 * rate);
                for (; due0 < due; due0++)
                    if (epp_client_start(&cl, false) != 0)
                        skipped += phase; /* every connection full: the client is the limit */
            }
            if (concurrency) {
                epp_client_pump(&cl, 5);
            } else {
                /* until the next send is due, or the sockets wake us */
                double next = (double)(due0 + 1) / rate * 1e9 + (double)t0;
                epp_client_pump_us(&cl, (int64_t)((next - (double)kvr_mono_ns()) / 1e3));
            }
        }
        int64_t drain_until = kvr_mono_ns() + 5000000000LL;
        while (cl.open_streams && kvr_mono_ns() < drain_until && !be_stop)
            epp_client_pump(&cl, 10);
        if (phase) {
            t_run = (double)(kvr_mono_ns() - t0) / 1e9;
            cpu1 = proc_cpu_s(epp.pid);
            cl.measuring = false;
            scrape(mport, "kvr_epp_pick_seconds", &h1, NULL);
            scrape(mport, "kvr_epp_route_seconds", &r1, NULL);
        }
    }
    uint64_t unfinished = cl.open_streams;
    /* RSS per open stream: --hold streams with their request headers sent, held open */
    double rss0 = proc_rss_kb(epp.pid), rss1 = rss0, open_seen = 0;
    if (hold && !be_stop) {
        for (int i = 0; i < hold; i++)
            epp_client_start(&cl, true);
        int64_t until = kvr_mono_ms() + 10000;
        be_hist hx;
        while (!be_stop && kvr_mono_ms() < until) {
            epp_client_pump(&cl, 50);
            if (scrape(mport, "kvr_epp_pick_seconds", &hx, &open_seen) == 0 &&
                open_seen >= hold + (double)unfinished)
                break;
        }
        rss1 = proc_rss_kb(epp.pid);
    }
    uint64_t reqs = cl.done_ok;
    uint64_t nerr = 0;
    for (int i = 0; i < EPP_CLIENT_E_N; i++)
        nerr += cl.errors[i];
    qsort(cl.lat, cl.nlat, sizeof *cl.lat, cmp_d);
    double sp50 = hist_q(&h0, &h1, 0.5), sp90 = hist_q(&h0, &h1, 0.9),
           sp99 = hist_q(&h0, &h1, 0.99);
    double rp50 = hist_q(&r0, &r1, 0.5), rp99 = hist_q(&r0, &r1, 0.99);
    double rmean = r1.count > r0.count ? (r1.sum - r0.sum) / (r1.count - r0.count) : NAN;
    double pmean = h1.count > h0.count ? (h1.sum - h0.sum) / (h1.count - h0.count) : NAN;
    double cpu_per = reqs + nerr ? (cpu1 - cpu0) / (double)(reqs + nerr) : NAN;
    double rss_per = hold ? (rss1 - rss0) * 1024.0 / hold : NAN;
    double la[3] = {0};
    getloadavg(la, 3);
    printf("kvr-bench epp: %d routers (Raft), %d workers, %d h2c connections, %s %g, %.1f s\n",
           routers, workers, conns, concurrency ? "concurrency" : "rate/s",
           concurrency ? (double)concurrency : rate, t_run);
    printf("  requests ok        %" PRIu64 " (%.0f/s), started %" PRIu64 ", errors %" PRIu64
           ", unfinished %" PRIu64 ", not sent (connections full) %" PRIu64 "\n",
           reqs, t_run > 0 ? (double)reqs / t_run : 0, cl.started, nerr, unfinished, skipped);
    for (int i = 0; i < EPP_CLIENT_E_N; i++)
        if (cl.errors[i])
            printf("    %-18s %" PRIu64 "\n", epp_client_error_names[i], cl.errors[i]);
    printf("  pick, client       p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  max %.3f ms  (n=%zu)\n",
           pct(&cl, 0.5) * 1e3, pct(&cl, 0.9) * 1e3, pct(&cl, 0.99) * 1e3, pct(&cl, 1.0) * 1e3,
           cl.nlat);
    printf("  pick, kvr-epp      p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  (kvr_epp_pick_seconds, "
           "n=%.0f, mean %.3f ms)\n",
           sp50 * 1e3, sp90 * 1e3, sp99 * 1e3, h1.count - h0.count,
           h1.count > h0.count ? (h1.sum - h0.sum) / (h1.count - h0.count) * 1e3 : NAN);
    /* what the pick spends waiting for the routers (NATS both ways + Raft), and the rest */
    printf("  of which routers   p50 %.3f ms  p99 %.3f ms  mean %.3f ms  (kvr_epp_route_seconds, "
           "n=%.0f); kvr-epp's own part mean %.3f ms\n",
           rp50 * 1e3, rp99 * 1e3, rmean * 1e3, r1.count - r0.count, (pmean - rmean) * 1e3);
    printf("  kvr-epp CPU        %.1f us/request (%.2f s over the run)\n", cpu_per * 1e6,
           cpu1 - cpu0);
    printf("  kvr-epp RSS        %.0f kB idle, %.0f kB with %d streams held open: %.0f B/stream\n",
           rss0, rss1, hold, rss_per);
    printf("  load average       %.2f %.2f %.2f\n", la[0], la[1], la[2]);
    if (json) {
        FILE *f = fopen(json, "w");
        if (!f) {
            perror(json);
            goto down;
        }
        fprintf(f,
                "{\"bench\":\"epp\",\"routers\":%d,\"workers\":%d,\"conns\":%d,\"rate\":%g,"
                "\"concurrency\":%ld,\"seconds\":%.3f,\"requests_ok\":%" PRIu64
                ",\"rps\":%.1f,\"started\":%" PRIu64 ",\"unfinished\":%" PRIu64
                ",\"not_sent\":%" PRIu64 ",\"errors\":{",
                routers, workers, conns, concurrency ? 0 : rate, concurrency, t_run, reqs,
                t_run > 0 ? (double)reqs / t_run : 0, cl.started, unfinished, skipped);
        for (int i = 0; i < EPP_CLIENT_E_N; i++)
            fprintf(f, "%s\"%s\":%" PRIu64, i ? "," : "", epp_client_error_names[i], cl.errors[i]);
            /* NaN is not JSON: -1 for "not measured" */
#define J(x) (isnan(x) ? -1.0 : (x))
        fprintf(f,
                "},\"pick_client_ms\":{\"p50\":%.4f,\"p90\":%.4f,\"p99\":%.4f,\"max\":%.4f},"
                "\"pick_server_ms\":{\"p50\":%.4f,\"p90\":%.4f,\"p99\":%.4f},"
                "\"route_ms\":{\"p50\":%.4f,\"p99\":%.4f,\"mean\":%.4f},"
                "\"cpu_us_per_request\":%.2f,\"rss_idle_kb\":%.0f,\"rss_held_kb\":%.0f,"
                "\"held_streams\":%d,\"rss_bytes_per_stream\":%.0f,\"loadavg\":[%.2f,%.2f,%.2f]}\n",
                J(pct(&cl, 0.5) * 1e3), J(pct(&cl, 0.9) * 1e3), J(pct(&cl, 0.99) * 1e3),
                J(pct(&cl, 1.0) * 1e3), J(sp50 * 1e3), J(sp90 * 1e3), J(sp99 * 1e3), J(rp50 * 1e3),
                J(rp99 * 1e3), J(rmean * 1e3), J(cpu_per * 1e6), J(rss0), J(rss1), hold, J(rss_per),
                la[0], la[1], la[2]);
#undef J
        fclose(f);
    }
    rc = 0;
down:
    if (cl_inited) /* held streams and any still open go with it */
        epp_client_free(&cl);
    if (epp_started && run_proc_stop(&epp, 2000) != 0) {
        fprintf(stderr, "kvr-bench epp: kvr-epp (pid %d) did not stop\n", epp.pid);
        rc = 1;
    }
    run_reap();
    if (!keep) {
        char *down[] = {"down", "--dir", cdir, NULL};
        if (run_kvrctl("kvr-bench epp", down, true) != 0) {
            fprintf(stderr, "kvr-bench epp: kvrctl down reported processes left in %s\n", cdir);
            rc = 1;
        }
    } else {
        fprintf(stderr, "== --keep: cluster left running in %s (kvrctl down --dir %s)\n", cdir,
                cdir);
    }
    for (int i = 0; i < epp.argc; i++)
        free(epp.argv[i]);
    run_cluster_free(&c);
    return rc;
}
