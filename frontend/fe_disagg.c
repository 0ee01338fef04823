/* kvr-frontend: the two legs of a disaggregated request (issue 15 item 3), vLLM's proxy
 * protocol (its NixlConnector toy proxy; worker/README.md "Prefill and decode roles").
 *
 * When the route reply says "disagg":"remote" it also names a prefill worker, booked in the
 * same replicated decision as the decode worker (sync/fsm.h "Disaggregation"). Before the
 * usual upstream transfer to the decode worker, the frontend POSTs the prefill leg to the
 * prefill worker's same endpoint: the client's body with stream:false, max_tokens:1,
 * max_completion_tokens:1, no stream_options/min_tokens, and kv_transfer_params =
 * {do_remote_decode:true, do_remote_prefill:false, remote_*: null}. The JSON answer's
 * kv_transfer_params then go, as they are, into the decode leg (the original body plus those
 * params), which streams to the client as any request does. Both legs carry the same
 * X-Request-Id. A prefill leg that fails in any way (connect, status, stall, no params)
 * leaves the decode leg without params: the decode worker computes the prefill itself and the
 * client sees no error. The prefill worker's booking is freed by the request's prefill_done,
 * published when the prefill leg ends (fe_call_prefill_done; the first token would not send it
 * again), or free.
 *
 * kv_transfer_params from a client are never forwarded (docs/SECURITY.md 5d: they make a
 * decode worker connect anywhere): fe_disagg_strip drops them from every forwarded body.
 *
 * kvr_frontend_disagg_requests_total{path}: remote (the prefill leg gave params), local (the
 * router kept the prefill on the decode worker), fallback (no prefill worker live, or the
 * prefill leg failed). Loop thread only. */
#define _GNU_SOURCE /* memmem */
#include "fe_app.h"

#include "kvr_log.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { DG_NONE, DG_DUE, DG_RUNNING, DG_DONE };
enum { PATH_REMOTE, PATH_LOCAL, PATH_FALLBACK };
static const char *path_labels[] = {"remote", "local", "fallback", NULL};
static kvr_metric *m_disagg;

/* A prefill answer is one short completion: anything larger is not one. */
#define PREFILL_ANSWER_MAX (1u << 20)

#define PREFILL_PARAMS                                                                             \
    "{\"do_remote_decode\":true,\"do_remote_prefill\":false,\"remote_engine_id\":null,"            \
    "\"remote_block_ids\":null,\"remote_host\":null,\"remote_port\":null}"

int fe_disagg_metrics(kvr_metrics *m)
{
    m_disagg = kvr_metrics_counter(m, "kvr_frontend_disagg_requests_total",
                                   "disaggregated requests by the path their prefill took", "path",
                                   path_labels);
    return m_disagg ? 0 : KVR_ENOMEM;
}

int fe_disagg_strip(fe_call *c)
{
    if (!c->r.has_kv_params) /* the request parser saw the key, however spelled */
        return 0;
    cJSON *root = cJSON_ParseWithLength(c->upbody.base, c->upbody.len);
    if (!root)
        return 0; /* the request parser accepted it: cannot happen; the worker will refuse */
    bool had = false;
    while (cJSON_GetObjectItemCaseSensitive(root, "kv_transfer_params")) {
        cJSON_DeleteItemFromObjectCaseSensitive(root, "kv_transfer_params");
        had = true;
    }
    int rc = 0;
    if (had) {
        char *s = cJSON_PrintUnformatted(root);
        if (!s) {
            rc = KVR_ENOMEM;
        } else {
            kvr_buf_reset(&c->upbody);
            rc = kvr_buf_append_cstr(&c->upbody, s);
            free(s);
        }
        KVR_LOG_INFO("client kv_transfer_params dropped", "request=%s", c->rid_hex);
    }
    cJSON_Delete(root);
    return rc;
}

void fe_disagg_on_route(fe_call *c, const kvr_route_reply *rep)
{
    c->dg_state = DG_NONE;
    if (kvr_slice_eq_cstr(rep->disagg, "local")) {
        kvr_metric_add(m_disagg, PATH_LOCAL, 1);
    } else if (kvr_slice_eq_cstr(rep->disagg, "fallback")) {
        kvr_metric_add(m_disagg, PATH_FALLBACK, 1);
    } else if (kvr_slice_eq_cstr(rep->disagg, "remote")) {
        if (rep->prefill_url.len == 0 || rep->prefill_url.len >= sizeof c->prefill_url) {
            kvr_metric_add(m_disagg, PATH_FALLBACK, 1);
            return;
        }
        memcpy(c->prefill_url, rep->prefill_url.base, rep->prefill_url.len);
        c->prefill_url[rep->prefill_url.len] = '\0';
        c->prefill_worker_id = rep->prefill_worker_id;
        c->dg_state = DG_DUE;
    }
}

