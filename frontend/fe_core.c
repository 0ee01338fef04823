/* fe_core: OpenAI request parsing, error JSON and stream rewriting. See fe_core.h. */
#include "fe_core.h"
#include "fe_chat.h"
#include "kvr_json.h"
#include "kvr_hftok.h"

#include "kvr_access.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void fe_req_init(fe_req *r)
{
    memset(r, 0, sizeof *r);
    r->max_tokens = -1;
    kvr_buf_init(&r->tokens);
    kvr_buf_init(&r->remote_body);
}

void fe_req_free(fe_req *r)
{
    kvr_buf_free(&r->tokens);
    kvr_buf_free(&r->remote_body);
}

void fe_error_set(fe_http_error *e, int status, const char *type, const char *param,
                  const char *code, const char *fmt, ...)
{
    e->status = status;
    e->type = type;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    snprintf(e->code, sizeof e->code, "%s", code ? code : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

static int json_str(kvr_buf *out, const char *s)
{
    if (kvr_buf_append(out, "\"", 1) || kvr_tok_json_escape(out, s, strlen(s)) ||
        kvr_buf_append(out, "\"", 1))
        return KVR_ENOMEM;
    return 0;
}

static int json_str_or_null(kvr_buf *out, const char *s)
{
    if (!s || !*s)
        return kvr_buf_append_cstr(out, "null");
    return json_str(out, s);
}

int fe_error_json(kvr_buf *out, const fe_http_error *e)
{
    int rc = kvr_buf_append_cstr(out, "{\"error\":{\"message\":");
    rc = rc ? rc : json_str(out, e->message);
    rc = rc ? rc : kvr_buf_append_cstr(out, ",\"type\":");
    rc = rc ? rc : json_str(out, e->type ? e->type : "invalid_request_error");
    rc = rc ? rc : kvr_buf_append_cstr(out, ",\"param\":");
    rc = rc ? rc : json_str_or_null(out, e->param);
    rc = rc ? rc : kvr_buf_append_cstr(out, ",\"code\":");
    rc = rc ? rc : json_str_or_null(out, e->code);
    rc = rc ? rc : kvr_buf_append_cstr(out, "}}");
    return rc;
}

#define BAD(param, ...)                                                                            \
    do {                                                                                           \
        fe_error_set(e, 400, "invalid_request_error", (param), NULL, __VA_ARGS__);                 \
        rc = KVR_EINVAL;                                                                           \
        goto out;                                                                                  \
    } while (0)

static bool as_token_id(const cJSON *it, uint32_t *v)
{
    if (!cJSON_IsNumber(it))
        return false;
    double d = it->valuedouble;
    if (!(d >= 0 && d <= 4294967295.0) || floor(d) != d)
        return false;
    *v = (uint32_t)d;
    return true;
}

/* Text of a chat message's content: a string, or an array of {"type":"text","text":…} parts
 * (concatenated). Non-text parts are refused. */
static int chat_content(const cJSON *c, kvr_buf *tmp, kvr_slice *out)
{
    if (cJSON_IsString(c)) {
        *out = kvr_slice_of(c->valuestring);
        return 0;
    }
    if (cJSON_IsNull(c)) {
        *out = (kvr_slice){"", 0};
        return 0;
    }
    if (!cJSON_IsArray(c))
        return KVR_ETYPE;
    /* vLLM, for a template that takes string content (ChatML's {{ message.content }}), joins
     * the text parts with "\n" (chat_utils: text_prompt = "\n".join(texts)): the same prompt,
     * so the same tokens and block hashes as the engine computes */
    size_t start = tmp->len;
    const cJSON *part;
    cJSON_ArrayForEach(part, c)
    {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") != 0 ||
            !cJSON_IsString(text))
            return KVR_ETYPE;
        if ((part != c->child && kvr_buf_append(tmp, "\n", 1)) ||
            kvr_buf_append_cstr(tmp, text->valuestring))
            return KVR_ENOMEM;
    }
    /* tmp may move on later appends: callers render each message before the next. */
    *out = (kvr_slice){tmp->base ? tmp->base + start : "", tmp->len - start};
    return 0;
}

/* Upper bound on the number of values in a JSON text (separators outside strings), in one
 * linear pass: stops counting past max. */
static size_t json_values_bound(const char *s, size_t n, size_t max)
{
    size_t count = 1;
    bool in_str = false;
    for (size_t i = 0; i < n && count <= max; i++) {
        char ch = s[i];
        if (in_str) {
            if (ch == '\\')
                i++;
            else if (ch == '"')
                in_str = false;
        } else if (ch == '"') {
            in_str = true;
        } else if (ch == ',' || ch == ':' || ch == '[' || ch == '{') {
            count++;
        }
    }
    return count;
}

static fe_tok_lookup_fn tok_lookup;

void fe_set_tok_lookup(fe_tok_lookup_fn f)
{
    tok_lookup = f;
}

int fe_parse_request(const char *body, size_t len, bool is_chat, const kvr_tokenizer *tok,
                     fe_req *r, fe_http_error *e)
{
    int rc = 0;
    kvr_err kerr = {0};
    kvr_buf text, tmp;
    kvr_buf_init(&text);
    kvr_buf_init(&tmp);
    r->is_chat = is_chat;
    const char *end = NULL;
    cJSON *root = NULL;
    /* A tree costs ~64 bytes a value: a body of millions of small values (a token array far
     * over the bound) is refused before one is built. */
    if (json_values_bound(body, len, FE_MAX_JSON_VALUES) > FE_MAX_JSON_VALUES)
        BAD(NULL, "The request body has too many JSON values (max %u tokens).",
            FE_MAX_PROMPT_TOKENS);
    root = cJSON_ParseWithLengthOpts(body, len, &end, false);
    /* Only whitespace may follow the value. */
    while (root && end && end < body + len &&
           (*end == ' ' || *end == '\n' || *end == '\r' || *end == '\t'))
        end++;
    if (root && end != body + len) {
        cJSON_Delete(root);
        root = NULL;
    }
    if (!root)
        BAD(NULL, "We could not parse the JSON body of your request. (HINT: This likely means "
                  "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                  "payload.)");
    if (!cJSON_IsObject(root))
        BAD(NULL, "The request body must be a JSON object.");

    r->has_kv_params = cJSON_GetObjectItemCaseSensitive(root, "kv_transfer_params") != NULL;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!model)
        BAD("model", "you must provide a model parameter");
    if (!cJSON_IsString(model))
        BAD("model", "'model' must be a string");
    if (strlen(model->valuestring) == 0 || strlen(model->valuestring) >= FE_MODEL_MAX)
        BAD("model", "'model' must be 1..%d bytes", FE_MODEL_MAX - 1);
    snprintf(r->model, sizeof r->model, "%s", model->valuestring);
    if (tok_lookup)
        tok = tok_lookup(r->model, tok);

    const cJSON *stream = cJSON_GetObjectItemCaseSensitive(root, "stream");
    if (stream && !cJSON_IsNull(stream)) {
        if (!cJSON_IsBool(stream))
            BAD("stream", "'stream' must be a boolean");
        r->stream = cJSON_IsTrue(stream);
    }
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    if (so && !cJSON_IsNull(so)) {
        if (!cJSON_IsObject(so))
            BAD("stream_options", "'stream_options' must be an object");
        const cJSON *iu = cJSON_GetObjectItemCaseSensitive(so, "include_usage");
        if (iu && !cJSON_IsNull(iu)) {
            if (!cJSON_IsBool(iu))
                BAD("stream_options.include_usage", "'include_usage' must be a boolean");
            r->include_usage = cJSON_IsTrue(iu);
        }
    }
    const char *mt_names[2] = {"max_tokens", "max_completion_tokens"};
    for (int i = 0; i < 2; i++) {
        const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, mt_names[i]);
        if (!mt || cJSON_IsNull(mt))
            continue;
        if (!cJSON_IsNumber(mt) || floor(mt->valuedouble) != mt->valuedouble)
            BAD(mt_names[i], "'%s' must be an integer", mt_names[i]);
        if (mt->valuedouble < 1 || mt->valuedouble > 1e9)
            BAD(mt_names[i], "'%s' must be between 1 and 1000000000", mt_names[i]);
        r->max_tokens = (int64_t)mt->valuedouble;
    }
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(root, "n");
    if (n && !cJSON_IsNull(n) && !(cJSON_IsNumber(n) && n->valuedouble == 1))
        BAD("n", "only n=1 is supported");

    if (!is_chat) {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "prompt");
        if (!p)
            BAD("prompt", "you must provide a prompt parameter");
        /* A one-element array holding a string or a token array is the same prompt. */
        if (cJSON_IsArray(p) && cJSON_GetArraySize(p) == 1 &&
            (cJSON_IsString(p->child) || cJSON_IsArray(p->child)))
            p = p->child;
        if (cJSON_IsString(p)) {
            size_t pl = strlen(p->valuestring);
            if (pl > FE_MAX_PROMPT_BYTES)
                BAD("prompt", "prompt too long (%zu bytes, max %u)", pl, FE_MAX_PROMPT_BYTES);
            /* a completions prompt gets the model's special tokens (add_special_tokens=True,
             * as vLLM does); the byte tokenizer has none */
            const kvr_hftok *hf = kvr_tok_hf(tok);
            if (hf ? kvr_hftok_encode(hf, (kvr_slice){p->valuestring, pl}, 1, &r->tokens, &kerr)
                   : kvr_tok_encode(tok, (kvr_slice){p->valuestring, pl}, &r->tokens, &kerr))
                BAD("prompt", "tokenizing prompt: %s", kerr.msg);
        } else if (cJSON_IsArray(p)) {
            int cnt = cJSON_GetArraySize(p);
            if (cnt == 0)
                BAD("prompt", "'prompt' must not be empty");
            if ((unsigned)cnt > FE_MAX_PROMPT_TOKENS)
                BAD("prompt", "prompt too long (%d tokens)", cnt);
            if (kvr_buf_reserve(&r->tokens, (size_t)cnt * 4))
                BAD("prompt", "out of memory");
            const cJSON *it;
            int i = 0;
            cJSON_ArrayForEach(it, p)
            {
                uint32_t v;
                if (!as_token_id(it, &v))
                    BAD("prompt", "'prompt' array element %d is not a token id (integer 0..2^32-1)",
                        i);
                memcpy(r->tokens.base + r->tokens.len, &v, 4);
                r->tokens.len += 4;
                i++;
            }
        } else {
            BAD("prompt", "'prompt' must be a string or an array of token ids");
        }
    } else {
        /* A model with a Hugging Face tokenizer renders its own chat template (fe_chat.h). */
        int hrc = fe_chat_tokens(r->model, root, &r->tokens, e);
        if (hrc < 0) {
            rc = hrc;
            goto out;
        }
        if (hrc == FE_CHAT_NEEDS_REMOTE) {
            if (fe_chat_remote_body(root, &r->remote_body))
                BAD(NULL, "out of memory");
            r->remote_tok = true;
            goto out;
        }
        if (hrc == FE_CHAT_DONE)
            goto counted;
        const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
        if (!msgs)
            BAD("messages", "you must provide a messages parameter");
        if (!cJSON_IsArray(msgs))
            BAD("messages", "'messages' must be an array");
        int cnt = cJSON_GetArraySize(msgs);
        if (cnt == 0)
            BAD("messages", "'messages' must not be empty");
        if (cnt > KVR_TOK_MAX_MESSAGES)
            BAD("messages", "too many messages (%d, max %d)", cnt, KVR_TOK_MAX_MESSAGES);
        const cJSON *m;
        int i = 0;
        cJSON_ArrayForEach(m, msgs)
        {
            if (!cJSON_IsObject(m))
                BAD("messages", "messages[%d] must be an object", i);
            const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
            if (!cJSON_IsString(role))
                BAD("messages", "messages[%d].role must be a string", i);
            const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
            kvr_chat_msg cm = {.role = kvr_slice_of(role->valuestring)};
            kvr_buf_reset(&tmp);
            int crc = content ? chat_content(content, &tmp, &cm.content) : KVR_ETYPE;
            if (crc == KVR_ENOMEM)
                BAD("messages", "out of memory");
            if (crc)
                BAD("messages", "messages[%d].content must be a string or an array of text parts",
                    i);
            /* Render one message at a time: tmp is reused. */
            if (kvr_tok_chat(tok, &cm, 1, 0, &text, &kerr))
                BAD("messages", "chat template: %s", kerr.msg);
            i++;
        }
        if (kvr_tok_chat(tok, NULL, 0, 1, &text, &kerr))
            BAD("messages", "chat template: %s", kerr.msg);
        if (text.len > FE_MAX_PROMPT_BYTES)
            BAD("messages", "prompt too long (%zu bytes, max %u)", text.len, FE_MAX_PROMPT_BYTES);
        if (kvr_tok_encode(tok, (kvr_slice){text.base, text.len}, &r->tokens, &kerr))
            BAD("messages", "tokenizing: %s", kerr.msg);
    }
