/* kvr_sse: incremental Server-Sent Events parser (and a tiny encoder).
 *
 * Feed arbitrary chunks (events and lines may be split anywhere, including between CR and LF);
 * the callback fires once per complete event (blank line) that has at least one data line,
 * with the data lines joined by '\n' (the spec's rules: one leading space after the colon is
 * dropped; comment lines ":..." ignored; CRLF, LF or CR line ends). A line longer than
 * max_line, or an event whose data exceeds max_event, is an error (KVR_ELIMIT) and the parser
 * must then be reset or freed.
 *
 * Threads: a parser belongs to one thread; the callback runs inside kvr_sse_feed(). Slices
 * passed to the callback are valid only during the call. The parser owns its buffers
 * (kvr_sse_free). */
#ifndef KVR_SSE_H
#define KVR_SSE_H

#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>

/* event: the "event:" field (empty if none); data: joined data lines. Return 0 to continue;
 * any other value stops kvr_sse_feed(), which returns it. */
typedef int (*kvr_sse_event_cb)(void *arg, kvr_slice event, kvr_slice data);

typedef struct kvr_sse {
    kvr_sse_event_cb cb;
    void *arg;
    size_t max_line;
    size_t max_event;
    /* private */
    kvr_buf line;
    kvr_buf data;
    kvr_buf event;
    bool has_data;
    bool after_cr; /* last byte was CR: a following LF belongs to the same line end */
    bool failed;
} kvr_sse;

/* max_line 0 → 64 KiB; max_event 0 → 1 MiB. */
void kvr_sse_init(kvr_sse *p, size_t max_line, size_t max_event, kvr_sse_event_cb cb, void *arg);
/* Returns 0, KVR_ELIMIT (with err filled), or the callback's non-zero return. */
int kvr_sse_feed(kvr_sse *p, const char *data, size_t len, kvr_err *err);
/* Forgets any partial line/event (e.g. at a new stream). */
void kvr_sse_reset(kvr_sse *p);
void kvr_sse_free(kvr_sse *p);

/* Encoder: appends "data: <line>\n" per line of data, then "\n". Returns 0 or KVR_ENOMEM. */
int kvr_sse_append_event(kvr_buf *out, const char *data, size_t len);

#endif
