/* kvr_curl (libcurl multi on libuv) against a real kvr_http server on loopback, both on one
 * loop: connection reuse, big POST bodies, SSE streaming through kvr_sse, cancellation that the
 * server sees as a client disconnect, timeouts, refused connections, pause/resume
 * backpressure, body limits, close with requests in flight. */
#define _GNU_SOURCE
#include "kvr_curl.h"
#include "kvr_http.h"
#include "kvr_sse.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <cmocka.h>

#define FLOOD_TOTAL (16u * 1024 * 1024)
#define FLOOD_CHUNK (64u * 1024)

typedef struct ctx {
    uv_loop_t loop;
    kvr_http_server srv;
    kvr_curl kc;
    uv_timer_t guard;
    uv_timer_t resume;
    char url[128];
    bool finished;
    /* server side */
    int on_close_by_client;
    int drains;
    size_t streamed;
    size_t max_pending;
    /* client side */
    int dones;
    int last_result;
    long last_status;
    char last_err[256];
    kvr_buf body;
    int headers_calls;
    int header_echo;
    int sequential_left;
    int sse_events;
    int sse_bad;
    int sse_done;
    kvr_sse sse;
    int pauses;
    size_t received;
    int pattern_bad;
    kvr_curl_req *req;
    int close_cb_calls;
} ctx;

/* ---------------------------------------------------------------- server */

typedef struct job {
    uv_timer_t t;
    kvr_http_req *req;
    int i;
    bool ended;
} job;

static void job_closed(uv_handle_t *h)
{
    free(h->data);
}

static void job_end(job *j)
{
    if (!j->ended) {
        j->ended = true;
        kvr_http_stream_end(j->req);
        uv_timer_stop(&j->t);
        uv_close((uv_handle_t *)&j->t, job_closed);
    }
}

static void sse_tick(uv_timer_t *t)
{
    job *j = t->data;
    char ev[64];
    int n = snprintf(ev, sizeof ev, "data: {\"i\":%d}\n\n", j->i);
    kvr_http_stream_write(j->req, ev, (size_t)n);
    if (++j->i >= 20) {
        kvr_http_stream_write(j->req, "data: [DONE]\n\n", 14);
        job_end(j);
    }
}

static void job_on_close(kvr_http_req *req)
{
    ctx *c = req->server->data;
    if (!c->srv.closing)
        c->on_close_by_client++;
    job_end(req->data);
}

static void flood_pump(kvr_http_req *req)
{
    ctx *c = req->server->data;
    static char chunk[FLOOD_CHUNK];
    while (c->streamed < FLOOD_TOTAL) {
        if (kvr_http_stream_should_pause(req))
            return;
        for (size_t k = 0; k < FLOOD_CHUNK; k++)
            chunk[k] = (char)('a' + (c->streamed + k) % 26);
        if (kvr_http_stream_write(req, chunk, FLOOD_CHUNK) != 0)
            return;
        c->streamed += FLOOD_CHUNK;
        size_t p = kvr_http_stream_pending_bytes(req);
        if (p > c->max_pending)
            c->max_pending = p;
    }
    kvr_http_stream_end(req);
}

static void flood_drain(kvr_http_req *req)
{
    ctx *c = req->server->data;
    c->drains++;
    flood_pump(req);
}

static void flood_close(kvr_http_req *req)
{
    kvr_http_stream_end(req);
}

static void handler(kvr_http_req *req)
{
    ctx *c = req->server->data;
    if (kvr_slice_eq_cstr(req->path, "/hello")) {
        kvr_http_respond_cstr(req, 200, "text/plain", "hello");
    } else if (kvr_slice_eq_cstr(req->path, "/echo")) {
        if (kvr_http_req_header(req, "X-Test").len)
            kvr_http_add_header(req, "X-Echo", "yes");
        kvr_http_respond(req, 200, "application/octet-stream", req->body.base, req->body.len);
    } else if (kvr_slice_eq_cstr(req->path, "/sse") || kvr_slice_eq_cstr(req->path, "/hang")) {
        job *j = calloc(1, sizeof *j);
        j->req = req;
        uv_timer_init(&c->loop, &j->t);
        j->t.data = j;
        req->data = j;
        req->on_close = job_on_close;
        kvr_http_stream_start(req, 200, "text/event-stream");
        if (kvr_slice_eq_cstr(req->path, "/sse"))
            uv_timer_start(&j->t, sse_tick, 2, 2);
        else
            kvr_http_stream_write(req, ": started\n\n", 11);
    } else if (kvr_slice_eq_cstr(req->path, "/flood")) {
        req->on_drain = flood_drain;
        req->on_close = flood_close;
        kvr_http_stream_start(req, 200, "application/octet-stream");
        flood_pump(req);
    } else {
        kvr_http_respond_cstr(req, 404, "text/plain", "not found");
    }
}

