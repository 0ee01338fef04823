/* io_layer: the plumbing of a raft_io that wraps another one (disklog and termguard).
 *
 * A layer keeps a kvr_io_layer as the first member of its state. kvr_io_layer_init points
 * every method of the outer io at the inner io's (the inner's error message is copied up
 * when a call fails) and routes the inner io's tick, receive and close callbacks back to
 * raft with the outer io; the layer then replaces the methods it changes. Closing: the outer
 * close closes the inner io, then runs the layer's on_inner_closed, which releases the
 * layer's own handles and calls kvr_io_layer_closed last (that frees the state and tells raft).
 *
 * Threads: the inner io's loop thread. Memory: the inner io is caller-owned and must outlive
 * the layer; the state is allocated by the layer with malloc and freed by kvr_io_layer_closed. */
#ifndef KVR_SYNC_IO_LAYER_H
#define KVR_SYNC_IO_LAYER_H

#include <raft.h>

typedef struct kvr_io_layer {
    struct raft_io *outer, *inner;
    raft_io_tick_cb tick_cb;
    raft_io_recv_cb recv_cb;
    raft_io_close_cb close_cb;
    /* runs once the inner io has closed; must end with kvr_io_layer_closed */
    void (*on_inner_closed)(struct kvr_io_layer *l);
} kvr_io_layer;

/* Fills io (zeroed first) to delegate to inner; io->impl = l, inner->data = l. */
void kvr_io_layer_init(kvr_io_layer *l, struct raft_io *io, struct raft_io *inner,
                       void (*on_inner_closed)(kvr_io_layer *l));

/* The layer of an outer io (NULL once closed or discarded). */
static inline kvr_io_layer *kvr_io_layer_of(struct raft_io *io)
{
    return io->impl;
}

/* The default close (closes the inner io, then on_inner_closed): a layer that replaces close
 * to finish its own requests first calls it last. */
void kvr_io_layer_close(struct raft_io *io, raft_io_close_cb cb);

/* After a failed call on the inner io: its message becomes the outer io's. */
void kvr_io_layer_copy_errmsg(kvr_io_layer *l);

/* Frees the layer's state (l, allocated by the layer) and calls raft's close callback. */
void kvr_io_layer_closed(kvr_io_layer *l);

#endif
