/* scaler: see scaler.h. One operation = up to max_attempts attempts of one back end (exec:
 * scaler_exec.c, kubernetes: scaler_kube.c); this file owns the operations, the retry timer and
 * close. */
#include "scaler_int.h"

#include "kvr_log.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SA_DIR "/var/run/secrets/kubernetes.io/serviceaccount"

static char *dup_or_null(const char *s)
{
    return s && *s ? strdup(s) : NULL;
}

static char *read_small_file(const char *path)
{
    char *buf = NULL;
    size_t len = 0;
    if (scaler_read_file(path, 4096, &buf, &len) != 0)
        return NULL;
    while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == ' ' || buf[len - 1] == '\r'))
        buf[--len] = 0;
    return buf;
}

int scaler_read_file(const char *path, size_t max, char **out, size_t *out_len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return KVR_EIO;
    char *buf = malloc(max + 1);
    if (!buf) {
        fclose(f);
        return KVR_ENOMEM;
    }
    size_t n = fread(buf, 1, max + 1, f);
    bool err = ferror(f);
    fclose(f);
    if (err || n > max) { /* a token over the bound is not a token */
        free(buf);
        return err ? KVR_EIO : KVR_ELIMIT;
    }
    buf[n] = 0;
    *out = buf;
    *out_len = n;
    return 0;
}

static void free_strings(kvr_scaler *s)
{
    free(s->command);
    free(s->api_url);
    free(s->token_file);
    free(s->ca_file);
    free(s->kube_namespace);
    s->command = s->api_url = s->token_file = s->ca_file = s->kube_namespace = NULL;
}

int kvr_scaler_init(kvr_scaler *s, uv_loop_t *loop, const kvr_scaler_config *cfg, kvr_err *err)
{
    void *data = s->data;
    memset(s, 0, sizeof(*s));
    s->data = data;
    s->loop = loop;
    if (!cfg || (cfg->kind != KVR_SCALER_EXEC && cfg->kind != KVR_SCALER_KUBERNETES))
        return kvr_err_set(err, KVR_EINVAL, "scaler: unknown kind");
    s->kind = cfg->kind;
    s->max_attempts = cfg->max_attempts > 0 ? cfg->max_attempts : 5;
    s->backoff_ms = cfg->backoff_ms > 0 ? cfg->backoff_ms : 500;
    if (cfg->kind == KVR_SCALER_EXEC) {
        if (!cfg->command || !*cfg->command)
            return kvr_err_set(err, KVR_EINVAL, "scaler exec: no command");
        s->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 30000;
        if (!(s->command = strdup(cfg->command)))
            goto nomem;
        return 0;
    }
    s->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 10000;
    if (cfg->api_url && *cfg->api_url) {
        s->api_url = strdup(cfg->api_url);
    } else {
        const char *host = getenv("KUBERNETES_SERVICE_HOST");
        const char *port = getenv("KUBERNETES_SERVICE_PORT");
        if (!host || !*host)
            return kvr_err_set(err, KVR_EINVAL,
                               "scaler kubernetes: no --scaler-api-url and no "
                               "KUBERNETES_SERVICE_HOST (not in a pod?)");
        char url[512];
        /* an IPv6 service host needs brackets in a URL */
        snprintf(url, sizeof url, strchr(host, ':') ? "https://[%s]:%s" : "https://%s:%s", host,
                 port && *port ? port : "443");
        s->api_url = strdup(url);
    }
    s->token_file = strdup(cfg->token_file && *cfg->token_file ? cfg->token_file : SA_DIR "/token");
    s->ca_file = dup_or_null(cfg->ca_file ? cfg->ca_file : SA_DIR "/ca.crt");
    if (cfg->kube_namespace && *cfg->kube_namespace)
        s->kube_namespace = strdup(cfg->kube_namespace);
    else
        s->kube_namespace = read_small_file(SA_DIR "/namespace");
    if (!s->api_url || !s->token_file)
        goto nomem;
    if (!s->kube_namespace) {
        free_strings(s);
        return kvr_err_set(err, KVR_EINVAL,
                           "scaler kubernetes: no namespace (flag, or the service account's "
                           "namespace file)");
    }
    if (!scaler_kube_name_ok(s->kube_namespace)) {
        free_strings(s);
        return kvr_err_set(err, KVR_EINVAL, "scaler kubernetes: bad namespace name");
    }
    int rc = kvr_curl_init(&s->curl, loop, NULL, err);
    if (rc != 0) {
        free_strings(s);
        return kvr_err_wrap(err, rc, "scaler kubernetes");
    }
    s->curl_open = true;
    return 0;
nomem:
    free_strings(s);
    return kvr_err_set(err, KVR_ENOMEM, "scaler: out of memory");
}

static void maybe_finish_close(kvr_scaler *s)
{
    if (!s->closing || s->ops || s->pending_closes > 0 || s->curl_open)
        return;
    kvr_scaler_close_cb cb = s->close_cb;
    free_strings(s);
    s->closing = false; /* once */
    s->pending_closes = -1;
    if (cb)
        cb(s);
}

static void op_unlink(kvr_scaler_op *op)
{
    kvr_scaler *s = op->s;
    if (op->prev)
        op->prev->next = op->next;
    else if (s->ops == op)
        s->ops = op->next;
    if (op->next)
        op->next->prev = op->prev;
    op->next = op->prev = NULL;
}

static void op_timer_closed(uv_handle_t *h)
{
    kvr_scaler_op *op = h->data;
    kvr_scaler *s = op->s;
    op_unlink(op);
    free(op->ns);
    free(op->model);
    free(op->target);
    free(op);
    maybe_finish_close(s);
}

