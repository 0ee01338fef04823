#include "cmd.h"

#include "kvr_mp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------- */
/* Encoding */

#define CK(expr)                                                                                   \
    do {                                                                                           \
        if ((rc = (expr)) != 0)                                                                    \
            goto fail;                                                                             \
    } while (0)

int kvr_cmd_write_weights(kvr_buf *out, const kvr_cost_params *p)
{
    const double w[6] = {p->overlap_weight,  p->load_weight, p->queue_weight,
                         p->overflow_weight, p->tie_band,    p->temperature};
    for (int j = 0; j < 6; j++) {
        int rc = kvr_mp_write_double(out, w[j]);
        if (rc)
            return rc;
    }
    return 0;
}

int kvr_cmd_read_weights(kvr_mp_reader *r, kvr_cost_params *p)
{
    double *w[6] = {&p->overlap_weight,  &p->load_weight, &p->queue_weight,
                    &p->overflow_weight, &p->tie_band,    &p->temperature};
    for (int j = 0; j < 6; j++) {
        int rc = kvr_mp_read_double(r, w[j]);
        if (rc)
            return rc;
    }
    return 0;
}

int kvr_cmd_encode(const kvr_cmd *cmd, kvr_buf *out, kvr_err *err)
{
    int rc = 0;
    size_t start = out->len;
    uint8_t ver = KVR_CMD_VERSION;
    CK(kvr_buf_append(out, &ver, 1));
    switch (cmd->type) {
    case KVR_CMD_ROUTE: {
        const kvr_route_cmd *r = &cmd->u.route;
        if (r->n_candidates > KVR_FSM_MAX_CANDIDATES || r->model.len > KVR_FSM_MODEL_MAX ||
            r->ns.len > KVR_FSM_NS_MAX || r->n_approx_hashes > KVR_CMD_MAX_APPROX_HASHES ||
            (r->n_approx_hashes && !r->approx_hashes)) {
            out->len = start;
            return kvr_err_set(err, KVR_EINVAL, "encoding ROUTE: field over its bound");
        }
        CK(kvr_mp_write_array(out, r->has_cost          ? 13
                                   : r->disagg          ? 12
                                   : r->n_approx_hashes ? 11
                                   : r->only_candidates ? 10
                                                        : 9));
        CK(kvr_mp_write_uint(out, KVR_CMD_ROUTE));
        CK(kvr_mp_write_bin(out, r->request_id, KVR_REQUEST_ID_LEN));
        CK(kvr_mp_write_uint(out, r->frontend_id));
        CK(kvr_mp_write_uint(out, r->now_ms));
        CK(kvr_mp_write_uint(out, r->request_blocks));
        CK(kvr_mp_write_str(out, r->model.base, r->model.len));
        CK(kvr_mp_write_str(out, r->ns.base, r->ns.len));
        CK(kvr_mp_write_uint(out, r->pin_worker));
        CK(kvr_mp_write_array(out, r->n_candidates));
        for (uint32_t i = 0; i < r->n_candidates; i++) {
            CK(kvr_mp_write_array(out, 2));
            CK(kvr_mp_write_uint(out, r->candidates[i].worker_id));
            CK(kvr_mp_write_uint(out, r->candidates[i].overlap));
        }
        if (r->only_candidates || r->n_approx_hashes || r->disagg || r->has_cost)
            CK(kvr_mp_write_bool(out, r->only_candidates));
        if (r->n_approx_hashes || r->disagg || r->has_cost)
            CK(kvr_mp_write_bin(out, r->n_approx_hashes ? r->approx_hashes : (const uint8_t *)"",
                                8 * (size_t)r->n_approx_hashes));
        if (r->disagg) {
            CK(kvr_mp_write_array(out, 4));
            CK(kvr_mp_write_uint(out, r->tokens));
            CK(kvr_mp_write_uint(out, r->block_size));
            CK(kvr_mp_write_uint(out, r->max_local_prefill));
            CK(kvr_mp_write_uint(out, r->max_prefill_queue));
        } else if (r->has_cost) {
            CK(kvr_mp_write_nil(out));
        }
        if (r->has_cost) {
            CK(kvr_mp_write_array(out, 6));
            CK(kvr_cmd_write_weights(out, &r->cost));
        }
        break;
    }
    case KVR_CMD_PREFILL_DONE:
    case KVR_CMD_FREE:
        CK(kvr_mp_write_array(out, 2));
        CK(kvr_mp_write_uint(out, cmd->type));
        CK(kvr_mp_write_bin(out, cmd->u.request_id, KVR_REQUEST_ID_LEN));
        break;
    case KVR_CMD_WORKER_UP: {
        const kvr_worker_info *w = &cmd->u.worker;
        if (w->ns.len > KVR_FSM_NS_MAX || w->model.len > KVR_FSM_MODEL_MAX ||
            w->url.len > KVR_FSM_URL_MAX) {
            out->len = start;
            return kvr_err_set(err, KVR_EINVAL, "encoding WORKER_UP: field over its bound");
        }
        CK(kvr_mp_write_array(out, 8));
        CK(kvr_mp_write_uint(out, KVR_CMD_WORKER_UP));
        CK(kvr_mp_write_uint(out, w->id));
        CK(kvr_mp_write_str(out, w->ns.base, w->ns.len));
        CK(kvr_mp_write_str(out, w->model.base, w->model.len));
        CK(kvr_mp_write_str(out, w->url.base, w->url.len));
        CK(kvr_mp_write_uint(out, (uint64_t)w->role));
        CK(kvr_mp_write_uint(out, w->block_size));
        CK(kvr_mp_write_uint(out, w->capacity_blocks));
        break;
    }
    case KVR_CMD_WORKER_DOWN:
        CK(kvr_mp_write_array(out, 2));
        CK(kvr_mp_write_uint(out, KVR_CMD_WORKER_DOWN));
        CK(kvr_mp_write_uint(out, cmd->u.worker_id));
        break;
    case KVR_CMD_FRONTEND_SEEN:
    case KVR_CMD_FRONTEND_EXPIRE:
        CK(kvr_mp_write_array(out, 3));
        CK(kvr_mp_write_uint(out, cmd->type));
        CK(kvr_mp_write_uint(out, cmd->u.frontend.frontend_id));
        CK(kvr_mp_write_uint(out, cmd->u.frontend.now_ms));
        break;
    case KVR_CMD_EXPIRE:
        CK(kvr_mp_write_array(out, 2));
        CK(kvr_mp_write_uint(out, KVR_CMD_EXPIRE));
        CK(kvr_mp_write_uint(out, cmd->u.before_ms));
        break;
    case KVR_CMD_POOL_SET: {
        const kvr_pool_cmd *p = &cmd->u.pool;
        if (p->ns.len > KVR_FSM_NS_MAX || p->model.len == 0 || p->model.len > KVR_FSM_MODEL_MAX ||
            (unsigned)p->state > KVR_POOL_STOPPING) {
            out->len = start;
            return kvr_err_set(err, KVR_EINVAL, "encoding POOL_SET: field over its bound");
        }
        CK(kvr_mp_write_array(out, 5));
        CK(kvr_mp_write_uint(out, KVR_CMD_POOL_SET));
        CK(kvr_mp_write_str(out, p->ns.base, p->ns.len));
        CK(kvr_mp_write_str(out, p->model.base, p->model.len));
        CK(kvr_mp_write_uint(out, (uint64_t)p->state));
        CK(kvr_mp_write_uint(out, p->now_ms));
        break;
    }
    case KVR_CMD_ROUTE_POLICY: {
        const kvr_policy_cmd *pc = &cmd->u.policy;
        if (!kvr_cost_params_valid(&pc->cost)) {
            out->len = start;
            return kvr_err_set(err, KVR_EINVAL, "encoding ROUTE_POLICY: weight out of range");
        }
        CK(kvr_mp_write_array(out, 8));
        CK(kvr_mp_write_uint(out, KVR_CMD_ROUTE_POLICY));
        CK(kvr_mp_write_uint(out, pc->set_by));
        CK(kvr_cmd_write_weights(out, &pc->cost));
        break;
    }
    default:
        out->len = start;
        return kvr_err_set(err, KVR_EINVAL, "encoding command: unknown type %d", (int)cmd->type);
    }
    return 0;
fail:
    out->len = start;
    return kvr_err_set(err, rc, "encoding %s: %s", kvr_cmd_type_name(cmd->type), kvr_strerror(rc));
}

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

