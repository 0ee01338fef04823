/* Why a prefix hit was missed (issue 14 item 5): the router predicts a request's overlap from
 * its index, the worker reports the prompt tokens it really found cached (usage.
 * prompt_tokens_details.cached_tokens, as vLLM does). Counted per frontend, i.e. per pool it
 * serves:
 *   index_stale            predicted more than the worker had: the index was behind the
 *                          cache (evictions not seen yet, or a restarted worker)
 *   other_worker_had_more  the router booked a worker with less overlap than the best one
 *                          in its index (the cost traded hits for load)
 * Loop thread only. */
#include "fe_app.h"

enum { MISS_STALE, MISS_OTHER };
static const char *miss_labels[] = {"index_stale", "other_worker_had_more", NULL};

int fe_hits_metrics(kvr_metrics *m)
{
    app.m_hit_predicted = kvr_metrics_counter(
        m, "kvr_frontend_prefix_predicted_tokens_total",
        "prompt tokens the router predicted cached at the worker it chose", NULL, NULL);
    app.m_hit_cached = kvr_metrics_counter(
        m, "kvr_frontend_prefix_cached_tokens_total",
        "prompt tokens the chosen worker reported cached (routed requests only)", NULL, NULL);
    app.m_hit_misses = kvr_metrics_counter(
        m, "kvr_frontend_prefix_misses_total",
        "routed requests that got fewer cached tokens than they could have, by kind", "kind",
        miss_labels);
    return app.m_hit_predicted && app.m_hit_cached && app.m_hit_misses ? 0 : KVR_ENOMEM;
}

void fe_hits_record(fe_call *c)
{
    if (!c->have_prediction || !c->relay.have_cached)
        return;
    uint64_t actual = (uint64_t)c->relay.cached_tokens;
    kvr_metric_add(app.m_hit_predicted, 0, c->predicted_tokens);
    kvr_metric_add(app.m_hit_cached, 0, actual);
    /* a prompt's last block is never reused by an engine (one token must be computed), so a
     * prediction one block above the truth is not a stale index */
    if (c->predicted_tokens > actual + fe_pool_block_size(c->ns, c->pool_model))
        kvr_metric_add(app.m_hit_misses, MISS_STALE, 1);
    if (c->best_predicted_tokens > c->predicted_tokens)
        kvr_metric_add(app.m_hit_misses, MISS_OTHER, 1);
}
