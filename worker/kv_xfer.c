/* kv_xfer: see kv_xfer.h for the format. */
#include "kv_xfer.h"
#include "kvr_err.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdlib.h>
#include <string.h>

static const char REQ_LABEL[] = "kvr-kvx-req";   /* with its NUL */
static const char RESP_LABEL[] = "kvr-kvx-resp"; /* with its NUL */

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* HMAC-SHA256(K, label NUL | ns | a | b). A key of 0 bytes still MACs (the worker refuses to
 * start without a secret; this keeps the functions total). */
static bool mac(const kvx_key *key, const char *label, size_t label_len,
                const uint8_t ns[KVX_NONCE], const uint8_t *a, size_t alen, const uint8_t *b,
                size_t blen, uint8_t out[KVX_MAC])
{
    /* one-shot HMAC() (HMAC_CTX is deprecated in OpenSSL 3) over a copy: a REQ is at most
     * KVX_REQ_MAX bytes, once per transfer */
    static const unsigned char zero = 0;
    size_t n = label_len + KVX_NONCE + alen + blen;
    unsigned char *m = malloc(n);
    unsigned int olen = KVX_MAC;
    if (m) {
        memcpy(m, label, label_len);
        memcpy(m + label_len, ns, KVX_NONCE);
        if (alen)
            memcpy(m + label_len + KVX_NONCE, a, alen);
        if (blen)
            memcpy(m + label_len + KVX_NONCE + alen, b, blen);
    }
    bool ok = m && HMAC(EVP_sha256(), key->len ? key->k : &zero, (int)key->len, m, n, out, &olen);
    if (!ok)
        memset(out, 0, KVX_MAC); /* out of memory: the caller refuses (verify is false) */
    free(m);
    return ok;
}

void kvx_hello_encode(uint8_t out[KVX_HELLO_LEN], const uint8_t ns[KVX_NONCE])
{
    memcpy(out, "KVX1", 4);
    memcpy(out + 4, ns, KVX_NONCE);
}

int kvx_hello_parse(const uint8_t *in, size_t len, uint8_t ns[KVX_NONCE])
{
    if (len != KVX_HELLO_LEN || memcmp(in, "KVX1", 4) != 0)
        return KVR_EINVAL;
    memcpy(ns, in + 4, KVX_NONCE);
    return 0;
}

int kvx_req_need(const uint8_t *in, size_t len, size_t *need)
{
    if (len < KVX_REQ_HEAD || memcmp(in, "KVQ1", 4) != 0)
        return KVR_EINVAL;
    uint32_t rl = (uint32_t)in[4] << 8 | in[5], el = (uint32_t)in[6] << 8 | in[7];
    uint32_t n = get32(in + 8);
    if (rl < 1 || rl > KVX_MAX_ID || el < 1 || el > KVX_MAX_ID || n > KVX_MAX_BLOCKS)
        return KVR_EINVAL;
    *need = KVX_REQ_HEAD + rl + el + 4 * (size_t)n + KVX_MAC;
    return 0;
}

int kvx_req_parse(const uint8_t *in, size_t len, kvx_req *out)
{
    size_t need;
    int rc = kvx_req_need(in, len, &need);
    if (rc)
        return rc;
    if (len != need)
        return KVR_EINVAL;
    out->rid_len = (uint16_t)(in[4] << 8 | in[5]);
    out->eng_len = (uint16_t)(in[6] << 8 | in[7]);
    out->n = get32(in + 8);
    out->rid = (const char *)in + KVX_REQ_HEAD;
    out->eng = out->rid + out->rid_len;
    out->ids = (const uint8_t *)out->eng + out->eng_len;
    out->mac = out->ids + 4 * (size_t)out->n;
    return 0;
}

int kvx_req_encode(kvr_buf *out, const kvx_key *key, const uint8_t ns[KVX_NONCE], const char *rid,
                   const char *eng, const uint32_t *ids, uint32_t n)
{
    size_t rl = strlen(rid), el = strlen(eng);
    if (rl < 1 || rl > KVX_MAX_ID || el < 1 || el > KVX_MAX_ID || n > KVX_MAX_BLOCKS)
        return KVR_EINVAL;
    size_t start = out->len, total = KVX_REQ_HEAD + rl + el + 4 * (size_t)n + KVX_MAC;
    if (kvr_buf_reserve(out, total) != 0)
        return KVR_ENOMEM;
    uint8_t *p = (uint8_t *)out->base + start;
    memcpy(p, "KVQ1", 4);
    p[4] = (uint8_t)(rl >> 8);
    p[5] = (uint8_t)rl;
    p[6] = (uint8_t)(el >> 8);
    p[7] = (uint8_t)el;
    put32(p + 8, n);
    memcpy(p + KVX_REQ_HEAD, rid, rl);
    memcpy(p + KVX_REQ_HEAD + rl, eng, el);
    uint8_t *q = p + KVX_REQ_HEAD + rl + el;
    for (uint32_t i = 0; i < n; i++)
        put32(q + 4 * (size_t)i, ids[i]);
    size_t body = total - KVX_MAC;
    mac(key, REQ_LABEL, sizeof REQ_LABEL, ns, p, body, NULL, 0, p + body);
    out->len = start + total;
    return 0;
}

