#include "route_msg.h"

#include "kvr_mp.h"

#include <string.h>

static int write_kv_str(kvr_buf *out, const char *key, kvr_slice v)
{
    int rc = kvr_mp_write_cstr(out, key);
    return rc ? rc : kvr_mp_write_str(out, v.base ? v.base : "", v.len);
}

static int write_kv_uint(kvr_buf *out, const char *key, uint64_t v)
{
    int rc = kvr_mp_write_cstr(out, key);
    return rc ? rc : kvr_mp_write_uint(out, v);
}

int kvr_route_req_encode(kvr_buf *out, const kvr_route_req *r)
{
    if (r->model.len > KVR_ROUTE_NAME_MAX || r->ns.len > KVR_ROUTE_NAME_MAX ||
        r->role.len > KVR_ROUTE_NAME_MAX || r->lora.len > KVR_ROUTE_NAME_MAX ||
        r->mdc_sum.len > KVR_ROUTE_NAME_MAX || r->n_hashes > UINT32_MAX)
        return KVR_EINVAL;
    int rc = kvr_mp_write_map(out, 6u + !!r->role.len + !!r->lora.len + !!r->mdc_sum.len);
    rc = rc ? rc : kvr_mp_write_cstr(out, "request_id");
    rc = rc ? rc : kvr_mp_write_bin(out, r->request_id, KVR_ROUTE_ID_LEN);
    rc = rc ? rc : write_kv_uint(out, "frontend_id", r->frontend_id);
    rc = rc ? rc : write_kv_str(out, "model", r->model);
    rc = rc ? rc : write_kv_str(out, "namespace", r->ns);
    if (r->role.len)
        rc = rc ? rc : write_kv_str(out, "role", r->role);
    rc = rc ? rc : write_kv_uint(out, "tokens", r->tokens);
    rc = rc ? rc : kvr_mp_write_cstr(out, "seq_hashes");
    rc = rc ? rc : kvr_mp_write_array(out, (uint32_t)r->n_hashes);
    for (size_t i = 0; i < r->n_hashes && !rc; i++)
        rc = kvr_mp_write_uint(out, r->seq_hashes[i]);
    /* after the hashes, so KVR_ROUTE_REQ_ID_OFFSET and older peers' view stay as they were */
    if (r->lora.len)
        rc = rc ? rc : write_kv_str(out, "lora", r->lora);
    if (r->mdc_sum.len)
        rc = rc ? rc : write_kv_str(out, "mdc_sum", r->mdc_sum);
    return rc;
}

/* A str field bounded by max bytes. */
static int read_name(kvr_mp_reader *r, kvr_slice *out, size_t max, const char *field, kvr_err *err)
{
    int rc = kvr_mp_read_str(r, out);
    if (rc)
        return kvr_err_set(err, rc, "%s: %s", field, kvr_strerror(rc));
    if (out->len > max)
        return kvr_err_set(err, KVR_ELIMIT, "%s too long (%zu bytes, at most %zu)", field, out->len,
                           max);
    return 0;
}

static int read_u32(kvr_mp_reader *r, uint32_t *out, const char *field, kvr_err *err)
{
    uint64_t v;
    int rc = kvr_mp_read_uint(r, &v);
    if (rc)
        return kvr_err_set(err, rc, "%s: %s", field, kvr_strerror(rc));
    if (v > UINT32_MAX)
        return kvr_err_set(err, KVR_ELIMIT, "%s over 2^32", field);
    *out = (uint32_t)v;
    return 0;
}

static int read_request_id(kvr_mp_reader *r, uint8_t id[KVR_ROUTE_ID_LEN], kvr_err *err)
{
    kvr_slice s;
    int rc = kvr_mp_read_bytes(r, &s);
    if (rc)
        return kvr_err_set(err, rc, "request_id: %s", kvr_strerror(rc));
    if (s.len != KVR_ROUTE_ID_LEN)
        return kvr_err_set(err, KVR_EINVAL, "request_id must be %d bytes, not %zu",
                           KVR_ROUTE_ID_LEN, s.len);
    memcpy(id, s.base, KVR_ROUTE_ID_LEN);
    return 0;
}

