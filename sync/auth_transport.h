/* auth_transport: a raft_uv_transport over TCP that runs the peer_auth handshake (peer_auth.h)
 * on every connection, in both directions, before Raft sees the stream. It replaces raft's own
 * raft_uv_tcp when a cluster secret is configured.
 *
 * raft_uv_tcp would read raft's connection preamble (protocol, id, address) from whoever
 * connects and hand the stream to raft; here the accepting side instead learns the peer's id
 * and address from the client's authenticated proof, so the id raft is told cannot be forged,
 * and an unauthenticated stream is closed before a byte of it is parsed as Raft. After the
 * handshake the stream carries raft's messages unchanged: nothing is added per message. An
 * accepted stream is read through a 64 KiB buffer that hands raft's reader its messages in
 * the pieces it asks for (raft 0.15 reads preamble, header and payload with a read() each).
 * Both sides set TCP_NODELAY (0.15's own transport does not; docs/DEPENDENCIES.md 1, "Met while building sync/" item 2).
 *
 * Bounds: at most KVR_AUTH_TRANSPORT_MAX_PENDING incoming handshakes at once (more are closed
 * at accept), each within KVR_AUTH_TIMEOUT_MS.
 *
 * Threads: the loop thread given to kvr_auth_transport_init, like all of raft's uv backend.
 * Memory: the key must outlive the transport. Streams handed to raft are raft_malloc'ed (raft
 * frees them with raft_free; an accepted one's read buffer is in the same allocation). kvr_auth_transport_free releases the implementation after raft
 * has closed the transport (raft_uv's close calls t->close). */
#ifndef KVR_SYNC_AUTH_TRANSPORT_H
#define KVR_SYNC_AUTH_TRANSPORT_H

#include "peer_auth.h"

#include <raft.h>
#include <raft/uv.h>
#include <stdint.h>

#define KVR_AUTH_TRANSPORT_MAX_PENDING 32

typedef struct kvr_auth_transport_stats {
    uint64_t accepted;  /* incoming connections that proved the secret */
    uint64_t refused;   /* incoming: wrong MAC, malformed, timed out or over the cap */
    uint64_t connected; /* outgoing connections that completed the handshake */
    uint64_t connect_failed;
} kvr_auth_transport_stats;

int kvr_auth_transport_init(struct raft_uv_transport *t, uv_loop_t *loop, const kvr_auth_key *key);
void kvr_auth_transport_free(struct raft_uv_transport *t);
void kvr_auth_transport_get_stats(struct raft_uv_transport *t, kvr_auth_transport_stats *out);

#endif
