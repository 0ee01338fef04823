/* epp_grpc_frame: gRPC's wire format (see epp_grpc_frame.h). */
#include "epp_grpc_frame.h"

#include <stdbool.h>

void epp_grpc_frame_prefix(uint8_t pfx[EPP_GRPC_PREFIX], size_t len)
{
    pfx[0] = 0; /* not compressed */
    pfx[1] = (uint8_t)(len >> 24);
    pfx[2] = (uint8_t)(len >> 16);
    pfx[3] = (uint8_t)(len >> 8);
    pfx[4] = (uint8_t)len;
}

int epp_grpc_deframe(kvr_buf *rest, const uint8_t *data, size_t len, size_t max_message,
                     void (*cb)(const uint8_t *msg, size_t n, void *arg), void *arg)
{
    const uint8_t *p = data;
    size_t n = len;
    bool in_rest = rest->len > 0;
    if (in_rest) {
        if (kvr_buf_append(rest, data, len))
            return EPP_GRPC_RESOURCE_EXHAUSTED;
        p = (const uint8_t *)rest->base;
        n = rest->len;
    }
    size_t off = 0;
    int st = 0;
    while (n - off >= 5) {
        uint8_t flag = p[off];
        uint32_t ml = (uint32_t)p[off + 1] << 24 | (uint32_t)p[off + 2] << 16 |
                      (uint32_t)p[off + 3] << 8 | p[off + 4];
        if (flag & 1) { /* compressed: we announced no grpc-accept-encoding but identity */
            st = EPP_GRPC_UNIMPLEMENTED;
            break;
        }
        if (flag) {
            st = EPP_GRPC_INTERNAL;
            break;
        }
        if (ml > max_message) {
            st = EPP_GRPC_RESOURCE_EXHAUSTED;
            break;
        }
        if (n - off - 5 < ml)
            break;
        cb(p + off + 5, ml, arg);
        off += 5 + (size_t)ml;
    }
    if (st) {
        kvr_buf_reset(rest);
        return st;
    }
    if (in_rest)
        kvr_buf_consume(rest, off);
    else if (off < n && kvr_buf_append(rest, p + off, n - off))
        return EPP_GRPC_RESOURCE_EXHAUSTED;
    return 0;
}

/* grpc-message is percent-encoded (PROTOCOL-HTTP2.md): bytes outside 0x20..0x7E and '%'. */
void epp_grpc_pct_encode(const char *in, char *out, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)in; *p && o + 4 < cap; p++) {
        if (*p < 0x20 || *p > 0x7e || *p == '%') {
            out[o++] = '%';
            out[o++] = hex[*p >> 4];
            out[o++] = hex[*p & 15];
        } else {
            out[o++] = (char)*p;
        }
    }
    out[o] = 0;
}
