/* kvr_http server against real sockets on loopback: keep-alive, pipelining, chunked bodies,
 * limits (413, 431, 400, 503), slow-loris timeout, SSE streaming, client disconnect,
 * backpressure. */
#define _GNU_SOURCE
#include "http_fixture.h"
#include "kvr_metrics.h"
#include "kvr_sse.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

/* ---------------------------------------------------------------- server-side handler */

typedef struct stream_job {
    kvr_http_req *req;
    uv_timer_t timer;
    fixture *fx;
    int i, n;
    bool ended;
} stream_job;

static void job_closed(uv_handle_t *h)
{
    free(h->data);
}

static void job_end(stream_job *j)
{
    if (!j->ended) {
        j->ended = true;
        kvr_http_stream_end(j->req);
    }
    uv_timer_stop(&j->timer);
    uv_close((uv_handle_t *)&j->timer, job_closed);
}

static void sse_tick(uv_timer_t *t)
{
    stream_job *j = t->data;
    char ev[64];
    int n = snprintf(ev, sizeof ev, "data: {\"i\":%d}\n\n", j->i);
    kvr_http_stream_write(j->req, ev, (size_t)n);
    if (++j->i >= j->n) {
        kvr_http_stream_write(j->req, "data: [DONE]\n\n", 14);
        job_end(j);
    }
}

static void sse_on_close(kvr_http_req *req)
{
    stream_job *j = req->data;
    j->fx->on_close_calls++;
    if (!j->fx->srv.closing)
        j->fx->on_close_by_client++;
    job_end(j); /* finishes (frees) req */
}

static void async_tick(uv_timer_t *t)
{
    stream_job *j = t->data;
    kvr_http_respond_cstr(j->req, 200, "text/plain", "later");
    j->ended = true;
    uv_close((uv_handle_t *)&j->timer, job_closed);
}

#define FLOOD_TOTAL (16u * 1024 * 1024)
#define FLOOD_CHUNK (64u * 1024)

static void flood_pump(kvr_http_req *req)
{
    fixture *fx = req->server->data;
    static char chunk[FLOOD_CHUNK];
    while (fx->streamed < FLOOD_TOTAL) {
        if (kvr_http_stream_should_pause(req))
            return; /* wait for on_drain */
        for (size_t k = 0; k < FLOOD_CHUNK; k++)
            chunk[k] = (char)('a' + (fx->streamed + k) % 26);
        if (kvr_http_stream_write(req, chunk, FLOOD_CHUNK) != 0)
            return;
        fx->streamed += FLOOD_CHUNK;
        size_t p = kvr_http_stream_pending_bytes(req);
        if (p > fx->max_pending)
            fx->max_pending = p;
    }
    kvr_http_stream_end(req);
}

static void flood_drain(kvr_http_req *req)
{
    fixture *fx = req->server->data;
    fx->drains++;
    flood_pump(req);
}

static void flood_close(kvr_http_req *req)
{
    fixture *fx = req->server->data;
    fx->on_close_calls++;
    kvr_http_stream_end(req);
}

static stream_job *job_new(fixture *fx, kvr_http_req *req)
{
    stream_job *j = calloc(1, sizeof *j);
    j->req = req;
    j->fx = fx;
    uv_timer_init(&fx->loop, &j->timer);
    j->timer.data = j;
    req->data = j;
    return j;
}

