/* kvr-frontend: loop time (stall compensation), worker heartbeats, the lease beat, NATS state
 * and shutdown (drain, signals). */
#include "fe_app.h"

#include "fe_tokenize.h"
#include "beat_msg.h"
#include "kvr_hash.h"
#include "kvr_heartbeat.h"
#include "kvr_log.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Stall compensation. A worker's heartbeat can only be read while the loop polls: time in
 * which it could not (SIGSTOP, a paused VM, or one long turn of callbacks, e.g. a burst of big
 * prompts parsed under load) must not count against the worker's TTL. Two kinds, both moved
 * off every worker's age (fe_pool_shift, never past now) once they add up to over 1 s:
 *  - busy time: from the moment the loop last could read (the poll's return, or the last
 *    compensation) to now;
 *  - an overslept poll: a poll that returned more than 500 ms after its timeout (the process
 *    was stopped while it waited), i.e. the time beyond the timeout.
 * A uv_prepare handle (right before every poll) accounts the turn that just ended and notes the
 * poll's start and timeout; the tick and every use of worker liveness (note_loop_time) account
 * up to now, because after a stall the I/O that was waiting (a request among it) runs before
 * the timers. uv_now() is the poll's return time there (libuv updates it after polling).
 * Before, every request restarted the measure, so a long turn never showed a stall and the
 * heartbeats waiting in the socket expired their workers (503 "No worker is available" with
 * both workers alive: tools_bench_run under ASan, issue 18). */
void note_loop_time(int64_t now)
{
    int64_t lost = 0;
    if (app.poll_pending) { /* first call since the poll returned */
        app.poll_pending = false;
        int64_t ret = (int64_t)uv_now(app.loop);
        if (ret < app.poll_start_ms)
            ret = app.poll_start_ms;
        int64_t over = ret - app.poll_start_ms - app.poll_timeout_ms;
        if (app.poll_timeout_ms >= 0 && over > 500)
            lost += over;
        app.read_ms = ret;
    }
    if (app.read_ms && now > app.read_ms)
        lost += now - app.read_ms;
    app.lost_ms += lost;
    app.read_ms = now;
    if (app.lost_ms <= 1000)
        return;
    kvr_metric_inc(app.m_stalls);
    KVR_LOG_WARN_RL(5, "loop stalled: extending worker deadlines by the stall", "stall_ms=%" PRId64,
                    app.lost_ms);
    fe_pool_shift(&app.pool, app.lost_ms, now);
    app.lost_ms = 0;
}

void on_prepare(uv_prepare_t *h)
{
    int64_t now = kvr_mono_ms();
    note_loop_time(now);
    /* the loop reads from now on: what was unread up to here and under 1 s is forgiven */
    app.lost_ms = 0;
    app.poll_start_ms = now;
    app.poll_timeout_ms = uv_backend_timeout(h->loop);
    app.poll_pending = true;
}

/* ---------- NATS: heartbeats, lease ---------- */

void on_heartbeat(const kvr_nats_msg *m, void *data)
{
    (void)data;
    kvr_err err = {0};
    if (fe_pool_heartbeat(&app.pool, m->data, m->len, kvr_mono_ms(), &err)) {
        KVR_LOG_WARN_RL(10, "bad worker heartbeat", "subject=%s err=\"%s\"", m->subject, err.msg);
        return;
    }
    /* A worker whose model card differs from the tokenizer we loaded for its model would get
     * prompts it tokenizes differently (no cache hits, or wrong output): it is never routed
     * to (fe_filter), and said once per worker and checksum. */
    kvr_heartbeat hb;
    if (kvr_heartbeat_decode(m->data, m->len, &hb) != 0)
        return;
    char ns[FE_NS_MAX];
    if (hb.ns.len >= sizeof ns)
        return;
    memcpy(ns, hb.ns.base, hb.ns.len);
    ns[hb.ns.len] = 0;
    fe_worker *w = fe_pool_find(&app.pool, ns, hb.id);
    if (!w)
        return;
    fe_hold_worker_heard(w->ns, w->model); /* a waking pool's readiness signal */
    /* a request naming one of its adapters tokenizes as its base model does */
    for (uint32_t i = 0; i < hb.n_loras; i++)
        fe_tok_note_lora(hb.loras[i].base, hb.loras[i].len, w->model);
    if (!hb.mdc_sum.len || w->mdc_logged)
        return;
    const char *mine = fe_tok_mdc_sum(w->model);
    if (!mine[0] || strcmp(mine, w->mdc_sum) == 0)
        return;
    w->mdc_logged = true;
    kvr_metric_inc(app.m_mdc_mismatch);
    KVR_LOG_WARN("worker's model card differs from the tokenizer loaded for its model: no "
                 "requests go to it",
                 "worker=%" PRIu64 " namespace=%s model=%s url=%s worker_mdc_sum=%s mdc_sum=%s",
                 w->id, w->ns, w->model, w->url, w->mdc_sum, mine);
}

/* Loop thread. While NATS is down, heartbeats cannot arrive: workers keep their last known
 * state (requests go to them by local choice) instead of expiring one TTL after the outage
 * began; after the reconnect they get a full TTL to beat again. */
void on_nats_state(kvr_nats *kn, kvr_nats_state st, void *data)
{
    (void)kn;
    (void)data;
    KVR_LOG_INFO("nats", "state=%s workers=%zu", kvr_nats_state_name(st), app.pool.n);
    if (st == KVR_NATS_DISCONNECTED)
        fe_pool_set_blind(&app.pool, true, kvr_mono_ms());
    else if (st == KVR_NATS_CONNECTED || st == KVR_NATS_RECONNECTED)
        fe_pool_set_blind(&app.pool, false, kvr_mono_ms());
    fe_free_resend_on_state(st == KVR_NATS_CONNECTED || st == KVR_NATS_RECONNECTED, kvr_mono_ms());
}

