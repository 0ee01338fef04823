/* beat_msg: frontend lease and quorum beacon (beat_msg.h). */
#include "beat_msg.h"

#include "kvr_err.h"
#include "kvr_mp.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

/* Decimal digits only, 1..max of them, value >= 1 and no overflow. */
static int parse_id(const char *s, size_t len, size_t max, uint64_t *out)
{
    if (len == 0 || len > max)
        return KVR_EINVAL;
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return KVR_EINVAL;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return KVR_EINVAL;
        v = v * 10 + d;
    }
    if (v == 0)
        return KVR_EINVAL;
    *out = v;
    return 0;
}

int kvr_lease_subject(char *out, size_t cap, uint64_t frontend_id)
{
    int n = snprintf(out, cap, KVR_LEASE_SUBJECT_PREFIX "%" PRIu64, frontend_id);
    return n > 0 && (size_t)n < cap ? 0 : KVR_ELIMIT;
}

int kvr_lease_subject_id(const char *subject, uint64_t *frontend_id)
{
    const char *dot = strrchr(subject, '.');
    if (!dot)
        return KVR_EINVAL;
    return parse_id(dot + 1, strlen(dot + 1), 20, frontend_id);
}

int kvr_lease_encode(kvr_buf *b, const kvr_lease *l)
{
    size_t at = b->len;
    int rc = kvr_mp_write_map(b, 3);
    rc |= kvr_mp_write_cstr(b, "frontend_id");
    rc |= kvr_mp_write_uint(b, l->frontend_id);
    rc |= kvr_mp_write_cstr(b, "ts_ms");
    rc |= kvr_mp_write_uint(b, l->ts_ms);
    rc |= kvr_mp_write_cstr(b, "active");
    rc |= kvr_mp_write_uint(b, l->active);
    if (rc) {
        b->len = at;
        return KVR_ENOMEM;
    }
    return 0;
}

int kvr_lease_decode(const void *data, size_t len, kvr_lease *l)
{
    memset(l, 0, sizeof *l);
    if (len > KVR_LEASE_MAX_BYTES)
        return KVR_ELIMIT;
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, data, len);
    uint32_t n;
    int rc = kvr_mp_read_map(&r, &n);
    for (uint32_t i = 0; rc == 0 && i < n; i++) {
        kvr_slice k;
        if ((rc = kvr_mp_read_str(&r, &k)) != 0)
            break;
        uint64_t *dst = NULL;
        unsigned bit = 0;
        if (kvr_slice_eq_cstr(k, "frontend_id"))
            dst = &l->frontend_id, bit = KVR_LEASE_FRONTEND_ID;
        else if (kvr_slice_eq_cstr(k, "ts_ms"))
            dst = &l->ts_ms, bit = KVR_LEASE_TS;
        else if (kvr_slice_eq_cstr(k, "active"))
            dst = &l->active, bit = KVR_LEASE_ACTIVE;
        if (!dst) {
            rc = kvr_mp_skip(&r);
        } else if ((rc = kvr_mp_read_uint(&r, dst)) == 0) {
            l->has |= bit;
        }
    }
    if (rc == 0 && kvr_mp_remaining(&r) != 0)
        rc = KVR_EINVAL;
    return rc;
}

int kvr_quorum_beacon_encode(char *out, size_t cap, uint64_t router_id)
{
    if (router_id == 0)
        return KVR_EINVAL;
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%" PRIu64, router_id);
    if (n <= 0 || n > KVR_BEACON_MAX || (size_t)n > cap)
        return KVR_ELIMIT;
    memcpy(out, tmp, (size_t)n);
    return n;
}

int kvr_quorum_beacon_decode(const void *data, size_t len, uint64_t *router_id)
{
    return parse_id(data, len, KVR_BEACON_MAX, router_id);
}
