/* Test fixture for tests/http: a real kvr_http server on 127.0.0.1:<OS-chosen port> running on
 * a uv loop in the test's main thread, and a client scenario running in a second thread with
 * plain blocking sockets (every socket has a 10 s receive timeout so nothing hangs).
 *
 * cmocka assertions are made only on the main thread, after the client thread has been
 * joined: the client records what it saw in the fixture. */
#ifndef HTTP_FIXTURE_H
#define HTTP_FIXTURE_H

#include "kvr_buf.h"
#include "kvr_http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

typedef struct fixture fixture;
typedef void (*client_fn)(fixture *fx);

struct fixture {
    uv_loop_t loop;
    kvr_http_server srv;
    uv_async_t done;
    uv_timer_t guard; /* ends the loop if the client thread never reports */
    pthread_t th;
    client_fn client;
    int port;
    /* client-side observations (written by the client thread before it reports done) */
    char resp[8][65536];
    size_t resp_len[8];
    int ints[16];
    double secs;
    /* server-side observations (loop thread) */
    int on_close_calls;
    int on_close_by_client; /* on_close while the server was not closing */
    int drains;
    size_t max_pending;
    size_t streamed;
    int requests_seen;
    void *user;
};

static inline double fx_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static inline void fx_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Client side: blocking socket to the fixture's server (rcvbuf > 0 shrinks SO_RCVBUF). */
static inline int fx_connect(fixture *fx, int rcvbuf)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (rcvbuf > 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)fx->port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static inline int fx_send(int fd, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
        if (w <= 0)
            return -1;
        s += w;
        n -= (size_t)w;
    }
    return 0;
}

static inline int fx_send_str(int fd, const char *s)
{
    return fx_send(fd, s, strlen(s));
}

/* Reads until the peer closes (or timeout/error). Returns bytes read into out (NUL-terminated,
 * truncated to cap-1). */
static inline size_t fx_read_all(int fd, char *out, size_t cap)
{
    size_t n = 0;
    for (;;) {
        char tmp[16384];
        ssize_t r = recv(fd, tmp, sizeof tmp, 0);
        if (r <= 0)
            break;
        size_t take = (size_t)r;
        if (n + take > cap - 1)
            take = cap - 1 - n;
        memcpy(out + n, tmp, take);
        n += take;
    }
    out[n] = '\0';
    return n;
}

/* A tiny response reader: keeps leftover bytes between calls on one connection. */
typedef struct fx_conn {
    int fd;
    char buf[1 << 18];
    size_t len;
} fx_conn;

static inline int fx_fill(fx_conn *c)
{
    if (c->len >= sizeof c->buf)
        return -1;
    ssize_t r = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
    if (r <= 0)
        return -1;
    c->len += (size_t)r;
    return 0;
}

static inline void fx_take(fx_conn *c, size_t n, kvr_buf *out)
{
    if (out)
        kvr_buf_append(out, c->buf, n);
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
}

/* Reads one full response (head + body, de-chunked body appended after the head) into out.
 * Returns the status code, or -1 on EOF/timeout before a complete response. */
static inline int fx_read_response(fx_conn *c, kvr_buf *out)
{
    char *end;
    while ((end = memmem(c->buf, c->len, "\r\n\r\n", 4)) == NULL)
        if (fx_fill(c) != 0)
            return -1;
    size_t hlen = (size_t)(end - c->buf) + 4;
    char head[8192];
    if (hlen >= sizeof head)
        return -1;
    memcpy(head, c->buf, hlen);
    head[hlen] = '\0';
    fx_take(c, hlen, out);
    int status = atoi(head + 9);
    if (status == 100)
        return fx_read_response(c, out);
    const char *cl = strcasestr(head, "\r\ncontent-length:");
    bool chunked = strcasestr(head, "\r\ntransfer-encoding: chunked") != NULL;
    if (cl) {
        size_t want = strtoul(cl + 17, NULL, 10);
        while (c->len < want && c->len < sizeof c->buf)
            if (fx_fill(c) != 0)
                return -1;
        if (want > c->len)
            return -1;
        fx_take(c, want, out);
    } else if (chunked) {
        for (;;) {
            char *le;
            while ((le = memmem(c->buf, c->len, "\r\n", 2)) == NULL)
                if (fx_fill(c) != 0)
                    return -1;
            size_t sz = strtoul(c->buf, NULL, 16);
            fx_take(c, (size_t)(le - c->buf) + 2, NULL);
            while (c->len < sz + 2)
                if (fx_fill(c) != 0) {
                    if (c->len >= sizeof c->buf)
                        break;
                    return -1;
                }
            if (sz + 2 > c->len)
                return -1;
            fx_take(c, sz, out);
            fx_take(c, 2, NULL);
            if (sz == 0)
                break;
        }
    }
    return status;
}

static void fx__done(uv_async_t *a)
{
    fixture *fx = a->data;
    uv_timer_stop(&fx->guard);
    uv_close((uv_handle_t *)&fx->guard, NULL);
    uv_close((uv_handle_t *)&fx->done, NULL);
    kvr_http_server_close(&fx->srv, NULL);
}

static void fx__guard(uv_timer_t *t)
{
    fixture *fx = t->data;
    /* Close the server so the client's sockets fail fast; the client still reports done. */
    fprintf(stderr, "fixture: client thread did not finish in time\n");
    kvr_http_server_close(&fx->srv, NULL);
}

static void *fx__thread(void *arg)
{
    fixture *fx = arg;
    fx->client(fx);
    uv_async_send(&fx->done);
    return NULL;
}

/* Runs the server with cfg until the client scenario ends; returns 0 on success. The fixture
 * must be zeroed by the caller (user fields may be set before). */
static inline int fx_run(fixture *fx, const kvr_http_config *cfg, client_fn client)
{
    if (uv_loop_init(&fx->loop) != 0)
        return -1;
    fx->srv.data = fx;
    if (kvr_http_server_init(&fx->srv, &fx->loop, cfg) != 0)
        return -1;
    kvr_err err = {0};
    if (kvr_http_listen(&fx->srv, "127.0.0.1:0", &err) != 0) {
        fprintf(stderr, "listen: %s\n", err.msg);
        return -1;
    }
    fx->port = kvr_http_server_port(&fx->srv);
    fx->client = client;
    uv_async_init(&fx->loop, &fx->done, fx__done);
    fx->done.data = fx;
    uv_timer_init(&fx->loop, &fx->guard);
    fx->guard.data = fx;
    uv_timer_start(&fx->guard, fx__guard, 45000, 0);
    if (pthread_create(&fx->th, NULL, fx__thread, fx) != 0)
        return -1;
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    pthread_join(fx->th, NULL);
    /* Let every close callback run. */
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    return uv_loop_close(&fx->loop) == 0 ? 0 : -1;
}

#endif
