/* disagg_pull.c: kvr-worker's decode side: the KV side channel client, one pull per request
 * with do_remote_prefill (disagg.h, kv_xfer.h for the wire format). Loop thread only. */
#include "disagg_priv.h"

/* ------------------------------------------------------------------ pull */

/* A pull ended (result) and its request still waits: import what came, then run it. */
static void pull_admit(dg_pull *p, int result)
{
    wreq *r = p->r;
    worker *w = p->d->w;
    wk_dgreq *g = r->dg;
    g->pull = NULL;
    p->r = NULL;
    if (r->gone) /* the client left; the next flush frees r (never hand the engine a gone r) */
        return;
    if (result == PULL_OK && p->k > 0) {
        g->imp = malloc(sizeof(uint32_t) * p->k);
        if (g->imp)
            g->n_imp =
                kvr_engine_hold_prompt(w->eng, p->prompt, p->n_prompt, p->lora, p->k, true, g->imp);
    }
    wk_engine_idle_jump(w, wk_wall_ns(w));
    kvr_err err = {0};
    if (dg_engine_add(w, r, p->prompt, p->n_prompt, p->max_tokens, p->lora, &err) != 0) {
        /* cannot happen (the same checks passed before the pull), but answer, never leak */
        if (r->http) {
            kvr_http_req *req = r->http;
            req->data = NULL; /* r is freed below: its callbacks must not find it */
            req->on_close = NULL;
            req->on_drain = NULL;
            r->http = NULL;
            wk_respond_error(req, err.code == KVR_ENOMEM ? 500 : 400, "invalid_request_error", "%s",
                             err.msg);
        }
        wk_wreq_free(r);
        return;
    }
    wk_kick_drive(w);
}

/* A pull is freed when its last handle is closed and its resolve (a request, not a handle)
 * has called back: p->open counts both. */
static void pull_unref(dg_pull *p)
{
    if (--p->open > 0)
        return;
    kvr_buf_free(&p->reqb);
    free(p->ids);
    free(p->ext);
    free(p->prompt);
    free(p);
}

static void pull_closed(uv_handle_t *h)
{
    pull_unref(h->data);
}

void dg_pull_finish(dg_pull *p, int result)
{
    if (p->done)
        return;
    p->done = true;
    wk_dg *d = p->d;
    kvr_metric_add(d->m_pulls, (size_t)result, 1);
    if (result == PULL_OK)
        kvr_metric_observe(d->m_secs, 1, (double)(uv_hrtime() - p->t0_ns) / 1e9);
    d->n_pulls--;
    if (p->prev)
        p->prev->next = p->next;
    else
        d->pulls = p->next;
    if (p->next)
        p->next->prev = p->prev;
    p->prev = p->next = NULL;
    if (p->r)
        pull_admit(p, result);
    /* handles close (a resolve still running is cancelled; its callback then closes) */
    if (p->resolving)
        uv_cancel((uv_req_t *)&p->gai);
    uv_timer_stop(&p->timer);
    uv_close((uv_handle_t *)&p->timer, pull_closed);
    if (p->tcp_on)
        uv_close((uv_handle_t *)&p->tcp, pull_closed);
}

static void pull_fail(dg_pull *p, int result, const char *what)
{
    if (p->done)
        return;
    KVR_LOG_WARN_RL(5, "kv pull failed: recomputing the prefill",
                    "why=%s host=%s port=%s rid=%s got=%" PRIu64 "/%" PRIu64, what, p->host,
                    p->port_s, p->rid, p->got, p->total);
    dg_pull_finish(p, result);
}

static void pull_tick(uv_timer_t *t)
{
    dg_pull *p = t->data;
    if (p->done)
        return;
    int64_t now = kvr_mono_ms();
    if (now >= p->deadline_ms) {
        pull_fail(p, PULL_FAILED, "pull timeout");
        return;
    }
    if (now - p->last_ms >= DG_STALL_MS) {
        pull_fail(p, PULL_FAILED, "prefill worker stalled");
        return;
    }
    int64_t a = p->deadline_ms - now, b = DG_STALL_MS - (now - p->last_ms);
    uv_timer_start(&p->timer, pull_tick, (uint64_t)(a < b ? a : b), 0);
}

