/* fe_pool: live workers, pool selection, local choice, route API codec. See fe_pool.h. */
#include "fe_pool.h"
#include "kvr_heartbeat.h"

#include "kvr_mp.h"
#include "kvr_tok.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *mode_names[] = {"kv", "round-robin", "random", "least-loaded"};

int fe_mode_parse(const char *s, fe_mode *out)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(s, mode_names[i]) == 0) {
            *out = (fe_mode)i;
            return 0;
        }
    return KVR_EINVAL;
}

const char *fe_mode_name(fe_mode m)
{
    return (unsigned)m < 4 ? mode_names[m] : "?";
}

int fe_pool_init(fe_pool *p, const char *ns_or_prefix, bool prefix_mode, uint64_t seed)
{
    memset(p, 0, sizeof *p);
    if (strlen(ns_or_prefix) >= FE_NS_MAX)
        return KVR_ELIMIT;
    p->w = calloc(FE_POOL_MAX_WORKERS, sizeof *p->w);
    if (!p->w)
        return KVR_ENOMEM;
    snprintf(p->ns, sizeof p->ns, "%s", ns_or_prefix);
    p->prefix_mode = prefix_mode;
    p->ttl_ms = 3000;
    p->rng = seed ? seed : 0x9e3779b97f4a7c15ull;
    return 0;
}

void fe_pool_free(fe_pool *p)
{
    for (size_t i = 0; p->w && i < p->n; i++)
        free(p->w[i].lora_names);
    free(p->w);
    p->w = NULL;
    p->n = 0;
}

static uint64_t rnd(fe_pool *p)
{
    uint64_t x = p->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    p->rng = x;
    return x;
}

bool fe_pool_ns_match(const fe_pool *p, const char *ns, size_t len)
{
    size_t pl = strlen(p->ns);
    if (len == pl && memcmp(ns, p->ns, pl) == 0)
        return true;
    return p->prefix_mode && len > pl + 1 && memcmp(ns, p->ns, pl) == 0 && ns[pl] == '-';
}

static int copy_str(kvr_slice s, char *dst, size_t cap)
{
    if (s.len >= cap)
        return KVR_ELIMIT;
    if (s.len) /* an absent key is {NULL, 0}: memcpy from NULL is undefined even for 0 bytes */
        memcpy(dst, s.base, s.len);
    dst[s.len] = '\0';
    return 0;
}

static int to_u32(uint64_t x, uint32_t *v)
{
    if (x > UINT32_MAX)
        return KVR_ELIMIT;
    *v = (uint32_t)x;
    return 0;
}

int fe_pool_heartbeat(fe_pool *p, const void *data, size_t len, int64_t now_ms, kvr_err *err)
{
    kvr_heartbeat hb;
    int rc = kvr_heartbeat_decode(data, len, &hb);
    if (rc)
        goto bad;
    if ((hb.has & (KVR_HB_ID | KVR_HB_NAMESPACE | KVR_HB_URL)) !=
        (KVR_HB_ID | KVR_HB_NAMESPACE | KVR_HB_URL)) {
        rc = KVR_EINVAL;
        goto bad;
    }
    fe_worker w;
    memset(&w, 0, sizeof w);
    w.id = hb.id;
    w.started_ms = hb.started_ms;
    if ((rc = copy_str(hb.ns, w.ns, sizeof w.ns)) || (rc = copy_str(hb.model, w.model, sizeof w.model)) ||
        (rc = copy_str(hb.url, w.url, sizeof w.url)) || (rc = copy_str(hb.role, w.role, sizeof w.role)) ||
        (rc = to_u32(hb.block_size, &w.block_size)) ||
        (rc = to_u32(hb.capacity_blocks, &w.capacity_blocks)) || (rc = to_u32(hb.active, &w.active)) ||
        (rc = to_u32(hb.waiting, &w.waiting)) || (rc = to_u32(hb.used_blocks, &w.used_blocks)))
        goto bad;
    if (!fe_pool_ns_match(p, w.ns, strlen(w.ns)))
        return 0;
    if ((rc = copy_str(hb.mdc_sum, w.mdc_sum, sizeof w.mdc_sum)))
        goto bad;
    if (p->allow && !kvr_cidr_url_allowed(p->allow, hb.url.base, hb.url.len)) {
        p->refused_url++;
        return kvr_err_set(err, KVR_EINVAL,
                           "worker %" PRIu64 " refused: url %s outside --worker-cidr", w.id, w.url);
    }
    w.last_seen_ms = now_ms;
    fe_worker *e = fe_pool_find(p, w.ns, w.id);
    if (!e && p->n >= FE_POOL_MAX_WORKERS)
        fe_pool_expire(p, now_ms);
    if (!e) {
        if (p->n >= FE_POOL_MAX_WORKERS) {
            p->rejected++;
            return kvr_err_set(err, KVR_ELIMIT, "worker table full (%d)", FE_POOL_MAX_WORKERS);
        }
        e = &p->w[p->n++];
        memset(e, 0, sizeof *e);
    } else {
        w.inflight = e->inflight;
        w.mdc_logged = e->mdc_logged && strcmp(e->mdc_sum, w.mdc_sum) == 0;
    }
    /* the adapter list: packed names, reallocated only when it changed */
    size_t need = 0;
    for (uint32_t i = 0; i < hb.n_loras; i++)
        need += hb.loras[i].len + 1;
    bool same = e->n_loras == hb.n_loras;
    const char *q = e->lora_names;
    for (uint32_t i = 0; same && i < hb.n_loras; q += strlen(q) + 1, i++)
        same = kvr_slice_eq_cstr(hb.loras[i], q);
    if (same) {
        w.lora_names = e->lora_names;
        w.n_loras = e->n_loras;
    } else {
        char *names = need ? malloc(need) : NULL;
        if (need && !names) {
            rc = KVR_ENOMEM;
            goto bad;
        }
        char *o = names;
        for (uint32_t i = 0; i < hb.n_loras; i++) {
            memcpy(o, hb.loras[i].base, hb.loras[i].len);
            o[hb.loras[i].len] = 0;
            o += hb.loras[i].len + 1;
        }
        free(e->lora_names);
        w.lora_names = names;
        w.n_loras = hb.n_loras;
    }
    *e = w;
    return 0;
bad:
    p->rejected++;
    return kvr_err_set(err, rc, "malformed worker heartbeat: %s", kvr_strerror(rc));
}

