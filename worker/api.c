/* worker/api.c: kvr-worker's OpenAI-compatible HTTP routes and completion requests (parse,
 * tokenize, admit into the engine); responses are written by api_writer.c. Loop thread. */
#include "api_priv.h"
#include "kvr_json.h"

/* ------------------------------------------------------------------ requests */

static void on_req_gone(kvr_http_req *req)
{
    wreq *r = req->data;
    if (!r || r->gone)
        return;
    r->gone = true;
    if (r->seq) {
        kvr_engine_cancel(r->w->eng, r->seq);
        r->seq = NULL;
    }
    /* finishing the request happens in the next flush, outside the server's callback */
    wk_mark_ready(r->w, r);
    wk_kick_drive(r->w);
}

static void on_req_drain(kvr_http_req *req)
{
    wreq *r = req->data;
    if (!r || r->gone)
        return;
    r->n_ready_toks = r->in_future ? r->n_ready_toks : r->toks.len / sizeof(uint32_t);
    wk_mark_ready(r->w, r);
    wk_kick_drive(r->w);
}

/* --tokenizer: a chat through the model's own template, as vLLM renders it
 * (apply_chat_template with the request's tools, chat_template_kwargs, add_generation_prompt;
 * content parts as vLLM's content format gives them: see kvr_chat_req.vllm_content), then
 * encoded without adding special tokens: the template wrote them. */
static int model_chat_tokens(const worker *w, const cJSON *root, kvr_buf *toks, kvr_err *err)
{
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (!cJSON_IsArray(msgs))
        return kvr_err_set(err, KVR_EINVAL, "'messages' must be an array");
    int n = cJSON_GetArraySize(msgs);
    if (n < 1 || n > KVR_TOK_MAX_MESSAGES)
        return kvr_err_set(err, KVR_EINVAL, "'messages' must hold 1..%d messages",
                           KVR_TOK_MAX_MESSAGES);
    bool add_gen = true;
    int rc = kvr_json_get_bool(root, "add_generation_prompt", false, &add_gen, err);
    if (rc && rc != KVR_ENOTFOUND)
        return rc;
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(root, "tools");
    const cJSON *kw = cJSON_GetObjectItemCaseSensitive(root, "chat_template_kwargs");
    const cJSON *docs = cJSON_GetObjectItemCaseSensitive(root, "documents");
    kvr_chat_req cr = {.messages = msgs,
                       .tools = cJSON_IsArray(tools) ? tools : NULL,
                       .documents = cJSON_IsArray(docs) ? docs : NULL,
                       .kwargs = cJSON_IsObject(kw) ? kw : NULL,
                       .add_generation_prompt = add_gen,
                       .vllm_content = true};
    kvr_buf text;
    kvr_buf_init(&text);
    rc = kvr_chat_render(w->tmpl, &cr, NULL, &text, err);
    if (rc == 0)
        rc = kvr_hftok_encode(w->hf, (kvr_slice){text.base ? text.base : "", text.len}, 0, toks,
                              err);
    kvr_buf_free(&text);
    return rc;
}

/* Tokens of the request body: "prompt" (string or token-id array) or chat "messages". A
 * string prompt gets the model's special tokens unless add_special_tokens is false (vLLM's
 * default for completions and /tokenize); the byte tokenizer has none. */
