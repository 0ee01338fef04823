/* kvr_http against hostile clients on real loopback sockets (issue 18): trailers must not touch
 * the parsed head, a client pipelining without reading must not grow the server's output
 * queue without bound, slow bodies have a total deadline and are shed before new clients are
 * refused, an over-limit chunked body is refused at its chunk header, every status the code
 * sends has its reason phrase. Run under ASan (build-asan) and valgrind as well. */
#define _GNU_SOURCE
#include "http_fixture.h"
#include "kvr_metrics.h"

#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#define BIG_BODY 8192

static char g_big[BIG_BODY];

static void handler(kvr_http_req *req)
{
    fixture *fx = req->server->data;
    __atomic_add_fetch(&fx->requests_seen, 1, __ATOMIC_RELAXED);
    if (kvr_slice_eq_cstr(req->path, "/health")) {
        kvr_slice x = kvr_http_req_header(req, "X-Test");
        char v[64];
        snprintf(v, sizeof v, "%.*s", (int)x.len, x.base ? x.base : "");
        kvr_http_add_header(req, "X-Echo", v);
        char body[256];
        int n = snprintf(body, sizeof body, "ok %.*s?%.*s", (int)req->path.len, req->path.base,
                         (int)req->query.len, req->query.base);
        kvr_http_respond(req, 200, "text/plain", body, (size_t)n);
    } else if (kvr_slice_eq_cstr(req->path, "/big")) {
        /* Output queued to this connection before answering: the bound under test. */
        size_t p = kvr_http_stream_pending_bytes(req);
        if (p > fx->max_pending)
            fx->max_pending = p;
        kvr_http_respond(req, 200, "application/octet-stream", g_big, sizeof g_big);
    } else if (kvr_slice_eq_cstr(req->path, "/echo")) {
        kvr_http_respond(req, 200, "application/octet-stream", req->body.base, req->body.len);
    } else {
        kvr_http_respond_cstr(req, 404, "text/plain", "not found");
    }
}

static kvr_http_config base_cfg(void)
{
    kvr_http_config c = {0};
    c.on_request = handler;
    return c;
}

static void save(fixture *fx, int i, kvr_buf *b)
{
    size_t n = b->len < sizeof fx->resp[i] - 1 ? b->len : sizeof fx->resp[i] - 1;
    memcpy(fx->resp[i], b->base ? b->base : "", n);
    fx->resp[i][n] = '\0';
    fx->resp_len[i] = b->len;
}

static int one_request(fixture *fx, const char *req, int slot)
{
    static fx_conn c;
    memset(&c, 0, sizeof c);
    c.fd = fx_connect(fx, 0);
    if (c.fd < 0)
        return -1;
    fx_send_str(c.fd, req);
    kvr_buf b;
    kvr_buf_init(&b);
    int st = fx_read_response(&c, &b);
    if (slot >= 0)
        save(fx, slot, &b);
    kvr_buf_free(&b);
    close(c.fd);
    return st;
}

/* ---------------------------------------------------------------- trailers (defect 1) */

static void c_trailers(fixture *fx)
{
    /* Enough trailer bytes to make the head buffer realloc (and move) if they were appended
     * to it: path, query and headers point into that buffer. */
    kvr_buf r;
    kvr_buf_init(&r);
    kvr_buf_appendf(&r, "GET /health?probe=1 HTTP/1.1\r\nHost: x\r\nX-Test: keep\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n");
    for (int i = 0; i < 20; i++) {
        kvr_buf_appendf(&r, "X-Trailer-%d: ", i);
        for (int k = 0; k < 200; k++)
            kvr_buf_append(&r, "t", 1);
        kvr_buf_append(&r, "\r\n", 2);
    }
    kvr_buf_append(&r, "\r\n", 2);
    kvr_buf_append(&r, "", 1);
    fx->ints[0] = one_request(fx, r.base, 0);
    kvr_buf_free(&r);
    /* Trailers over max_header_bytes are refused like headers. */
    kvr_buf_init(&r);
    kvr_buf_appendf(&r, "POST /echo HTTP/1.1\r\nHost: x\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n");
    for (int i = 0; i < 40; i++) {
        kvr_buf_appendf(&r, "X-T%d: ", i);
        for (int k = 0; k < 200; k++)
            kvr_buf_append(&r, "t", 1);
        kvr_buf_append(&r, "\r\n", 2);
    }
    kvr_buf_append(&r, "\r\n", 2);
    kvr_buf_append(&r, "", 1);
    fx->ints[1] = one_request(fx, r.base, 1);
    kvr_buf_free(&r);
    fx->ints[2] = one_request(fx, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 2);
}