void fe_pool_expire(fe_pool *p, int64_t now_ms)
{
    if (p->blind)
        return;
    size_t j = 0;
    for (size_t i = 0; i < p->n; i++) {
        if (now_ms - p->w[i].last_seen_ms <= p->ttl_ms)
            p->w[j++] = p->w[i];
        else
            free(p->w[i].lora_names);
    }
    p->n = j;
}

void fe_pool_set_blind(fe_pool *p, bool blind, int64_t now_ms)
{
    if (blind == p->blind)
        return;
    if (blind) {
        fe_pool_expire(p, now_ms);
    } else {
        /* heartbeats could not arrive while we were blind: the TTL starts again now */
        for (size_t i = 0; i < p->n; i++)
            if (p->w[i].last_seen_ms < now_ms)
                p->w[i].last_seen_ms = now_ms;
    }
    p->blind = blind;
}

void fe_pool_shift(fe_pool *p, int64_t delta_ms, int64_t now_ms)
{
    for (size_t i = 0; i < p->n; i++) {
        int64_t t = p->w[i].last_seen_ms + delta_ms;
        p->w[i].last_seen_ms = t < now_ms ? t : now_ms;
    }
}

static bool live(const fe_pool *p, const fe_worker *w, const char *model, int64_t now_ms)
{
    if (!p->blind && now_ms - w->last_seen_ms > p->ttl_ms)
        return false;
    if (strcmp(w->role, "prefill") == 0)
        return false;
    return !model || strcmp(model, w->model) == 0;
}

size_t fe_pool_live(const fe_pool *p, const char *model, int64_t now_ms)
{
    size_t c = 0;
    for (size_t i = 0; i < p->n; i++)
        c += live(p, &p->w[i], model, now_ms);
    return c;
}

bool fe_worker_has_lora(const fe_worker *w, const char *name)
{
    const char *q = w->lora_names;
    for (uint32_t i = 0; i < w->n_loras; q += strlen(q) + 1, i++)
        if (strcmp(q, name) == 0)
            return true;
    return false;
}

const char *fe_pool_lora_base(const fe_pool *p, const char *name, int64_t now_ms)
{
    for (size_t i = 0; i < p->n; i++)
        if (live(p, &p->w[i], NULL, now_ms) && fe_worker_has_lora(&p->w[i], name))
            return p->w[i].model;
    return NULL;
}

static bool mdc_ok(const fe_filter *f, const fe_worker *w)
{
    return !f || !f->mdc_sum || !f->mdc_sum[0] || !w->mdc_sum[0] ||
           strcmp(f->mdc_sum, w->mdc_sum) == 0;
}