/* ---------------------------------------------------------------- harness */

static void on_kc_closed(kvr_curl *kc)
{
    ctx *c = kc->data;
    c->close_cb_calls++;
}

static void finish(ctx *c)
{
    if (c->finished)
        return;
    c->finished = true;
    uv_timer_stop(&c->guard);
    uv_close((uv_handle_t *)&c->guard, NULL);
    if (uv_is_active((uv_handle_t *)&c->resume) || !uv_is_closing((uv_handle_t *)&c->resume))
        uv_close((uv_handle_t *)&c->resume, NULL);
    kvr_curl_close(&c->kc, on_kc_closed);
    kvr_http_server_close(&c->srv, NULL);
}

static void on_guard(uv_timer_t *t)
{
    ctx *c = t->data;
    fprintf(stderr, "guard timer fired: test did not finish\n");
    finish(c);
}

static ctx *setup(const kvr_http_config *extra)
{
    ctx *c = calloc(1, sizeof *c);
    assert_int_equal(uv_loop_init(&c->loop), 0);
    kvr_http_config cfg = {.on_request = handler};
    if (extra)
        cfg = *extra;
    cfg.on_request = handler;
    c->srv.data = c;
    assert_int_equal(kvr_http_server_init(&c->srv, &c->loop, &cfg), 0);
    kvr_err err = {0};
    assert_int_equal(kvr_http_listen(&c->srv, "127.0.0.1:0", &err), 0);
    snprintf(c->url, sizeof c->url, "http://127.0.0.1:%d", kvr_http_server_port(&c->srv));
    c->kc.data = c;
    assert_int_equal(kvr_curl_init(&c->kc, &c->loop, NULL, &err), 0);
    uv_timer_init(&c->loop, &c->guard);
    c->guard.data = c;
    uv_timer_start(&c->guard, on_guard, 30000, 0);
    uv_timer_init(&c->loop, &c->resume);
    c->resume.data = c;
    return c;
}

static void run_and_teardown(ctx *c)
{
    uv_run(&c->loop, UV_RUN_DEFAULT);
    assert_true(c->finished);
    assert_int_equal(c->close_cb_calls, 1);
    assert_int_equal(uv_loop_close(&c->loop), 0);
}

static void ctx_free(ctx *c)
{
    kvr_buf_free(&c->body);
    kvr_sse_free(&c->sse);
    free(c);
}

static void start(ctx *c, const kvr_curl_opts *o)
{
    kvr_err err = {0};
    int rv = kvr_curl_start(&c->kc, o, &c->req, &err);
    if (rv != 0)
        fail_msg("kvr_curl_start: %s", err.msg);
}

static void record_done(kvr_curl_req *r, int result, long status, const char *errmsg,
                        kvr_slice body)
{
    ctx *c = kvr_curl_req_data(r);
    c->dones++;
    c->last_result = result;
    c->last_status = status;
    snprintf(c->last_err, sizeof c->last_err, "%s", errmsg);
    kvr_buf_reset(&c->body);
    kvr_buf_append(&c->body, body.base, body.len);
}

/* ---------------------------------------------------------------- tests */

static void seq_done(kvr_curl_req *r, int result, long status, const char *errmsg, kvr_slice body)
{
    ctx *c = kvr_curl_req_data(r);
    record_done(r, result, status, errmsg, body);
    if (result != 0 || status != 200 || !kvr_slice_eq_cstr(body, "hello") ||
        --c->sequential_left == 0) {
        finish(c);
        return;
    }
    char url[160];
    snprintf(url, sizeof url, "%s/hello", c->url);
    kvr_curl_opts o = {.url = url, .on_done = seq_done, .data = c};
    start(c, &o); /* from inside on_done: allowed */
}

static void test_get_and_reuse(void **state)
{
    ctx *c = setup(NULL);
    c->sequential_left = 5;
    char url[160];
    snprintf(url, sizeof url, "%s/hello", c->url);
    kvr_curl_opts o = {.url = url, .on_done = seq_done, .data = c};
    start(c, &o);
    run_and_teardown(c);
    assert_int_equal(c->dones, 5);
    assert_int_equal(c->last_result, 0);
    assert_int_equal(c->last_status, 200);
    assert_int_equal(c->srv.stats.connections_accepted, 1); /* keep-alive reuse */
    assert_int_equal(c->srv.stats.requests, 5);
    ctx_free(c);
}