static int read_map_header(kvr_mp_reader *r, uint32_t *n, const char *what, kvr_err *err)
{
    int rc = kvr_mp_read_map(r, n);
    return rc ? kvr_err_set(err, rc, "%s is not a msgpack map: %s", what, kvr_strerror(rc)) : 0;
}

static int read_key(kvr_mp_reader *r, kvr_slice *k, const char *what, kvr_err *err)
{
    int rc = kvr_mp_read_str(r, k);
    return rc ? kvr_err_set(err, rc, "%s: a key is not a string: %s", what, kvr_strerror(rc)) : 0;
}

static int skip_value(kvr_mp_reader *r, kvr_slice k, kvr_err *err)
{
    int rc = kvr_mp_skip(r);
    return rc ? kvr_err_set(err, rc, "%.*s: %s", (int)(k.len > 64 ? 64 : k.len), k.base,
                            kvr_strerror(rc))
              : 0;
}

static int finish(const kvr_mp_reader *r, const char *what, kvr_err *err)
{
    if (kvr_mp_remaining(r) != 0)
        return kvr_err_set(err, KVR_EINVAL, "%s: %zu trailing bytes", what, kvr_mp_remaining(r));
    return 0;
}

int kvr_route_req_decode(const void *data, size_t len, const kvr_route_req_limits *lim,
                         uint64_t *hash_buf, kvr_route_req *o, kvr_err *err)
{
    memset(o, 0, sizeof *o);
    o->seq_hashes = hash_buf;
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, data, len);
    uint32_t n = 0;
    bool have_rid = false;
    int rc = read_map_header(&r, &n, "route request", err);
    for (uint32_t i = 0; i < n && !rc; i++) {
        kvr_slice k;
        if ((rc = read_key(&r, &k, "route request", err)))
            break;
        if (kvr_slice_eq_cstr(k, "request_id")) {
            rc = read_request_id(&r, o->request_id, err);
            have_rid = rc == 0;
        } else if (kvr_slice_eq_cstr(k, "frontend_id")) {
            if ((rc = kvr_mp_read_uint(&r, &o->frontend_id)))
                rc = kvr_err_set(err, rc, "frontend_id: %s", kvr_strerror(rc));
        } else if (kvr_slice_eq_cstr(k, "model")) {
            rc = read_name(&r, &o->model, KVR_ROUTE_NAME_MAX, "model", err);
        } else if (kvr_slice_eq_cstr(k, "namespace")) {
            rc = read_name(&r, &o->ns, KVR_ROUTE_NAME_MAX, "namespace", err);
        } else if (kvr_slice_eq_cstr(k, "role")) {
            rc = read_name(&r, &o->role, KVR_ROUTE_NAME_MAX, "role", err);
        } else if (kvr_slice_eq_cstr(k, "lora")) {
            rc = read_name(&r, &o->lora, KVR_ROUTE_NAME_MAX, "lora", err);
        } else if (kvr_slice_eq_cstr(k, "mdc_sum")) {
            rc = read_name(&r, &o->mdc_sum, KVR_ROUTE_NAME_MAX, "mdc_sum", err);
        } else if (kvr_slice_eq_cstr(k, "tokens")) {
            uint64_t u;
            if ((rc = kvr_mp_read_uint(&r, &u)))
                rc = kvr_err_set(err, rc, "tokens: %s", kvr_strerror(rc));
            else if (u > lim->max_tokens || u > UINT32_MAX)
                rc = kvr_err_set(err, KVR_ELIMIT, "too many tokens (%llu, at most %llu)",
                                 (unsigned long long)u, (unsigned long long)lim->max_tokens);
            else
                o->tokens = (uint32_t)u;
        } else if (kvr_slice_eq_cstr(k, "seq_hashes")) {
            uint32_t nh;
            if ((rc = kvr_mp_read_array(&r, &nh))) {
                rc = kvr_err_set(err, rc, "seq_hashes: %s", kvr_strerror(rc));
                break;
            }
            if (nh > lim->max_hashes) {
                rc = kvr_err_set(err, KVR_ELIMIT, "too many seq_hashes (%u, at most %zu)", nh,
                                 lim->max_hashes);
                break;
            }
            for (uint32_t j = 0; j < nh && !rc; j++)
                if ((rc = kvr_mp_read_u64bits(&r, &hash_buf[j])))
                    rc = kvr_err_set(err, rc, "seq_hashes[%u]: %s", j, kvr_strerror(rc));
            o->n_hashes = rc ? 0 : nh;
        } else {
            rc = skip_value(&r, k, err);
        }
    }
    if (rc)
        return rc;
    if (!have_rid)
        return kvr_err_set(err, KVR_EINVAL, "missing request_id");
    if (!o->model.len)
        return kvr_err_set(err, KVR_EINVAL, "missing model");
    return finish(&r, "route request", err);
}

