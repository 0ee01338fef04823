/* Chat templates in the frontend: render (template/) + tokenize (tokenizer/), vLLM's way. */
#define _GNU_SOURCE /* memmem */
#include "fe_chat.h"

#include "kvr_json.h"
#include "kvr_log.h"
#include "kvr_tmpl.h"
#include "kvr_tok.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FE_CHAT_MAX_MODELS 64

typedef struct chat_model {
    char name[FE_MODEL_MAX];
    const kvr_hftok *hf;
    kvr_chat_tmpl *ct; /* NULL: refused or absent (why says which) */
    cJSON *special;    /* {bos_token, eos_token, ...} for a per-request chat_template */
    char why[KVR_ERR_MSG_MAX];
} chat_model;

static chat_model models[FE_CHAT_MAX_MODELS];
static size_t nmodels;
static bool trust_request_template, remote_fallback;

void fe_chat_set_options(bool trust, bool remote)
{
    trust_request_template = trust;
    remote_fallback = remote;
}

bool fe_chat_remote_fallback(void)
{
    return remote_fallback;
}

/* The special tokens of dir/tokenizer_config.json as strings (AddedToken dicts carry them in
 * "content"): the variables a per-request template sees besides the request's own. */
static cJSON *load_special(const char *dir)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    cJSON *out = cJSON_CreateObject();
    FILE *f = fopen(path, "rb");
    if (!f || !out)
        goto done;
    size_t cap = 16u << 20, n = 0;
    char *buf = malloc(cap + 1);
    if (buf)
        n = fread(buf, 1, cap + 1, f);
    cJSON *cfg = buf && n <= cap ? cJSON_ParseWithLength(buf, n) : NULL;
    free(buf);
    static const char *const keys[] = {"bos_token", "eos_token", "unk_token", "pad_token"};
    for (size_t i = 0; cfg && i < sizeof keys / sizeof *keys; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, keys[i]);
        if (cJSON_IsObject(v))
            v = cJSON_GetObjectItemCaseSensitive(v, "content");
        if (cJSON_IsString(v))
            cJSON_AddStringToObject(out, keys[i], v->valuestring);
    }
    cJSON_Delete(cfg);
done:
    if (f)
        fclose(f);
    return out;
}

int fe_chat_add_model(const char *name, const char *dir, const kvr_hftok *hf, kvr_err *why,
                      kvr_err *err)
{
    if (nmodels == FE_CHAT_MAX_MODELS)
        return kvr_err_set(err, KVR_ELIMIT, "--tokenizer: more than %d", FE_CHAT_MAX_MODELS);
    chat_model *m = &models[nmodels];
    memset(m, 0, sizeof *m);
    snprintf(m->name, sizeof m->name, "%s", name);
    m->hf = hf;
    m->special = load_special(dir);
    if (!m->special)
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    kvr_err terr = {0};
    if (kvr_chat_tmpl_load_dir(dir, &m->ct, &terr)) {
        m->ct = NULL;
        snprintf(m->why, sizeof m->why, "%s", terr.msg);
        kvr_err_set(why, terr.code ? terr.code : KVR_EINVAL, "%s", terr.msg);
    }
    nmodels++;
    return 0;
}

void fe_chat_log_models(void)
{
    for (size_t i = 0; i < nmodels; i++) {
        if (models[i].ct)
            KVR_LOG_INFO("chat template loaded", "model=%s", models[i].name);
        else
            KVR_LOG_WARN("chat template refused: chat requests for this model take the fallback",
                         "model=%s fallback=%s err=\"%s\"", models[i].name,
                         remote_fallback ? "remote" : "none (they fail)", models[i].why);
    }
}

static const chat_model *find(const char *name)
{
    for (size_t i = 0; i < nmodels; i++)
        if (!strcmp(models[i].name, name))
            return &models[i];
    return NULL;
}

#define BAD(st, param, ...)                                                                        \
    do {                                                                                           \
        fe_error_set(e, st, st >= 500 ? "server_error" : "invalid_request_error", param, NULL,     \
                     __VA_ARGS__);                                                                 \
        rc = KVR_EINVAL;                                                                           \
        goto out;                                                                                  \
    } while (0)

/* Python's str.strip() set for ASCII; transformers strips the final message with it. */
static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* transformers' apply_chat_template(continue_final_message=True): the rendering is cut right
 * after the final message's text, so the model continues it instead of starting a new turn. */
