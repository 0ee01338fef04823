/* io_layer: the plumbing of a raft_io that wraps another one (memlog, disklog, termguard).
 *
 * A layer keeps a kvr_io_layer as the first member of its state. kvr_io_layer_init points
 * every method of the outer io at the inner io's (the inner's error message is copied up
 * when a call fails) and routes the inner io's tick, receive and close callbacks back to
 * raft with the outer io; the layer then replaces the methods it changes.
 *
 * Requests a layer answers itself (memlog's appends and snapshots, disklog's refused appends,
 * termguard's muted sends) go through one queue answered on a later loop turn: raft 0.15 does
 * work after append() and snapshot_put() return that must precede their callbacks, and must
 * see every request it made answered before its close ends.
 *
 * Closing: the outer close answers what is still queued (RAFT_CANCELED), closes the inner io,
 * then the layer's timer, then runs the layer's release hook, frees the state and tells raft.
 *
 * Threads: the inner io's loop thread. Memory: the inner io is caller-owned and must outlive
 * the layer; the state is allocated by the layer with malloc (kvr_io_layer first) and freed
 * here, by the close or by kvr_io_layer_discard. */
#ifndef KVR_SYNC_IO_LAYER_H
#define KVR_SYNC_IO_LAYER_H

#include <raft.h>
#include <uv.h>

struct kvr_io_later;

typedef struct kvr_io_layer {
    struct raft_io *outer, *inner;
    raft_io_tick_cb tick_cb;
    raft_io_recv_cb recv_cb;
    raft_io_close_cb close_cb;
    uv_timer_t later_timer; /* answers the queue below on the next loop turn */
    struct kvr_io_later *later_head, **later_tail;
    /* Optional, set by the layer after init. recv_hook sees each message the inner io
     * receives instead of raft and passes it on with recv_cb(outer, msg); release frees what
     * the layer holds besides its state, just before the state is freed. */
    void (*recv_hook)(struct kvr_io_layer *l, struct raft_message *msg);
    void (*release)(struct kvr_io_layer *l);
} kvr_io_layer;

/* Fills io (zeroed first) to delegate to inner; io->impl = l, inner->data = l. */
void kvr_io_layer_init(kvr_io_layer *l, struct raft_io *io, struct raft_io *inner, uv_loop_t *loop);

/* The layer of an outer io (NULL once closed or discarded). */
static inline kvr_io_layer *kvr_io_layer_of(struct raft_io *io)
{
    return io->impl;
}

/* Answers raft's request on a later loop turn, without the inner io, with status (every one
 * with RAFT_CANCELED when the io closes first). A snapshot_get's answer hands raft snap
 * (allocated with raft_malloc; freed here if the io closes first). 0, or RAFT_NOMEM: nothing
 * queued, the caller returns it to raft (which then owns req) and keeps snap. */
int kvr_io_layer_append_later(kvr_io_layer *l, struct raft_io_append *req, raft_io_append_cb cb,
                              int status);
int kvr_io_layer_send_later(kvr_io_layer *l, struct raft_io_send *req, raft_io_send_cb cb,
                            int status);
int kvr_io_layer_put_later(kvr_io_layer *l, struct raft_io_snapshot_put *req,
                           raft_io_snapshot_put_cb cb, int status);
int kvr_io_layer_get_later(kvr_io_layer *l, struct raft_io_snapshot_get *req,
                           raft_io_snapshot_get_cb cb, struct raft_snapshot *snap);

/* The default close (see above): a layer that replaces close calls it last. */
void kvr_io_layer_close(struct raft_io *io, raft_io_close_cb cb);

/* After a failed call on the inner io: its message becomes the outer io's. */
void kvr_io_layer_copy_errmsg(kvr_io_layer *l);

/* Releases a layer no raft took (raft_init failed or never ran): the state is freed once its
 * timer has closed, on a later loop turn. */
void kvr_io_layer_discard(struct raft_io *io);

#endif
