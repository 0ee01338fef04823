#include "trace.h"

#include "kvr_hash.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

kvr_trace_limits kvr_trace_limits_default(void)
{
    return (kvr_trace_limits){
        .max_line_bytes = 16u << 20,
        .max_hash_ids = 1u << 20,
        .max_requests = 10u * 1000 * 1000,
    };
}

static inline uint32_t to_token(uint64_t m)
{
    return KVR_TRACE_TOKEN_MIN + (uint32_t)(m % (KVR_TRACE_VOCAB - KVR_TRACE_TOKEN_MIN));
}

uint32_t kvr_trace_token(uint64_t hash_id, uint32_t k)
{
    return to_token(kvr_mix64(kvr_mix64(hash_id ^ 0x6b76726f75746531ULL) + k));
}

void kvr_trace_block_tokens(uint64_t hash_id, uint32_t trace_block_size, uint32_t *out)
{
    uint64_t base = kvr_mix64(hash_id ^ 0x6b76726f75746531ULL);
    for (uint32_t k = 0; k < trace_block_size; k++)
        out[k] = to_token(kvr_mix64(base + k));
}

size_t kvr_trace_prompt(const kvr_trace_req *r, uint64_t req_index, uint32_t trace_block_size,
                        uint32_t *out, size_t max_out)
{
    if (trace_block_size == 0)
        trace_block_size = KVR_TRACE_DEFAULT_BLOCK_SIZE;
    size_t n = r->input_length;
    if (n > max_out)
        n = max_out;
    size_t pos = 0;
    for (uint32_t b = 0; b < r->n_hash_ids && pos < n; b++) {
        uint64_t base = kvr_mix64(r->hash_ids[b] ^ 0x6b76726f75746531ULL);
        for (uint32_t k = 0; k < trace_block_size && pos < n; k++)
            out[pos++] = to_token(kvr_mix64(base + k));
    }
    /* Past the hashed blocks: unique to this request (a different salt than hash ids use). */
    uint64_t ubase = kvr_mix64(req_index ^ 0x7571756e69717565ULL);
    for (uint64_t k = 0; pos < n; k++)
        out[pos++] = to_token(kvr_mix64(ubase + k));
    return n;
}

static int get_uint(const cJSON *o, const char *key, double max, bool required, double *out,
                    kvr_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v) {
        if (!required) {
            *out = 0;
            return 0;
        }
        return kvr_err_set(err, KVR_EINVAL, "missing \"%s\"", key);
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble < 0 ||
        v->valuedouble > max || v->valuedouble != floor(v->valuedouble))
        return kvr_err_set(err, KVR_EINVAL, "\"%s\" is not an integer in [0, %.0f]", key, max);
    *out = v->valuedouble;
    return 0;
}

int kvr_trace_parse_line(const char *line, size_t len, kvr_trace_req *req, uint64_t *ids,
                         uint32_t ids_cap, kvr_err *err)
{
    int rc = 0;
    cJSON *o = cJSON_ParseWithLength(line, len);
    if (!o || !cJSON_IsObject(o)) {
        rc = kvr_err_set(err, KVR_EINVAL, "not a JSON object");
        goto out;
    }
    double ts, in, outl;
    if ((rc = get_uint(o, "timestamp", 9007199254740991.0, true, &ts, err)) ||
        (rc = get_uint(o, "input_length", 4294967295.0, true, &in, err)) ||
        (rc = get_uint(o, "output_length", 4294967295.0, false, &outl, err)))
        goto out;
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(o, "hash_ids");
    if (!h || !cJSON_IsArray(h)) {
        rc = kvr_err_set(err, KVR_EINVAL, "missing or non-array \"hash_ids\"");
        goto out;
    }
    uint32_t n = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, h)
    {
        if (n >= ids_cap) {
            rc = kvr_err_set(err, KVR_ELIMIT, "more than %u hash_ids", ids_cap);
            goto out;
        }
        /* Ids beyond 2^53 cannot be represented exactly in a double: refuse them. */
        if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble) || e->valuedouble < 0 ||
            e->valuedouble > 9007199254740991.0 || e->valuedouble != floor(e->valuedouble)) {
            rc = kvr_err_set(err, KVR_EINVAL, "hash_ids[%u] is not a non-negative integer", n);
            goto out;
        }
        ids[n++] = (uint64_t)e->valuedouble;
    }
    req->timestamp_ms = (int64_t)ts;
    req->input_length = (uint32_t)in;
    req->output_length = (uint32_t)outl;
    req->n_hash_ids = n;
    req->hash_ids = ids;
out:
    cJSON_Delete(o);
    return rc;
}

void kvr_trace_free(kvr_trace *t)
{
    if (!t)
        return;
    free(t->reqs);
    free(t->ids);
    memset(t, 0, sizeof *t);
}

