/* disagg: kvr-worker's prefill and decode roles (see disagg.h for the protocol): request
 * admission, the prefill answer's kv_transfer_params, the metrics, start and close. The
 * prefill side's holds and side channel server are in disagg_hold.c, the decode side's pulls
 * in disagg_pull.c (kv_xfer.h for the wire format). Loop thread only. */
#include "disagg_priv.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

static const char *const SND_LABELS[] = {"ok",        "bad_secret", "unknown", "blocks",
                                         "malformed", "busy",       "failed",  NULL};
static const char *const PULL_LABELS[] = {"ok",     "empty",    "invalid",   "refused",
                                          "failed", "mismatch", "cancelled", NULL};
static const char *const HOLD_LABELS[] = {"read", "expired", "aborted", "dropped", NULL};
static const char *const DIR_LABELS[] = {"sent", "received", NULL};

static wk_dg DG;

void wk_dg_opts_default(wk_dg_opts *o)
{
    *o = (wk_dg_opts){.kv_port = 0,
                      .kv_bytes_per_block = 65536,
                      .kv_bandwidth = 1e9,
                      .kv_hold_timeout = 480,
                      .kv_pull_timeout = 30};
}

int wk_dg_opts_check(const wk_dg_opts *o, const char *role, kvr_err *err)
{
    bool both = strcmp(role, "both") == 0;
    if (!both && !o->kv_secret_file)
        return kvr_err_set(err, KVR_EINVAL,
                           "--role %s needs --kv-secret-file (the KV side channel is "
                           "authenticated; docs/SECURITY.md)",
                           role);
    if (o->kv_port > 65535)
        return kvr_err_set(err, KVR_EINVAL, "--kv-port must be in 0..65535");
    if (o->kv_bytes_per_block < KVX_BLOCK_HEAD || o->kv_bytes_per_block > KVX_MAX_BLOCK_BYTES)
        return kvr_err_set(err, KVR_EINVAL, "--kv-bytes-per-block must be in %d..%u",
                           KVX_BLOCK_HEAD, KVX_MAX_BLOCK_BYTES);
    if (!(o->kv_bandwidth >= 0) || o->kv_bandwidth > 1e12)
        return kvr_err_set(err, KVR_EINVAL, "--kv-bandwidth must be in 0..1e12 bytes/s");
    if (!(o->kv_hold_timeout > 0) || o->kv_hold_timeout > 86400)
        return kvr_err_set(err, KVR_EINVAL, "--kv-hold-timeout must be in (0, 86400] s");
    if (!(o->kv_pull_timeout > 0) || o->kv_pull_timeout > 3600)
        return kvr_err_set(err, KVR_EINVAL, "--kv-pull-timeout must be in (0, 3600] s");
    if ((o->kv_host && strlen(o->kv_host) >= 128) ||
        (o->kv_advertise && (strlen(o->kv_advertise) == 0 || strlen(o->kv_advertise) >= 128 ||
                             strpbrk(o->kv_advertise, "\"\\ \t\r\n"))))
        return kvr_err_set(err, KVR_EINVAL, "--kv-host and --kv-advertise-host: 1..127 chars");
    return 0;
}

/* ------------------------------------------------------------------ admission */

int dg_engine_add(worker *w, wreq *r, const uint32_t *prompt, uint32_t n, uint32_t max_tokens,
                  uint32_t lora, kvr_err *err)
{
    return kvr_engine_add_lora(w->eng, prompt, n, max_tokens, lora, r, &r->seq, err);
}

int wk_dg_admit(worker *w, wreq *r, const cJSON *root, const uint32_t *prompt, uint32_t n_prompt,
                uint32_t max_tokens, uint32_t lora, kvr_err *err)
{
    wk_dg *d = w->dg;
    const cJSON *kvp = cJSON_GetObjectItemCaseSensitive(root, "kv_transfer_params");
    if (!d || !cJSON_IsObject(kvp))
        return dg_engine_add(w, r, prompt, n_prompt, max_tokens, lora, err);
    if (d->prefill && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(kvp, "do_remote_decode")) &&
        !r->stream) {
        wk_dgreq *g = calloc(1, sizeof *g);
        uint32_t *cp = malloc(sizeof(uint32_t) * n_prompt);
        if (!g || !cp) {
            free(g);
            free(cp);
            return kvr_err_set(err, KVR_ENOMEM, "out of memory");
        }
        memcpy(cp, prompt, sizeof(uint32_t) * n_prompt);
        g->kind = DGR_PREFILL;
        g->prompt = cp;
        g->n_prompt = n_prompt;
        g->lora = lora;
        r->dg = g;
        return dg_engine_add(w, r, prompt, n_prompt, max_tokens, lora, err);
    }
    if (d->decode && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(kvp, "do_remote_prefill"))) {
        /* the same checks the engine makes, before anything is pulled for a request that
         * could never run */
        uint64_t total = (uint64_t)n_prompt + max_tokens;
        if (total > w->o.max_model_len || n_prompt == 0 || max_tokens == 0)
            return dg_engine_add(w, r, prompt, n_prompt, max_tokens, lora, err);
        wk_dgreq *g = calloc(1, sizeof *g);
        if (!g)
            return kvr_err_set(err, KVR_ENOMEM, "out of memory");
        g->kind = DGR_DECODE;
        r->dg = g;
        int res = dg_start_pull(d, r, kvp, prompt, n_prompt, max_tokens, lora);
        if (res == 0)
            return 0;
        if (res > 0)
            kvr_metric_add(d->m_pulls, (size_t)res, 1);
        return dg_engine_add(w, r, prompt, n_prompt, max_tokens, lora, err);
    }
    return dg_engine_add(w, r, prompt, n_prompt, max_tokens, lora, err);
}

