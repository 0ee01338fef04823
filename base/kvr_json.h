/* kvr_json: small helpers on cJSON (bounded parsing, typed getters with clear errors, exact
 * integers) and an allocation-light JSON writer into a kvr_buf.
 *
 * Threads: no shared state; any thread. Ownership: kvr_json_parse hands the caller a cJSON
 * tree (free with cJSON_Delete). Getters return pointers into the tree (valid while it lives).
 *
 * cJSON keeps numbers as doubles: kvr_json_get_int/u64 reject non-integral values and
 * magnitudes of 2^53 and above (2^53 + 1 already parses as 2^53), i.e. they accept exactly
 * the "safe integers" |v| <= 2^53 - 1. cJSON accepts invalid UTF-8 in
 * strings; callers that need valid UTF-8 check it themselves. */
#ifndef KVR_JSON_H
#define KVR_JSON_H

#include "kvr_buf.h"
#include "kvr_err.h"

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVR_JSON_MAX_EXACT 9007199254740992.0 /* 2^53 */

/* Parses exactly one JSON value from text (not NUL-terminated; trailing whitespace allowed,
 * anything else is an error). max_bytes 0 → 16 MiB; max_depth 0 → 64 (arrays/objects
 * nesting, checked before cJSON recurses). Returns 0, KVR_ELIMIT (too big/deep) or KVR_EINVAL
 * ("invalid JSON near byte N"). */
int kvr_json_parse(kvr_slice text, size_t max_bytes, int max_depth, cJSON **out, kvr_err *err);

/* Typed field getters on an object. If the field is absent (or JSON null): required → KVR_EINVAL
 * "missing field 'x'"; optional → returns KVR_ENOTFOUND and leaves *out unchanged (so callers
 * pre-set the default and ignore that code: `if (rv < 0 && rv != KVR_ENOTFOUND) fail`).
 * Wrong type → KVR_ETYPE "field 'max_tokens' must be an integer". */
int kvr_json_get_string(const cJSON *obj, const char *key, bool required, const char **out,
                        kvr_err *err);
int kvr_json_get_bool(const cJSON *obj, const char *key, bool required, bool *out, kvr_err *err);
/* Integer in [min, max] (exact; see above). Out of range → KVR_EINVAL "field 'x' must be
 * between min and max". */
int kvr_json_get_int(const cJSON *obj, const char *key, bool required, int64_t min, int64_t max,
                     int64_t *out, kvr_err *err);
int kvr_json_get_u64(const cJSON *obj, const char *key, bool required, uint64_t *out, kvr_err *err);
int kvr_json_get_double(const cJSON *obj, const char *key, bool required, double *out,
                        kvr_err *err);
int kvr_json_get_array(const cJSON *obj, const char *key, bool required, const cJSON **out,
                       kvr_err *err);
int kvr_json_get_object(const cJSON *obj, const char *key, bool required, const cJSON **out,
                        kvr_err *err);

/* Exact integer value of a number item: KVR_ETYPE if not a number, not integral, or |v| >= 2^53. */
int kvr_json_int_exact(const cJSON *item, int64_t *out);

/* Appends s as a quoted JSON string: escapes '"', '\\' and control bytes; invalid UTF-8 bytes
 * become U+FFFD so the output is always valid JSON. Returns 0 or KVR_ENOMEM. */
int kvr_json_append_string(kvr_buf *out, const char *s, size_t len);
/* The same escaping without the quotes (the inside of a JSON string). */
int kvr_json_append_escaped(kvr_buf *out, const char *s, size_t len);

/* Streaming scan of a token request body {"token_ids":[int,...], "model":"...",
 * "namespace":"...", "lora":"...", "mdc_sum":"...", ...} without building a tree: work and memory
 * are linear in the body and bounded by the caller's token array, so an oversized array costs no
 * more than reading up to the point where it crosses max_tokens. Other members are validated and
 * skipped (nesting up to max_depth, 0 → 16). Strict JSON: token ids are plain decimal integers in
 * [0, 2^32) (no sign, fraction or exponent). model/namespace are returned as raw JSON string
 * literals (quotes included, pointing into body) for kvr_json_decode_string(); absent → {NULL,0}.
 * Returns 0; KVR_ELIMIT (more than max_tokens ids, too deep); KVR_EINVAL (invalid JSON,
 * token_ids missing or not an array of such integers, duplicate member, model/namespace not
 * a string), with the byte offset in the message. Any thread; no allocation. */
typedef struct kvr_json_tokreq {
    uint32_t *tokens; /* caller's array of max_tokens entries */
    size_t max_tokens;
    size_t n_tokens;         /* out */
    kvr_slice model;         /* out: raw literal or {NULL,0} */
    kvr_slice ns;            /* out: raw literal or {NULL,0} */
    kvr_slice lora, mdc_sum; /* out: "lora" and "mdc_sum", as model (router /v1/route) */
} kvr_json_tokreq;
int kvr_json_scan_tokens(kvr_slice body, int max_depth, kvr_json_tokreq *tr, kvr_err *err);

/* Decodes one JSON string literal (with its quotes, as validated by kvr_json_scan_tokens) into
 * out as UTF-8, NUL-terminated. Returns 0, KVR_ELIMIT (does not fit in cap, NUL included) or
 * KVR_EINVAL (not a valid literal, or it contains U+0000). */
int kvr_json_decode_string(kvr_slice lit, char *out, size_t cap, kvr_err *err);

/* Writer: commas and nesting handled; errors are sticky and reported by kvr_jw_finish.
 *   kvr_jw w; kvr_jw_init(&w, &buf);
 *   kvr_jw_obj(&w); kvr_jw_key(&w, "id"); kvr_jw_u64(&w, 7); kvr_jw_end(&w);
 *   if (kvr_jw_finish(&w) != 0) ...                                     → {"id":7} */
#define KVR_JW_MAX_DEPTH 32
typedef struct kvr_jw {
    kvr_buf *out;
    int err;
    int depth;
    bool after_key;
    bool need_comma[KVR_JW_MAX_DEPTH + 1];
    char kind[KVR_JW_MAX_DEPTH + 1]; /* '{' or '[' */
} kvr_jw;

void kvr_jw_init(kvr_jw *w, kvr_buf *out);
void kvr_jw_obj(kvr_jw *w);
void kvr_jw_arr(kvr_jw *w);
void kvr_jw_end(kvr_jw *w); /* closes the innermost object/array */
void kvr_jw_key(kvr_jw *w, const char *key);
void kvr_jw_str(kvr_jw *w, const char *s);
void kvr_jw_strn(kvr_jw *w, const char *s, size_t len);
void kvr_jw_int(kvr_jw *w, int64_t v);
void kvr_jw_u64(kvr_jw *w, uint64_t v);
void kvr_jw_double(kvr_jw *w, double v); /* NaN/Inf → null */
void kvr_jw_bool(kvr_jw *w, bool v);
void kvr_jw_null(kvr_jw *w);
void kvr_jw_raw(kvr_jw *w, const char *json, size_t len); /* a pre-encoded value */
/* 0, KVR_ENOMEM, or KVR_EINVAL (unbalanced, value where a key is needed, too deep). */
int kvr_jw_finish(kvr_jw *w);

#endif
