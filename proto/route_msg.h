/* route_msg: the one codec of the route API on NATS (docs/DESIGN.md section 5).
 *
 *   kvr.route        request  {"request_id":bin16, "frontend_id":u64, "model":str,
 *                              "namespace":str, "role":str?, "tokens":u32, "seq_hashes":[u64…],
 *                              "lora":str?, "mdc_sum":str?}
 *                    reply    {"ok":true, "worker_id":u64, "url":str, "overlap_blocks":u32,
 *                              "best_overlap_blocks":u32? (only when above overlap_blocks), "router_id":u32, "mode":str,
 *                              "worker_bookings":u32?,
 *                              "decided_ns":u64?, "disagg":str?, "prefill_worker_id":u64?,
 *                              "prefill_url":str?}  or  {"ok":false, "error":str}
 *   kvr.route.event  event    {"request_id":bin16, "event":"prefill_done"|"free",
 *                              "relayed":bool?}
 *
 * Every producer and consumer (frontend, routerd, benches, test tools) goes through these
 * functions, so the contract lives in one place and one fuzz target covers it.
 *
 * Decoding is zero-copy: string fields of a decoded message are slices into the caller's
 * input buffer and live as long as it does. Unknown keys are skipped (newer peers may add
 * fields); every length is bounded before it is used. Decoders return 0 or a negative KVR_E*
 * code with err naming the field. Pure functions: any thread. */
#ifndef KVR_PROTO_ROUTE_MSG_H
#define KVR_PROTO_ROUTE_MSG_H

#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Route requests: any router answers KVR_ROUTE_SUBJECT (queue group); only the Raft leader
 * answers KVR_ROUTE_LEADER_SUBJECT, where clients ask first (DESIGN.md 4). */
#define KVR_ROUTE_SUBJECT "kvr.route"
#define KVR_ROUTE_LEADER_SUBJECT "kvr.route.leader"
/* Route events (prefill done, free): any router takes KVR_ROUTE_EVENT_SUBJECT (queue group);
 * only the Raft leader takes KVR_ROUTE_LEADER_EVENT_SUBJECT, where clients send them first with
 * KVR_ROUTE_EVENT_SUBJECT as the fallback when no leader listens (kvr_nats_publish_fallback). */
#define KVR_ROUTE_EVENT_SUBJECT "kvr.route.event"
#define KVR_ROUTE_LEADER_EVENT_SUBJECT "kvr.route.leader.event"
#define KVR_ROUTE_ID_LEN 16
#define KVR_ROUTE_NAME_MAX 128  /* model, namespace and role, in bytes */
#define KVR_ROUTE_URL_MAX 256   /* a worker URL in a reply */
#define KVR_ROUTE_ERROR_MAX 255 /* a reply's error text; longer text is cut, not refused */

typedef struct kvr_route_req {
    uint8_t request_id[KVR_ROUTE_ID_LEN];
    uint64_t frontend_id;
    kvr_slice model, ns, role; /* role: empty when absent */
    /* lora: the LoRA adapter the request runs under (seq_hashes are hashed under its seed);
     * mdc_sum: the model card checksum the frontend loaded for the model (workers announcing
     * another non-empty one are not candidates). Both empty when absent, encoded only when
     * set; at most KVR_ROUTE_NAME_MAX bytes. */
    kvr_slice lora, mdc_sum;
    uint32_t tokens;
    const uint64_t *seq_hashes; /* encode: the caller's; decode: the caller's hash_buf */
    size_t n_hashes;
} kvr_route_req;

/* request_id is the request's first field: its 16 bytes start this many bytes into an encoded
 * request, so a sender may encode once and patch the id in place for each send (the benches
 * do; tests/proto checks the offset). */
#define KVR_ROUTE_REQ_ID_OFFSET 14

/* Appends the msgpack request to out. Returns 0 or KVR_ENOMEM/KVR_EINVAL (a name over
 * KVR_ROUTE_NAME_MAX or more hashes than fit a msgpack array). */
int kvr_route_req_encode(kvr_buf *out, const kvr_route_req *r);

/* Limits a decoder applies; a field over its limit fails the whole message. */
typedef struct kvr_route_req_limits {
    uint64_t max_tokens; /* "tokens" above this → KVR_ELIMIT */
    size_t max_hashes;   /* capacity of hash_buf; a longer "seq_hashes" → KVR_ELIMIT */
} kvr_route_req_limits;

