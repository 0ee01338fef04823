/* kvr-bridge: engine /metrics and /health scrapes, heartbeats and the counters' log line
 * (bridge_priv.h). */
#include "bridge_priv.h"
#include "kvr_err.h"
#include "kvr_log.h"

#include <inttypes.h>
#include "kvr_heartbeat.h"

#include <stdio.h>

/* ------------------------------------------------------------------ engine metrics, heartbeat */

static void send_heartbeats(bridge *br);

static void on_announce(uv_timer_t *t)
{
    bridge *br = t->data;
    /* Routers take events only from a worker they have seen a heartbeat of. */
    for (int i = 0; i < br->n; i++)
        js_outbox_resume(&br->ranks[i].ob);
}

static void scrape_done(bridge *br)
{
    if (--br->scrapes_inflight > 0)
        return;
    if (br->metrics_ok && br->health_ok) {
        if (!br->last_ok_ms)
            KVR_LOG_INFO("engine up", "url=%s", br->engine_url);
        br->last_ok_ms = kvr_mono_ms();
        for (int i = 0; i < br->n; i++)
            kvr_bridge_parse_metrics(br->metrics_body.base, br->metrics_body.len, i, (int)br->dp,
                                     &br->ranks[i].stats);
        const kvr_bridge_scrape *s0 = &br->ranks[0].stats;
        if (!br->announced) {
            br->announced = true;
            send_heartbeats(br);
            uv_timer_start(&br->announce_timer, on_announce, (uint64_t)br->announce_ms, 0);
            return;
        }
        if (!br->hold && s0->has_start && br->sent_start_s != 0 &&
            s0->start_s != br->sent_start_s) {
            KVR_LOG_WARN("engine restarted: replaying it from seq 0",
                         "old_start_s=%.3f start_s=%.3f", br->sent_start_s, s0->start_s);
            br_hold_begin(br);
            for (int i = 0; i < br->n; i++)
                br_resync_from_zero(&br->ranks[i]);
        }
        if (br->hold) {
            const kvr_bridge_scrape *s = &br->ranks[0].stats;
            if (!s->has_start || s->start_s != br->hold_start_s ||
                kvr_mono_ms() > br->hold_until_ms) {
                br->hold = false;
                send_heartbeats(br);
                uv_timer_start(&br->announce_timer, on_announce, (uint64_t)br->announce_ms, 0);
            }
        }
    } else if (br->last_ok_ms) {
        KVR_LOG_WARN_RL(5, "engine scrape failed: no heartbeat", "metrics_ok=%d health_ok=%d",
                        br->metrics_ok, br->health_ok);
    }
}

static void on_metrics(kvr_curl_req *r, int result, long status, const char *errmsg, kvr_slice body)
{
    bridge *br = kvr_curl_req_data(r);
    br->metrics_ok = result == 0 && status == 200;
    kvr_buf_reset(&br->metrics_body);
    if (br->metrics_ok && kvr_buf_append(&br->metrics_body, body.base, body.len) != 0)
        br->metrics_ok = false;
    scrape_done(br);
}

static void on_health(kvr_curl_req *r, int result, long status, const char *errmsg, kvr_slice body)
{
    bridge *br = kvr_curl_req_data(r);
    br->health_ok = result == 0 && status == 200;
    scrape_done(br);
}

void br_on_scrape(uv_timer_t *t)
{
    bridge *br = t->data;
    if (br->scrapes_inflight || br->closing)
        return; /* the previous scrape is still out: an engine that slow is not up */
    char murl[1024], hurl[1024];
    snprintf(murl, sizeof murl, "%s/metrics", br->engine_url);
    snprintf(hurl, sizeof hurl, "%s/health", br->engine_url);
    long to = br->scrape_ms * 4 > 2000 ? br->scrape_ms * 4 : 2000;
    kvr_curl_opts mo = {
        .url = murl, .timeout_ms = to, .data = br, .on_done = on_metrics, .max_body = 8u << 20};
    kvr_curl_opts ho = {
        .url = hurl, .timeout_ms = to, .data = br, .on_done = on_health, .max_body = 64 << 10};
    br->metrics_ok = br->health_ok = false;
    if (kvr_curl_start(&br->curl, &mo, NULL, NULL) == 0)
        br->scrapes_inflight++;
    if (kvr_curl_start(&br->curl, &ho, NULL, NULL) == 0)
        br->scrapes_inflight++;
}

