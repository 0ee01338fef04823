/* libFuzzer target for the forward port's frames (sync/fwd_wire.h): the input is the byte
 * stream a router reads from a peer's forward connection. Frames are split off as sync_fwd.c
 * does (a length over the bound ends the stream), each body is decoded, and whatever decodes
 * must re-encode and decode again to the same message. Any violation aborts. */
#include "fuzz_check.h"
#include "fwd_wire.h"
#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void roundtrip(const kvr_fwd_msg *a, kvr_buf *b)
{
    kvr_buf_reset(b);
    int rc;
    if (a->kind == KVR_FWD_REQ) {
        rc = kvr_fwd_encode_req(b, a->rpc, a->cmd.base, a->cmd.len);
    } else {
        if (a->status < INT32_MIN || a->status > INT32_MAX)
            return; /* the encoder's status is an int (a kvr_err code) */
        rc = kvr_fwd_encode_rep(b, a->rpc, (int)a->status, &a->res);
    }
    CHECK(rc == 0);
    kvr_slice body;
    size_t used;
    CHECK(kvr_fwd_frame_next(b->base, b->len, &body, &used) == 1 && used == b->len);
    kvr_fwd_msg c;
    CHECK(kvr_fwd_decode(body.base, body.len, &c) == 0);
    CHECK(c.kind == a->kind && c.rpc == a->rpc);
    if (a->kind == KVR_FWD_REQ) {
        CHECK(c.cmd.len == a->cmd.len &&
              (a->cmd.len == 0 || memcmp(c.cmd.base, a->cmd.base, a->cmd.len) == 0));
        return;
    }
    CHECK(c.status == a->status && c.res.outcome == a->res.outcome && c.res.type == a->res.type &&
          c.res.worker_id == a->res.worker_id && c.res.overlap == a->res.overlap &&
          c.res.request_blocks == a->res.request_blocks && c.res.freed == a->res.freed &&
          c.res.pool_waking == a->res.pool_waking && strcmp(c.res.url, a->res.url) == 0 &&
          memcmp(&c.res.cost, &a->res.cost, sizeof c.res.cost) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kvr_buf b;
    kvr_buf_init(&b);
    size_t off = 0;
    for (;;) {
        kvr_slice body;
        size_t used;
        int rc = kvr_fwd_frame_next(data + off, size - off, &body, &used);
        if (rc <= 0) {
            CHECK(rc == 0 || (rc == KVR_ELIMIT && used > KVR_FWD_MAX_FRAME));
            break;
        }
        CHECK(used >= 4 && used <= size - off && body.len == used - 4 &&
              body.len <= KVR_FWD_MAX_FRAME);
        off += used;
        kvr_fwd_msg m;
        if (kvr_fwd_decode(body.base, body.len, &m) != 0) {
            CHECK(m.kind == 0 || m.kind == KVR_FWD_REQ || m.kind == KVR_FWD_REP);
            continue;
        }
        CHECK(m.kind == KVR_FWD_REQ || m.kind == KVR_FWD_REP);
        CHECK(strlen(m.res.url) <= KVR_FSM_URL_MAX);
        if (m.kind == KVR_FWD_REQ)
            CHECK((const uint8_t *)m.cmd.base >= (const uint8_t *)body.base &&
                  (const uint8_t *)m.cmd.base + m.cmd.len <= (const uint8_t *)body.base + body.len);
        roundtrip(&m, &b);
    }
    kvr_buf_free(&b);
    return 0;
}
