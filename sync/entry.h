/* entry: the Raft log entry format of kvroute — a batch of fsm commands.
 *
 *   "KB" | version u8 (1) | reserved u8 | origin u32 LE | nonce u64 LE | seq u64 LE |
 *   count u32 LE | count × (len u32 LE | command bytes, see kvr_cmd_encode)
 *
 * origin/nonce/seq identify the proposer's batch so that the proposing node can hand each
 * command's apply result to whoever is waiting for it; other replicas ignore them. The nonce
 * is random per process start, so entries replayed from an earlier life never match. Bytes
 * after the last command are ignored (the consensus layer pads entries to 8 bytes).
 * Pure functions, any thread. */
#ifndef KVR_SYNC_ENTRY_H
#define KVR_SYNC_ENTRY_H

#include "fsm.h"

#define KVR_ENTRY_HDR_LEN 32
#define KVR_ENTRY_MAX_COMMANDS 65536

typedef struct kvr_entry_header {
    uint32_t origin;
    uint64_t nonce, seq;
    uint32_t count;
} kvr_entry_header;

/* Starts an entry in out (appends the header with count 0). */
int kvr_entry_begin(kvr_buf *out, uint32_t origin, uint64_t nonce, uint64_t seq);
/* Appends one encoded command; `start` is out->len as it was before kvr_entry_begin. */
int kvr_entry_add(kvr_buf *out, size_t start, const void *cmd, size_t len);

/* Called once per command in order with its result. */
typedef void (*kvr_entry_result_fn)(void *data, uint32_t i, const kvr_fsm_result *res);
/* Applies every command of an entry to f. A malformed command gets outcome INVALID and the
 * rest still apply; a malformed header applies nothing and returns KVR_ECORRUPT (hdr zeroed).
 * fn may be NULL. */
int kvr_entry_apply(kvr_fsm *f, const void *buf, size_t len, kvr_entry_header *hdr,
                    kvr_entry_result_fn fn, void *data);

#endif
