/* kvr-bench epp: kvr-epp driven as Envoy's ext_proc filter drives it, from C.
 *
 * `kvrctl up --routers R --workers W --frontends 0` (nats-server -js, R kvr-routerd in one Raft
 * group, W kvr-workers), then kvr-epp (--secure-serving=false) on that NATS. The client is an
 * nghttp2 client session per connection on non-blocking sockets under one epoll loop (this
 * thread): K connections, many concurrent streams each. One stream = one request as Envoy's
 * FULL_DUPLEX_STREAMED filter sends it: RequestHeaders, RequestBody (one chunk, end_of_stream,
 * an OpenAI chat body); wait for the deferred HeadersResponse and the body echo; then
 * ResponseHeaders and a ResponseBody with end_of_stream (so the booking is freed), half-close,
 * and wait for grpc-status. Open loop at --rate R/s, or closed loop with --concurrency C.
 *
 * Measures: requests/s, errors by kind (ImmediateResponse status, grpc-status, reset), the
 * client's pick latency (last byte of the body message handed to the socket → HeadersResponse
 * parsed), kvr-epp's own kvr_epp_pick_seconds histogram (scraped before/after), kvr-epp CPU
 * seconds per request (/proc/PID/stat utime+stime) and RSS per open stream (RSS with --hold N
 * streams held open after their headers vs none).
 *
 * Every cluster is torn down with `kvrctl down`, and kvr-epp stopped, on every path. */
#include "kvr_bench.h"
#include "epp/proto/ext_proc_min.pb-c.h"
#include "kvr_buf.h"
#include "kvr_log.h"
#include "run_cluster.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BE_PATH "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
#define BE_MAX_CONNS 64
#define BE_STREAMS_PER_CONN 1000 /* kvr-epp allows 1,024 */

enum { ST_PICKING = 0, ST_ECHO, ST_RESPONSE, ST_HOLD };
enum { E_IMM_429 = 0, E_IMM_503, E_IMM_OTHER, E_GRPC, E_RESET, E_PROTO, E_N };
static const char *const e_names[E_N] = {"immediate_429", "immediate_503", "immediate_other",
                                         "grpc_status",   "reset",         "protocol"};

typedef struct be_conn be_conn;
typedef struct be_stream {
    be_conn *c;
    int32_t sid;
    int state;
    kvr_buf out; /* framed messages not yet handed to nghttp2 */
    size_t out_off;
    size_t body_end; /* offset in out just past the body message (0: sent) */
    bool eof;        /* half-close once out is drained */
    bool deferred;
    kvr_buf in; /* response bytes not yet a whole gRPC message */
    int64_t t_body_ns;
    int grpc_status;
    bool error_counted, imm;
    struct be_stream *lprev, *lnext; /* every live stream (freed at exit: nghttp2_session_del
                                        calls no close callback) */
} be_stream;

struct be_conn {
    int fd;
    nghttp2_session *s;
    int open;
    bool dead;
};

static struct {
    be_conn conns[BE_MAX_CONNS];
    int nconns, ep;
    uint8_t *m_headers, *m_body, *m_rheaders, *m_rbody; /* framed messages */
    size_t l_headers, l_body, l_rheaders, l_rbody;
    double *lat;
    size_t nlat, cap_lat;
    uint64_t started, done_ok, errors[E_N], open_streams, held;
    bool measuring;
    struct be_stream *live; /* list of live streams */
} B;

static volatile sig_atomic_t be_stop;
static void be_on_signal(int sig)
{
    (void)sig;
    be_stop = 1;
}

/* ---------- gRPC messages ---------- */

