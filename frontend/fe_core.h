/* fe_core: the pure (no I/O) parts of kvr-frontend's OpenAI API: request parsing and
 * validation, OpenAI error JSON, the upstream request body, and the rewriting of the worker's
 * completion stream into what the client asked for (completion or chat chunks, streamed or
 * aggregated into one JSON body).
 *
 * Everything here runs on the loop thread; no function keeps pointers into its inputs unless
 * it says so. Strings in fe_req are owned by the fe_req (fe_req_free). */
#ifndef FE_CORE_H
#define FE_CORE_H

#include "kvr_buf.h"
#include "kvr_err.h"
#include "kvr_tok.h"

#include <stdbool.h>
#include <stdint.h>

#define FE_MODEL_MAX 256
/* Bounded work per request (issue 18): a prompt of at most FE_MAX_PROMPT_TOKENS tokens (the
 * routers' default --max-request-tokens: a longer one could not be routed), text of at most
 * FE_MAX_PROMPT_BYTES checked before tokenizing, and at most FE_MAX_JSON_VALUES values in the
 * body, counted before a cJSON tree (~64 bytes a value) is built. */
#define FE_MAX_PROMPT_TOKENS (128u * 1024)
#define FE_MAX_PROMPT_BYTES (16u * FE_MAX_PROMPT_TOKENS)
#define FE_MAX_JSON_VALUES (FE_MAX_PROMPT_TOKENS + 65536u)
#define FE_MAX_AGGREGATE_BYTES (64u * 1024 * 1024) /* non-streaming response text */

typedef struct fe_req {
    bool is_chat;
    bool stream;
    bool include_usage;
    char model[FE_MODEL_MAX];
    int64_t max_tokens; /* -1: not given (the worker's default applies) */
    kvr_buf tokens;     /* uint32_t token ids */
    /* chat for a model whose template was refused, with --tokenizer-fallback remote: tokens
     * is empty and remote_body is the vLLM POST /tokenize body to send a worker (fe_chat.h) */
    bool remote_tok;
    kvr_buf remote_body;
    /* the body has a top-level "kv_transfer_params" (any spelling of the key: the parser
     * decodes escapes), which --forward body must drop (fe_disagg.c, SECURITY 5d) */
    bool has_kv_params;
} fe_req;

/* A parse/validation failure: HTTP status plus the OpenAI error fields. */
typedef struct fe_http_error {
    int status;          /* 400, 401, 404, 413, 503, ... */
    const char *type;    /* "invalid_request_error", ... (static) */
    char param[64];      /* "" → null */
    char code[64];       /* "" → null */
    char message[384];
} fe_http_error;

void fe_req_init(fe_req *r);
void fe_req_free(fe_req *r);

/* Parses and validates a /v1/completions (is_chat false) or /v1/chat/completions body and
 * tokenizes it with tok. Returns 0, or KVR_EINVAL with *e filled (status 400). */
/* Per-model tokenizer: when set (once, before the loop runs), fe_parse_request asks it for the
 * tokenizer of the request's model; it returns dflt for a model it does not know. */
typedef const kvr_tokenizer *(*fe_tok_lookup_fn)(const char *model, const kvr_tokenizer *dflt);
void fe_set_tok_lookup(fe_tok_lookup_fn f);
int fe_parse_request(const char *body, size_t len, bool is_chat, const kvr_tokenizer *tok,
                     fe_req *r, fe_http_error *e);

void fe_error_set(fe_http_error *e, int status, const char *type, const char *param,
                  const char *code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* Appends {"error":{"message":…,"type":…,"param":…,"code":…}}. */
int fe_error_json(kvr_buf *out, const fe_http_error *e);

/* The body POSTed to the worker's /v1/completions: token ids, stream:true, usage on. */
int fe_upstream_body(kvr_buf *out, const fe_req *r);

/* One upstream SSE event's data, decoded. text points into the parsed JSON (valid until the
 * next fe_relay_* call). */
typedef struct fe_relay {
    bool is_chat, stream, include_usage;
    char id[48];
    char model[FE_MODEL_MAX];
    int64_t created;
    bool sent_role;      /* chat: first chunk carries delta.role */
    /* streaming: the bytes of a UTF-8 character cut at the end of the last chunk's text (byte
     * tokens can split one), sent with the next chunk */
    char carry[4];
    uint8_t carry_len;
    bool got_first;      /* a chunk with choices arrived */
    uint64_t chunks;     /* upstream chunks with choices */
    /* aggregation (non-streaming clients) */
    kvr_buf text;
    char finish_reason[32];
    bool have_usage;
    int64_t prompt_tokens, completion_tokens;
    bool have_cached; /* usage.prompt_tokens_details.cached_tokens (vLLM, kvr-worker) */
    int64_t cached_tokens;
} fe_relay;

void fe_relay_init(fe_relay *rl, const fe_req *r, const char *id, int64_t created);
void fe_relay_free(fe_relay *rl);

enum {
    FE_EV_NONE = 0,   /* nothing for the client (e.g. usage not requested) */
    FE_EV_CHUNK = 1,  /* a chunk with choices (out holds the client SSE bytes if streaming) */
    FE_EV_USAGE = 2,  /* usage-only chunk */
    FE_EV_DONE = 3,   /* [DONE] */
    FE_EV_ERROR = 4,  /* the upstream reported an error (message in err) */
};

/* Consumes one upstream event's data. For streaming clients appends the SSE bytes to send
 * ("data: …\n\n") to out; for non-streaming ones accumulates (at most
 * FE_MAX_AGGREGATE_BYTES). Returns FE_EV_* ≥ 0, or KVR_EINVAL for an undecodable event,
 * KVR_ELIMIT when the aggregate is too large (err filled). */
int fe_relay_event(fe_relay *rl, const char *data, size_t len, kvr_buf *out, kvr_err *err);

/* Final non-streaming body (completion or chat.completion). */
int fe_relay_final_json(const fe_relay *rl, kvr_buf *out);
/* An SSE error event + [DONE] for a stream that broke after its first token. */
int fe_relay_error_event(kvr_buf *out, const char *message);

/* Constant-time comparison of a presented "Authorization" value with "Bearer <key>"; the
 * scheme in any case (kvr_bearer_ok). */
bool fe_auth_ok(const char *key, const char *authz, size_t authz_len);

#endif