/* live + the filter; need_lora: the worker must list f->lora */
static bool live_f(const fe_pool *p, const fe_worker *w, const char *model, int64_t now_ms,
                   const fe_filter *f, bool need_lora)
{
    return live(p, w, model, now_ms) && mdc_ok(f, w) &&
           (!need_lora || fe_worker_has_lora(w, f->lora));
}

static bool has_lora_f(const fe_filter *f)
{
    return f && f->lora && f->lora[0];
}

int fe_pool_pick_ns_f(fe_pool *p, const char *model, int64_t now_ms, const fe_filter *f,
                      char ns_out[FE_NS_MAX])
{
    for (int need_lora = has_lora_f(f); need_lora >= 0; need_lora--) {
        size_t total = 0;
        for (size_t i = 0; i < p->n; i++)
            total += live_f(p, &p->w[i], model, now_ms, f, need_lora);
        if (total == 0)
            continue;
        size_t k = (size_t)(rnd(p) % total);
        for (size_t i = 0; i < p->n; i++) {
            if (!live_f(p, &p->w[i], model, now_ms, f, need_lora))
                continue;
            if (k-- == 0) {
                memcpy(ns_out, p->w[i].ns, FE_NS_MAX);
                return 0;
            }
        }
    }
    return fe_pool_live(p, NULL, now_ms) ? KVR_ENOTFOUND : KVR_EAGAIN;
}

int fe_pool_pick_ns(fe_pool *p, const char *model, int64_t now_ms, char ns_out[FE_NS_MAX])
{
    size_t total = fe_pool_live(p, model, now_ms);
    if (total == 0)
        return fe_pool_live(p, NULL, now_ms) ? KVR_ENOTFOUND : KVR_EAGAIN;
    /* Picking a uniformly random live instance and taking its namespace gives each pool a
     * probability proportional to its live instance count. */
    size_t k = (size_t)(rnd(p) % total);
    for (size_t i = 0; i < p->n; i++) {
        if (!live(p, &p->w[i], model, now_ms))
            continue;
        if (k-- == 0) {
            memcpy(ns_out, p->w[i].ns, FE_NS_MAX);
            return 0;
        }
    }
    return KVR_EAGAIN; /* unreachable */
}

fe_worker *fe_pool_find(fe_pool *p, const char *ns, uint64_t id)
{
    for (size_t i = 0; i < p->n; i++)
        if (p->w[i].id == id && (!ns || strcmp(p->w[i].ns, ns) == 0))
            return &p->w[i];
    return NULL;
}

fe_worker *fe_pool_find_url(fe_pool *p, const char *url)
{
    for (size_t i = 0; i < p->n; i++)
        if (strcmp(p->w[i].url, url) == 0)
            return &p->w[i];
    return NULL;
}

bool fe_pool_worker_silent(fe_pool *p, uint64_t id, const char *url, int64_t now_ms,
                           int64_t silent_ms)
{
    if (p->blind)
        return false;
    fe_worker *w = fe_pool_find(p, NULL, id);
    if (!w || strcmp(w->url, url) != 0)
        return true;
    return now_ms - w->last_seen_ms >= silent_ms;
}

fe_worker *fe_pool_choose(fe_pool *p, fe_mode mode, const char *ns, const char *model,
                          int64_t now_ms, bool has_exclude, uint64_t exclude_id)
{
    return fe_pool_choose_f(p, mode, ns, model, now_ms, has_exclude, exclude_id, NULL);
}

