/* worker/api_writer.c: kvr-worker's responses, a JSON body or SSE chunks per request, written
 * as the engine produces tokens (api_priv.h). Loop thread. */
#include "api_priv.h"
#include "kvr_json.h"

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
void wk_append_ids(kvr_buf *b, const uint32_t *t, size_t n)
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
        wk_append_ids(b, all, na);
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
        wk_append_ids(b, toks, n);
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

int wk_list_add(wreq ***arr, size_t *n, size_t *cap, wreq *r)
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
    if (wk_list_add(&w->ready, &w->n_ready, &w->cap_ready, r) == 0)
        r->in_ready = true;
}

/* Outputs of steps whose end the wall clock has reached become ready. */
void wk_promote_future(worker *w)
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
