/* kvr_json: implementation in progress (first commit: interface only). */
#include "kvr_json.h"

int kvr_json_parse(kvr_slice text, size_t max_bytes, int max_depth, cJSON **out, kvr_err *err) { return kvr_err_set(err, KVR_EUNSUPPORTED, "kvr_json: not implemented yet"); }
int kvr_json_get_string(const cJSON *obj, const char *key, bool required, const char **out, kvr_err *err) { return KVR_EUNSUPPORTED; }
int kvr_json_get_bool(const cJSON *obj, const char *key, bool required, bool *out, kvr_err *err) { return KVR_EUNSUPPORTED; }
int kvr_json_get_int(const cJSON *obj, const char *key, bool required, int64_t min, int64_t max, int64_t *out, kvr_err *err) { return KVR_EUNSUPPORTED; }
int kvr_json_get_u64(const cJSON *obj, const char *key, bool required, uint64_t *out, kvr_err *err) { return KVR_EUNSUPPORTED; }
int kvr_json_get_double(const cJSON *obj, const char *key, bool required, double *out, kvr_err *err) { return KVR_EUNSUPPORTED; }
int kvr_json_get_array(const cJSON *obj, const char *key, bool required, const cJSON **out, kvr_err *err) { return KVR_EUNSUPPORTED; }
int kvr_json_get_object(const cJSON *obj, const char *key, bool required, const cJSON **out, kvr_err *err) { return KVR_EUNSUPPORTED; }
int kvr_json_int_exact(const cJSON *item, int64_t *out) { return KVR_EUNSUPPORTED; }
int kvr_json_append_string(kvr_buf *out, const char *s, size_t len) { return KVR_EUNSUPPORTED; }
void kvr_jw_init(kvr_jw *w, kvr_buf *out) { w->out = out; w->err = KVR_EUNSUPPORTED; }
void kvr_jw_obj(kvr_jw *w) {}
void kvr_jw_arr(kvr_jw *w) {}
void kvr_jw_end(kvr_jw *w) {}
void kvr_jw_key(kvr_jw *w, const char *key) {}
void kvr_jw_str(kvr_jw *w, const char *s) {}
void kvr_jw_strn(kvr_jw *w, const char *s, size_t len) {}
void kvr_jw_int(kvr_jw *w, int64_t v) {}
void kvr_jw_u64(kvr_jw *w, uint64_t v) {}
void kvr_jw_double(kvr_jw *w, double v) {}
void kvr_jw_bool(kvr_jw *w, bool v) {}
void kvr_jw_null(kvr_jw *w) {}
void kvr_jw_raw(kvr_jw *w, const char *json, size_t len) {}
int kvr_jw_finish(kvr_jw *w) { return w->err; }
