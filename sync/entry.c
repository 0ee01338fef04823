#include "entry.h"

#include <string.h>

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

int kvr_entry_begin(kvr_buf *out, uint32_t origin, uint64_t nonce, uint64_t seq)
{
    uint8_t h[KVR_ENTRY_HDR_LEN] = {'K', 'B', 1, 0};
    put32(h + 4, origin);
    put64(h + 8, nonce);
    put64(h + 16, seq);
    put32(h + 24, 0);
    put32(h + 28, 0);
    return kvr_buf_append(out, h, sizeof h);
}

int kvr_entry_add(kvr_buf *out, size_t start, const void *cmd, size_t len)
{
    if (len > KVR_CMD_MAX_BYTES)
        return KVR_ELIMIT;
    uint8_t *h = (uint8_t *)out->base + start;
    uint32_t n = get32(h + 24);
    if (n >= KVR_ENTRY_MAX_COMMANDS)
        return KVR_ELIMIT;
    uint8_t l[4];
    put32(l, (uint32_t)len);
    size_t keep = out->len;
    int rc = kvr_buf_append(out, l, 4);
    if (!rc)
        rc = kvr_buf_append(out, cmd, len);
    if (rc) {
        out->len = keep;
        return rc;
    }
    put32((uint8_t *)out->base + start + 24, n + 1); /* base may have moved */
    return 0;
}

int kvr_entry_apply(kvr_fsm *f, const void *buf, size_t len, kvr_entry_header *hdr,
                    kvr_entry_result_fn fn, void *data)
{
    const uint8_t *p = buf;
    memset(hdr, 0, sizeof *hdr);
    if (len < KVR_ENTRY_HDR_LEN || p[0] != 'K' || p[1] != 'B' || p[2] != 1)
        return KVR_ECORRUPT;
    uint32_t count = get32(p + 24);
    /* every command takes at least 5 bytes: a count beyond that is a lie */
    if (count > KVR_ENTRY_MAX_COMMANDS || count > (len - KVR_ENTRY_HDR_LEN) / 5)
        return KVR_ECORRUPT;
    hdr->origin = get32(p + 4);
    hdr->nonce = get64(p + 8);
    hdr->seq = get64(p + 16);
    hdr->count = count;
    size_t off = KVR_ENTRY_HDR_LEN;
    kvr_fsm_result res;
    for (uint32_t i = 0; i < count; i++) {
        if (len - off < 4) {
            memset(&res, 0, sizeof res);
            res.outcome = KVR_OUT_INVALID;
            if (fn)
                fn(data, i, &res);
            continue;
        }
        uint32_t n = get32(p + off);
        off += 4;
        if (n > len - off) {
            memset(&res, 0, sizeof res);
            res.outcome = KVR_OUT_INVALID;
            off = len;
        } else {
            kvr_fsm_apply_bytes(f, p + off, n, &res);
            off += n;
        }
        if (fn)
            fn(data, i, &res);
    }
    return 0;
}
