/* kvr_curl: implementation in progress (first commit: interface only). */
#include "kvr_curl.h"

int kvr_curl_init(kvr_curl *kc, uv_loop_t *loop, const kvr_curl_config *cfg, kvr_err *err) { return kvr_err_set(err, KVR_EUNSUPPORTED, "kvr_curl: not implemented yet"); }
int kvr_curl_start(kvr_curl *kc, const kvr_curl_opts *opts, kvr_curl_req **out, kvr_err *err) { return kvr_err_set(err, KVR_EUNSUPPORTED, "kvr_curl: not implemented yet"); }
void kvr_curl_cancel(kvr_curl_req *r) {}
int kvr_curl_pause(kvr_curl_req *r) { return KVR_EUNSUPPORTED; }
int kvr_curl_resume(kvr_curl_req *r) { return KVR_EUNSUPPORTED; }
bool kvr_curl_paused(const kvr_curl_req *r) { return false; }
void *kvr_curl_req_data(const kvr_curl_req *r) { return NULL; }
void kvr_curl_req_set_data(kvr_curl_req *r, void *data) {}
size_t kvr_curl_active(const kvr_curl *kc) { return 0; }
void kvr_curl_close(kvr_curl *kc, kvr_curl_close_cb close_cb) { if (close_cb) close_cb(kc); }
