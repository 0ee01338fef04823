/* kvr-frontend: the /proxy/ model-switching API (issue 16 item 4, vllm-chill's shape).
 *
 *   GET  /proxy/version
 *   GET  /proxy/models/available       the --model-catalogue file
 *   GET  /proxy/models/running         kvr.pools.list, pools awake or waking
 *   POST /proxy/models/switch          {"model_id"}: every other running pool of the catalogue
 *                                      goes to sleep (kvr.pools.set); the next request for the
 *                                      new one wakes it (fe_hold.c holds it meanwhile)
 *   POST /proxy/operations/start|stop  {"model_id"}: kvr.pools.set waking | sleeping
 *
 * The routers own the pools (replicated FSM, routerd/pools.c); NATS is this frontend's only
 * channel to them, so every call that reads or changes a pool is one or more NATS requests
 * answered by any router of the queue group kvr-pools. Protected by a Bearer key of its own
 * (--proxy-api-key-file), else by --api-key; with neither the API is off (403): it can put
 * a cluster's models to sleep, so it is never open.
 *
 * Loop thread only. A job owns its HTTP request until it answers it (kvr_http.h: a request
 * whose client left must still be finished, which then only frees it). */
#include "fe_app.h"
#include "fe_proxy.h"

#include "kvr_access.h"
#include "kvr_json.h"
#include "kvr_log.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PX_VERSION "1"
#define PX_MAX_MODELS 256
#define PX_ID_MAX 128
#define PX_NS_MAX 63
#define PX_MODEL_MAX 255
#define PX_ENGINE_ARGS_MAX 8192
#define PX_FILE_MAX (1 << 20)
#define PX_BODY_MAX 4096
#define PX_KEY_MAX 4096
#define PX_LIST_TIMEOUT_MS 2000
#define PX_SET_TIMEOUT_MS 5000 /* a POOL_SET goes through Raft */

typedef struct px_model {
    char id[PX_ID_MAX + 1];
    char ns[PX_NS_MAX + 1];
    char model[PX_MODEL_MAX + 1];
    char *engine_args; /* printed JSON, or NULL */
} px_model;

enum { OP_VERSION, OP_AVAILABLE, OP_RUNNING, OP_SWITCH, OP_START, OP_STOP, OP_OTHER, OP_N };
static const char *const op_labels[] = {"version", "available", "running", "switch",
                                        "start",   "stop",      "other",   NULL};

static struct {
    px_model *models;
    uint32_t n;
    char *key; /* --proxy-api-key-file's, or NULL: app.api_key */
    kvr_metric *m_calls, *m_failed, *m_sets;
} px;

/* ------------------------------------------------------------------------------------------ */

static char *read_small(const char *path, size_t max, size_t *len, kvr_err *err)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        kvr_err_set(err, KVR_EIO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    char *t = malloc(max + 1);
    size_t n = t ? fread(t, 1, max, f) : 0;
    bool over = t && n == max && fgetc(f) != EOF;
    fclose(f);
    if (!t) {
        kvr_err_set(err, KVR_ENOMEM, "%s: out of memory", path);
        return NULL;
    }
    if (over) {
        free(t);
        kvr_err_set(err, KVR_ELIMIT, "%s: over %zu bytes", path, max);
        return NULL;
    }
    t[n] = 0;
    *len = n;
    return t;
}

