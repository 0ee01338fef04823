/* libFuzzer target for kvr-worker's KV side channel wire format (worker/kv_xfer.h): the bytes
 * any host that reaches a prefill worker's --kv-port can send (REQ), and those a decode worker
 * reads from whatever remote_host:remote_port a request named (HELLO, RESP). The first input
 * byte picks the message; the rest is the message.
 * - REQ: kvx_req_need then kvx_req_parse never read past the input, every field lies inside
 *   it and within the documented bounds; a parsed REQ re-encodes (with a MAC under a test key)
 *   to the same bytes up to the MAC, the re-encoded one verifies, the input's own MAC (not made
 *   with the key) does not unless the input is that very encoding.
 * - HELLO, RESP: parse or refuse with a documented error; a parsed RESP re-encodes to the input.
 * Any violation aborts. */
#include "fuzz_check.h"
#include "kv_xfer.h"
#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const unsigned char KEY[] = "fuzz-kv-side-channel-secret";
static const uint8_t NS[KVX_NONCE] = {1, 2, 3, 4, 5, 6, 7, 8, 9};

static void req(const uint8_t *in, size_t len)
{
    kvx_key key = {KEY, sizeof KEY - 1};
    size_t need = 0;
    int rc = kvx_req_need(in, len, &need);
    if (rc != 0) {
        CHECK(rc == KVR_EINVAL);
        return;
    }
    CHECK(need >= KVX_REQ_HEAD + 2 + KVX_MAC && need <= KVX_REQ_MAX);
    if (need > len) {
        kvx_req q;
        CHECK(kvx_req_parse(in, len, &q) == KVR_EINVAL);
        return;
    }
    kvx_req q;
    CHECK(kvx_req_parse(in, need, &q) == 0);
    CHECK(q.rid_len >= 1 && q.rid_len <= KVX_MAX_ID && q.eng_len >= 1 && q.eng_len <= KVX_MAX_ID);
    CHECK(q.n <= KVX_MAX_BLOCKS);
    CHECK((const uint8_t *)q.rid == in + KVX_REQ_HEAD);
    CHECK(q.mac + KVX_MAC == in + need);
    if (len > need) /* exactly its length, nothing after */
        CHECK(kvx_req_parse(in, len, &q) == KVR_EINVAL);
    /* ids with a NUL cannot round-trip through the C-string encoder: only check the rest */
    if (memchr(q.rid, 0, q.rid_len) || memchr(q.eng, 0, q.eng_len))
        return;
    char rid[KVX_MAX_ID + 1], eng[KVX_MAX_ID + 1];
    memcpy(rid, q.rid, q.rid_len);
    rid[q.rid_len] = 0;
    memcpy(eng, q.eng, q.eng_len);
    eng[q.eng_len] = 0;
    uint32_t *ids = malloc(sizeof(uint32_t) * (q.n ? q.n : 1));
    CHECK(ids);
    for (uint32_t i = 0; i < q.n; i++)
        ids[i] = kvx_req_id(&q, i);
    kvr_buf b;
    kvr_buf_init(&b);
    CHECK(kvx_req_encode(&b, &key, NS, rid, eng, ids, q.n) == 0);
    CHECK(b.len == need);
    CHECK(memcmp(b.base, in, need - KVX_MAC) == 0);
    CHECK(kvx_req_verify(&key, NS, (const uint8_t *)b.base, b.len));
    bool same = memcmp(b.base, in, need) == 0;
    CHECK(kvx_req_verify(&key, NS, in, need) == same);
    kvr_buf_free(&b);
    free(ids);
}

static void resp(const uint8_t *in, size_t len)
{
    kvx_key key = {KEY, sizeof KEY - 1};
    uint8_t mac_c[KVX_MAC] = {0};
    kvx_resp r;
    int rc = kvx_resp_parse(in, len, &key, NS, mac_c, &r);
    if (rc != 0) {
        CHECK(rc == KVR_EINVAL || rc == KVR_ECORRUPT);
        return;
    }
    uint8_t out[KVX_RESP_LEN];
    kvx_resp_encode(out, &key, NS, mac_c, &r);
    CHECK(len == KVX_RESP_LEN && memcmp(out, in, len) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    const uint8_t *in = data + 1;
    size_t len = size - 1;
    switch (data[0] % 3) {
    case 0:
        req(in, len);
        break;
    case 1: {
        uint8_t ns[KVX_NONCE];
        int rc = kvx_hello_parse(in, len, ns);
        CHECK(rc == 0 || rc == KVR_EINVAL);
        if (rc == 0)
            CHECK(memcmp(ns, in + 4, KVX_NONCE) == 0);
        break;
    }
    default:
        resp(in, len);
    }
    return 0;
}
