#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

int kvr_buf_reserve(kvr_buf *b, size_t extra)
{
    if (extra <= b->cap - b->len)
        return 0;
    if (extra > SIZE_MAX / 2 - b->len)
        return KVR_ENOMEM;
    size_t want = b->len + extra;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < want)
        cap *= 2;
    char *p = realloc(b->base, cap);
    if (p == NULL)
        return KVR_ENOMEM;
    b->base = p;
    b->cap = cap;
    return 0;
}

int kvr_buf_append(kvr_buf *b, const void *data, size_t len)
{
    if (len == 0)
        return 0;
    int rv = kvr_buf_reserve(b, len);
    if (rv != 0)
        return rv;
    memcpy(b->base + b->len, data, len);
    b->len += len;
    return 0;
}

int kvr_buf_append_cstr(kvr_buf *b, const char *s)
{
    return kvr_buf_append(b, s, strlen(s));
}

int kvr_buf_appendf(kvr_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return KVR_EINVAL;
    int rv = kvr_buf_reserve(b, (size_t)n + 1);
    if (rv != 0)
        return rv;
    va_start(ap, fmt);
    vsnprintf(b->base + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

void kvr_buf_consume(kvr_buf *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->base, b->base + n, b->len - n);
    b->len -= n;
}

void kvr_buf_free(kvr_buf *b)
{
    free(b->base);
    kvr_buf_init(b);
}

char *kvr_buf_steal(kvr_buf *b)
{
    char *p = b->base;
    kvr_buf_init(b);
    return p;
}
