/* worker/api.c: kvr-worker's OpenAI-compatible HTTP API and the loop that drives the engine's
 * simulated clock (see main.c's header for the clocks). Loop thread. */
#include "worker.h"
#include "kvr_json.h"

int64_t wk_wall_ns(worker *w)
{
    return (int64_t)(uv_hrtime() - w->t0);
}

/* ------------------------------------------------------------------ responses */

static void append_bytes(kvr_buf *b, const uint32_t *t, size_t n)
{
    char tmp[256];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (t[i] < 256)
            tmp[k++] = (char)t[i];
        if (k == sizeof tmp || i + 1 == n) {
            kvr_tok_json_escape(b, tmp, k);
            k = 0;
        }
    }
}

/* The text of output tokens r has not written yet. Byte tokenizer: the bytes. --tokenizer:
 * the model's decoding (special tokens skipped, as vLLM's skip_special_tokens default), a
 * token at a time through a stream decoder so a chunk never ends inside a UTF-8 character.
 * The engine's output ids are its own (bytes of words): with a model's vocabulary they are
 * just ids, decoded as the model would. */
static void append_text(kvr_buf *b, wreq *r, const uint32_t *t, size_t n)
{
    if (!r->w->hf) {
        append_bytes(b, t, n);
        return;
    }
    if (!r->dec_on) {
        kvr_hftok_stream_init(&r->dec, r->w->hf, 1);
        r->dec_on = true;
    }
    kvr_buf txt;
    kvr_buf_init(&txt);
    kvr_err err = {0};
    for (size_t i = 0; i < n; i++)
        if (kvr_hftok_stream_step(&r->dec, t[i], &txt, &err) != 0)
            break; /* out of memory: the ids still go out in token_ids */
    if (txt.len)
        kvr_tok_json_escape(b, txt.base, txt.len);
    kvr_buf_free(&txt);
}

/* "[1,2,3]" without printf: this runs for every token the worker streams */
static void append_ids(kvr_buf *b, const uint32_t *t, size_t n)
{
    if (kvr_buf_reserve(b, 2 + n * 11) != 0)
        return;
    char *p = b->base + b->len;
    *p++ = '[';
    for (size_t i = 0; i < n; i++) {
        if (i)
            *p++ = ',';
        char tmp[10];
        int k = 0;
        uint32_t v = t[i];
        do {
            tmp[k++] = (char)('0' + v % 10);
            v /= 10;
        } while (v);
        while (k)
            *p++ = tmp[--k];
    }
    *p++ = ']';
    b->len = (size_t)(p - b->base);
}

static void append_usage(kvr_buf *b, const wreq *r)
{
    kvr_buf_appendf(b,
                    "\"usage\":{\"prompt_tokens\":%u,\"completion_tokens\":%u,\"total_tokens\":%u,"
                    "\"prompt_tokens_details\":{\"cached_tokens\":%u}}",
                    r->prompt_tokens, r->completion_tokens, r->prompt_tokens + r->completion_tokens,
                    r->cached_tokens);
}

static void append_head(kvr_buf *b, const wreq *r, const char *object)
{
    kvr_buf_appendf(b, "{\"id\":\"%s\",\"object\":\"%s\",\"created\":%" PRId64 ",\"model\":\"",
                    r->id, object, r->created);
    kvr_tok_json_escape(b, r->model, strlen(r->model));
    kvr_buf_append_cstr(b, "\",");
}

void wk_wreq_free(wreq *r)
{
    worker *w = r->w;
    if (r->lprev)
        r->lprev->lnext = r->lnext;
    else
        w->live = r->lnext;
    if (r->lnext)
        r->lnext->lprev = r->lprev;
    w->live_reqs--;
    if (r->dg)
        wk_dg_req_free(r);
    kvr_buf_free(&r->toks);
    kvr_buf_free(&r->all);
    if (r->dec_on)
        kvr_hftok_stream_free(&r->dec);
    free(r);
}

