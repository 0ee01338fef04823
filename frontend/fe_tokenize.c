/* /tokenize and /detokenize (vLLM's shapes), and the --tokenizer flag. */
#include "fe_tokenize.h"

#include "fe_chat.h"
#include "fe_core.h"
#include "kvr_hftok.h"
#include "kvr_json.h"
#include "kvr_model_card.h"

#include <stdio.h>
#include <uv.h>
#include <stdlib.h>
#include <string.h>

#define FE_MAX_TOKENIZERS 64

static struct {
    char name[FE_MODEL_MAX];
    kvr_tokenizer *tok;
    char mdc_sum[KVR_MODEL_CARD_SUM_LEN + 1];
} toks[FE_MAX_TOKENIZERS];
static size_t ntoks;

/* LoRA adapters (heartbeat "loras") tokenize with their base model's tokenizer. Written on the
 * loop thread, read by request parsing on the thread pool: under alias_mu. Bounded; an
 * adapter is never forgotten (its base could only change by a redeploy, which re-notes it). */
#define FE_MAX_ALIASES 1024
static struct {
    char name[FE_MODEL_MAX];
    const kvr_tokenizer *tok;
} aliases[FE_MAX_ALIASES];
static size_t naliases;
static uv_mutex_t alias_mu;
static uv_once_t alias_once = UV_ONCE_INIT;

static void alias_init(void)
{
    if (uv_mutex_init(&alias_mu) != 0)
        abort();
}

void fe_tok_note_lora(const char *lora, size_t len, const char *base)
{
    const kvr_tokenizer *tok = NULL;
    for (size_t i = 0; i < ntoks && !tok; i++)
        if (!strcmp(toks[i].name, base))
            tok = toks[i].tok;
    if (!tok || len == 0 || len >= FE_MODEL_MAX)
        return;
    for (size_t i = 0; i < ntoks; i++)
        if (strlen(toks[i].name) == len && !memcmp(toks[i].name, lora, len))
            return; /* --tokenizer names it itself */
    uv_once(&alias_once, alias_init);
    uv_mutex_lock(&alias_mu);
    size_t i = 0;
    while (i < naliases && !(strlen(aliases[i].name) == len && !memcmp(aliases[i].name, lora, len)))
        i++;
    if (i < naliases || naliases < FE_MAX_ALIASES) {
        if (i == naliases) {
            memcpy(aliases[i].name, lora, len);
            aliases[i].name[len] = 0;
            naliases++;
        }
        aliases[i].tok = tok;
    }
    uv_mutex_unlock(&alias_mu);
}

static int load_one(const char *spec, kvr_err *err)
{
    if (!strcmp(spec, "byte"))
        return 0; /* the default already */
    const char *eq = strchr(spec, '=');
    if (!eq || eq == spec || !eq[1] || (size_t)(eq - spec) >= FE_MODEL_MAX)
        return kvr_err_set(err, KVR_EINVAL, "--tokenizer %s: want byte or NAME=DIR", spec);
    if (ntoks == FE_MAX_TOKENIZERS)
        return kvr_err_set(err, KVR_ELIMIT, "--tokenizer: more than %d", FE_MAX_TOKENIZERS);
    snprintf(toks[ntoks].name, sizeof toks[ntoks].name, "%.*s", (int)(eq - spec), spec);
    for (size_t i = 0; i < ntoks; i++)
        if (!strcmp(toks[i].name, toks[ntoks].name))
            return kvr_err_set(err, KVR_EEXIST, "--tokenizer: model %s given twice",
                               toks[ntoks].name);
    int rc = kvr_tok_open_dir(eq + 1, &toks[ntoks].tok, err);
    if (rc)
        return kvr_err_wrap(err, rc, "--tokenizer %s", spec);
    /* the model card check: workers announcing another checksum get none of its requests.
     * A directory the sum cannot read (no tokenizer.json: a tokenizer.model-only model)
     * checks nothing. */
    kvr_err merr = {0};
    if (kvr_model_card_sum(eq + 1, toks[ntoks].mdc_sum, sizeof toks[ntoks].mdc_sum, &merr) != 0)
        toks[ntoks].mdc_sum[0] = 0;
    /* A chat template the interpreter refuses is no start-up error: the model's prompts and
     * /tokenize still work, and its chat requests take the fallback (fe_chat_log_models says
     * so once the log is set up). */
    kvr_err why = {0};
    rc = fe_chat_add_model(toks[ntoks].name, eq + 1, kvr_tok_hf(toks[ntoks].tok), &why, err);
    if (rc)
        return rc;
    ntoks++;
    return 0;
}