/* Decodes a request; seq hashes are written to hash_buf (lim->max_hashes entries). request_id
 * and model are required. */
int kvr_route_req_decode(const void *data, size_t len, const kvr_route_req_limits *lim,
                         uint64_t *hash_buf, kvr_route_req *out, kvr_err *err);

typedef struct kvr_route_reply {
    bool ok;
    uint64_t worker_id;
    kvr_slice url, mode;
    uint32_t overlap_blocks, router_id;
    /* the largest overlap any candidate had in the router's index (>= overlap_blocks when the
     * cost chose a less loaded worker); decoded as overlap_blocks when absent */
    uint32_t best_overlap_blocks;
    bool has_view; /* local-mode extras below are present */
    uint32_t worker_bookings;
    uint64_t decided_ns;
    kvr_slice error; /* when !ok */
    /* !ok: the request's pool is scaled to zero and waking (DESIGN 5, scale-to-zero): the
     * frontend holds the request and asks again, in retry_after_ms or when a worker of the
     * model is heard. Encoded as "pool_state":"waking" and "retry_after_ms" only when set. */
    bool pool_waking;
    uint32_t retry_after_ms;
    /* Disaggregation (issue 15): "disagg" is the path the route took, "remote", "local" or
     * "fallback" (empty: not disaggregated; encoded only when set). When remote, the prefill
     * worker the same decision booked: prefill_worker_id and prefill_url (required then, at
     * most KVR_ROUTE_URL_MAX bytes); worker_id/url are the decode worker. Written after
     * "mode", so replies without them keep their bytes. */
    kvr_slice disagg;
    uint64_t prefill_worker_id;
    kvr_slice prefill_url;
} kvr_route_reply;

int kvr_route_reply_encode(kvr_buf *out, const kvr_route_reply *r);
/* An ok reply must carry worker_id and a non-empty url. */
int kvr_route_reply_decode(const void *data, size_t len, kvr_route_reply *out, kvr_err *err);

typedef enum kvr_route_event_type {
    KVR_ROUTE_EVENT_PREFILL_DONE = 1,
    KVR_ROUTE_EVENT_FREE = 2,
} kvr_route_event_type;

typedef struct kvr_route_event {
    uint8_t request_id[KVR_ROUTE_ID_LEN];
    kvr_route_event_type type;
    /* Published again by a router that took it from the queue group but could not commit it
     * (no quorum): routers never relay a relayed event a second time. Encoded only when true. */
    bool relayed;
} kvr_route_event;

int kvr_route_event_encode(kvr_buf *out, const kvr_route_event *e);
int kvr_route_event_decode(const void *data, size_t len, kvr_route_event *out, kvr_err *err);

/* "prefill_done" / "free"; NULL for anything else. */
const char *kvr_route_event_name(kvr_route_event_type t);

/* Where a client sends a route request (DESIGN.md 4): a call's first try to the Raft leader's
 * subject, later tries (after a timeout) to any router. No responders on the leader subject
 * (an election, a leader not ready yet, routers in local mode) sends that try to kvr.route at
 * once and keeps the client off the leader subject for KVR_ROUTE_LEADER_SKIP_MS. One per
 * client process; caller-owned; not thread-safe (one loop thread). */
#define KVR_ROUTE_LEADER_SKIP_MS 500
typedef struct kvr_route_target {
    bool leader_first;            /* false: always kvr.route (the pre-leader-subject path) */
    int64_t skip_leader_until_ms; /* monotonic */
} kvr_route_target;

/* The subject for try number try_no (1 = a call's first) at monotonic time now_ms. */
const char *kvr_route_target_subject(const kvr_route_target *t, int try_no, int64_t now_ms);

/* Whether route events go to the leader's event subject first (with kvr.route.event as the
 * fallback): when route requests do. While the leader subject has no responders (local or
 * best-effort routers, an election) they go straight to kvr.route.event, without the detour. */
bool kvr_route_target_events_to_leader(const kvr_route_target *t, int64_t now_ms);

/* A try sent to subject got "no responders": true when subject was the leader's (then the
 * caller asks again at once on kvr.route without counting a try), false when nobody answers
 * kvr.route either. */
bool kvr_route_target_no_responders(kvr_route_target *t, const char *subject, int64_t now_ms);

#endif