int wk_request_tokens(const worker *w, const cJSON *root, bool chat, kvr_buf *toks,
                          kvr_err *err)
{
    const kvr_tokenizer *tok = w->tok_hf ? w->tok_hf : kvr_tok_byte();
    if (chat && w->hf)
        return model_chat_tokens(w, root, toks, err);
    if (!chat && w->hf) {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "prompt");
        if (cJSON_IsString(p)) {
            bool add_special = true;
            int rc = kvr_json_get_bool(root, "add_special_tokens", false, &add_special, err);
            return rc && rc != KVR_ENOTFOUND ? rc
                                             : kvr_hftok_encode(w->hf, kvr_slice_of(p->valuestring),
                                                                add_special, toks, err);
        }
    }
    if (chat) {
        const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
        if (!cJSON_IsArray(msgs))
            return kvr_err_set(err, KVR_EINVAL, "'messages' must be an array");
        int n = cJSON_GetArraySize(msgs);
        if (n < 1 || n > KVR_TOK_MAX_MESSAGES)
            return kvr_err_set(err, KVR_EINVAL, "'messages' must hold 1..%d messages",
                               KVR_TOK_MAX_MESSAGES);
        kvr_chat_msg *cm = calloc((size_t)n, sizeof *cm);
        if (!cm)
            return kvr_err_set(err, KVR_ENOMEM, "messages");
        /* content: a string, null (an assistant turn with tool calls), or an array of parts
         * of which the text ones count (OpenAI's content parts, as clients send them) */
        size_t *off = calloc((size_t)n, sizeof *off);
        kvr_buf parts;
        kvr_buf_init(&parts);
        int i = 0, rc = off ? 0 : kvr_err_set(err, KVR_ENOMEM, "messages");
        const cJSON *m;
        cJSON_ArrayForEach(m, msgs)
        {
            if (rc)
                break;
            const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
            const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
            if (!cJSON_IsString(role) ||
                !(cJSON_IsString(content) || cJSON_IsNull(content) || cJSON_IsArray(content))) {
                rc = kvr_err_set(err, KVR_EINVAL,
                                 "messages[%d] needs a string 'role' and a string, null or "
                                 "array 'content'",
                                 i);
                break;
            }
            cm[i].role = kvr_slice_of(role->valuestring);
            if (cJSON_IsString(content)) {
                cm[i].content = kvr_slice_of(content->valuestring);
            } else {
                off[i] = parts.len + 1; /* 0: no parts */
                int ntext = 0;
                const cJSON *part;
                cJSON_ArrayForEach(part, content)
                {
                    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(part, "type");
                    const cJSON *tx = cJSON_GetObjectItemCaseSensitive(part, "text");
                    if (!cJSON_IsString(ty)) {
                        rc = kvr_err_set(err, KVR_EINVAL,
                                         "messages[%d].content: a part without "
                                         "a string 'type'",
                                         i);
                        break;
                    }
                    if (strcmp(ty->valuestring, "text") != 0)
                        continue; /* images etc.: a text model has nothing to do with them */
                    if (!cJSON_IsString(tx)) {
                        rc = kvr_err_set(err, KVR_EINVAL,
                                         "messages[%d].content: a text part needs 'text'", i);
                        break;
                    }
                    /* joined with "\n", as vLLM does for a template taking string content */
                    if ((ntext++ > 0 && kvr_buf_append(&parts, "\n", 1) != 0) ||
                        kvr_buf_append_cstr(&parts, tx->valuestring) != 0)
                        rc = kvr_err_set(err, KVR_ENOMEM, "messages");
                }
                cm[i].content.len = parts.len + 1 - off[i];
            }
            i++;
        }
        for (int k = 0; rc == 0 && k < i; k++)
            if (off[k]) /* parts.base is final now */
                cm[k].content.base = parts.base ? parts.base + off[k] - 1 : "";
        kvr_buf text;
        kvr_buf_init(&text);
        if (rc == 0)
            rc = kvr_tok_chat(tok, cm, (size_t)n, 1, &text, err);
        if (rc == 0)
            rc = kvr_tok_encode(tok, (kvr_slice){text.base, text.len}, toks, err);
        kvr_buf_free(&text);
        kvr_buf_free(&parts);
        free(off);
        free(cm);
        return rc;
    }
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "prompt");
    if (cJSON_IsString(p))
        return kvr_tok_encode(tok, kvr_slice_of(p->valuestring), toks, err);
    if (!cJSON_IsArray(p))
        return kvr_err_set(err, KVR_EINVAL, "'prompt' must be a string or an array of token ids");
    int n = cJSON_GetArraySize(p);
    if ((unsigned)n > MAX_PROMPT_TOKENS)
        return kvr_err_set(err, KVR_ELIMIT, "prompt of %d tokens is over %u", n, MAX_PROMPT_TOKENS);
    if (kvr_buf_reserve(toks, (size_t)n * sizeof(uint32_t)))
        return kvr_err_set(err, KVR_ENOMEM, "prompt");
    int i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, p)
    {
        double d = it->valuedouble;
        if (!cJSON_IsNumber(it) || d < 0 || d > 2147483647.0 || d != (double)(int64_t)d)
            return kvr_err_set(err, KVR_EINVAL, "prompt[%d] is not a token id (0..2^31-1)", i);
        uint32_t t = (uint32_t)d;
        kvr_buf_append(toks, &t, sizeof t);
        i++;
    }
    return 0;
}