static void send_heartbeats(bridge *br)
{
    kvr_buf *b = &br->enc;
    br->sent_start_s = br->ranks[0].stats.start_s;
    for (int i = 0; i < br->n; i++) {
        rank *rk = &br->ranks[i];
        kvr_bridge_scrape *s = &rk->stats;
        uint64_t bs = s->has_block_size ? s->block_size : (uint64_t)br->block_size;
        if (bs == 0) {
            KVR_LOG_WARN_RL(10,
                            "no block size (no cache_config_info, no --block-size): no heartbeat",
                            "worker=%" PRIu64, rk->wid);
            continue;
        }
        const char *model = br->model ? br->model : s->model[0] ? s->model : "unknown";
        kvr_heartbeat hb = {.id = rk->wid,
                            .ns = kvr_slice_of(br->ns),
                            .model = kvr_slice_of(model),
                            .role = kvr_slice_of(br->role),
                            .url = kvr_slice_of(br->engine_url),
                            .mdc_sum = kvr_slice_of(br->mdc_sum),
                            .block_size = bs,
                            .capacity_blocks = s->capacity,
                            .active = (uint64_t)s->running,
                            .waiting = (uint64_t)s->waiting,
                            .used_blocks = (uint64_t)(s->usage * (double)s->capacity + 0.5),
                            /* the engine's start, never the bridge's: routers drop a worker's
                             * blocks when started_ms changes, and a restarted bridge must not
                             * do that. 0 (unknown) never counts as a restart. */
                            .started_ms = s->has_start ? (uint64_t)(s->start_s * 1000.0) : 0};
        for (uint32_t j = 0; j < s->n_loras; j++)
            hb.loras[hb.n_loras++] = kvr_slice_of(s->loras[j]);
        kvr_buf_reset(b);
        if (kvr_heartbeat_encode(b, &hb) == 0)
            kvr_nats_publish(&br->nats, rk->subj_hb, b->base, b->len);
    }
}

void br_on_hb_timer(uv_timer_t *t)
{
    bridge *br = t->data;
    /* Engine down (no good scrape within 3 intervals, at least 2 s): no heartbeat, so the
     * routers expire the worker and drop its blocks. */
    int64_t stale = br->scrape_ms * 3 > 2000 ? br->scrape_ms * 3 : 2000;
    if (br->announced && br->last_ok_ms && kvr_mono_ms() - br->last_ok_ms <= stale)
        send_heartbeats(br);
}

void br_log_stats(bridge *br)
{
    for (int i = 0; i < br->n; i++) {
        rank *rk = &br->ranks[i];
        js_outbox_stats os;
        js_outbox_get_stats(&rk->ob, &os);
        KVR_LOG_INFO("stats",
                     "worker=%" PRIu64 " batches=%" PRIu64 " events=%" PRIu64 " bad_events=%" PRIu64
                     " garbage=%" PRIu64 " malformed=%" PRIu64 " gaps=%" PRIu64 " replays=%" PRIu64
                     " replayed=%" PRIu64 " clears=%" PRIu64 " restarts=%" PRIu64 " acked=%" PRIu64
                     " failed=%" PRIu64 " inflight=%zu queued=%zu next_seq=%" PRIu64,
                     rk->wid, rk->batches, rk->events, rk->bad_events, rk->garbage, rk->malformed,
                     rk->gaps, rk->replays, rk->replayed, rk->clears, rk->restarts, os.acked,
                     os.failed, os.inflight, os.queued, rk->next);
    }
}

void br_on_stats_timer(uv_timer_t *t)
{
    br_log_stats(t->data);
}