static int load_catalogue(const char *path, kvr_err *err)
{
    size_t len;
    char *text = read_small(path, PX_FILE_MAX, &len, err);
    if (!text)
        return err->code ? err->code : KVR_EIO;
    cJSON *j = cJSON_ParseWithLength(text, len);
    free(text);
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, "models");
    int rc = 0;
    if (!cJSON_IsArray(list)) {
        rc = kvr_err_set(err, KVR_EINVAL, "--model-catalogue %s: want {\"models\": [...]}", path);
        goto out;
    }
    int n = cJSON_GetArraySize(list);
    if (n > PX_MAX_MODELS) {
        rc = kvr_err_set(err, KVR_ELIMIT, "--model-catalogue: more than %d models", PX_MAX_MODELS);
        goto out;
    }
    px.models = calloc(n ? (size_t)n : 1, sizeof *px.models);
    if (!px.models) {
        rc = kvr_err_set(err, KVR_ENOMEM, "--model-catalogue: out of memory");
        goto out;
    }
    const cJSON *e;
    cJSON_ArrayForEach(e, list)
    {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        const cJSON *ns = cJSON_GetObjectItemCaseSensitive(e, "namespace");
        const cJSON *model = cJSON_GetObjectItemCaseSensitive(e, "model");
        const cJSON *args = cJSON_GetObjectItemCaseSensitive(e, "engine_args");
        if (!cJSON_IsString(id) || !*id->valuestring || strlen(id->valuestring) > PX_ID_MAX ||
            !cJSON_IsString(model) || !*model->valuestring ||
            strlen(model->valuestring) > PX_MODEL_MAX ||
            (ns && (!cJSON_IsString(ns) || strlen(ns->valuestring) > PX_NS_MAX))) {
            rc = kvr_err_set(err, KVR_EINVAL,
                             "--model-catalogue: entry %u needs id and model strings (and an "
                             "optional namespace) within their bounds",
                             px.n);
            goto out;
        }
        px_model *m = &px.models[px.n];
        snprintf(m->id, sizeof m->id, "%s", id->valuestring);
        snprintf(m->ns, sizeof m->ns, "%s", ns ? ns->valuestring : "default");
        snprintf(m->model, sizeof m->model, "%s", model->valuestring);
        for (uint32_t i = 0; i < px.n; i++)
            if (strcmp(px.models[i].id, m->id) == 0) {
                rc = kvr_err_set(err, KVR_EINVAL, "--model-catalogue: id %s listed twice", m->id);
                goto out;
            }
        if (args) {
            m->engine_args = cJSON_PrintUnformatted(args);
            if (!m->engine_args || strlen(m->engine_args) > PX_ENGINE_ARGS_MAX) {
                rc =
                    kvr_err_set(err, KVR_ELIMIT, "--model-catalogue: %s: engine_args over %d bytes",
                                m->id, PX_ENGINE_ARGS_MAX);
                goto out;
            }
        }
        px.n++;
    }
out:
    cJSON_Delete(j);
    return rc;
}

int fe_proxy_configure(const char *catalogue, const char *key_file, kvr_metrics *m, kvr_err *err)
{
    int rc;
    if (catalogue && *catalogue && (rc = load_catalogue(catalogue, err)) != 0)
        return rc;
    if (key_file && *key_file) {
        size_t len;
        px.key = read_small(key_file, PX_KEY_MAX, &len, err);
        if (!px.key)
            return err->code ? err->code : KVR_EIO;
        while (len && (px.key[len - 1] == '\n' || px.key[len - 1] == '\r' ||
                       px.key[len - 1] == ' ' || px.key[len - 1] == '\t'))
            px.key[--len] = 0;
        if (!len)
            return kvr_err_set(err, KVR_EINVAL, "--proxy-api-key-file %s is empty", key_file);
    }
    px.m_calls = kvr_metrics_counter(m, "kvr_frontend_proxy_requests_total",
                                     "Calls of the /proxy/ model-switching API, by operation", "op",
                                     op_labels);
    px.m_failed = kvr_metrics_counter(m, "kvr_frontend_proxy_failures_total",
                                      "/proxy/ calls answered with a status >= 400, by operation",
                                      "op", op_labels);
    px.m_sets = kvr_metrics_counter(m, "kvr_frontend_proxy_pool_sets_total",
                                    "kvr.pools.set requests sent by /proxy/ calls, by operation",
                                    "op", op_labels);
    if (!px.m_calls || !px.m_failed || !px.m_sets)
        return kvr_err_set(err, KVR_ENOMEM, "proxy metrics");
    if (px.n)
        KVR_LOG_INFO("proxy API", "catalogue_models=%u key=%s", px.n,
                     px.key        ? "file"
                     : app.api_key ? "api-key"
                                   : "none (API off)");
    return 0;
}

void fe_proxy_free(void)
{
    for (uint32_t i = 0; i < px.n; i++)
        cJSON_free(px.models[i].engine_args);
    free(px.models);
    free(px.key);
    memset(&px, 0, sizeof px);
}