static void handler(kvr_http_req *req)
{
    fixture *fx = req->server->data;
    fx->requests_seen++;
    if (kvr_slice_eq_cstr(req->path, "/hello")) {
        kvr_http_respond_cstr(req, 200, "text/plain", "hello");
    } else if (kvr_slice_eq_cstr(req->path, "/echo")) {
        kvr_slice x = kvr_http_req_header(req, "X-Test");
        if (x.len) {
            char v[256];
            snprintf(v, sizeof v, "%.*s", (int)x.len, x.base);
            kvr_http_add_header(req, "X-Echo", v);
        }
        kvr_http_respond(req, 200, "application/octet-stream", req->body.base, req->body.len);
    } else if (kvr_slice_eq_cstr(req->path, "/query")) {
        kvr_http_respond(req, 200, "text/plain", req->query.base, req->query.len);
    } else if (kvr_slice_eq_cstr(req->path, "/async")) {
        stream_job *j = job_new(fx, req);
        uv_timer_start(&j->timer, async_tick, 30, 0);
    } else if (kvr_slice_eq_cstr(req->path, "/sse")) {
        stream_job *j = job_new(fx, req);
        j->n = 20;
        req->on_close = sse_on_close;
        kvr_http_stream_start(req, 200, "text/event-stream");
        uv_timer_start(&j->timer, sse_tick, 2, 2);
    } else if (kvr_slice_eq_cstr(req->path, "/hang")) {
        stream_job *j = job_new(fx, req);
        req->on_close = sse_on_close;
        kvr_http_stream_start(req, 200, "text/event-stream");
        kvr_http_stream_write(req, ": started\n\n", 11);
        (void)j;
    } else if (kvr_slice_eq_cstr(req->path, "/flood")) {
        req->on_drain = flood_drain;
        req->on_close = flood_close;
        kvr_http_stream_start(req, 200, "application/octet-stream");
        flood_pump(req);
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

static void run(fixture *fx, const kvr_http_config *cfg, client_fn fn)
{
    assert_int_equal(fx_run(fx, cfg, fn), 0);
}

static void save(fixture *fx, int i, kvr_buf *b)
{
    size_t n = b->len < sizeof fx->resp[i] - 1 ? b->len : sizeof fx->resp[i] - 1;
    memcpy(fx->resp[i], b->base ? b->base : "", n);
    fx->resp[i][n] = '\0';
    fx->resp_len[i] = b->len;
}

/* ---------------------------------------------------------------- keep-alive */

static void c_keepalive(fixture *fx)
{
    static fx_conn c;
    memset(&c, 0, sizeof c);
    c.fd = fx_connect(fx, 0);
    for (int i = 0; i < 3; i++) {
        fx_send_str(c.fd, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
        kvr_buf b;
        kvr_buf_init(&b);
        fx->ints[i] = fx_read_response(&c, &b);
        save(fx, i, &b);
        kvr_buf_free(&b);
    }
    fx_send_str(c.fd, "GET /query?a=1&b=2 HTTP/1.1\r\nHost: x\r\n\r\n");
    kvr_buf b;
    kvr_buf_init(&b);
    fx->ints[3] = fx_read_response(&c, &b);
    save(fx, 3, &b);
    kvr_buf_free(&b);
    close(c.fd);
}

static void test_keepalive(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    run(fx, &cfg, c_keepalive);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(fx->ints[i], 200);
        assert_non_null(strstr(fx->resp[i], "\r\n\r\nhello"));
        assert_non_null(strstr(fx->resp[i], "Content-Length: 5\r\n"));
        assert_null(strstr(fx->resp[i], "Connection: close"));
    }
    assert_int_equal(fx->ints[3], 200);
    assert_non_null(strstr(fx->resp[3], "\r\n\r\na=1&b=2"));
    assert_int_equal(fx->srv.stats.connections_accepted, 1);
    assert_int_equal(fx->srv.stats.requests, 4);
    assert_int_equal(fx->srv.stats.responses[2], 4);
    assert_int_equal(fx->srv.stats.connections_active, 0);
    /* The same counters through kvr_metrics. */
    kvr_metrics *m = kvr_metrics_new();
    assert_int_equal(kvr_metrics_add_http_server(m, "kvr_test_http", &fx->srv), 0);
    kvr_buf out;
    kvr_buf_init(&out);
    assert_int_equal(kvr_metrics_render(m, &out), 0);
    kvr_buf_append(&out, "", 1);
    assert_non_null(strstr(out.base, "\nkvr_test_http_requests_total 4\n"));
    assert_non_null(strstr(out.base, "\nkvr_test_http_responses_total{code=\"2xx\"} 4\n"));
    assert_non_null(strstr(out.base, "\nkvr_test_http_connections_total 1\n"));
    assert_non_null(strstr(out.base, "\nkvr_test_http_connections 0\n"));
    kvr_buf_free(&out);
    kvr_metrics_free(m);
    free(fx);
}

/* ---------------------------------------------------------------- pipelining */

static void c_pipelined(fixture *fx)
{
    static fx_conn c;
    memset(&c, 0, sizeof c);
    c.fd = fx_connect(fx, 0);
    /* The slow one first: responses must still come back in request order. */
    fx_send_str(c.fd,
                "GET /async HTTP/1.1\r\nHost: x\r\n\r\n"
                "POST /echo HTTP/1.1\r\nHost: x\r\nx-test: abc\r\nContent-Length: 4\r\n\r\nping"
                "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    for (int i = 0; i < 3; i++) {
        kvr_buf b;
        kvr_buf_init(&b);
        fx->ints[i] = fx_read_response(&c, &b);
        save(fx, i, &b);
        kvr_buf_free(&b);
    }
    /* The server closes after the Connection: close request. */
    char tmp[16];
    fx->ints[3] = (int)recv(c.fd, tmp, sizeof tmp, 0);
    close(c.fd);
}

static void test_pipelined(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    run(fx, &cfg, c_pipelined);
    assert_int_equal(fx->ints[0], 200);
    assert_non_null(strstr(fx->resp[0], "\r\n\r\nlater"));
    assert_int_equal(fx->ints[1], 200);
    assert_non_null(strstr(fx->resp[1], "\r\n\r\nping"));
    assert_non_null(strstr(fx->resp[1], "X-Echo: abc\r\n"));
    assert_int_equal(fx->ints[2], 200);
    assert_non_null(strstr(fx->resp[2], "Connection: close\r\n"));
    assert_int_equal(fx->ints[3], 0); /* EOF */
    assert_int_equal(fx->srv.stats.requests, 3);
    free(fx);
}

/* ---------------------------------------------------------------- chunked request body */

static void c_chunked(fixture *fx)
{
    static fx_conn c;
    memset(&c, 0, sizeof c);
    c.fd = fx_connect(fx, 0);
    fx_send_str(c.fd,
                "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel");
    fx_sleep_ms(20);
    fx_send_str(c.fd, "lo\r\n7\r\n, world\r\n0\r\n\r\n");
    kvr_buf b;
    kvr_buf_init(&b);
    fx->ints[0] = fx_read_response(&c, &b);
    save(fx, 0, &b);
    kvr_buf_free(&b);
    close(c.fd);
}

static void test_chunked_body(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    run(fx, &cfg, c_chunked);
    assert_int_equal(fx->ints[0], 200);
    assert_non_null(strstr(fx->resp[0], "Content-Length: 12\r\n"));
    assert_non_null(strstr(fx->resp[0], "\r\n\r\nhello, world"));
    free(fx);
}

/* ---------------------------------------------------------------- errors */

static void one_shot(fixture *fx, int slot, const char *req, size_t len)
{
    int fd = fx_connect(fx, 0);
    fx_send(fd, req, len);
    fx->resp_len[slot] = fx_read_all(fd, fx->resp[slot], sizeof fx->resp[slot]);
    fx->ints[slot] = atoi(fx->resp[slot] + 9);
    close(fd);
}

static void c_errors(fixture *fx)
{
    /* 413 from Content-Length alone: the body is never sent. */
    const char *big = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n";
    one_shot(fx, 0, big, strlen(big));
    /* 413 from a chunked body that grows past the limit. */
    static char chunked[3 * 1024 * 1024];
    int n = snprintf(chunked, sizeof chunked,
                     "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (int i = 0; i < 20; i++) {
        n += snprintf(chunked + n, sizeof chunked - (size_t)n, "10000\r\n");
        memset(chunked + n, 'x', 0x10000);
        n += 0x10000;
        n += snprintf(chunked + n, sizeof chunked - (size_t)n, "\r\n");
    }
    one_shot(fx, 1, chunked, (size_t)n);
    /* 431: a 20 KiB header. */
    static char hdr[32 * 1024];
    n = snprintf(hdr, sizeof hdr, "GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: ");
    memset(hdr + n, 'y', 20000);
    n += 20000;
    n += snprintf(hdr + n, sizeof hdr - (size_t)n, "\r\n\r\n");
    one_shot(fx, 2, hdr, (size_t)n);
    /* 400: garbage, and a bad Content-Length. */
    one_shot(fx, 3, "hello world\r\n\r\n", 15);
    const char *badcl = "GET /hello HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n";
    one_shot(fx, 4, badcl, strlen(badcl));
    /* 501: upgrade. */
    const char *up =
        "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
    one_shot(fx, 5, up, strlen(up));
    /* HTTP/1.0 without keep-alive: answered, then closed. */
    const char *h10 = "GET /hello HTTP/1.0\r\n\r\n";
    one_shot(fx, 6, h10, strlen(h10));
}

static void test_errors(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    cfg.max_body_bytes = 1024 * 1024;
    run(fx, &cfg, c_errors);
    assert_int_equal(fx->ints[0], 413);
    assert_non_null(strstr(fx->resp[0], "Connection: close"));
    assert_int_equal(fx->ints[1], 413);
    assert_int_equal(fx->ints[2], 431);
    assert_int_equal(fx->ints[3], 400);
    assert_int_equal(fx->ints[4], 400);
    assert_int_equal(fx->ints[5], 501);
    assert_int_equal(fx->ints[6], 200);
    assert_non_null(strstr(fx->resp[6], "Connection: close\r\n"));
    assert_non_null(strstr(fx->resp[6], "\r\n\r\nhello"));
    assert_int_equal(fx->requests_seen, 1); /* only the HTTP/1.0 one reached the handler */
    assert_int_equal(fx->srv.stats.parse_errors, 6);
    assert_int_equal(fx->srv.stats.responses[4], 5);
    assert_int_equal(fx->srv.stats.responses[5], 1);
    free(fx);
}

/* ---------------------------------------------------------------- slow loris */

static void c_slowloris(fixture *fx)
{
    int fd = fx_connect(fx, 0);
    double t0 = fx_now();
    fx_send_str(fd, "GET /hello HTTP/1.1\r\nHost: x\r\n");
    /* Keep trickling header bytes: the deadline covers the whole head, not each byte. */
    for (int i = 0; i < 6; i++) {
        fx_sleep_ms(100);
        if (fx_send_str(fd, "X-a: b\r\n") != 0)
            break;
    }
    fx->resp_len[0] = fx_read_all(fd, fx->resp[0], sizeof fx->resp[0]);
    fx->secs = fx_now() - t0;
    fx->ints[0] = atoi(fx->resp[0] + 9);
    close(fd);
    /* An idle keep-alive connection is closed after idle_timeout. */
    fd = fx_connect(fx, 0);
    fx_send_str(fd, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    fx->resp_len[1] = fx_read_all(fd, fx->resp[1], sizeof fx->resp[1]);
    fx->ints[1] = atoi(fx->resp[1] + 9);
    close(fd);
}

static void test_slowloris(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    cfg.header_timeout_ms = 300;
    cfg.idle_timeout_ms = 300;
    run(fx, &cfg, c_slowloris);
    assert_int_equal(fx->ints[0], 408);
    assert_true(fx->secs < 5.0);        /* closed by the server, not by the client's 10 s timeout */
    assert_int_equal(fx->ints[1], 200); /* answered, then closed when idle (read_all saw EOF) */
    assert_int_equal(fx->srv.stats.timeouts, 2);
    assert_int_equal(fx->requests_seen, 1);
    free(fx);
}

/* ---------------------------------------------------------------- SSE */

typedef struct sse_seen {
    int count;
    int bad;
    int done;
} sse_seen;

static int on_sse(void *arg, kvr_slice ev, kvr_slice data)
{
    sse_seen *s = arg;
    if (kvr_slice_eq_cstr(data, "[DONE]")) {
        s->done++;
        return 0;
    }
    char want[32];
    snprintf(want, sizeof want, "{\"i\":%d}", s->count);
    if (!kvr_slice_eq_cstr(data, want))
        s->bad++;
    s->count++;
    return 0;
}

static void c_sse(fixture *fx)
{
    static fx_conn c;
    memset(&c, 0, sizeof c);
    c.fd = fx_connect(fx, 0);
    fx_send_str(c.fd, "GET /sse HTTP/1.1\r\nHost: x\r\n\r\n");
    kvr_buf b;
    kvr_buf_init(&b);
    fx->ints[0] = fx_read_response(&c, &b);
    save(fx, 0, &b);
    char *body = strstr(b.base, "\r\n\r\n");
    sse_seen seen = {0};
    kvr_sse p;
    kvr_sse_init(&p, 0, 0, on_sse, &seen);
    kvr_err err;
    if (body)
        kvr_sse_feed(&p, body + 4, b.len - (size_t)(body + 4 - b.base), &err);
    kvr_sse_free(&p);
    fx->ints[1] = seen.count;
    fx->ints[2] = seen.bad;
    fx->ints[3] = seen.done;
    kvr_buf_free(&b);
    /* Same connection still usable after the stream. */
    fx_send_str(c.fd, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    kvr_buf_init(&b);
    fx->ints[4] = fx_read_response(&c, &b);
    kvr_buf_free(&b);
    close(c.fd);
}

static void test_sse_stream(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    run(fx, &cfg, c_sse);
    assert_int_equal(fx->ints[0], 200);
    assert_non_null(strstr(fx->resp[0], "Content-Type: text/event-stream\r\n"));
    assert_non_null(strstr(fx->resp[0], "Transfer-Encoding: chunked\r\n"));
    assert_non_null(strstr(fx->resp[0], "Cache-Control: no-cache\r\n"));
    assert_int_equal(fx->ints[1], 20);
    assert_int_equal(fx->ints[2], 0);
    assert_int_equal(fx->ints[3], 1);
    assert_int_equal(fx->ints[4], 200);
    assert_int_equal(fx->on_close_calls, 0);
    free(fx);
}

/* ---------------------------------------------------------------- client disconnect */

static void c_disconnect(fixture *fx)
{
    static fx_conn c;
    memset(&c, 0, sizeof c);
    c.fd = fx_connect(fx, 0);
    fx_send_str(c.fd, "GET /hang HTTP/1.1\r\nHost: x\r\n\r\n");
    /* Wait for the head and the first chunk, then vanish. */
    while (memmem(c.buf, c.len, "started", 7) == NULL)
        if (fx_fill(&c) != 0)
            break;
    fx->ints[0] = atoi(c.buf + 9);
    close(c.fd);
    /* Give the server a moment to notice before the fixture closes it. */
    for (int i = 0; i < 200 && __atomic_load_n(&fx->on_close_by_client, __ATOMIC_RELAXED) == 0; i++)
        fx_sleep_ms(10);
}

static void test_disconnect_mid_stream(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    run(fx, &cfg, c_disconnect);
    assert_int_equal(fx->ints[0], 200);
    assert_int_equal(fx->on_close_calls, 1);
    assert_int_equal(fx->on_close_by_client, 1);
    assert_int_equal(fx->srv.stats.client_gone, 1);
    free(fx);
}

/* ---------------------------------------------------------------- backpressure */

static void c_backpressure(fixture *fx)
{
    int fd = fx_connect(fx, 16 * 1024);
    fx_send_str(fd, "GET /flood HTTP/1.1\r\nHost: x\r\n\r\n");
    /* Do not read for a while: the server's queue must grow to the high-water mark. */
    fx_sleep_ms(500);
    fx->ints[0] = __atomic_load_n(&fx->drains, __ATOMIC_RELAXED);
    /* Now read everything (chunked framing included) and check the payload pattern. */
    static fx_conn c;
    memset(&c, 0, sizeof c);
    c.fd = fd;
    kvr_buf b;
    kvr_buf_init(&b);
    /* fx_read_response would keep 16 MiB in memory: fine for a test. */
    fx->ints[1] = fx_read_response(&c, &b);
    char *body = memmem(b.base, b.len, "\r\n\r\n", 4);
    size_t blen = body ? b.len - (size_t)(body + 4 - b.base) : 0;
    fx->resp_len[0] = blen;
    int bad = 0;
    for (size_t k = 0; body && k < blen; k++)
        if (body[4 + k] != (char)('a' + k % 26)) {
            bad = 1;
            break;
        }
    fx->ints[2] = bad;
    kvr_buf_free(&b);
    close(fd);
}

static void test_backpressure(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    cfg.stream_high_water = 256 * 1024;
    cfg.stream_low_water = 64 * 1024;
    run(fx, &cfg, c_backpressure);
    assert_int_equal(fx->ints[0], 0);           /* no drain while the client slept */
    assert_true(fx->max_pending >= 256 * 1024); /* the queue reached the mark ... */
    assert_true(fx->max_pending < 256 * 1024 + 2 * FLOOD_CHUNK); /* ... and the producer stopped */
    assert_true(fx->drains >= 1); /* resumed by on_drain once the client read */
    assert_int_equal(fx->ints[1], 200);
    assert_int_equal(fx->resp_len[0], FLOOD_TOTAL);
    assert_int_equal(fx->ints[2], 0);
    assert_int_equal(fx->streamed, FLOOD_TOTAL);
    free(fx);
}

/* ---------------------------------------------------------------- max connections */

static void c_maxconn(fixture *fx)
{
    static fx_conn a, b;
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    a.fd = fx_connect(fx, 0);
    b.fd = fx_connect(fx, 0);
    kvr_buf buf;
    kvr_buf_init(&buf);
    fx_send_str(a.fd, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    fx->ints[0] = fx_read_response(&a, &buf);
    fx_send_str(b.fd, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    fx->ints[1] = fx_read_response(&b, &buf);
    kvr_buf_free(&buf);
    int fd = fx_connect(fx, 0);
    fx->resp_len[2] = fx_read_all(fd, fx->resp[2], sizeof fx->resp[2]);
    fx->ints[2] = atoi(fx->resp[2] + 9);
    close(fd);
    close(a.fd);
    close(b.fd);
}

static void test_max_connections(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    cfg.max_connections = 2;
    run(fx, &cfg, c_maxconn);
    assert_int_equal(fx->ints[0], 200);
    assert_int_equal(fx->ints[1], 200);
    assert_int_equal(fx->ints[2], 503);
    assert_int_equal(fx->srv.stats.connections_rejected, 1);
    free(fx);
}

/* ---------------------------------------------------------------- HEAD, HTTP/1.0 streams,
 * 100-continue */

static void c_misc(fixture *fx)
{
    static fx_conn c;
    memset(&c, 0, sizeof c);
    c.fd = fx_connect(fx, 0);
    /* HEAD: the head of the GET, no body; the connection stays usable. */
    fx_send_str(c.fd,
                "HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    char *end;
    while ((end = memmem(c.buf, c.len, "\r\n\r\n", 4)) == NULL)
        if (fx_fill(&c) != 0)
            break;
    if (end) {
        size_t hl = (size_t)(end - c.buf) + 4;
        memcpy(fx->resp[0], c.buf, hl);
        fx->resp[0][hl] = '\0';
        kvr_buf drop;
        kvr_buf_init(&drop);
        fx_take(&c, hl, NULL);
        fx->ints[0] = atoi(fx->resp[0] + 9);
        /* the next bytes must be the GET's response, not a HEAD body */
        fx->ints[1] = fx_read_response(&c, &drop);
        save(fx, 1, &drop);
        kvr_buf_free(&drop);
    }
    /* Expect: 100-continue: the server says go before the body is sent. */
    fx_send_str(
        c.fd,
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n");
    while (memmem(c.buf, c.len, "\r\n\r\n", 4) == NULL)
        if (fx_fill(&c) != 0)
            break;
    fx->ints[2] = atoi(c.buf + 9);
    fx_take(&c, c.len, NULL);
    fx_send_str(c.fd, "abc");
    kvr_buf b;
    kvr_buf_init(&b);
    fx->ints[3] = fx_read_response(&c, &b);
    save(fx, 3, &b);
    kvr_buf_free(&b);
    close(c.fd);
    /* HTTP/1.0 stream: no chunked framing, the body ends at the close. */
    int fd = fx_connect(fx, 0);
    fx_send_str(fd, "GET /sse HTTP/1.0\r\n\r\n");
    fx->resp_len[4] = fx_read_all(fd, fx->resp[4], sizeof fx->resp[4]);
    close(fd);
    /* An unknown expectation. */
    fd = fx_connect(fx, 0);
    fx_send_str(fd, "GET /hello HTTP/1.1\r\nHost: x\r\nExpect: something\r\n\r\n");
    fx->resp_len[5] = fx_read_all(fd, fx->resp[5], sizeof fx->resp[5]);
    fx->ints[5] = atoi(fx->resp[5] + 9);
    close(fd);
}

static void test_head_http10_continue(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    run(fx, &cfg, c_misc);
    assert_int_equal(fx->ints[0], 200);
    assert_non_null(strstr(fx->resp[0], "Content-Length: 5\r\n"));
    assert_int_equal(fx->ints[1], 200);
    assert_non_null(strstr(fx->resp[1], "\r\n\r\nhello"));
    assert_int_equal(fx->ints[2], 100);
    assert_int_equal(fx->ints[3], 200);
    assert_non_null(strstr(fx->resp[3], "\r\n\r\nabc"));
    assert_null(strstr(fx->resp[4], "chunked"));
    assert_non_null(strstr(fx->resp[4], "Connection: close\r\n"));
    assert_non_null(strstr(fx->resp[4], "\r\n\r\ndata: {\"i\":0}\n\n"));
    assert_non_null(strstr(fx->resp[4], "data: [DONE]\n\n"));
    assert_int_equal(fx->ints[5], 417);
    free(fx);
}

/* ---------------------------------------------------------------- server close with a live stream
 */

static void c_server_close(fixture *fx)
{
    static fx_conn c;
    memset(&c, 0, sizeof c);
    c.fd = fx_connect(fx, 0);
    fx_send_str(c.fd, "GET /hang HTTP/1.1\r\nHost: x\r\n\r\n");
    while (memmem(c.buf, c.len, "started", 7) == NULL)
        if (fx_fill(&c) != 0)
            break;
    fx->ints[0] = atoi(c.buf + 9);
    /* Returning makes the fixture close the server while the stream is open. Wait for EOF
     * from a second thread's point of view afterwards is not needed: the fixture joins us. */
    fx->user = (void *)(intptr_t)c.fd;
}

static void test_server_close_live_stream(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    run(fx, &cfg, c_server_close);
    assert_int_equal(fx->ints[0], 200);
    assert_int_equal(fx->on_close_calls, 1);     /* the handler heard about it ... */
    assert_int_equal(fx->on_close_by_client, 0); /* ... because the server closed */
    /* the client sees the connection end */
    int fd = (int)(intptr_t)fx->user;
    char tmp[4096];
    ssize_t r;
    while ((r = recv(fd, tmp, sizeof tmp, 0)) > 0)
        ;
    assert_int_equal(r, 0);
    close(fd);
    free(fx);
}

/* ---------------------------------------------------------------- byte-by-byte and garbage */

static const char PIPE3[] = "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                            "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                            "GET /query?k=v HTTP/1.1\r\nHost: x\r\n\r\n"
                            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nxy";

static void c_trickle(fixture *fx)
{
    static fx_conn c;
    memset(&c, 0, sizeof c);
    c.fd = fx_connect(fx, 0);
    int one = 1;
    setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    for (size_t i = 0; i < sizeof PIPE3 - 1; i++) {
        fx_send(c.fd, PIPE3 + i, 1);
        if (i % 16 == 0)
            fx_sleep_ms(1); /* let the server see many partial reads */
    }
    for (int i = 0; i < 3; i++) {
        kvr_buf b;
        kvr_buf_init(&b);
        fx->ints[i] = fx_read_response(&c, &b);
        save(fx, i, &b);
        kvr_buf_free(&b);
    }
    close(c.fd);
}

static void test_byte_by_byte(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    run(fx, &cfg, c_trickle);
    assert_int_equal(fx->ints[0], 200);
    assert_non_null(strstr(fx->resp[0], "\r\n\r\nabcde"));
    assert_int_equal(fx->ints[1], 200);
    assert_non_null(strstr(fx->resp[1], "\r\n\r\nk=v"));
    assert_int_equal(fx->ints[2], 200);
    assert_non_null(strstr(fx->resp[2], "\r\n\r\nxy"));
    free(fx);
}

/* Random mutations of valid requests: the server must answer or close every one, and
 * keep serving (checked with a final clean request). Run under ASan/valgrind too. */
static void c_garbage(fixture *fx)
{
    uint32_t seed = 12345;
    int answered = 0, closed = 0;
    for (int round = 0; round < 150; round++) {
        char msg[sizeof PIPE3 + 64];
        size_t n = sizeof PIPE3 - 1;
        memcpy(msg, PIPE3, n);
        for (int k = 0; k < 1 + round % 6; k++) {
            seed = seed * 1103515245u + 12345u;
            size_t pos = (seed >> 8) % n;
            seed = seed * 1103515245u + 12345u;
            switch ((seed >> 16) % 3) {
            case 0:
                msg[pos] = (char)(seed >> 24);
                break; /* flip a byte */
            case 1:
                n = pos + 1;
                break; /* truncate */
            default:
                msg[pos] = "\r\n :\0"[(seed >> 24) % 5];
                break;
            }
        }
        int fd = fx_connect(fx, 0);
        fx_send(fd, msg, n);
        shutdown(fd, SHUT_WR); /* a truncated request must not wait for the header timeout */
        char out[4096];
        size_t got = fx_read_all(fd, out, sizeof out);
        if (got > 0)
            answered++;
        else
            closed++;
        close(fd);
    }
    fx->ints[0] = answered;
    fx->ints[1] = closed;
    static fx_conn c;
    memset(&c, 0, sizeof c);
    c.fd = fx_connect(fx, 0);
    fx_send_str(c.fd, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    kvr_buf b;
    kvr_buf_init(&b);
    fx->ints[2] = fx_read_response(&c, &b);
    kvr_buf_free(&b);
    close(c.fd);
}

static void test_garbage_survives(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    cfg.header_timeout_ms = 2000;
    run(fx, &cfg, c_garbage);
    assert_int_equal(fx->ints[0] + fx->ints[1], 150);
    assert_int_equal(fx->ints[2], 200);
    assert_int_equal(fx->srv.stats.connections_active, 0);
    free(fx);
}

/* ---------------------------------------------------------------- stalled reader */

static void c_stalled(fixture *fx)
{
    int fd = fx_connect(fx, 16 * 1024);
    fx_send_str(fd, "GET /flood HTTP/1.1\r\nHost: x\r\n\r\n");
    /* Never read; the server must give up on us by itself. */
    for (int i = 0; i < 500 && __atomic_load_n(&fx->on_close_calls, __ATOMIC_RELAXED) == 0; i++)
        fx_sleep_ms(10);
    fx->ints[0] = __atomic_load_n(&fx->on_close_calls, __ATOMIC_RELAXED);
    close(fd);
}

static void test_stalled_reader_times_out(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    kvr_http_config cfg = base_cfg();
    cfg.stream_high_water = 256 * 1024;
    cfg.stream_low_water = 64 * 1024;
    cfg.write_timeout_ms = 300;
    run(fx, &cfg, c_stalled);
    assert_int_equal(fx->ints[0], 1); /* on_close while the client was still connected */
    assert_true(fx->streamed < FLOOD_TOTAL);
    assert_int_equal(fx->srv.stats.timeouts, 1);
    assert_int_equal(fx->srv.stats.client_gone, 1);
    free(fx);
}

/* ---------------------------------------------------------------- listen errors */

static void noop_handler(kvr_http_req *req)
{
    kvr_http_respond(req, 200, NULL, NULL, 0);
}

static void test_listen_errors(void **state)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    kvr_http_server a, b;
    kvr_http_config cfg = {.on_request = noop_handler};
    kvr_err err = {0};
    assert_int_equal(kvr_http_server_init(&a, &loop, &cfg), 0);
    assert_int_equal(kvr_http_listen(&a, "127.0.0.1", &err), KVR_EINVAL);
    assert_non_null(strstr(err.msg, "port"));
    assert_int_equal(kvr_http_listen(&a, "nohost:80x", &err), KVR_EINVAL);
    assert_int_equal(kvr_http_listen(&a, "127.0.0.1:0", &err), 0);
    assert_true(kvr_http_server_port(&a) > 0);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", kvr_http_server_port(&a));
    assert_int_equal(kvr_http_server_init(&b, &loop, &cfg), 0);
    assert_int_equal(kvr_http_listen(&b, addr, &err), KVR_EIO);
    assert_non_null(strstr(err.msg, "address already in use"));
    kvr_http_server c6;
    assert_int_equal(kvr_http_server_init(&c6, &loop, &cfg), 0);
    assert_int_equal(kvr_http_listen(&c6, "localhost:0", &err), 0);
    kvr_http_server_close(&c6, NULL);
    kvr_http_server_close(&a, NULL);
    kvr_http_server_close(&b, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    kvr_http_config bad = {0};
    assert_int_equal(kvr_http_server_init(&a, &loop, &bad), KVR_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keepalive),
        cmocka_unit_test(test_pipelined),
        cmocka_unit_test(test_chunked_body),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_slowloris),
        cmocka_unit_test(test_sse_stream),
        cmocka_unit_test(test_disconnect_mid_stream),
        cmocka_unit_test(test_backpressure),
        cmocka_unit_test(test_max_connections),
        cmocka_unit_test(test_listen_errors),
        cmocka_unit_test(test_head_http10_continue),
        cmocka_unit_test(test_server_close_live_stream),
        cmocka_unit_test(test_byte_by_byte),
        cmocka_unit_test(test_garbage_survives),
        cmocka_unit_test(test_stalled_reader_times_out),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