static void handle_completion(worker *w, kvr_http_req *req, bool chat)
{
    kvr_err err = {0};
    cJSON *root = cJSON_ParseWithLength(req->body.base, req->body.len);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        kvr_metric_inc(w->m_bad_req);
        wk_respond_error(req, 400, "invalid_request_error", "body is not a JSON object");
        return;
    }
    kvr_buf toks;
    kvr_buf_init(&toks);
    wreq *r = NULL;
    int64_t max_tokens = 16;
    const cJSON *mt =
        cJSON_GetObjectItemCaseSensitive(root, chat ? "max_completion_tokens" : "max_tokens");
    if (!mt && chat)
        mt = cJSON_GetObjectItemCaseSensitive(root, "max_tokens");
    if (mt && !cJSON_IsNull(mt)) {
        if (!cJSON_IsNumber(mt) || mt->valuedouble < 1 ||
            mt->valuedouble > (double)w->o.max_model_len ||
            mt->valuedouble != (double)(int64_t)mt->valuedouble) {
            wk_respond_error(req, 400, "invalid_request_error",
                             "max_tokens must be an integer in 1..%" PRIu64, w->o.max_model_len);
            goto bad;
        }
        max_tokens = (int64_t)mt->valuedouble;
    }
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(root, "stream");
    if (st && !cJSON_IsNull(st) && !cJSON_IsBool(st)) {
        wk_respond_error(req, 400, "invalid_request_error", "'stream' must be a boolean");
        goto bad;
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (model && !cJSON_IsNull(model) && !cJSON_IsString(model)) {
        wk_respond_error(req, 400, "invalid_request_error", "'model' must be a string");
        goto bad;
    }
    if (wk_request_tokens(w, root, chat, &toks, &err) != 0) {
        wk_respond_error(req, err.code == KVR_ENOMEM ? 500 : 400, "invalid_request_error", "%s",
                         err.msg);
        goto bad;
    }
    size_t n = kvr_tok_count(&toks);
    if (n == 0) {
        wk_respond_error(req, 400, "invalid_request_error", "empty prompt");
        goto bad;
    }
    r = calloc(1, sizeof *r);
    if (!r) {
        wk_respond_error(req, 500, "server_error", "out of memory");
        goto bad;
    }
    r->w = w;
    w->live_reqs++;
    r->lnext = w->live;
    if (w->live)
        w->live->lprev = r;
    w->live = r;
    r->http = req;
    r->chat = chat;
    r->stream = cJSON_IsTrue(st);
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    r->include_usage = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(so, "include_usage"));
    snprintf(r->model, sizeof r->model, "%s",
             cJSON_IsString(model) ? model->valuestring : w->o.model);
    snprintf(r->id, sizeof r->id, "%s-%" PRIu64 "-%" PRIu64, chat ? "chatcmpl" : "cmpl", w->o.id,
             ++w->next_req);
    r->created = kvr_now_ms() / 1000;
    r->prompt_tokens = (uint32_t)n;
    kvr_buf_init(&r->toks);
    kvr_buf_init(&r->all);
    wk_engine_idle_jump(w, wk_wall_ns(w));
    /* a request naming one of our --lora adapters runs under it (vLLM serves adapters as
     * models of their own name); any other name is the base model, as before */
    uint32_t lora = 0;
    for (uint32_t i = 0; cJSON_IsString(model) && i < w->o.n_loras; i++)
        if (strcmp(model->valuestring, w->o.loras[i]) == 0)
            lora = i + 1;
    /* disagg.c: added now, or after a KV pull (--role decode), or held when done (prefill) */
    if (wk_dg_admit(w, r, root, kvr_tok_ids(&toks), (uint32_t)n, (uint32_t)max_tokens, lora,
                    &err) != 0) {
        wk_respond_error(req, err.code == KVR_ENOMEM ? 500 : 400, "invalid_request_error", "%s",
                         err.msg);
        wk_wreq_free(r);
        goto bad;
    }
    req->data = r;
    req->on_close = on_req_gone;
    req->on_drain = on_req_drain;
    kvr_buf_free(&toks);
    cJSON_Delete(root);
    wk_kick_drive(w);
    return;
bad:
    kvr_metric_inc(w->m_bad_req);
    kvr_buf_free(&toks);
    cJSON_Delete(root);
}

