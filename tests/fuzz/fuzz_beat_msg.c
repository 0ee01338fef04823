/* libFuzzer target for the liveness beats (proto/beat_msg.h), bytes any NATS client of the
 * account can publish: the input is read as a lease payload, as the last token of a lease
 * subject, and as a quorum beacon. Whatever decodes must re-encode and decode again to the
 * same value. Any violation aborts. */
#include "beat_msg.h"
#include "fuzz_check.h"
#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kvr_lease a, c;
    if (kvr_lease_decode(data, size, &a) == 0) {
        CHECK(size <= KVR_LEASE_MAX_BYTES);
        kvr_buf b;
        kvr_buf_init(&b);
        CHECK(kvr_lease_encode(&b, &a) == 0);
        CHECK(kvr_lease_decode(b.base, b.len, &c) == 0);
        CHECK(c.has == (KVR_LEASE_FRONTEND_ID | KVR_LEASE_TS | KVR_LEASE_ACTIVE));
        CHECK(c.frontend_id == a.frontend_id && c.ts_ms == a.ts_ms && c.active == a.active);
        kvr_buf_free(&b);
    }
    /* a subject: NUL-terminated, as the NATS client hands it over */
    char subj[128];
    size_t n = size < sizeof subj - 1 ? size : sizeof subj - 1;
    memcpy(subj, data, n);
    subj[n] = 0;
    uint64_t id, id2;
    if (kvr_lease_subject_id(subj, &id) == 0) {
        CHECK(id != 0);
        char s[64];
        CHECK(kvr_lease_subject(s, sizeof s, id) == 0);
        CHECK(kvr_lease_subject_id(s, &id2) == 0 && id2 == id);
    }
    if (kvr_quorum_beacon_decode(data, size, &id) == 0) {
        CHECK(id != 0 && size <= KVR_BEACON_MAX);
        char b[KVR_BEACON_MAX];
        int len = kvr_quorum_beacon_encode(b, sizeof b, id);
        CHECK(len > 0 && kvr_quorum_beacon_decode(b, (size_t)len, &id2) == 0 && id2 == id);
        /* canonical unless the input had leading zeros */
        CHECK(data[0] == '0' || ((size_t)len == size && memcmp(b, data, size) == 0));
    }
    return 0;
}
