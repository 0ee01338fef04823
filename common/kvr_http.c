/* kvr_http: implementation in progress (first commit: interface only). */
#include "kvr_http.h"

int kvr_http_server_init(kvr_http_server *srv, uv_loop_t *loop, const kvr_http_config *cfg) { return KVR_EUNSUPPORTED; }
int kvr_http_listen(kvr_http_server *srv, const char *addr, kvr_err *err) { return kvr_err_set(err, KVR_EUNSUPPORTED, "kvr_http: not implemented yet"); }
int kvr_http_server_port(const kvr_http_server *srv) { return srv->port; }
void kvr_http_server_close(kvr_http_server *srv, kvr_http_server_close_cb close_cb) { if (close_cb) close_cb(srv); }
kvr_slice kvr_http_req_header(const kvr_http_req *req, const char *name) { return (kvr_slice){NULL, 0}; }
size_t kvr_http_req_header_count(const kvr_http_req *req) { return 0; }
void kvr_http_req_header_at(const kvr_http_req *req, size_t i, kvr_slice *name, kvr_slice *value) {}
bool kvr_http_req_closed(const kvr_http_req *req) { return true; }
int kvr_http_add_header(kvr_http_req *req, const char *name, const char *value) { return KVR_EUNSUPPORTED; }
int kvr_http_respond(kvr_http_req *req, int status, const char *ct, const void *body, size_t len) { return KVR_EUNSUPPORTED; }
int kvr_http_respond_cstr(kvr_http_req *req, int status, const char *ct, const char *body) { return KVR_EUNSUPPORTED; }
int kvr_http_stream_start(kvr_http_req *req, int status, const char *ct) { return KVR_EUNSUPPORTED; }
int kvr_http_stream_write(kvr_http_req *req, const void *data, size_t len) { return KVR_EUNSUPPORTED; }
size_t kvr_http_stream_pending_bytes(const kvr_http_req *req) { return 0; }
bool kvr_http_stream_should_pause(const kvr_http_req *req) { return false; }
int kvr_http_stream_end(kvr_http_req *req) { return KVR_EUNSUPPORTED; }
const char *kvr_http_status_text(int status) { return "Unknown"; }
