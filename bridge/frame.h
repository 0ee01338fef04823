/* bridge/frame: the engine side of kvr-bridge, as pure functions (no I/O, any thread).
 *
 * Wire format, checked in vLLM's vllm/distributed/kv_events.py (ZmqEventPublisher):
 * - live PUB message: 3 frames (topic, seq as 8-byte big-endian, one msgpack batch);
 * - replay: a DEALER sends ["", start_seq(8B BE)] to the ROUTER; each buffered batch with
 *   seq >= start_seq comes back as ["", seq, payload] (older vLLM, SGLang) or
 *   ["", topic, seq, payload] (vLLM since PR #45177), then an end marker whose seq is
 *   (-1).to_bytes(8, "big", signed=True) = 0xFF x 8 with an empty payload.
 * SGLang (python/sglang/srt/disaggregation/kv_events.py) copies the framing.
 *
 * Batches are validated with the routers' own decoder (common/kv_event.h). A batch the
 * decoder rejects is split into its events; each event is checked alone and the batch is
 * re-encoded with only the good ones, so one bad event never drops its neighbours. */
#ifndef KVR_BRIDGE_FRAME_H
#define KVR_BRIDGE_FRAME_H

#include "kv_event.h"
#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVR_BRIDGE_SEQ_END UINT64_MAX /* the replay end marker's seq */

/* Reads an 8-byte big-endian sequence number. KVR_EINVAL when len != 8. */
int kvr_bridge_read_seq(const void *p, size_t len, uint64_t *seq);

/* A replay reply after the empty delimiter frame has been removed: frames [seq, payload] or
 * [topic, seq, payload]. Sets *seq and *payload (borrowing frames). KVR_EINVAL otherwise. */
typedef struct kvr_bridge_frame {
    const void *data;
    size_t len;
} kvr_bridge_frame;
int kvr_bridge_parse_replay(const kvr_bridge_frame *f, size_t n, uint64_t *seq,
                            kvr_bridge_frame *payload, kvr_err *err);

typedef struct kvr_bridge_check {
    uint32_t good;  /* events forwarded */
    uint32_t bad;   /* events dropped */
    bool rewritten; /* out holds a re-encoded batch (else forward the input as it is) */
} kvr_bridge_check;

/* Validates one batch. Returns 0 with *res filled: when res->rewritten, out holds the batch
 * with only the good events (out is reset first); when res->good == 0 nothing should be
 * forwarded. Returns KVR_EINVAL (err says why) when the batch's envelope itself is unusable
 * (not an array/map, no events list): the whole payload is garbage. d's counters count each
 * rejected event once per reason. */
int kvr_bridge_check_batch(kvr_kv_decoder *d, const void *data, size_t len, kvr_buf *out,
                           kvr_buf *scratch, kvr_bridge_check *res, kvr_err *err);

/* Encodes [ts, [["AllBlocksCleared"]], dp_rank] into out (reset first). */
int kvr_bridge_encode_clear(kvr_buf *out, double ts, int64_t dp_rank);

#endif
