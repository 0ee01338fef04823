/* Shared by the KV-event fuzzer, the seed replay and the unit tests: deep comparison of two
 * decoded batches, and the encode -> decode round trip in all four format combinations. */
#ifndef KVR_KV_CHECK_H
#define KVR_KV_CHECK_H

#include "kv_event.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* The hash a decoder reports after `h` went through an encoder in format hfmt. */
static inline uint64_t kvc_hash_after(uint64_t h, kvr_kv_hash_format hfmt)
{
    return hfmt == KVR_KV_HASH_BYTES ? kvr_kv_hash_bytes_id(h) : h;
}

/* 0 when b is what decoding a re-encoding of a (in hash format hfmt) must give; else -1 with
 * the first difference in why. */
static inline int kvc_batch_equal(const kvr_kv_batch *a, const kvr_kv_batch *b,
                                  kvr_kv_hash_format hfmt, char *why, size_t cap)
{
#define KVC_DIFF(...)                                                                      \
    do {                                                                                   \
        snprintf(why, cap, __VA_ARGS__);                                                   \
        return -1;                                                                         \
    } while (0)
    if (memcmp(&a->ts, &b->ts, sizeof a->ts) != 0 && !(a->ts == b->ts))
        KVC_DIFF("ts %a != %a", a->ts, b->ts);
    if (a->has_dp_rank != b->has_dp_rank || (a->has_dp_rank && a->dp_rank != b->dp_rank))
        KVC_DIFF("dp_rank differs");
    if (a->n_events != b->n_events)
        KVC_DIFF("n_events %u != %u", a->n_events, b->n_events);
    for (uint32_t i = 0; i < a->n_events; i++) {
        const kvr_kv_event *x = &a->events[i], *y = &b->events[i];
        if (x->type != y->type)
            KVC_DIFF("event %u: type %d != %d", i, x->type, y->type);
        if (x->n_hashes != y->n_hashes)
            KVC_DIFF("event %u: n_hashes %u != %u", i, x->n_hashes, y->n_hashes);
        for (uint32_t j = 0; j < x->n_hashes; j++)
            if (kvc_hash_after(x->hashes[j], hfmt) != y->hashes[j])
                KVC_DIFF("event %u: hash %u differs", i, j);
        if (x->has_parent != y->has_parent ||
            (x->has_parent && kvc_hash_after(x->parent, hfmt) != y->parent))
            KVC_DIFF("event %u: parent differs", i);
        if (x->n_tokens != y->n_tokens)
            KVC_DIFF("event %u: n_tokens %u != %u", i, x->n_tokens, y->n_tokens);
        if (x->n_tokens && memcmp(x->tokens, y->tokens, x->n_tokens * sizeof *x->tokens) != 0)
            KVC_DIFF("event %u: tokens differ", i);
        if (x->block_size != y->block_size)
            KVC_DIFF("event %u: block_size %u != %u", i, x->block_size, y->block_size);
        if (x->has_lora_id != y->has_lora_id || (x->has_lora_id && x->lora_id != y->lora_id))
            KVC_DIFF("event %u: lora_id differs", i);
    }
    return 0;
#undef KVC_DIFF
}

/* Encodes a in all four (format, hash format) combinations and decodes each with a decoder
 * using lim (payload and hash-length bounds widened to fit the re-encoding); 0 when every
 * decode gives back a, else -1 with why. a must not borrow from that decoder. */
static inline int kvc_roundtrip(const kvr_kv_batch *a, const kvr_kv_limits *lim, char *why,
                                size_t cap)
{
    kvr_kv_limits l = *lim;
    l.max_payload_bytes = SIZE_MAX;
    if (l.max_hash_bytes < 32)
        l.max_hash_bytes = 32;
    kvr_kv_decoder d;
    kvr_kv_decoder_init(&d, &l);
    kvr_buf buf;
    kvr_buf_init(&buf);
    int rc = 0;
    for (int f = 0; f < 2 && rc == 0; f++) {
        for (int h = 0; h < 2 && rc == 0; h++) {
            kvr_buf_reset(&buf);
            if (kvr_kv_encode(&buf, a, (kvr_kv_format)f, (kvr_kv_hash_format)h) != 0) {
                snprintf(why, cap, "encode %d/%d failed", f, h);
                rc = -1;
                break;
            }
            kvr_kv_batch b;
            kvr_err err = {0};
            if (kvr_kv_decode(&d, buf.base, buf.len, &b, NULL, &err) != 0) {
                snprintf(why, cap, "re-decode %s/%s: %.200s", f ? "map" : "array",
                         h ? "bytes" : "int", err.msg);
                rc = -1;
                break;
            }
            char sub[256];
            if (kvc_batch_equal(a, &b, (kvr_kv_hash_format)h, sub, sizeof sub) != 0) {
                snprintf(why, cap, "round trip %s/%s: %s", f ? "map" : "array",
                         h ? "bytes" : "int", sub);
                rc = -1;
            }
        }
    }
    kvr_buf_free(&buf);
    kvr_kv_decoder_free(&d);
    return rc;
}

#endif
