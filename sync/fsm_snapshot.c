/* fsm_snapshot: the state machine's snapshot format (fsm.h: kvr_fsm_snapshot), its restore
 * and kvr_fsm_clone. */
#include "fsm_int.h"

#include "kvr_mp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#define CK(expr)                                                                                   \
    do {                                                                                           \
        if ((rc = (expr)) != 0)                                                                    \
            goto fail;                                                                             \
    } while (0)

/* The same small reader as cmd.c's (both decode msgpack uints into uint32 fields). */
static int rd_u32(kvr_mp_reader *r, uint32_t *v)
{
    uint64_t x;
    int rc = kvr_mp_read_uint(r, &x);
    if (rc)
        return rc;
    if (x > UINT32_MAX)
        return KVR_ELIMIT;
    *v = (uint32_t)x;
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Snapshot */

#define SNAP_MAGIC "KVRS"
/* 2: + clock_ms and the finished record. 3: + each worker's down_seq (9th field) and the
 * down counter (6th element), which decide slot reuse. 4: + the scale-to-zero pools (7th
 * element: [[ns, model, state, last_request_ms, state_since_ms, wakes]...] sorted). 5: + the
 * route policy (8th element: nil, or [set_by, six weights] as in ROUTE_POLICY). 1 to 4 are
 * still loaded (no pools before 4, no policy before 5: the FSM options' weights decide). */
#define SNAP_VERSION 5
#define SNAP_VERSION_MIN 1

int kvr_fsm_snapshot(const kvr_fsm *f, kvr_buf *out, kvr_err *err)
{
    int rc = 0;
    size_t start = out->len;
    CK(kvr_buf_append(out, SNAP_MAGIC, 4));
    uint8_t ver = SNAP_VERSION;
    CK(kvr_buf_append(out, &ver, 1));
    CK(kvr_mp_write_array(out, 8));
    CK(kvr_mp_write_array(out, f->n_workers));
    for (uint32_t i = 0; i < f->n_workers; i++) {
        const worker *w = &f->workers[i];
        CK(kvr_mp_write_array(out, 9));
        CK(kvr_mp_write_uint(out, w->id));
        CK(kvr_mp_write_cstr(out, w->ns));
        CK(kvr_mp_write_cstr(out, w->model));
        CK(kvr_mp_write_cstr(out, w->url));
        CK(kvr_mp_write_uint(out, w->role));
        CK(kvr_mp_write_bool(out, w->up));
        CK(kvr_mp_write_uint(out, w->block_size));
        CK(kvr_mp_write_uint(out, w->capacity_blocks));
        CK(kvr_mp_write_uint(out, w->down_seq));
    }
    CK(kvr_mp_write_array(out, f->n_bookings));
    for (uint32_t i = 0; i < f->cap_slots; i++) {
        const booking *b = &f->slots[i];
        if (!b->used)
            continue;
        CK(kvr_mp_write_array(out, 7));
        CK(kvr_mp_write_bin(out, b->rid, 16));
        CK(kvr_mp_write_uint(out, b->worker_id));
        CK(kvr_mp_write_uint(out, b->frontend_id));
        CK(kvr_mp_write_uint(out, b->start_ms));
        CK(kvr_mp_write_uint(out, b->blocks));
        CK(kvr_mp_write_uint(out, b->prefill_blocks));
        CK(kvr_mp_write_uint(out, b->overlap));
    }
    CK(kvr_mp_write_array(out, f->n_leases));
    for (uint32_t i = 0; i < f->n_leases; i++) {
        CK(kvr_mp_write_array(out, 2));
        CK(kvr_mp_write_uint(out, f->leases[i].frontend_id));
        CK(kvr_mp_write_uint(out, f->leases[i].last_seen_ms));
    }
    CK(kvr_mp_write_uint(out, f->clock_ms));
    CK(kvr_mp_write_array(out, f->n_fin)); /* oldest first */
    for (uint32_t i = 0; i < f->n_fin; i++) {
        const fin_rec *e = &f->fin[(uint32_t)(((uint64_t)f->fin_head + i) % f->opts.max_finished)];
        CK(kvr_mp_write_array(out, 2));
        CK(kvr_mp_write_bin(out, e->rid, KVR_REQUEST_ID_LEN));
        CK(kvr_mp_write_uint(out, e->ms));
    }
    CK(kvr_mp_write_uint(out, f->down_counter));
    CK(kvr_mp_write_array(out, f->n_pools));
    for (uint32_t i = 0; i < f->n_pools; i++) {
        const pool *p = &f->pools[i];
        CK(kvr_mp_write_array(out, 6));
        CK(kvr_mp_write_cstr(out, p->ns));
        CK(kvr_mp_write_cstr(out, p->model));
        CK(kvr_mp_write_uint(out, p->state));
        CK(kvr_mp_write_uint(out, p->last_request_ms));
        CK(kvr_mp_write_uint(out, p->state_since_ms));
        CK(kvr_mp_write_uint(out, p->wakes));
    }
    if (f->has_policy) {
        CK(kvr_mp_write_array(out, 7));
        CK(kvr_mp_write_uint(out, f->policy_set_by));
        CK(kvr_cmd_write_weights(out, &f->policy));
    } else {
        CK(kvr_mp_write_nil(out));
    }
    uint64_t sum = XXH3_64bits(out->base + start, out->len - start);
    uint8_t le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (uint8_t)(sum >> (8 * i));
    CK(kvr_buf_append(out, le, 8));
    return 0;
fail:
    out->len = start;
    return kvr_err_set(err, rc, "writing fsm snapshot: %s", kvr_strerror(rc));
}

static int rd_str_into(kvr_mp_reader *r, char *dst, size_t cap)
{
    kvr_slice s;
    int rc = kvr_mp_read_str(r, &s);
    if (rc)
        return rc;
    if (s.len >= cap)
        return KVR_ELIMIT;
    fsm_copy_slice(dst, cap, s);
    return 0;
}

int kvr_fsm_restore(kvr_fsm *f, const void *data, size_t len, kvr_err *err)
{
    int rc = 0;
    const uint8_t *p = data;
    kvr_fsm *nf = NULL;
    if (len < 4 + 1 + 8 || memcmp(p, SNAP_MAGIC, 4) != 0)
        return kvr_err_set(err, KVR_ECORRUPT,
                           "restoring fsm snapshot: bad magic or too short (%zu bytes)", len);
    if (p[4] < SNAP_VERSION_MIN || p[4] > SNAP_VERSION)
        return kvr_err_set(err, KVR_EUNSUPPORTED, "restoring fsm snapshot: version %u, want %u..%u",
                           p[4], SNAP_VERSION_MIN, SNAP_VERSION);
    unsigned version = p[4];
    uint64_t want = 0;
    for (int i = 0; i < 8; i++)
        want |= (uint64_t)p[len - 8 + i] << (8 * i);
    if (XXH3_64bits(p, len - 8) != want)
        return kvr_err_set(err, KVR_ECORRUPT, "restoring fsm snapshot: checksum mismatch");

    nf = kvr_fsm_new(&f->opts);
    if (!nf)
        return kvr_err_set(err, KVR_ENOMEM, "restoring fsm snapshot: out of memory");
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, p + 5, len - 5 - 8);
    uint32_t n, m;
    CK(kvr_mp_read_array(&r, &n));
    if (n < (version >= 5 ? 8u : version >= 4 ? 7u : version >= 3 ? 6u : version >= 2 ? 5u : 3u)) {
        rc = KVR_EINVAL;
        goto fail;
    }
    CK(kvr_mp_read_array(&r, &n));
    if (n > KVR_FSM_MAX_WORKERS) {
        rc = KVR_ELIMIT;
        goto fail;
    }
    if (n) {
        nf->workers = calloc(n, sizeof *nf->workers);
        if (!nf->workers) {
            rc = KVR_ENOMEM;
            goto fail;
        }
        nf->cap_workers = n;
    }
    for (uint32_t i = 0; i < n; i++) {
        worker *w = &nf->workers[i];
        uint32_t role;
        CK(kvr_mp_read_array(&r, &m));
        if (m < 8) {
            rc = KVR_EINVAL;
            goto fail;
        }
        CK(kvr_mp_read_uint(&r, &w->id));
        CK(rd_str_into(&r, w->ns, sizeof w->ns));
        CK(rd_str_into(&r, w->model, sizeof w->model));
        CK(rd_str_into(&r, w->url, sizeof w->url));
        CK(rd_u32(&r, &role));
        CK(kvr_mp_read_bool(&r, &w->up));
        CK(rd_u32(&r, &w->block_size));
        CK(rd_u32(&r, &w->capacity_blocks));
        if (role > KVR_ROLE_DECODE || (i > 0 && w->id <= nf->workers[i - 1].id)) {
            rc = KVR_EINVAL;
            goto fail;
        }
        w->role = (uint8_t)role;
        uint32_t j = 8;
        if (version >= 3 && m > 8) {
            CK(kvr_mp_read_uint(&r, &w->down_seq));
            j = 9;
        }
        if (w->up)
            w->down_seq = 0;
        for (; j < m; j++)
            CK(kvr_mp_skip(&r));
        nf->n_workers = i + 1;
    }
    CK(kvr_mp_read_array(&r, &n));
    if (n > nf->opts.max_bookings) {
        rc = KVR_ELIMIT;
        goto fail;
    }
    for (uint32_t i = 0; i < n; i++) {
        booking b = {0};
        kvr_slice rid;
        CK(kvr_mp_read_array(&r, &m));
        if (m < 7) {
            rc = KVR_EINVAL;
            goto fail;
        }
        CK(kvr_mp_read_bin(&r, &rid));
        if (rid.len != 16) {
            rc = KVR_EINVAL;
            goto fail;
        }
        memcpy(b.rid, rid.base, 16);
        CK(kvr_mp_read_uint(&r, &b.worker_id));
        CK(kvr_mp_read_uint(&r, &b.frontend_id));
        CK(kvr_mp_read_uint(&r, &b.start_ms));
        CK(rd_u32(&r, &b.blocks));
        CK(rd_u32(&r, &b.prefill_blocks));
        CK(rd_u32(&r, &b.overlap));
        for (uint32_t j = 7; j < m; j++)
            CK(kvr_mp_skip(&r));
        b.used = 1;
        if (fsm_booking_find(nf, b.rid)) {
            rc = KVR_EINVAL;
            goto fail;
        }
        CK(fsm_booking_insert(nf, &b));
        worker *w = fsm_worker_get(nf, b.worker_id);
        if (w) {
            w->active_blocks += b.blocks;
            w->active_prefill_blocks += b.prefill_blocks;
            w->bookings++;
        }
    }
    CK(kvr_mp_read_array(&r, &n));
    if (n > KVR_FSM_MAX_FRONTENDS) {
        rc = KVR_ELIMIT;
        goto fail;
    }
    if (n) {
        nf->leases = calloc(n, sizeof *nf->leases);
        if (!nf->leases) {
            rc = KVR_ENOMEM;
            goto fail;
        }
        nf->cap_leases = n;
    }
    for (uint32_t i = 0; i < n; i++) {
        CK(kvr_mp_read_array(&r, &m));
        if (m < 2) {
            rc = KVR_EINVAL;
            goto fail;
        }
        CK(kvr_mp_read_uint(&r, &nf->leases[i].frontend_id));
        CK(kvr_mp_read_uint(&r, &nf->leases[i].last_seen_ms));
        for (uint32_t j = 2; j < m; j++)
            CK(kvr_mp_skip(&r));
        nf->n_leases = i + 1;
    }
    if (version >= 2) {
        /* Version 1 has neither: it loads with clock 0 and an empty record. */
        CK(kvr_mp_read_uint(&r, &nf->clock_ms));
        CK(kvr_mp_read_array(&r, &n));
        if (n > KVR_FSM_MAX_FINISHED_LIMIT) {
            rc = KVR_ELIMIT;
            goto fail;
        }
        uint64_t prev = 0;
        for (uint32_t i = 0; i < n; i++) {
            kvr_slice rid;
            uint64_t ms;
            CK(kvr_mp_read_array(&r, &m));
            if (m < 2) {
                rc = KVR_EINVAL;
                goto fail;
            }
            CK(kvr_mp_read_bin(&r, &rid));
            CK(kvr_mp_read_uint(&r, &ms));
            for (uint32_t j = 2; j < m; j++)
                CK(kvr_mp_skip(&r));
            /* oldest first, never after the clock, each request once and not live */
            const uint8_t *rb = (const uint8_t *)rid.base;
            if (rid.len != KVR_REQUEST_ID_LEN || ms < prev || ms > nf->clock_ms ||
                fsm_fin_has(nf, rb) || fsm_booking_find(nf, rb)) {
                rc = KVR_EINVAL;
                goto fail;
            }
            prev = ms;
            /* More records than this FSM's bound: the oldest are dropped, as when applying. */
            CK(fsm_fin_add(nf, rb, ms));
        }
    }
    if (version >= 3) {
        CK(kvr_mp_read_uint(&r, &nf->down_counter));
        for (uint32_t i = 0; i < nf->n_workers; i++)
            if (nf->workers[i].down_seq > nf->down_counter) {
                rc = KVR_EINVAL;
                goto fail;
            }
    }
    if (version >= 4) {
        CK(kvr_mp_read_array(&r, &n));
        if (n > KVR_FSM_MAX_POOLS) {
            rc = KVR_ELIMIT;
            goto fail;
        }
        if (n) {
            nf->pools = calloc(n, sizeof *nf->pools);
            if (!nf->pools) {
                rc = KVR_ENOMEM;
                goto fail;
            }
            nf->cap_pools = n;
        }
        for (uint32_t i = 0; i < n; i++) {
            pool *pl = &nf->pools[i];
            uint32_t st;
            CK(kvr_mp_read_array(&r, &m));
            if (m < 6) {
                rc = KVR_EINVAL;
                goto fail;
            }
            CK(rd_str_into(&r, pl->ns, sizeof pl->ns));
            CK(rd_str_into(&r, pl->model, sizeof pl->model));
            CK(rd_u32(&r, &st));
            CK(kvr_mp_read_uint(&r, &pl->last_request_ms));
            CK(kvr_mp_read_uint(&r, &pl->state_since_ms));
            CK(rd_u32(&r, &pl->wakes));
            for (uint32_t j = 6; j < m; j++)
                CK(kvr_mp_skip(&r));
            /* sorted, each once, a real state, a model */
            int order = i == 0 ? -1
                               : (strcmp(nf->pools[i - 1].ns, pl->ns) != 0
                                      ? strcmp(nf->pools[i - 1].ns, pl->ns)
                                      : strcmp(nf->pools[i - 1].model, pl->model));
            if (st < KVR_POOL_AWAKE || st > KVR_POOL_STOPPING || !pl->model[0] || order >= 0) {
                rc = KVR_EINVAL;
                goto fail;
            }
            pl->state = (uint8_t)st;
            nf->n_pools = i + 1;
        }
    }
    if (version >= 5 && kvr_mp_peek(&r) == KVR_MP_NIL) {
        CK(kvr_mp_read_nil(&r));
    } else if (version >= 5) {
        CK(kvr_mp_read_array(&r, &m));
        if (m < 7) {
            rc = KVR_EINVAL;
            goto fail;
        }
        CK(kvr_mp_read_uint(&r, &nf->policy_set_by));
        CK(kvr_cmd_read_weights(&r, &nf->policy));
        for (uint32_t j = 7; j < m; j++)
            CK(kvr_mp_skip(&r));
        if (!kvr_cost_params_valid(&nf->policy)) {
            rc = KVR_EINVAL;
            goto fail;
        }
        nf->has_policy = true;
    }
    /* Older versions: every down worker has down_seq 0 (reuse goes by id among them). */
    /* Success: move nf's state into f. */
    fsm_clear(f);
    f->workers = nf->workers;
    f->n_workers = nf->n_workers;
    f->cap_workers = nf->cap_workers;
    f->slots = nf->slots;
    f->cap_slots = nf->cap_slots;
    f->n_bookings = nf->n_bookings;
    f->leases = nf->leases;
    f->n_leases = nf->n_leases;
    f->cap_leases = nf->cap_leases;
    f->fin = nf->fin;
    f->fin_idx = nf->fin_idx;
    f->fin_mask = nf->fin_mask;
    f->fin_head = nf->fin_head;
    f->n_fin = nf->n_fin;
    f->fin_evicted = nf->fin_evicted;
    f->fin_sum = nf->fin_sum;
    f->clock_ms = nf->clock_ms;
    f->down_counter = nf->down_counter;
    f->pools = nf->pools;
    f->n_pools = nf->n_pools;
    f->cap_pools = nf->cap_pools;
    f->has_policy = nf->has_policy;
    f->policy = nf->policy;
    f->policy_set_by = nf->policy_set_by;
    nf->pools = NULL;
    nf->workers = NULL;
    nf->slots = NULL;
    nf->leases = NULL;
    nf->fin = NULL;
    nf->fin_idx = NULL;
    kvr_fsm_free(nf);
    return 0;
fail:
    kvr_fsm_free(nf);
    return kvr_err_set(err, rc ? rc : KVR_EINVAL, "restoring fsm snapshot: %s", kvr_strerror(rc));
}

kvr_fsm *kvr_fsm_clone(const kvr_fsm *f)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_fsm *c = kvr_fsm_new(&f->opts);
    if (!c || kvr_fsm_snapshot(f, &b, NULL) != 0 || kvr_fsm_restore(c, b.base, b.len, NULL) != 0) {
        kvr_fsm_free(c);
        c = NULL;
    }
    kvr_buf_free(&b);
    return c;
}
