/* A trivial kvr_http server for load measurements (not a test):
 *   http_hello_server --listen 127.0.0.1:0
 * prints "port=N" on stdout once listening; GET /hello answers "hello", GET /metrics the
 * server's own counters. Runs until SIGINT/SIGTERM. */
#include "kvr_flags.h"
#include "kvr_http.h"
#include "kvr_metrics.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

static kvr_metrics *g_metrics;

static void on_request(kvr_http_req *req)
{
    if (kvr_slice_eq_cstr(req->path, "/hello"))
        kvr_http_respond(req, 200, "text/plain", "hello", 5);
    else if (kvr_slice_eq_cstr(req->path, "/metrics"))
        kvr_metrics_respond(g_metrics, req);
    else
        kvr_http_respond(req, 404, "text/plain", "not found\n", 10);
}

static uv_signal_t g_sigint, g_sigterm;

static void on_signal(uv_signal_t *s, int signum)
{
    kvr_http_server *srv = s->data;
    uv_close((uv_handle_t *)&g_sigint, NULL);
    uv_close((uv_handle_t *)&g_sigterm, NULL);
    kvr_http_server_close(srv, NULL);
}

int main(int argc, char **argv)
{
    const char *listen = "127.0.0.1:0";
    kvr_flag flags[] = {{"listen", KVR_FLAG_STRING, &listen, "address to listen on", false}};
    kvr_err err = {0};
    int rv = kvr_flags_parse(flags, 1, argc - 1, argv + 1, NULL, 0, NULL, &err);
    if (rv == KVR_FLAGS_HELP) {
        kvr_flags_usage(stdout, argv[0], flags, 1);
        return 0;
    }
    if (rv < 0) {
        fprintf(stderr, "%s\n", err.msg);
        return 2;
    }
    uv_loop_t *loop = uv_default_loop();
    kvr_http_server srv;
    kvr_http_config cfg = {.on_request = on_request};
    if (kvr_http_server_init(&srv, loop, &cfg) != 0 || kvr_http_listen(&srv, listen, &err) != 0) {
        fprintf(stderr, "listen: %s\n", err.msg);
        return 1;
    }
    g_metrics = kvr_metrics_new();
    kvr_metrics_add_http_server(g_metrics, "kvr_hello_http", &srv);
    uv_signal_init(loop, &g_sigint);
    uv_signal_init(loop, &g_sigterm);
    g_sigint.data = g_sigterm.data = &srv;
    uv_signal_start(&g_sigint, on_signal, SIGINT);
    uv_signal_start(&g_sigterm, on_signal, SIGTERM);
    printf("port=%d\n", kvr_http_server_port(&srv));
    fflush(stdout);
    uv_run(loop, UV_RUN_DEFAULT);
    kvr_metrics_free(g_metrics);
    return 0;
}