counted:
    if (r->tokens.len == 0)
        BAD("prompt", "the prompt has no tokens");
    if (r->tokens.len / 4 > FE_MAX_PROMPT_TOKENS)
        BAD(is_chat ? "messages" : "prompt", "prompt too long (%zu tokens, max %u)",
            r->tokens.len / 4, FE_MAX_PROMPT_TOKENS);
out:
    cJSON_Delete(root);
    kvr_buf_free(&text);
    kvr_buf_free(&tmp);
    return rc;
}

int fe_upstream_body(kvr_buf *out, const fe_req *r)
{
    int rc = kvr_buf_append_cstr(out, "{\"model\":");
    rc = rc ? rc : json_str(out, r->model);
    rc = rc ? rc
            : kvr_buf_append_cstr(out,
                                  ",\"stream\":true,\"stream_options\":{\"include_usage\":true}");
    if (!rc && r->max_tokens > 0)
        rc = kvr_buf_appendf(out, ",\"max_tokens\":%lld", (long long)r->max_tokens);
    rc = rc ? rc : kvr_buf_append_cstr(out, ",\"prompt\":[");
    size_t n = kvr_tok_count(&r->tokens);
    const uint32_t *ids = kvr_tok_ids(&r->tokens);
    if (!rc)
        rc = kvr_buf_reserve(out, n * 11 + 2);
    for (size_t i = 0; i < n && !rc; i++) {
        char num[16];
        int l = snprintf(num, sizeof num, i ? ",%u" : "%u", ids[i]);
        rc = kvr_buf_append(out, num, (size_t)l);
    }
    rc = rc ? rc : kvr_buf_append_cstr(out, "]}");
    return rc;
}

