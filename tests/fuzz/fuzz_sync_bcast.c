/* libFuzzer target for the best-effort booking broadcast (sync/bcast_wire.h): any NATS client
 * of the account can publish on kvr.route.bcast. Whatever decodes must re-encode and decode
 * again to the same router id and the same command bytes. Any violation aborts. */
#include "bcast_wire.h"
#include "fuzz_check.h"
#include "kvr_buf.h"

#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static kvr_route_candidate cand1[KVR_FSM_MAX_CANDIDATES], cand2[KVR_FSM_MAX_CANDIDATES];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint64_t from, from2;
    kvr_cmd a, c;
    int rc = kvr_bcast_decode(data, size, &from, &a, cand1);
    if (rc != 0) {
        CHECK(rc < 0);
        CHECK(size <= KVR_BCAST_MAX_BYTES || rc == KVR_ELIMIT);
        return 0;
    }
    CHECK(size <= KVR_BCAST_MAX_BYTES);
    kvr_buf b1, b2, e1, e2;
    kvr_buf_init(&b1);
    kvr_buf_init(&b2);
    kvr_buf_init(&e1);
    kvr_buf_init(&e2);
    CHECK(kvr_bcast_encode(&b1, from, &a) == 0);
    CHECK(kvr_bcast_decode(b1.base, b1.len, &from2, &c, cand2) == 0);
    CHECK(from2 == from && c.type == a.type);
    /* the same command: both encode to the same bytes */
    CHECK(kvr_cmd_encode(&a, &e1, NULL) == 0 && kvr_cmd_encode(&c, &e2, NULL) == 0);
    CHECK(e1.len == e2.len && memcmp(e1.base, e2.base, e1.len) == 0);
    CHECK(kvr_bcast_encode(&b2, from2, &c) == 0);
    CHECK(b1.len == b2.len && memcmp(b1.base, b2.base, b1.len) == 0);
    kvr_buf_free(&b1);
    kvr_buf_free(&b2);
    kvr_buf_free(&e1);
    kvr_buf_free(&e2);
    return 0;
}
