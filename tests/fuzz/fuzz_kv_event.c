/* libFuzzer target: kvr_kv_decode on arbitrary bytes with small limits. A rejection must be
 * counted exactly once with a reason and a message and return no partial batch; an accepted
 * batch must survive encode -> decode in all four formats unchanged. Any violation aborts. */
#include "kv_check.h"
#include "kv_event.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t rejected_total(const kvr_kv_decoder *d)
{
    uint64_t n = 0;
    for (int i = 0; i < KVR_KV_REJ__COUNT; i++)
        n += d->rejected[i];
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static kvr_kv_decoder d;
    static int ready;
    if (!ready) {
        kvr_kv_limits l = kvr_kv_limits_default();
        l.max_payload_bytes = 1 << 16;
        l.max_events = 64;
        l.max_hashes = 64;
        l.max_tokens = 4096;
        l.max_block_size = 64;
        l.max_hash_bytes = 48;
        kvr_kv_decoder_init(&d, &l);
        ready = 1;
    }
    kvr_kv_batch b;
    kvr_kv_reject reason = KVR_KV_REJ__COUNT;
    kvr_err err = {0};
    uint64_t rej = rejected_total(&d), ok = d.decoded;
    int rv = kvr_kv_decode(&d, data, size, &b, &reason, &err);
    if (rv != 0) {
        if (rv >= 0 || reason <= KVR_KV_REJ_NONE || reason >= KVR_KV_REJ__COUNT ||
            rejected_total(&d) != rej + 1 || d.decoded != ok || err.code != rv ||
            err.msg[0] == '\0' || b.n_events != 0 || b.events != NULL) {
            fprintf(stderr, "bad rejection: rv=%d reason=%d msg=%s\n", rv, reason, err.msg);
            abort();
        }
        return 0;
    }
    if (reason != KVR_KV_REJ_NONE || d.decoded != ok + 1 || rejected_total(&d) != rej) {
        fprintf(stderr, "bad acceptance bookkeeping\n");
        abort();
    }
    for (uint32_t i = 0; i < b.n_events; i++) {
        const kvr_kv_event *e = &b.events[i];
        if (e->type == KVR_KV_STORED &&
            (e->block_size == 0 || (uint64_t)e->n_hashes * e->block_size != e->n_tokens)) {
            fprintf(stderr, "event %u: accepted inconsistent BlockStored\n", i);
            abort();
        }
        if (e->type != KVR_KV_STORED && e->n_tokens != 0) {
            fprintf(stderr, "event %u: tokens on a non-stored event\n", i);
            abort();
        }
    }
    char why[512];
    if (kvc_roundtrip(&b, &d.limits, why, sizeof why) != 0) {
        fprintf(stderr, "%s\n", why);
        abort();
    }
    return 0;
}