/* The operation ends: its callback, then the timer handle closes and the op is freed. The
 * exec child (if any) has already been reaped: scaler_exec.c finishes only from its exit
 * callback. */
void scaler_op_finish(kvr_scaler_op *op, int status)
{
    kvr_scaler *s = op->s;
    if (op->finished)
        return;
    op->finished = true;
    uv_timer_stop(&op->timer);
    if (status == 0)
        s->stats.ok++;
    else
        s->stats.failed++;
    if (status != 0 && status != KVR_ECLOSED)
        KVR_LOG_WARN("scale failed", "ns=%s model=%s target=%s replicas=%u attempts=%d error=\"%s\"",
                     op->ns, op->model, op->target, op->replicas, op->attempt, op->errmsg);
    else if (status == 0)
        KVR_LOG_INFO("scaled", "ns=%s model=%s target=%s replicas=%u attempts=%d", op->ns,
                     op->model, op->target, op->replicas, op->attempt);
    op->cb(status, status == 0 ? NULL : op->errmsg, op->data);
    uv_close((uv_handle_t *)&op->timer, op_timer_closed);
}

static void attempt(kvr_scaler_op *op)
{
    kvr_scaler *s = op->s;
    op->attempt++;
    s->stats.attempts++;
    int rc = s->kind == KVR_SCALER_EXEC ? scaler_exec_attempt(op) : scaler_kube_attempt(op);
    if (rc != 0)
        scaler_attempt_failed(op, rc, false);
}

static void retry_timer(uv_timer_t *t)
{
    attempt(t->data);
}

void scaler_attempt_failed(kvr_scaler_op *op, int status, bool retryable)
{
    kvr_scaler *s = op->s;
    if (s->closing) {
        scaler_op_finish(op, KVR_ECLOSED);
        return;
    }
    if (!retryable || op->attempt >= s->max_attempts) {
        scaler_op_finish(op, status);
        return;
    }
    long delay = s->backoff_ms;
    for (int i = 1; i < op->attempt && delay < 30000; i++)
        delay *= 2;
    if (delay > 30000)
        delay = 30000;
    s->stats.retries++;
    KVR_LOG_INFO("scale attempt failed, retrying", "target=%s attempt=%d in_ms=%ld error=\"%s\"",
                 op->target, op->attempt, delay, op->errmsg);
    uv_timer_start(&op->timer, retry_timer, (uint64_t)delay, 0);
}

void scaler_retry_now(kvr_scaler_op *op)
{
    uv_timer_start(&op->timer, retry_timer, 0, 0);
}

int kvr_scaler_scale(kvr_scaler *s, const char *ns, const char *model, const char *target,
                     uint32_t replicas, kvr_scaler_cb cb, void *data)
{
    if (s->closing || s->pending_closes < 0)
        return KVR_ECLOSED;
    if (!cb || !ns || !*ns || !model || !*model || !target || !*target || strlen(ns) > 253 ||
        strlen(model) > 512 || strlen(target) > 253)
        return KVR_EINVAL;
    if (s->kind == KVR_SCALER_KUBERNETES) {
        const char *name = NULL;
        if (!scaler_kube_target(target, &name) || !scaler_kube_name_ok(name))
            return KVR_EINVAL;
    }
    kvr_scaler_op *op = calloc(1, sizeof(*op));
    if (!op)
        return KVR_ENOMEM;
    op->s = s;
    op->ns = strdup(ns);
    op->model = strdup(model);
    op->target = strdup(target);
    op->replicas = replicas;
    op->cb = cb;
    op->data = data;
    if (!op->ns || !op->model || !op->target) {
        free(op->ns);
        free(op->model);
        free(op->target);
        free(op);
        return KVR_ENOMEM;
    }
    uv_timer_init(s->loop, &op->timer);
    op->timer.data = op;
    op->next = s->ops;
    if (s->ops)
        s->ops->prev = op;
    s->ops = op;
    /* the first attempt from the loop, never inside this call: cb must not run before the
     * caller has seen the 0 */
    scaler_retry_now(op);
    return 0;
}

size_t kvr_scaler_pending(const kvr_scaler *s)
{
    size_t n = 0;
    for (const kvr_scaler_op *op = s->ops; op; op = op->next)
        n += !op->finished;
    return n;
}

const kvr_scaler_stats *kvr_scaler_get_stats(const kvr_scaler *s)
{
    return &s->stats;
}

static void curl_closed(kvr_curl *kc)
{
    kvr_scaler *s = (kvr_scaler *)((char *)kc - offsetof(kvr_scaler, curl));
    s->curl_open = false;
    maybe_finish_close(s);
}

void kvr_scaler_close(kvr_scaler *s, kvr_scaler_close_cb close_cb)
{
    if (s->closing || s->pending_closes < 0)
        return;
    s->closing = true;
    s->close_cb = close_cb;
    for (kvr_scaler_op *op = s->ops, *nx; op; op = nx) {
        nx = op->next;
        if (op->finished)
            continue;
        if (s->kind == KVR_SCALER_EXEC && op->proc_running) {
            scaler_exec_kill(op); /* finishes from its exit callback */
            continue;
        }
        if (op->req) {
            kvr_curl_cancel(op->req);
            op->req = NULL;
        }
        snprintf(op->errmsg, sizeof op->errmsg, "scaler closed");
        scaler_op_finish(op, KVR_ECLOSED);
    }
    if (s->curl_open)
        kvr_curl_close(&s->curl, curl_closed);
    maybe_finish_close(s);
}
