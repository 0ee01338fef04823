/* kvr_model_card: the checksum of an engine's tokenizer and chat template that kvr-bridge
 * puts in the heartbeat's "mdc_sum" (DESIGN 4), so a frontend can refuse to route a model's
 * requests to a pool that tokenizes differently from the tokenizer it loaded (issue 13, 4).
 *
 * Format: "tok1:" + 16 lowercase hex digits of XXH3_64 (seed 0) over, for each of
 * tokenizer.json, tokenizer_config.json (holds chat_template in most HF models),
 * chat_template.jinja (newer HF models keep it there), in that order:
 *   the file name, a NUL byte, then either the file's length as 8 bytes little-endian and its
 *   bytes, or, when the file is absent, 8 bytes 0xFF.
 * Files are read byte for byte (no JSON normalisation): the same model revision gives the same
 * sum. tokenizer.json is required. Any thread; blocking file reads (call it at start-up). */
#ifndef KVR_MODEL_CARD_H
#define KVR_MODEL_CARD_H

#include "kvr_err.h"

#include <stddef.h>

#define KVR_MODEL_CARD_SUM_LEN 21 /* "tok1:" + 16 hex */
#define KVR_MODEL_CARD_MAX_FILE (256u << 20)

/* Writes the NUL-terminated sum into out (at least KVR_MODEL_CARD_SUM_LEN + 1 bytes).
 * Returns 0, KVR_ENOTFOUND (no tokenizer.json), KVR_ELIMIT (a file over 256 MiB), KVR_EIO,
 * KVR_ENOMEM; err says which file. */
int kvr_model_card_sum(const char *dir, char *out, size_t out_len, kvr_err *err);

#endif