void on_tick(uv_timer_t *t)
{
    (void)t;
    int64_t now = kvr_mono_ms();
    note_loop_time(now);
    fe_pool_expire(&app.pool, now);
    cut_hung_paused(now);
    fe_free_resend_tick(now);
    if (app.nats_on && kvr_nats_connected(&app.nats)) {
        kvr_buf b;
        kvr_buf_init(&b);
        kvr_lease l = {.frontend_id = app.frontend_id,
                       .ts_ms = (uint64_t)kvr_now_ms(),
                       .active = app.active_streams};
        if (kvr_lease_encode(&b, &l) == 0)
            kvr_nats_publish(&app.nats, app.lease_subject, b.base, b.len);
        kvr_buf_free(&b);
    }
}

void collect(kvr_metrics *m, void *arg)
{
    (void)m;
    (void)arg;
    kvr_metric_set(app.m_active, 0, (double)app.active_streams);
    note_loop_time(kvr_mono_ms());
    kvr_metric_set(app.m_workers, 0, (double)fe_pool_live(&app.pool, NULL, kvr_mono_ms()));
    kvr_metric_counter_set(app.m_hb_rejected, 0, app.pool.rejected);
    kvr_metric_counter_set(app.m_hb_refused_url, 0, app.pool.refused_url);
}

/* ---------- shutdown ---------- */

static void on_closed_handle(uv_handle_t *h)
{
    (void)h;
}

/* Ends every call still in flight: its upstream is cancelled, its booking freed, and its
 * client gets an error (an SSE error event and [DONE] when the stream had started). */
static void end_all_calls(const char *why)
{
    fe_call *c = app.calls;
    while (c) {
        fe_call *next = c->next;
        if (c->req && !c->parse_pending) { /* a parse in flight is ended when it returns */
            kvr_metric_inc(app.m_drain_cut);
            if (c->up) {
                kvr_curl_cancel(c->up);
                c->up = NULL;
            }
            release_worker(c);
            finish_error(c, 503, "service_unavailable", "shutting_down", why);
            call_maybe_free(c); /* unless a route reply is still due */
        }
        c = next;
    }
}

/* The final close, once the last response bytes reached the kernel (or after 2 s): closing
 * a connection drops what is still queued on it, the error event and [DONE] included. */
static void on_flush_wait(uv_timer_t *t)
{
    int64_t waited = (int64_t)(uintptr_t)t->data;
    if (kvr_http_server_writes_pending(&app.http) > 0 && waited < 2000) {
        t->data = (void *)(uintptr_t)(waited + 10);
        uv_timer_start(t, on_flush_wait, 10, 0);
        return;
    }
    uv_close((uv_handle_t *)&app.drain_timer, on_closed_handle);
    uv_close((uv_handle_t *)&app.tick, on_closed_handle);
    uv_close((uv_handle_t *)&app.prepare, on_closed_handle);
    kvr_loop_stat_close(&app.loop_stat, on_closed_handle);
    fe_hold_close();
    kvr_http_server_close(&app.http, NULL);
    kvr_curl_close(&app.curl, NULL);
    if (app.nats_on)
        kvr_nats_close(&app.nats, NULL);
}

/* Closes everything; the loop then runs out of handles and main returns. */
void shutdown_now(void)
{
    if (app.closed)
        return;
    app.closed = true;
    app.draining = false;
    KVR_LOG_INFO("stopped", "calls_left=%zu", app.n_calls);
    uv_close((uv_handle_t *)&app.sigint, on_closed_handle);
    uv_close((uv_handle_t *)&app.sigterm, on_closed_handle);
    uv_timer_stop(&app.drain_timer);
    app.drain_timer.data = (void *)(uintptr_t)0;
    uv_timer_start(&app.drain_timer, on_flush_wait, 0, 0);
}

static void on_drain_timeout(uv_timer_t *t)
{
    (void)t;
    KVR_LOG_WARN("drain timeout: ending the streams still running", "calls=%zu", app.n_calls);
    end_all_calls("the frontend is shutting down; retry the request");
    shutdown_now();
}

/* First SIGTERM/SIGINT: drain. The listener closes (no new connection), /ready and new
 * requests on open connections answer 503, and the calls in flight may finish for up to
 * --drain-timeout; NATS, the lease beat and the upstream client keep running for them. Then
 * the rest get an SSE error event and [DONE]. A second signal cuts at once (same ending). */
void on_signal(uv_signal_t *s, int signum)
{
    (void)s;
    if (app.closed)
        return;
    if (app.stopping) {
        KVR_LOG_WARN("second signal: ending every call now", "signal=%d calls=%zu", signum,
                     app.n_calls);
        end_all_calls("the frontend is shutting down; retry the request");
        shutdown_now();
        return;
    }
    app.stopping = true;
    KVR_LOG_INFO("stopping: draining", "signal=%d calls=%zu drain_timeout_ms=%" PRId64, signum,
                 app.n_calls, app.drain_timeout_ms);
    kvr_http_server_stop_listening(&app.http);
    fe_hold_drain();
    if (app.n_calls == 0 || app.drain_timeout_ms <= 0) {
        end_all_calls("the frontend is shutting down; retry the request");
        shutdown_now();
        return;
    }
    app.draining = true;
    uv_timer_start(&app.drain_timer, on_drain_timeout, (uint64_t)app.drain_timeout_ms, 0);
}