static uint8_t *frame(const Envoy__Service__ExtProc__V3__ProcessingRequest *r, size_t *len)
{
    size_t n = envoy__service__ext_proc__v3__processing_request__get_packed_size(r);
    uint8_t *b = malloc(n + 5);
    if (!b)
        return NULL;
    b[0] = 0;
    b[1] = (uint8_t)(n >> 24), b[2] = (uint8_t)(n >> 16), b[3] = (uint8_t)(n >> 8),
    b[4] = (uint8_t)n;
    envoy__service__ext_proc__v3__processing_request__pack(r, b + 5);
    *len = n + 5;
    return b;
}

static uint8_t *headers_msg(bool response, bool eos, size_t *len)
{
    Envoy__Config__Core__V3__HeaderValue h[3], *hp[3];
    const char *kv[2][3][2] = {
        {{":method", "POST"},
         {":path", "/v1/chat/completions"},
         {"content-type", "application/json"}},
        {{":status", "200"}, {"content-type", "text/event-stream"}, {"server", "kvr-worker"}}};
    for (int i = 0; i < 3; i++) {
        envoy__config__core__v3__header_value__init(&h[i]);
        h[i].key = (char *)kv[response][i][0];
        h[i].raw_value.data = (uint8_t *)kv[response][i][1];
        h[i].raw_value.len = strlen(kv[response][i][1]);
        hp[i] = &h[i];
    }
    Envoy__Config__Core__V3__HeaderMap hm = ENVOY__CONFIG__CORE__V3__HEADER_MAP__INIT;
    hm.n_headers = 3;
    hm.headers = hp;
    Envoy__Service__ExtProc__V3__HttpHeaders hh = ENVOY__SERVICE__EXT_PROC__V3__HTTP_HEADERS__INIT;
    hh.headers = &hm;
    hh.end_of_stream = eos;
    Envoy__Service__ExtProc__V3__ProcessingRequest r =
        ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__INIT;
    if (response) {
        r.request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_HEADERS;
        r.response_headers = &hh;
    } else {
        r.request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_HEADERS;
        r.request_headers = &hh;
    }
    return frame(&r, len);
}

static uint8_t *body_msg(bool response, const char *body, size_t *len)
{
    Envoy__Service__ExtProc__V3__HttpBody hb = ENVOY__SERVICE__EXT_PROC__V3__HTTP_BODY__INIT;
    hb.body.data = (uint8_t *)body;
    hb.body.len = strlen(body);
    hb.end_of_stream = true;
    Envoy__Service__ExtProc__V3__ProcessingRequest r =
        ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__INIT;
    if (response) {
        r.request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_BODY;
        r.response_body = &hb;
    } else {
        r.request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_BODY;
        r.request_body = &hb;
    }
    return frame(&r, len);
}

/* ---------- nghttp2 client ---------- */

static void count_error(be_stream *st, int e)
{
    if (st->error_counted)
        return;
    st->error_counted = true;
    if (B.measuring)
        B.errors[e]++;
}

static void queue_out(be_stream *st, const uint8_t *m, size_t n)
{
    kvr_buf_append(&st->out, m, n);
    if (st->deferred && st->sid > 0) {
        st->deferred = false;
        nghttp2_session_resume_data(st->c->s, st->sid);
    }
}

static void end_out(be_stream *st)
{
    st->eof = true;
    if (st->deferred && st->sid > 0) {
        st->deferred = false;
        nghttp2_session_resume_data(st->c->s, st->sid);
    }
}

static ssize_t data_read(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t len, uint32_t *flags,
                         nghttp2_data_source *src, void *ud)
{
    (void)s, (void)sid, (void)ud;
    be_stream *st = src->ptr;
    size_t avail = st->out.len - st->out_off;
    if (!avail) {
        if (st->eof) {
            *flags |= NGHTTP2_DATA_FLAG_EOF;
            return 0;
        }
        st->deferred = true;
        return NGHTTP2_ERR_DEFERRED;
    }
    size_t n = avail < len ? avail : len;
    memcpy(buf, st->out.base + st->out_off, n);
    st->out_off += n;
    if (st->body_end && st->out_off >= st->body_end) {
        st->body_end = 0;
        st->t_body_ns = kvr_mono_ns(); /* the body's last byte goes out now */
    }
    if (st->out_off == st->out.len) {
        st->out.len = 0;
        st->out_off = 0;
        if (st->eof)
            *flags |= NGHTTP2_DATA_FLAG_EOF;
    }
    return (ssize_t)n;
}

