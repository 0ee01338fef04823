/* peer_auth: routers prove to each other that they hold the cluster secret before either side
 * reads a single Raft message or forwarded command (issue 18, item "routers authenticate each
 * other"; docs/SECURITY.md section 3).
 *
 * Handshake (HMAC-SHA256 over the shared secret K, fixed sizes, so nothing is sized from input):
 *   client -> server  HELLO  "KVRA" ver=1 ctx 0 0 | Nc (32 random bytes)                  40 B
 *   server -> client  CHAL   "KVRA" ver=1 ctx 0 0 | Ns (32) | HMAC(K, "kvr-server" ctx Nc Ns)  72 B
 *   client -> server  PROOF  id (u64 BE) | addr (64, NUL padded) | HMAC(K, "kvr-client" ctx Nc Ns
 * id addr) 104 B Both nonces are fresh per connection, so neither proof can be replayed from a
 * recording; the two directions use different labels, so a server's answer cannot be reflected as a
 * client proof; ctx (1 = Raft port, 2 = forward port) keeps a transcript of one port from opening
 * the other; the client's Raft id and address are inside its MAC, so a peer cannot claim another
 * router's identity. MACs are compared with CRYPTO_memcmp (constant time). The server reads
 * exactly the handshake's bytes (its read buffer is sized to what is missing), so the first
 * bytes of the protocol that follows on the same stream are left in the socket for it.
 *
 * Bounds: the caller gives each handshake a deadline (kvr_auth_hs.deadline_ms, checked by the
 * caller's timer through kvr_auth_expired) and caps how many run at once.
 *
 * Threads: all calls and callbacks on the loop thread of the stream.
 * Memory: kvr_auth_hs is caller-owned and must stay valid until the stream's close callback
 * (libuv may still call the read callback until then); the key must outlive every handshake. */
#ifndef KVR_SYNC_PEER_AUTH_H
#define KVR_SYNC_PEER_AUTH_H

#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define KVR_AUTH_SECRET_MIN 16
#define KVR_AUTH_SECRET_MAX 1024
#define KVR_AUTH_NONCE 32
#define KVR_AUTH_MAC 32
#define KVR_AUTH_ADDR 64
#define KVR_AUTH_HELLO_LEN (8 + KVR_AUTH_NONCE)
#define KVR_AUTH_CHAL_LEN (8 + KVR_AUTH_NONCE + KVR_AUTH_MAC)
#define KVR_AUTH_PROOF_LEN (8 + KVR_AUTH_ADDR + KVR_AUTH_MAC)
#define KVR_AUTH_TIMEOUT_MS 3000 /* whole handshake; loopback takes well under 1 ms */

enum { KVR_AUTH_CTX_RAFT = 1, KVR_AUTH_CTX_FORWARD = 2 };

typedef struct kvr_auth_key {
    unsigned char k[KVR_AUTH_SECRET_MAX];
    size_t len; /* 0: no secret configured */
} kvr_auth_key;

/* Reads the secret from path: its bytes, trailing whitespace removed, between
 * KVR_AUTH_SECRET_MIN and KVR_AUTH_SECRET_MAX bytes. A file that group or others may read is
 * refused (the secret would not be one). */
int kvr_auth_key_load(kvr_auth_key *out, const char *path, kvr_err *err);

typedef struct kvr_auth_hs kvr_auth_hs;
/* status 0: the peer proved it holds the secret; the stream's reading is stopped and
 * stream->data is back to what it was before kvr_auth_start. Otherwise a negative KVR_E* code
 * (KVR_EINVAL bad message, KVR_ECORRUPT wrong MAC, KVR_EIO socket error); the caller closes
 * the stream. Runs at most once, on the loop thread. */
typedef void (*kvr_auth_done_cb)(kvr_auth_hs *hs, int status);

struct kvr_auth_hs {
    void *data;          /* caller's */
    int64_t deadline_ms; /* kvr_mono_ms() deadline, set by kvr_auth_start */
    /* server side, after success: what the client proved it is */
    uint64_t peer_id;
    char peer_addr[KVR_AUTH_ADDR + 1];
    /* private */
    uv_stream_t *stream;
    void *saved_data;
    const kvr_auth_key *key;
    kvr_auth_done_cb cb;
    bool server, done;
    uint8_t ctx;
    uint64_t my_id;
    char my_addr[KVR_AUTH_ADDR];
    unsigned char nc[KVR_AUTH_NONCE], ns[KVR_AUTH_NONCE];
    unsigned char in[KVR_AUTH_PROOF_LEN];
    size_t need, got;
};

/* Starts the handshake on a connected stream. server: the accepting side. my_id/my_addr: the
 * client's identity (sent in its proof; ignored on the server). Returns 0 or a KVR_E* code
 * (then cb will not run). */
int kvr_auth_start(kvr_auth_hs *hs, uv_stream_t *stream, const kvr_auth_key *key, bool server,
                   uint8_t ctx, uint64_t my_id, const char *my_addr, kvr_auth_done_cb cb);

/* True when a handshake still running is past its deadline (the caller then closes it). */
bool kvr_auth_expired(const kvr_auth_hs *hs, int64_t now_ms);

#endif
