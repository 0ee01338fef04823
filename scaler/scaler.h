/* scaler: sets the replica count of a pool of engines (scale-to-zero, DESIGN.md §13).
 *
 * Two back ends, chosen per pool:
 * - exec: runs `COMMAND NAMESPACE MODEL REPLICAS` (kvrctl's `scale` sub-command is one: it starts
 *   and stops local kvr-workers); exit status 0 is success; killed past the timeout.
 * - kubernetes: PATCHes the `scale` subresource of the target through the API server
 *   (target NAME or deployment/NAME: `/apis/apps/v1/namespaces/NS/deployments/NAME/scale`;
 *   statefulset/NAME: `.../statefulsets/NAME/scale`), merge-patch
 *   `{"spec":{"replicas":N}}`) with the pod's service-account token, re-read from its file
 *   before every request (the kubelet rotates it), and the cluster CA file.
 * Failures are retried with exponential backoff up to `max_attempts`: exec's non-zero exit or
 * timeout; the API's 409, 429, 5xx and transport errors; a 401 once after re-reading the token.
 * A 403 or 404 fails at once (RBAC or a wrong name: retrying cannot help).
 *
 * Threads: everything on the loop thread; callbacks run on it.
 * Memory: kvr_scaler is caller-allocated and must stay valid until kvr_scaler_close()'s callback
 * has run. The config's strings are copied at init. An operation is owned by the scaler, from
 * kvr_scaler_scale() until its callback returns. */
#ifndef KVR_SCALER_H
#define KVR_SCALER_H
#include "kvr_curl.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

typedef enum { KVR_SCALER_EXEC = 1, KVR_SCALER_KUBERNETES = 2 } kvr_scaler_kind;

typedef struct kvr_scaler_config {
    kvr_scaler_kind kind;
    /* exec */
    const char *command; /* path of the program; run without a shell */
    /* kubernetes */
    const char *api_url;    /* NULL → https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT */
    const char *token_file; /* NULL → the service account's token file */
    const char *ca_file;    /* NULL → the service account's ca.crt */
    const char *kube_namespace; /* NULL → the service account's namespace file */
    /* both */
    long timeout_ms;      /* per attempt; 0 → 30 s (exec), 10 s (kubernetes) */
    int max_attempts;     /* 0 → 5 */
    long backoff_ms;      /* first retry delay, doubled each time up to 30 s; 0 → 500 ms */
} kvr_scaler_config;

typedef struct kvr_scaler_stats {
    uint64_t ok, failed, retries, attempts;
} kvr_scaler_stats;

typedef struct kvr_scaler kvr_scaler;
typedef struct kvr_scaler_op kvr_scaler_op;
typedef void (*kvr_scaler_close_cb)(kvr_scaler *s);

/* status: 0, or a negative KVR_E* with errmsg saying what failed last (after all attempts). */
typedef void (*kvr_scaler_cb)(int status, const char *errmsg, void *data);

struct kvr_scaler {
    void *data; /* caller's */
    /* private */
    uv_loop_t *loop;
    kvr_scaler_kind kind;
    char *command, *api_url, *token_file, *ca_file, *kube_namespace;
    long timeout_ms, backoff_ms;
    int max_attempts;
    kvr_curl curl;
    bool curl_open, closing;
    int pending_closes;
    kvr_scaler_op *ops;
    kvr_scaler_stats stats;
    kvr_scaler_close_cb close_cb;
};

/* Returns 0, or KVR_EINVAL (a required field missing, e.g. exec without command; kubernetes
 * with no API URL and no KUBERNETES_SERVICE_HOST) / KVR_ENOMEM / KVR_EIO with err set. */
int kvr_scaler_init(kvr_scaler *s, uv_loop_t *loop, const kvr_scaler_config *cfg, kvr_err *err);

/* Sets `target` (exec: passed through; kubernetes: the Deployment's name) of pool
 * (namespace, model) to `replicas`. cb is called exactly once, on the loop, never before this
 * returns 0. Returns 0, KVR_EINVAL (empty names, a name the API path cannot hold), KVR_ENOMEM or
 * KVR_ECLOSED. */
int kvr_scaler_scale(kvr_scaler *s, const char *ns, const char *model, const char *target,
                     uint32_t replicas, kvr_scaler_cb cb, void *data);

/* Operations still running (including those waiting to retry). */
size_t kvr_scaler_pending(const kvr_scaler *s);
const kvr_scaler_stats *kvr_scaler_get_stats(const kvr_scaler *s);

/* Fails every pending operation with KVR_ECLOSED (their callbacks run before close_cb), kills
 * running exec children, then calls close_cb (may be NULL). */
void kvr_scaler_close(kvr_scaler *s, kvr_scaler_close_cb close_cb);

#endif
