/* worker/api_drive.c: the loop that drives the engine's simulated clock (see main.c's header
 * for the clocks; api_priv.h). Loop thread. */
#include "api_priv.h"
#include "kvr_json.h"

int64_t wk_wall_ns(worker *w)
{
    return (int64_t)(uv_hrtime() - w->t0);
}

/* ------------------------------------------------------------------ driving the engine */

/* An idle engine's clock jumps to the wall clock. If its last step had started late, that
 * lag is forgiven by the jump: count it, so "how far behind" stays honest across idle gaps. */
void wk_engine_idle_jump(worker *w, int64_t now)
{
    if (kvr_engine_has_work(w->eng))
        return;
    if (w->lag_ns > 0)
        w->lag_erased_ns += w->lag_ns;
    w->lag_ns = 0;
    kvr_engine_idle_until(w->eng, now);
}

static void on_outputs(worker *w, const kvr_engine_output *o, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        wreq *r = o[i].data;
        if (!r)
            continue;
        r->completion_tokens++;
        r->prompt_tokens = o[i].prompt_tokens;
        r->cached_tokens = o[i].cached_tokens;
        kvr_buf_append(&r->toks, &o[i].token, sizeof(uint32_t));
        if (r->dg)
            wk_dg_on_output(w, r, &o[i]);
        if (o[i].finished) {
            r->done_future = true;
            r->seq = NULL;
        }
        if (!r->in_future && wk_list_add(&w->future, &w->n_future, &w->cap_future, r) == 0)
            r->in_future = true;
    }
}

static void drive(uv_timer_t *t)
{
    worker *w = t->data;
    int64_t start = wk_wall_ns(w);
    int64_t now = start;
    if (kvr_engine_now_ns(w->eng) <= now)
        wk_promote_future(w);
    for (;;) {
        wk_admit_pending(w, 16);
        if (!kvr_engine_has_work(w->eng)) {
            wk_engine_idle_jump(w, now);
            if (w->n_pend)
                continue;
            break;
        }
        int64_t sim = kvr_engine_now_ns(w->eng);
        if (sim > now)
            break;
        wk_promote_future(w);
        w->lag_ns = now - sim;
        if (w->lag_ns > w->lag_max_ns)
            w->lag_max_ns = w->lag_ns;
        if (w->lag_ns > 100000000) {
            kvr_engine_stats es;
            kvr_engine_get_stats(w->eng, &es);
            KVR_LOG_WARN_RL(1, "simulated clock behind",
                            "lag_ms=%.1f since_last_drive_ms=%.1f "
                            "pending=%zu running=%u waiting=%u live=%zu",
                            (double)w->lag_ns / 1e6, (double)(start - w->last_drive_end) / 1e6,
                            w->n_pend, es.running, es.waiting, w->live_reqs);
        }
        kvr_engine_step_info info;
        const kvr_engine_output *outs;
        size_t n_outs;
        if (kvr_engine_step(w->eng, &info, &outs, &n_outs) != 0)
            KVR_LOG_ERROR_RL(5, "engine step failed", "err=\"%s\"", kvr_strerror(KVR_ENOMEM));
        on_outputs(w, outs, n_outs);
        wk_publish_engine_events(w);
        now = wk_wall_ns(w);
        if (now - start > DRIVE_BUDGET_NS)
            break;
    }
    wk_flush_ready(w);
    w->last_drive_end = wk_wall_ns(w);
    if (w->closing)
        return;
    if (kvr_engine_has_work(w->eng) || w->n_future || w->n_pend) {
        int64_t due = kvr_engine_now_ns(w->eng) - wk_wall_ns(w);
        uint64_t ms = due <= 0 || w->n_pend ? 0 : (uint64_t)((due + 999999) / 1000000);
        uv_timer_start(&w->drive_timer, drive, ms, 0);
    }
}

void wk_kick_drive(worker *w)
{
    if (!w->closing && !uv_is_active((uv_handle_t *)&w->drive_timer))
        uv_timer_start(&w->drive_timer, drive, 0, 0);
    else if (!w->closing && uv_timer_get_due_in(&w->drive_timer) > 0)
        uv_timer_start(&w->drive_timer, drive, 0, 0);
}
