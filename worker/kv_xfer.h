/* kv_xfer: the wire format of kvr-worker's KV side channel, the TCP port a prefill worker
 * (`--role prefill --kv-port P`) serves its held blocks on and a decode worker pulls them from
 * (issue 15 item 1; DESIGN 9; docs/SECURITY.md "KV side channel").
 *
 * One transfer per connection, every integer big-endian, every size bounded before use:
 *
 *   server -> client  HELLO  "KVX1" | Ns (32 random bytes)                                 36 B
 *   client -> server  REQ    "KVQ1" | rid_len u16 | eng_len u16 | n u32                   12 B
 *                            | rid (rid_len) | eng (eng_len) | block id u32 x n
 *                            | MAC_c = HMAC-SHA256(K, "kvr-kvx-req" 0 | Ns | REQ before MAC_c)
 *   server -> client  RESP   "KVS1" | status u8 | 0 0 0 | bytes_per_block u32 | n u32
 *                            | MAC_s = HMAC-SHA256(K, "kvr-kvx-resp" 0 | Ns | MAC_c | RESP
 *                              before MAC_s)                                           48 B
 *   then, status 0 only, n x bytes_per_block bytes: per block asked, in the order asked,
 *   LE64 ext hash | LE32 block id | LE32 index in the request | filler.
 *
 * rid is vLLM's remote_request_id, eng its remote_engine_id; the ids are remote_block_ids (or
 * a subset: a decoder that already caches a prefix asks only for the rest; n = 0 only frees
 * the hold). The fresh server nonce makes a recorded REQ useless on another connection; MAC_s
 * binds the answer to this REQ, so a decoder never takes a refusal or a payload from a
 * server without the secret. The payload itself is not MACed: its per-block ext hash lets the
 * decoder check every block against the hash its own prompt gives (a wrong request id or a
 * different prompt is caught), which is what a simulated KV transfer needs.
 *
 * Pure functions, no I/O, any thread. Parsers borrow the input. */
#ifndef KVR_WORKER_KV_XFER_H
#define KVR_WORKER_KV_XFER_H

#include "kvr_buf.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVX_NONCE 32
#define KVX_MAC 32
#define KVX_HELLO_LEN (4 + KVX_NONCE)
#define KVX_REQ_HEAD 12
#define KVX_RESP_LEN (16 + KVX_MAC)
#define KVX_BLOCK_HEAD 16      /* ext hash, id, index: the smallest bytes_per_block */
#define KVX_MAX_ID 128         /* request and engine ids, bytes */
#define KVX_MAX_BLOCKS 262144u /* per request: 1 MiB of ids */
#define KVX_MAX_BLOCK_BYTES (64u << 20)
#define KVX_REQ_MAX (KVX_REQ_HEAD + 2 * KVX_MAX_ID + 4 * (size_t)KVX_MAX_BLOCKS + KVX_MAC)

enum {
    KVX_OK = 0,
    KVX_EAUTH = 1,    /* MAC_c wrong: no secret, or another one */
    KVX_EUNKNOWN = 2, /* no such held request (never held, read, or expired), or other engine */
    KVX_EBLOCKS = 3,  /* a block id the hold does not have */
    KVX_EBAD = 4,     /* malformed */
    KVX_EBUSY = 5,    /* too many transfers at once */
};

typedef struct kvx_key {
    const unsigned char *k;
    size_t len;
} kvx_key;

typedef struct kvx_req {
    const char *rid, *eng;
    uint16_t rid_len, eng_len;
    uint32_t n;
    const uint8_t *ids; /* n big-endian u32 */
    const uint8_t *mac;
} kvx_req;

typedef struct kvx_resp {
    uint8_t status;
    uint32_t bytes_per_block, n;
} kvx_resp;

/* HELLO */
void kvx_hello_encode(uint8_t out[KVX_HELLO_LEN], const uint8_t ns[KVX_NONCE]);
int kvx_hello_parse(const uint8_t *in, size_t len, uint8_t ns[KVX_NONCE]); /* 0 or KVR_EINVAL */

/* REQ. kvx_req_need: from the first KVX_REQ_HEAD bytes, the REQ's whole length (bounds
 * checked: ids 1..KVX_MAX_ID bytes, n <= KVX_MAX_BLOCKS); KVR_EINVAL when malformed.
 * kvx_req_parse: len must be exactly that length. */
int kvx_req_need(const uint8_t *in, size_t len, size_t *need);
int kvx_req_parse(const uint8_t *in, size_t len, kvx_req *out);
static inline uint32_t kvx_req_id(const kvx_req *r, uint32_t i)
{
    const uint8_t *p = r->ids + 4 * (size_t)i;
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
/* Appends a REQ with its MAC. Returns 0, KVR_EINVAL (bounds) or KVR_ENOMEM. */
int kvx_req_encode(kvr_buf *out, const kvx_key *key, const uint8_t ns[KVX_NONCE], const char *rid,
                   const char *eng, const uint32_t *ids, uint32_t n);
/* True when in[0..len) (a parsed REQ) carries the right MAC_c for nonce ns (constant time). */
bool kvx_req_verify(const kvx_key *key, const uint8_t ns[KVX_NONCE], const uint8_t *in, size_t len);

/* RESP, bound to the REQ's MAC_c */
void kvx_resp_encode(uint8_t out[KVX_RESP_LEN], const kvx_key *key, const uint8_t ns[KVX_NONCE],
                     const uint8_t mac_c[KVX_MAC], const kvx_resp *r);
/* 0, KVR_EINVAL (malformed or out of bounds) or KVR_ECORRUPT (MAC_s wrong). */
int kvx_resp_parse(const uint8_t *in, size_t len, const kvx_key *key, const uint8_t ns[KVX_NONCE],
                   const uint8_t mac_c[KVX_MAC], kvx_resp *out);

/* The payload byte at offset off of the block stream (block i = off / bpb): what the server
 * sends. kvx_fill writes len bytes from off into out. */
typedef uint64_t (*kvx_ext_fn)(void *arg, uint32_t i, uint32_t *id);
void kvx_fill(uint8_t *out, size_t len, uint64_t off, uint32_t bpb, kvx_ext_fn ext, void *arg);

const char *kvx_status_name(uint8_t status);

#endif