static void test_trailers_keep_head(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    cfg.max_header_bytes = 6000;
    assert_int_equal(fx_run(fx, &cfg, c_trailers), 0);
    assert_int_equal(fx->ints[0], 200);
    assert_non_null(strstr(fx->resp[0], "\r\n\r\nok /health?probe=1"));
    assert_non_null(strstr(fx->resp[0], "X-Echo: keep\r\n"));
    assert_int_equal(fx->ints[1], 431);
    assert_int_equal(fx->ints[2], 200);
    free(fx);
}

/* ---------------------------------------------------------------- reason phrases (defect 14) */

static void c_expect(fixture *fx)
{
    int fd = fx_connect(fx, 0);
    fx_send_str(fd, "GET /health HTTP/1.1\r\nHost: x\r\nExpect: something\r\n\r\n");
    fx->resp_len[0] = fx_read_all(fd, fx->resp[0], sizeof fx->resp[0]);
    close(fd);
}

static void test_status_text(void **state)
{
    /* Every status kvroute emits (grep of respond/conn_error/err_status in the tree). */
    static const int sent[] = {100, 200, 204, 400, 401, 403, 404, 405, 408, 409, 413,
                               415, 417, 422, 429, 431, 499, 500, 501, 502, 503, 504};
    for (size_t i = 0; i < sizeof sent / sizeof sent[0]; i++)
        assert_string_not_equal(kvr_http_status_text(sent[i]), "Unknown");
    assert_string_equal(kvr_http_status_text(417), "Expectation Failed");
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    assert_int_equal(fx_run(fx, &cfg, c_expect), 0);
    assert_non_null(strstr(fx->resp[0], "HTTP/1.1 417 Expectation Failed\r\n"));
    free(fx);
}

/* ---------------------------------------------------------------- pipelining (defect 6) */

#define PIPE_N 3000
static const char PIPE_REQ[] = "GET /big HTTP/1.1\r\nHost: x\r\n\r\n";

static void c_pipeline(fixture *fx)
{
    int fd = fx_connect(fx, 32 * 1024);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    const size_t rl = sizeof PIPE_REQ - 1;
    size_t total = rl * PIPE_N, sent = 0;
    /* Phase 1: pipeline as much as the socket takes, read nothing, until the server stops
     * making progress (it must: its output queue is bounded). */
    int last = -1, stable = 0;
    for (int i = 0; i < 400 && stable < 10; i++) {
        while (sent < total) {
            size_t off = sent % rl;
            ssize_t w = send(fd, PIPE_REQ + off, rl - off, MSG_NOSIGNAL);
            if (w <= 0)
                break;
            sent += (size_t)w;
        }
        fx_sleep_ms(50);
        int seen = __atomic_load_n(&fx->requests_seen, __ATOMIC_RELAXED);
        stable = seen == last ? stable + 1 : 0;
        last = seen;
    }
    fx->ints[0] = last; /* requests served while the client read nothing */
    fx->ints[1] = (int)(sent / rl);
    /* Phase 2: read everything; the server must resume and answer every request. */
    size_t want = 0;
    {
        char head[256];
        int hl = snprintf(head, sizeof head,
                          "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                          "Content-Length: %d\r\n\r\n",
                          BIG_BODY);
        want = (size_t)(hl + BIG_BODY) * PIPE_N;
    }
    size_t got = 0;
    double t0 = fx_now();
    static char buf[1 << 16];
    while (got < want && fx_now() - t0 < 30) {
        struct pollfd pf = {fd, POLLIN | (sent < total ? POLLOUT : 0), 0};
        if (poll(&pf, 1, 1000) < 0)
            break;
        if (pf.revents & POLLOUT) {
            size_t off = sent % rl;
            ssize_t w = send(fd, PIPE_REQ + off, rl - off, MSG_NOSIGNAL);
            if (w > 0)
                sent += (size_t)w;
        }
        if (pf.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t r = recv(fd, buf, sizeof buf, 0);
            if (r <= 0)
                break;
            got += (size_t)r;
        }
    }
    fx->ints[2] = got == want;
    close(fd);
}