void wk_dg_on_output(worker *w, wreq *r, const kvr_engine_output *o)
{
    wk_dgreq *g = r->dg;
    wk_dg *d = w->dg;
    if (!d || g->kind != DGR_PREFILL || !o->finished || g->held || !g->prompt)
        return;
    /* the prompt's full blocks were just released into the LRU list by this step: hold them
     * before any later step can evict one */
    uint32_t max = g->n_prompt / (uint32_t)w->o.block_size;
    uint32_t *b = malloc(sizeof(uint32_t) * (max ? max : 1));
    uint32_t *copy = malloc(sizeof(uint32_t) * (max ? max : 1));
    if (!b || !copy) {
        free(b);
        free(copy);
        return;
    }
    uint32_t n = kvr_engine_hold_prompt(w->eng, g->prompt, g->n_prompt, g->lora, max, false, b);
    memcpy(copy, b, sizeof(uint32_t) * n);
    snprintf(g->rid, sizeof g->rid, "%s", r->id);
    g->blocks = copy;
    g->n_blocks = n;
    g->held = true;
    free(g->prompt);
    g->prompt = NULL;
    if (n > 0)
        dg_hold_add(d, g->rid, b, n);
    else
        free(b);
}

void wk_dg_append_params(wreq *r, kvr_buf *b)
{
    wk_dgreq *g = r->dg;
    wk_dg *d = r->w->dg;
    if (!d || g->kind != DGR_PREFILL || !g->held)
        return;
    kvr_buf_append_cstr(b, ",\"kv_transfer_params\":{\"do_remote_prefill\":true,"
                           "\"do_remote_decode\":false,\"remote_block_ids\":[");
    for (uint32_t i = 0; i < g->n_blocks; i++)
        kvr_buf_appendf(b, "%s%u", i ? "," : "", g->blocks[i]);
    kvr_buf_appendf(b,
                    "],\"remote_engine_id\":\"%s\",\"remote_request_id\":\"%s\","
                    "\"remote_host\":\"%s\",\"remote_port\":%d,\"tp_size\":1}",
                    d->engine_id, g->rid, d->adv, d->port);
}

void wk_dg_req_free(wreq *r)
{
    wk_dgreq *g = r->dg;
    if (!g)
        return;
    r->dg = NULL;
    if (g->pull) { /* the client went away during the pull */
        dg_pull *p = g->pull;
        p->r = NULL;
        dg_pull_finish(p, PULL_CANCELLED);
    }
    if (g->n_imp)
        kvr_engine_unhold(r->w->eng, g->imp, g->n_imp);
    free(g->imp);
    free(g->prompt);
    free(g->blocks);
    free(g);
}

/* ------------------------------------------------------------------ start and close */

static void host_of(const char *listen, char *out, size_t cap)
{
    const char *colon = strrchr(listen, ':');
    size_t hl = colon ? (size_t)(colon - listen) : 0;
    if (hl == 0 || hl >= cap)
        snprintf(out, cap, "127.0.0.1");
    else
        snprintf(out, cap, "%.*s", (int)hl, listen);
    size_t l = strlen(out);
    if (l >= 2 && out[0] == '[' && out[l - 1] == ']') { /* [::1] */
        memmove(out, out + 1, l - 2);
        out[l - 2] = '\0';
    }
}

