/* libFuzzer target: the tokenizer loader and encoder (tokenizer/). The input is a
 * tokenizer.json text, optionally followed by "\n\x01\n" and a text to encode. Properties: a
 * file is loaded or refused with a message (never a crash); a loaded tokenizer encodes the
 * text (or refuses non-UTF-8 with a message), every id it returns decodes, and the streaming
 * decoder fails on them only as the library's does (InvalidPrefix, when the decoders rewrite
 * text already emitted). Work is bounded: the loader bounds counts and nesting, the
 * encoder is linear-ish in the text (heap BPE). */
#include "fuzz_check.h"
#include "kvr_hftok.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    size_t jlen = size;
    const char *text = "Hello world <|im_start|> 123 \xC3\xA9 \xF0\x9F\x98\x80 e\xCC\x81";
    size_t tlen = strlen(text);
    for (size_t i = 0; i + 3 <= size; i++)
        if (!memcmp(s + i, "\n\x01\n", 3)) {
            jlen = i;
            text = s + i + 3;
            tlen = size - i - 3;
            break;
        }
    kvr_err err = {0};
    kvr_hftok *t = NULL;
    int rc = kvr_hftok_load_json(s, jlen, &t, &err);
    if (rc) {
        CHECK(rc < 0 && err.msg[0] != '\0');
        return 0;
    }
    kvr_buf ids, out;
    kvr_buf_init(&ids);
    kvr_buf_init(&out);
    for (int special = 0; special < 2; special++) {
        ids.len = 0;
        rc = kvr_hftok_encode(t, (kvr_slice){text, tlen}, special, &ids, &err);
        if (rc) {
            CHECK(err.msg[0] != '\0');
            continue;
        }
        /* Without special tokens every id is the model's or an added token's. With them, the
         * post-processor's template may add ids the file never defines (the library does not
         * check them either); decoding skips those. */
        for (size_t i = 0; i < kvr_tok_count(&ids) && !special; i++)
            CHECK(kvr_tok_ids(&ids)[i] < kvr_hftok_vocab_size(t));
        out.len = 0;
        CHECK(kvr_hftok_decode(t, kvr_tok_ids(&ids), kvr_tok_count(&ids), special, &out, &err) ==
              0);
        kvr_hftok_stream st;
        kvr_hftok_stream_init(&st, t, 0);
        out.len = 0;
        for (size_t i = 0; i < kvr_tok_count(&ids); i++) {
            int r = kvr_hftok_stream_step(&st, kvr_tok_ids(&ids)[i], &out, &err);
            if (r == 0)
                continue;
            /* the library's one stream error, DecodeStreamError::InvalidPrefix: a decoder that
             * rewrites text already emitted (ByteFallback ending a byte run, a Replace or Strip
             * seeing more); the stream is then discarded, as the library's callers do */
            CHECK(r == KVR_EINVAL && strstr(err.msg, "invalid prefix") != NULL);
            break;
        }
        kvr_hftok_stream_free(&st);
    }
    kvr_buf_free(&ids);
    kvr_buf_free(&out);
    kvr_hftok_free(t);
    return 0;
}
