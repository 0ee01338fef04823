/* scaler_int.h: what scaler.c, scaler_exec.c and scaler_kube.c share. Loop thread only. */
#ifndef KVR_SCALER_INT_H
#define KVR_SCALER_INT_H
#include "scaler.h"

struct kvr_scaler_op {
    kvr_scaler *s;
    kvr_scaler_op *next, *prev;
    char *ns, *model, *target;
    uint32_t replicas;
    int attempt; /* attempts started */
    kvr_scaler_cb cb;
    void *data;
    uv_timer_t timer; /* retry backoff; exec: the attempt's timeout */
    bool finished;
    /* exec */
    uv_process_t proc;
    bool proc_running, timed_out, killed_by_close;
    /* kubernetes */
    kvr_curl_req *req;
    bool token_reread; /* a 401 already made us re-read the token once */
    char errmsg[256];
};

/* Reads a whole file of at most max bytes (NUL-terminated copy in *out, caller frees).
 * KVR_ELIMIT when longer. */
int scaler_read_file(const char *path, size_t max, char **out, size_t *out_len);

/* An attempt ended badly: retry after the backoff if retryable and attempts are left, else
 * finish the operation with status. op->errmsg says why. */
void scaler_attempt_failed(kvr_scaler_op *op, int status, bool retryable);
/* Starts the next attempt on the next loop turn (a 401's token re-read). */
void scaler_retry_now(kvr_scaler_op *op);
void scaler_op_finish(kvr_scaler_op *op, int status);

/* Back ends: start one attempt; a non-zero return is a failure to start (op->errmsg set). */
int scaler_exec_attempt(kvr_scaler_op *op);
void scaler_exec_kill(kvr_scaler_op *op);
int scaler_kube_attempt(kvr_scaler_op *op);
/* A DNS-1123 subdomain: what a Deployment or namespace name may be (and all that goes into the
 * API path unescaped). */
bool scaler_kube_name_ok(const char *name);
/* A pool's target as kubectl names it: NAME (a Deployment), deployment/NAME or
 * statefulset/NAME (plural forms too; vLLM pools are often StatefulSets). Returns the API
 * resource ("deployments" or "statefulsets") and points *name into target; NULL for another
 * kind. */
const char *scaler_kube_target(const char *target, const char **name);

#endif
