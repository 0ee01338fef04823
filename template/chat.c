/* Chat templates from tokenizer_config.json and the context apply_chat_template builds. */
#include "kvr_tmpl.h"

#include "kvr_buf.h"

#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct kvr_chat_tmpl {
    kvr_tmpl *def;
    kvr_tmpl *tool_use;           /* NULL: none */
    bool def_openai, tool_openai; /* vLLM's content format of each: "openai" (true), "string" */
    cJSON *tokens;                /* special tokens map: {"bos_token": ..., "eos_token": ...} */
};

void kvr_chat_tmpl_free(kvr_chat_tmpl *ct)
{
    if (ct == NULL)
        return;
    kvr_tmpl_free(ct->def);
    kvr_tmpl_free(ct->tool_use);
    cJSON_Delete(ct->tokens);
    free(ct);
}

/* vLLM's _detect_content_format, on the source: "openai" when some loop iterates over a
 * message's content ({% for c in message['content'] %} or message.content) where the message
 * is the target of a loop over messages; else "string", and vLLM flattens list content to
 * its text parts joined with "\n" before rendering. vLLM walks the Jinja AST; this matches
 * the loops by their text, which covers the forms real templates use (Qwen3, Llama 3.x:
 * string; Gemma 3: openai). */
static bool content_format_openai(const char *s)
{
    regex_t msg, cont;
    bool found = false;
    /* loops over messages or a variable set from it (loop_messages = messages[1:]): vLLM
     * follows such assignments; here a name ending in "messages" stands for them */
    if (regcomp(
            &msg,
            "for[[:space:]]+([A-Za-z_][A-Za-z0-9_]*)[[:space:]]+in[[:space:]]+[A-Za-z_]*messages",
            REG_EXTENDED))
        return false;
    for (const char *p = s; !found;) {
        regmatch_t m[2];
        if (regexec(&msg, p, 2, m, 0) != 0)
            break;
        char var[64], re[256];
        int vl = (int)(m[1].rm_eo - m[1].rm_so);
        if (vl < (int)sizeof var) {
            snprintf(var, sizeof var, "%.*s", vl, p + m[1].rm_so);
            snprintf(re, sizeof re,
                     "for[[:space:]]+[A-Za-z_][A-Za-z0-9_]*[[:space:]]+in[[:space:]]+%s"
                     "(\\.content|\\[[[:space:]]*['\"]content['\"][[:space:]]*\\])",
                     var);
            if (regcomp(&cont, re, REG_EXTENDED) == 0) {
                found = regexec(&cont, s, 0, NULL, 0) == 0;
                regfree(&cont);
            }
        }
        p += m[0].rm_eo;
    }
    regfree(&msg);
    return found;
}

static int compile_str(const char *s, kvr_tmpl **out, const char *name, kvr_err *err)
{
    int rv = kvr_tmpl_compile(s, strlen(s), out, err);
    if (rv)
        kvr_err_wrap(err, rv, "chat template '%s'", name);
    return rv;
}