/* The prefill leg's body from the decode leg's (c->upbody). */
static int prefill_body(const fe_call *c, kvr_buf *out)
{
    if (!app.forward_body) {
        /* fe_upstream_body's layout: {"model":<str>,"stream":true,...,"prompt":[ids]}. Inside
         * a JSON string every quote is escaped, so the first `,"stream":` and `,"prompt":[`
         * are the keys. */
        const char *b = c->upbody.base;
        size_t n = c->upbody.len;
        const char *st = memmem(b, n, ",\"stream\":", 10);
        const char *pr = memmem(b, n, ",\"prompt\":[", 11);
        if (!st || !pr || pr < st)
            return KVR_EINVAL;
        int rc = kvr_buf_append(out, b, (size_t)(st - b));
        rc = rc ? rc
                : kvr_buf_append_cstr(
                      out, ",\"stream\":false,\"max_tokens\":1,"
                           "\"max_completion_tokens\":1,\"kv_transfer_params\":" PREFILL_PARAMS);
        return rc ? rc : kvr_buf_append(out, pr, n - (size_t)(pr - b));
    }
    cJSON *root = cJSON_ParseWithLength(c->upbody.base, c->upbody.len);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return KVR_EINVAL;
    }
    static const char *drop[] = {"stream",     "stream_options",        "min_tokens",
                                 "max_tokens", "max_completion_tokens", "kv_transfer_params"};
    for (size_t i = 0; i < sizeof drop / sizeof *drop; i++)
        while (cJSON_GetObjectItemCaseSensitive(root, drop[i]))
            cJSON_DeleteItemFromObjectCaseSensitive(root, drop[i]);
    cJSON *kvp = cJSON_Parse(PREFILL_PARAMS);
    bool ok = kvp && cJSON_AddBoolToObject(root, "stream", 0) &&
              cJSON_AddNumberToObject(root, "max_tokens", 1) &&
              cJSON_AddNumberToObject(root, "max_completion_tokens", 1) &&
              cJSON_AddItemToObject(root, "kv_transfer_params", kvp);
    if (!ok && kvp && !cJSON_GetObjectItemCaseSensitive(root, "kv_transfer_params"))
        cJSON_Delete(kvp);
    char *s = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (!s)
        return KVR_ENOMEM;
    int rc = kvr_buf_append_cstr(out, s);
    free(s);
    return rc;
}

/* Adds "kv_transfer_params":<params> to the JSON object in c->upbody, before its closing
 * brace (the body holds none: fe_disagg_strip, fe_upstream_body). */
static int add_params(fe_call *c, const char *params)
{
    kvr_buf *b = &c->upbody;
    size_t end = b->len;
    while (end && b->base[end - 1] != '}')
        end--;
    if (!end)
        return KVR_EINVAL;
    size_t p = end - 1; /* the closing brace */
    size_t q = p;
    while (q && (b->base[q - 1] == ' ' || b->base[q - 1] == '\n' || b->base[q - 1] == '\t' ||
                 b->base[q - 1] == '\r'))
        q--;
    bool empty = q && b->base[q - 1] == '{';
    kvr_buf nb;
    kvr_buf_init(&nb);
    int rc = kvr_buf_append(&nb, b->base, p);
    rc = rc ? rc
            : kvr_buf_append_cstr(&nb,
                                  empty ? "\"kv_transfer_params\":" : ",\"kv_transfer_params\":");
    rc = rc ? rc : kvr_buf_append_cstr(&nb, params);
    rc = rc ? rc : kvr_buf_append(&nb, b->base + p, b->len - p);
    if (rc) {
        kvr_buf_free(&nb);
        return rc;
    }
    kvr_buf_free(b);
    *b = nb;
    return 0;
}

static void prefill_failed(fe_call *c, const char *why)
{
    kvr_metric_add(m_disagg, PATH_FALLBACK, 1);
    KVR_LOG_WARN_RL(2, "prefill leg failed: the decode worker computes the prefill",
                    "request=%s prefill_worker=%" PRIu64 " err=\"%s\"", c->rid_hex,
                    c->prefill_worker_id, why);
}