void wk_respond_error(kvr_http_req *req, int status, const char *type, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void wk_respond_error(kvr_http_req *req, int status, const char *type, const char *fmt, ...)
{
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_buf_append_cstr(&b, "{\"error\":{\"message\":\"");
    kvr_tok_json_escape(&b, msg, strlen(msg));
    kvr_buf_appendf(&b, "\",\"type\":\"%s\",\"param\":null,\"code\":%d}}", type, status);
    if (status == 503)
        kvr_http_add_header(req, "Retry-After", "1");
    kvr_http_respond(req, status, "application/json", b.base, b.len);
    kvr_buf_free(&b);
}

/* Writes what is ready for r; finishes and frees r when it is done. Returns true if freed. */
static bool wreq_flush(wreq *r)
{
    worker *w = r->w;
    if (r->gone) {
        if (r->http) {
            if (r->started)
                kvr_http_stream_end(r->http);
            else
                kvr_http_respond(r->http, 499, NULL, NULL, 0);
            r->http = NULL;
        }
        wk_wreq_free(r);
        return true;
    }
    const uint32_t *toks = (const uint32_t *)(const void *)r->toks.base;
    size_t n = r->n_ready_toks;
    kvr_buf *b = &w->scratch;
    if (!r->stream) {
        if (n)
            kvr_buf_append(&r->all, toks, n * sizeof(uint32_t));
        kvr_buf_consume(&r->toks, n * sizeof(uint32_t));
        r->n_ready_toks = 0;
        if (!r->done_ready)
            return false;
        const uint32_t *all = (const uint32_t *)(const void *)r->all.base;
        size_t na = r->all.len / sizeof(uint32_t);
        kvr_buf_reset(b);
        append_head(b, r, r->chat ? "chat.completion" : "text_completion");
        kvr_buf_append_cstr(b, "\"choices\":[{\"index\":0,");
        if (r->chat) {
            kvr_buf_append_cstr(b, "\"message\":{\"role\":\"assistant\",\"content\":\"");
            append_text(b, r, all, na);
            kvr_buf_append_cstr(b, "\"},");
        } else {
            kvr_buf_append_cstr(b, "\"text\":\"");
            append_text(b, r, all, na);
            kvr_buf_append_cstr(b, "\",");
        }
        kvr_buf_append_cstr(b, "\"token_ids\":");
        append_ids(b, all, na);
        kvr_buf_append_cstr(b, ",\"logprobs\":null,\"finish_reason\":\"length\"}],");
        append_usage(b, r);
        if (r->dg)
            wk_dg_append_params(r, b);
        kvr_buf_append_cstr(b, "}");
        kvr_http_respond(r->http, 200, "application/json", b->base, b->len);
        r->http = NULL;
        wk_wreq_free(r);
        return true;
    }
    if (!r->started) {
        r->started = true;
        kvr_http_stream_start(r->http, 200, "text/event-stream");
    }
    /* like vLLM's --stream-interval: a chunk carries at least that many tokens (or the end) */
    if (!r->done_ready && n < w->o.stream_interval)
        return false;
    if (!r->done_ready && kvr_http_stream_should_pause(r->http))
        return false; /* on_drain brings us back; tokens wait in r->toks (bounded by max_tokens) */
    kvr_buf_reset(b);
    if (n || (r->chat && !r->role_sent)) {
        kvr_buf_append_cstr(b, "data: ");
        append_head(b, r, r->chat ? "chat.completion.chunk" : "text_completion");
        kvr_buf_append_cstr(b, "\"choices\":[{\"index\":0,");
        if (r->chat) {
            kvr_buf_append_cstr(b, "\"delta\":{");
            if (!r->role_sent) {
                kvr_buf_append_cstr(b, "\"role\":\"assistant\",");
                r->role_sent = true;
            }
            kvr_buf_append_cstr(b, "\"content\":\"");
            append_text(b, r, toks, n);
            kvr_buf_append_cstr(b, "\"},");
        } else {
            kvr_buf_append_cstr(b, "\"text\":\"");
            append_text(b, r, toks, n);
            kvr_buf_append_cstr(b, "\",");
        }
        kvr_buf_append_cstr(b, "\"token_ids\":");
        append_ids(b, toks, n);
        kvr_buf_appendf(b, ",\"logprobs\":null,\"finish_reason\":%s}]}\n\n",
                        r->done_ready ? "\"length\"" : "null");
    }
    kvr_buf_consume(&r->toks, n * sizeof(uint32_t));
    r->n_ready_toks = 0;
    if (r->done_ready) {
        if (r->include_usage) {
            kvr_buf_append_cstr(b, "data: ");
            append_head(b, r, r->chat ? "chat.completion.chunk" : "text_completion");
            kvr_buf_append_cstr(b, "\"choices\":[],");
            append_usage(b, r);
            kvr_buf_append_cstr(b, "}\n\n");
        }
        kvr_buf_append_cstr(b, "data: [DONE]\n\n");
    }
    if (b->len)
        kvr_http_stream_write(r->http, b->base, b->len);
    if (r->done_ready) {
        kvr_http_stream_end(r->http);
        r->http = NULL;
        wk_wreq_free(r);
        return true;
    }
    return false;
}

static int list_add(wreq ***arr, size_t *n, size_t *cap, wreq *r)
{
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 256;
        wreq **a = realloc(*arr, nc * sizeof *a);
        if (!a)
            return KVR_ENOMEM;
        *arr = a;
        *cap = nc;
    }
    (*arr)[(*n)++] = r;
    return 0;
}

