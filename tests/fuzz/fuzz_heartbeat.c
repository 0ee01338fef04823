/* libFuzzer target for the worker presence codec (proto/kvr_heartbeat.h, DESIGN section 4): the
 * bytes any NATS peer can publish on kvr.workers.<ns>.<id>, decoded by every router and
 * frontend. Whatever decodes must respect the adapter bounds, re-encode, and decode again to the
 * same heartbeat (encoder and decoder agree on every message a peer can send); a refusal must be
 * one of the codec's documented errors. Any violation aborts. */
#include "fuzz_check.h"
#include "kvr_buf.h"
#include "kvr_err.h"
#include "kvr_heartbeat.h"

#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int same(kvr_slice a, kvr_slice b)
{
    return a.len == b.len && (a.len == 0 || memcmp(a.base, b.base, a.len) == 0);
}

/* The decoded slices borrow the input: they must lie inside it. */
static int inside(kvr_slice s, const uint8_t *data, size_t size)
{
    if (s.len == 0)
        return 1;
    const uint8_t *p = (const uint8_t *)s.base;
    return p >= data && s.len <= size && p - data <= (ptrdiff_t)(size - s.len);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static kvr_heartbeat a, c; /* ~2 KiB each: keep them off the fuzzer's stack */
    int rc = kvr_heartbeat_decode(data, size, &a);
    if (rc != 0) {
        CHECK(rc == KVR_ETYPE || rc == KVR_ETRUNC || rc == KVR_ELIMIT);
        return 0;
    }
    CHECK(a.n_loras <= KVR_HB_MAX_LORAS);
    CHECK((a.n_loras == 0) || (a.has & KVR_HB_LORAS));
    for (uint32_t i = 0; i < a.n_loras; i++)
        CHECK(a.loras[i].len <= KVR_LORA_NAME_MAX && inside(a.loras[i], data, size));
    CHECK(inside(a.ns, data, size) && inside(a.model, data, size) && inside(a.url, data, size) &&
          inside(a.role, data, size) && inside(a.mdc_sum, data, size));

    kvr_buf b;
    kvr_buf_init(&b);
    CHECK(kvr_heartbeat_encode(&b, &a) == 0);
    CHECK(kvr_heartbeat_decode(b.base, b.len, &c) == 0);
    /* The encoder writes every key, so the second decode has them all. */
    unsigned all = (KVR_HB_LORAS << 1) - 1;
    CHECK(c.has == (a.n_loras ? all : (all & ~(unsigned)KVR_HB_LORAS)));
    CHECK(a.id == c.id && a.block_size == c.block_size && a.capacity_blocks == c.capacity_blocks);
    CHECK(a.active == c.active && a.waiting == c.waiting && a.used_blocks == c.used_blocks);
    CHECK(a.started_ms == c.started_ms);
    CHECK(same(a.ns, c.ns) && same(a.model, c.model) && same(a.url, c.url) &&
          same(a.role, c.role) && same(a.mdc_sum, c.mdc_sum));
    CHECK(a.n_loras == c.n_loras);
    for (uint32_t i = 0; i < a.n_loras; i++)
        CHECK(same(a.loras[i], c.loras[i]));
    kvr_buf_free(&b);
    return 0;
}