static void on_msg(be_stream *st, const uint8_t *m, size_t n)
{
    Envoy__Service__ExtProc__V3__ProcessingResponse *r =
        envoy__service__ext_proc__v3__processing_response__unpack(NULL, n, m);
    if (!r) {
        count_error(st, E_PROTO);
        nghttp2_submit_rst_stream(st->c->s, NGHTTP2_FLAG_NONE, st->sid, NGHTTP2_CANCEL);
        return;
    }
    switch (r->response_case) {
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_HEADERS:
        if (st->state == ST_PICKING) {
            if (B.measuring && st->t_body_ns) {
                if (B.nlat == B.cap_lat) {
                    size_t nc = B.cap_lat ? 2 * B.cap_lat : 65536;
                    double *nl = realloc(B.lat, nc * sizeof *nl);
                    if (nl)
                        B.lat = nl, B.cap_lat = nc;
                }
                if (B.nlat < B.cap_lat)
                    B.lat[B.nlat++] = (double)(kvr_mono_ns() - st->t_body_ns) / 1e9;
            }
            st->state = ST_ECHO;
        }
        break;
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_BODY: {
        const Envoy__Service__ExtProc__V3__BodyResponse *br = r->request_body;
        if (st->state == ST_ECHO && br->response && br->response->body_mutation &&
            br->response->body_mutation->streamed_response &&
            br->response->body_mutation->streamed_response->end_of_stream) {
            /* the model server answers: response headers, its body (end), then half-close */
            st->state = ST_RESPONSE;
            queue_out(st, B.m_rheaders, B.l_rheaders);
            queue_out(st, B.m_rbody, B.l_rbody);
            end_out(st);
        }
        break;
    }
    case ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_IMMEDIATE_RESPONSE: {
        int code = r->immediate_response->status ? r->immediate_response->status->code : 0;
        count_error(st, code == 429 ? E_IMM_429 : code == 503 ? E_IMM_503 : E_IMM_OTHER);
        st->imm = true;
        end_out(st);
        break;
    }
    default:
        break;
    }
    envoy__service__ext_proc__v3__processing_response__free_unpacked(r, NULL);
}

static int on_data(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data, size_t len,
                   void *ud)
{
    (void)flags, (void)ud;
    be_stream *st = nghttp2_session_get_stream_user_data(s, sid);
    if (!st)
        return 0;
    kvr_buf_append(&st->in, data, len);
    size_t off = 0;
    while (st->in.len - off >= 5) {
        const uint8_t *p = (const uint8_t *)st->in.base + off;
        size_t n = (size_t)p[1] << 24 | (size_t)p[2] << 16 | (size_t)p[3] << 8 | p[4];
        if (st->in.len - off < 5 + n)
            break;
        on_msg(st, p + 5, n);
        off += 5 + n;
    }
    if (off) {
        memmove(st->in.base, st->in.base + off, st->in.len - off);
        st->in.len -= off;
    }
    return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t nl,
                     const uint8_t *value, size_t vl, uint8_t flags, void *ud)
{
    (void)flags, (void)ud, (void)vl;
    be_stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (st && nl == 11 && memcmp(name, "grpc-status", 11) == 0)
        st->grpc_status = atoi((const char *)value);
    return 0;
}

static void stream_link(be_stream *st)
{
    st->lnext = B.live;
    if (B.live)
        B.live->lprev = st;
    B.live = st;
}