/* A name (namespace, model, url): the FSM keeps names as C strings, so a NUL inside one would
 * be stored cut short and compare unlike the bytes that were replicated (a POOL_SET with model
 * "\0" was applied but its snapshot refused: fuzz_sync). */
static int rd_name(kvr_mp_reader *r, kvr_slice *s)
{
    int rc = kvr_mp_read_str(r, s);
    if (rc)
        return rc;
    return s->len && memchr(s->base, 0, s->len) ? KVR_EINVAL : 0;
}

static int rd_rid(kvr_mp_reader *r, uint8_t *rid)
{
    kvr_slice s;
    int rc = kvr_mp_read_bytes(r, &s);
    if (rc)
        return rc;
    if (s.len != KVR_REQUEST_ID_LEN)
        return KVR_EINVAL;
    memcpy(rid, s.base, KVR_REQUEST_ID_LEN);
    return 0;
}

int kvr_cmd_decode(const void *data, size_t len, kvr_cmd *cmd, kvr_route_candidate *cand,
                   kvr_err *err)
{
    int rc = 0;
    memset(cmd, 0, sizeof *cmd);
    if (len < 1)
        return kvr_err_set(err, KVR_ETRUNC, "decoding command: empty");
    if (((const uint8_t *)data)[0] != KVR_CMD_VERSION)
        return kvr_err_set(err, KVR_EUNSUPPORTED, "decoding command: version %u, want %u",
                           ((const uint8_t *)data)[0], KVR_CMD_VERSION);
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, (const uint8_t *)data + 1, len - 1);
    uint32_t n;
    uint64_t type = 0;
    CK(kvr_mp_read_array(&r, &n));
    if (n < 1) {
        rc = KVR_EINVAL;
        goto fail;
    }
    CK(kvr_mp_read_uint(&r, &type));
    cmd->type = (kvr_cmd_type)(type <= KVR_CMD_TYPE_MAX ? type : 0);