static void pull_alloc(uv_handle_t *h, size_t sug, uv_buf_t *buf)
{
    (void)sug;
    dg_pull *p = h->data;
    *buf = uv_buf_init((char *)p->rbuf, sizeof p->rbuf);
}

static void on_req_written(uv_write_t *wr, int status)
{
    dg_pull *p = wr->data;
    if (status < 0 && !p->done)
        pull_fail(p, PULL_FAILED, uv_strerror(status));
}

/* Payload bytes: check each block's header against what this prompt's block must be. */
static int pull_data(dg_pull *p, const uint8_t *in, size_t len)
{
    if (len > p->total - p->got)
        return PULL_FAILED; /* more than announced */
    while (len > 0) {
        uint32_t i = (uint32_t)(p->got / p->bpb), off = (uint32_t)(p->got % p->bpb);
        size_t take;
        if (off < KVX_BLOCK_HEAD) {
            take = KVX_BLOCK_HEAD - off;
            if (take > len)
                take = len;
            memcpy(p->bh + off, in, take);
            if (off + take == KVX_BLOCK_HEAD) {
                uint64_t ext = 0;
                uint32_t id = 0, idx = 0;
                for (int k = 0; k < 8; k++)
                    ext |= (uint64_t)p->bh[k] << (8 * k);
                for (int k = 0; k < 4; k++) {
                    id |= (uint32_t)p->bh[8 + k] << (8 * k);
                    idx |= (uint32_t)p->bh[12 + k] << (8 * k);
                }
                if (ext != p->ext[i] || id != p->ids[i] || idx != i)
                    return PULL_MISMATCH;
            }
        } else {
            take = p->bpb - off;
            if (take > len)
                take = len;
        }
        in += take;
        len -= take;
        p->got += take;
    }
    return PULL_OK;
}

static void pull_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    dg_pull *p = s->data;
    (void)buf;
    if (p->done)
        return;
    if (nread < 0) {
        pull_fail(p, PULL_FAILED,
                  nread == UV_EOF ? "prefill worker closed" : uv_strerror((int)nread));
        return;
    }
    const uint8_t *in = p->rbuf;
    size_t len = (size_t)nread;
    p->last_ms = kvr_mono_ms();
    while (len > 0 && !p->done) {
        if (p->phase < 2) {
            size_t want = (p->phase == 0 ? KVX_HELLO_LEN : KVX_RESP_LEN) - p->hgot;
            size_t take = len < want ? len : want;
            memcpy(p->hb + p->hgot, in, take);
            p->hgot += take;
            in += take;
            len -= take;
            if (p->hgot < (p->phase == 0 ? KVX_HELLO_LEN : KVX_RESP_LEN))
                break;
            p->hgot = 0;
            if (p->phase == 0) {
                if (len > 0) { /* the server speaks only after our REQ */
                    pull_fail(p, PULL_FAILED, "bytes after the hello");
                    return;
                }
                if (kvx_hello_parse(p->hb, KVX_HELLO_LEN, p->ns) != 0) {
                    pull_fail(p, PULL_FAILED, "not a KV side channel");
                    return;
                }
                kvr_buf_reset(&p->reqb);
                if (kvx_req_encode(&p->reqb, &p->d->kk, p->ns, p->rid, p->eng, p->ids, p->n_ask) !=
                    0) {
                    pull_fail(p, PULL_FAILED, "request encoding");
                    return;
                }
                memcpy(p->mac_c, p->reqb.base + p->reqb.len - KVX_MAC, KVX_MAC);
                uv_buf_t b = uv_buf_init(p->reqb.base, (unsigned)p->reqb.len);
                p->wr.data = p;
                if (uv_write(&p->wr, s, &b, 1, on_req_written) != 0) {
                    pull_fail(p, PULL_FAILED, "write");
                    return;
                }
                p->phase = 1;
                continue;
            }
            kvx_resp r;
            int rc = kvx_resp_parse(p->hb, KVX_RESP_LEN, &p->d->kk, p->ns, p->mac_c, &r);
            if (rc != 0) {
                pull_fail(p, rc == KVR_ECORRUPT ? PULL_REFUSED : PULL_FAILED,
                          rc == KVR_ECORRUPT ? "answer not signed with our secret"
                                             : "malformed answer");
                return;
            }
            if (r.status != KVX_OK) {
                pull_fail(p, PULL_REFUSED, kvx_status_name(r.status));
                return;
            }
            if (r.n != p->n_ask) {
                pull_fail(p, PULL_FAILED, "block count differs");
                return;
            }
            p->bpb = r.bytes_per_block;
            p->total = (uint64_t)r.n * r.bytes_per_block;
            p->phase = 2;
        } else {
            int rc = pull_data(p, in, len);
            if (rc != PULL_OK) {
                pull_fail(p, rc, rc == PULL_MISMATCH ? "a block is not this prompt's" : "overrun");
                return;
            }
            kvr_metric_add(p->d->m_bytes, 1, len);
            len = 0;
        }
        if (p->phase == 2 && p->got == p->total) {
            dg_pull_finish(p, PULL_OK);
            return;
        }
    }
}

