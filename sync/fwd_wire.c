/* fwd_wire: the forward port's frames (fwd_wire.h). */
#include "fwd_wire.h"

#include "kvr_err.h"
#include "kvr_mp.h"

#include <string.h>

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Placeholder length now, patched by frame_end once the body is written. */
static int frame_begin(kvr_buf *out, size_t *at)
{
    uint8_t z[4] = {0};
    *at = out->len;
    return kvr_buf_append(out, z, 4);
}

static int frame_end(kvr_buf *out, size_t at, int rc)
{
    size_t body = out->len - at - 4;
    if (rc == 0 && body > KVR_FWD_MAX_FRAME)
        rc = KVR_ELIMIT;
    if (rc) {
        out->len = at;
        return rc < 0 ? rc : KVR_ENOMEM;
    }
    put_be32((uint8_t *)out->base + at, (uint32_t)body);
    return 0;
}

int kvr_fwd_encode_req(kvr_buf *out, uint64_t rpc, const void *cmd, size_t cmd_len)
{
    size_t at;
    if (frame_begin(out, &at) != 0)
        return KVR_ENOMEM;
    int rc = kvr_mp_write_array(out, 3);
    rc |= kvr_mp_write_uint(out, KVR_FWD_REQ);
    rc |= kvr_mp_write_uint(out, rpc);
    rc |= kvr_mp_write_bin(out, cmd, cmd_len);
    return frame_end(out, at, rc ? KVR_ENOMEM : 0);
}

int kvr_fwd_encode_rep(kvr_buf *out, uint64_t rpc, int status, const kvr_fsm_result *r)
{
    kvr_fsm_result zero;
    if (!r) {
        memset(&zero, 0, sizeof zero);
        r = &zero;
    }
    size_t at;
    if (frame_begin(out, &at) != 0)
        return KVR_ENOMEM;
    int rc = kvr_mp_write_array(out, r->path ? 15 : r->pool_waking ? 12 : 11);
    rc |= kvr_mp_write_uint(out, KVR_FWD_REP);
    rc |= kvr_mp_write_uint(out, rpc);
    rc |= kvr_mp_write_int(out, status);
    rc |= kvr_mp_write_uint(out, r->outcome);
    rc |= kvr_mp_write_uint(out, r->type);
    rc |= kvr_mp_write_uint(out, r->worker_id);
    rc |= kvr_mp_write_uint(out, r->overlap);
    rc |= kvr_mp_write_uint(out, r->request_blocks);
    rc |= kvr_mp_write_uint(out, r->freed);
    rc |= kvr_mp_write_cstr(out, r->url);
    rc |= kvr_mp_write_double(out, r->cost);
    /* 12th field, only when needed: older frames stay byte-identical */
    if (r->pool_waking || r->path)
        rc |= kvr_mp_write_bool(out, r->pool_waking);
    if (r->path) { /* 13th-15th: a disaggregated ROUTE's path and prefill worker (fsm.h) */
        rc |= kvr_mp_write_uint(out, r->path);
        rc |= kvr_mp_write_uint(out, r->prefill_worker_id);
        rc |= kvr_mp_write_cstr(out, r->prefill_url);
    }
    return frame_end(out, at, rc ? KVR_ENOMEM : 0);
}

int kvr_fwd_frame_next(const void *p, size_t len, kvr_slice *body, size_t *used)
{
    if (len < 4)
        return 0;
    uint32_t n = get_be32(p);
    if (n > KVR_FWD_MAX_FRAME) {
        *used = n;
        return KVR_ELIMIT;
    }
    if (len - 4 < n)
        return 0;
    body->base = (const char *)p + 4;
    body->len = n;
    *used = 4 + (size_t)n;
    return 1;
}

int kvr_fwd_decode(const void *body, size_t len, kvr_fwd_msg *m)
{
    memset(m, 0, sizeof *m);
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, body, len);
    uint32_t n;
    uint64_t kind;
    if (kvr_mp_read_array(&r, &n) || n < 1 || kvr_mp_read_uint(&r, &kind))
        return KVR_EINVAL;
    if (kind != KVR_FWD_REQ && kind != KVR_FWD_REP)
        return KVR_EINVAL;
    m->kind = kind;
    if (kind == KVR_FWD_REQ) {
        if (n < 3 || kvr_mp_read_uint(&r, &m->rpc) || kvr_mp_read_bin(&r, &m->cmd))
            return KVR_EINVAL;
        return 0;
    }
    uint64_t outcome, type, worker, overlap, blocks, freed;
    kvr_slice url;
    if (n < 10 || kvr_mp_read_uint(&r, &m->rpc) || kvr_mp_read_int(&r, &m->status) ||
        kvr_mp_read_uint(&r, &outcome) || kvr_mp_read_uint(&r, &type) ||
        kvr_mp_read_uint(&r, &worker) || kvr_mp_read_uint(&r, &overlap) ||
        kvr_mp_read_uint(&r, &blocks) || kvr_mp_read_uint(&r, &freed) ||
        kvr_mp_read_str(&r, &url) || url.len > KVR_FSM_URL_MAX)
        return KVR_EINVAL;
    double cost = 0;
    bool waking = false;
    if (n >= 11 && kvr_mp_read_double(&r, &cost) != 0)
        return KVR_EINVAL; /* (sync_fwd.c read it as 0 before the codec moved here) */
    if (n >= 12 && kvr_mp_read_bool(&r, &waking) != 0)
        return KVR_EINVAL;
    uint64_t path = 0, pworker = 0;
    kvr_slice purl = {0};
    if (n >= 15 && (kvr_mp_read_uint(&r, &path) || kvr_mp_read_uint(&r, &pworker) ||
                    kvr_mp_read_str(&r, &purl) || purl.len > KVR_FSM_URL_MAX ||
                    path > KVR_DISAGG_FALLBACK))
        return KVR_EINVAL;
    m->res.outcome = (kvr_outcome)outcome;
    m->res.type = (kvr_cmd_type)type;
    m->res.worker_id = worker;
    m->res.overlap = (uint32_t)overlap;
    m->res.request_blocks = (uint32_t)blocks;
    m->res.freed = (uint32_t)freed;
    m->res.cost = cost;
    m->res.pool_waking = waking;
    m->res.path = (kvr_disagg_path)path;
    m->res.prefill_worker_id = pworker;
    if (purl.len)
        memcpy(m->res.prefill_url, purl.base, purl.len);
    m->res.prefill_url[purl.len] = 0;
    memcpy(m->res.url, url.base, url.len);
    m->res.url[url.len] = 0;
    return 0;
}
