/* kvr-bench worker: can one kvr-worker process (one loop thread) keep its simulated clock
 * while serving many concurrent SSE streams?
 *
 *   kvr-bench worker [--streams 2000] [--duration 20] [--speedup 100] [--prompt-tokens 512]
 *                    [--max-tokens 512] [--shared-prefix 256] [--max-num-seqs 256]
 *                    [--capacity-blocks 16384] [--stream-interval 1] [--url URL | --worker-bin PATH]
 *                    [--nats URL] [--nats-user U --nats-password-file F | --nats-token-file F |
 *                     --nats-nkey F | --nats-creds F] [--nats-tls-ca F ...] [--no-pin] [--json OUT]
 *
 * The --nats-* flags (net/kvr_nats_flags.h, the same set as every binary) go to the worker it
 * starts, for a --nats that wants credentials.
 * Unless --url is given, it starts nats-server (core, loopback) and kvr-worker itself, the
 * worker pinned to CPU 0 and this client to CPU 1 (when there are 2+ CPUs), and stops both at
 * the end. The client is a single-threaded epoll loop with raw non-blocking sockets: each of
 * --streams keep-alive connections issues streaming completions back to back (closed loop),
 * de-chunks the HTTP body, and counts token ids in the SSE events.
 *
 * The verdict comes from the worker's own clock metrics, read before and after the measured
 * window: behind = (lag growth + lag forgiven at idle gaps) / wall time, where lag = wall -
 * sim at a step start (kvr_worker_sim_lag_seconds, kvr_worker_sim_lag_erased_seconds); also
 * the raw ratio d(sim clock)/d(wall clock) and the largest lag seen at a step start. Pass: behind <= 5 % and no errors. max_tokens per request is drawn from
 * [max/2, 3max/2) so streams do not run in lockstep. */
#define _GNU_SOURCE
#include "kvr_bench.h"
#include "kvr_nats_flags.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BW_LINE_MAX 65536

typedef struct bw_opts {
    int streams, duration_s, prompt_tokens, max_tokens, shared_prefix;
    double speedup;
    int max_num_seqs, capacity_blocks, stream_interval;
    const char *url, *worker_bin, *nats, *json;
    bool pin;
    kvr_nats_flags nf; /* --nats-*: forwarded to the worker started here */
} bw_opts;

enum { C_CONNECTING, C_HEAD, C_SIZE, C_DATA, C_DATA_CRLF, C_TRAILER };

typedef struct conn {
    int fd;
    int state;
    size_t chunk_left;
    char *req;
    size_t req_len, req_off;
    char line[BW_LINE_MAX];
    size_t line_len;
    char head[4096];
    size_t head_len;
    int64_t req_start_ns, first_tok_ns;
    uint64_t toks_this_req;
    bool done_seen;
} conn;

typedef struct bw_stats {
    uint64_t tokens, chunks, requests, errors, http_errors;
    double ttft_sum_ms;
    uint64_t ttft_n;
} bw_stats;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &l)) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static void pin_to(pid_t pid, int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(pid, sizeof set, &set);
}