/* ------------------------------------------------------------------------------------------ */

static void px_respond(kvr_http_req *req, int op, int status, kvr_buf *body)
{
    if (status >= 400)
        kvr_metric_add(px.m_failed, (size_t)op, 1);
    respond_json(req, R_OTHER, status, body);
}

static void px_error(kvr_http_req *req, int op, int status, const char *code, const char *msg)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_jw w;
    kvr_jw_init(&w, &b);
    kvr_jw_obj(&w);
    kvr_jw_key(&w, "error");
    kvr_jw_obj(&w);
    kvr_jw_key(&w, "code");
    kvr_jw_str(&w, code);
    kvr_jw_key(&w, "message");
    kvr_jw_str(&w, msg);
    kvr_jw_end(&w);
    kvr_jw_end(&w);
    kvr_jw_finish(&w);
    if (status == 503)
        kvr_http_add_header(req, "Retry-After", "1");
    px_respond(req, op, status, &b);
    kvr_buf_free(&b);
}

static void nats_error(kvr_http_req *req, int op, int status)
{
    if (status == KVR_NATS_NO_RESPONDERS)
        px_error(req, op, 503, "no_router",
                 "no router answers kvr.pools.* (routers need --pools-file)");
    else if (status == KVR_ETIMEDOUT)
        px_error(req, op, 504, "router_timeout", "no router answered in time");
    else
        px_error(req, op, 503, "nats", kvr_strerror(status));
}

static const px_model *find_id(const char *id)
{
    for (uint32_t i = 0; i < px.n; i++)
        if (strcmp(px.models[i].id, id) == 0)
            return &px.models[i];
    return NULL;
}

static const px_model *find_pool(const char *ns, const char *model)
{
    for (uint32_t i = 0; i < px.n; i++)
        if (strcmp(px.models[i].ns, ns) == 0 && strcmp(px.models[i].model, model) == 0)
            return &px.models[i];
    return NULL;
}

static bool running_state(const char *s)
{
    return strcmp(s, "awake") == 0 || strcmp(s, "waking") == 0;
}

/* A job: one /proxy/ call waiting for routers. */
typedef struct px_job {
    kvr_http_req *req;
    int op;
    const px_model *target;
    uint32_t pending; /* kvr.pools.set requests not answered yet (switch) */
    cJSON *stopped;   /* switch: what each kvr.pools.set did */
    const char *target_state;
    char target_state_buf[16];
} px_job;

typedef struct px_set {
    px_job *job;
    const px_model *m;
} px_set;

static void job_free(px_job *j)
{
    cJSON_Delete(j->stopped);
    free(j);
}

static void respond_cjson(px_job *j, int status, cJSON *o)
{
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    kvr_buf b;
    kvr_buf_init(&b);
    if (s && kvr_buf_append(&b, s, strlen(s)) == 0)
        px_respond(j->req, j->op, status, &b);
    else
        px_error(j->req, j->op, 500, "server_error", "out of memory");
    kvr_buf_free(&b);
    cJSON_free(s);
}

static int send_set(px_job *j, const px_model *m, const char *state,
                    void (*cb)(int, const char *, size_t, void *));

/* start/stop: the router's answer, relayed */
static void on_op_set(int status, const char *data, size_t len, void *cbdata)
{
    px_set *s = cbdata;
    px_job *j = s->job;
    free(s);
    if (status != 0) {
        nats_error(j->req, j->op, status);
        job_free(j);
        return;
    }
    cJSON *r = cJSON_ParseWithLength(data, len);
    const cJSON *ok = cJSON_GetObjectItemCaseSensitive(r, "ok");
    if (!cJSON_IsObject(r)) {
        px_error(j->req, j->op, 502, "bad_reply", "router reply not JSON");
    } else {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "model_id", j->target->id);
        cJSON_AddStringToObject(o, "operation", j->op == OP_START ? "start" : "stop");
        cJSON_AddItemToObject(o, "pool", cJSON_Duplicate(r, true));
        respond_cjson(j, cJSON_IsTrue(ok) ? 202 : 502, o);
        cJSON_Delete(o);
    }
    cJSON_Delete(r);
    job_free(j);
}

