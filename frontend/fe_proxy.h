/* fe_proxy: kvr-frontend's /proxy/ model-switching API (fe_proxy.c). Loop thread only. */
#ifndef FE_PROXY_H
#define FE_PROXY_H

#include "kvr_err.h"
#include "kvr_http.h"
#include "kvr_metrics.h"

#include <stdbool.h>

/* Loads the model catalogue (JSON {"models": [{"id", "namespace"?, "model", "engine_args"?}]};
 * NULL/"": none) and the API key file (NULL/"": --api-key guards the API, or it is off), and
 * registers the metrics. Call once before serving. */
int fe_proxy_configure(const char *catalogue, const char *key_file, kvr_metrics *m, kvr_err *err);
/* A request whose path starts with /proxy/: answered now or once routers answer over NATS
 * (the handler finishes req exactly once). false: not a /proxy/ path, req untouched. */
bool fe_proxy_handle(kvr_http_req *req);
void fe_proxy_free(void);

#endif
