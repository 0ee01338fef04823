/* beat_msg: the two liveness beats on NATS (DESIGN section 5), one encoder/decoder pair each.
 *
 * Frontend lease: subject kvr.frontends.<frontend_id> (decimal, >= 1) every 1 s, payload a
 * msgpack map {"frontend_id":u64, "ts_ms":u64, "active":u64} (active: streams in flight).
 * Routers take the id from the subject alone (kvr_lease_subject_id); the payload is for people
 * and tools (kvr_lease_decode: unknown keys skipped, like the heartbeat's).
 *
 * Quorum beacon: subject kvr.routers.quorum, payload the sending router's id as decimal text
 * (no sign, no spaces, no NUL, 1..KVR_BEACON_MAX digits, not 0), from a Raft-mode router that
 * knows a leader and serves kvr.route (routerd/bookings_raft.c).
 *
 * Bytes from any NATS client of the account: every decoder is total (fuzz_beat_msg). Golden
 * bytes: tests/proto/test_beat_msg.c. Pure functions, any thread; decoded slices borrow the
 * input. */
#ifndef KVR_BEAT_MSG_H
#define KVR_BEAT_MSG_H

#include "kvr_buf.h"

#include <stddef.h>
#include <stdint.h>

#define KVR_LEASE_SUBJECT_PREFIX "kvr.frontends."
#define KVR_LEASE_SUBJECT_WILDCARD "kvr.frontends.*"
#define KVR_QUORUM_SUBJECT "kvr.routers.quorum"
#define KVR_LEASE_MAX_BYTES 1024 /* a longer lease payload is refused before it is read */
#define KVR_BEACON_MAX 15        /* digits of a beacon */

enum { KVR_LEASE_FRONTEND_ID = 1 << 0, KVR_LEASE_TS = 1 << 1, KVR_LEASE_ACTIVE = 1 << 2 };

typedef struct kvr_lease {
    unsigned has; /* KVR_LEASE_* bits of the keys present (decode) */
    uint64_t frontend_id, ts_ms, active;
} kvr_lease;

/* "kvr.frontends.<id>" into out[cap]; KVR_ELIMIT when it does not fit. */
int kvr_lease_subject(char *out, size_t cap, uint64_t frontend_id);
/* The frontend id of a lease subject: the decimal after the last '.', >= 1, no overflow.
 * KVR_EINVAL otherwise. */
int kvr_lease_subject_id(const char *subject, uint64_t *frontend_id);
/* Appends the payload (all three keys) to b; KVR_ENOMEM leaves b as it was. */
int kvr_lease_encode(kvr_buf *b, const kvr_lease *l);
/* 0, KVR_ELIMIT (over KVR_LEASE_MAX_BYTES), or the msgpack reader's error. Trailing bytes are
 * refused (KVR_EINVAL). */
int kvr_lease_decode(const void *data, size_t len, kvr_lease *l);

/* Writes the beacon of router_id (>= 1) into out[cap]; returns its length, or KVR_EINVAL
 * (id 0) / KVR_ELIMIT (does not fit). No NUL is counted. */
int kvr_quorum_beacon_encode(char *out, size_t cap, uint64_t router_id);
/* 0 and *router_id, or KVR_EINVAL. */
int kvr_quorum_beacon_decode(const void *data, size_t len, uint64_t *router_id);

#endif