bool kvx_req_verify(const kvx_key *key, const uint8_t ns[KVX_NONCE], const uint8_t *in, size_t len)
{
    if (len < KVX_REQ_HEAD + KVX_MAC)
        return false;
    uint8_t want[KVX_MAC];
    if (!mac(key, REQ_LABEL, sizeof REQ_LABEL, ns, in, len - KVX_MAC, NULL, 0, want))
        return false;
    return CRYPTO_memcmp(want, in + len - KVX_MAC, KVX_MAC) == 0;
}

void kvx_resp_encode(uint8_t out[KVX_RESP_LEN], const kvx_key *key, const uint8_t ns[KVX_NONCE],
                     const uint8_t mac_c[KVX_MAC], const kvx_resp *r)
{
    memcpy(out, "KVS1", 4);
    out[4] = r->status;
    out[5] = out[6] = out[7] = 0;
    put32(out + 8, r->bytes_per_block);
    put32(out + 12, r->n);
    mac(key, RESP_LABEL, sizeof RESP_LABEL, ns, mac_c, KVX_MAC, out, 16, out + 16);
}

int kvx_resp_parse(const uint8_t *in, size_t len, const kvx_key *key, const uint8_t ns[KVX_NONCE],
                   const uint8_t mac_c[KVX_MAC], kvx_resp *out)
{
    if (len != KVX_RESP_LEN || memcmp(in, "KVS1", 4) != 0 || in[5] || in[6] || in[7])
        return KVR_EINVAL;
    uint8_t want[KVX_MAC];
    if (!mac(key, RESP_LABEL, sizeof RESP_LABEL, ns, mac_c, KVX_MAC, in, 16, want) ||
        CRYPTO_memcmp(want, in + 16, KVX_MAC) != 0)
        return KVR_ECORRUPT;
    out->status = in[4];
    out->bytes_per_block = get32(in + 8);
    out->n = get32(in + 12);
    if (out->status == KVX_OK &&
        (out->bytes_per_block < KVX_BLOCK_HEAD || out->bytes_per_block > KVX_MAX_BLOCK_BYTES ||
         out->n > KVX_MAX_BLOCKS))
        return KVR_EINVAL;
    return 0;
}

/* Filler: a fixed pattern, so a payload costs a memcpy, not a generator, per byte. */
static const uint8_t *filler(void)
{
    static uint8_t f[4096];
    static bool init;
    if (!init) {
        for (size_t i = 0; i < sizeof f; i++)
            f[i] = (uint8_t)(i * 131u + 7u);
        init = true;
    }
    return f;
}

void kvx_fill(uint8_t *out, size_t len, uint64_t off, uint32_t bpb, kvx_ext_fn ext, void *arg)
{
    const uint8_t *f = filler();
    while (len > 0) {
        uint32_t i = (uint32_t)(off / bpb);
        uint32_t in = (uint32_t)(off % bpb);
        size_t take;
        if (in < KVX_BLOCK_HEAD) {
            uint8_t head[KVX_BLOCK_HEAD];
            uint32_t id = 0;
            uint64_t h = ext(arg, i, &id);
            for (int k = 0; k < 8; k++)
                head[k] = (uint8_t)(h >> (8 * k));
            for (int k = 0; k < 4; k++) {
                head[8 + k] = (uint8_t)(id >> (8 * k));
                head[12 + k] = (uint8_t)(i >> (8 * k));
            }
            take = KVX_BLOCK_HEAD - in;
            if (take > len)
                take = len;
            memcpy(out, head + in, take);
        } else {
            size_t fo = (in - KVX_BLOCK_HEAD) % 4096;
            take = bpb - in;
            if (take > 4096 - fo)
                take = 4096 - fo;
            if (take > len)
                take = len;
            memcpy(out, f + fo, take);
        }
        out += take;
        len -= take;
        off += take;
    }
}

const char *kvx_status_name(uint8_t s)
{
    switch (s) {
    case KVX_OK:
        return "ok";
    case KVX_EAUTH:
        return "bad secret";
    case KVX_EUNKNOWN:
        return "unknown request";
    case KVX_EBLOCKS:
        return "blocks not held";
    case KVX_EBAD:
        return "malformed request";
    case KVX_EBUSY:
        return "busy";
    }
    return "unknown status";
}