int kvr_route_reply_encode(kvr_buf *out, const kvr_route_reply *r)
{
    int rc;
    if (!r->ok) {
        kvr_slice e = r->error;
        if (e.len > KVR_ROUTE_ERROR_MAX)
            e.len = KVR_ROUTE_ERROR_MAX;
        rc = kvr_mp_write_map(out, r->pool_waking ? 4 : 2);
        rc = rc ? rc : kvr_mp_write_cstr(out, "ok");
        rc = rc ? rc : kvr_mp_write_bool(out, false);
        if (r->pool_waking) {
            rc = rc ? rc : write_kv_str(out, "pool_state", kvr_slice_of("waking"));
            rc = rc ? rc : write_kv_uint(out, "retry_after_ms", r->retry_after_ms);
        }
        return rc ? rc : write_kv_str(out, "error", e);
    }
    if (r->url.len == 0 || r->url.len > KVR_ROUTE_URL_MAX || r->mode.len > KVR_ROUTE_NAME_MAX ||
        r->disagg.len > KVR_ROUTE_NAME_MAX || r->prefill_url.len > KVR_ROUTE_URL_MAX)
        return KVR_EINVAL;
    bool remote = kvr_slice_eq_cstr(r->disagg, "remote");
    if (remote && r->prefill_url.len == 0)
        return KVR_EINVAL;
    /* best_overlap_blocks only when it says something: replies stay byte-identical for peers
     * that predate it (decoders read its absence as overlap_blocks) */
    bool best = r->best_overlap_blocks > r->overlap_blocks;
    rc = kvr_mp_write_map(out, (r->has_view ? 8u : 6u) + best + !!r->disagg.len + 2u * remote);
    if (r->has_view) {
        rc = rc ? rc : write_kv_uint(out, "worker_bookings", r->worker_bookings);
        rc = rc ? rc : write_kv_uint(out, "decided_ns", r->decided_ns);
    }
    rc = rc ? rc : kvr_mp_write_cstr(out, "ok");
    rc = rc ? rc : kvr_mp_write_bool(out, true);
    rc = rc ? rc : write_kv_uint(out, "worker_id", r->worker_id);
    rc = rc ? rc : write_kv_str(out, "url", r->url);
    rc = rc ? rc : write_kv_uint(out, "overlap_blocks", r->overlap_blocks);
    if (best)
        rc = rc ? rc : write_kv_uint(out, "best_overlap_blocks", r->best_overlap_blocks);
    rc = rc ? rc : write_kv_uint(out, "router_id", r->router_id);
    rc = rc ? rc : write_kv_str(out, "mode", r->mode);
    if (r->disagg.len)
        rc = rc ? rc : write_kv_str(out, "disagg", r->disagg);
    if (remote) {
        rc = rc ? rc : write_kv_uint(out, "prefill_worker_id", r->prefill_worker_id);
        rc = rc ? rc : write_kv_str(out, "prefill_url", r->prefill_url);
    }
    return rc;
}