int kvr_chat_tmpl_from_config(const cJSON *cfg, kvr_chat_tmpl **out, kvr_err *err)
{
    *out = NULL;
    kvr_chat_tmpl *ct = calloc(1, sizeof(*ct));
    int rv = 0;
    if (ct == NULL || (ct->tokens = cJSON_CreateObject()) == NULL) {
        rv = kvr_err_set(err, KVR_ENOMEM, "out of memory");
        goto fail;
    }
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
    if (cJSON_IsString(t)) {
        rv = compile_str(t->valuestring, &ct->def, "default", err);
        ct->def_openai = content_format_openai(t->valuestring);
    } else if (cJSON_IsArray(t)) {
        const cJSON *it;
        cJSON_ArrayForEach(it, t)
        {
            const cJSON *nm = cJSON_GetObjectItemCaseSensitive(it, "name");
            const cJSON *tx = cJSON_GetObjectItemCaseSensitive(it, "template");
            if (!cJSON_IsString(nm) || !cJSON_IsString(tx)) {
                rv = kvr_err_set(err, KVR_EINVAL, "chat_template list entry without name/template");
                goto fail;
            }
            kvr_tmpl **slot = strcmp(nm->valuestring, "default") == 0    ? &ct->def
                              : strcmp(nm->valuestring, "tool_use") == 0 ? &ct->tool_use
                                                                         : NULL;
            if (slot && *slot == NULL) {
                rv = compile_str(tx->valuestring, slot, nm->valuestring, err);
                *(slot == &ct->def ? &ct->def_openai : &ct->tool_openai) =
                    content_format_openai(tx->valuestring);
            }
            if (rv)
                goto fail;
        }
        if (ct->def == NULL && ct->tool_use == NULL) {
            rv = kvr_err_set(err, KVR_ENOTFOUND, "chat_template list has no 'default' template");
            goto fail;
        }
    } else {
        rv = kvr_err_set(err, KVR_ENOTFOUND, "tokenizer_config.json has no chat_template");
        goto fail;
    }
    if (rv)
        goto fail;
    /* special tokens as strings (AddedToken dicts carry the text in "content") */
    static const char *const toks[] = {"bos_token", "eos_token", "unk_token", "pad_token"};
    for (size_t i = 0; i < sizeof toks / sizeof toks[0]; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, toks[i]);
        if (cJSON_IsObject(v))
            v = cJSON_GetObjectItemCaseSensitive(v, "content");
        if (cJSON_IsString(v) &&
            cJSON_AddStringToObject(ct->tokens, toks[i], v->valuestring) == NULL) {
            rv = kvr_err_set(err, KVR_ENOMEM, "out of memory");
            goto fail;
        }
    }
    *out = ct;
    return 0;
fail:
    kvr_chat_tmpl_free(ct);
    return rv;
}

