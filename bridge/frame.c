/* bridge/frame: see frame.h for the wire format and its sources. */
#include "frame.h"

#include "kvr_mp.h"

#include <string.h>

int kvr_bridge_read_seq(const void *p, size_t len, uint64_t *seq)
{
    if (len != 8)
        return KVR_EINVAL;
    const uint8_t *b = p;
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | b[i];
    *seq = v;
    return 0;
}

int kvr_bridge_parse_replay(const kvr_bridge_frame *f, size_t n, uint64_t *seq,
                            kvr_bridge_frame *payload, kvr_err *err)
{
    /* [seq, payload] (vLLM before #45177, SGLang) or [topic, seq, payload] (#45177). */
    if (n != 2 && n != 3)
        return kvr_err_set(err, KVR_EINVAL,
                           "replay reply: %zu frames after the delimiter, want 2 or 3", n);
    const kvr_bridge_frame *s = &f[n - 2];
    if (kvr_bridge_read_seq(s->data, s->len, seq) != 0)
        return kvr_err_set(err, KVR_EINVAL, "replay reply: seq frame of %zu bytes, want 8", s->len);
    *payload = f[n - 1];
    return 0;
}

/* Is the event at [p, p+n) valid alone? Decodes it as the batch [0, [event]]. */
static bool event_ok(kvr_kv_decoder *d, kvr_buf *scratch, const uint8_t *p, size_t n)
{
    kvr_buf_reset(scratch);
    static const uint8_t head[] = {0x92, 0x00, 0x91};
    if (kvr_buf_append(scratch, head, sizeof head) != 0 || kvr_buf_append(scratch, p, n) != 0)
        return false;
    kvr_kv_batch b;
    return kvr_kv_decode(d, scratch->base, scratch->len, &b, NULL, NULL) == 0;
}

/* Copies the events array at r into out with only the events that decode alone. */
static int filter_events(kvr_kv_decoder *d, kvr_mp_reader *r, kvr_buf *out, kvr_buf *scratch,
                         kvr_bridge_check *res, kvr_err *err)
{
    uint32_t n;
    if (kvr_mp_read_array(r, &n) != 0)
        return kvr_err_set(err, KVR_EINVAL, "batch: events is not an array");
    if (n > d->limits.max_events)
        return kvr_err_set(err, KVR_EINVAL, "batch: %u events, limit %u", n, d->limits.max_events);
    /* One pass: the good events go behind an array32 header whose count is patched at the
     * end (msgpack allows the longer form). Each event's bytes are found with kvr_mp_skip
     * (depth-bounded). */
    size_t hdr = out->len;
    static const uint8_t a32[5] = {0xdd, 0, 0, 0, 0};
    if (kvr_buf_append(out, a32, sizeof a32) != 0)
        return KVR_ENOMEM;
    uint32_t good = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *p = r->p;
        if (kvr_mp_skip(r) != 0)
            return kvr_err_set(err, KVR_EINVAL, "batch: event %u is truncated", i);
        size_t elen = (size_t)(r->p - p);
        if (!event_ok(d, scratch, p, elen))
            continue;
        if (kvr_buf_append(out, p, elen) != 0)
            return KVR_ENOMEM;
        good++;
    }
    uint8_t *h = (uint8_t *)out->base + hdr + 1;
    h[0] = (uint8_t)(good >> 24), h[1] = (uint8_t)(good >> 16), h[2] = (uint8_t)(good >> 8);
    h[3] = (uint8_t)good;
    res->good = good;
    res->bad = n - good;
    return 0;
}