int kvr_route_reply_decode(const void *data, size_t len, kvr_route_reply *o, kvr_err *err)
{
    memset(o, 0, sizeof *o);
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, data, len);
    uint32_t n = 0;
    bool have_ok = false, have_worker = false, have_bookings = false, have_decided = false,
         have_best = false;
    int rc = read_map_header(&r, &n, "route reply", err);
    for (uint32_t i = 0; i < n && !rc; i++) {
        kvr_slice k;
        if ((rc = read_key(&r, &k, "route reply", err)))
            break;
        if (kvr_slice_eq_cstr(k, "ok")) {
            if ((rc = kvr_mp_read_bool(&r, &o->ok)))
                rc = kvr_err_set(err, rc, "ok: %s", kvr_strerror(rc));
            have_ok = rc == 0;
        } else if (kvr_slice_eq_cstr(k, "worker_id")) {
            if ((rc = kvr_mp_read_uint(&r, &o->worker_id)))
                rc = kvr_err_set(err, rc, "worker_id: %s", kvr_strerror(rc));
            have_worker = rc == 0;
        } else if (kvr_slice_eq_cstr(k, "url")) {
            rc = read_name(&r, &o->url, KVR_ROUTE_URL_MAX, "url", err);
        } else if (kvr_slice_eq_cstr(k, "mode")) {
            rc = read_name(&r, &o->mode, KVR_ROUTE_NAME_MAX, "mode", err);
        } else if (kvr_slice_eq_cstr(k, "overlap_blocks")) {
            rc = read_u32(&r, &o->overlap_blocks, "overlap_blocks", err);
        } else if (kvr_slice_eq_cstr(k, "best_overlap_blocks")) {
            rc = read_u32(&r, &o->best_overlap_blocks, "best_overlap_blocks", err);
            have_best = rc == 0;
        } else if (kvr_slice_eq_cstr(k, "router_id")) {
            rc = read_u32(&r, &o->router_id, "router_id", err);
        } else if (kvr_slice_eq_cstr(k, "worker_bookings")) {
            rc = read_u32(&r, &o->worker_bookings, "worker_bookings", err);
            have_bookings = rc == 0;
        } else if (kvr_slice_eq_cstr(k, "decided_ns")) {
            if ((rc = kvr_mp_read_uint(&r, &o->decided_ns)))
                rc = kvr_err_set(err, rc, "decided_ns: %s", kvr_strerror(rc));
            have_decided = rc == 0;
        } else if (kvr_slice_eq_cstr(k, "disagg")) {
            rc = read_name(&r, &o->disagg, KVR_ROUTE_NAME_MAX, "disagg", err);
        } else if (kvr_slice_eq_cstr(k, "prefill_worker_id")) {
            if ((rc = kvr_mp_read_uint(&r, &o->prefill_worker_id)))
                rc = kvr_err_set(err, rc, "prefill_worker_id: %s", kvr_strerror(rc));
        } else if (kvr_slice_eq_cstr(k, "prefill_url")) {
            rc = read_name(&r, &o->prefill_url, KVR_ROUTE_URL_MAX, "prefill_url", err);
        } else if (kvr_slice_eq_cstr(k, "pool_state")) {
            kvr_slice st;
            rc = read_name(&r, &st, KVR_ROUTE_NAME_MAX, "pool_state", err);
            o->pool_waking = rc == 0 && kvr_slice_eq_cstr(st, "waking");
        } else if (kvr_slice_eq_cstr(k, "retry_after_ms")) {
            rc = read_u32(&r, &o->retry_after_ms, "retry_after_ms", err);
        } else if (kvr_slice_eq_cstr(k, "error")) {
            /* A peer's error text is shown, not trusted: cut to the bound rather than refused. */
            if ((rc = kvr_mp_read_str(&r, &o->error)))
                rc = kvr_err_set(err, rc, "error: %s", kvr_strerror(rc));
            else if (o->error.len > KVR_ROUTE_ERROR_MAX)
                o->error.len = KVR_ROUTE_ERROR_MAX;
        } else {
            rc = skip_value(&r, k, err);
        }
    }
    if (rc)
        return rc;
    if (!have_ok || (o->ok && (!have_worker || !o->url.len)))
        return kvr_err_set(err, KVR_EINVAL, "route reply lacks ok/worker_id/url");
    if (o->ok && kvr_slice_eq_cstr(o->disagg, "remote") && !o->prefill_url.len)
        return kvr_err_set(err, KVR_EINVAL, "remote route reply lacks prefill_url");
    o->has_view = have_bookings && have_decided;
    if (!have_best || o->best_overlap_blocks < o->overlap_blocks)
        o->best_overlap_blocks = o->overlap_blocks;
    return finish(&r, "route reply", err);
}