void fe_relay_init(fe_relay *rl, const fe_req *r, const char *id, int64_t created)
{
    memset(rl, 0, sizeof *rl);
    rl->is_chat = r->is_chat;
    rl->stream = r->stream;
    rl->include_usage = r->include_usage;
    snprintf(rl->id, sizeof rl->id, "%s", id);
    snprintf(rl->model, sizeof rl->model, "%s", r->model);
    rl->created = created;
    kvr_buf_init(&rl->text);
}

void fe_relay_free(fe_relay *rl)
{
    kvr_buf_free(&rl->text);
}

static int usage_json(kvr_buf *out, const fe_relay *rl)
{
    int rc = kvr_buf_appendf(
        out, "{\"prompt_tokens\":%lld,\"completion_tokens\":%lld,\"total_tokens\":%lld",
        (long long)rl->prompt_tokens, (long long)rl->completion_tokens,
        (long long)(rl->prompt_tokens + rl->completion_tokens));
    if (!rc && rl->have_cached)
        rc = kvr_buf_appendf(out, ",\"prompt_tokens_details\":{\"cached_tokens\":%lld}",
                             (long long)rl->cached_tokens);
    return rc ? rc : kvr_buf_append(out, "}", 1);
}

/* Length of the tail of s[0..n) that is the start of a UTF-8 sequence still missing bytes. */
static size_t utf8_cut_tail(const unsigned char *s, size_t n)
{
    for (size_t back = 1; back <= 3 && back <= n; back++) {
        unsigned c = s[n - back];
        if ((c & 0xc0) == 0x80)
            continue; /* continuation byte: look further back */
        size_t need = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 && c < 0xe0 ? 2 : 1;
        return need > back ? back : 0;
    }
    return 0;
}