static void test_pipeline_backpressure(void **state)
{
    memset(g_big, 'b', sizeof g_big);
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    cfg.stream_high_water = 64 * 1024;
    cfg.stream_low_water = 16 * 1024;
    assert_int_equal(fx_run(fx, &cfg, c_pipeline), 0);
    print_message("pipelined %d, served unread %d, max queued %zu bytes\n", fx->ints[1],
                  fx->ints[0], fx->max_pending);
    /* The server stopped answering a client that reads nothing (the socket buffers hold a
     * few hundred answers at most, not all of them)... */
    assert_true(fx->ints[0] < PIPE_N / 2);
    /* ...its queue for that connection stayed within the high-water mark plus one answer... */
    assert_true(fx->max_pending <= cfg.stream_high_water + BIG_BODY + 256);
    /* ...and it served every request once the client read. */
    assert_int_equal(fx->ints[2], 1);
    assert_int_equal(fx->requests_seen, PIPE_N);
    free(fx);
}

static void c_pipeline_never_reads(fixture *fx)
{
    int fd = fx_connect(fx, 16 * 1024);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    const size_t rl = sizeof PIPE_REQ - 1;
    size_t sent = 0;
    /* Pipeline and never read: the server must give up on us after write_timeout_ms. */
    for (int i = 0; i < 500; i++) {
        while (sent < rl * PIPE_N) {
            size_t off = sent % rl;
            ssize_t w = send(fd, PIPE_REQ + off, rl - off, MSG_NOSIGNAL);
            if (w <= 0)
                break;
            sent += (size_t)w;
        }
        if (__atomic_load_n(&fx->srv.stats.timeouts, __ATOMIC_RELAXED) > 0)
            break;
        fx_sleep_ms(20);
    }
    fx->ints[0] = (int)__atomic_load_n(&fx->srv.stats.timeouts, __ATOMIC_RELAXED);
    close(fd);
}

static void test_pipeline_nonreader_closed(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    cfg.stream_high_water = 64 * 1024;
    cfg.stream_low_water = 16 * 1024;
    cfg.write_timeout_ms = 300;
    assert_int_equal(fx_run(fx, &cfg, c_pipeline_never_reads), 0);
    assert_int_equal(fx->ints[0], 1);
    assert_true(fx->requests_seen < PIPE_N / 2);
    assert_int_equal(fx->srv.stats.connections_active, 0);
    free(fx);
}

/* ---------------------------------------------------------------- slow bodies (defect 7) */