static void stream_free(be_stream *st)
{
    if (st->lprev)
        st->lprev->lnext = st->lnext;
    else if (B.live == st)
        B.live = st->lnext;
    if (st->lnext)
        st->lnext->lprev = st->lprev;
    kvr_buf_free(&st->out);
    kvr_buf_free(&st->in);
    free(st);
}

static int on_close(nghttp2_session *s, int32_t sid, uint32_t code, void *ud)
{
    (void)ud;
    be_stream *st = nghttp2_session_get_stream_user_data(s, sid);
    if (!st)
        return 0;
    if (st->state == ST_HOLD)
        B.held--;
    else if (code != NGHTTP2_NO_ERROR)
        count_error(st, E_RESET);
    else if (st->grpc_status != 0)
        count_error(st, E_GRPC);
    else if (!st->imm && st->state != ST_RESPONSE)
        count_error(st, E_PROTO);
    else if (!st->imm && B.measuring)
        B.done_ok++;
    st->c->open--;
    B.open_streams--;
    stream_free(st);
    return 0;
}

static ssize_t on_send(nghttp2_session *s, const uint8_t *data, size_t len, int flags, void *ud)
{
    (void)s, (void)flags;
    be_conn *c = ud;
    ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? NGHTTP2_ERR_WOULDBLOCK
                                                       : NGHTTP2_ERR_CALLBACK_FAILURE;
    return n;
}

static int conn_open(be_conn *c, int port)
{
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) != 0)
        return -1;
    fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
    nghttp2_session_callbacks *cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_send_callback(cb, on_send);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_close);
    int rc = nghttp2_session_client_new(&c->s, cb, c);
    nghttp2_session_callbacks_del(cb);
    if (rc)
        return -1;
    nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 100},
                                   {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20}};
    nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, iv, 2);
    nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0, 16 << 20);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(B.ep, EPOLL_CTL_ADD, c->fd, &ev);
    return 0;
}

/* A new stream on the least busy live connection: headers + body, or (hold) headers only. */
static int stream_start(bool hold)
{
    be_conn *c = NULL;
    for (int i = 0; i < B.nconns; i++)
        if (!B.conns[i].dead && B.conns[i].open < BE_STREAMS_PER_CONN &&
            (!c || B.conns[i].open < c->open))
            c = &B.conns[i];
    if (!c)
        return -1;
    be_stream *st = calloc(1, sizeof *st);
    if (!st)
        return -1;
    st->c = c;
    kvr_buf_init(&st->out);
    kvr_buf_init(&st->in);
    stream_link(st);
    kvr_buf_append(&st->out, B.m_headers, B.l_headers);
    if (hold) {
        st->state = ST_HOLD;
        B.held++;
    } else {
        kvr_buf_append(&st->out, B.m_body, B.l_body);
        st->body_end = st->out.len;
    }
    const nghttp2_nv nv[] = {
#define NV(n, v) {(uint8_t *)n, (uint8_t *)v, sizeof n - 1, sizeof v - 1, NGHTTP2_NV_FLAG_NONE}
        NV(":method", "POST"),       NV(":scheme", "http"), NV(":path", BE_PATH),
        NV(":authority", "kvr-epp"), NV("te", "trailers"),  NV("content-type", "application/grpc"),
#undef NV
    };
    nghttp2_data_provider dp = {.source.ptr = st, .read_callback = data_read};
    st->sid = nghttp2_submit_request(c->s, NULL, nv, sizeof nv / sizeof *nv, &dp, st);
    if (st->sid < 0) {
        stream_free(st);
        return -1;
    }
    c->open++;
    B.open_streams++;
    B.started++;
    return 0;
}

/* Hands every session's pending frames to its socket (streams just started go out now, not
 * after the next wait). */
