/* kvr_tok: built-in byte-level tokenizer and ChatML template. See kvr_tok.h. */
#include "kvr_tok.h"
#include "kvr_json.h"

#include <stdlib.h>
#include <string.h>

static int byte_encode(const kvr_tokenizer *t, kvr_slice text, kvr_buf *out, kvr_err *err)
{
    (void)t;
    if (text.len == 0)
        return 0; /* out->base may still be NULL: no pointer arithmetic on it */
    if (text.len > SIZE_MAX / sizeof(uint32_t) - out->len)
        return kvr_err_set(err, KVR_ELIMIT, "text of %zu bytes too large to tokenize", text.len);
    int rc = kvr_buf_reserve(out, text.len * sizeof(uint32_t));
    if (rc)
        return kvr_err_set(err, rc, "tokenizing %zu bytes: out of memory", text.len);
    uint32_t *dst = (uint32_t *)(void *)(out->base + out->len);
    const unsigned char *src = (const unsigned char *)text.base;
    for (size_t i = 0; i < text.len; i++) {
        uint32_t v = src[i];
        memcpy(dst + i, &v, sizeof v);
    }
    out->len += text.len * sizeof(uint32_t);
    return 0;
}

static int byte_decode(const kvr_tokenizer *t, const uint32_t *ids, size_t n, kvr_buf *out,
                       kvr_err *err)
{
    (void)t;
    int rc = kvr_buf_reserve(out, n);
    if (rc)
        return kvr_err_set(err, rc, "decoding %zu tokens: out of memory", n);
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 256)
            out->base[out->len++] = (char)(unsigned char)ids[i];
    return 0;
}

static int byte_chat(const kvr_tokenizer *t, const kvr_chat_msg *msgs, size_t n, int add_gen,
                     kvr_buf *out, kvr_err *err)
{
    (void)t;
    return kvr_tok_chatml(msgs, n, add_gen, out, err);
}

static const char *byte_name(const kvr_tokenizer *t)
{
    (void)t;
    return "byte";
}

static void byte_destroy(kvr_tokenizer *t)
{
    (void)t; /* static instance */
}

static const kvr_tok_vtable byte_vt = {
    .encode = byte_encode,
    .decode = byte_decode,
    .apply_chat_template = byte_chat,
    .name = byte_name,
    .destroy = byte_destroy,
};

static const kvr_tokenizer byte_tok = {.vt = &byte_vt, .data = NULL};

const kvr_tokenizer *kvr_tok_byte(void)
{
    return &byte_tok;
}

int kvr_tok_open(const char *name, kvr_tokenizer **out, kvr_err *err)
{
    *out = NULL;
    if (name == NULL || name[0] == '\0' || strcmp(name, "byte") == 0) {
        *out = (kvr_tokenizer *)&byte_tok;
        return 0;
    }
    return kvr_err_set(err, KVR_EUNSUPPORTED, "tokenizer %s: only \"byte\" is built in", name);
}

void kvr_tok_destroy(kvr_tokenizer *t)
{
    if (t && t != &byte_tok && t->vt->destroy)
        t->vt->destroy(t);
}

int kvr_tok_chatml(const kvr_chat_msg *msgs, size_t n, int add_generation_prompt, kvr_buf *out,
                   kvr_err *err)
{
    if (n > KVR_TOK_MAX_MESSAGES)
        return kvr_err_set(err, KVR_ELIMIT, "%zu chat messages (max %d)", n,
                           KVR_TOK_MAX_MESSAGES);
    static const char start[] = "<|im_start|>", end[] = "<|im_end|>\n";
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        rc = kvr_buf_append(out, start, sizeof start - 1);
        if (!rc)
            rc = kvr_buf_append(out, msgs[i].role.base, msgs[i].role.len);
        if (!rc)
            rc = kvr_buf_append(out, "\n", 1);
        if (!rc)
            rc = kvr_buf_append(out, msgs[i].content.base, msgs[i].content.len);
        if (!rc)
            rc = kvr_buf_append(out, end, sizeof end - 1);
    }
    if (!rc && add_generation_prompt)
        rc = kvr_buf_append_cstr(out, "<|im_start|>assistant\n");
    if (rc)
        return kvr_err_set(err, rc, "chat template: out of memory");
    return 0;
}

int kvr_tok_json_escape(kvr_buf *out, const char *s, size_t len)
{
    return kvr_json_append_escaped(out, s, len);
}