void wk_mark_ready(worker *w, wreq *r)
{
    if (r->in_ready)
        return;
    if (list_add(&w->ready, &w->n_ready, &w->cap_ready, r) == 0)
        r->in_ready = true;
}

/* Outputs of steps whose end the wall clock has reached become ready. */
static void promote_future(worker *w)
{
    for (size_t i = 0; i < w->n_future; i++) {
        wreq *r = w->future[i];
        r->in_future = false;
        r->n_ready_toks = r->toks.len / sizeof(uint32_t);
        r->done_ready = r->done_future;
        wk_mark_ready(w, r);
    }
    w->n_future = 0;
}

void wk_flush_ready(worker *w)
{
    /* a flush never adds to `ready`, but can free entries: take the list first */
    for (size_t i = 0; i < w->n_ready; i++) {
        wreq *r = w->ready[i];
        r->in_ready = false;
        if (r->in_future) { /* more tokens due later: keep r alive until then */
            if (!r->gone)
                wreq_flush(r);
            continue;
        }
        wreq_flush(r);
    }
    w->n_ready = 0;
}

/* ------------------------------------------------------------------ driving the engine */

/* An idle engine's clock jumps to the wall clock. If its last step had started late, that
 * lag is forgiven by the jump: count it, so "how far behind" stays honest across idle gaps. */
static void engine_idle_jump(worker *w, int64_t now)
{
    if (kvr_engine_has_work(w->eng))
        return;
    if (w->lag_ns > 0)
        w->lag_erased_ns += w->lag_ns;
    w->lag_ns = 0;
    kvr_engine_idle_until(w->eng, now);
}

static void on_outputs(worker *w, const kvr_engine_output *o, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        wreq *r = o[i].data;
        if (!r)
            continue;
        r->completion_tokens++;
        r->prompt_tokens = o[i].prompt_tokens;
        r->cached_tokens = o[i].cached_tokens;
        kvr_buf_append(&r->toks, &o[i].token, sizeof(uint32_t));
        if (r->dg)
            wk_dg_on_output(w, r, &o[i]);
        if (o[i].finished) {
            r->done_future = true;
            r->seq = NULL;
        }
        if (!r->in_future && list_add(&w->future, &w->n_future, &w->cap_future, r) == 0)
            r->in_future = true;
    }
}

void wk_admit_pending(worker *w, size_t max);