static void on_prefill_done(kvr_curl_req *r, int result, long status, const char *errmsg,
                            kvr_slice body)
{
    fe_call *c = kvr_curl_req_data(r);
    c->up = NULL;
    c->dg_state = DG_DONE;
    if (!c->req || c->client_gone) {
        call_maybe_free(c);
        return;
    }
    int64_t t1 = kvr_mono_ns();
    /* The prefill worker's part is over (computed, or failed): its booking ends now, not at
     * the decode leg's first token — else the transfer and the decode worker's queue count
     * as outstanding prefills against --max-prefill-queue, and under load the routers keep
     * long prompts on the decode workers. */
    fe_call_prefill_done(c);
    char why[160];
    cJSON *root = NULL;
    char *params = NULL;
    if (result != 0) {
        snprintf(why, sizeof why, "%s", errmsg ? errmsg : kvr_strerror(result));
    } else if (status != 200) {
        snprintf(why, sizeof why, "HTTP %ld", status);
    } else if (!(root = cJSON_ParseWithLength(body.base, body.len))) {
        snprintf(why, sizeof why, "answer is not JSON");
    } else {
        const cJSON *kvp = cJSON_GetObjectItemCaseSensitive(root, "kv_transfer_params");
        if (!cJSON_IsObject(kvp))
            snprintf(why, sizeof why, "answer has no kv_transfer_params");
        else if (!(params = cJSON_PrintUnformatted(kvp)))
            snprintf(why, sizeof why, "out of memory");
    }
    cJSON_Delete(root);
    if (params && add_params(c, params) == 0)
        kvr_metric_add(m_disagg, PATH_REMOTE, 1);
    else
        prefill_failed(c, params ? "out of memory" : why);
    free(params);
    /* the leg's time at the prefill worker, and the frontend's own work for both legs (body
     * building, answer parsing, params splicing): the two-leg overhead (bench_disagg.sh) */
    c->dg_work_ns += kvr_mono_ns() - t1;
    KVR_LOG_DEBUG("prefill leg done",
                  "request=%s prefill_worker=%" PRIu64 " leg_us=%" PRId64 " frontend_us=%" PRId64,
                  c->rid_hex, c->prefill_worker_id, (t1 - c->dg_t0_ns) / 1000,
                  c->dg_work_ns / 1000);
    start_upstream(c); /* the decode leg */
}

bool fe_disagg_start(fe_call *c)
{
    if (c->dg_state != DG_DUE)
        return false;
    c->dg_state = DG_RUNNING;
    int64_t t0 = kvr_mono_ns();
    kvr_buf pb;
    kvr_buf_init(&pb);
    if (prefill_body(c, &pb) != 0) {
        kvr_buf_free(&pb);
        c->dg_state = DG_DONE;
        prefill_failed(c, "prefill body not built");
        return false;
    }
    char url[FE_URL_MAX + 32], xrid[64];
    size_t ul = strlen(c->prefill_url);
    while (ul && c->prefill_url[ul - 1] == '/')
        ul--;
    snprintf(url, sizeof url, "%.*s%s", (int)ul, c->prefill_url,
             app.forward_body && c->route == R_CHAT ? "/v1/chat/completions" : "/v1/completions");
    snprintf(xrid, sizeof xrid, "X-Request-Id: %s", c->rid_hex);
    const char *hdrs[] = {"Content-Type: application/json", "Accept: application/json", xrid, NULL};
    kvr_curl_opts o = {
        .url = url,
        .method = "POST",
        .headers = hdrs,
        .body = pb.base,
        .body_len = pb.len,
        .connect_timeout_ms = 1000,
        .stall_timeout_ms = app.upstream_stall_ms,
        .data = c,
        .on_done = on_prefill_done,
        .max_body = PREFILL_ANSWER_MAX,
    };
    kvr_err err = {0};
    int rc = kvr_curl_start(&app.curl, &o, &c->up, &err);
    kvr_buf_free(&pb);
    c->dg_t0_ns = kvr_mono_ns();
    c->dg_work_ns = c->dg_t0_ns - t0;
    if (rc) {
        c->up = NULL;
        c->dg_state = DG_DONE;
        prefill_failed(c, err.msg);
        return false;
    }
    return true;
}
