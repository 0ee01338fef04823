/* kvr_loop_stat.c: see kvr_loop_stat.h. */
#include "kvr_loop_stat.h"

#include "kvr_err.h"

#include <stdio.h>
#include <string.h>

static void on_prepare(uv_prepare_t *h)
{
    kvr_loop_stat *ls = (kvr_loop_stat *)h; /* prep is the first member */
    uint64_t now = uv_hrtime(), idle = uv_metrics_idle_time(h->loop);
    if (ls->last_ns) {
        uint64_t wall = now - ls->last_ns, slept = idle - ls->last_idle_ns;
        uint64_t busy = wall > slept ? wall - slept : 0;
        kvr_metric_observe(ls->busy, 0, (double)busy / 1e9);
        ls->turns++;
        if (busy > 5000000)
            ls->long_turns++;
    }
    ls->last_ns = now;
    ls->last_idle_ns = idle;
}

int kvr_loop_stat_start(kvr_loop_stat *ls, uv_loop_t *loop, kvr_metrics *m, const char *prefix)
{
    memset(ls, 0, sizeof *ls);
    int rc = uv_loop_configure(loop, UV_METRICS_IDLE_TIME);
    if (rc != 0)
        return rc;
    static const double b[] = {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                               0.005,   0.01,   0.025,   0.05,   0.1,   0.5};
    char name[128];
    snprintf(name, sizeof name, "%s_loop_busy_seconds", prefix);
    ls->busy = kvr_metrics_histogram(
        m, name,
        "Time each event-loop turn spent running callbacks (wall minus epoll wait): what a "
        "message arriving during the turn waits before it is read",
        b, sizeof b / sizeof *b, NULL, NULL);
    if (!ls->busy)
        return KVR_EINVAL;
    uv_prepare_init(loop, &ls->prep);
    uv_prepare_start(&ls->prep, on_prepare);
    /* measuring must not keep a loop alive that has nothing else to do */
    uv_unref((uv_handle_t *)&ls->prep);
    return 0;
}

void kvr_loop_stat_close(kvr_loop_stat *ls, uv_close_cb close_cb)
{
    if (uv_is_closing((uv_handle_t *)&ls->prep))
        return;
    uv_prepare_stop(&ls->prep);
    uv_close((uv_handle_t *)&ls->prep, close_cb);
}
