/* kvr-frontend: --tokenizer-fallback remote. A chat request for a model whose chat template
 * this frontend cannot render is tokenized by a live worker of its pool with vLLM's own
 * POST /tokenize (messages form); the ids it returns are what gets hashed and routed, exactly
 * as if the frontend had rendered them. kvr-worker serves the same endpoint. */
#include "fe_app.h"
#include "fe_chat.h"

#include "kvr_log.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

enum { RT_OK, RT_ERROR };

static void remote_fail(fe_call *c, int status, const char *msg)
{
    kvr_metric_add(app.m_remote_tok, RT_ERROR, 1);
    fe_http_error e;
    fe_error_set(&e, status, status == 400 ? "invalid_request_error" : "upstream_error", NULL,
                 status == 400 ? NULL : "tokenize_failed", "%s", msg);
    if (c->req) {
        respond_error(c->req, c->route, &e);
        c->req = NULL;
    }
    call_maybe_free(c);
}

static void on_tok_done(kvr_curl_req *r, int result, long status, const char *errmsg,
                        kvr_slice body)
{
    fe_call *c = kvr_curl_req_data(r);
    c->up = NULL;
    if (!c->req) {
        call_maybe_free(c);
        return;
    }
    char msg[384];
    if (result) {
        KVR_LOG_WARN_RL(2, "remote tokenize failed", "request=%s worker=%" PRIu64 " err=\"%s\"",
                        c->rid_hex, c->tok_worker_id, errmsg ? errmsg : kvr_strerror(result));
        snprintf(msg, sizeof msg, "worker %" PRIu64 " could not tokenize the chat (%s)",
                 c->tok_worker_id, kvr_strerror(result));
        remote_fail(c, 502, msg);
        return;
    }
    if (status == 400) { /* the worker's template refused this conversation: the client's fault */
        snprintf(msg, sizeof msg, "worker %" PRIu64 " refused the chat: %.*s", c->tok_worker_id,
                 (int)(body.len < 300 ? body.len : 300), body.base ? body.base : "");
        remote_fail(c, 400, msg);
        return;
    }
    if (status != 200) {
        snprintf(msg, sizeof msg, "worker %" PRIu64 " could not tokenize the chat (HTTP %ld)",
                 c->tok_worker_id, status);
        remote_fail(c, 502, msg);
        return;
    }
    kvr_err err = {0};
    kvr_buf_reset(&c->r.tokens);
    if (fe_chat_remote_parse(body.base ? body.base : "", body.len, &c->r.tokens, &err) ||
        c->r.tokens.len == 0) {
        snprintf(msg, sizeof msg, "worker %" PRIu64 ": bad /tokenize answer: %.200s",
                 c->tok_worker_id, err.msg[0] ? err.msg : "no tokens");
        remote_fail(c, 502, msg);
        return;
    }
    kvr_metric_add(app.m_remote_tok, RT_OK, 1);
    KVR_LOG_DEBUG("remote tokenize", "request=%s worker=%" PRIu64 " tokens=%zu", c->rid_hex,
                  c->tok_worker_id, c->r.tokens.len / 4);
    c->tok_next(c);
}

void fe_remote_tokenize(fe_call *c, void (*next)(fe_call *c))
{
    static const char *const hdrs[] = {"Content-Type: application/json", NULL};
    c->tok_next = next;
    fe_worker *w = fe_pool_choose_f(&app.pool, FE_MODE_LEAST, c->ns, c->pool_model, kvr_mono_ms(),
                                    false, 0, &c->filt);
    if (!w) {
        remote_fail(c, 503, "no live worker to tokenize the chat");
        return;
    }
    c->tok_worker_id = w->id;
    char url[FE_URL_MAX + 32];
    size_t ul = strlen(w->url);
    while (ul && w->url[ul - 1] == '/')
        ul--;
    snprintf(url, sizeof url, "%.*s/tokenize", (int)ul, w->url);
    kvr_curl_opts o = {
        .url = url,
        .method = "POST",
        .headers = hdrs,
        .body = c->r.remote_body.base,
        .body_len = c->r.remote_body.len,
        .connect_timeout_ms = 1000,
        .timeout_ms = 10000,
        .data = c,
        .on_done = on_tok_done,
        .max_body = 16u << 20, /* 128Ki ids as JSON */
    };
    kvr_err err = {0};
    if (kvr_curl_start(&app.curl, &o, &c->up, &err)) {
        c->up = NULL;
        remote_fail(c, 502, "could not ask a worker to tokenize the chat");
    }
}
