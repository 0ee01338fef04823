/* kvr_sse: implementation in progress (first commit: interface only). */
#include "kvr_sse.h"

void kvr_sse_init(kvr_sse *p, size_t max_line, size_t max_event, kvr_sse_event_cb cb, void *arg) { memset(p, 0, sizeof *p); p->cb = cb; p->arg = arg; }
int kvr_sse_feed(kvr_sse *p, const char *data, size_t len, kvr_err *err) { return kvr_err_set(err, KVR_EUNSUPPORTED, "kvr_sse: not implemented yet"); }
void kvr_sse_reset(kvr_sse *p) {}
void kvr_sse_free(kvr_sse *p) {}
int kvr_sse_append_event(kvr_buf *out, const char *data, size_t len) { return KVR_EUNSUPPORTED; }
