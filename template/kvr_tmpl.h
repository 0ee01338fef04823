/* kvr_tmpl: Hugging Face chat templates rendered by a Jinja interpreter written in C.
 *
 * Contract: output is byte-identical to Python jinja2 configured as transformers'
 * apply_chat_template configures it (ImmutableSandboxedEnvironment, trim_blocks=True,
 * lstrip_blocks=True, keep_trailing_newline=False, loopcontrols, the {% generation %} tag of
 * its AssistantTracker, its own tojson(ensure_ascii=False, indent, separators, sort_keys), and
 * the globals raise_exception(msg) and strftime_now(fmt)). A construct the interpreter does
 * not implement is refused by kvr_tmpl_compile with the construct named, never rendered
 * approximately.
 *
 * Memory and threads: a compiled kvr_tmpl is immutable after compile and may be rendered from
 * any number of threads at once; kvr_tmpl_render allocates per call (one arena, freed before
 * it returns) and appends to a caller-owned kvr_buf. No callbacks.
 *
 * Known difference: the context comes from cJSON, which does not keep the spelling of numbers;
 * an integral JSON number (|x| < 2^53) becomes a Python int, any other a float ("1.0" in a
 * tool argument renders as 1). */
#ifndef KVR_TMPL_H
#define KVR_TMPL_H

#include "kvr_buf.h"
#include "kvr_err.h"

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kvr_tmpl kvr_tmpl;

/* Bounds of one render; a field left 0 takes its default. Exceeding one is KVR_ELIMIT. */
typedef struct kvr_tmpl_limits {
    size_t max_output;  /* bytes of output (default 16 MiB) */
    size_t max_memory;  /* bytes of the per-render arena (default 64 MiB) */
    uint64_t max_steps; /* evaluated nodes incl. loop iterations (default 20 million) */
    int max_depth;      /* macro call / expression nesting (default 64) */
} kvr_tmpl_limits;

#define KVR_TMPL_MAX_SOURCE (1u << 20) /* a template source over 1 MiB is refused */

/* Compiles src (need not be NUL-terminated). On error *out is NULL and err says what and where
 * ("line L col C: ..."). The handle owns copies of everything it needs. */
int kvr_tmpl_compile(const char *src, size_t len, kvr_tmpl **out, kvr_err *err);
void kvr_tmpl_free(kvr_tmpl *t);

/* Renders with the top-level members of ctx (a JSON object, may be NULL) as variables,
 * appending to out. On error out keeps what was appended before the failure; err names the
 * cause (raise_exception's message is passed through as "raise_exception: MSG"). */
int kvr_tmpl_render(const kvr_tmpl *t, const cJSON *ctx, const kvr_tmpl_limits *lim, kvr_buf *out,
                    kvr_err *err);

/* A model's chat template(s) with the special tokens the template sees. */
typedef struct kvr_chat_tmpl kvr_chat_tmpl;

/* From a parsed tokenizer_config.json: chat_template as a string or a list of {name,
 * template}; bos_token/eos_token as strings or AddedToken dicts ({"content": ...}). */
int kvr_chat_tmpl_from_config(const cJSON *tokcfg, kvr_chat_tmpl **out, kvr_err *err);
/* From DIR/tokenizer_config.json (and DIR/chat_template.jinja when the config has none, as
 * recent transformers saves it). */
int kvr_chat_tmpl_load_dir(const char *dir, kvr_chat_tmpl **out, kvr_err *err);
void kvr_chat_tmpl_free(kvr_chat_tmpl *ct);

typedef struct kvr_chat_req {
    const cJSON *messages;  /* array, required */
    const cJSON *tools;     /* array or NULL (the template sees none) */
    const cJSON *documents; /* array or NULL */
    const cJSON *kwargs;    /* chat_template_kwargs object or NULL, merged last */
    bool add_generation_prompt;
    /* Content as vLLM hands it to the template (its "auto" content format): for a template
     * that never loops over a message's content ("string" format), list content becomes its
     * text parts joined with "\n"; templates that loop over it get the list. false: as
     * transformers' apply_chat_template passes it, always as given. The frontend and the worker
     * set it: what the engine renders is what gets hashed. */
    bool vllm_content;
} kvr_chat_req;

/* vLLM's content format of the template kvr_chat_render would pick (tools given or not):
 * true "openai" (it loops over content), false "string". */
bool kvr_chat_tmpl_openai_content(const kvr_chat_tmpl *ct, bool tools);

/* Selects the template as transformers does ("tool_use" when tools are given and such a
 * template exists, else "default"), builds the context apply_chat_template passes and renders
 * into out. lim may be NULL. */
int kvr_chat_render(const kvr_chat_tmpl *ct, const kvr_chat_req *req, const kvr_tmpl_limits *lim,
                    kvr_buf *out, kvr_err *err);

#endif
