/* Chat templates from tokenizer_config.json and the context apply_chat_template builds. */
#include "kvr_tmpl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct kvr_chat_tmpl {
    kvr_tmpl *def;
    kvr_tmpl *tool_use; /* NULL: none */
    cJSON *tokens;      /* special tokens map: {"bos_token": ..., "eos_token": ...} */
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
            if (slot && *slot == NULL)
                rv = compile_str(tx->valuestring, slot, nm->valuestring, err);
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

int kvr_chat_render(const kvr_chat_tmpl *ct, const kvr_chat_req *req, const kvr_tmpl_limits *lim,
                    kvr_buf *out, kvr_err *err)
{
    const kvr_tmpl *t = (req->tools && ct->tool_use) ? ct->tool_use : ct->def;
    if (t == NULL)
        return kvr_err_set(err, KVR_ENOTFOUND, "no 'default' chat template");
    if (!cJSON_IsArray(req->messages))
        return kvr_err_set(err, KVR_EINVAL, "messages must be an array");
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
