/* kvr_tok: the tokenizer contract shared by kvr-frontend and kvr-worker.
 *
 * A tokenizer is a vtable (encode, decode, apply_chat_template, name) plus its own state, so
 * that a real Hugging Face tokenizer can be plugged in later without touching callers.
 *
 * The built-in default is the byte-level tokenizer:
 *   - encode: token id = byte value (0..255) of the UTF-8 text, one token per byte.
 *   - decode: each id < 256 yields that byte; ids >= 256 yield nothing (non-text tokens,
 *     e.g. from replayed traces). Decoding a cut in the middle of a UTF-8 sequence yields the
 *     raw bytes; callers that emit JSON escape them (kvr_tok_json_escape).
 *   - apply_chat_template: ChatML (see kvr_tok_chatml).
 *
 * Memory: outputs go into caller-owned kvr_buf (tokens as packed uint32_t). Tokenizers are
 * immutable after creation; any thread may call them concurrently. */
#ifndef KVR_TOK_H
#define KVR_TOK_H

#include "kvr_buf.h"
#include "kvr_err.h"

#include <stddef.h>
#include <stdint.h>

/* Upper bounds on inputs (a request is bounded by the HTTP body limit anyway). */
#define KVR_TOK_MAX_MESSAGES 4096

typedef struct kvr_chat_msg {
    kvr_slice role;    /* "system" | "user" | "assistant" | "tool" | ... (not validated) */
    kvr_slice content; /* UTF-8 text */
} kvr_chat_msg;

typedef struct kvr_tokenizer kvr_tokenizer;

typedef struct kvr_tok_vtable {
    /* Appends the token ids of text to out (as uint32_t). Returns 0 or a KVR_E* code. */
    int (*encode)(const kvr_tokenizer *t, kvr_slice text, kvr_buf *out, kvr_err *err);
    /* Appends the UTF-8 text of ids[0..n) to out. Returns 0 or a KVR_E* code. */
    int (*decode)(const kvr_tokenizer *t, const uint32_t *ids, size_t n, kvr_buf *out,
                  kvr_err *err);
    /* Renders msgs into the prompt text (appended to out); add_generation_prompt appends the
     * assistant turn opener. Returns 0 or a KVR_E* code. */
    int (*apply_chat_template)(const kvr_tokenizer *t, const kvr_chat_msg *msgs, size_t n,
                               int add_generation_prompt, kvr_buf *out, kvr_err *err);
    const char *(*name)(const kvr_tokenizer *t);
    void (*destroy)(kvr_tokenizer *t);
} kvr_tok_vtable;

struct kvr_tokenizer {
    const kvr_tok_vtable *vt;
    void *data; /* implementation state */
};

/* The process-wide built-in byte-level tokenizer (static; destroy is a no-op). */
const kvr_tokenizer *kvr_tok_byte(void);

/* Opens a tokenizer by name: "byte" (default, also for NULL or ""). Other names →
 * KVR_EUNSUPPORTED until HF tokenizers are wired in. *out is owned by the caller:
 * release with kvr_tok_destroy. */
int kvr_tok_open(const char *name, kvr_tokenizer **out, kvr_err *err);
void kvr_tok_destroy(kvr_tokenizer *t);

/* Convenience wrappers over the vtable. */
static inline int kvr_tok_encode(const kvr_tokenizer *t, kvr_slice text, kvr_buf *out,
                                 kvr_err *err)
{
    return t->vt->encode(t, text, out, err);
}
static inline int kvr_tok_decode(const kvr_tokenizer *t, const uint32_t *ids, size_t n,
                                 kvr_buf *out, kvr_err *err)
{
    return t->vt->decode(t, ids, n, out, err);
}
static inline int kvr_tok_chat(const kvr_tokenizer *t, const kvr_chat_msg *msgs, size_t n,
                               int add_generation_prompt, kvr_buf *out, kvr_err *err)
{
    return t->vt->apply_chat_template(t, msgs, n, add_generation_prompt, out, err);
}
static inline const char *kvr_tok_name(const kvr_tokenizer *t)
{
    return t->vt->name(t);
}

/* ChatML, exactly:
 *   for each message: "<|im_start|>" role "\n" content "<|im_end|>\n"
 *   then, if add_generation_prompt: "<|im_start|>assistant\n"
 * Appends to out. n > KVR_TOK_MAX_MESSAGES → KVR_ELIMIT. */
int kvr_tok_chatml(const kvr_chat_msg *msgs, size_t n, int add_generation_prompt, kvr_buf *out,
                   kvr_err *err);

/* Number of tokens in a kvr_buf filled by encode. */
static inline size_t kvr_tok_count(const kvr_buf *tokens)
{
    return tokens->len / sizeof(uint32_t);
}
static inline const uint32_t *kvr_tok_ids(const kvr_buf *tokens)
{
    return (const uint32_t *)(const void *)tokens->base;
}

/* Appends s as the inside of a JSON string (no quotes): escapes '"', '\\', control bytes;
 * invalid UTF-8 bytes become U+FFFD so output is always valid JSON. Returns 0 or KVR_ENOMEM. */
int kvr_tok_json_escape(kvr_buf *out, const char *s, size_t len);

#endif