int kvr_trace_load(const char *path, const kvr_trace_limits *limits, kvr_trace *out, kvr_err *err)
{
    kvr_trace_limits lim = limits ? *limits : kvr_trace_limits_default();
    memset(out, 0, sizeof *out);
    int rc = 0;
    char *line = NULL;
    uint64_t *scratch = NULL;
    size_t reqs_cap = 0, ids_cap = 0;
    size_t lineno = 0;
    struct stat st;
    if (stat(path, &st) != 0)
        return kvr_err_set(err, errno == ENOENT ? KVR_ENOTFOUND : KVR_EIO, "trace %s: %s", path,
                           strerror(errno));
    gzFile gz = gzopen(path, "rb");
    if (!gz)
        return kvr_err_set(err, KVR_EIO, "trace %s: cannot open", path);
    if (lim.max_line_bytes < 16 || lim.max_line_bytes > (1u << 30) || lim.max_hash_ids == 0) {
        rc = kvr_err_set(err, KVR_EINVAL, "trace %s: bad limits", path);
        goto fail;
    }
    /* +2: the newline and gzgets' terminating NUL. */
    line = malloc(lim.max_line_bytes + 2);
    scratch = malloc(sizeof *scratch * lim.max_hash_ids);
    if (!line || !scratch) {
        rc = kvr_err_set(err, KVR_ENOMEM, "trace %s: out of memory", path);
        goto fail;
    }
    while (gzgets(gz, line, (int)(lim.max_line_bytes + 2))) {
        lineno++;
        size_t len = strlen(line);
        bool nl = len > 0 && line[len - 1] == '\n';
        if (!nl && !gzeof(gz)) {
            rc = kvr_err_set(err, KVR_ELIMIT, "trace %s:%zu: line longer than %zu bytes", path,
                             lineno, lim.max_line_bytes);
            goto fail;
        }
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' '))
            len--;
        if (len == 0)
            continue;
        if (len > lim.max_line_bytes) {
            rc = kvr_err_set(err, KVR_ELIMIT, "trace %s:%zu: line longer than %zu bytes", path,
                             lineno, lim.max_line_bytes);
            goto fail;
        }
        if (out->n >= lim.max_requests) {
            rc = kvr_err_set(err, KVR_ELIMIT, "trace %s:%zu: more than %zu requests", path, lineno,
                             lim.max_requests);
            goto fail;
        }
        kvr_trace_req r;
        rc = kvr_trace_parse_line(line, len, &r, scratch, lim.max_hash_ids, err);
        if (rc) {
            kvr_err_wrap(err, rc, "trace %s:%zu", path, lineno);
            goto fail;
        }
        if (out->n == reqs_cap) {
            size_t nc = reqs_cap ? reqs_cap * 2 : 1024;
            kvr_trace_req *p = realloc(out->reqs, nc * sizeof *p);
            if (!p) {
                rc = kvr_err_set(err, KVR_ENOMEM, "trace %s: out of memory", path);
                goto fail;
            }
            out->reqs = p;
            reqs_cap = nc;
        }
        if (out->n_ids + r.n_hash_ids > ids_cap) {
            size_t nc = ids_cap ? ids_cap * 2 : 16384;
            while (nc < out->n_ids + r.n_hash_ids)
                nc *= 2;
            uint64_t *p = realloc(out->ids, nc * sizeof *p);
            if (!p) {
                rc = kvr_err_set(err, KVR_ENOMEM, "trace %s: out of memory", path);
                goto fail;
            }
            out->ids = p;
            ids_cap = nc;
        }
        if (r.n_hash_ids)
            memcpy(out->ids + out->n_ids, scratch, r.n_hash_ids * sizeof *scratch);
        for (uint32_t i = 0; i < r.n_hash_ids; i++)
            if (scratch[i] > out->max_hash_id)
                out->max_hash_id = scratch[i];
        /* Stored as an offset until the pool stops moving. */
        r.hash_ids = (const uint64_t *)(uintptr_t)out->n_ids;
        out->n_ids += r.n_hash_ids;
        out->reqs[out->n++] = r;
    }
    if (!gzeof(gz)) {
        int zerr = 0;
        const char *m = gzerror(gz, &zerr);
        rc = kvr_err_set(err, KVR_EIO, "trace %s:%zu: read error: %s", path, lineno + 1,
                         m ? m : "unknown");
        goto fail;
    }
    for (size_t i = 0; i < out->n; i++)
        out->reqs[i].hash_ids = out->ids + (uintptr_t)out->reqs[i].hash_ids;
    gzclose(gz);
    free(line);
    free(scratch);
    return 0;
fail:
    gzclose(gz);
    free(line);
    free(scratch);
    kvr_trace_free(out);
    return rc;
}

size_t kvr_trace_slice(const kvr_trace *t, double speedup, double duration_s, long max_requests)
{
    size_t n = 0;
    int64_t ts0 = t->n ? t->reqs[0].timestamp_ms : 0;
    if (!(speedup > 0))
        speedup = 1;
    while (n < t->n) {
        double at = (double)(t->reqs[n].timestamp_ms - ts0) / 1000.0 / speedup;
        if (duration_s > 0 && at >= duration_s)
            break;
        if (max_requests > 0 && (long)n >= max_requests)
            break;
        n++;
    }
    return n;
}
