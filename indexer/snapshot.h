/* kvr_snapshot: the index's LMDB snapshot (DESIGN section 7).
 *
 * File: <dir>/index.mdb, a fresh LMDB environment (MDB_NOSUBDIR) written as <dir>/index.mdb.tmp
 * in one write txn with MDB_APPEND of big-endian keys, mdb_env_sync, close, then a 32-byte
 * trailer (magic, LMDB length, XXH3-64 of every LMDB byte) appended and fsync'd, rename to
 * index.mdb, fsync of the directory. A reader therefore never sees a half-written file, and a
 * flipped or missing byte anywhere is caught by the trailer BEFORE LMDB parses a single page
 * (LMDB itself trusts its file and could crash on a corrupt one).
 *
 * Inside (three named DBIs):
 *   "meta"    "meta" -> magic "KVRIDX01", format, block size, stream sequence, worker count,
 *             pair count, entry count, digest, checksum, created_ms (big-endian, fixed size)
 *   "workers" BE64(worker_id) -> BE64(capacity_blocks) BE64(last_event_seq) BE64(n_pairs)
 *   "ext"     BE64(worker_id) BE64(external hash) -> BE64(seq hash)
 * The index entries are exactly the distinct (worker, seq) of the "ext" records; the checksum
 * is XXH3-64 over every workers and ext record (key and value) in key order; entry count and
 * digest are re-verified when the image is imported (kvr_index_import).
 *
 * Threads: kvr_snapshot_write and kvr_snapshot_read touch no index: they work on a
 * kvr_index_image (index.h), so routerd can run them on a uv_queue_work thread while the loop
 * keeps routing. Two writers must not target the same dir at once (the caller serialises).
 * One process must not open the same env twice: writer and reader use distinct files
 * (index.mdb.tmp vs index.mdb) and the reader opens read-only without a lock file. */
#ifndef KVR_SNAPSHOT_H
#define KVR_SNAPSHOT_H

#include "index.h"
#include "kvr_err.h"

#include <stdint.h>

#define KVR_SNAPSHOT_FILE "index.mdb"
#define KVR_SNAPSHOT_TMP_FILE "index.mdb.tmp"
#define KVR_SNAPSHOT_FORMAT 1u
/* A snapshot larger than this is refused without being read. */
#define KVR_SNAPSHOT_MAX_BYTES (64ULL << 30)

typedef struct kvr_snapshot_info {
    uint64_t file_bytes;
    uint64_t pairs;   /* external -> seq records */
    uint64_t entries; /* (worker, seq) entries */
    uint32_t workers;
    uint32_t block_size;
    uint64_t stream_seq;
    uint64_t digest;
    uint64_t created_ms; /* wall clock when written */
} kvr_snapshot_info;

/* Writes img to <dir>/index.mdb (creating dir if missing, one level). SORTS img in place
 * (workers by id, each worker's pairs by external hash); img stays owned by the caller.
 * info may be NULL. Returns 0, KVR_EIO (with the failing step and path) or KVR_ENOMEM; on
 * failure the previous index.mdb is untouched and the temporary file removed. Any thread. */
int kvr_snapshot_write(kvr_index_image *img, const char *dir, kvr_snapshot_info *info,
                       kvr_err *err);

/* Reads <dir>/index.mdb into *img (caller frees with kvr_index_image_free). expected_block_size
 * 0 accepts any. Returns 0, or:
 *   KVR_ENOTFOUND    no snapshot file
 *   KVR_ECORRUPT     truncated, zero-length, foreign (not LMDB, or LMDB without our meta),
 *                    checksum or count mismatch
 *   KVR_EUNSUPPORTED newer format, or block size differs from expected_block_size
 *   KVR_EIO, KVR_ENOMEM
 * with err saying which and why. *img is empty on any error. Any thread. */
int kvr_snapshot_read(const char *dir, uint32_t expected_block_size, kvr_index_image *img,
                      kvr_snapshot_info *info, kvr_err *err);

/* Owner thread convenience: kvr_snapshot_read + kvr_index_import (idx unchanged on error). */
int kvr_snapshot_load(const char *dir, kvr_index *idx, kvr_snapshot_info *info, kvr_err *err);

#endif