static char *read_all(const char *path, size_t max, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    char *buf = malloc(max + 1);
    size_t n = buf ? fread(buf, 1, max + 1, f) : 0;
    fclose(f);
    if (buf == NULL || n > max) {
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

int kvr_chat_tmpl_load_dir(const char *dir, kvr_chat_tmpl **out, kvr_err *err)
{
    char path[4096];
    size_t len;
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    char *text = read_all(path, 16u << 20, &len);
    if (text == NULL)
        return kvr_err_set(err, KVR_EIO, "%s: cannot read (missing or over 16 MiB)", path);
    cJSON *cfg = cJSON_ParseWithLength(text, len);
    free(text);
    if (!cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        return kvr_err_set(err, KVR_EINVAL, "%s: not a JSON object", path);
    }
    if (cJSON_GetObjectItemCaseSensitive(cfg, "chat_template") == NULL) {
        snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
        char *jt = read_all(path, KVR_TMPL_MAX_SOURCE, &len);
        if (jt) {
            cJSON_AddStringToObject(cfg, "chat_template", jt);
            free(jt);
        }
    }
    int rv = kvr_chat_tmpl_from_config(cfg, out, err);
    cJSON_Delete(cfg);
    if (rv)
        kvr_err_wrap(err, rv, "%s", dir);
    return rv;
}

bool kvr_chat_tmpl_openai_content(const kvr_chat_tmpl *ct, bool tools)
{
    return (tools && ct->tool_use) ? ct->tool_openai : ct->def_openai;
}

/* A copy of messages whose list contents are their text parts joined with "\n" (vLLM's
 * "string" content format; other parts are left out, as a text model does). *out stays NULL
 * when no message has list content: nothing to copy. */
static int flatten_messages(const cJSON *msgs, cJSON **out, kvr_err *err)
{
    const cJSON *m;
    bool any = false;
    cJSON_ArrayForEach(m, msgs) any |=
        cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(m, "content"));
    if (!any)
        return 0;
    cJSON *copy = cJSON_Duplicate(msgs, true);
    if (copy == NULL)
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    cJSON *c;
    cJSON_ArrayForEach(c, copy)
    {
        cJSON *content = cJSON_GetObjectItemCaseSensitive(c, "content");
        if (!cJSON_IsArray(content))
            continue;
        kvr_buf b;
        kvr_buf_init(&b);
        int n = 0, rc = 0;
        const cJSON *part;
        cJSON_ArrayForEach(part, content)
        {
            const cJSON *ty = cJSON_GetObjectItemCaseSensitive(part, "type");
            const cJSON *tx = cJSON_GetObjectItemCaseSensitive(part, "text");
            if (!cJSON_IsString(ty) || strcmp(ty->valuestring, "text") != 0 || !cJSON_IsString(tx))
                continue;
            if ((n++ && kvr_buf_append(&b, "\n", 1)) || kvr_buf_append_cstr(&b, tx->valuestring))
                rc = KVR_ENOMEM;
        }
        if (!rc && kvr_buf_append(&b, "", 1)) /* NUL-terminated for cJSON */
            rc = KVR_ENOMEM;
        cJSON *s = rc ? NULL : cJSON_CreateString(b.base);
        kvr_buf_free(&b);
        if (s == NULL || !cJSON_ReplaceItemInObjectCaseSensitive(c, "content", s)) {
            cJSON_Delete(s);
            cJSON_Delete(copy);
            return kvr_err_set(err, KVR_ENOMEM, "out of memory");
        }
    }
    *out = copy;
    return 0;
}

int kvr_chat_render(const kvr_chat_tmpl *ct, const kvr_chat_req *req, const kvr_tmpl_limits *lim,
                    kvr_buf *out, kvr_err *err)
{
    const kvr_tmpl *t = (req->tools && ct->tool_use) ? ct->tool_use : ct->def;
    if (t == NULL)
        return kvr_err_set(err, KVR_ENOTFOUND, "no 'default' chat template");
    if (!cJSON_IsArray(req->messages))
        return kvr_err_set(err, KVR_EINVAL, "messages must be an array");
    bool openai = t == ct->tool_use ? ct->tool_openai : ct->def_openai;
    if (req->vllm_content && !openai) {
        cJSON *flat = NULL;
        int rc = flatten_messages(req->messages, &flat, err);
        if (rc)
            return rc;
        if (flat) {
            kvr_chat_req r2 = *req;
            r2.messages = flat;
            r2.vllm_content = false;
            rc = kvr_chat_render(ct, &r2, lim, out, err);
            cJSON_Delete(flat);
            return rc;
        }
    }
    /* The context borrows the caller's trees: built of references, freed without them. */
    cJSON *ctx = cJSON_CreateObject();
    if (ctx == NULL)
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    int rv = 0;
    cJSON_AddItemReferenceToObject(ctx, "messages", (cJSON *)req->messages);
    if (req->tools)
        cJSON_AddItemReferenceToObject(ctx, "tools", (cJSON *)req->tools);
    else
        cJSON_AddNullToObject(ctx, "tools");
    if (req->documents)
        cJSON_AddItemReferenceToObject(ctx, "documents", (cJSON *)req->documents);
    else
        cJSON_AddNullToObject(ctx, "documents");
    cJSON_AddBoolToObject(ctx, "add_generation_prompt", req->add_generation_prompt);
    /* render(messages=, tools=, documents=, add_generation_prompt=, **special_tokens, **kwargs) */
    const cJSON *it;
    cJSON_ArrayForEach(it, ct->tokens)
    {
        cJSON_DeleteItemFromObjectCaseSensitive(ctx, it->string);
        cJSON_AddItemReferenceToObject(ctx, it->string, (cJSON *)it);
    }
    if (cJSON_IsObject(req->kwargs)) {
        cJSON_ArrayForEach(it, req->kwargs)
        {
            cJSON_DeleteItemFromObjectCaseSensitive(ctx, it->string);
            cJSON_AddItemReferenceToObject(ctx, it->string, (cJSON *)it);
        }
    }
    rv = kvr_tmpl_render(t, ctx, lim, out, err);
    cJSON_Delete(ctx);
    return rv;
}