int fe_tok_take_flags(int *argc, char **argv, kvr_err *err)
{
    int w = 1;
    for (int i = 1; i < *argc; i++) {
        const char *a = argv[i];
        const char *v = NULL;
        if (!strcmp(a, "--"))
            break;
        if (!strcmp(a, "--tokenizer")) {
            if (i + 1 >= *argc)
                return kvr_err_set(err, KVR_EINVAL, "--tokenizer needs a value");
            v = argv[++i];
        } else if (!strncmp(a, "--tokenizer=", 12))
            v = a + 12;
        if (!v) {
            argv[w++] = argv[i];
            continue;
        }
        int rc = load_one(v, err);
        if (rc)
            return rc;
    }
    for (int i = w; i < *argc; i++)
        argv[i] = NULL;
    *argc = w;
    return 0;
}

const char *fe_tok_mdc_sum(const char *model)
{
    for (size_t i = 0; i < ntoks; i++)
        if (!strcmp(toks[i].name, model))
            return toks[i].mdc_sum;
    return "";
}

const kvr_tokenizer *fe_tok_for(const char *model, const kvr_tokenizer *dflt)
{
    for (size_t i = 0; i < ntoks; i++)
        if (!strcmp(toks[i].name, model))
            return toks[i].tok;
    if (!ntoks)
        return dflt;
    const kvr_tokenizer *t = dflt;
    uv_once(&alias_once, alias_init);
    uv_mutex_lock(&alias_mu);
    for (size_t i = 0; i < naliases; i++)
        if (!strcmp(aliases[i].name, model)) {
            t = aliases[i].tok;
            break;
        }
    uv_mutex_unlock(&alias_mu);
    return t;
}

static int error_json(kvr_buf *out, int status, const char *fmt, const char *a)
{
    char msg[600];
    snprintf(msg, sizeof msg, fmt, a);
    out->len = 0;
    if (kvr_buf_append_cstr(out, "{\"object\":\"error\",\"message\":") ||
        kvr_json_append_string(out, msg, strlen(msg)) ||
        kvr_buf_appendf(out, ",\"type\":\"%s\",\"code\":%d}",
                        status == 501   ? "NotImplementedError"
                        : status >= 500 ? "InternalServerError"
                                        : "BadRequestError",
                        status))
        return 500;
    return status;
}