static void flush_all(void)
{
    for (int i = 0; i < B.nconns; i++) {
        be_conn *c = &B.conns[i];
        if (c->dead)
            continue;
        if (nghttp2_session_send(c->s) != 0)
            c->dead = true;
        struct epoll_event ev = {
            .events = EPOLLIN | (nghttp2_session_want_write(c->s) ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(B.ep, EPOLL_CTL_MOD, c->fd, &ev);
    }
}

/* One turn: write what is pending, wait up to timeout_us for sockets (epoll_pwait2: an open loop at
 * 5,000/s needs waits under a millisecond without spinning a core), read, then let every session
 * write. */
static void pump_us(int64_t timeout_us)
{
    struct epoll_event evs[BE_MAX_CONNS];
    flush_all();
    if (timeout_us < 0)
        timeout_us = 0;
    struct timespec ts = {.tv_sec = timeout_us / 1000000, .tv_nsec = timeout_us % 1000000 * 1000};
    int n = epoll_pwait2(B.ep, evs, BE_MAX_CONNS, &ts, NULL);
    for (int i = 0; i < n; i++) {
        be_conn *c = evs[i].data.ptr;
        if (c->dead || !(evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
            continue;
        uint8_t buf[65536];
        for (;;) {
            ssize_t r = recv(c->fd, buf, sizeof buf, 0);
            if (r > 0) {
                if (nghttp2_session_mem_recv(c->s, buf, (size_t)r) < 0) {
                    c->dead = true;
                    break;
                }
                continue;
            }
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            c->dead = true; /* EOF or error */
            break;
        }
    }
    flush_all();
}

static void pump(int timeout_ms)
{
    pump_us((int64_t)timeout_ms * 1000);
}

/* ---------- kvr-epp's side: metrics, /proc ---------- */

static double proc_cpu_s(int pid)
{
    char p[64], buf[2048];
    snprintf(p, sizeof p, "/proc/%d/stat", pid);
    FILE *f = fopen(p, "r");
    if (!f)
        return NAN;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *q = strrchr(buf, ')');
    if (!q)
        return NAN;
    unsigned long ut = 0, stt = 0;
    /* after ")": state(3) … utime(14) stime(15) */
    if (sscanf(q + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &stt) != 2)
        return NAN;
    return (double)(ut + stt) / (double)sysconf(_SC_CLK_TCK);
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

#define BE_NB 20
typedef struct {
    double le[BE_NB], cum[BE_NB], count, sum;
    int n;
} be_hist;

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
    char pre[128];
    snprintf(pre, sizeof pre, "%s_bucket{le=\"", metric);
    size_t pl = strlen(pre);
    for (char *line = b.base; line && *line;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = 0;
        if (!strncmp(line, pre, pl) && h->n < BE_NB) {
            char *q = line + pl;
            h->le[h->n] = strncmp(q, "+Inf", 4) == 0 ? INFINITY : strtod(q, NULL);
            char *sp = strrchr(line, ' ');
            h->cum[h->n++] = sp ? strtod(sp + 1, NULL) : 0;
        } else if (!strncmp(line, metric, strlen(metric))) {
            const char *rest = line + strlen(metric);
            char *sp = strrchr(line, ' ');
            if (sp && !strncmp(rest, "_count ", 7))
                h->count = strtod(sp + 1, NULL);
            else if (sp && !strncmp(rest, "_sum ", 5))
                h->sum = strtod(sp + 1, NULL);
        } else if (gauge && !strncmp(line, "kvr_epp_open_streams ", 21)) {
            *gauge = strtod(line + 21, NULL);
        }
        line = nl ? nl + 1 : NULL;
    }
    kvr_buf_free(&b);
    return 0;
}

/* Quantile q of the bucket deltas (after - before), linear inside a bucket. */
static double hist_q(const be_hist *a, const be_hist *b, double q)
{
    double total = b->count - a->count;
    if (total <= 0 || b->n != a->n)
        return NAN;
    double want = q * total, prev_le = 0, prev_c = 0;
    for (int i = 0; i < b->n; i++) {
        double c = b->cum[i] - a->cum[i];
        if (c >= want) {
            if (isinf(b->le[i]))
                return prev_le;
            double f = c > prev_c ? (want - prev_c) / (c - prev_c) : 1;
            return prev_le + f * (b->le[i] - prev_le);
        }
        prev_le = b->le[i], prev_c = c;
    }
    return NAN;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p)
{
    if (!B.nlat)
        return NAN;
    size_t i = (size_t)(p * (double)(B.nlat - 1) + 0.5);
    return B.lat[i];
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t l = sizeof a;
    int port = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &l) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvr-bench epp [--routers 3] [--workers 8] [--rate 5000 | --concurrency C]\n"
            "                     [--duration 10] [--conns 4] [--hold 1000] [--warmup 1]\n"
            "                     [--epp-args \"…\"] [--dir D] [--keep] [--json OUT]\n\n"
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
    const char *json = NULL, *dir = NULL, *epp_args = "";
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
        else if (!strcmp(a, "--dir"))
            dir = v;
        else if (!strcmp(a, "--json"))
            json = v;
        else {
            usage(stderr);
            return 2;
        }
    }
    if (routers < 1 || workers < 1 || conns < 1 || conns > BE_MAX_CONNS || rate <= 0 ||
        duration <= 0 || hold < 0 || hold > conns * BE_STREAMS_PER_CONN || concurrency < 0 ||
        concurrency > (long)conns * BE_STREAMS_PER_CONN) {
        fprintf(stderr,
                "kvr-bench epp: bad options (--conns 1-%d; --hold and --concurrency at "
                "most %d per connection)\n",
                BE_MAX_CONNS, BE_STREAMS_PER_CONN);
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
                  "--workers", wstr,    "--frontends", "0",         NULL};
    fprintf(stderr, "== kvrctl up --routers %d --workers %d --frontends 0 in %s\n", routers,
            workers, cdir);
    int rc = 1;
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
    int gport = free_port(), mport = free_port();
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
    B.m_headers = headers_msg(false, false, &B.l_headers);
    B.m_body = body_msg(false, body, &B.l_body);
    B.m_rheaders = headers_msg(true, false, &B.l_rheaders);
    B.m_rbody = body_msg(true, "data: {\"choices\":[]}\n\ndata: [DONE]\n\n", &B.l_rbody);
    B.ep = epoll_create1(0);
    B.nconns = conns;
    for (int i = 0; i < conns; i++)
        if (conn_open(&B.conns[i], gport)) {
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
            while (B.open_streams && !be_stop) /* the warm-up's streams end first */
                pump(10);
            if (scrape(mport, "kvr_epp_pick_seconds", &h0, NULL) ||
                scrape(mport, "kvr_epp_route_seconds", &r0, NULL)) {
                fprintf(stderr, "kvr-bench epp: /metrics scrape failed\n");
                goto down;
            }
            cpu0 = proc_cpu_s(epp.pid);
            B.measuring = true;
        }
        int64_t t0 = kvr_mono_ns(), tend = t0 + (int64_t)(len * 1e9);
        uint64_t due0 = 0;
        for (;;) {
            int64_t now = kvr_mono_ns();
            if (now >= tend || be_stop)
                break;
            if (concurrency) {
                while (B.open_streams < (uint64_t)concurrency && stream_start(false) == 0)
                    ;
            } else {
                uint64_t due = (uint64_t)((double)(now - t0) / 1e9 * rate);
                for (; due0 < due; due0++)
                    if (stream_start(false) != 0)
                        skipped += phase; /* every connection full: the client is the limit */
            }
            if (concurrency) {
                pump(5);
            } else {
                /* until the next send is due, or the sockets wake us */
                double next = (double)(due0 + 1) / rate * 1e9 + (double)t0;
                pump_us((int64_t)((next - (double)kvr_mono_ns()) / 1e3));
            }
        }
        int64_t drain_until = kvr_mono_ns() + 5000000000LL;
        while (B.open_streams && kvr_mono_ns() < drain_until && !be_stop)
            pump(10);
        if (phase) {
            t_run = (double)(kvr_mono_ns() - t0) / 1e9;
            cpu1 = proc_cpu_s(epp.pid);
            B.measuring = false;
            scrape(mport, "kvr_epp_pick_seconds", &h1, NULL);
            scrape(mport, "kvr_epp_route_seconds", &r1, NULL);
        }
    }
    uint64_t unfinished = B.open_streams;
    /* RSS per open stream: --hold streams with their request headers sent, held open */
    double rss0 = proc_rss_kb(epp.pid), rss1 = rss0, open_seen = 0;
    if (hold && !be_stop) {
        for (int i = 0; i < hold; i++)
            stream_start(true);
        int64_t until = kvr_mono_ms() + 10000;
        be_hist hx;
        while (!be_stop && kvr_mono_ms() < until) {
            pump(50);
            if (scrape(mport, "kvr_epp_pick_seconds", &hx, &open_seen) == 0 &&
                open_seen >= hold + (double)unfinished)
                break;
        }
        rss1 = proc_rss_kb(epp.pid);
    }
    uint64_t reqs = B.done_ok;
    uint64_t nerr = 0;
    for (int i = 0; i < E_N; i++)
        nerr += B.errors[i];
    qsort(B.lat, B.nlat, sizeof *B.lat, cmp_d);
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
           reqs, t_run > 0 ? (double)reqs / t_run : 0, B.started, nerr, unfinished, skipped);
    for (int i = 0; i < E_N; i++)
        if (B.errors[i])
            printf("    %-18s %" PRIu64 "\n", e_names[i], B.errors[i]);
    printf("  pick, client       p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  max %.3f ms  (n=%zu)\n",
           pct(0.5) * 1e3, pct(0.9) * 1e3, pct(0.99) * 1e3, pct(1.0) * 1e3, B.nlat);
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
                t_run > 0 ? (double)reqs / t_run : 0, B.started, unfinished, skipped);
        for (int i = 0; i < E_N; i++)
            fprintf(f, "%s\"%s\":%" PRIu64, i ? "," : "", e_names[i], B.errors[i]);
            /* NaN is not JSON: -1 for "not measured" */
