/* kvr_nkey: NATS NKEY user seeds and .creds files, for the loop-native client's CONNECT.
 *
 * An NKEY seed ("SU...") is base32 of [seed prefix, key type, 32 bytes of Ed25519 seed,
 * CRC-16/XMODEM little-endian]; the public key ("U...") is base32 of [type, 32 bytes, CRC].
 * The server sends a nonce in INFO; the client proves it holds the seed by signing the nonce
 * (Ed25519, through OpenSSL) and sends the public key (nkey auth) or the user JWT (creds auth)
 * with the signature, base64url without padding.
 *
 * A .creds file is the standard format written by nsc: a "BEGIN NATS USER JWT" block and a
 * "BEGIN USER NKEY SEED" block.
 *
 * Memory: the caller owns every buffer; kvr_nkey_wipe clears a secret before it is freed.
 * Threads: any; no global state. */
#ifndef KVR_NKEY_H
#define KVR_NKEY_H

#include "kvr_err.h"

#include <stddef.h>

#define KVR_NKEY_PUB_LEN 56 /* "U" + 55 more base32 characters */
#define KVR_NKEY_SIG_LEN 86 /* 64 bytes, base64url, no padding */

/* Checks a user seed (type U, CRC) and writes its public key, NUL-terminated, into
 * pub[KVR_NKEY_PUB_LEN + 1]. KVR_EINVAL with err for anything else. */
int kvr_nkey_public(const char *seed, char *pub, kvr_err *err);

/* Signs nonce with the seed's key; sig[KVR_NKEY_SIG_LEN + 1] gets base64url, NUL-terminated. */
int kvr_nkey_sign(const char *seed, const char *nonce, size_t nonce_len, char *sig, kvr_err *err);

/* Parses a .creds file's text: *jwt and *seed (malloc'ed, NUL-terminated; the caller frees,
 * wiping the seed) receive the two blocks. KVR_EINVAL when either is missing. */
int kvr_nkey_parse_creds(const char *text, char **jwt, char **seed, kvr_err *err);

/* Reads a whole (small: up to 64 KiB) secret file, trailing whitespace trimmed. *out is
 * malloc'ed and NUL-terminated. Blocking: call at startup, not on a loop. */
int kvr_nkey_read_file(const char *path, char **out, kvr_err *err);

/* Overwrites s (may be NULL) with zeros, then frees it. */
void kvr_nkey_wipe(char *s);

#endif