/* Appends the JSON string of carry + t, holding back (into carry) a cut UTF-8 character
 * unless final. */
static int json_str_streamed(kvr_buf *out, fe_relay *rl, const char *t, bool final)
{
    size_t tl = strlen(t);
    char small[256];
    kvr_buf tmp;
    kvr_buf_init(&tmp);
    const char *p = t;
    size_t n = tl;
    if (rl->carry_len) {
        if (rl->carry_len + tl <= sizeof small) {
            memcpy(small, rl->carry, rl->carry_len);
            memcpy(small + rl->carry_len, t, tl);
            p = small;
        } else {
            if (kvr_buf_append(&tmp, rl->carry, rl->carry_len) || kvr_buf_append(&tmp, t, tl))
                return KVR_ENOMEM;
            p = tmp.base;
        }
        n = rl->carry_len + tl;
        rl->carry_len = 0;
    }
    size_t cut = final ? 0 : utf8_cut_tail((const unsigned char *)p, n);
    int rc = kvr_buf_append(out, "\"", 1);
    rc = rc ? rc : kvr_tok_json_escape(out, p, n - cut);
    rc = rc ? rc : kvr_buf_append(out, "\"", 1);
    if (cut) {
        memcpy(rl->carry, p + n - cut, cut);
        rl->carry_len = (uint8_t)cut;
    }
    kvr_buf_free(&tmp);
    return rc;
}

