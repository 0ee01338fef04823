#include "lease.h"

static kvr_lease_entry *find(kvr_lease_tracker *t, uint64_t id, bool add)
{
    for (uint32_t i = 0; i < t->n; i++)
        if (t->e[i].id == id)
            return &t->e[i];
    if (!add || t->n >= KVR_FSM_MAX_FRONTENDS)
        return NULL;
    kvr_lease_entry *e = &t->e[t->n++];
    e->id = id;
    e->heard_ms = e->proposed_ms = 0;
    return e;
}

bool kvr_lease_heard(kvr_lease_tracker *t, const kvr_fsm *fsm, uint64_t id, int64_t now,
                     bool leader)
{
    kvr_lease_entry *e = find(t, id, true);
    if (!e)
        return false; /* the table is as large as the FSM's: the FSM could not hold it either */
    e->heard_ms = now;
    uint64_t last;
    if (!leader || kvr_fsm_frontend_last_seen(fsm, id, &last) == 0)
        return false;
    if (e->proposed_ms && now - e->proposed_ms < KVR_LEASE_REPROPOSE_MS)
        return false;
    e->proposed_ms = now;
    return true;
}

void kvr_lease_set_leader(kvr_lease_tracker *t, bool leader, int64_t now)
{
    t->office_ms = leader ? now : 0;
    for (uint32_t i = 0; i < t->n; i++)
        t->e[i].proposed_ms = 0; /* proposals of an earlier term may have been lost */
}

uint32_t kvr_lease_due(kvr_lease_tracker *t, const kvr_fsm *fsm, int64_t now, uint32_t ttl_ms,
                       uint64_t *ids, uint32_t max)
{
    uint32_t out = 0;
    if (!t->office_ms)
        return 0;
    uint32_t n = kvr_fsm_frontend_count(fsm);
    for (uint32_t i = 0; i < n && out < max; i++) {
        uint64_t id, last;
        if (kvr_fsm_frontend_at(fsm, i, &id, &last) != 0)
            continue;
        kvr_lease_entry *e = find(t, id, true);
        int64_t since = t->office_ms;
        if (e && e->heard_ms > since)
            since = e->heard_ms;
        if (now - since <= (int64_t)ttl_ms)
            continue;
        if (e && e->proposed_ms && now - e->proposed_ms < KVR_LEASE_REPROPOSE_MS)
            continue;
        if (e)
            e->proposed_ms = now;
        ids[out++] = id;
    }
    /* forget frontends neither in the table nor heard for long, so the array stays bounded */
    for (uint32_t i = 0; i < t->n;) {
        uint64_t last;
        if (now - t->e[i].heard_ms > 10 * (int64_t)ttl_ms &&
            kvr_fsm_frontend_last_seen(fsm, t->e[i].id, &last) != 0) {
            t->e[i] = t->e[--t->n];
            continue;
        }
        i++;
    }
    return out;
}
