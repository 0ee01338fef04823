/* libFuzzer target: kvr-bridge's ZMQ frame and batch path (bridge/frame.c) on arbitrary bytes.
 * Input: the first byte picks the frame count (1..4); the rest is split into that many frames
 * at offsets taken from the next bytes. Frames go through the replay-reply parser (both
 * layouts), the last one through kvr_bridge_check_batch. Invariants: a kept batch (good > 0)
 * decodes with the routers' decoder, as it is or as rewritten; good + bad is the number of
 * events; the outputs stay within the input's size plus a header. Any violation aborts. */
#include "frame.h"
#include "kv_event.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static kvr_kv_decoder d;
    static kvr_buf out, scratch;
    static int ready;
    if (!ready) {
        kvr_kv_limits l = kvr_kv_limits_default();
        l.max_payload_bytes = 1 << 16;
        l.max_events = 64;
        l.max_hashes = 64;
        l.max_tokens = 4096;
        l.max_block_size = 64;
        kvr_kv_decoder_init(&d, &l);
        kvr_buf_init(&out);
        kvr_buf_init(&scratch);
        ready = 1;
    }
    if (size < 1)
        return 0;
    size_t n = (size_t)(data[0] & 3) + 1;
    data++, size--;
    kvr_bridge_frame f[4];
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        size_t len = i + 1 < n && off < size ? (size_t)(data[off] % 16) : size - off;
        if (i + 1 < n && off < size)
            off++;
        if (len > size - off)
            len = size - off;
        f[i] = (kvr_bridge_frame){data + off, len};
        off += len;
    }
    uint64_t seq;
    kvr_bridge_frame pl;
    (void)kvr_bridge_parse_replay(f, n, &seq, &pl, NULL);
    kvr_bridge_check res;
    kvr_err err = {0};
    const kvr_bridge_frame *b = &f[n - 1];
    int rv = kvr_bridge_check_batch(&d, b->data, b->len, &out, &scratch, &res, &err);
    if (rv != 0) {
        if (err.msg[0] == '\0') {
            fprintf(stderr, "rejection without a message\n");
            abort();
        }
        return 0;
    }
    if (res.good > 0) {
        kvr_kv_batch kb;
        const void *p = res.rewritten ? out.base : b->data;
        size_t len = res.rewritten ? out.len : b->len;
        if (kvr_kv_decode(&d, p, len, &kb, NULL, NULL) != 0 || kb.n_events != res.good ||
            (res.rewritten && out.len > b->len + 5)) {
            fprintf(stderr, "kept batch does not decode / wrong count (good=%u)\n", res.good);
            abort();
        }
    }
    return 0;
}
