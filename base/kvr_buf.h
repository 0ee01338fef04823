/* kvr_buf: {base,len} byte slices and a growable byte buffer (h2o style).
 *
 * A kvr_slice never owns its bytes: it borrows from whatever buffer it points into, and is
 * valid only as long as that buffer. A kvr_buf owns its heap memory; kvr_buf_free releases it. */
#ifndef KVR_BUF_H
#define KVR_BUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct kvr_slice {
    const char *base;
    size_t len;
} kvr_slice;

#define KVR_SLICE_LIT(s) ((kvr_slice){(s), sizeof(s) - 1})

static inline kvr_slice kvr_slice_of(const char *cstr)
{
    return (kvr_slice){cstr, cstr ? strlen(cstr) : 0};
}

static inline bool kvr_slice_eq(kvr_slice a, kvr_slice b)
{
    return a.len == b.len && (a.len == 0 || memcmp(a.base, b.base, a.len) == 0);
}

static inline bool kvr_slice_eq_cstr(kvr_slice a, const char *b)
{
    return kvr_slice_eq(a, kvr_slice_of(b));
}

typedef struct kvr_buf {
    char *base;
    size_t len;
    size_t cap;
} kvr_buf;

static inline void kvr_buf_init(kvr_buf *b)
{
    b->base = NULL;
    b->len = 0;
    b->cap = 0;
}

/* Ensures room for `extra` more bytes. Returns 0 or KVR_ENOMEM (buffer unchanged). */
int kvr_buf_reserve(kvr_buf *b, size_t extra);
int kvr_buf_append(kvr_buf *b, const void *data, size_t len);
int kvr_buf_append_cstr(kvr_buf *b, const char *s);
int kvr_buf_appendf(kvr_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Drops the first n bytes (n <= len). */
void kvr_buf_consume(kvr_buf *b, size_t n);
static inline void kvr_buf_reset(kvr_buf *b)
{
    b->len = 0;
}
void kvr_buf_free(kvr_buf *b);
/* Hands the heap block to the caller (who frees it with free()); the buffer is left empty. */
char *kvr_buf_steal(kvr_buf *b);

#endif
