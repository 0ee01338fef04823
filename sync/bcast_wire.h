/* bcast_wire: the best-effort booking broadcast on kvr.route.bcast (routerd --best-effort,
 * routerd/bookings_best_effort.c), its one encoder/decoder pair.
 *
 * Payload: msgpack [router_id, bin command], the command in the Raft command codec (cmd.h),
 * so a broadcast carries exactly the bytes a Raft replica would append. Exactly two elements.
 * Any NATS client on the cluster's account can publish here: the decoder is total
 * (fuzz_sync_bcast); golden bytes in tests/sync/test_bcast_wire.c.
 *
 * Memory: the decoded command borrows its strings from the payload and its ROUTE candidates
 * from the caller's cand[KVR_FSM_MAX_CANDIDATES] (cmd.h); nothing is allocated on decode.
 * Threads: none; pure functions. */
#ifndef KVR_SYNC_BCAST_WIRE_H
#define KVR_SYNC_BCAST_WIRE_H

#include "cmd.h"

/* Upper bound of one payload: a longer one is refused before it is parsed. */
#define KVR_BCAST_MAX_BYTES (KVR_CMD_MAX_BYTES + 16)

/* Appends [router_id, kvr_cmd_encode(cmd)] to out; on error (KVR_EINVAL from the command
 * codec, KVR_ENOMEM) out is as it was. */
int kvr_bcast_encode(kvr_buf *out, uint64_t router_id, const kvr_cmd *cmd);

/* Decodes one payload. 0, or KVR_ELIMIT (over KVR_BCAST_MAX_BYTES), or KVR_EINVAL / the
 * command codec's error. */
int kvr_bcast_decode(const void *data, size_t len, uint64_t *router_id, kvr_cmd *cmd,
                     kvr_route_candidate *cand);

#endif
