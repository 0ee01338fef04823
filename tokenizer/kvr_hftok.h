/* kvr_hftok: Hugging Face `tokenizers` (tokenizer.json) in C, id for id equal to the Rust
 * library for the BPE families (byte-level: Qwen2/2.5/3, Llama-3.x; SentencePiece-style with
 * byte fallback: Gemma 3, Llama-2, Mistral).
 *
 * Supported components (anything else is refused at load time, naming the component):
 *   normalizers   NFC, Replace, Prepend, Sequence
 *   pre-tokenizers Split (String or Regex, every behavior, invert), ByteLevel, Metaspace,
 *                  Digits, Sequence
 *   model          BPE (merges with ranks, byte_fallback, unk/fuse_unk, ignore_merges)
 *   post-processor TemplateProcessing (single), ByteLevel, Sequence
 *   decoders       ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace, Sequence
 * Added tokens are split out before normalization (normalized=false) or after it
 * (normalized=true), leftmost-longest, honouring lstrip/rstrip/single_word.
 *
 * Threads: a loaded kvr_hftok is immutable; any thread may call encode/decode concurrently.
 * Memory: outputs go into caller-owned kvr_buf (ids as packed uint32_t). */
#ifndef KVR_HFTOK_H
#define KVR_HFTOK_H

#include "kvr_buf.h"
#include "kvr_err.h"
#include "kvr_tok.h"

#include <stddef.h>
#include <stdint.h>

typedef struct kvr_hftok kvr_hftok;

/* Loads dir/tokenizer.json (dir/tokenizer_config.json is optional here). */
int kvr_hftok_load(const char *dir, kvr_hftok **out, kvr_err *err);
/* Loads from the text of a tokenizer.json (len bytes, need not be NUL-terminated). */
int kvr_hftok_load_json(const char *json, size_t len, kvr_hftok **out, kvr_err *err);
void kvr_hftok_free(kvr_hftok *t);

/* Appends the ids of text (valid UTF-8, else KVR_EINVAL); add_special applies the
 * post-processor's template (e.g. <|begin_of_text|>, <bos>) like add_special_tokens=True. */
int kvr_hftok_encode(const kvr_hftok *t, kvr_slice text, int add_special, kvr_buf *out,
                     kvr_err *err);
/* Appends the text of ids (always valid UTF-8); unknown ids are skipped, as the library does. */
int kvr_hftok_decode(const kvr_hftok *t, const uint32_t *ids, size_t n, int skip_special,
                     kvr_buf *out, kvr_err *err);
/* 1 if id is a special added token. */
int kvr_hftok_is_special(const kvr_hftok *t, uint32_t id);
size_t kvr_hftok_vocab_size(const kvr_hftok *t);
/* tokenizer_config.json's model_max_length when it is an exact integer, else -1. */
int64_t kvr_hftok_max_len(const kvr_hftok *t);
/* Fast paths (on by default): the NFC quick check, the added-token root table, the word cache
 * and the cutting of long words at points no merge can cross. They never change the ids;
 * turning them off (fast=0) runs the plain algorithm, for benchmarks (old vs new in one run)
 * and tests that check the two agree. Call right after load, before other threads use t. */
void kvr_hftok_set_fast(kvr_hftok *t, int fast);

/* Streaming decode (the library's DecodeStream): feed one id at a time; text is appended to out
 * only when it ends on a whole UTF-8 character. One stream per generation, one thread. */
typedef struct kvr_hftok_stream {
    const kvr_hftok *t;
    int skip_special;
    kvr_buf ids;    /* uint32_t */
    kvr_buf prefix; /* decode of ids[0..] */
    size_t prefix_index;
} kvr_hftok_stream;
void kvr_hftok_stream_init(kvr_hftok_stream *s, const kvr_hftok *t, int skip_special);
int kvr_hftok_stream_step(kvr_hftok_stream *s, uint32_t id, kvr_buf *out, kvr_err *err);
void kvr_hftok_stream_free(kvr_hftok_stream *s);

/* The kvr_tok vtable over a model directory: encode = add_special_tokens=False (callers that
 * want the template use kvr_hftok_encode), decode skips nothing. kvr_tok_hf() returns the
 * kvr_hftok behind a tokenizer opened here, or NULL for any other tokenizer. */
int kvr_tok_open_dir(const char *dir, kvr_tokenizer **out, kvr_err *err);
const kvr_hftok *kvr_tok_hf(const kvr_tokenizer *t);

#endif