int wk_dg_start(worker *w, kvr_err *err)
{
    wk_dg *d = &DG;
    memset(d, 0, sizeof *d);
    d->w = w;
    d->o = &w->o.dg;
    d->prefill = strcmp(w->o.role, "prefill") == 0;
    d->decode = strcmp(w->o.role, "decode") == 0;
    w->dg = d;
    uv_timer_init(w->loop, &d->hold_timer);
    d->hold_timer.data = d;
    d->m_sends = kvr_metrics_counter(w->metrics, "kvr_worker_kv_sends_total",
                                     "KV side channel requests served (prefill), by result",
                                     "result", SND_LABELS);
    d->m_pulls = kvr_metrics_counter(
        w->metrics, "kvr_worker_kv_pulls_total",
        "Requests with do_remote_prefill (decode), by result; all but ok and empty recompute",
        "result", PULL_LABELS);
    d->m_bytes = kvr_metrics_counter(w->metrics, "kvr_worker_kv_transfer_bytes_total",
                                     "KV side channel payload bytes", "dir", DIR_LABELS);
    static const double secs[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                  0.25,  0.5,    1,     2.5,  5,     10,   30};
    static const char *const sides[] = {"send", "pull", NULL};
    d->m_secs = kvr_metrics_histogram(w->metrics, "kvr_worker_kv_transfer_seconds",
                                      "Whole KV transfers that succeeded, request to last byte",
                                      secs, sizeof secs / sizeof secs[0], "side", sides);
    d->m_held = kvr_metrics_gauge(w->metrics, "kvr_worker_kv_held_blocks",
                                  "Blocks held for decoders (prefill)", NULL, NULL);
    d->m_hold_n = kvr_metrics_gauge(w->metrics, "kvr_worker_kv_holds",
                                    "Finished prefill legs whose blocks are held", NULL, NULL);
    d->m_holds = kvr_metrics_counter(w->metrics, "kvr_worker_kv_holds_total",
                                     "Holds ended: read by a decoder, expired (--kv-hold-timeout), "
                                     "aborted (transfer broken), dropped (table full)",
                                     "result", HOLD_LABELS);
    if (!d->prefill && !d->decode)
        return 0;
    kvr_err kerr = {0};
    int rc = kvr_auth_key_load(&d->key, d->o->kv_secret_file, &kerr);
    if (rc)
        return kvr_err_set(err, rc, "--kv-secret-file: %s", kerr.msg);
    d->kk = (kvx_key){d->key.k, d->key.len};
    uint8_t rnd[8];
    if (RAND_bytes(rnd, sizeof rnd) != 1)
        return kvr_err_set(err, KVR_EIO, "no random bytes");
    snprintf(d->engine_id, sizeof d->engine_id,
             "kvr-worker-%" PRIu64 "-%02x%02x%02x%02x%02x%02x%02x%02x", w->o.id, rnd[0], rnd[1],
             rnd[2], rnd[3], rnd[4], rnd[5], rnd[6], rnd[7]);
    if (!d->prefill)
        return 0;
    if (d->o->kv_host)
        snprintf(d->host, sizeof d->host, "%s", d->o->kv_host);
    else
        host_of(w->o.listen, d->host, sizeof d->host);
    struct sockaddr_storage ss;
    if (uv_ip4_addr(d->host, (int)d->o->kv_port, (struct sockaddr_in *)&ss) != 0 &&
        uv_ip6_addr(d->host, (int)d->o->kv_port, (struct sockaddr_in6 *)&ss) != 0)
        return kvr_err_set(err, KVR_EINVAL, "--kv-host %s is not an IP address", d->host);
    uv_tcp_init(w->loop, &d->srv);
    d->srv.data = d;
    d->srv_on = true;
    if ((rc = uv_tcp_bind(&d->srv, (struct sockaddr *)&ss, 0)) != 0 ||
        (rc = uv_listen((uv_stream_t *)&d->srv, 128, dg_on_side_conn)) != 0)
        return kvr_err_set(err, KVR_EIO, "KV side channel %s:%" PRIu64 ": %s", d->host,
                           d->o->kv_port, uv_strerror(rc));
    struct sockaddr_storage bound;
    int blen = sizeof bound;
    uv_tcp_getsockname(&d->srv, (struct sockaddr *)&bound, &blen);
    d->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                : ((struct sockaddr_in *)&bound)->sin_port);
    if (d->o->kv_advertise)
        snprintf(d->adv, sizeof d->adv, "%s", d->o->kv_advertise);
    else if (strcmp(d->host, "0.0.0.0") == 0 || strcmp(d->host, "::") == 0)
        snprintf(d->adv, sizeof d->adv, "127.0.0.1");
    else
        snprintf(d->adv, sizeof d->adv, "%s", d->host);
    KVR_LOG_INFO("kv side channel",
                 "addr=%s port=%d remote_host=%s engine_id=%s bytes_per_block=%" PRIu64
                 " bandwidth=%g hold_timeout_s=%g",
                 d->host, d->port, d->adv, d->engine_id, d->o->kv_bytes_per_block,
                 d->o->kv_bandwidth, d->o->kv_hold_timeout);
    return 0;
}

static void noop_closed(uv_handle_t *h)
{
    (void)h;
}

void wk_dg_close(worker *w)
{
    wk_dg *d = w->dg;
    if (!d || d->closing)
        return;
    d->closing = true;
    while (d->pulls) /* requests were freed first; whatever is left is abandoned */
        dg_pull_finish(d->pulls, PULL_CANCELLED);
    while (d->conns)
        dg_conn_close(d->conns);
    while (d->fhead) {
        dg_hold *h = d->fhead;
        dg_hold_unlink(d, h);
        dg_hold_release(d, h, HOLD_DROPPED);
    }
    uv_timer_stop(&d->hold_timer);
    uv_close((uv_handle_t *)&d->hold_timer, noop_closed);
    if (d->srv_on)
        uv_close((uv_handle_t *)&d->srv, noop_closed);
    OPENSSL_cleanse(&d->key, sizeof d->key);
}

uint32_t wk_dg_waiting(const worker *w)
{
    return w->dg ? w->dg->n_pulls : 0;
}
