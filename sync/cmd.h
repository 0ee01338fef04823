/* cmd: the Raft command contract (DESIGN section 6), the one encoder/decoder pair of the bytes
 * every replica appends to its log and applies (fsm.h). Producers (sync.c, degraded-mode
 * reconcile, routerd, benches, tests) and consumers (kvr_fsm_apply_bytes, the fuzz target
 * fuzz_sync, the golden vectors in tests/sync) all go through it.
 *
 * Wire: one version byte (KVR_CMD_VERSION), then a msgpack array whose first element is the
 * kvr_cmd_type. A replica refuses other versions, so every replica of a group must run the
 * same command version.
 *
 * Memory: kvr_cmd_encode appends to a caller's kvr_buf; a kvr_cmd decoded from bytes borrows
 * its strings from those bytes and its ROUTE candidates from caller storage (never allocates).
 * Threads: none; pure functions, callable from any thread. */
#ifndef KVR_SYNC_CMD_H
#define KVR_SYNC_CMD_H

#include "cost.h"
#include "kvr_buf.h"
#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVR_CMD_VERSION 1
#define KVR_FSM_MAX_CANDIDATES 1024
#define KVR_FSM_MODEL_MAX 127
#define KVR_FSM_NS_MAX 63
#define KVR_FSM_URL_MAX 255
/* The most seq hashes a ROUTE carries for the approximate index (kvr-routerd --index approx):
 * 2048 blocks = 131072 tokens at block size 64, the default --max-request-tokens; a longer
 * request is assumed cached for its first 2048 blocks only. Keeps a forwarded ROUTE well
 * inside the forward frame (64 KiB). */
#define KVR_CMD_MAX_APPROX_HASHES 2048
/* Upper bound of one encoded command (ROUTE with KVR_FSM_MAX_CANDIDATES candidates and
 * KVR_CMD_MAX_APPROX_HASHES hashes). */
#define KVR_CMD_MAX_BYTES                                                                          \
    (96 + KVR_FSM_MODEL_MAX + KVR_FSM_NS_MAX + 24 * KVR_FSM_MAX_CANDIDATES +                       \
     8 * KVR_CMD_MAX_APPROX_HASHES + 8)

typedef enum kvr_cmd_type {
    KVR_CMD_NONE = 0,
    KVR_CMD_ROUTE = 1,
    KVR_CMD_PREFILL_DONE = 2,
    KVR_CMD_FREE = 3,
    KVR_CMD_WORKER_UP = 4,
    KVR_CMD_WORKER_DOWN = 5,
    KVR_CMD_FRONTEND_SEEN = 6,
    KVR_CMD_FRONTEND_EXPIRE = 7,
    KVR_CMD_EXPIRE = 8,
    KVR_CMD_POOL_SET = 9,      /* scale-to-zero: a pool's lifecycle state (fsm.h "Pools") */
    KVR_CMD_ROUTE_POLICY = 10, /* the route cost's weights, replicated (fsm.h "Route policy") */
} kvr_cmd_type;
#define KVR_CMD_TYPE_MAX KVR_CMD_ROUTE_POLICY

/* A pool's lifecycle (DESIGN section 13). REMOVED in a POOL_SET deletes the pool. */
typedef enum kvr_pool_state {
    KVR_POOL_REMOVED = 0,
    KVR_POOL_AWAKE = 1,
    KVR_POOL_WAKING = 2,
    KVR_POOL_SLEEPING = 3,
    KVR_POOL_STOPPING = 4,
} kvr_pool_state;
const char *kvr_pool_state_name(kvr_pool_state s);

typedef enum kvr_worker_role {
    KVR_ROLE_BOTH = 0,
    KVR_ROLE_PREFILL = 1,
    KVR_ROLE_DECODE = 2,
} kvr_worker_role;

typedef struct kvr_route_candidate {
    uint64_t worker_id;
    uint32_t overlap; /* blocks matched in the router's own index */
} kvr_route_candidate;

typedef struct kvr_route_cmd {
    uint8_t request_id[KVR_REQUEST_ID_LEN];
    uint64_t frontend_id;
    uint64_t now_ms;
    uint32_t request_blocks;
    kvr_slice model;
    kvr_slice ns;        /* namespace */
    uint64_t pin_worker; /* 0: choose by cost. Else book this worker (used by degraded-mode
                            reconciliation: the request is already being served there). */
    const kvr_route_candidate *candidates;
    uint32_t n_candidates; /* <= KVR_FSM_MAX_CANDIDATES */
    /* Only the listed candidates may be chosen (their overlap may be 0): the router restricts
     * a request to the workers that serve its LoRA adapter or whose model card matches.
     * Encoded as ROUTE's optional 10th field, only when true, so older logs decode as false. */
    bool only_candidates;
    /* Approximate index (issue 14 item 4): the request's seq hashes, n_approx_hashes x 8 bytes
     * little-endian (kvr_route_cmd_approx_hash), at most KVR_CMD_MAX_APPROX_HASHES. The FSM
     * hands them to its route hook with the booked worker (fsm.h). Encoded as ROUTE's optional
     * 11th field (a bin; the 10th is then written even when false) only when n > 0, so a
     * router in event mode writes the same bytes as before. Borrowed: from the producer's
     * storage when encoding, from the decoded bytes when decoded. */
    const uint8_t *approx_hashes;
    uint32_t n_approx_hashes;
    /* Disaggregation (issue 15 item 2): when disagg is true the FSM books a decode worker and,
     * when it decides on a remote prefill, a prefill worker too, in this one apply (fsm.h
     * "Disaggregation"). tokens and block_size give the uncached prompt length; the two
     * thresholds are the router's --max-local-prefill (tokens) and --max-prefill-queue,
     * carried in the command so every replica decides alike. Encoded as ROUTE's optional 12th
     * field, an array [tokens, block_size, max_local_prefill, max_prefill_queue], only when
     * disagg is true (the 10th and 11th are then written, the 11th as an empty bin when there
     * are no hashes), so every other ROUTE keeps its bytes. */
    bool disagg;
    uint32_t tokens, block_size, max_local_prefill, max_prefill_queue;
    /* The route cost's weights (issue 14 item 2; sync/cost.h), the proposing router's
     * --overlap-weight ... --route-temperature, carried in the command so every replica
     * decides alike whatever its own flags. When has_cost is false the FSM uses the replicated
     * route policy (ROUTE_POLICY, fsm.h) once one was applied, else its options' weights, so a
     * router leaves them out only once it has seen a policy applied (routerd/bookings_raft.c):
     * the ROUTE is then after that policy in the log on every replica. Encoded as ROUTE's optional
     * 13th field, an array [overlap_weight, load_weight, queue_weight, overflow_weight, tie_band,
     * temperature] of numbers, only when has_cost (the 10th-12th are then written, the 12th as nil
     * when disagg is false; a decoder from before this field refuses such a command, so upgrade
     * every router of a group first). */
    bool has_cost;
    kvr_cost_params cost;
} kvr_route_cmd;

