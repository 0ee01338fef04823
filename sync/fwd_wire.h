/* fwd_wire: the follower→leader forward frames on the forward port (the Raft port + 1), the one
 * encoder/decoder pair both sides use (sync_fwd.c).
 *
 * A stream of frames, each a 4-byte big-endian length (at most KVR_FWD_MAX_FRAME) and a msgpack
 * array body:
 *   request  [1 (KVR_FWD_REQ), rpc id, bin command (sync/cmd.h)]
 *   reply    [2 (KVR_FWD_REP), rpc id, status (0 or a negative kvr_err code), outcome, type,
 *             worker_id, overlap, request_blocks, freed, str url (<= KVR_FSM_URL_MAX), cost,
 *             and only when true: bool pool_waking; for a disaggregated ROUTE (fsm.h) the 12th
 *             always, then path (kvr_disagg_path), prefill_worker_id, str prefill_url]
 * Decoders take longer arrays (later fields are ignored) and a reply without its cost (10
 * elements: routers from before the cost field), so a field can be added without a flag day;
 * a field that is announced (array length) must be there and of its type.
 *
 * Pure functions, no allocation on decode: the request's command points into the frame.
 * Bytes come off the network from any peer that proved the cluster secret: every decoder is
 * total (fuzz_sync_fwd). Golden bytes: tests/sync/test_fwd_wire.c. */
#ifndef KVR_SYNC_FWD_WIRE_H
#define KVR_SYNC_FWD_WIRE_H

#include "fsm.h"
#include "kvr_buf.h"

#include <stddef.h>
#include <stdint.h>

#define KVR_FWD_MAX_FRAME (64 * 1024) /* body bytes; a longer length closes the connection */
#define KVR_FWD_REQ 1
#define KVR_FWD_REP 2

typedef struct kvr_fwd_msg {
    uint64_t kind; /* KVR_FWD_REQ or KVR_FWD_REP; 0 when the body is not even [kind, ...] */
    uint64_t rpc;
    /* request */
    kvr_slice cmd; /* points into the decoded body */
    /* reply */
    int64_t status;
    kvr_fsm_result res; /* outcome, type, worker_id, overlap, request_blocks, freed, url, cost,
                           pool_waking, path, prefill_worker_id, prefill_url */
} kvr_fwd_msg;

/* Append one whole frame (length + body) to out. On error (KVR_ENOMEM; KVR_ELIMIT when the body
 * would exceed KVR_FWD_MAX_FRAME) out is as it was. */
int kvr_fwd_encode_req(kvr_buf *out, uint64_t rpc, const void *cmd, size_t cmd_len);
/* r NULL: an all-zero result (an error status). */
int kvr_fwd_encode_rep(kvr_buf *out, uint64_t rpc, int status, const kvr_fsm_result *r);

/* The first frame of the len bytes at p. Returns 1 and sets *body (into p) and *used (4 + body
 * length) when a whole frame is there; 0 when more bytes are needed; KVR_ELIMIT when the length
 * prefix is over KVR_FWD_MAX_FRAME (checked before anything is buffered for it; *used is then
 * the claimed body length, for the log). */
int kvr_fwd_frame_next(const void *p, size_t len, kvr_slice *body, size_t *used);

/* Decodes one frame body into m. 0, or KVR_EINVAL (m->kind is still set when the body began
 * with a known kind, so the caller can tell a malformed request from a malformed reply). */
int kvr_fwd_decode(const void *body, size_t len, kvr_fwd_msg *m);

#endif