static void drive(uv_timer_t *t)
{
    worker *w = t->data;
    int64_t start = wk_wall_ns(w);
    int64_t now = start;
    if (kvr_engine_now_ns(w->eng) <= now)
        promote_future(w);
    for (;;) {
        wk_admit_pending(w, 16);
        if (!kvr_engine_has_work(w->eng)) {
            engine_idle_jump(w, now);
            if (w->n_pend)
                continue;
            break;
        }
        int64_t sim = kvr_engine_now_ns(w->eng);
        if (sim > now)
            break;
        promote_future(w);
        w->lag_ns = now - sim;
        if (w->lag_ns > w->lag_max_ns)
            w->lag_max_ns = w->lag_ns;
        if (w->lag_ns > 100000000) {
            kvr_engine_stats es;
            kvr_engine_get_stats(w->eng, &es);
            KVR_LOG_WARN_RL(1, "simulated clock behind",
                            "lag_ms=%.1f since_last_drive_ms=%.1f "
                            "pending=%zu running=%u waiting=%u live=%zu",
                            (double)w->lag_ns / 1e6, (double)(start - w->last_drive_end) / 1e6,
                            w->n_pend, es.running, es.waiting, w->live_reqs);
        }
        kvr_engine_step_info info;
        const kvr_engine_output *outs;
        size_t n_outs;
        if (kvr_engine_step(w->eng, &info, &outs, &n_outs) != 0)
            KVR_LOG_ERROR_RL(5, "engine step failed", "err=\"%s\"", kvr_strerror(KVR_ENOMEM));
        on_outputs(w, outs, n_outs);
        wk_publish_engine_events(w);
        now = wk_wall_ns(w);
        if (now - start > DRIVE_BUDGET_NS)
            break;
    }
    wk_flush_ready(w);
    w->last_drive_end = wk_wall_ns(w);
    if (w->closing)
        return;
    if (kvr_engine_has_work(w->eng) || w->n_future || w->n_pend) {
        int64_t due = kvr_engine_now_ns(w->eng) - wk_wall_ns(w);
        uint64_t ms = due <= 0 || w->n_pend ? 0 : (uint64_t)((due + 999999) / 1000000);
        uv_timer_start(&w->drive_timer, drive, ms, 0);
    }
}

static void kick_drive(worker *w)
{
    if (!w->closing && !uv_is_active((uv_handle_t *)&w->drive_timer))
        uv_timer_start(&w->drive_timer, drive, 0, 0);
    else if (!w->closing && uv_timer_get_due_in(&w->drive_timer) > 0)
        uv_timer_start(&w->drive_timer, drive, 0, 0);
}

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
    kick_drive(r->w);
}