static int echo_header(kvr_curl_req *r, kvr_slice name, kvr_slice value)
{
    ctx *c = kvr_curl_req_data(r);
    if (kvr_slice_eq_cstr(name, "X-Echo") && kvr_slice_eq_cstr(value, "yes"))
        c->header_echo++;
    return 0;
}

static int count_headers(kvr_curl_req *r, long status)
{
    ctx *c = kvr_curl_req_data(r);
    c->headers_calls++;
    c->last_status = status;
    return 0;
}

static void done_finish(kvr_curl_req *r, int result, long status, const char *errmsg,
                        kvr_slice body)
{
    record_done(r, result, status, errmsg, body);
    finish(kvr_curl_req_data(r));
}

static void test_post_big_body(void **state)
{
    ctx *c = setup(NULL);
    size_t n = 3 * 1024 * 1024;
    char *payload = malloc(n);
    for (size_t i = 0; i < n; i++)
        payload[i] = (char)(i * 7);
    char url[160];
    snprintf(url, sizeof url, "%s/echo", c->url);
    const char *hdrs[] = {"X-Test: 1", "Content-Type: application/octet-stream", NULL};
    kvr_curl_opts o = {.url = url,
                       .headers = hdrs,
                       .body = payload,
                       .body_len = n,
                       .on_header = echo_header,
                       .on_headers = count_headers,
                       .on_done = done_finish,
                       .data = c};
    start(c, &o);
    memset(payload, 0, n); /* the body was copied at start */
    run_and_teardown(c);
    assert_int_equal(c->last_result, 0);
    assert_int_equal(c->last_status, 200);
    assert_int_equal(c->headers_calls, 1);
    assert_int_equal(c->header_echo, 1);
    assert_int_equal(c->body.len, n);
    for (size_t i = 0; i < n; i++)
        if (c->body.base[i] != (char)(i * 7))
            fail_msg("echo differs at %zu", i);
    free(payload);
    ctx_free(c);
}

static int sse_event(void *arg, kvr_slice ev, kvr_slice data)
{
    ctx *c = arg;
    if (kvr_slice_eq_cstr(data, "[DONE]")) {
        c->sse_done++;
        return 0;
    }
    char want[32];
    snprintf(want, sizeof want, "{\"i\":%d}", c->sse_events);
    if (!kvr_slice_eq_cstr(data, want))
        c->sse_bad++;
    c->sse_events++;
    return 0;
}

static int sse_data(kvr_curl_req *r, const char *data, size_t len)
{
    ctx *c = kvr_curl_req_data(r);
    kvr_err err;
    return kvr_sse_feed(&c->sse, data, len, &err);
}

static void test_sse_stream(void **state)
{
    ctx *c = setup(NULL);
    kvr_sse_init(&c->sse, 0, 0, sse_event, c);
    char url[160];
    snprintf(url, sizeof url, "%s/sse", c->url);
    kvr_curl_opts o = {.url = url,
                       .on_headers = count_headers,
                       .on_data = sse_data,
                       .on_done = done_finish,
                       .data = c};
    start(c, &o);
    run_and_teardown(c);
    assert_int_equal(c->last_result, 0);
    assert_int_equal(c->last_status, 200);
    assert_int_equal(c->headers_calls, 1);
    assert_int_equal(c->sse_events, 20);
    assert_int_equal(c->sse_bad, 0);
    assert_int_equal(c->sse_done, 1);
    ctx_free(c);
}

static int cancel_on_data(kvr_curl_req *r, const char *data, size_t len)
{
    ctx *c = kvr_curl_req_data(r);
    c->received += len;
    kvr_curl_cancel(r); /* from inside our own callback */
    return 0;
}

static void wait_server_close(uv_timer_t *t)
{
    ctx *c = t->data;
    if (c->on_close_by_client > 0)
        finish(c);
    else
        uv_timer_start(t, wait_server_close, 10, 0);
}

static void test_cancel_is_a_disconnect(void **state)
{
    ctx *c = setup(NULL);
    char url[160];
    snprintf(url, sizeof url, "%s/hang", c->url);
    kvr_curl_opts o = {.url = url, .on_data = cancel_on_data, .on_done = record_done, .data = c};
    start(c, &o);
    uv_timer_start(&c->resume, wait_server_close, 10, 0);
    run_and_teardown(c);
    assert_true(c->received > 0);
    assert_int_equal(c->dones, 0); /* no on_done after cancel */
    assert_int_equal(c->on_close_by_client, 1);
    assert_int_equal(kvr_curl_active(&c->kc), 0);
    ctx_free(c);
}