fe_worker *fe_pool_choose_f(fe_pool *p, fe_mode mode, const char *ns, const char *model,
                            int64_t now_ms, bool has_exclude, uint64_t exclude_id,
                            const fe_filter *f)
{
    fe_worker *cand[FE_POOL_MAX_WORKERS];
    size_t nc = 0;
    /* under an adapter some live worker here lists, only the listing workers */
    bool need_lora = false;
    for (size_t i = 0; has_lora_f(f) && !need_lora && i < p->n; i++)
        need_lora =
            live_f(p, &p->w[i], model, now_ms, f, true) && (!ns || strcmp(p->w[i].ns, ns) == 0);
    for (int pass = 0; pass < 2 && nc == 0; pass++)
        for (size_t i = 0; i < p->n; i++) {
            fe_worker *w = &p->w[i];
            if (!live_f(p, w, model, now_ms, f, need_lora) || (ns && strcmp(w->ns, ns) != 0))
                continue;
            if (pass == 0 && has_exclude && w->id == exclude_id)
                continue;
            cand[nc++] = w;
        }
    if (nc == 0)
        return NULL;
    switch (mode) {
    case FE_MODE_RR: {
        /* Order by id so the rotation is stable while heartbeats reorder nothing. */
        fe_worker *best = NULL;
        /* the (rr % nc)-th smallest id */
        size_t k = (size_t)(p->rr++ % nc);
        for (size_t i = 0; i < nc; i++) {
            size_t smaller = 0;
            for (size_t j = 0; j < nc; j++)
                smaller += cand[j]->id < cand[i]->id;
            if (smaller == k) {
                best = cand[i];
                break;
            }
        }
        return best ? best : cand[0];
    }
    case FE_MODE_RANDOM:
        return cand[rnd(p) % nc];
    case FE_MODE_KV:
    case FE_MODE_LEAST:
    default: {
        /* Heartbeat load (active+waiting) plus what we sent since, then used blocks, then id. */
        fe_worker *best = cand[0];
        for (size_t i = 1; i < nc; i++) {
            fe_worker *w = cand[i];
            uint64_t lw = (uint64_t)w->active + w->waiting + w->inflight;
            uint64_t lb = (uint64_t)best->active + best->waiting + best->inflight;
            if (lw < lb || (lw == lb && (w->used_blocks < best->used_blocks ||
                                         (w->used_blocks == best->used_blocks && w->id < best->id))))
                best = w;
        }
        return best;
    }
    }
}

int fe_pool_models_json(const fe_pool *p, int64_t now_ms, kvr_buf *out)
{
    int rc = kvr_buf_append_cstr(out, "{\"object\":\"list\",\"data\":[");
    bool first = true;
    for (size_t i = 0; i < p->n && !rc; i++) {
        const fe_worker *w = &p->w[i];
        if (!live(p, w, NULL, now_ms))
            continue;
        bool dup = false;
        for (size_t j = 0; j < i && !dup; j++)
            dup = live(p, &p->w[j], NULL, now_ms) && strcmp(p->w[j].model, w->model) == 0;
        if (dup)
            continue;
        rc = kvr_buf_append_cstr(out, first ? "{\"id\":\"" : ",{\"id\":\"");
        rc = rc ? rc : kvr_tok_json_escape(out, w->model, strlen(w->model));
        rc = rc ? rc
                : kvr_buf_appendf(out, "\",\"object\":\"model\",\"created\":%llu,\"owned_by\":\"kvroute\"}",
                                  (unsigned long long)(w->started_ms / 1000));
        first = false;
    }
    /* adapters, once each (the first live worker listing one names its parent) */
    for (size_t i = 0; i < p->n && !rc; i++) {
        const fe_worker *w = &p->w[i];
        if (!live(p, w, NULL, now_ms))
            continue;
        const char *q = w->lora_names;
        for (uint32_t k = 0; k < w->n_loras && !rc; q += strlen(q) + 1, k++) {
            bool dup = false;
            for (size_t j = 0; j < p->n && !dup; j++) {
                const fe_worker *x = &p->w[j];
                if (!live(p, x, NULL, now_ms))
                    continue;
                if (j < i && fe_worker_has_lora(x, q))
                    dup = true;
                else if (strcmp(x->model, q) == 0)
                    dup = true; /* a base model of that name is listed already */
            }
            if (dup)
                continue;
            bool seen = false; /* twice in one worker's list */
            const char *r = w->lora_names;
            for (uint32_t m = 0; m < k && !seen; r += strlen(r) + 1, m++)
                seen = strcmp(r, q) == 0;
            if (seen)
                continue;
            rc = kvr_buf_append_cstr(out, first ? "{\"id\":\"" : ",{\"id\":\"");
            rc = rc ? rc : kvr_tok_json_escape(out, q, strlen(q));
            rc = rc ? rc
                    : kvr_buf_appendf(out,
                                      "\",\"object\":\"model\",\"created\":%llu,"
                                      "\"owned_by\":\"kvroute\",\"root\":\"",
                                      (unsigned long long)(w->started_ms / 1000));
            rc = rc ? rc : kvr_tok_json_escape(out, q, strlen(q));
            rc = rc ? rc : kvr_buf_append_cstr(out, "\",\"parent\":\"");
            rc = rc ? rc : kvr_tok_json_escape(out, w->model, strlen(w->model));
            rc = rc ? rc : kvr_buf_append_cstr(out, "\"}");
            first = false;
        }
    }
    rc = rc ? rc : kvr_buf_append_cstr(out, "]}");
    return rc;
}
