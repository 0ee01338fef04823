/* kvr_loop_stat: how long each turn of a libuv loop keeps it from reading its sockets.
 *
 * A request that arrives while the loop runs callbacks waits in the socket; no latency measured
 * from "the loop read it" shows that wait. This measures it from the other side: every turn's
 * busy time (wall time between two prepare phases minus the time the loop spent blocked in
 * epoll, libuv's UV_METRICS_IDLE_TIME) goes into a histogram, so a long turn — a burst of KV
 * events applied, a big prompt tokenized — is visible as the wait it imposes on everything
 * else.
 *
 * Threads: the loop's thread only. Memory: caller-allocated; the histogram belongs to the
 * caller's registry. The handle is closed by kvr_loop_stat_close (close_cb runs on the loop,
 * after which the struct may be freed). */
#ifndef KVR_LOOP_STAT_H
#define KVR_LOOP_STAT_H

#include "kvr_metrics.h"

#include <stdint.h>
#include <uv.h>

typedef struct kvr_loop_stat {
    uv_prepare_t prep; /* prep.data is the caller's */
    kvr_metric *busy;  /* histogram, seconds */
    uint64_t last_ns, last_idle_ns;
    uint64_t turns, long_turns; /* turns over 5 ms (a loop should not block longer: ENGINEERING) */
} kvr_loop_stat;

/* Starts measuring loop. Enables UV_METRICS_IDLE_TIME on it: call before the loop first runs
 * (libuv counts idle time only from then). Registers "<prefix>_loop_busy_seconds" in m.
 * Returns 0 or a negative error (the option refused, the metric not registered). */
int kvr_loop_stat_start(kvr_loop_stat *ls, uv_loop_t *loop, kvr_metrics *m, const char *prefix);

/* Stops and closes the prepare handle; close_cb (may be NULL) gets it. */
void kvr_loop_stat_close(kvr_loop_stat *ls, uv_close_cb close_cb);

#endif