static void cancel_later(uv_timer_t *t)
{
    ctx *c = t->data;
    kvr_curl_cancel(c->req); /* from outside any curl callback */
    c->req = NULL;
    uv_timer_start(t, wait_server_close, 10, 0);
}

static void test_cancel_from_timer(void **state)
{
    ctx *c = setup(NULL);
    char url[160];
    snprintf(url, sizeof url, "%s/hang", c->url);
    kvr_curl_opts o = {.url = url, .on_done = record_done, .data = c};
    start(c, &o);
    uv_timer_start(&c->resume, cancel_later, 100, 0);
    run_and_teardown(c);
    assert_int_equal(c->dones, 0);
    assert_int_equal(c->on_close_by_client, 1);
    ctx_free(c);
}

static void done_wait_close(kvr_curl_req *r, int result, long status, const char *errmsg,
                            kvr_slice body)
{
    ctx *c = kvr_curl_req_data(r);
    record_done(r, result, status, errmsg, body);
    uv_timer_start(&c->resume, wait_server_close, 10, 0);
}

static void test_timeout(void **state)
{
    ctx *c = setup(NULL);
    char url[160];
    snprintf(url, sizeof url, "%s/hang", c->url);
    kvr_curl_opts o = {.url = url, .timeout_ms = 200, .on_done = done_wait_close, .data = c};
    start(c, &o);
    run_and_teardown(c);
    assert_int_equal(c->dones, 1);
    assert_int_equal(c->last_result, KVR_ETIMEDOUT);
    assert_int_equal(c->last_status, 200);
    assert_int_equal(c->on_close_by_client, 1);
    ctx_free(c);
}

static void test_refused_and_bad_args(void **state)
{
    /* A port that was free a moment ago: bind, read it, close. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bind(fd, (struct sockaddr *)&sa, sizeof sa);
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    close(fd);
    ctx *c = setup(NULL);
    char url[160];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/x", ntohs(sa.sin_port));
    kvr_curl_opts o = {.url = url, .on_done = done_finish, .data = c};
    start(c, &o);
    kvr_err err = {0};
    kvr_curl_opts bad = {.url = NULL, .on_done = done_finish};
    assert_int_equal(kvr_curl_start(&c->kc, &bad, NULL, &err), KVR_EINVAL);
    kvr_curl_opts bad2 = {.url = url};
    assert_int_equal(kvr_curl_start(&c->kc, &bad2, NULL, &err), KVR_EINVAL);
    run_and_teardown(c);
    assert_int_equal(c->dones, 1);
    assert_int_equal(c->last_result, KVR_EIO);
    assert_non_null(
        strstr(c->last_err, "onnect")); /* "Failed to connect ..." / "Couldn't connect" */
    ctx_free(c);
}

static void do_resume(uv_timer_t *t)
{
    ctx *c = t->data;
    assert_true(kvr_curl_paused(c->req));
    assert_int_equal(kvr_curl_resume(c->req), 0);
}

static int flood_data(kvr_curl_req *r, const char *data, size_t len)
{
    ctx *c = kvr_curl_req_data(r);
    if (c->pauses == 0) {
        /* Stall once, long enough for the server's queue to hit its high-water mark. */
        c->pauses++;
        uv_timer_start(&c->resume, do_resume, 500, 0);
        return KVR_CURL_PAUSE;
    }
    for (size_t k = 0; k < len && !c->pattern_bad; k++)
        if (data[k] != (char)('a' + (c->received + k) % 26))
            c->pattern_bad = 1;
    c->received += len;
    return 0;
}

static void test_pause_resume_backpressure(void **state)
{
    kvr_http_config cfg = {.stream_high_water = 256 * 1024, .stream_low_water = 64 * 1024};
    ctx *c = setup(&cfg);
    char url[160];
    snprintf(url, sizeof url, "%s/flood", c->url);
    kvr_curl_opts o = {.url = url, .on_data = flood_data, .on_done = done_finish, .data = c};
    start(c, &o);
    run_and_teardown(c);
    assert_int_equal(c->last_result, 0);
    assert_int_equal(c->pauses, 1);
    assert_int_equal(c->received, FLOOD_TOTAL); /* the paused bytes were delivered again */
    assert_int_equal(c->pattern_bad, 0);
    assert_true(c->max_pending >= 256 * 1024); /* the paused client pushed back on the server */
    assert_true(c->drains >= 1);
    ctx_free(c);
}