static void on_pending_gone(kvr_http_req *req)
{
    preq *p = req->data;
    if (p)
        p->gone = true;
}

static void enqueue_completion(worker *w, kvr_http_req *req, bool chat)
{
    if (w->draining) {
        wk_respond_error(req, 503, "unavailable", "worker is shutting down");
        return;
    }
    preq *p = calloc(1, sizeof *p);
    if (!p) {
        wk_respond_error(req, 500, "server_error", "out of memory");
        return;
    }
    p->req = req;
    p->chat = chat;
    req->data = p;
    req->on_close = on_pending_gone;
    if (w->pend_tail)
        w->pend_tail->next = p;
    else
        w->pend_head = p;
    w->pend_tail = p;
    w->n_pend++;
    wk_kick_drive(w);
}

/* Parses and admits up to max queued requests (all with max 0). */
void wk_admit_pending(worker *w, size_t max)
{
    for (size_t k = 0; w->pend_head && (max == 0 || k < max); k++) {
        preq *p = w->pend_head;
        w->pend_head = p->next;
        if (!w->pend_head)
            w->pend_tail = NULL;
        w->n_pend--;
        kvr_http_req *req = p->req;
        req->data = NULL;
        req->on_close = NULL;
        if (p->gone || w->closing)
            wk_respond_error(req, 503, "unavailable", "client gone or worker closing");
        else
            handle_completion(w, req, p->chat);
        free(p);
    }
}

void wk_on_request(kvr_http_req *req)
{
    worker *w = req->server->data;
    bool get = kvr_slice_eq_cstr(req->method, "GET");
    bool post = kvr_slice_eq_cstr(req->method, "POST");
    if (kvr_slice_eq_cstr(req->path, "/v1/completions") && post)
        enqueue_completion(w, req, false);
    else if (kvr_slice_eq_cstr(req->path, "/v1/chat/completions") && post)
        enqueue_completion(w, req, true);
    else if (kvr_slice_eq_cstr(req->path, "/health") && get)
        kvr_http_respond_cstr(req, w->draining ? 503 : 200, "application/json",
                              w->draining ? "{\"status\":\"draining\"}" : "{\"status\":\"ok\"}");
    else if (kvr_slice_eq_cstr(req->path, "/debug/cache") && get)
        wk_handle_debug_cache(w, req);
    else if (kvr_slice_eq_cstr(req->path, "/metrics") && get)
        wk_metrics_respond(w, req);
    else if (kvr_slice_eq_cstr(req->path, "/tokenize") && post)
        wk_handle_tokenize(w, req);
    else if (kvr_slice_eq_cstr(req->path, "/v1/models") && get) {
        /* adapters are listed as vLLM lists them: models whose "parent" is the base model */
        kvr_buf body;
        kvr_buf_init(&body);
        kvr_buf_appendf(&body, "{\"object\":\"list\",\"data\":[{\"id\":\"");
        kvr_tok_json_escape(&body, w->o.model, strlen(w->o.model));
        kvr_buf_appendf(&body, "\",\"object\":\"model\",\"owned_by\":\"kvroute\"}");
        for (uint32_t i = 0; i < w->o.n_loras; i++) {
            kvr_buf_appendf(&body, ",{\"id\":\"");
            kvr_tok_json_escape(&body, w->o.loras[i], strlen(w->o.loras[i]));
            kvr_buf_appendf(&body,
                            "\",\"object\":\"model\",\"owned_by\":\"kvroute\",\"parent\":\"");
            kvr_tok_json_escape(&body, w->o.model, strlen(w->o.model));
            kvr_buf_appendf(&body, "\",\"root\":\"");
            kvr_tok_json_escape(&body, w->o.loras[i], strlen(w->o.loras[i]));
            kvr_buf_appendf(&body, "\"}");
        }
        kvr_buf_appendf(&body, "]}");
        kvr_http_respond(req, 200, "application/json", body.base, body.len);
        kvr_buf_free(&body);
    } else if (kvr_slice_eq_cstr(req->path, "/v1/completions") ||
               kvr_slice_eq_cstr(req->path, "/v1/chat/completions"))
        wk_respond_error(req, 405, "invalid_request_error", "method not allowed");
    else
        wk_respond_error(req, 404, "invalid_request_error", "no such path");
}
