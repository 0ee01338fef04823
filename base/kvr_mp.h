/* kvr_mp: a zero-allocation msgpack cursor reader and a msgpack writer into a kvr_buf.
 *
 * Why not msgpack-c's unpacker: it sizes allocations from the input (an array32 header that
 * claims 100 M elements makes it malloc 4 GiB before reading one), and has no limits hook.
 * This reader never allocates, and refuses any header whose count could not possibly fit in
 * the bytes that remain (every element takes at least one byte), so a hostile header costs
 * nothing. Strings and bins are returned as slices into the input buffer.
 *
 * Every function returns 0 or a negative KVR_E* code: KVR_ETRUNC (input ends early),
 * KVR_ETYPE (value of another type; the cursor is NOT advanced), KVR_ELIMIT (count larger
 * than the remaining bytes, or nesting deeper than KVR_MP_MAX_DEPTH in kvr_mp_skip).
 * Every error leaves the cursor unmoved (kvr_mp_skip restores it too). A signed encoding of a
 * non-negative value peeks as KVR_MP_UINT; kvr_mp_read_int refuses a uint64 above INT64_MAX
 * with KVR_ETYPE.
 * Any thread; a reader is used by one thread at a time. */
#ifndef KVR_MP_H
#define KVR_MP_H

#include "kvr_buf.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVR_MP_MAX_DEPTH 32

typedef enum {
    KVR_MP_NIL,
    KVR_MP_BOOL,
    KVR_MP_UINT,  /* non-negative integer (positive fixint, uint8..64, or int8..64 >= 0) */
    KVR_MP_INT,   /* negative integer */
    KVR_MP_FLOAT, /* float32 or float64 */
    KVR_MP_STR,
    KVR_MP_BIN,
    KVR_MP_ARRAY,
    KVR_MP_MAP,
    KVR_MP_EXT,
    KVR_MP_INVALID, /* 0xc1 or end of input */
} kvr_mp_type;

typedef struct kvr_mp_reader {
    const uint8_t *p;
    const uint8_t *end;
} kvr_mp_reader;

static inline void kvr_mp_reader_init(kvr_mp_reader *r, const void *data, size_t len)
{
    r->p = (const uint8_t *)data;
    r->end = r->p + len;
}
static inline size_t kvr_mp_remaining(const kvr_mp_reader *r)
{
    return (size_t)(r->end - r->p);
}

kvr_mp_type kvr_mp_peek(const kvr_mp_reader *r);
int kvr_mp_read_nil(kvr_mp_reader *r);
int kvr_mp_read_bool(kvr_mp_reader *r, bool *v);
/* Non-negative integers only. */
int kvr_mp_read_uint(kvr_mp_reader *r, uint64_t *v);
/* Any integer that fits int64. */
int kvr_mp_read_int(kvr_mp_reader *r, int64_t *v);
/* Any integer, returned as its 64-bit pattern (u64 as is, negative i64 as two's complement). */
int kvr_mp_read_u64bits(kvr_mp_reader *r, uint64_t *v);
/* float32, float64 or any integer. */
int kvr_mp_read_double(kvr_mp_reader *r, double *v);
int kvr_mp_read_str(kvr_mp_reader *r, kvr_slice *s);
int kvr_mp_read_bin(kvr_mp_reader *r, kvr_slice *s);
/* str or bin. */
int kvr_mp_read_bytes(kvr_mp_reader *r, kvr_slice *s);
/* Array/map headers: *n is the element (pair) count, already checked against the bytes left. */
int kvr_mp_read_array(kvr_mp_reader *r, uint32_t *n);
int kvr_mp_read_map(kvr_mp_reader *r, uint32_t *n);
/* Skips one whole value of any type, nesting at most KVR_MP_MAX_DEPTH deep. */
int kvr_mp_skip(kvr_mp_reader *r);

/* Writer: each appends one value to b, choosing the smallest encoding (doubles as float32
 * when that holds them exactly). Returns 0 or KVR_ENOMEM (nothing appended), or KVR_ELIMIT
 * for a str/bin longer than 4 GiB - 1. */
int kvr_mp_write_nil(kvr_buf *b);
int kvr_mp_write_bool(kvr_buf *b, bool v);
int kvr_mp_write_uint(kvr_buf *b, uint64_t v);
int kvr_mp_write_int(kvr_buf *b, int64_t v);
int kvr_mp_write_double(kvr_buf *b, double v);
int kvr_mp_write_str(kvr_buf *b, const char *s, size_t len);
int kvr_mp_write_cstr(kvr_buf *b, const char *s);
int kvr_mp_write_bin(kvr_buf *b, const void *data, size_t len);
int kvr_mp_write_array(kvr_buf *b, uint32_t n);
int kvr_mp_write_map(kvr_buf *b, uint32_t n);

#endif