#define NEED(k)                                                                                    \
    do {                                                                                           \
        if (n < (k)) {                                                                             \
            rc = KVR_EINVAL;                                                                       \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)
    switch (type) {
    case KVR_CMD_ROUTE: {
        kvr_route_cmd *rt = &cmd->u.route;
        NEED(9);
        CK(rd_rid(&r, rt->request_id));
        CK(kvr_mp_read_uint(&r, &rt->frontend_id));
        CK(kvr_mp_read_uint(&r, &rt->now_ms));
        CK(rd_u32(&r, &rt->request_blocks));
        CK(rd_name(&r, &rt->model));
        CK(rd_name(&r, &rt->ns));
        CK(kvr_mp_read_uint(&r, &rt->pin_worker));
        uint32_t nc;
        CK(kvr_mp_read_array(&r, &nc));
        if (nc > KVR_FSM_MAX_CANDIDATES || rt->model.len > KVR_FSM_MODEL_MAX ||
            rt->ns.len > KVR_FSM_NS_MAX) {
            rc = KVR_ELIMIT;
            goto fail;
        }
        for (uint32_t i = 0; i < nc; i++) {
            uint32_t m;
            CK(kvr_mp_read_array(&r, &m));
            if (m < 2) {
                rc = KVR_EINVAL;
                goto fail;
            }
            CK(kvr_mp_read_uint(&r, &cand[i].worker_id));
            CK(rd_u32(&r, &cand[i].overlap));
            for (uint32_t j = 2; j < m; j++)
                CK(kvr_mp_skip(&r));
        }
        rt->candidates = cand;
        rt->n_candidates = nc;
        n -= 9;
        if (n > 0) { /* optional 10th field: only_candidates */
            CK(kvr_mp_read_bool(&r, &rt->only_candidates));
            n--;
        }
        if (n > 0) { /* optional 11th field: the approximate index's seq hashes */
            kvr_slice h;
            CK(kvr_mp_read_bytes(&r, &h));
            if (h.len % 8 != 0 || h.len / 8 > KVR_CMD_MAX_APPROX_HASHES) {
                rc = KVR_EINVAL;
                goto fail;
            }
            rt->approx_hashes = h.len ? (const uint8_t *)h.base : NULL;
            rt->n_approx_hashes = (uint32_t)(h.len / 8);
            n--;
        }
        if (n > 0 && kvr_mp_peek(&r) == KVR_MP_NIL) { /* 12th field absent (13th follows) */
            CK(kvr_mp_read_nil(&r));
            n--;
        } else if (n > 0) { /* optional 12th field: disaggregation parameters */
            uint32_t m;
            CK(kvr_mp_read_array(&r, &m));
            if (m < 4) {
                rc = KVR_EINVAL;
                goto fail;
            }
            CK(rd_u32(&r, &rt->tokens));
            CK(rd_u32(&r, &rt->block_size));
            CK(rd_u32(&r, &rt->max_local_prefill));
            CK(rd_u32(&r, &rt->max_prefill_queue));
            for (uint32_t j = 4; j < m; j++)
                CK(kvr_mp_skip(&r));
            rt->disagg = true;
            n--;
        }
        if (n > 0) { /* optional 13th field: the cost's weights (sync/cost.h) */
            uint32_t m;
            CK(kvr_mp_read_array(&r, &m));
            if (m < 6) {
                rc = KVR_EINVAL;
                goto fail;
            }
            CK(kvr_cmd_read_weights(&r, &rt->cost));
            for (uint32_t j = 6; j < m; j++)
                CK(kvr_mp_skip(&r));
            rt->has_cost = true;
            n--;
        }
        break;
    }
    case KVR_CMD_PREFILL_DONE:
    case KVR_CMD_FREE:
        NEED(2);
        CK(rd_rid(&r, cmd->u.request_id));
        n -= 2;
        break;
    case KVR_CMD_WORKER_UP: {
        kvr_worker_info *w = &cmd->u.worker;
        uint32_t role;
        NEED(8);
        CK(kvr_mp_read_uint(&r, &w->id));
        CK(rd_name(&r, &w->ns));
        CK(rd_name(&r, &w->model));
        CK(rd_name(&r, &w->url));
        CK(rd_u32(&r, &role));
        CK(rd_u32(&r, &w->block_size));
        CK(rd_u32(&r, &w->capacity_blocks));
        if (role > KVR_ROLE_DECODE || w->id == 0 || w->ns.len > KVR_FSM_NS_MAX ||
            w->model.len > KVR_FSM_MODEL_MAX || w->url.len > KVR_FSM_URL_MAX) {
            rc = KVR_EINVAL;
            goto fail;
        }
        w->role = (kvr_worker_role)role;
        n -= 8;
        break;
    }
    case KVR_CMD_WORKER_DOWN:
        NEED(2);
        CK(kvr_mp_read_uint(&r, &cmd->u.worker_id));
        n -= 2;
        break;
    case KVR_CMD_FRONTEND_SEEN:
    case KVR_CMD_FRONTEND_EXPIRE:
        NEED(3);
        CK(kvr_mp_read_uint(&r, &cmd->u.frontend.frontend_id));
        CK(kvr_mp_read_uint(&r, &cmd->u.frontend.now_ms));
        n -= 3;
        break;
    case KVR_CMD_EXPIRE:
        NEED(2);
        CK(kvr_mp_read_uint(&r, &cmd->u.before_ms));
        n -= 2;
        break;
    case KVR_CMD_POOL_SET: {
        kvr_pool_cmd *p = &cmd->u.pool;
        uint32_t st;
        NEED(5);
        CK(rd_name(&r, &p->ns));
        CK(rd_name(&r, &p->model));
        CK(rd_u32(&r, &st));
        CK(kvr_mp_read_uint(&r, &p->now_ms));
        if (st > KVR_POOL_STOPPING || p->ns.len > KVR_FSM_NS_MAX || p->model.len == 0 ||
            p->model.len > KVR_FSM_MODEL_MAX) {
            rc = KVR_EINVAL;
            goto fail;
        }
        p->state = (kvr_pool_state)st;
        n -= 5;
        break;
    }
    case KVR_CMD_ROUTE_POLICY: {
        kvr_policy_cmd *pc = &cmd->u.policy;
        NEED(8);
        CK(kvr_mp_read_uint(&r, &pc->set_by));
        CK(kvr_cmd_read_weights(&r, &pc->cost));
        if (!kvr_cost_params_valid(&pc->cost)) {
            rc = KVR_EINVAL;
            goto fail;
        }
        n -= 8;
        break;
    }
    default:
        rc = KVR_EINVAL;
        goto fail;
    }
#undef NEED
    /* Fields appended by later minor revisions are skipped. */
    while (n--)
        CK(kvr_mp_skip(&r));
    return 0;
fail:
    cmd->type = KVR_CMD_NONE;
    return kvr_err_set(err, rc, "decoding command (type %llu): %s", (unsigned long long)type,
                       kvr_strerror(rc));
}

