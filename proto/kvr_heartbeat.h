/* kvr_heartbeat: the worker presence message of DESIGN section 4, one encoder and one decoder.
 *
 * Subject kvr.workers.<namespace>.<worker_id>, every 1 s, a msgpack map with the keys below;
 * unknown keys are skipped. Decoding only checks types and records which keys were present:
 * what a receiver requires (routers need id and block_size, frontends id, namespace and url)
 * stays the receiver's decision. Slices in a decoded heartbeat borrow the input buffer.
 * Pure functions, any thread. */
#ifndef KVR_HEARTBEAT_H
#define KVR_HEARTBEAT_H

#include "kvr_buf.h"
#include "kvr_hash.h"

#include <stddef.h>
#include <stdint.h>

enum {
    KVR_HB_ID = 1 << 0,
    KVR_HB_NAMESPACE = 1 << 1,
    KVR_HB_MODEL = 1 << 2,
    KVR_HB_URL = 1 << 3,
    KVR_HB_ROLE = 1 << 4,
    KVR_HB_BLOCK_SIZE = 1 << 5,
    KVR_HB_CAPACITY = 1 << 6,
    KVR_HB_ACTIVE = 1 << 7,
    KVR_HB_WAITING = 1 << 8,
    KVR_HB_USED = 1 << 9,
    KVR_HB_MDC_SUM = 1 << 10,
    KVR_HB_STARTED = 1 << 11,
    KVR_HB_LORAS = 1 << 12,
};

/* "loras": the LoRA adapters the worker serves (names of at most KVR_LORA_NAME_MAX bytes,
 * base/kvr_hash.h), at most this many; a longer list or name fails the decode. */
#define KVR_HB_MAX_LORAS 64

typedef struct kvr_heartbeat {
    unsigned has; /* KVR_HB_* bits of the keys present */
    uint64_t id;
    kvr_slice ns, model, url, role, mdc_sum;
    uint64_t block_size, capacity_blocks, active, waiting, used_blocks, started_ms;
    kvr_slice loras[KVR_HB_MAX_LORAS]; /* decode: borrow the input; encode: the caller's */
    uint32_t n_loras;
} kvr_heartbeat;

/* Decodes one heartbeat. Returns 0, or KVR_ETYPE / KVR_ETRUNC / KVR_ELIMIT (from kvr_mp) when
 * the payload is not a map or a known key holds a value of the wrong type. */
int kvr_heartbeat_decode(const void *data, size_t len, kvr_heartbeat *hb);

/* Appends the heartbeat with every key (has is ignored; "loras" only when n_loras > 0, so a
 * worker without adapters sends what older receivers know). KVR_EINVAL when n_loras or a
 * name is over its bound. Returns 0 or KVR_ENOMEM. */
int kvr_heartbeat_encode(kvr_buf *out, const kvr_heartbeat *hb);

#endif