int kvr_bridge_check_batch(kvr_kv_decoder *d, const void *data, size_t len, kvr_buf *out,
                           kvr_buf *scratch, kvr_bridge_check *res, kvr_err *err)
{
    memset(res, 0, sizeof *res);
    kvr_buf_reset(out);
    if (len > d->limits.max_payload_bytes)
        return kvr_err_set(err, KVR_EINVAL, "batch of %zu bytes, limit %zu", len,
                           d->limits.max_payload_bytes);
    kvr_kv_batch b;
    kvr_err derr = {0};
    if (kvr_kv_decode(d, data, len, &b, NULL, &derr) == 0) {
        res->good = b.n_events;
        return 0;
    }
    /* Rejected whole: rebuild the envelope around the events that decode alone. Every
     * element of the envelope other than the events is copied byte for byte. */
    res->rewritten = true;
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, data, len);
    uint32_t n;
    bool found = false;
    int rc;
    if (kvr_mp_peek(&r) == KVR_MP_ARRAY) {
        kvr_mp_read_array(&r, &n);
        if (n < 2 || kvr_mp_write_array(out, n) != 0)
            return kvr_err_set(err, KVR_EINVAL, "batch: array of %u elements (%s)", n, derr.msg);
        for (uint32_t i = 0; i < n; i++) {
            if (i == 1) {
                if ((rc = filter_events(d, &r, out, scratch, res, err)) != 0)
                    return rc;
                found = true;
                continue;
            }
            const uint8_t *p = r.p;
            if (kvr_mp_skip(&r) != 0 || kvr_buf_append(out, p, (size_t)(r.p - p)) != 0)
                return kvr_err_set(err, KVR_EINVAL, "batch: element %u truncated (%s)", i,
                                   derr.msg);
        }
    } else if (kvr_mp_peek(&r) == KVR_MP_MAP) {
        kvr_mp_read_map(&r, &n);
        if (kvr_mp_write_map(out, n) != 0)
            return KVR_ENOMEM;
        for (uint32_t i = 0; i < n; i++) {
            const uint8_t *k = r.p;
            kvr_slice key = {0};
            bool is_events = kvr_mp_peek(&r) == KVR_MP_STR && kvr_mp_read_str(&r, &key) == 0 &&
                             kvr_slice_eq_cstr(key, "events");
            if (!is_events) {
                r.p = k;
                if (kvr_mp_skip(&r) != 0)
                    return kvr_err_set(err, KVR_EINVAL, "batch: key %u truncated (%s)", i,
                                       derr.msg);
            }
            if (kvr_buf_append(out, k, (size_t)(r.p - k)) != 0)
                return KVR_ENOMEM;
            if (is_events && !found) {
                if ((rc = filter_events(d, &r, out, scratch, res, err)) != 0)
                    return rc;
                found = true;
                continue;
            }
            const uint8_t *p = r.p;
            if (kvr_mp_skip(&r) != 0 || kvr_buf_append(out, p, (size_t)(r.p - p)) != 0)
                return kvr_err_set(err, KVR_EINVAL, "batch: value %u truncated (%s)", i, derr.msg);
        }
    } else {
        return kvr_err_set(err, KVR_EINVAL, "batch is neither array nor map (%s)", derr.msg);
    }
    if (!found)
        return kvr_err_set(err, KVR_EINVAL, "batch without events (%s)", derr.msg);
    if (kvr_mp_remaining(&r) != 0)
        return kvr_err_set(err, KVR_EINVAL, "batch: %zu trailing bytes", kvr_mp_remaining(&r));
    /* The rebuilt batch must now decode (e.g. not ts of the wrong type); else it is garbage. */
    if (res->good > 0 && kvr_kv_decode(d, out->base, out->len, &b, NULL, &derr) != 0)
        return kvr_err_set(err, KVR_EINVAL, "batch envelope: %s", derr.msg);
    return 0;
}

int kvr_bridge_encode_clear(kvr_buf *out, double ts, int64_t dp_rank)
{
    kvr_buf_reset(out);
    kvr_kv_event ev = {.type = KVR_KV_CLEARED};
    kvr_kv_batch b = {
        .ts = ts, .has_dp_rank = true, .dp_rank = dp_rank, .n_events = 1, .events = &ev};
    return kvr_kv_encode(out, &b, KVR_KV_FORMAT_ARRAY, KVR_KV_HASH_INT);
}
