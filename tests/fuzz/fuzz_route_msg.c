/* libFuzzer target for the route API codec (proto/route_msg.h): the same bytes are decoded as a
 * route request, a route reply and a route event. Whatever decodes must respect the bounds it
 * was given, re-encode, and decode again to the same message (so encoder and decoder agree on
 * every message a peer can send). Any violation aborts. */
#include "fuzz_check.h"
#include "kvr_buf.h"
#include "route_msg.h"

#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_HASHES 512

static int same(kvr_slice a, kvr_slice b)
{
    return a.len == b.len && (a.len == 0 || memcmp(a.base, b.base, a.len) == 0);
}

static void request(const uint8_t *data, size_t size, kvr_buf *b)
{
    static uint64_t h1[MAX_HASHES], h2[MAX_HASHES];
    kvr_route_req_limits lim = {.max_tokens = 1u << 20, .max_hashes = MAX_HASHES};
    kvr_route_req a, c;
    kvr_err err = {0};
    if (kvr_route_req_decode(data, size, &lim, h1, &a, &err) != 0) {
        CHECK(err.msg[0] != '\0'); /* every refusal says why */
        return;
    }
    CHECK(a.n_hashes <= MAX_HASHES && a.tokens <= lim.max_tokens && a.model.len > 0);
    CHECK(a.model.len <= KVR_ROUTE_NAME_MAX && a.ns.len <= KVR_ROUTE_NAME_MAX &&
          a.role.len <= KVR_ROUTE_NAME_MAX);
    kvr_buf_reset(b);
    CHECK(kvr_route_req_encode(b, &a) == 0);
    CHECK(kvr_route_req_decode(b->base, b->len, &lim, h2, &c, NULL) == 0);
    CHECK(memcmp(a.request_id, c.request_id, KVR_ROUTE_ID_LEN) == 0);
    CHECK(a.frontend_id == c.frontend_id && a.tokens == c.tokens && a.n_hashes == c.n_hashes);
    CHECK(same(a.model, c.model) && same(a.ns, c.ns) && same(a.role, c.role));
    CHECK(memcmp(h1, h2, a.n_hashes * sizeof h1[0]) == 0);
    CHECK(memcmp(b->base + KVR_ROUTE_REQ_ID_OFFSET, a.request_id, KVR_ROUTE_ID_LEN) == 0);
}

static void reply(const uint8_t *data, size_t size, kvr_buf *b)
{
    kvr_route_reply a, c;
    if (kvr_route_reply_decode(data, size, &a, NULL) != 0)
        return;
    CHECK(a.error.len <= KVR_ROUTE_ERROR_MAX && a.url.len <= KVR_ROUTE_URL_MAX);
    kvr_buf_reset(b);
    if (a.ok && a.mode.len > KVR_ROUTE_NAME_MAX)
        return;
    CHECK(kvr_route_reply_encode(b, &a) == 0);
    CHECK(kvr_route_reply_decode(b->base, b->len, &c, NULL) == 0);
    CHECK(a.ok == c.ok);
    if (a.ok) {
        CHECK(a.worker_id == c.worker_id && same(a.url, c.url) && same(a.mode, c.mode));
        CHECK(a.overlap_blocks == c.overlap_blocks && a.router_id == c.router_id);
        CHECK(a.has_view == c.has_view);
        CHECK(same(a.disagg, c.disagg));
        CHECK(!kvr_slice_eq_cstr(a.disagg, "remote") ||
              (a.prefill_worker_id == c.prefill_worker_id && same(a.prefill_url, c.prefill_url)));
        CHECK(!a.has_view ||
              (a.worker_bookings == c.worker_bookings && a.decided_ns == c.decided_ns));
    } else {
        CHECK(same(a.error, c.error));
    }
}

static void event(const uint8_t *data, size_t size, kvr_buf *b)
{
    kvr_route_event a, c;
    if (kvr_route_event_decode(data, size, &a, NULL) != 0)
        return;
    CHECK(kvr_route_event_name(a.type) != NULL);
    kvr_buf_reset(b);
    CHECK(kvr_route_event_encode(b, &a) == 0);
    CHECK(kvr_route_event_decode(b->base, b->len, &c, NULL) == 0);
    CHECK(a.type == c.type && a.relayed == c.relayed &&
          memcmp(a.request_id, c.request_id, KVR_ROUTE_ID_LEN) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kvr_buf b;
    kvr_buf_init(&b);
    request(data, size, &b);
    reply(data, size, &b);
    event(data, size, &b);
    kvr_buf_free(&b);
    return 0;
}