static void on_pull_connect(uv_connect_t *cr, int status)
{
    dg_pull *p = cr->data;
    p->connecting = false;
    if (p->done)
        return;
    if (status < 0) {
        pull_fail(p, PULL_FAILED, uv_strerror(status));
        return;
    }
    uv_tcp_nodelay(&p->tcp, 1);
    if (uv_read_start((uv_stream_t *)&p->tcp, pull_alloc, pull_read) != 0)
        pull_fail(p, PULL_FAILED, "read");
}

static void on_pull_resolved(uv_getaddrinfo_t *g, int status, struct addrinfo *res)
{
    dg_pull *p = g->data;
    p->resolving = false;
    if (p->done || status < 0 || !res) {
        if (!p->done)
            pull_fail(p, PULL_FAILED, status < 0 ? uv_strerror(status) : "no address");
        if (res)
            uv_freeaddrinfo(res);
        pull_unref(p);
        return;
    }
    p->open--; /* the resolve's reference; the timer's keeps p (the tcp handle adds one) */
    uv_tcp_init(p->d->w->loop, &p->tcp);
    p->tcp.data = p;
    p->tcp_on = true;
    p->open++;
    p->creq.data = p;
    int rc = uv_tcp_connect(&p->creq, &p->tcp, res->ai_addr, on_pull_connect);
    uv_freeaddrinfo(res);
    if (rc != 0) {
        pull_fail(p, PULL_FAILED, uv_strerror(rc));
        return;
    }
    p->connecting = true;
}

/* ------------------------------------------------------------------ params */

static bool json_u32(const cJSON *v, uint32_t *out)
{
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 4294967295.0 ||
        v->valuedouble != (double)(int64_t)v->valuedouble)
        return false;
    *out = (uint32_t)v->valuedouble;
    return true;
}

static bool json_str(const cJSON *o, const char *k, char *out, size_t cap)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!cJSON_IsString(v) || !v->valuestring[0] || strlen(v->valuestring) >= cap)
        return false;
    snprintf(out, cap, "%s", v->valuestring);
    return true;
}

/* Decode role: do_remote_prefill params -> 0: a pull started (it adds r when it ends); else
 * r is not added yet and recomputes: a PULL_* reason to count, or -1 (already counted). */