const char *kvr_route_event_name(kvr_route_event_type t)
{
    switch (t) {
    case KVR_ROUTE_EVENT_PREFILL_DONE:
        return "prefill_done";
    case KVR_ROUTE_EVENT_FREE:
        return "free";
    }
    return NULL;
}

int kvr_route_event_encode(kvr_buf *out, const kvr_route_event *e)
{
    const char *name = kvr_route_event_name(e->type);
    if (!name)
        return KVR_EINVAL;
    int rc = kvr_mp_write_map(out, e->relayed ? 3 : 2);
    rc = rc ? rc : kvr_mp_write_cstr(out, "request_id");
    rc = rc ? rc : kvr_mp_write_bin(out, e->request_id, KVR_ROUTE_ID_LEN);
    rc = rc ? rc : kvr_mp_write_cstr(out, "event");
    rc = rc ? rc : kvr_mp_write_cstr(out, name);
    if (e->relayed) {
        rc = rc ? rc : kvr_mp_write_cstr(out, "relayed");
        rc = rc ? rc : kvr_mp_write_bool(out, true);
    }
    return rc;
}

int kvr_route_event_decode(const void *data, size_t len, kvr_route_event *o, kvr_err *err)
{
    memset(o, 0, sizeof *o);
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, data, len);
    uint32_t n = 0;
    bool have_rid = false;
    int rc = read_map_header(&r, &n, "route event", err);
    for (uint32_t i = 0; i < n && !rc; i++) {
        kvr_slice k, s;
        if ((rc = read_key(&r, &k, "route event", err)))
            break;
        if (kvr_slice_eq_cstr(k, "request_id")) {
            rc = read_request_id(&r, o->request_id, err);
            have_rid = rc == 0;
        } else if (kvr_slice_eq_cstr(k, "event")) {
            if ((rc = kvr_mp_read_str(&r, &s))) {
                rc = kvr_err_set(err, rc, "event: %s", kvr_strerror(rc));
            } else if (kvr_slice_eq_cstr(s, "prefill_done")) {
                o->type = KVR_ROUTE_EVENT_PREFILL_DONE;
            } else if (kvr_slice_eq_cstr(s, "free")) {
                o->type = KVR_ROUTE_EVENT_FREE;
            } else {
                rc = kvr_err_set(err, KVR_EINVAL, "unknown event \"%.*s\"",
                                 (int)(s.len > 32 ? 32 : s.len), s.base);
            }
        } else if (kvr_slice_eq_cstr(k, "relayed")) {
            if ((rc = kvr_mp_read_bool(&r, &o->relayed)))
                rc = kvr_err_set(err, rc, "relayed: %s", kvr_strerror(rc));
        } else {
            rc = skip_value(&r, k, err);
        }
    }
    if (rc)
        return rc;
    if (!have_rid || !o->type)
        return kvr_err_set(err, KVR_EINVAL, "route event lacks request_id or event");
    return finish(&r, "route event", err);
}

const char *kvr_route_target_subject(const kvr_route_target *t, int try_no, int64_t now_ms)
{
    if (t->leader_first && try_no <= 1 && now_ms >= t->skip_leader_until_ms)
        return KVR_ROUTE_LEADER_SUBJECT;
    return KVR_ROUTE_SUBJECT;
}

bool kvr_route_target_events_to_leader(const kvr_route_target *t, int64_t now_ms)
{
    return t->leader_first && now_ms >= t->skip_leader_until_ms;
}

bool kvr_route_target_no_responders(kvr_route_target *t, const char *subject, int64_t now_ms)
{
    if (subject == NULL || strcmp(subject, KVR_ROUTE_LEADER_SUBJECT) != 0)
        return false;
    t->skip_leader_until_ms = now_ms + KVR_ROUTE_LEADER_SKIP_MS;
    return true;
}