static int cut_after_final(const cJSON *msgs, kvr_buf *text, kvr_err *err)
{
    const cJSON *last = cJSON_GetArrayItem(msgs, cJSON_GetArraySize(msgs) - 1);
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(last, "content");
    const char *fm = NULL;
    if (cJSON_IsString(c)) {
        fm = c->valuestring;
    } else if (cJSON_IsArray(c)) {
        for (const cJSON *p = c->child ? c->child->prev : NULL; p;
             p = p == c->child ? NULL : p->prev) {
            const cJSON *t = cJSON_GetObjectItemCaseSensitive(p, "text");
            if (cJSON_IsString(t)) {
                fm = t->valuestring;
                break;
            }
        }
    }
    if (!fm)
        return kvr_err_set(err, KVR_EINVAL,
                           "continue_final_message is set but we could not find "
                           "any text to continue in the final message!");
    size_t fl = strlen(fm), a = 0, b = fl;
    while (a < b && is_space(fm[a]))
        a++;
    while (b > a && is_space(fm[b - 1]))
        b--;
    /* rindex of the stripped message, in linear time whatever the text (a naive backwards
     * scan is O(text x message) when the template dropped the message): memmem over both
     * reversed */
    const char *hit = NULL;
    size_t sl = b - a;
    if (sl == 0)
        return 0; /* "" is found at the end: nothing is cut */
    if (sl <= text->len) {
        char *rt = malloc(text->len), *rm = malloc(sl);
        if (!rt || !rm) {
            free(rt);
            free(rm);
            return kvr_err_set(err, KVR_ENOMEM, "out of memory");
        }
        for (size_t i = 0; i < text->len; i++)
            rt[i] = text->base[text->len - 1 - i];
        for (size_t i = 0; i < sl; i++)
            rm[i] = fm[b - 1 - i];
        const char *r = memmem(rt, text->len, rm, sl);
        if (r) /* last occurrence in text: starts where the reversed one ends */
            hit = text->base + (text->len - (size_t)(r - rt) - sl);
        free(rt);
        free(rm);
    }
    if (!hit)
        return kvr_err_set(err, KVR_EINVAL,
                           "continue_final_message is set but the final message does not appear "
                           "in the chat after applying the chat template!");
    size_t loc = (size_t)(hit - text->base), keep = fl - a; /* len(final_message.lstrip()) */
    if (!(loc + keep <= text->len && !memcmp(text->base + loc, fm + a, keep) && a == 0))
        keep = sl; /* the template trims the message's end: so do we */
    text->len = loc + keep;
    return 0;
}

int fe_chat_tokens(const char *model, const cJSON *root, kvr_buf *ids, fe_http_error *e)
{
    const chat_model *m = find(model);
    if (!m)
        return FE_CHAT_NOT_MINE;
    int rc = 0;
    kvr_err kerr = {0};
    kvr_buf text;
    kvr_buf_init(&text);
    kvr_chat_tmpl *req_ct = NULL;
    cJSON *cfg = NULL;
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (!msgs)
        BAD(400, "messages", "you must provide a messages parameter");
    if (!cJSON_IsArray(msgs))
        BAD(400, "messages", "'messages' must be an array");
    int cnt = cJSON_GetArraySize(msgs);
    if (cnt == 0)
        BAD(400, "messages", "'messages' must not be empty");
    if (cnt > KVR_TOK_MAX_MESSAGES)
        BAD(400, "messages", "too many messages (%d, max %d)", cnt, KVR_TOK_MAX_MESSAGES);
    const cJSON *it;
    int i = 0;
    cJSON_ArrayForEach(it, msgs)
    {
        if (!cJSON_IsObject(it) || !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(it, "role")))
            BAD(400, "messages", "messages[%d] must be an object with a string role", i);
        i++;
    }
    kvr_chat_req cr = {.messages = msgs, .add_generation_prompt = true};
    static const char *const arrays[] = {"tools", "documents"};
    for (int k = 0; k < 2; k++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, arrays[k]);
        if (v && !cJSON_IsNull(v) && !cJSON_IsArray(v))
            BAD(400, arrays[k], "'%s' must be an array", arrays[k]);
        if (cJSON_IsArray(v))
            *(k ? &cr.documents : &cr.tools) = v;
    }
    const cJSON *kw = cJSON_GetObjectItemCaseSensitive(root, "chat_template_kwargs");
    if (kw && !cJSON_IsNull(kw) && !cJSON_IsObject(kw))
        BAD(400, "chat_template_kwargs", "'chat_template_kwargs' must be an object");
    cr.kwargs = cJSON_IsObject(kw) ? kw : NULL;
    bool cont = false;
    int g =
        kvr_json_get_bool(root, "add_generation_prompt", false, &cr.add_generation_prompt, &kerr);
    if (g < 0 && g != KVR_ENOTFOUND)
        BAD(400, "add_generation_prompt", "%s", kerr.msg);
    g = kvr_json_get_bool(root, "continue_final_message", false, &cont, &kerr);
    if (g < 0 && g != KVR_ENOTFOUND)
        BAD(400, "continue_final_message", "%s", kerr.msg);
    if (!cJSON_GetObjectItemCaseSensitive(root, "add_generation_prompt") && cont)
        cr.add_generation_prompt = false; /* only the explicit pair is an error */
    if (cont && cr.add_generation_prompt)
        BAD(400, "continue_final_message",
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.");
    const cJSON *rt = cJSON_GetObjectItemCaseSensitive(root, "chat_template");
    if (rt && !cJSON_IsNull(rt)) {
        if (!cJSON_IsString(rt))
            BAD(400, "chat_template", "'chat_template' must be a string");
        if (!trust_request_template)
            BAD(400, "chat_template",
                "Chat template is passed with request, but --trust-request-chat-template is not "
                "set. Refused request with untrusted chat template.");
        if (strlen(rt->valuestring) > KVR_TMPL_MAX_SOURCE)
            BAD(400, "chat_template", "'chat_template' is over %u bytes", KVR_TMPL_MAX_SOURCE);
        cfg = cJSON_Duplicate(m->special, true);
        if (!cfg || !cJSON_AddStringToObject(cfg, "chat_template", rt->valuestring))
            BAD(500, NULL, "out of memory");
        if (kvr_chat_tmpl_from_config(cfg, &req_ct, &kerr))
            BAD(400, "chat_template", "chat_template: %s", kerr.msg);
    } else if (!m->ct) {
        rc = remote_fallback ? FE_CHAT_NEEDS_REMOTE : 0;
        if (rc)
            goto out;
        BAD(501, NULL,
            "The chat template of model `%s` is not supported by this frontend (%.200s); "
            "start it with --tokenizer-fallback remote to let a worker render it.",
            model, m->why);
    }
    kvr_tmpl_limits lim = {.max_output = FE_MAX_PROMPT_BYTES + 1};
    int r = kvr_chat_render(req_ct ? req_ct : m->ct, &cr, &lim, &text, &kerr);
    if (r == KVR_ELIMIT && text.len > FE_MAX_PROMPT_BYTES)
        BAD(400, "messages", "prompt too long (over %u bytes)", FE_MAX_PROMPT_BYTES);
    if (r == KVR_ENOMEM)
        BAD(500, NULL, "out of memory");
    if (r)
        BAD(400, "messages", "chat template: %s", kerr.msg);
    if (cont && cut_after_final(msgs, &text, &kerr))
        BAD(400, "continue_final_message", "%s", kerr.msg);
    if (text.len > FE_MAX_PROMPT_BYTES)
        BAD(400, "messages", "prompt too long (%zu bytes, max %u)", text.len, FE_MAX_PROMPT_BYTES);
    if (kvr_hftok_encode(m->hf, (kvr_slice){text.base ? text.base : "", text.len}, 0, ids, &kerr))
        BAD(400, "messages", "tokenizing: %s", kerr.msg);
out:
    kvr_chat_tmpl_free(req_ct);
    cJSON_Delete(cfg);
    kvr_buf_free(&text);
    return rc;
}

