/* worker/zmq_pub: kvr-worker --kv-events zmq, a stand-in for vLLM's ZmqEventPublisher
 * (vllm/distributed/kv_events.py), so kvr-bridge can be tested against real processes.
 *
 * Wire format, as vLLM writes it:
 * - PUB (binds --zmq-endpoint): 3 frames per batch: topic, seq (8-byte big-endian, from 0 in
 *   each process: a restart resets it), msgpack batch [ts (float64), [events], dp_rank].
 * - Events (msgspec structs with tag=True, omit_defaults=True): array form
 *   ["BlockStored", block_hashes, parent_block_hash|nil, token_ids, block_size, lora_id (nil),
 *   medium ("GPU"), lora_name (nil)], ["BlockRemoved", block_hashes, medium],
 *   ["AllBlocksCleared"]; map form (vLLM PR #42892) {"type": "BlockStored", "block_hashes",
 *   "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
 *   "kv_cache_spec_kind": "full_attention"} etc. The outer batch stays positional in both (as
 *   released vLLM builds send it). Hashes as uint64 (--hash-format int) or 32-byte bin (bytes).
 * - ROUTER (binds --zmq-replay-endpoint, optional): [id, "", start_seq(8B BE)] is answered with
 *   every buffered batch whose seq >= start_seq as [id, "", topic, seq, payload] (layout new,
 *   vLLM #45177) or [id, "", seq, payload] (old), then the end marker (seq 0xFF x 8, empty
 *   payload). Other requests are ignored, as vLLM does. The last --zmq-buffer-steps batches are
 *   kept.
 *
 * Loop thread only (the ROUTER's ZMQ_FD is polled with a uv_poll_t). */
#ifndef KVR_WORKER_ZMQ_PUB_H
#define KVR_WORKER_ZMQ_PUB_H

#include "kv_event.h"
#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

typedef struct wk_zmq wk_zmq;

typedef struct wk_zmq_config {
    const char *endpoint, *replay_endpoint; /* replay_endpoint may be NULL */
    const char *topic;
    bool replay_old_layout;
    uint64_t buffer_steps;
    bool map_events, bytes_hashes;
    int64_t dp_rank;
} wk_zmq_config;

/* Binds the sockets. Returns 0 or a negative KVR_E* code with err (an endpoint in use, ...). */
int wk_zmq_open(uv_loop_t *loop, const wk_zmq_config *cfg, wk_zmq **out, kvr_err *err);

/* Encodes batch in vLLM's form and publishes it with the next seq. Returns 0, KVR_ENOMEM or
 * KVR_EINVAL (an event type the encoder does not know); a PUB with no subscriber or over its
 * HWM drops the message as vLLM's does, which is not an error. */
int wk_zmq_publish(wk_zmq *z, const kvr_kv_batch *batch);

/* Encodes batch as vLLM does into out (reset first). Exposed for the unit test. */
int wk_zmq_encode(kvr_buf *out, const kvr_kv_batch *batch, bool map_events, bool bytes_hashes,
                  int64_t dp_rank);

uint64_t wk_zmq_next_seq(const wk_zmq *z);

/* Closes the sockets (uv_close on the poll handle; the memory is freed in its close callback). */
void wk_zmq_close(wk_zmq *z);

#endif
