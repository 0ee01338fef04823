/* epp_grpc_frame: gRPC's wire format above HTTP/2 (grpc doc/PROTOCOL-HTTP2.md): the status
 * codes, the 5-byte prefix (compressed flag, big-endian length) of every message both ways,
 * and the percent-encoding of grpc-message. No state, no I/O: any thread. */
#ifndef EPP_GRPC_FRAME_H
#define EPP_GRPC_FRAME_H

#include "kvr_buf.h"

#include <stddef.h>
#include <stdint.h>

/* gRPC status codes used here */
enum {
    EPP_GRPC_OK = 0,
    EPP_GRPC_CANCELLED = 1,
    EPP_GRPC_INVALID_ARGUMENT = 3,
    EPP_GRPC_NOT_FOUND = 5,
    EPP_GRPC_RESOURCE_EXHAUSTED = 8,
    EPP_GRPC_UNIMPLEMENTED = 12,
    EPP_GRPC_INTERNAL = 13,
    EPP_GRPC_UNAVAILABLE = 14,
};

#define EPP_GRPC_PREFIX 5 /* bytes before each message */

/* The prefix of an uncompressed message of len bytes (len < 2^32). */
void epp_grpc_frame_prefix(uint8_t pfx[EPP_GRPC_PREFIX], size_t len);

/* Parses the framing of a gRPC request body (for the fuzz target and tests): calls cb for
 * each whole message in data[0..len), keeps the tail in *rest (a partial message). Returns 0,
 * or a gRPC status (RESOURCE_EXHAUSTED for an oversized message, UNIMPLEMENTED for a
 * compressed one). The message bytes handed to cb are valid during the call only. */
int epp_grpc_deframe(kvr_buf *rest, const uint8_t *data, size_t len, size_t max_message,
                     void (*cb)(const uint8_t *msg, size_t n, void *arg), void *arg);

/* grpc-message's value: in (NUL-terminated) with bytes outside 0x20..0x7E and '%'
 * percent-encoded, into out (cap bytes, NUL-terminated; what does not fit is left out). */
void epp_grpc_pct_encode(const char *in, char *out, size_t cap);

#endif
