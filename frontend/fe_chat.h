/* fe_chat: a served model's own chat template (template/kvr_tmpl.h) rendered for a chat request
 * and tokenized with the model's tokenizer, as vLLM does for /v1/chat/completions and for the
 * messages form of POST /tokenize: apply_chat_template(messages, tools, documents,
 * add_generation_prompt, continue_final_message, chat_template, **chat_template_kwargs), then
 * encode with add_special_tokens=false (the template already wrote the special tokens).
 *
 * Threads: models are registered at start-up on the main thread before the loop runs and are
 * immutable afterwards; fe_chat_tokens may run on any thread (a compiled template and a loaded
 * tokenizer are immutable; each call allocates its own buffers). */
#ifndef FE_CHAT_H
#define FE_CHAT_H

#include "fe_core.h"
#include "kvr_buf.h"
#include "kvr_err.h"
#include "kvr_hftok.h"

#include <cjson/cJSON.h>
#include <stdbool.h>

/* Registers model name (a Hugging Face directory dir, its tokenizer hf already loaded): loads
 * its chat template. A template the interpreter refuses (or none at all) is not an error here:
 * the model is kept without one and *why says what was refused (the caller logs it); requests
 * for it then take the remote fallback or a clear error. Returns an error only for out of
 * memory or a full table. */
int fe_chat_add_model(const char *name, const char *dir, const kvr_hftok *hf, kvr_err *why,
                      kvr_err *err);
/* Logs, once the log is set up, every model whose template was refused. */
void fe_chat_log_models(void);
/* Options (set once before the loop runs). */
void fe_chat_set_options(bool trust_request_template, bool remote_fallback);
bool fe_chat_remote_fallback(void);

enum {
    FE_CHAT_DONE = 0,        /* ids appended */
    FE_CHAT_NOT_MINE = 1,    /* the model has no Hugging Face tokenizer: the built-in path */
    FE_CHAT_NEEDS_REMOTE = 2 /* template refused, --tokenizer-fallback remote: ask a worker */
};

/* Validates root's chat fields and, for a model with a template, renders and tokenizes them
 * into ids (uint32_t). Returns FE_CHAT_* >= 0, or a negative KVR_E* code with *e filled (400
 * for the request's fault, 500/501 for ours). */
int fe_chat_tokens(const char *model, const cJSON *root, kvr_buf *ids, fe_http_error *e);

/* The body of vLLM's POST /tokenize messages form for root's chat request (model, messages,
 * add_generation_prompt, continue_final_message, tools, documents, chat_template_kwargs,
 * add_special_tokens false): what the remote fallback sends a worker. */
int fe_chat_remote_body(const cJSON *root, kvr_buf *out);
/* Parses a worker's /tokenize answer ({"count", "tokens": [...]}) into ids. */
int fe_chat_remote_parse(const char *body, size_t len, kvr_buf *ids, kvr_err *err);

#endif