static void c_trickle_body(fixture *fx)
{
    int fd = fx_connect(fx, 0);
    double t0 = fx_now();
    fx_send_str(fd, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n");
    /* One byte every 50 ms: each read would re-arm a per-read timer forever. */
    for (int i = 0; i < 80; i++) {
        if (fx_send_str(fd, "x") != 0)
            break;
        fx_sleep_ms(50);
        struct pollfd pf = {fd, POLLIN, 0};
        if (poll(&pf, 1, 0) > 0)
            break; /* answered */
    }
    fx->resp_len[0] = fx_read_all(fd, fx->resp[0], sizeof fx->resp[0]);
    fx->secs = fx_now() - t0;
    fx->ints[0] = atoi(fx->resp[0] + 9);
    close(fd);
}

static void test_body_total_deadline(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    cfg.header_timeout_ms = 300;
    cfg.request_timeout_ms = 600;
    assert_int_equal(fx_run(fx, &cfg, c_trickle_body), 0);
    assert_int_equal(fx->ints[0], 408);
    assert_true(fx->secs < 2.5); /* the deadline, not 80 trickled bytes (4 s) */
    assert_int_equal(fx->requests_seen, 0);
    free(fx);
}

#define SLOW_N 12

static void c_slow_bodies(fixture *fx)
{
    int fds[SLOW_N];
    /* Slow uploads announcing a big body and sending a little of it. */
    for (int i = 0; i < SLOW_N; i++) {
        fds[i] = fx_connect(fx, 0);
        fx_send_str(fds[i], "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nab");
    }
    /* Let the server see every one of them before the probes come. */
    for (int i = 0; i < 200; i++) {
        if (__atomic_load_n(&fx->srv.stats.connections_accepted, __ATOMIC_RELAXED) >= SLOW_N)
            break;
        fx_sleep_ms(10);
    }
    fx_sleep_ms(100);
    int ok = 0;
    for (int i = 0; i < 20; i++) {
        if (one_request(fx, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        i == 0 ? 0 : -1) == 200)
            ok++;
        /* A slow client keeps coming back. */
        if (i % 4 == 0) {
            int fd = fx_connect(fx, 0);
            fx_send_str(fd, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nab");
            close(fds[i % SLOW_N]);
            fds[i % SLOW_N] = fd;
        }
    }
    fx->ints[0] = ok;
    for (int i = 0; i < SLOW_N; i++)
        close(fds[i]);
}

static void test_slow_bodies_shed(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    cfg.max_connections = 8;
    cfg.max_reading_connections = 4;
    assert_int_equal(fx_run(fx, &cfg, c_slow_bodies), 0);
    print_message("health ok %d/20, shed %llu, rejected %llu\n", fx->ints[0],
                  (unsigned long long)fx->srv.stats.shed,
                  (unsigned long long)fx->srv.stats.connections_rejected);
    assert_int_equal(fx->ints[0], 20);
    assert_true(fx->srv.stats.shed >= SLOW_N - 4);
    assert_int_equal(fx->srv.stats.connections_rejected, 0);
    /* Operators see it. */
    kvr_metrics *m = kvr_metrics_new();
    assert_int_equal(kvr_metrics_add_http_server(m, "t", &fx->srv), 0);
    kvr_buf out;
    kvr_buf_init(&out);
    assert_int_equal(kvr_metrics_render(m, &out), 0);
    kvr_buf_append(&out, "", 1);
    char want[64];
    snprintf(want, sizeof want, "\nt_shed_connections_total %llu\n",
             (unsigned long long)fx->srv.stats.shed);
    assert_non_null(strstr(out.base, want));
    kvr_buf_free(&out);
    kvr_metrics_free(m);
    free(fx);
}

/* ---------------------------------------------------------------- early 413 (defect 7) */

static void c_chunked_over(fixture *fx)
{
    int fd = fx_connect(fx, 0);
    double t0 = fx_now();
    /* A chunk announcing 1 MiB against a 1 KiB limit, then a few bytes of it, then silence. */
    fx_send_str(fd, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "100000\r\nabcdefgh");
    char out[4096];
    ssize_t r = recv(fd, out, sizeof out - 1, 0);
    fx->secs = fx_now() - t0;
    out[r > 0 ? r : 0] = '\0';
    fx->ints[0] = r > 12 ? atoi(out + 9) : -1;
    close(fd);
    /* Several small chunks: refused at the chunk that crosses the limit. */
    fd = fx_connect(fx, 0);
    fx_send_str(fd, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "200\r\n");
    char chunk[512];
    memset(chunk, 'c', sizeof chunk);
    fx_send(fd, chunk, sizeof chunk);
    fx_send_str(fd, "\r\n200\r\n");
    fx_send(fd, chunk, sizeof chunk);
    fx_send_str(fd, "\r\n200\r\n");
    r = recv(fd, out, sizeof out - 1, 0);
    out[r > 0 ? r : 0] = '\0';
    fx->ints[1] = r > 12 ? atoi(out + 9) : -1;
    close(fd);
}

static void test_chunked_over_limit_early(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    cfg.max_body_bytes = 1024;
    assert_int_equal(fx_run(fx, &cfg, c_chunked_over), 0);
    assert_int_equal(fx->ints[0], 413);
    assert_true(fx->secs < 2.0); /* not after the client's 10 s timeout or the body deadline */
    assert_int_equal(fx->ints[1], 413);
    assert_int_equal(fx->requests_seen, 0);
    free(fx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_trailers_keep_head),
        cmocka_unit_test(test_status_text),
        cmocka_unit_test(test_pipeline_backpressure),
        cmocka_unit_test(test_pipeline_nonreader_closed),
        cmocka_unit_test(test_body_total_deadline),
        cmocka_unit_test(test_slow_bodies_shed),
        cmocka_unit_test(test_chunked_over_limit_early),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