int dg_start_pull(wk_dg *d, wreq *r, const cJSON *kvp, const uint32_t *prompt, uint32_t n,
                  uint32_t max_tokens, uint32_t lora)
{
    worker *w = d->w;
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(kvp, "remote_block_ids");
    /* vLLM's hybrid allocator sends one list per KV cache group: one group is the same */
    if (cJSON_IsArray(ids) && cJSON_GetArraySize(ids) == 1 && cJSON_IsArray(ids->child))
        ids = ids->child;
    if (!ids || cJSON_IsNull(ids) || (cJSON_IsArray(ids) && cJSON_GetArraySize(ids) == 0))
        return PULL_EMPTY; /* prompt under one block: nothing to pull (vLLM: no transfer) */
    dg_pull *p = calloc(1, sizeof *p);
    if (!p)
        return PULL_FAILED;
    int n_ids = cJSON_IsArray(ids) ? cJSON_GetArraySize(ids) : -1;
    const cJSON *port = cJSON_GetObjectItemCaseSensitive(kvp, "remote_port");
    uint32_t port_v = 0;
    if (n_ids < 1 || (uint32_t)n_ids > KVX_MAX_BLOCKS ||
        !json_str(kvp, "remote_engine_id", p->eng, sizeof p->eng) ||
        !json_str(kvp, "remote_request_id", p->rid, sizeof p->rid) ||
        !json_str(kvp, "remote_host", p->host, sizeof p->host) || !json_u32(port, &port_v) ||
        port_v < 1 || port_v > 65535) {
        free(p);
        KVR_LOG_WARN_RL(5, "invalid kv_transfer_params: recomputing the prefill", "req=%s", r->id);
        return PULL_INVALID;
    }
    uint32_t B = (uint32_t)w->o.block_size;
    p->k = (uint32_t)n_ids < n / B ? (uint32_t)n_ids : n / B;
    p->first = kvr_engine_cached_blocks(w->eng, prompt, n, lora);
    if (p->first > p->k)
        p->first = p->k;
    p->n_ask = p->k - p->first;
    p->ids = malloc(sizeof(uint32_t) * (p->n_ask ? p->n_ask : 1));
    p->ext = malloc(sizeof(uint64_t) * (p->k ? p->k : 1));
    p->prompt = malloc(sizeof(uint32_t) * n);
    if (!p->ids || !p->ext || !p->prompt) {
        free(p->ids);
        free(p->ext);
        free(p->prompt);
        free(p);
        return PULL_FAILED;
    }
    uint32_t i = 0;
    const cJSON *it;
    bool ok = true;
    cJSON_ArrayForEach(it, ids)
    {
        uint32_t v;
        if (!json_u32(it, &v)) {
            ok = false;
            break;
        }
        if (i >= p->first && i < p->k)
            p->ids[i - p->first] = v;
        i++;
    }
    if (!ok) {
        free(p->ids);
        free(p->ext);
        free(p->prompt);
        free(p);
        KVR_LOG_WARN_RL(5, "invalid kv_transfer_params: recomputing the prefill", "req=%s", r->id);
        return PULL_INVALID;
    }
    /* expected ext hash of each asked block: blocks first..k of this prompt */
    kvr_engine_prompt_ext(w->eng, prompt, n, lora, p->k, p->ext);
    memmove(p->ext, p->ext + p->first, sizeof(uint64_t) * p->n_ask);
    memcpy(p->prompt, prompt, sizeof(uint32_t) * n);
    p->n_prompt = n;
    p->max_tokens = max_tokens;
    p->lora = lora;
    p->d = d;
    p->r = r;
    snprintf(p->port_s, sizeof p->port_s, "%u", port_v);
    kvr_buf_init(&p->reqb);
    p->t0_ns = uv_hrtime();
    p->last_ms = kvr_mono_ms();
    p->deadline_ms = p->last_ms + (int64_t)(d->o->kv_pull_timeout * 1000.0);
    uv_timer_init(w->loop, &p->timer);
    p->timer.data = p;
    p->open = 1;
    p->gai.data = p;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    p->next = d->pulls;
    if (d->pulls)
        d->pulls->prev = p;
    d->pulls = p;
    d->n_pulls++;
    r->dg->pull = p;
    p->resolving = true;
    p->open++;
    int rc = uv_getaddrinfo(w->loop, &p->gai, on_pull_resolved, p->host, p->port_s, &hints);
    if (rc != 0) {
        p->resolving = false;
        p->open--;
        /* detached first: the caller adds r (admitting it from here would free r under the
         * caller if the add failed) */
        p->r = NULL;
        r->dg->pull = NULL;
        pull_fail(p, PULL_FAILED, uv_strerror(rc));
        return -1;
    }
    pull_tick(&p->timer);
    return 0;
}