static void switch_release(px_job *j);

/* switch: one pool's answer; the last one answers the client */
static void on_switch_set(int status, const char *data, size_t len, void *cbdata)
{
    px_set *s = cbdata;
    px_job *j = s->job;
    cJSON *e = cJSON_CreateObject();
    cJSON_AddStringToObject(e, "model_id", s->m->id);
    if (status != 0) {
        cJSON_AddBoolToObject(e, "ok", false);
        cJSON_AddStringToObject(e, "error", kvr_strerror(status));
    } else {
        cJSON *r = cJSON_ParseWithLength(data, len);
        const cJSON *ok = cJSON_GetObjectItemCaseSensitive(r, "ok");
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(r, "state");
        const cJSON *from = cJSON_GetObjectItemCaseSensitive(r, "from");
        const cJSON *er = cJSON_GetObjectItemCaseSensitive(r, "error");
        cJSON_AddBoolToObject(e, "ok", cJSON_IsTrue(ok));
        if (cJSON_IsString(from))
            cJSON_AddStringToObject(e, "from", from->valuestring);
        if (cJSON_IsString(st))
            cJSON_AddStringToObject(e, "state", st->valuestring);
        if (cJSON_IsString(er))
            cJSON_AddStringToObject(e, "error", er->valuestring);
        cJSON_Delete(r);
    }
    cJSON_AddItemToArray(j->stopped, e);
    free(s);
    switch_release(j);
}

static void switch_release(px_job *j)
{
    if (--j->pending)
        return;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "model_id", j->target->id);
    cJSON_AddStringToObject(o, "namespace", j->target->ns);
    cJSON_AddStringToObject(o, "model", j->target->model);
    cJSON_AddStringToObject(o, "state", j->target_state);
    cJSON_AddItemToObject(o, "stopped", j->stopped);
    j->stopped = NULL;
    cJSON_AddStringToObject(o, "note", "the next request for the model wakes its pool");
    respond_cjson(j, 202, o);
    cJSON_Delete(o);
    job_free(j);
}

static int send_set(px_job *j, const px_model *m, const char *state,
                    void (*cb)(int, const char *, size_t, void *))
{
    px_set *s = malloc(sizeof *s);
    if (!s)
        return KVR_ENOMEM;
    *s = (px_set){j, m};
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "namespace", m->ns);
    cJSON_AddStringToObject(o, "model", m->model);
    cJSON_AddStringToObject(o, "state", state);
    char *body = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    int rc = body ? kvr_nats_request(&app.nats, "kvr.pools.set", body, strlen(body),
                                     PX_SET_TIMEOUT_MS, cb, s)
                  : KVR_ENOMEM;
    cJSON_free(body);
    if (rc != 0)
        free(s);
    else
        kvr_metric_add(px.m_sets, (size_t)j->op, 1);
    return rc;
}