static int abort_data(kvr_curl_req *r, const char *data, size_t len)
{
    return 1;
}

static void test_limits_and_abort(void **state)
{
    ctx *c = setup(NULL);
    char url[160];
    snprintf(url, sizeof url, "%s/echo", c->url);
    char body[5000];
    memset(body, 'z', sizeof body);
    kvr_curl_opts o = {.url = url,
                       .body = body,
                       .body_len = sizeof body,
                       .max_body = 1000,
                       .on_done = done_finish,
                       .data = c};
    start(c, &o);
    run_and_teardown(c);
    assert_int_equal(c->last_result, KVR_ELIMIT);
    ctx_free(c);

    c = setup(NULL);
    snprintf(url, sizeof url, "%s/sse", c->url);
    kvr_curl_opts o2 = {.url = url, .on_data = abort_data, .on_done = done_finish, .data = c};
    start(c, &o2);
    run_and_teardown(c);
    assert_int_equal(c->last_result, KVR_ECLOSED);
    ctx_free(c);
}

static void close_now(uv_timer_t *t)
{
    finish(t->data); /* kvr_curl_close with a request in flight */
}

static void test_close_with_inflight(void **state)
{
    ctx *c = setup(NULL);
    char url[160];
    snprintf(url, sizeof url, "%s/hang", c->url);
    for (int i = 0; i < 3; i++) {
        kvr_curl_opts o = {.url = url, .on_done = record_done, .data = c};
        start(c, &o);
    }
    uv_timer_start(&c->resume, close_now, 100, 0);
    run_and_teardown(c);
    assert_int_equal(c->dones, 0);
    ctx_free(c);
}


/* Many concurrent streams on one loop: every one complete and in order. */
typedef struct stream_state {
    ctx *c;
    kvr_sse sse;
    int events, bad, done_marks;
} stream_state;

static int many_event(void *arg, kvr_slice ev, kvr_slice data)
{
    stream_state *st = arg;
    if (kvr_slice_eq_cstr(data, "[DONE]")) {
        st->done_marks++;
        return 0;
    }
    char want[32];
    snprintf(want, sizeof want, "{\"i\":%d}", st->events);
    if (!kvr_slice_eq_cstr(data, want))
        st->bad++;
    st->events++;
    return 0;
}

static int many_data(kvr_curl_req *r, const char *data, size_t len)
{
    stream_state *st = kvr_curl_req_data(r);
    kvr_err err;
    return kvr_sse_feed(&st->sse, data, len, &err);
}

#define MANY 200

static void many_done(kvr_curl_req *r, int result, long status, const char *errmsg, kvr_slice body)
{
    stream_state *st = kvr_curl_req_data(r);
    ctx *c = st->c;
    c->dones++;
    if (result == 0 && status == 200 && st->events == 20 && st->bad == 0 && st->done_marks == 1)
        c->sse_events++; /* count of good streams */
    if (c->dones == MANY)
        finish(c);
}

static void test_many_concurrent_streams(void **state)
{
    ctx *c = setup(NULL);
    stream_state *st = calloc(MANY, sizeof *st);
    char url[160];
    snprintf(url, sizeof url, "%s/sse", c->url);
    for (int i = 0; i < MANY; i++) {
        st[i].c = c;
        kvr_sse_init(&st[i].sse, 0, 0, many_event, &st[i]);
        kvr_curl_opts o = {.url = url, .on_data = many_data, .on_done = many_done, .data = &st[i]};
        start(c, &o);
    }
    assert_int_equal(kvr_curl_active(&c->kc), MANY);
    run_and_teardown(c);
    assert_int_equal(c->dones, MANY);
    assert_int_equal(c->sse_events, MANY);
    assert_true(c->srv.stats.connections_accepted <= 64); /* max_host_connections default */
    for (int i = 0; i < MANY; i++)
        kvr_sse_free(&st[i].sse);
    free(st);
    ctx_free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_get_and_reuse),
        cmocka_unit_test(test_post_big_body),
        cmocka_unit_test(test_sse_stream),
        cmocka_unit_test(test_cancel_is_a_disconnect),
        cmocka_unit_test(test_cancel_from_timer),
        cmocka_unit_test(test_timeout),
        cmocka_unit_test(test_refused_and_bad_args),
        cmocka_unit_test(test_pause_resume_backpressure),
        cmocka_unit_test(test_limits_and_abort),
        cmocka_unit_test(test_close_with_inflight),
        cmocka_unit_test(test_many_concurrent_streams),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