/* Hash i of a ROUTE's approx_hashes. */
static inline uint64_t kvr_route_cmd_approx_hash(const kvr_route_cmd *r, uint32_t i)
{
    const uint8_t *p = r->approx_hashes + 8 * (size_t)i;
    uint64_t v = 0;
    for (int k = 0; k < 8; k++)
        v |= (uint64_t)p[k] << (8 * k);
    return v;
}

typedef struct kvr_worker_info {
    uint64_t id; /* != 0 */
    kvr_slice ns, model, url;
    kvr_worker_role role;
    uint32_t block_size;
    uint32_t capacity_blocks;
} kvr_worker_info;

typedef struct kvr_pool_cmd {
    kvr_slice ns, model;
    kvr_pool_state state;
    uint64_t now_ms;
} kvr_pool_cmd;

/* ROUTE_POLICY (fsm.h "Route policy"): the weights ROUTEs without their own use from this
 * command's place in the log on. Wire: [10, set_by, overlap_weight, load_weight,
 * queue_weight, overflow_weight, tie_band, temperature], the weights as msgpack numbers,
 * valid by kvr_cost_params_valid (else refused by encoder, decoder and apply alike); later
 * fields are skipped (room for, e.g., the disaggregation thresholds). */
typedef struct kvr_policy_cmd {
    uint64_t set_by; /* the proposing router's id (shown in /v1/state; any value is valid) */
    kvr_cost_params cost;
} kvr_policy_cmd;

typedef struct kvr_cmd {
    kvr_cmd_type type;
    union {
        kvr_route_cmd route;                    /* ROUTE */
        uint8_t request_id[KVR_REQUEST_ID_LEN]; /* PREFILL_DONE, FREE */
        kvr_worker_info worker;                 /* WORKER_UP */
        uint64_t worker_id;                     /* WORKER_DOWN */
        struct {
            uint64_t frontend_id, now_ms;
        } frontend;            /* FRONTEND_SEEN, _EXPIRE */
        uint64_t before_ms;    /* EXPIRE */
        kvr_pool_cmd pool;     /* POOL_SET */
        kvr_policy_cmd policy; /* ROUTE_POLICY */
    } u;
} kvr_cmd;

/* The cost's six weights as six msgpack numbers in one fixed order (overlap, load, queue,
 * overflow, tie band, temperature): how ROUTE's 13th field, ROUTE_POLICY and the FSM
 * snapshot's policy write them. Neither checks the values (kvr_cost_params_valid does). */
struct kvr_mp_reader;
int kvr_cmd_write_weights(kvr_buf *out, const kvr_cost_params *p);
int kvr_cmd_read_weights(struct kvr_mp_reader *r, kvr_cost_params *p);

/* Appends the encoding of cmd to out. KVR_EINVAL when a field is over its bound. */
int kvr_cmd_encode(const kvr_cmd *cmd, kvr_buf *out, kvr_err *err);
/* Decodes data[0..len) into cmd. Strings point into data; ROUTE candidates are stored in
 * cand[0..KVR_FSM_MAX_CANDIDATES). KVR_EINVAL / KVR_ETRUNC / KVR_ELIMIT / KVR_EUNSUPPORTED
 * (other version) with a message. Never allocates. */
int kvr_cmd_decode(const void *data, size_t len, kvr_cmd *cmd, kvr_route_candidate *cand,
                   kvr_err *err);
/* The type of encoded command bytes read from their head alone, without decoding them (the
 * rest may still be malformed): byte 1 a msgpack fixarray and byte 2 a known type as a positive
 * fixint, as kvr_cmd_encode writes every command; else KVR_CMD_NONE. The version byte is not
 * checked. For cheap scheduling decisions (sync coalesces FREE and PREFILL_DONE), never for
 * applying. */
kvr_cmd_type kvr_cmd_peek_type(const void *data, size_t len);
/* Request id of a ROUTE/PREFILL_DONE/FREE command, else NULL. */
const uint8_t *kvr_cmd_request_id(const kvr_cmd *cmd);
const char *kvr_cmd_type_name(kvr_cmd_type t);

#endif
