#include "liveness.h"

#include <string.h>

void kvr_live_init(kvr_live_tracker *t)
{
    t->n = 0;
    t->office_ms = t->hold_ms = t->last_due_ms = 0;
}

/* Index of id, or of where it would go (*found false). */
static uint32_t lower_bound(const kvr_live_tracker *t, uint64_t id, bool *found)
{
    uint32_t lo = 0, hi = t->n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (t->e[mid].id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = lo < t->n && t->e[lo].id == id;
    return lo;
}

static void remove_at(kvr_live_tracker *t, uint32_t i)
{
    memmove(&t->e[i], &t->e[i + 1], (t->n - i - 1) * sizeof t->e[0]);
    t->n--;
}

void kvr_live_heard(kvr_live_tracker *t, uint64_t id, int64_t now)
{
    bool found;
    uint32_t i = lower_bound(t, id, &found);
    if (!found) {
        if (t->n >= KVR_FSM_MAX_WORKERS) {
            /* a flood of one-shot ids: forget the one heard longest ago */
            uint32_t old = 0;
            for (uint32_t k = 1; k < t->n; k++)
                if (t->e[k].heard_ms < t->e[old].heard_ms)
                    old = k;
            remove_at(t, old);
            i = lower_bound(t, id, &found);
        }
        memmove(&t->e[i + 1], &t->e[i], (t->n - i) * sizeof t->e[0]);
        t->n++;
        t->e[i] = (kvr_live_entry){.id = id};
    }
    t->e[i].heard_ms = now;
    t->e[i].proposed_ms = 0; /* heard again: a later silence is a new one */
}

void kvr_live_forget(kvr_live_tracker *t, uint64_t id)
{
    bool found;
    uint32_t i = lower_bound(t, id, &found);
    if (found)
        remove_at(t, i);
}

void kvr_live_set_leader(kvr_live_tracker *t, bool leader, int64_t now)
{
    t->office_ms = leader ? now : 0;
    for (uint32_t i = 0; i < t->n; i++)
        t->e[i].proposed_ms = 0; /* proposals of an earlier term may have been lost */
}

void kvr_live_hold(kvr_live_tracker *t, int64_t now)
{
    if (now > t->hold_ms)
        t->hold_ms = now;
}

uint32_t kvr_live_due(kvr_live_tracker *t, const kvr_fsm *fsm, int64_t now, uint32_t ttl_ms,
                      uint64_t *ids, uint32_t max)
{
    uint32_t out = 0;
    bool stalled = t->last_due_ms && now - t->last_due_ms > KVR_LIVE_STALL_MS;
    t->last_due_ms = now;
    if (stalled)
        kvr_live_hold(t, now);
    if (t->office_ms && !stalled) {
        uint32_t n = kvr_fsm_worker_count(fsm);
        for (uint32_t i = 0; i < n && out < max; i++) {
            kvr_fsm_worker_view v;
            if (kvr_fsm_worker_at(fsm, i, &v) != 0 || !v.up)
                continue;
            bool found;
            uint32_t k = lower_bound(t, v.id, &found);
            kvr_live_entry *e = found ? &t->e[k] : NULL;
            int64_t since = t->office_ms > t->hold_ms ? t->office_ms : t->hold_ms;
            if (e && e->heard_ms > since)
                since = e->heard_ms;
            if (now - since <= (int64_t)ttl_ms)
                continue;
            if (e && e->proposed_ms && now - e->proposed_ms < KVR_LIVE_REPROPOSE_MS)
                continue;
            if (!e) { /* remember the proposal so it is not repeated every call */
                kvr_live_heard(t, v.id, 0);
                e = &t->e[lower_bound(t, v.id, &found)];
            }
            e->proposed_ms = now;
            ids[out++] = v.id;
        }
    }
    for (uint32_t i = 0; i < t->n;) {
        kvr_fsm_worker_view v;
        bool up = kvr_fsm_worker_get(fsm, t->e[i].id, &v) == 0 && v.up;
        int64_t last =
            t->e[i].heard_ms > t->e[i].proposed_ms ? t->e[i].heard_ms : t->e[i].proposed_ms;
        if (!up && now - last > 10 * (int64_t)ttl_ms) {
            remove_at(t, i);
            continue;
        }
        i++;
    }
    return out;
}

typedef struct age_scan {
    int64_t now, since, max_age;
    uint64_t young_min, old_min, old_max;
    bool any_old;
} age_scan;

static int age_one(const kvr_fsm_booking_view *b, void *data)
{
    age_scan *a = data;
    int64_t from = b->local_ms > a->since ? b->local_ms : a->since;
    if (a->now - from > a->max_age) {
        if (!a->any_old || b->start_ms < a->old_min)
            a->old_min = b->start_ms;
        if (!a->any_old || b->start_ms > a->old_max)
            a->old_max = b->start_ms;
        a->any_old = true;
    } else if (b->start_ms < a->young_min) {
        a->young_min = b->start_ms;
    }
    return 0;
}

bool kvr_live_expire_due(const kvr_fsm *fsm, int64_t now, int64_t since, uint32_t max_age_ms,
                         uint64_t *before_ms)
{
    age_scan a = {.now = now, .since = since, .max_age = max_age_ms, .young_min = UINT64_MAX};
    kvr_fsm_foreach_booking(fsm, age_one, &a);
    if (!a.any_old || a.old_min >= a.young_min)
        return false;
    /* EXPIRE frees start_ms < before_ms */
    *before_ms = a.young_min != UINT64_MAX ? a.young_min
                 : a.old_max < UINT64_MAX  ? a.old_max + 1
                                           : a.old_max;
    return true;
}