kvr_cmd_type kvr_cmd_peek_type(const void *data, size_t len)
{
    const uint8_t *p = data;
    if (len < 3 || (p[1] & 0xf0) != 0x90 || p[2] > KVR_CMD_TYPE_MAX)
        return KVR_CMD_NONE;
    return (kvr_cmd_type)p[2];
}

const uint8_t *kvr_cmd_request_id(const kvr_cmd *cmd)
{
    switch (cmd->type) {
    case KVR_CMD_ROUTE:
        return cmd->u.route.request_id;
    case KVR_CMD_PREFILL_DONE:
    case KVR_CMD_FREE:
        return cmd->u.request_id;
    default:
        return NULL;
    }
}

const char *kvr_cmd_type_name(kvr_cmd_type t)
{
    static const char *names[] = {"NONE",      "ROUTE",       "PREFILL_DONE",  "FREE",
                                  "WORKER_UP", "WORKER_DOWN", "FRONTEND_SEEN", "FRONTEND_EXPIRE",
                                  "EXPIRE",    "POOL_SET",    "ROUTE_POLICY"};
    return (unsigned)t < sizeof names / sizeof *names ? names[t] : "UNKNOWN";
}

const char *kvr_pool_state_name(kvr_pool_state s)
{
    static const char *names[] = {"removed", "awake", "waking", "sleeping", "stopping"};
    return (unsigned)s < sizeof names / sizeof *names ? names[s] : "unknown";
}
