/* fsm_pools: the state machine's scale-to-zero pools (fsm.h "Pools"). */
#include "fsm_int.h"

#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

static int pool_cmp_key(const pool *p, const char *ns, size_t ns_len, const char *model,
                        size_t model_len)
{
    size_t pl = strlen(p->ns);
    int c = memcmp(p->ns, ns, pl < ns_len ? pl : ns_len);
    if (c || pl != ns_len)
        return c ? c : (pl < ns_len ? -1 : 1);
    pl = strlen(p->model);
    c = memcmp(p->model, model, pl < model_len ? pl : model_len);
    if (c || pl != model_len)
        return c ? c : (pl < model_len ? -1 : 1);
    return 0;
}

/* Index of the pool, else -1 - insertion point. */
static long pool_find(const kvr_fsm *f, kvr_slice ns, kvr_slice model)
{
    long lo = 0, hi = (long)f->n_pools - 1;
    while (lo <= hi) {
        long mid = (lo + hi) / 2;
        int c = pool_cmp_key(&f->pools[mid], ns.base, ns.len, model.base, model.len);
        if (c == 0)
            return mid;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return -1 - lo;
}

void fsm_apply_pool_set(kvr_fsm *f, const kvr_pool_cmd *pc, kvr_fsm_result *res)
{
    if (pc->ns.len > KVR_FSM_NS_MAX || pc->model.len == 0 || pc->model.len > KVR_FSM_MODEL_MAX ||
        (unsigned)pc->state > KVR_POOL_STOPPING) {
        res->outcome = KVR_OUT_INVALID;
        return;
    }
    long i = pool_find(f, pc->ns, pc->model);
    if (pc->state == KVR_POOL_REMOVED) {
        if (i < 0) {
            res->outcome = KVR_OUT_UNKNOWN;
            return;
        }
        memmove(&f->pools[i], &f->pools[i + 1], (f->n_pools - (size_t)i - 1) * sizeof *f->pools);
        f->n_pools--;
        res->outcome = KVR_OUT_OK;
        return;
    }
    pool *p;
    if (i < 0) {
        if (f->n_pools >= KVR_FSM_MAX_POOLS) {
            res->outcome = KVR_OUT_FULL;
            return;
        }
        if (f->n_pools == f->cap_pools) {
            uint32_t nc = f->cap_pools ? f->cap_pools * 2 : 8;
            pool *np = realloc(f->pools, nc * sizeof *np);
            if (!np) {
                res->outcome = KVR_OUT_FULL;
                return;
            }
            f->pools = np;
            f->cap_pools = nc;
        }
        i = -1 - i;
        memmove(&f->pools[i + 1], &f->pools[i], (f->n_pools - (size_t)i) * sizeof *f->pools);
        f->n_pools++;
        p = &f->pools[i];
        memset(p, 0, sizeof *p);
        fsm_copy_slice(p->ns, sizeof p->ns, pc->ns);
        fsm_copy_slice(p->model, sizeof p->model, pc->model);
        p->state = 0; /* a new pool always "changes" state below */
    } else {
        p = &f->pools[i];
    }
    if (p->state != (uint8_t)pc->state) {
        if (pc->state == KVR_POOL_WAKING && p->state != KVR_POOL_AWAKE)
            p->wakes++;
        p->state = (uint8_t)pc->state;
        p->state_since_ms = pc->now_ms;
        if (pc->state == KVR_POOL_SLEEPING) {
            /* the scaler stopped the pool's workers: they are down now, on every replica at
             * the same point, not when each router stops hearing them (a request in between
             * would book a stopped worker and make the pool awake again) */
            for (uint32_t k = 0; k < f->n_workers; k++) {
                worker *w = &f->workers[k];
                if (w->up && kvr_slice_eq_cstr(pc->ns, w->ns) && kvr_slice_eq_cstr(pc->model, w->model))
                    res->freed += fsm_worker_mark_down(f, w->id, NULL);
            }
        }
    }
    res->outcome = KVR_OUT_OK;
}

void fsm_pool_after_route(kvr_fsm *f, const kvr_route_cmd *rc, kvr_fsm_result *res)
{
    if (f->n_pools == 0 || (res->outcome != KVR_OUT_OK && res->outcome != KVR_OUT_NO_WORKER))
        return;
    long i = pool_find(f, rc->ns, rc->model);
    if (i < 0)
        return;
    pool *p = &f->pools[i];
    if (rc->now_ms > p->last_request_ms)
        p->last_request_ms = rc->now_ms;
    if (res->outcome == KVR_OUT_NO_WORKER) {
        if (p->state != KVR_POOL_WAKING) {
            p->state = KVR_POOL_WAKING;
            p->state_since_ms = rc->now_ms;
            p->wakes++;
        }
        res->pool_waking = true;
        return;
    }
    if (p->state != KVR_POOL_AWAKE) {
        p->state = KVR_POOL_AWAKE;
        p->state_since_ms = rc->now_ms;
    }
}

uint64_t fsm_pools_digest(const kvr_fsm *f)
{
    uint64_t d = 0;
    for (uint32_t i = 0; i < f->n_pools; i++) {
        pool k;
        memset(&k, 0, sizeof k); /* padding and string tails are hashed */
        const pool *p = &f->pools[i];
        strcpy(k.ns, p->ns);
        strcpy(k.model, p->model);
        k.state = p->state;
        k.last_request_ms = p->last_request_ms;
        k.state_since_ms = p->state_since_ms;
        k.wakes = p->wakes;
        d += XXH3_64bits_withSeed(&k, sizeof k, 7);
    }
    return d;
}

static void view_of(const pool *p, kvr_fsm_pool_view *out)
{
    memset(out, 0, sizeof *out);
    strcpy(out->ns, p->ns);
    strcpy(out->model, p->model);
    out->state = (kvr_pool_state)p->state;
    out->last_request_ms = p->last_request_ms;
    out->state_since_ms = p->state_since_ms;
    out->wakes = p->wakes;
}

uint32_t kvr_fsm_pool_count(const kvr_fsm *f)
{
    return f->n_pools;
}

int kvr_fsm_pool_at(const kvr_fsm *f, uint32_t i, kvr_fsm_pool_view *out)
{
    if (i >= f->n_pools)
        return KVR_ENOTFOUND;
    view_of(&f->pools[i], out);
    return 0;
}

int kvr_fsm_pool_get(const kvr_fsm *f, const char *ns, const char *model, kvr_fsm_pool_view *out)
{
    long i = pool_find(f, kvr_slice_of(ns), kvr_slice_of(model));
    if (i < 0)
        return KVR_ENOTFOUND;
    view_of(&f->pools[i], out);
    return 0;
}
