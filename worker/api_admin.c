/* worker/api_admin.c: kvr-worker's auxiliary endpoints, GET /debug/cache and POST /tokenize
 * (api_priv.h). Loop thread. */
#include "api_priv.h"
#include "kvr_json.h"

/* GET /debug/cache: the cached blocks' kvroute seq hashes (DESIGN 2), so tests can compare
 * what the routers rebuilt from events with what the engine holds. */
static void cache_cb(void *arg, uint64_t ext, uint64_t seq, bool hp, uint64_t pe, uint32_t refs)
{
    kvr_buf *b = arg;
    kvr_buf_appendf(b, "%s\"%" PRIu64 "\"", b->base[b->len - 1] == '[' ? "" : ",", seq);
}

void wk_handle_debug_cache(worker *w, kvr_http_req *req)
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
void wk_handle_tokenize(worker *w, kvr_http_req *req)
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
    if (wk_request_tokens(w, root, msgs != NULL, &toks, &err) != 0) {
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
    wk_append_ids(&out, kvr_tok_ids(&toks), n);
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
