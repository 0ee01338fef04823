#include "kvr_heartbeat.h"
#include "kvr_err.h"
#include "kvr_mp.h"

#include <string.h>

/* Bounded before use: the count against KVR_HB_MAX_LORAS, each name against KVR_LORA_NAME_MAX. */
static int read_loras(kvr_mp_reader *r, kvr_heartbeat *hb)
{
    uint32_t n;
    int rc = kvr_mp_read_array(r, &n);
    if (rc)
        return rc;
    if (n > KVR_HB_MAX_LORAS)
        return KVR_ELIMIT;
    for (uint32_t i = 0; i < n; i++) {
        if ((rc = kvr_mp_read_str(r, &hb->loras[i])) != 0)
            return rc;
        if (hb->loras[i].len > KVR_LORA_NAME_MAX)
            return KVR_ELIMIT;
    }
    hb->n_loras = n;
    hb->has |= KVR_HB_LORAS;
    return 0;
}

int kvr_heartbeat_decode(const void *data, size_t len, kvr_heartbeat *hb)
{
    memset(hb, 0, sizeof *hb);
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, data, len);
    uint32_t n;
    int rc = kvr_mp_read_map(&r, &n);
    if (rc)
        return rc;
    static const struct {
        const char *key;
        unsigned bit;
        size_t off;
        int is_str;
    } fields[] = {
        {"id", KVR_HB_ID, offsetof(kvr_heartbeat, id), 0},
        {"namespace", KVR_HB_NAMESPACE, offsetof(kvr_heartbeat, ns), 1},
        {"model", KVR_HB_MODEL, offsetof(kvr_heartbeat, model), 1},
        {"url", KVR_HB_URL, offsetof(kvr_heartbeat, url), 1},
        {"role", KVR_HB_ROLE, offsetof(kvr_heartbeat, role), 1},
        {"block_size", KVR_HB_BLOCK_SIZE, offsetof(kvr_heartbeat, block_size), 0},
        {"capacity_blocks", KVR_HB_CAPACITY, offsetof(kvr_heartbeat, capacity_blocks), 0},
        {"active", KVR_HB_ACTIVE, offsetof(kvr_heartbeat, active), 0},
        {"waiting", KVR_HB_WAITING, offsetof(kvr_heartbeat, waiting), 0},
        {"used_blocks", KVR_HB_USED, offsetof(kvr_heartbeat, used_blocks), 0},
        {"mdc_sum", KVR_HB_MDC_SUM, offsetof(kvr_heartbeat, mdc_sum), 1},
        {"started_ms", KVR_HB_STARTED, offsetof(kvr_heartbeat, started_ms), 0},
    };
    for (uint32_t i = 0; i < n; i++) {
        kvr_slice k;
        if ((rc = kvr_mp_read_str(&r, &k)) != 0)
            return rc;
        size_t f = 0;
        while (f < sizeof fields / sizeof fields[0] && !kvr_slice_eq_cstr(k, fields[f].key))
            f++;
        if (kvr_slice_eq_cstr(k, "loras")) {
            rc = read_loras(&r, hb);
        } else if (f == sizeof fields / sizeof fields[0]) {
            rc = kvr_mp_skip(&r);
        } else {
            char *dst = (char *)hb + fields[f].off;
            rc = fields[f].is_str ? kvr_mp_read_str(&r, (kvr_slice *)(void *)dst)
                                  : kvr_mp_read_uint(&r, (uint64_t *)(void *)dst);
            if (rc == 0)
                hb->has |= fields[f].bit;
        }
        if (rc)
            return rc;
    }
    return 0;
}

static int put_str(kvr_buf *b, const char *key, kvr_slice v)
{
    int rc = kvr_mp_write_cstr(b, key);
    return rc ? rc : kvr_mp_write_str(b, v.base ? v.base : "", v.len);
}

static int put_uint(kvr_buf *b, const char *key, uint64_t v)
{
    int rc = kvr_mp_write_cstr(b, key);
    return rc ? rc : kvr_mp_write_uint(b, v);
}

int kvr_heartbeat_encode(kvr_buf *out, const kvr_heartbeat *hb)
{
    if (hb->n_loras > KVR_HB_MAX_LORAS)
        return KVR_EINVAL;
    for (uint32_t i = 0; i < hb->n_loras; i++)
        if (hb->loras[i].len > KVR_LORA_NAME_MAX)
            return KVR_EINVAL;
    size_t start = out->len;
    int rc = kvr_mp_write_map(out, hb->n_loras ? 13 : 12);
    rc = rc ? rc : put_uint(out, "id", hb->id);
    rc = rc ? rc : put_str(out, "namespace", hb->ns);
    rc = rc ? rc : put_str(out, "model", hb->model);
    rc = rc ? rc : put_str(out, "role", hb->role);
    rc = rc ? rc : put_str(out, "url", hb->url);
    rc = rc ? rc : put_uint(out, "block_size", hb->block_size);
    rc = rc ? rc : put_uint(out, "capacity_blocks", hb->capacity_blocks);
    rc = rc ? rc : put_uint(out, "active", hb->active);
    rc = rc ? rc : put_uint(out, "waiting", hb->waiting);
    rc = rc ? rc : put_uint(out, "used_blocks", hb->used_blocks);
    rc = rc ? rc : put_str(out, "mdc_sum", hb->mdc_sum);
    rc = rc ? rc : put_uint(out, "started_ms", hb->started_ms);
    if (hb->n_loras) {
        rc = rc ? rc : kvr_mp_write_cstr(out, "loras");
        rc = rc ? rc : kvr_mp_write_array(out, hb->n_loras);
        for (uint32_t i = 0; i < hb->n_loras && !rc; i++)
            rc =
                kvr_mp_write_str(out, hb->loras[i].base ? hb->loras[i].base : "", hb->loras[i].len);
    }
    if (rc)
        out->len = start;
    return rc;
}