static int chunk_head(kvr_buf *out, const fe_relay *rl)
{
    int rc = kvr_buf_append_cstr(out, "data: {\"id\":");
    rc = rc ? rc : json_str(out, rl->id);
    rc = rc ? rc
            : kvr_buf_appendf(out, ",\"object\":\"%s\",\"created\":%lld,\"model\":",
                              rl->is_chat ? "chat.completion.chunk" : "text_completion",
                              (long long)rl->created);
    rc = rc ? rc : json_str(out, rl->model);
    return rc;
}

int fe_relay_event(fe_relay *rl, const char *data, size_t len, kvr_buf *out, kvr_err *err)
{
    if (len == 6 && memcmp(data, "[DONE]", 6) == 0)
        return FE_EV_DONE;
    cJSON *root = cJSON_ParseWithLength(data, len);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return kvr_err_set(err, KVR_EINVAL, "upstream event is not a JSON object");
    }
    int ret = FE_EV_NONE, rc = 0;
    const cJSON *error = cJSON_GetObjectItemCaseSensitive(root, "error");
    if (error) {
        const cJSON *msg =
            cJSON_IsObject(error) ? cJSON_GetObjectItemCaseSensitive(error, "message") : error;
        kvr_err_set(err, KVR_EIO, "worker error: %.400s",
                    cJSON_IsString(msg) ? msg->valuestring : "unknown");
        cJSON_Delete(root);
        return FE_EV_ERROR;
    }
    const cJSON *usage = cJSON_GetObjectItemCaseSensitive(root, "usage");
    if (cJSON_IsObject(usage)) {
        const cJSON *pt = cJSON_GetObjectItemCaseSensitive(usage, "prompt_tokens");
        const cJSON *ct = cJSON_GetObjectItemCaseSensitive(usage, "completion_tokens");
        /* A worker is a peer, not a trusted party: a count outside int64 (or NaN) would be
         * undefined behaviour to convert, so usage that is not a plausible count is ignored. */
        int64_t ptn, ctn;
        if (kvr_json_int_exact(pt, &ptn) == 0 && kvr_json_int_exact(ct, &ctn) == 0 && ptn >= 0 &&
            ctn >= 0) {
            rl->have_usage = true;
            rl->prompt_tokens = ptn;
            rl->completion_tokens = ctn;
        }
        const cJSON *d = cJSON_GetObjectItemCaseSensitive(usage, "prompt_tokens_details");
        const cJSON *cached =
            cJSON_IsObject(d) ? cJSON_GetObjectItemCaseSensitive(d, "cached_tokens") : NULL;
        if (cJSON_IsNumber(cached) && cached->valuedouble >= 0 && cached->valuedouble < 1e12) {
            rl->have_cached = true;
            rl->cached_tokens = (int64_t)cached->valuedouble;
        }
    }
    const cJSON *choices = cJSON_GetObjectItemCaseSensitive(root, "choices");
    const cJSON *c0 = cJSON_IsArray(choices) ? cJSON_GetArrayItem(choices, 0) : NULL;
    if (c0 && cJSON_IsObject(c0)) {
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(c0, "text");
        const char *t = cJSON_IsString(text) ? text->valuestring : "";
        const cJSON *fr = cJSON_GetObjectItemCaseSensitive(c0, "finish_reason");
        const char *frs = cJSON_IsString(fr) ? fr->valuestring : NULL;
        rl->got_first = true;
        rl->chunks++;
        ret = FE_EV_CHUNK;
        if (frs)
            snprintf(rl->finish_reason, sizeof rl->finish_reason, "%s", frs);
        if (!rl->stream) {
            size_t tl = strlen(t);
            if (rl->text.len + tl > FE_MAX_AGGREGATE_BYTES) {
                cJSON_Delete(root);
                return kvr_err_set(err, KVR_ELIMIT, "aggregated completion over %u bytes",
                                   (unsigned)FE_MAX_AGGREGATE_BYTES);
            }
            rc = kvr_buf_append(&rl->text, t, tl);
        } else if (rl->is_chat) {
            rc = chunk_head(out, rl);
            rc = rc ? rc : kvr_buf_append_cstr(out, ",\"choices\":[{\"index\":0,\"delta\":{");
            if (!rc && !rl->sent_role) {
                rc = kvr_buf_append_cstr(out, "\"role\":\"assistant\",");
                rl->sent_role = true;
            }
            rc = rc ? rc : kvr_buf_append_cstr(out, "\"content\":");
            rc = rc ? rc : json_str_streamed(out, rl, t, frs != NULL);
            rc = rc ? rc : kvr_buf_append_cstr(out, "},\"logprobs\":null,\"finish_reason\":");
            rc = rc ? rc : json_str_or_null(out, frs);
            rc = rc ? rc : kvr_buf_append_cstr(out, "}]}\n\n");
        } else {
            rc = chunk_head(out, rl);
            rc = rc ? rc : kvr_buf_append_cstr(out, ",\"choices\":[{\"index\":0,\"text\":");
            rc = rc ? rc : json_str_streamed(out, rl, t, frs != NULL);
            rc = rc ? rc : kvr_buf_append_cstr(out, ",\"logprobs\":null,\"finish_reason\":");
            rc = rc ? rc : json_str_or_null(out, frs);
            rc = rc ? rc : kvr_buf_append_cstr(out, "}]}\n\n");
        }
    } else if (cJSON_IsObject(usage)) {
        ret = FE_EV_USAGE;
        if (rl->stream && rl->include_usage) {
            rc = chunk_head(out, rl);
            rc = rc ? rc : kvr_buf_append_cstr(out, ",\"choices\":[],\"usage\":");
            rc = rc ? rc : usage_json(out, rl);
            rc = rc ? rc : kvr_buf_append_cstr(out, "}\n\n");
        }
    }
    cJSON_Delete(root);
    if (rc)
        return kvr_err_set(err, rc, "relaying upstream event: out of memory");
    return ret;
}