int fe_chat_remote_body(const cJSON *root, kvr_buf *out)
{
    static const char *const keys[] = {
        "model", "messages",  "add_generation_prompt", "continue_final_message",
        "tools", "documents", "chat_template_kwargs"};
    cJSON *b = cJSON_CreateObject();
    if (!b)
        return KVR_ENOMEM;
    int rc = 0;
    for (size_t i = 0; i < sizeof keys / sizeof *keys && !rc; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, keys[i]);
        if (v && !cJSON_IsNull(v) && !cJSON_AddItemReferenceToObject(b, keys[i], (cJSON *)v))
            rc = KVR_ENOMEM;
    }
    if (!rc && !cJSON_AddFalseToObject(b, "add_special_tokens"))
        rc = KVR_ENOMEM;
    char *s = rc ? NULL : cJSON_PrintUnformatted(b);
    if (!rc && (!s || kvr_buf_append_cstr(out, s)))
        rc = KVR_ENOMEM;
    free(s);
    cJSON_Delete(b);
    return rc;
}

int fe_chat_remote_parse(const char *body, size_t len, kvr_buf *ids, kvr_err *err)
{
    cJSON *root = NULL;
    int rc = kvr_json_parse((kvr_slice){body, len}, 0, 0, &root, err);
    if (rc)
        return rc;
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(root, "tokens"), *it;
    if (!cJSON_IsArray(t) || (unsigned)cJSON_GetArraySize(t) > FE_MAX_PROMPT_TOKENS) {
        rc = kvr_err_set(err, KVR_EINVAL, "the worker's /tokenize answer has no 'tokens' list");
        goto out;
    }
    cJSON_ArrayForEach(it, t)
    {
        int64_t v;
        if (kvr_json_int_exact(it, &v) || v < 0 || v > UINT32_MAX) {
            rc = kvr_err_set(err, KVR_EINVAL, "the worker's /tokenize answer has a bad token id");
            goto out;
        }
        uint32_t u = (uint32_t)v;
        if (kvr_buf_append(ids, &u, 4)) {
            rc = kvr_err_set(err, KVR_ENOMEM, "out of memory");
            goto out;
        }
    }
out:
    cJSON_Delete(root);
    return rc;
}
