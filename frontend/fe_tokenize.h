/* fe_tokenize: per-model tokenizers (--tokenizer NAME=DIR, repeatable; --tokenizer byte) and
 * vLLM-compatible POST /tokenize and POST /detokenize.
 *
 * Threads: tokenizers are loaded at start-up on the main thread, before the loop runs, and
 * are immutable afterwards; the handlers run on the loop thread. */
#ifndef FE_TOKENIZE_H
#define FE_TOKENIZE_H

#include "kvr_buf.h"
#include "kvr_err.h"
#include "kvr_tok.h"

#include <stdbool.h>
#include <stddef.h>

/* Takes every "--tokenizer X" / "--tokenizer=X" out of argv (compacting it, *argc updated)
 * and loads each: X is "byte" or NAME=DIR (a Hugging Face model directory). Returns 0 or an
 * error naming the flag, the directory and what is wrong with it. */
int fe_tok_take_flags(int *argc, char **argv, kvr_err *err);
/* The tokenizer of model (fe_tok_lookup_fn); dflt when none was given for it. */
const kvr_tokenizer *fe_tok_for(const char *model, const kvr_tokenizer *dflt);
/* Loop thread: adapter lora (a heartbeat's "loras" entry, len bytes) of model base tokenizes
 * with base's tokenizer from now on (fe_tok_for, any thread). No-op when base has none. */
void fe_tok_note_lora(const char *lora, size_t len, const char *base);
/* The model card checksum (kvr_model_card.h) of the directory loaded for model, "" when no
 * --tokenizer names it or the sum could not be computed. */
const char *fe_tok_mdc_sum(const char *model);
/* Handles a /tokenize (detok false) or /detokenize body; fills out with the JSON answer (or a
 * vLLM-style error object) and returns the HTTP status. */
int fe_tokenize_handle(const char *body, size_t len, bool detok, const kvr_tokenizer *dflt,
                       kvr_buf *out);

#endif
