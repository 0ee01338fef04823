/* worker/api_priv.h: what kvr-worker's HTTP API files share besides worker.h (nothing outside
 * worker/ includes it). Loop thread, as everything in worker.h.
 *   api.c         HTTP routes; completion requests: parse, tokenize, admit into the engine
 *   api_writer.c  responses: the JSON body or SSE chunks of each request, written as the
 *                 engine produces tokens
 *   api_drive.c   the timer that steps the engine's simulated clock (main.c's header)
 *   api_admin.c   GET /debug/cache, POST /tokenize */
#ifndef KVR_WORKER_API_PRIV_H
#define KVR_WORKER_API_PRIV_H

#include "worker.h"

/* api_writer.c */
/* Appends r to the growable array *arr (n used, cap allocated); 0 or KVR_ENOMEM. */
int wk_list_add(wreq ***arr, size_t *n, size_t *cap, wreq *r);
/* Appends "[1,2,3]" for the n token ids t. */
void wk_append_ids(kvr_buf *b, const uint32_t *t, size_t n);
/* Outputs of steps whose end the wall clock has reached become ready. */
void wk_promote_future(worker *w);

/* api_drive.c */
/* An idle engine's clock jumps to the wall clock `now` (the lag forgiven is counted). */
void wk_engine_idle_jump(worker *w, int64_t now);
/* Steps the engine soon (from the loop, not inside the caller). */
void wk_kick_drive(worker *w);

/* api_admin.c: GET /debug/cache (the cached blocks' seq hashes) and POST /tokenize. */
void wk_handle_debug_cache(worker *w, kvr_http_req *req);
void wk_handle_tokenize(worker *w, kvr_http_req *req);

/* api.c */
/* The prompt's tokens of a completion (chat: through the chat template) into toks. */
int wk_request_tokens(const worker *w, const cJSON *root, bool chat, kvr_buf *toks, kvr_err *err);

#endif
