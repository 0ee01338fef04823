/* libFuzzer target for the replicated state machine's inputs: Raft log entries and commands
 * come from peers (and from disk after a restart), so their decoders and apply must be total.
 *
 * The first byte picks what the rest is:
 *   0: an entry (sync/entry.h) applied to a small FSM;
 *   1: a sequence of commands (the Raft command codec, sync/cmd.h), each [u8 len][len bytes],
 *      applied in order to one FSM, then
 *      the state is snapshotted, restored into a fresh FSM, and the digests must match;
 *   2: an FSM snapshot, restored into a fresh FSM (refused or accepted, never a crash), and if
 *      accepted it must snapshot again to a state with the same digest. */
#include "cmd.h"
#include "entry.h"
#include "fsm.h"
#include "kvr_buf.h"

#include <stdint.h>
#include <stdlib.h>

static kvr_fsm *small_fsm(void)
{
    kvr_fsm_options o = {0};
    o.max_bookings = 64; /* small, so the "full" paths are reachable */
    return kvr_fsm_new(&o);
}

static void check_roundtrip(const kvr_fsm *f)
{
    kvr_buf snap;
    kvr_buf_init(&snap);
    if (kvr_fsm_snapshot(f, &snap, NULL) == 0) {
        kvr_fsm *g = small_fsm();
        if (g == NULL || kvr_fsm_restore(g, snap.base, snap.len, NULL) != 0 ||
            kvr_fsm_digest(g) != kvr_fsm_digest(f))
            abort();
        kvr_fsm_free(g);
    }
    kvr_buf_free(&snap);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t mode = data[0] % 3;
    data++;
    size--;
    kvr_fsm *f = small_fsm();
    if (f == NULL)
        return 0;
    if (mode == 0) {
        kvr_entry_header hdr;
        (void)kvr_entry_apply(f, data, size, &hdr, NULL, NULL);
        check_roundtrip(f);
    } else if (mode == 1) {
        size_t off = 0;
        while (off < size) {
            size_t len = data[off++];
            if (len > size - off)
                len = size - off;
            kvr_fsm_result res;
            kvr_fsm_apply_bytes(f, data + off, len, &res);
            off += len;
        }
        check_roundtrip(f);
    } else {
        if (kvr_fsm_restore(f, data, size, NULL) == 0)
            check_roundtrip(f);
    }
    kvr_fsm_free(f);
    return 0;
}