int fe_tokenize_handle(const char *body, size_t len, bool detok, const kvr_tokenizer *dflt,
                       kvr_buf *out)
{
    cJSON *root = NULL;
    kvr_err err = {0};
    kvr_buf ids;
    kvr_buf_init(&ids);
    int status = 200, rc = 0;
    if (kvr_json_parse((kvr_slice){body, len}, 0, 0, &root, &err) || !cJSON_IsObject(root)) {
        status = error_json(out, 400, "the body must be a JSON object: %s", err.msg);
        goto done;
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!cJSON_IsString(model) || !*model->valuestring ||
        strlen(model->valuestring) >= FE_MODEL_MAX) {
        status = error_json(out, 400, "%s", "'model' must be a non-empty string");
        goto done;
    }
    const kvr_tokenizer *tok = fe_tok_for(model->valuestring, dflt);
    const kvr_hftok *hf = kvr_tok_hf(tok);
    if (detok) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(root, "tokens"), *it;
        if (!cJSON_IsArray(arr) || (unsigned)cJSON_GetArraySize(arr) > FE_MAX_PROMPT_TOKENS) {
            status = error_json(out, 400, "%s", "'tokens' must be a list of token ids");
            goto done;
        }
        cJSON_ArrayForEach(it, arr)
        {
            int64_t v;
            if (kvr_json_int_exact(it, &v) || v < 0 || v > UINT32_MAX) {
                status = error_json(out, 400, "%s", "'tokens' must hold integers 0..2^32-1");
                goto done;
            }
            uint32_t u = (uint32_t)v;
            if (kvr_buf_append(&ids, &u, 4))
                goto nomem;
        }
        kvr_buf text;
        kvr_buf_init(&text);
        rc = kvr_tok_decode(tok, kvr_tok_ids(&ids), kvr_tok_count(&ids), &text, &err);
        if (!rc && (kvr_buf_append_cstr(out, "{\"prompt\":") ||
                    kvr_json_append_string(out, text.base ? text.base : "", text.len) ||
                    kvr_buf_append_cstr(out, "}")))
            rc = KVR_ENOMEM;
        kvr_buf_free(&text);
        if (rc)
            status = error_json(out, 400, "detokenizing: %s", err.msg);
        goto done;
    }
    if (cJSON_GetObjectItemCaseSensitive(root, "messages")) {
        /* vLLM's messages form: the same rendering and tokenizing as a chat request (its other
         * fields are validated the same way too). */
        fe_req r;
        fe_http_error e;
        fe_req_init(&r);
        memset(&e, 0, sizeof e);
        int prc = fe_parse_request(body, len, true, dflt, &r, &e);
        if (!prc && r.remote_tok) {
            prc = KVR_EINVAL;
            fe_error_set(&e, 501, "NotImplementedError", NULL, NULL,
                         "the chat template of model `%s` is not supported here; with "
                         "--tokenizer-fallback remote only chat requests ask a worker",
                         r.model);
        }
        if (!prc)
            rc = kvr_buf_append(&ids, r.tokens.base, r.tokens.len);
        fe_req_free(&r);
        if (prc) {
            status = error_json(out, e.status, "%s", e.message);
            goto done;
        }
        if (rc)
            goto nomem;
        goto answer;
    }
    const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(root, "prompt");
    if (!cJSON_IsString(prompt)) {
        status = error_json(out, 400, "%s", "'prompt' must be a string");
        goto done;
    }
    size_t pl = strlen(prompt->valuestring);
    if (pl > FE_MAX_PROMPT_BYTES) {
        status = error_json(out, 400, "%s", "prompt too long");
        goto done;
    }
    bool add_special = true;
    int brc = kvr_json_get_bool(root, "add_special_tokens", false, &add_special, &err);
    if (brc < 0 && brc != KVR_ENOTFOUND) {
        status = error_json(out, 400, "%s", err.msg);
        goto done;
    }
    kvr_slice ps = {prompt->valuestring, pl};
    rc = hf ? kvr_hftok_encode(hf, ps, add_special, &ids, &err)
            : kvr_tok_encode(tok, ps, &ids, &err);
    if (rc) {
        status = error_json(out, 400, "tokenizing: %s", err.msg);
        goto done;
    }
answer:;
    int64_t max_len = hf && kvr_hftok_max_len(hf) > 0 ? kvr_hftok_max_len(hf) : -1;
    if (kvr_buf_appendf(out, "{\"count\":%zu,\"max_model_len\":", kvr_tok_count(&ids)))
        goto nomem;
    if (max_len > 0 ? kvr_buf_appendf(out, "%lld", (long long)max_len)
                    : kvr_buf_append_cstr(out, "null"))
        goto nomem;
    if (kvr_buf_append_cstr(out, ",\"tokens\":["))
        goto nomem;
    for (size_t i = 0; i < kvr_tok_count(&ids); i++)
        if (kvr_buf_appendf(out, i ? ",%u" : "%u", kvr_tok_ids(&ids)[i]))
            goto nomem;
    if (kvr_buf_append_cstr(out, "]}"))
        goto nomem;
    goto done;
nomem:
    status = error_json(out, 500, "%s", "out of memory");
done:
    cJSON_Delete(root);
    kvr_buf_free(&ids);
    return status;
}