/* running and switch: the pools as one router knows them */
static void on_list(int status, const char *data, size_t len, void *cbdata)
{
    px_job *j = cbdata;
    if (status != 0) {
        nats_error(j->req, j->op, status);
        job_free(j);
        return;
    }
    cJSON *arr = cJSON_ParseWithLength(data, len);
    if (!cJSON_IsArray(arr)) {
        cJSON_Delete(arr);
        px_error(j->req, j->op, 502, "bad_reply", "router reply not a JSON array");
        job_free(j);
        return;
    }
    const cJSON *p;
    if (j->op == OP_RUNNING) {
        cJSON *out = cJSON_CreateArray();
        cJSON_ArrayForEach(p, arr)
        {
            const cJSON *ns = cJSON_GetObjectItemCaseSensitive(p, "namespace");
            const cJSON *model = cJSON_GetObjectItemCaseSensitive(p, "model");
            const cJSON *st = cJSON_GetObjectItemCaseSensitive(p, "state");
            if (!cJSON_IsString(ns) || !cJSON_IsString(model) || !cJSON_IsString(st) ||
                !running_state(st->valuestring))
                continue;
            cJSON *e = cJSON_Duplicate(p, true);
            const px_model *m = find_pool(ns->valuestring, model->valuestring);
            if (m)
                cJSON_AddStringToObject(e, "id", m->id);
            else
                cJSON_AddNullToObject(e, "id");
            cJSON_AddItemToArray(out, e);
        }
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToObject(o, "models", out);
        respond_cjson(j, 200, o);
        cJSON_Delete(o);
        cJSON_Delete(arr);
        job_free(j);
        return;
    }
    /* switch: every other pool of the catalogue that runs goes to sleep */
    j->stopped = cJSON_CreateArray();
    j->target_state = "unregistered";
    j->pending = 1; /* held by this function until every set is sent */
    cJSON_ArrayForEach(p, arr)
    {
        const cJSON *ns = cJSON_GetObjectItemCaseSensitive(p, "namespace");
        const cJSON *model = cJSON_GetObjectItemCaseSensitive(p, "model");
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(p, "state");
        if (!cJSON_IsString(ns) || !cJSON_IsString(model) || !cJSON_IsString(st))
            continue;
        const px_model *m = find_pool(ns->valuestring, model->valuestring);
        if (!m)
            continue; /* not ours to switch: pools outside the catalogue are left alone */
        if (m == j->target) {
            snprintf(j->target_state_buf, sizeof j->target_state_buf, "%s", st->valuestring);
            j->target_state = j->target_state_buf;
            continue;
        }
        if (!running_state(st->valuestring))
            continue;
        int rc = send_set(j, m, "sleeping", on_switch_set);
        if (rc == 0) {
            j->pending++;
        } else {
            cJSON *e = cJSON_CreateObject();
            cJSON_AddStringToObject(e, "model_id", m->id);
            cJSON_AddBoolToObject(e, "ok", false);
            cJSON_AddStringToObject(e, "error", kvr_strerror(rc));
            cJSON_AddItemToArray(j->stopped, e);
        }
    }
    cJSON_Delete(arr);
    KVR_LOG_INFO("proxy switch", "model_id=%s pools_to_sleep=%u", j->target->id, j->pending - 1);
    /* the last answer (or this, when nothing was sent) answers the client */
    switch_release(j);
}

/* ------------------------------------------------------------------------------------------ */

static bool px_auth(kvr_http_req *req, int op)
{
    const char *key = px.key ? px.key : app.api_key;
    if (!key) {
        px_error(req, op, 403, "proxy_api_off",
                 "the /proxy/ API needs --proxy-api-key-file (or --api-key)");
        return false;
    }
    kvr_slice a = kvr_http_req_header(req, "Authorization");
    /* kvr_bearer_ok: constant time over the presented length */
    if (a.base && kvr_bearer_ok(key, a.base, a.len))
        return true;
    kvr_http_add_header(req, "WWW-Authenticate", "Bearer");
    px_error(req, op, 401, "invalid_api_key", "Incorrect API key provided.");
    return false;
}

static void handle_version(kvr_http_req *req)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_jw w;
    kvr_jw_init(&w, &b);
    kvr_jw_obj(&w);
    kvr_jw_key(&w, "service");
    kvr_jw_str(&w, "kvroute");
    kvr_jw_key(&w, "component");
    kvr_jw_str(&w, "kvr-frontend");
    kvr_jw_key(&w, "proxy_api");
    kvr_jw_str(&w, PX_VERSION);
    kvr_jw_key(&w, "frontend_id");
    kvr_jw_u64(&w, app.frontend_id);
    kvr_jw_key(&w, "catalogue_models");
    kvr_jw_u64(&w, px.n);
    kvr_jw_end(&w);
    kvr_jw_finish(&w);
    px_respond(req, OP_VERSION, 200, &b);
    kvr_buf_free(&b);
}

