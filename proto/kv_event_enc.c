/* kv_event_enc.c: vLLM KV-event batch encoder (see kv_event.h, DESIGN section 3), array or map
 * form, hashes as integers or 32-byte strings; the decoder is kv_event.c. Used by the simulated
 * worker, the bridge tests and the golden-vector and fuzz round trips. */
#include "kv_event.h"

#include "kvr_hash.h"
#include "kvr_mp.h"

#include <string.h>

static inline void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

void kvr_kv_hash_to_bytes(uint64_t h, uint8_t out[32])
{
    /* Four splitmix64 outputs from state h: deterministic, and distinct h give distinct
     * first words (splitmix64's finaliser is a bijection). */
    uint64_t s = h;
    for (int i = 0; i < 4; i++) {
        s += 0x9e3779b97f4a7c15ull;
        uint64_t z = s;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        put_le64(out + 8 * i, z);
    }
}

uint64_t kvr_kv_hash_bytes_id(uint64_t h)
{
    uint8_t b[32];
    kvr_kv_hash_to_bytes(h, b);
    return kvr_hash_bytes(b, sizeof b);
}

#define TRY(x)                                                                                     \
    do {                                                                                           \
        if ((rv = (x)) != 0)                                                                       \
            return rv;                                                                             \
    } while (0)

static int enc_hash(kvr_buf *b, uint64_t h, kvr_kv_hash_format hfmt)
{
    if (hfmt == KVR_KV_HASH_BYTES) {
        uint8_t bytes[32];
        kvr_kv_hash_to_bytes(h, bytes);
        return kvr_mp_write_bin(b, bytes, sizeof bytes);
    }
    return kvr_mp_write_uint(b, h);
}

static int enc_hashes(kvr_buf *b, const kvr_kv_event *ev, kvr_kv_hash_format hfmt)
{
    int rv;
    TRY(kvr_mp_write_array(b, ev->n_hashes));
    for (uint32_t i = 0; i < ev->n_hashes; i++)
        TRY(enc_hash(b, ev->hashes[i], hfmt));
    return 0;
}

static int enc_stored_fields(kvr_buf *b, const kvr_kv_event *ev, kvr_kv_format fmt,
                             kvr_kv_hash_format hfmt)
{
    int rv;
    bool map = fmt == KVR_KV_FORMAT_MAP;
    if (map)
        TRY(kvr_mp_write_cstr(b, "block_hashes"));
    TRY(enc_hashes(b, ev, hfmt));
    if (map)
        TRY(kvr_mp_write_cstr(b, "parent_block_hash"));
    TRY(ev->has_parent ? enc_hash(b, ev->parent, hfmt) : kvr_mp_write_nil(b));
    if (map)
        TRY(kvr_mp_write_cstr(b, "token_ids"));
    TRY(kvr_mp_write_array(b, ev->n_tokens));
    for (uint32_t i = 0; i < ev->n_tokens; i++)
        TRY(kvr_mp_write_uint(b, ev->tokens[i]));
    if (map)
        TRY(kvr_mp_write_cstr(b, "block_size"));
    TRY(kvr_mp_write_uint(b, ev->block_size));
    if (!map || ev->has_lora_id) { /* omit_defaults: lora_id None is left out of the map form */
        if (map)
            TRY(kvr_mp_write_cstr(b, "lora_id"));
        TRY(ev->has_lora_id ? kvr_mp_write_int(b, ev->lora_id) : kvr_mp_write_nil(b));
    }
    if (!ev->lora_name.len)
        return 0;
    if (!map)
        TRY(kvr_mp_write_nil(b)); /* medium */
    else
        TRY(kvr_mp_write_cstr(b, "lora_name"));
    return kvr_mp_write_str(b, ev->lora_name.base, ev->lora_name.len);
}

static int enc_event(kvr_buf *b, const kvr_kv_event *ev, kvr_kv_format fmt, kvr_kv_hash_format hfmt)
{
    int rv;
    bool map = fmt == KVR_KV_FORMAT_MAP;
    const char *tag;
    uint32_t nf;
    switch (ev->type) {
    case KVR_KV_STORED:
        tag = "BlockStored";
        nf = map ? 5u + ev->has_lora_id + (ev->lora_name.len > 0) : ev->lora_name.len ? 8 : 6;
        break;
    case KVR_KV_REMOVED:
        tag = "BlockRemoved";
        nf = 2;
        break;
    case KVR_KV_CLEARED:
        tag = "AllBlocksCleared";
        nf = 1;
        break;
    default:
        return KVR_EINVAL;
    }
    TRY(map ? kvr_mp_write_map(b, nf) : kvr_mp_write_array(b, nf));
    if (map)
        TRY(kvr_mp_write_cstr(b, "type"));
    TRY(kvr_mp_write_cstr(b, tag));
    if (ev->type == KVR_KV_STORED)
        return enc_stored_fields(b, ev, fmt, hfmt);
    if (ev->type == KVR_KV_REMOVED) {
        if (map)
            TRY(kvr_mp_write_cstr(b, "block_hashes"));
        return enc_hashes(b, ev, hfmt);
    }
    return 0;
}

static int encode(kvr_buf *out, const kvr_kv_batch *batch, kvr_kv_format fmt,
                  kvr_kv_hash_format hfmt)
{
    int rv;
    bool map = fmt == KVR_KV_FORMAT_MAP;
    uint32_t n = batch->has_dp_rank ? 3 : 2;
    TRY(map ? kvr_mp_write_map(out, n) : kvr_mp_write_array(out, n));
    if (map)
        TRY(kvr_mp_write_cstr(out, "ts"));
    TRY(kvr_mp_write_double(out, batch->ts));
    if (map)
        TRY(kvr_mp_write_cstr(out, "events"));
    TRY(kvr_mp_write_array(out, batch->n_events));
    for (uint32_t i = 0; i < batch->n_events; i++)
        TRY(enc_event(out, &batch->events[i], fmt, hfmt));
    if (batch->has_dp_rank) {
        if (map)
            TRY(kvr_mp_write_cstr(out, "data_parallel_rank"));
        TRY(kvr_mp_write_int(out, batch->dp_rank));
    }
    return 0;
}

int kvr_kv_encode(kvr_buf *out, const kvr_kv_batch *batch, kvr_kv_format fmt,
                  kvr_kv_hash_format hfmt)
{
    size_t start = out->len;
    int rv = encode(out, batch, fmt, hfmt);
    if (rv != 0)
        out->len = start; /* all or nothing */
    return rv;
}