int fe_relay_final_json(const fe_relay *rl, kvr_buf *out)
{
    int rc = kvr_buf_append_cstr(out, "{\"id\":");
    rc = rc ? rc : json_str(out, rl->id);
    rc = rc ? rc
            : kvr_buf_appendf(out, ",\"object\":\"%s\",\"created\":%lld,\"model\":",
                              rl->is_chat ? "chat.completion" : "text_completion",
                              (long long)rl->created);
    rc = rc ? rc : json_str(out, rl->model);
    if (rl->is_chat) {
        rc = rc ? rc
                : kvr_buf_append_cstr(out, ",\"choices\":[{\"index\":0,\"message\":{\"role\":"
                                           "\"assistant\",\"content\":");
    } else {
        rc = rc ? rc : kvr_buf_append_cstr(out, ",\"choices\":[{\"index\":0,\"text\":");
    }
    if (!rc) {
        rc = kvr_buf_append(out, "\"", 1);
        rc = rc ? rc : kvr_tok_json_escape(out, rl->text.base ? rl->text.base : "", rl->text.len);
        rc = rc ? rc : kvr_buf_append(out, "\"", 1);
    }
    if (rl->is_chat)
        rc = rc ? rc : kvr_buf_append_cstr(out, "},\"logprobs\":null,\"finish_reason\":");
    else
        rc = rc ? rc : kvr_buf_append_cstr(out, ",\"logprobs\":null,\"finish_reason\":");
    rc = rc ? rc : json_str_or_null(out, rl->finish_reason);
    rc = rc ? rc : kvr_buf_append_cstr(out, "}],\"usage\":");
    rc = rc ? rc : usage_json(out, rl);
    rc = rc ? rc : kvr_buf_append_cstr(out, "}");
    return rc;
}

int fe_relay_error_event(kvr_buf *out, const char *message)
{
    int rc = kvr_buf_append_cstr(out, "data: {\"error\":{\"message\":");
    rc = rc ? rc : json_str(out, message);
    rc = rc ? rc
            : kvr_buf_append_cstr(out, ",\"type\":\"upstream_error\",\"param\":null,\"code\":"
                                       "\"worker_failed\"}}\n\ndata: [DONE]\n\n");
    return rc;
}

bool fe_auth_ok(const char *key, const char *authz, size_t authz_len)
{
    /* The scheme is case-insensitive (RFC 7235 2.1): "bearer" and "BEARER" are valid. */
    return kvr_bearer_ok(key, authz, authz_len);
}