static void handle_available(kvr_http_req *req)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_jw w;
    kvr_jw_init(&w, &b);
    kvr_jw_obj(&w);
    kvr_jw_key(&w, "models");
    kvr_jw_arr(&w);
    for (uint32_t i = 0; i < px.n; i++) {
        const px_model *m = &px.models[i];
        kvr_jw_obj(&w);
        kvr_jw_key(&w, "id");
        kvr_jw_str(&w, m->id);
        kvr_jw_key(&w, "namespace");
        kvr_jw_str(&w, m->ns);
        kvr_jw_key(&w, "model");
        kvr_jw_str(&w, m->model);
        if (m->engine_args) {
            kvr_jw_key(&w, "engine_args");
            kvr_jw_raw(&w, m->engine_args, strlen(m->engine_args));
        }
        kvr_jw_end(&w);
    }
    kvr_jw_end(&w);
    kvr_jw_end(&w);
    if (kvr_jw_finish(&w) == 0)
        px_respond(req, OP_AVAILABLE, 200, &b);
    else
        px_error(req, OP_AVAILABLE, 500, "server_error", "out of memory");
    kvr_buf_free(&b);
}

/* {"model_id": "..."} → its catalogue entry; answers the client itself (400/404) on NULL */
static const px_model *body_model(kvr_http_req *req, int op)
{
    if (req->body.len > PX_BODY_MAX) {
        px_error(req, op, 413, "body_too_large", "request body over 4096 bytes");
        return NULL;
    }
    cJSON *j = cJSON_ParseWithLength(req->body.base ? req->body.base : "", req->body.len);
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(j, "model_id");
    const px_model *m = NULL;
    if (!cJSON_IsString(id))
        px_error(req, op, 400, "invalid_request", "want {\"model_id\": \"...\"}");
    else if (!(m = find_id(id->valuestring)))
        px_error(req, op, 404, "model_not_found", "no such model_id in the model catalogue");
    cJSON_Delete(j);
    return m;
}

bool fe_proxy_handle(kvr_http_req *req)
{
    kvr_slice p = req->path;
    static const char prefix[] = "/proxy/";
    if (p.len < sizeof prefix - 1 || memcmp(p.base, prefix, sizeof prefix - 1) != 0)
        return false;
    bool get = kvr_slice_eq_cstr(req->method, "GET") || kvr_slice_eq_cstr(req->method, "HEAD");
    bool post = kvr_slice_eq_cstr(req->method, "POST");
    int op = kvr_slice_eq_cstr(p, "/proxy/version")            ? OP_VERSION
             : kvr_slice_eq_cstr(p, "/proxy/models/available") ? OP_AVAILABLE
             : kvr_slice_eq_cstr(p, "/proxy/models/running")   ? OP_RUNNING
             : kvr_slice_eq_cstr(p, "/proxy/models/switch")    ? OP_SWITCH
             : kvr_slice_eq_cstr(p, "/proxy/operations/start") ? OP_START
             : kvr_slice_eq_cstr(p, "/proxy/operations/stop")  ? OP_STOP
                                                               : OP_OTHER;
    kvr_metric_add(px.m_calls, (size_t)op, 1);
    if (!px_auth(req, op))
        return true;
    if (op == OP_OTHER) {
        px_error(req, op, 404, "not_found", "Unknown path.");
        return true;
    }
    bool want_post = op == OP_SWITCH || op == OP_START || op == OP_STOP;
    if (want_post ? !post : !get) {
        px_error(req, op, 405, "method_not_allowed", "Method not allowed for this path.");
        return true;
    }
    if (op == OP_VERSION) {
        handle_version(req);
        return true;
    }
    if (op == OP_AVAILABLE) {
        handle_available(req);
        return true;
    }
    const px_model *m = NULL;
    if (want_post && !(m = body_model(req, op)))
        return true;
    if (!app.nats_on) {
        px_error(req, op, 503, "no_nats", "this frontend has no NATS connection (--nats)");
        return true;
    }
    px_job *j = calloc(1, sizeof *j);
    if (!j) {
        px_error(req, op, 500, "server_error", "out of memory");
        return true;
    }
    j->req = req;
    j->op = op;
    j->target = m;
    int rc;
    if (op == OP_RUNNING || op == OP_SWITCH)
        rc = kvr_nats_request(&app.nats, "kvr.pools.list", "{}", 2, PX_LIST_TIMEOUT_MS, on_list, j);
    else
        rc = send_set(j, m, op == OP_START ? "waking" : "sleeping", on_op_set);
    if (rc != 0) {
        nats_error(req, op, rc);
        job_free(j);
    }
    return true;
}
