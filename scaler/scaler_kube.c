/* scaler_kube.c: the kubernetes back end (scaler.h): one PATCH of the Deployment's or
 * StatefulSet's scale subresource per attempt. The token is read from its file for every attempt (projected
 * service-account tokens rotate; a cached one expires within the hour). */
#include "scaler_int.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOKEN_MAX 16384

bool scaler_kube_name_ok(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > 253)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        bool alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        if (!alnum && c != '-' && c != '.')
            return false;
        if (!alnum && (i == 0 || i == n - 1))
            return false;
    }
    return true;
}

const char *scaler_kube_target(const char *target, const char **name)
{
    static const struct {
        const char *prefix;
        const char *resource;
    } kinds[] = {{"deployment/", "deployments"},
                 {"deployments/", "deployments"},
                 {"statefulset/", "statefulsets"},
                 {"statefulsets/", "statefulsets"}};
    const char *slash = strchr(target, '/');
    if (!slash) {
        *name = target;
        return "deployments";
    }
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        size_t n = strlen(kinds[i].prefix);
        if (strncmp(target, kinds[i].prefix, n) == 0) {
            *name = target + n;
            return kinds[i].resource;
        }
    }
    return NULL;
}

/* The API answers the Scale object: its spec.replicas must be what we asked for. */
static bool scale_body_ok(kvr_slice body, uint32_t want)
{
    cJSON *j = cJSON_ParseWithLength(body.base, body.len);
    if (!j)
        return false;
    cJSON *spec = cJSON_GetObjectItemCaseSensitive(j, "spec");
    cJSON *r = spec ? cJSON_GetObjectItemCaseSensitive(spec, "replicas") : NULL;
    /* replicas 0 may be omitted from spec (omitempty) */
    bool ok = r ? cJSON_IsNumber(r) && r->valuedouble == (double)want : want == 0 && spec;
    cJSON_Delete(j);
    return ok;
}

static void on_done(kvr_curl_req *r, int result, long status, const char *errmsg, kvr_slice body)
{
    kvr_scaler_op *op = kvr_curl_req_data(r);
    op->req = NULL;
    if (result != 0) {
        snprintf(op->errmsg, sizeof op->errmsg, "PATCH %.64s scale: %s%s%.160s", op->target,
                 kvr_strerror(result), errmsg && *errmsg ? ": " : "", errmsg ? errmsg : "");
        scaler_attempt_failed(op, result == KVR_ETIMEDOUT ? KVR_ETIMEDOUT : KVR_EIO, true);
        return;
    }
    if (status >= 200 && status < 300) {
        if (!scale_body_ok(body, op->replicas)) {
            snprintf(op->errmsg, sizeof op->errmsg,
                     "PATCH %.64s scale: HTTP %ld but the answer's spec.replicas is not %u",
                     op->target, status, op->replicas);
            scaler_attempt_failed(op, KVR_ECORRUPT, true);
            return;
        }
        scaler_op_finish(op, 0);
        return;
    }
    snprintf(op->errmsg, sizeof op->errmsg, "PATCH %.64s scale: HTTP %ld: %.*s", op->target, status,
             (int)(body.len > 160 ? 160 : body.len), body.base ? body.base : "");
    if (status == 401 && !op->token_reread) {
        /* the token may have rotated between our read and the API's check: read it again
         * once, now, before counting it as a failure */
        op->token_reread = true;
        scaler_retry_now(op);
        return;
    }
    bool retryable = status == 409 || status == 429 || status >= 500;
    scaler_attempt_failed(op, status == 401 || status == 403 ? KVR_EINVAL : KVR_EIO, retryable);
}

int scaler_kube_attempt(kvr_scaler_op *op)
{
    kvr_scaler *s = op->s;
    char *token = NULL;
    size_t tlen = 0;
    int rc = scaler_read_file(s->token_file, TOKEN_MAX, &token, &tlen);
    if (rc != 0) {
        snprintf(op->errmsg, sizeof op->errmsg, "reading the token %s: %s", s->token_file,
                 kvr_strerror(rc));
        scaler_attempt_failed(op, rc, true);
        return 0;
    }
    while (tlen > 0 && (token[tlen - 1] == '\n' || token[tlen - 1] == '\r' || token[tlen - 1] == ' '))
        token[--tlen] = 0;
    if (tlen == 0 || strpbrk(token, "\r\n")) {
        free(token);
        snprintf(op->errmsg, sizeof op->errmsg, "the token file %s is empty or not one line",
                 s->token_file);
        scaler_attempt_failed(op, KVR_EINVAL, true);
        return 0;
    }
    char url[1024];
    const char *name = NULL;
    const char *resource = scaler_kube_target(op->target, &name);
    snprintf(url, sizeof url, "%s/apis/apps/v1/namespaces/%s/%s/%s/scale", s->api_url,
             s->kube_namespace, resource, name);
    char body[64];
    int blen = snprintf(body, sizeof body, "{\"spec\":{\"replicas\":%u}}", op->replicas);
    size_t alen = tlen + 32;
    char *auth = malloc(alen);
    if (!auth) {
        free(token);
        snprintf(op->errmsg, sizeof op->errmsg, "out of memory");
        scaler_attempt_failed(op, KVR_ENOMEM, true);
        return 0;
    }
    snprintf(auth, alen, "Authorization: Bearer %s", token);
    free(token);
    const char *hdrs[] = {auth, "Content-Type: application/merge-patch+json",
                          "Accept: application/json", NULL};
    kvr_curl_opts o = {
        .url = url,
        .method = "PATCH",
        .headers = hdrs,
        .body = body,
        .body_len = (size_t)blen,
        .timeout_ms = s->timeout_ms,
        .data = op,
        .on_done = on_done,
        .max_body = 1 << 20,
        .ca_file = s->ca_file,
    };
    kvr_err err = {0};
    rc = kvr_curl_start(&s->curl, &o, &op->req, &err);
    /* the header lines were copied by kvr_curl_start; wipe ours */
    memset(auth, 0, alen);
    free(auth);
    if (rc != 0) {
        snprintf(op->errmsg, sizeof op->errmsg, "PATCH %.64s scale: %.160s", op->target, err.msg);
        scaler_attempt_failed(op, rc, true);
    }
    return 0;
}