static pid_t spawn(char *const argv[], const char *log)
{
    pid_t pid = fork();
    if (pid == 0) {
        setpgid(0, 0);
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
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

static void stop(pid_t pid)
{
    if (pid <= 0)
        return;
    kill(pid, SIGTERM);
    for (int i = 0; i < 100; i++) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return;
        usleep(50000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* Blocking one-shot HTTP GET on loopback; returns the body (malloc'd) or NULL. */
static char *http_get(int port, const char *path)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return NULL;
    }
    char req[256];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", path);
    if (write(fd, req, (size_t)n) != n) {
        close(fd);
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (len + 4096 > cap)
            buf = realloc(buf, cap *= 2);
        ssize_t r = read(fd, buf + len, cap - len - 1);
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    close(fd);
    buf[len] = 0;
    char *body = strstr(buf, "\r\n\r\n");
    if (!body || strncmp(buf, "HTTP/1.1 200", 12) != 0) {
        free(buf);
        return NULL;
    }
    /* metrics come chunked or with a length; both render fine for a line-based lookup */
    memmove(buf, body + 4, strlen(body + 4) + 1);
    return buf;
}

static double metric(const char *text, const char *name)
{
    if (!text)
        return -1;
    size_t nl = strlen(name);
    for (const char *p = text; p && *p;) {
        if (strncmp(p, name, nl) == 0 && p[nl] == ' ')
            return strtod(p + nl + 1, NULL);
        p = strchr(p, '\n');
        if (p)
            p++;
    }
    return -1;
}

static int parse_port(const char *url)
{
    const char *c = strrchr(url, ':');
    return c ? atoi(c + 1) : -1;
}

/* ---- client ---- */

static char *make_request(const bw_opts *o, int i, uint64_t serial, size_t *len)
{
    /* shared_prefix common tokens (a system prompt), then request-unique tokens */
    size_t cap = (size_t)o->prompt_tokens * 8 + 512;
    char *body = malloc(cap);
    size_t b = 0;
    b += (size_t)snprintf(body + b, cap - b, "{\"prompt\":[");
    for (int t = 0; t < o->prompt_tokens; t++) {
        unsigned tok = t < o->shared_prefix ? 1000u + (unsigned)t
                                            : 300u + (unsigned)((serial * 7919u + (uint64_t)i * 104729u + (uint64_t)t * 31u) % 31000u);
        b += (size_t)snprintf(body + b, cap - b, t ? ",%u" : "%u", tok);
    }
    int mt = o->max_tokens / 2 + (int)((serial * 2654435761u + (uint64_t)i) % (uint64_t)(o->max_tokens > 1 ? o->max_tokens : 1));
    b += (size_t)snprintf(body + b, cap - b, "],\"max_tokens\":%d,\"stream\":true}", mt < 1 ? 1 : mt);
    char *req = malloc(b + 256);
    int h = snprintf(req, 256,
                     "POST /v1/completions HTTP/1.1\r\nHost: worker\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n",
                     b);
    memcpy(req + h, body, b);
    free(body);
    *len = (size_t)h + b;
    return req;
}

static int conn_open(conn *c, int port, int ep)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0)
        return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int r = connect(c->fd, (struct sockaddr *)&a, sizeof a);
    if (r != 0 && errno != EINPROGRESS) {
        close(c->fd);
        return -1;
    }
    c->state = C_CONNECTING;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    return epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

static void conn_start_req(conn *c, const bw_opts *o, int i, uint64_t serial)
{
    free(c->req);
    c->req = make_request(o, i, serial, &c->req_len);
    c->req_off = 0;
    c->head_len = 0;
    c->line_len = 0;
    c->state = C_HEAD;
    c->req_start_ns = now_ns();
    c->first_tok_ns = 0;
    c->toks_this_req = 0;
    c->done_seen = false;
}

static void on_line(conn *c, const char *l, size_t n, bw_stats *st)
{
    if (n < 6 || memcmp(l, "data: ", 6) != 0)
        return;
    if (n == 12 && memcmp(l + 6, "[DONE]", 6) == 0) {
        c->done_seen = true;
        return;
    }
    const char *p = memmem(l, n, "\"token_ids\":[", 13);
    if (!p)
        return;
    p += 13;
    const char *end = l + n;
    if (p < end && *p == ']')
        return;
    uint64_t k = 1;
    for (; p < end && *p != ']'; p++)
        k += *p == ',';
    st->tokens += k;
    st->chunks++;
    if (!c->first_tok_ns) {
        c->first_tok_ns = now_ns();
        st->ttft_sum_ms += (double)(c->first_tok_ns - c->req_start_ns) / 1e6;
        st->ttft_n++;
    }
    c->toks_this_req += k;
}

static void feed_body(conn *c, const char *d, size_t n, bw_stats *st)
{
    for (size_t i = 0; i < n; i++) {
        char ch = d[i];
        if (ch == '\n') {
            on_line(c, c->line, c->line_len, st);
            c->line_len = 0;
        } else if (c->line_len < BW_LINE_MAX) {
            c->line[c->line_len++] = ch;
        }
    }
}

/* Returns 1 when a response finished, 0 to continue, -1 on a protocol error. */
static int conn_read(conn *c, const char *buf, size_t n, bw_stats *st)
{
    size_t i = 0;
    while (i < n) {
        switch (c->state) {
        case C_HEAD: {
            char ch = buf[i++];
            if (c->head_len < sizeof c->head - 1)
                c->head[c->head_len++] = ch;
            if (c->head_len >= 4 && memcmp(c->head + c->head_len - 4, "\r\n\r\n", 4) == 0) {
                c->head[c->head_len] = 0;
                if (strncmp(c->head, "HTTP/1.1 200", 12) != 0) {
                    st->http_errors++;
                    return -1;
                }
                c->state = C_SIZE;
                c->chunk_left = 0;
                c->line_len = 0;
            }
            break;
        }
        case C_SIZE: {
            char ch = buf[i++];
            if (ch == '\n') {
                if (c->chunk_left == 0) {
                    c->state = C_TRAILER;
                    c->line_len = 0;
                } else {
                    c->state = C_DATA;
                }
            } else if (ch != '\r') {
                int v = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
                if (v < 0)
                    return -1;
                c->chunk_left = c->chunk_left * 16 + (size_t)v;
            }
            break;
        }
        case C_DATA: {
            size_t take = n - i < c->chunk_left ? n - i : c->chunk_left;
            feed_body(c, buf + i, take, st);
            i += take;
            c->chunk_left -= take;
            if (c->chunk_left == 0)
                c->state = C_DATA_CRLF;
            break;
        }
        case C_DATA_CRLF:
            if (buf[i++] == '\n') {
                c->state = C_SIZE;
                c->chunk_left = 0;
            }
            break;
        case C_TRAILER:
            if (buf[i++] == '\n') { /* the blank line after "0\r\n" ends the response */
                if (!c->done_seen)
                    return -1;
                return i == n ? 1 : -1; /* no pipelining */
            }
            break;
        default:
            return -1;
        }
    }
    return 0;
}

static int run_client(const bw_opts *o, int port, int64_t warm_ns, int64_t measure_ns,
                      bw_stats *measured, int worker_port, char **m_before, char **m_after)
{
    int ep = epoll_create1(0);
    conn *cs = calloc((size_t)o->streams, sizeof *cs);
    uint64_t serial = 0;
    bw_stats st = {0}, at_start = {0};
    for (int i = 0; i < o->streams; i++) {
        if (conn_open(&cs[i], port, ep) != 0) {
            fprintf(stderr, "bench worker: connect %d: %s\n", i, strerror(errno));
            return -1;
        }
    }
    struct epoll_event evs[512];
    static char buf[1 << 18];
    int64_t t0 = now_ns(), t_measure = t0 + warm_ns, t_end = t_measure + measure_ns;
    bool measuring = false;
    for (;;) {
        int64_t now = now_ns();
        if (!measuring && now >= t_measure) {
            measuring = true;
            at_start = st;
            *m_before = http_get(worker_port, "/metrics");
        }
        if (now >= t_end)
            break;
        int n = epoll_wait(ep, evs, 512, 100);
        for (int k = 0; k < n; k++) {
            conn *c = evs[k].data.ptr;
            int i = (int)(c - cs);
            if (c->state == C_CONNECTING) {
                int err = 0;
                socklen_t l = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err) {
                    fprintf(stderr, "bench worker: connect: %s\n", strerror(err));
                    return -1;
                }
                conn_start_req(c, o, i, serial++);
            }
            if ((evs[k].events & EPOLLOUT) && c->req_off < c->req_len) {
                ssize_t w = write(c->fd, c->req + c->req_off, c->req_len - c->req_off);
                if (w > 0)
                    c->req_off += (size_t)w;
                if (c->req_off == c->req_len) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
            }
            if (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                for (;;) {
                    ssize_t r = read(c->fd, buf, sizeof buf);
                    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                        break;
                    int rc = r > 0 ? conn_read(c, buf, (size_t)r, &st) : -1;
                    if (rc == 1) {
                        st.requests++;
                        conn_start_req(c, o, i, serial++);
                        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                        break;
                    }
                    if (rc < 0) { /* reconnect and carry on; counted */
                        st.errors++;
                        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                        close(c->fd);
                        if (conn_open(c, port, ep) != 0)
                            return -1;
                        break;
                    }
                }
            }
        }
    }
    *m_after = http_get(worker_port, "/metrics");
    measured->tokens = st.tokens - at_start.tokens;
    measured->chunks = st.chunks - at_start.chunks;
    measured->requests = st.requests - at_start.requests;
    measured->errors = st.errors - at_start.errors;
    measured->http_errors = st.http_errors - at_start.http_errors;
    measured->ttft_sum_ms = st.ttft_sum_ms - at_start.ttft_sum_ms;
    measured->ttft_n = st.ttft_n - at_start.ttft_n;
    for (int i = 0; i < o->streams; i++) {
        close(cs[i].fd);
        free(cs[i].req);
    }
    free(cs);
    close(ep);
    return 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: kvr-bench worker [--streams 2000] [--duration 20] [--speedup 100]\n"
            "  [--prompt-tokens 512] [--max-tokens 512] [--shared-prefix 256] [--max-num-seqs 256]\n"
            "  [--capacity-blocks 16384] [--stream-interval 1] [--url http://127.0.0.1:PORT | --worker-bin PATH]\n"
            "  [--nats URL] [--nats-user U --nats-password-file F | --nats-token-file F |\n"
            "   --nats-nkey F | --nats-creds F] [--nats-tls-ca F [--nats-tls-cert F --nats-tls-key F]]\n"
            "  [--no-pin] [--json OUT]\n");
}

int kvr_bench_worker(int argc, char **argv)
{
    bw_opts o = {.streams = 2000, .duration_s = 20, .prompt_tokens = 512, .max_tokens = 512,
                 .shared_prefix = 256, .speedup = 100, .max_num_seqs = 256,
                 .capacity_blocks = 16384, .stream_interval = 1, .pin = true};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--no-pin")) {
            o.pin = false;
            continue;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h") || !v) {
            usage();
            return !strcmp(a, "--help") || !strcmp(a, "-h") ? 0 : 2;
        }
        i++;
        if (!strcmp(a, "--streams")) o.streams = atoi(v);
        else if (!strcmp(a, "--duration")) o.duration_s = atoi(v);
        else if (!strcmp(a, "--speedup")) o.speedup = atof(v);
        else if (!strcmp(a, "--prompt-tokens")) o.prompt_tokens = atoi(v);
        else if (!strcmp(a, "--max-tokens")) o.max_tokens = atoi(v);
        else if (!strcmp(a, "--shared-prefix")) o.shared_prefix = atoi(v);
        else if (!strcmp(a, "--max-num-seqs")) o.max_num_seqs = atoi(v);
        else if (!strcmp(a, "--capacity-blocks")) o.capacity_blocks = atoi(v);
        else if (!strcmp(a, "--stream-interval")) o.stream_interval = atoi(v);
        else if (!strcmp(a, "--url")) o.url = v;
        else if (!strcmp(a, "--worker-bin")) o.worker_bin = v;
        else if (!strcmp(a, "--nats")) o.nats = v;
        else if (!strcmp(a, "--json")) o.json = v;
        else if (!strncmp(a, "--nats-", 7) && kvr_nats_flags_set(&o.nf, a + 2, strlen(a + 2), v) == 1)
            continue;
        else {
            fprintf(stderr, "bench worker: unknown option %s\n", a);
            usage();
            return 2;
        }
    }
    if (o.streams < 1 || o.streams > 15000 || o.duration_s < 1 || o.prompt_tokens < 1 ||
        o.max_tokens < 1 || o.speedup <= 0) {
        fprintf(stderr, "bench worker: bad options\n");
        return 2;
    }
    {
        /* checked here (files readable, one method) so a mistake is not a worker that never
         * connects; the worker reads the files itself */
        kvr_err nerr = {0};
        int nrc = kvr_nats_flags_load(&o.nf, &nerr);
        kvr_nats_flags_free(&o.nf);
        if (nrc != 0) {
            fprintf(stderr, "bench worker: %s\n", nerr.msg);
            return 2;
        }
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    bool two_cpus = sysconf(_SC_NPROCESSORS_ONLN) >= 2 && o.pin;

    pid_t nats_pid = -1, worker_pid = -1;
    int port;
    char tmpdir[] = "/tmp/kvr-bench-worker.XXXXXX";
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    if (o.url) {
        port = parse_port(o.url);
    } else {
        char nats_url[64];
        char nats_port_s[16];
        if (!o.nats) {
            int np = free_port();
            snprintf(nats_port_s, sizeof nats_port_s, "%d", np);
            char log[256];
            snprintf(log, sizeof log, "%s/nats.log", tmpdir);
            char *nargv[] = {"nats-server", "-a", "127.0.0.1", "-p", nats_port_s, NULL};
            nats_pid = spawn(nargv, log);
            snprintf(nats_url, sizeof nats_url, "nats://127.0.0.1:%d", np);
            o.nats = nats_url;
        }
        char bin[4096];
        if (o.worker_bin) {
            snprintf(bin, sizeof bin, "%s", o.worker_bin);
        } else {
            ssize_t l = readlink("/proc/self/exe", bin, sizeof bin - 32);
            bin[l > 0 ? l : 0] = 0;
            char *slash = strrchr(bin, '/');
            snprintf(slash ? slash + 1 : bin, 32, "kvr-worker");
        }
        port = free_port();
        char listen[64], speed[32], seqs[16], cap[16], si[16], log[256];
        snprintf(si, sizeof si, "%d", o.stream_interval);
        snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
        snprintf(speed, sizeof speed, "%g", o.speedup);
        snprintf(seqs, sizeof seqs, "%d", o.max_num_seqs);
        snprintf(cap, sizeof cap, "%d", o.capacity_blocks);
        snprintf(log, sizeof log, "%s/worker.log", tmpdir);
        char *wargv[21 + 2 * KVR_NATS_FLAGS_N + 1] = {
            bin, "--listen", listen, "--nats", (char *)o.nats, "--namespace", "bench",
            "--model", "sim", "--id", "1", "--speedup", speed, "--max-num-seqs", seqs,
            "--capacity-blocks", cap, "--stream-interval", si, "--log-level", "warn"};
        int wargc = 21;
        (void)kvr_nats_flags_argv(&o.nf, wargv, &wargc, 21 + 2 * KVR_NATS_FLAGS_N);
        wargv[wargc] = NULL;
        worker_pid = spawn(wargv, log);
        if (two_cpus) {
            pin_to(worker_pid, 0);
            pin_to(0, 1);
        }
        usleep(300000);
    }
    char *h = NULL;
    for (int i = 0; i < 100 && !(h = http_get(port, "/health")); i++)
        usleep(100000);
    if (!h) {
        fprintf(stderr, "bench worker: worker on port %d did not answer /health (logs in %s)\n", port, tmpdir);
        stop(worker_pid);
        stop(nats_pid);
        return 1;
    }
    free(h);
    printf("kvr-bench worker: %d streams, prompt %d tokens (%d shared), max_tokens %d, speedup %g, "
           "max-num-seqs %d, capacity %d blocks, stream-interval %d, %d s measured after %d s warm-up%s\n",
           o.streams, o.prompt_tokens, o.shared_prefix, o.max_tokens, o.speedup, o.max_num_seqs,
           o.capacity_blocks, o.stream_interval, o.duration_s, 5,
           two_cpus ? ", worker on CPU 0, client on CPU 1" : "");
    fflush(stdout);
    bw_stats st = {0};
    char *mb = NULL, *ma = NULL;
    struct rusage ru0, ru1;
    getrusage(RUSAGE_CHILDREN, &ru0);
    int rc = run_client(&o, port, 5000000000LL, (int64_t)o.duration_s * 1000000000LL, &st, port,
                        &mb, &ma);
    /* worker CPU: read /proc/<pid>/stat utime+stime when we own it */
    double cpu_s = -1;
    if (worker_pid > 0) {
        char path[64], sb[1024];
        snprintf(path, sizeof path, "/proc/%d/stat", (int)worker_pid);
        FILE *f = fopen(path, "r");
        if (f && fgets(sb, sizeof sb, f)) {
            char *p = strrchr(sb, ')');
            unsigned long ut = 0, stt = 0;
            if (p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &stt) == 2)
                cpu_s = (double)(ut + stt) / (double)sysconf(_SC_CLK_TCK);
        }
        if (f)
            fclose(f);
    }
    (void)ru0;
    getrusage(RUSAGE_SELF, &ru1);
    double client_cpu = (double)ru1.ru_utime.tv_sec + (double)ru1.ru_utime.tv_usec / 1e6 +
                        (double)ru1.ru_stime.tv_sec + (double)ru1.ru_stime.tv_usec / 1e6;
    double sim0 = -1, wall0 = -1, sim1 = -1, wall1 = -1;
    if (mb && ma) {
        sim0 = metric(mb, "kvr_worker_clock_seconds{clock=\"sim\"}");
        wall0 = metric(mb, "kvr_worker_clock_seconds{clock=\"wall\"}");
        sim1 = metric(ma, "kvr_worker_clock_seconds{clock=\"sim\"}");
        wall1 = metric(ma, "kvr_worker_clock_seconds{clock=\"wall\"}");
    }
    double dsim = sim1 - sim0, dwall = wall1 - wall0;
    /* how far the simulated clock fell behind over the window: lag growth plus the lag that
     * idle gaps forgave (the worker counts it), relative to the wall time */
    double lag_now = metric(ma, "kvr_worker_sim_lag_seconds");
    double lag_before = metric(mb, "kvr_worker_sim_lag_seconds");
    double erased = metric(ma, "kvr_worker_sim_lag_erased_seconds") - metric(mb, "kvr_worker_sim_lag_erased_seconds");
    double behind = dwall > 0 ? (erased + lag_now - lag_before) / dwall : -1;
    double clock_ratio = dwall > 0 ? dsim / dwall : -1;
    double lag_max = metric(ma, "kvr_worker_sim_lag_max_seconds");
    double running = metric(ma, "kvr_worker_running_seqs");
    double waiting = metric(ma, "kvr_worker_waiting_seqs");
    double steps = metric(ma, "kvr_worker_steps_total") - metric(mb, "kvr_worker_steps_total");
    double gen = metric(ma, "kvr_worker_generated_tokens_total") - metric(mb, "kvr_worker_generated_tokens_total");
    double pre = metric(ma, "kvr_worker_preemptions_total") - metric(mb, "kvr_worker_preemptions_total");
    double cached = metric(ma, "kvr_worker_cached_tokens_total") - metric(mb, "kvr_worker_cached_tokens_total");
    double prompt = metric(ma, "kvr_worker_prompt_tokens_total") - metric(mb, "kvr_worker_prompt_tokens_total");
    double D = o.duration_s;
    bool pass = rc == 0 && dwall > 0 && behind <= 0.05 && st.errors == 0 && st.http_errors == 0;
    printf("  client: %.0f tokens/s received, %.0f SSE chunks/s (%.1f tokens/chunk), %.1f requests/s, "
           "mean TTFT %.1f ms, errors %" PRIu64 ", client CPU %.1f s\n",
           (double)st.tokens / D, (double)st.chunks / D,
           st.chunks ? (double)st.tokens / (double)st.chunks : 0, (double)st.requests / D,
           st.ttft_n ? st.ttft_sum_ms / (double)st.ttft_n : 0, st.errors + st.http_errors, client_cpu);
    printf("  worker: %.0f steps/s, %.0f generated tokens/s, running %.0f, waiting %.0f, "
           "preemptions %.0f, prefix hit %.1f %%\n",
           steps / D, gen / D, running, waiting, pre, prompt > 0 ? 100.0 * cached / prompt : 0);
    printf("  clock:  sim advanced %.3f s in %.3f s wall (ratio %.4f); lag %.1f -> %.1f ms, forgiven at idle "
           "%.1f ms -> behind %.2f %%; max lag at a step start %.1f ms; worker CPU %.1f s total\n",
           dsim, dwall, clock_ratio, lag_before * 1000, lag_now * 1000, erased * 1000, behind * 100,
           lag_max * 1000, cpu_s);
    printf("  verdict: %s (behind <= 5 %%)\n", pass ? "PASS" : "FAIL");
    if (o.json) {
        FILE *f = fopen(o.json, "w");
        if (f) {
            fprintf(f,
                    "{\"streams\":%d,\"speedup\":%g,\"duration_s\":%d,\"prompt_tokens\":%d,"
                    "\"max_tokens\":%d,\"max_num_seqs\":%d,\"tokens_per_s\":%.1f,\"chunks_per_s\":%.1f,"
                    "\"requests_per_s\":%.2f,\"mean_ttft_ms\":%.2f,\"errors\":%" PRIu64 ","
                    "\"steps_per_s\":%.1f,\"worker_running\":%.0f,\"worker_waiting\":%.0f,"
                    "\"sim_advanced_s\":%.4f,\"wall_s\":%.4f,\"behind_ratio\":%.5f,"
                    "\"lag_now_ms\":%.2f,\"lag_max_ms\":%.2f,\"lag_forgiven_ms\":%.2f,\"clock_ratio\":%.5f,\"pass\":%s}\n",
                    o.streams, o.speedup, o.duration_s, o.prompt_tokens, o.max_tokens,
                    o.max_num_seqs, (double)st.tokens / D, (double)st.chunks / D,
                    (double)st.requests / D, st.ttft_n ? st.ttft_sum_ms / (double)st.ttft_n : 0,
                    st.errors + st.http_errors, steps / D, running, waiting, dsim, dwall, behind,
                    lag_now * 1000, lag_max * 1000, erased * 1000, clock_ratio, pass ? "true" : "false");
            fclose(f);
        }
    }
    free(mb);
    free(ma);
    stop(worker_pid);
    stop(nats_pid);
    if (worker_pid > 0) {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
        if (pass && system(cmd) != 0)
            fprintf(stderr, "bench worker: could not remove %s\n", tmpdir);
        if (!pass)
            fprintf(stderr, "bench worker: logs kept in %s\n", tmpdir);
    }
    return pass ? 0 : 1;
}
