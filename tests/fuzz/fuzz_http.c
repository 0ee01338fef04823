/* libFuzzer target: the HTTP request path of kvr_http (llhttp settings and every kvr_http
 * callback: head, trailers, chunked and Content-Length bodies, pipelining, limits, error
 * answers) on a real server and a real loopback connection, so the bytes go through exactly
 * the code a client reaches. The first input byte picks how the rest is cut into pieces (each
 * piece parsed as it arrives, so every callback also sees split tokens); the handler reads
 * every slice of every request it gets, so a stale pointer is caught by ASan.
 *
 * The server and its loop live for the whole run (one per process); each input is one
 * connection, finished (client EOF, server close) before the next. */
#define _GNU_SOURCE
#include "fuzz_check.h"
#include "kvr_http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static uv_loop_t g_loop;
static kvr_http_server g_srv;
static int g_port;
static volatile uint32_t g_sink;

static void touch(kvr_slice s)
{
    uint32_t h = 0;
    for (size_t i = 0; i < s.len; i++)
        h = h * 31 + (uint8_t)s.base[i];
    g_sink += h;
}

static void handler(kvr_http_req *req)
{
    touch(req->method);
    touch(req->path);
    touch(req->query);
    touch(req->body);
    size_t n = kvr_http_req_header_count(req);
    for (size_t i = 0; i < n; i++) {
        kvr_slice k, v;
        kvr_http_req_header_at(req, i, &k, &v);
        touch(k);
        touch(v);
    }
    touch(kvr_http_req_header(req, "content-type"));
    if (kvr_slice_eq_cstr(req->path, "/stream")) {
        kvr_http_stream_start(req, 200, "text/event-stream");
        kvr_http_stream_write(req, req->body.base, req->body.len);
        kvr_http_stream_end(req);
        return;
    }
    size_t len = req->body.len < 4096 ? req->body.len : 4096;
    kvr_http_respond(req, 200, "application/octet-stream", req->body.base, len);
}

static void setup(void)
{
    CHECK(uv_loop_init(&g_loop) == 0);
    kvr_http_config cfg = {.on_request = handler,
                           .max_header_bytes = 4096,
                           .max_body_bytes = 32768,
                           .header_timeout_ms = 2000,
                           .request_timeout_ms = 2000,
                           .idle_timeout_ms = 2000,
                           .max_connections = 8,
                           .max_reading_connections = 4};
    CHECK(kvr_http_server_init(&g_srv, &g_loop, &cfg) == 0);
    kvr_err err = {0};
    CHECK(kvr_http_listen(&g_srv, "127.0.0.1:0", &err) == 0);
    g_port = kvr_http_server_port(&g_srv);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (g_port == 0)
        setup();
    size_t piece = size;
    if (size > 0) {
        /* 0: all at once; else pieces of 1..127 bytes (1 = byte by byte). */
        piece = data[0] & 0x7f ? (size_t)(data[0] & 0x7f) : size;
        data++;
        size--;
    }
    if (piece == 0)
        piece = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    CHECK(fd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)g_port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
    CHECK(rc == 0 || errno == EINPROGRESS);
    size_t off = 0;
    bool shut = false, done = false;
    char buf[65536];
    /* Bounded: every input ends in EOF (ours), so the server closes within its timeouts. */
    for (long iter = 0; iter < 2000000 && !done; iter++) {
        if (off < size) {
            size_t n = size - off < piece ? size - off : piece;
            ssize_t w = send(fd, data + off, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w > 0)
                off += (size_t)w;
            else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOTCONN)
                off = size; /* the server closed on us: stop sending */
        } else if (!shut) {
            shutdown(fd, SHUT_WR);
            shut = true;
        }
        uv_run(&g_loop, UV_RUN_NOWAIT);
        ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOTCONN))
            done = true;
    }
    close(fd);
    /* Let the server see the close and free the connection before the next input. */
    for (int i = 0; i < 100000 && g_srv.stats.connections_active > 0; i++)
        uv_run(&g_loop, UV_RUN_NOWAIT);
    CHECK(g_srv.stats.connections_active == 0);
    return 0;
}