#define J(x) (isnan(x) ? -1.0 : (x))
        fprintf(f,
                "},\"pick_client_ms\":{\"p50\":%.4f,\"p90\":%.4f,\"p99\":%.4f,\"max\":%.4f},"
                "\"pick_server_ms\":{\"p50\":%.4f,\"p90\":%.4f,\"p99\":%.4f},"
                "\"route_ms\":{\"p50\":%.4f,\"p99\":%.4f,\"mean\":%.4f},"
                "\"cpu_us_per_request\":%.2f,\"rss_idle_kb\":%.0f,\"rss_held_kb\":%.0f,"
                "\"held_streams\":%d,\"rss_bytes_per_stream\":%.0f,\"loadavg\":[%.2f,%.2f,%.2f]}\n",
                J(pct(0.5) * 1e3), J(pct(0.9) * 1e3), J(pct(0.99) * 1e3), J(pct(1.0) * 1e3),
                J(sp50 * 1e3), J(sp90 * 1e3), J(sp99 * 1e3), J(rp50 * 1e3), J(rp99 * 1e3),
                J(rmean * 1e3), J(cpu_per * 1e6), J(rss0), J(rss1),
                hold, J(rss_per), la[0], la[1], la[2]);
#undef J
        fclose(f);
    }
    rc = 0;
down:
    for (int i = 0; i < B.nconns; i++)
        if (B.conns[i].s) {
            nghttp2_session_del(B.conns[i].s);
            close(B.conns[i].fd);
        }
    while (B.live) /* streams still open (held ones): no close callback came for them */
        stream_free(B.live);
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
    free(B.lat);
    return rc;
}
