/* kvr_sse: incremental SSE parser (WHATWG "event stream interpretation", data and event
 * fields only; id and retry are parsed and ignored). */
#include "kvr_sse.h"

#include <string.h>

void kvr_sse_init(kvr_sse *p, size_t max_line, size_t max_event, kvr_sse_event_cb cb, void *arg)
{
    memset(p, 0, sizeof *p);
    p->cb = cb;
    p->arg = arg;
    p->max_line = max_line ? max_line : 64 * 1024;
    p->max_event = max_event ? max_event : 1024 * 1024;
    kvr_buf_init(&p->line);
    kvr_buf_init(&p->data);
    kvr_buf_init(&p->event);
}

void kvr_sse_reset(kvr_sse *p)
{
    kvr_buf_reset(&p->line);
    kvr_buf_reset(&p->data);
    kvr_buf_reset(&p->event);
    p->has_data = false;
    p->after_cr = false;
    p->failed = false;
}

void kvr_sse_free(kvr_sse *p)
{
    kvr_buf_free(&p->line);
    kvr_buf_free(&p->data);
    kvr_buf_free(&p->event);
}

/* Processes one complete line (without its terminator). */
static int sse_line(kvr_sse *p, const char *s, size_t n, kvr_err *err)
{
    if (n == 0) {
        int rv = 0;
        if (p->has_data && p->cb != NULL) {
            kvr_slice ev = {p->event.base ? p->event.base : "", p->event.len};
            kvr_slice data = {p->data.base ? p->data.base : "", p->data.len};
            rv = p->cb(p->arg, ev, data);
        }
        kvr_buf_reset(&p->data);
        kvr_buf_reset(&p->event);
        p->has_data = false;
        return rv;
    }
    if (s[0] == ':')
        return 0; /* comment */
    const char *colon = memchr(s, ':', n);
    size_t flen = colon ? (size_t)(colon - s) : n;
    const char *v = colon ? colon + 1 : s + n;
    size_t vlen = colon ? n - flen - 1 : 0;
    if (vlen > 0 && v[0] == ' ') {
        v++;
        vlen--;
    }
    if (flen == 4 && memcmp(s, "data", 4) == 0) {
        size_t add = vlen + (p->has_data ? 1 : 0);
        if (p->data.len + add > p->max_event) {
            p->failed = true;
            return kvr_err_set(err, KVR_ELIMIT, "SSE event data over %zu bytes", p->max_event);
        }
        if ((p->has_data && kvr_buf_append(&p->data, "\n", 1) != 0) ||
            kvr_buf_append(&p->data, v, vlen) != 0)
            return kvr_err_set(err, KVR_ENOMEM, "SSE: out of memory");
        p->has_data = true;
    } else if (flen == 5 && memcmp(s, "event", 5) == 0) {
        kvr_buf_reset(&p->event);
        if (kvr_buf_append(&p->event, v, vlen) != 0)
            return kvr_err_set(err, KVR_ENOMEM, "SSE: out of memory");
    }
    return 0;
}

int kvr_sse_feed(kvr_sse *p, const char *data, size_t len, kvr_err *err)
{
    if (p->failed)
        return kvr_err_set(err, KVR_ELIMIT, "SSE parser failed earlier; reset it");
    size_t i = 0;
    if (p->after_cr && len > 0) {
        p->after_cr = false;
        if (data[0] == '\n')
            i = 1;
    }
    while (i < len) {
        /* Find the next line end. */
        size_t j = i;
        while (j < len && data[j] != '\n' && data[j] != '\r')
            j++;
        if (j == len) {
            if (p->line.len + (j - i) > p->max_line) {
                p->failed = true;
                return kvr_err_set(err, KVR_ELIMIT, "SSE line longer than %zu bytes", p->max_line);
            }
            if (kvr_buf_append(&p->line, data + i, j - i) != 0)
                return kvr_err_set(err, KVR_ENOMEM, "SSE: out of memory");
            break;
        }
        int rv;
        if (p->line.len > 0) {
            if (p->line.len + (j - i) > p->max_line) {
                p->failed = true;
                return kvr_err_set(err, KVR_ELIMIT, "SSE line longer than %zu bytes", p->max_line);
            }
            if (kvr_buf_append(&p->line, data + i, j - i) != 0)
                return kvr_err_set(err, KVR_ENOMEM, "SSE: out of memory");
            rv = sse_line(p, p->line.base, p->line.len, err);
            kvr_buf_reset(&p->line);
        } else {
            if (j - i > p->max_line) {
                p->failed = true;
                return kvr_err_set(err, KVR_ELIMIT, "SSE line longer than %zu bytes", p->max_line);
            }
            rv = sse_line(p, data + i, j - i, err);
        }
        /* Consume the terminator (CRLF counts as one, even split across feeds). */
        if (data[j] == '\r') {
            if (j + 1 < len) {
                if (data[j + 1] == '\n')
                    j++;
            } else {
                p->after_cr = true;
            }
        }
        i = j + 1;
        if (rv != 0)
            return rv;
    }
    return 0;
}

int kvr_sse_append_event(kvr_buf *out, const char *data, size_t len)
{
    size_t i = 0;
    do {
        size_t j = i;
        while (j < len && data[j] != '\n')
            j++;
        if (kvr_buf_append(out, "data: ", 6) != 0 || kvr_buf_append(out, data + i, j - i) != 0 ||
            kvr_buf_append(out, "\n", 1) != 0)
            return KVR_ENOMEM;
        i = j + 1;
    } while (i <= len); /* a trailing '\n' yields a last, empty data line: round-trips */
    return kvr_buf_append(out, "\n", 1);
}