static void on_req_drain(kvr_http_req *req)
{
    wreq *r = req->data;
    if (!r || r->gone)
        return;
    r->n_ready_toks = r->in_future ? r->n_ready_toks : r->toks.len / sizeof(uint32_t);
    wk_mark_ready(r->w, r);
    kick_drive(r->w);
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
static int request_tokens(const worker *w, const cJSON *root, bool chat, kvr_buf *toks,
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
    if (request_tokens(w, root, chat, &toks, &err) != 0) {
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
    engine_idle_jump(w, wk_wall_ns(w));
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
    kick_drive(w);
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
    kick_drive(w);
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

/* GET /debug/cache: the cached blocks' kvroute seq hashes (DESIGN 2), so tests can compare
 * what the routers rebuilt from events with what the engine holds. */
static void cache_cb(void *arg, uint64_t ext, uint64_t seq, bool hp, uint64_t pe, uint32_t refs)
{
    kvr_buf *b = arg;
    kvr_buf_appendf(b, "%s\"%" PRIu64 "\"", b->base[b->len - 1] == '[' ? "" : ",", seq);
}

static void handle_debug_cache(worker *w, kvr_http_req *req)
{
    kvr_engine_stats st;
    kvr_engine_get_stats(w->eng, &st);
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_buf_appendf(&b,
                    "{\"worker_id\":%" PRIu64 ",\"block_size\":%" PRIu64 ",\"busy\":%s,"
                    "\"cached_blocks\":%u,\"used_blocks\":%u,\"seq_hashes\":[",
                    w->o.id, w->o.block_size, kvr_engine_has_work(w->eng) ? "true" : "false",
                    st.cached_blocks, st.used_blocks);
    kvr_engine_foreach_cached(w->eng, cache_cb, &b);
    kvr_buf_append_cstr(&b, "]}");
    if (!b.base)
        wk_respond_error(req, 500, "server_error", "out of memory");
    else
        kvr_http_respond(req, 200, "application/json", b.base, b.len);
    kvr_buf_free(&b);
}

/* POST /tokenize, as vLLM serves it (vllm/entrypoints/openai/serving_tokenization.py):
 * {"model"?, "prompt": str} or {"model"?, "messages": [...]} -> {"count", "max_model_len",
 * "tokens", "token_strs": null}, so a frontend's remote tokenizer fallback can ask the engine.
 * Here prompts are byte tokens and chats ChatML (the worker's own tokenizer); add_special_tokens
 * and add_generation_prompt are accepted (booleans) and change nothing: the byte tokenizer has
 * no special tokens and the chat always ends with the assistant header. Runs on the loop: the
 * byte tokenizer is a copy, and the prompt is bounded like a completion's. */
static void handle_tokenize(worker *w, kvr_http_req *req)
{
    kvr_err err = {0};
    kvr_buf toks, out;
    kvr_buf_init(&toks);
    kvr_buf_init(&out);
    /* bytes become at most one token each (plus ChatML's few per message): bound the work
     * before parsing or allocating */
    cJSON *root = NULL;
    if (req->body.len > MAX_PROMPT_TOKENS) {
        wk_respond_error(req, 413, "invalid_request_error", "body over %u bytes",
                         MAX_PROMPT_TOKENS);
        goto done;
    }
    root = cJSON_ParseWithLength(req->body.base, req->body.len);
    if (!cJSON_IsObject(root)) {
        wk_respond_error(req, 400, "invalid_request_error", "body is not a JSON object");
        goto done;
    }
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(root, "prompt");
    static const char *const bools[] = {"add_special_tokens", "add_generation_prompt"};
    for (int i = 0; i < 2; i++) {
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(root, bools[i]);
        if (b && !cJSON_IsBool(b)) {
            wk_respond_error(req, 400, "invalid_request_error", "'%s' must be a boolean", bools[i]);
            goto done;
        }
    }
    if ((msgs != NULL) == (prompt != NULL) || (prompt && !cJSON_IsString(prompt))) {
        wk_respond_error(req, 400, "invalid_request_error",
                         "give either 'prompt' (a string) or 'messages'");
        goto done;
    }
    if (request_tokens(w, root, msgs != NULL, &toks, &err) != 0) {
        wk_respond_error(req, err.code == KVR_ENOMEM ? 500 : 400, "invalid_request_error", "%s",
                         err.msg);
        goto done;
    }
    size_t n = kvr_tok_count(&toks);
    if (n > MAX_PROMPT_TOKENS) {
        wk_respond_error(req, 400, "invalid_request_error", "prompt of %zu tokens is over %u", n,
                         MAX_PROMPT_TOKENS);
        goto done;
    }
    kvr_buf_appendf(&out, "{\"count\":%zu,\"max_model_len\":%" PRIu64 ",\"tokens\":", n,
                    w->o.max_model_len);
    append_ids(&out, kvr_tok_ids(&toks), n);
    kvr_buf_append_cstr(&out, ",\"token_strs\":null}");
    if (!out.base)
        wk_respond_error(req, 500, "server_error", "out of memory");
    else
        kvr_http_respond(req, 200, "application/json", out.base, out.len);
done:
    kvr_buf_free(&toks);
    kvr_buf_free(&out);
    cJSON_Delete(root);
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
        handle_debug_cache(w, req);
    else if (kvr_slice_eq_cstr(req->path, "/metrics") && get)
        wk_metrics_respond(w, req);
    else if (kvr_slice_eq_cstr(req->path, "/tokenize") && post)
        handle_tokenize(w, req);
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

void wk_engine_idle_jump(worker *w)
{
    engine_idle_jump(w, wk_wall_ns(w));
}

void wk_kick_drive(worker *w)
{
    kick_drive(w);
}
