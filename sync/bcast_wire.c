/* bcast_wire: the best-effort booking broadcast (bcast_wire.h). */
#include "bcast_wire.h"

#include "kvr_mp.h"

int kvr_bcast_encode(kvr_buf *out, uint64_t router_id, const kvr_cmd *cmd)
{
    kvr_buf cb;
    kvr_buf_init(&cb);
    size_t at = out->len;
    int rc = kvr_cmd_encode(cmd, &cb, NULL);
    if (rc == 0 && (kvr_mp_write_array(out, 2) != 0 || kvr_mp_write_uint(out, router_id) != 0 ||
                    kvr_mp_write_bin(out, cb.base, cb.len) != 0)) {
        out->len = at;
        rc = KVR_ENOMEM;
    }
    kvr_buf_free(&cb);
    return rc;
}

int kvr_bcast_decode(const void *data, size_t len, uint64_t *router_id, kvr_cmd *cmd,
                     kvr_route_candidate *cand)
{
    if (len > KVR_BCAST_MAX_BYTES)
        return KVR_ELIMIT;
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, data, len);
    uint32_t n;
    kvr_slice bin;
    if (kvr_mp_read_array(&r, &n) != 0 || n != 2 || kvr_mp_read_uint(&r, router_id) != 0 ||
        kvr_mp_read_bin(&r, &bin) != 0)
        return KVR_EINVAL;
    return kvr_cmd_decode(bin.base, bin.len, cmd, cand, NULL);
}
