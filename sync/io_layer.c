#include "io_layer.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

enum { LATER_SEND, LATER_APPEND, LATER_PUT, LATER_GET };

/* A request the layer answers itself, on a later loop turn. */
typedef struct kvr_io_later {
    int kind, status;
    void *req;
    void *cb;
    struct raft_snapshot *snap; /* LATER_GET: handed to raft */
    struct kvr_io_later *next;
} kvr_io_later;

static void snap_free(struct raft_snapshot *s)
{
    raft_configuration_close(&s->configuration);
    for (unsigned i = 0; i < s->n_bufs; i++)
        raft_free(s->bufs[i].base);
    raft_free(s->bufs);
    raft_free(s);
}

static void answer(kvr_io_later *q, bool cancel)
{
    int status = cancel ? RAFT_CANCELED : q->status;
    switch (q->kind) {
    case LATER_SEND:
        ((raft_io_send_cb)q->cb)(q->req, status);
        break;
    case LATER_APPEND:
        ((raft_io_append_cb)q->cb)(q->req, status);
        break;
    case LATER_PUT:
        ((raft_io_snapshot_put_cb)q->cb)(q->req, status);
        break;
    default:
        if (cancel) {
            snap_free(q->snap);
            ((raft_io_snapshot_get_cb)q->cb)(q->req, NULL, status);
        } else {
            ((raft_io_snapshot_get_cb)q->cb)(q->req, q->snap, 0);
        }
        break;
    }
}

/* Answers every queued request, taking the queue first: a callback may queue more. */
static void answer_queued(kvr_io_layer *l, bool cancel)
{
    kvr_io_later *q = l->later_head;
    l->later_head = NULL;
    l->later_tail = &l->later_head;
    while (q) {
        kvr_io_later *next = q->next;
        answer(q, cancel);
        free(q);
        q = next;
    }
}

static void later_run(uv_timer_t *timer)
{
    answer_queued(timer->data, false);
}

static int queue_later(kvr_io_layer *l, int kind, void *req, void *cb, int status,
                       struct raft_snapshot *snap)
{
    kvr_io_later *q = calloc(1, sizeof *q);
    if (!q)
        return RAFT_NOMEM;
    q->kind = kind;
    q->status = status;
    q->req = req;
    q->cb = cb;
    q->snap = snap;
    *l->later_tail = q;
    l->later_tail = &q->next;
    if (!uv_is_active((uv_handle_t *)&l->later_timer))
        uv_timer_start(&l->later_timer, later_run, 0, 0);
    return 0;
}

int kvr_io_layer_append_later(kvr_io_layer *l, struct raft_io_append *req, raft_io_append_cb cb,
                              int status)
{
    return queue_later(l, LATER_APPEND, req, (void *)cb, status, NULL);
}

int kvr_io_layer_send_later(kvr_io_layer *l, struct raft_io_send *req, raft_io_send_cb cb,
                            int status)
{
    return queue_later(l, LATER_SEND, req, (void *)cb, status, NULL);
}

int kvr_io_layer_put_later(kvr_io_layer *l, struct raft_io_snapshot_put *req,
                           raft_io_snapshot_put_cb cb, int status)
{
    return queue_later(l, LATER_PUT, req, (void *)cb, status, NULL);
}

int kvr_io_layer_get_later(kvr_io_layer *l, struct raft_io_snapshot_get *req,
                           raft_io_snapshot_get_cb cb, struct raft_snapshot *snap)
{
    return queue_later(l, LATER_GET, req, (void *)cb, 0, snap);
}

void kvr_io_layer_copy_errmsg(kvr_io_layer *l)
{
    memcpy(l->outer->errmsg, l->inner->errmsg, sizeof l->outer->errmsg);
}

static int checked(kvr_io_layer *l, int rv)
{
    if (rv)
        kvr_io_layer_copy_errmsg(l);
    return rv;
}

static void inner_tick(struct raft_io *inner)
{
    kvr_io_layer *l = inner->data;
    l->tick_cb(l->outer);
}

static void inner_recv(struct raft_io *inner, struct raft_message *msg)
{
    kvr_io_layer *l = inner->data;
    if (l->recv_hook)
        l->recv_hook(l, msg);
    else
        l->recv_cb(l->outer, msg);
}

static void timer_closed(uv_handle_t *h)
{
    kvr_io_layer *l = h->data;
    struct raft_io *outer = l->outer;
    raft_io_close_cb cb = l->close_cb;
    if (l->release)
        l->release(l);
    free(l);
    outer->impl = NULL;
    if (cb)
        cb(outer);
}

static void inner_closed(struct raft_io *inner)
{
    kvr_io_layer *l = inner->data;
    uv_close((uv_handle_t *)&l->later_timer, timer_closed);
}

static int d_init(struct raft_io *io, raft_id id, const char *address)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    return checked(l, l->inner->init(l->inner, id, address));
}

void kvr_io_layer_close(struct raft_io *io, raft_io_close_cb cb)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    l->close_cb = cb;
    uv_timer_stop(&l->later_timer);
    /* raft waits for every request it made: answer those still queued */
    answer_queued(l, true);
    l->inner->close(l->inner, inner_closed);
}

static int d_load(struct raft_io *io, raft_term *term, raft_id *vote,
                  struct raft_snapshot **snapshot, raft_index *start_index,
                  struct raft_entry *entries[], size_t *n_entries)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    return checked(l,
                   l->inner->load(l->inner, term, vote, snapshot, start_index, entries, n_entries));
}

static int d_start(struct raft_io *io, unsigned msecs, raft_io_tick_cb tick, raft_io_recv_cb recv)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    l->tick_cb = tick;
    l->recv_cb = recv;
    return checked(l, l->inner->start(l->inner, msecs, inner_tick, inner_recv));
}

static int d_bootstrap(struct raft_io *io, const struct raft_configuration *conf)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    return checked(l, l->inner->bootstrap(l->inner, conf));
}

static int d_recover(struct raft_io *io, const struct raft_configuration *conf)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    return checked(l, l->inner->recover(l->inner, conf));
}

static int d_set_term(struct raft_io *io, raft_term term)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    return checked(l, l->inner->set_term(l->inner, term));
}

static int d_set_vote(struct raft_io *io, raft_id id)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    return checked(l, l->inner->set_vote(l->inner, id));
}

static int d_send(struct raft_io *io, struct raft_io_send *req, const struct raft_message *msg,
                  raft_io_send_cb cb)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    return checked(l, l->inner->send(l->inner, req, msg, cb));
}

static int d_append(struct raft_io *io, struct raft_io_append *req,
                    const struct raft_entry entries[], unsigned n, raft_io_append_cb cb)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    return checked(l, l->inner->append(l->inner, req, entries, n, cb));
}

static int d_truncate(struct raft_io *io, raft_index index)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    return checked(l, l->inner->truncate(l->inner, index));
}

static int d_snapshot_put(struct raft_io *io, unsigned trailing, struct raft_io_snapshot_put *req,
                          const struct raft_snapshot *snapshot, raft_io_snapshot_put_cb cb)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    return checked(l, l->inner->snapshot_put(l->inner, trailing, req, snapshot, cb));
}

static int d_snapshot_get(struct raft_io *io, struct raft_io_snapshot_get *req,
                          raft_io_snapshot_get_cb cb)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    return checked(l, l->inner->snapshot_get(l->inner, req, cb));
}

static raft_time d_time(struct raft_io *io)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    return l->inner->time(l->inner);
}

static int d_random(struct raft_io *io, int min, int max)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    return l->inner->random(l->inner, min, max);
}

void kvr_io_layer_init(kvr_io_layer *l, struct raft_io *io, struct raft_io *inner, uv_loop_t *loop)
{
    l->outer = io;
    l->inner = inner;
    l->later_tail = &l->later_head;
    uv_timer_init(loop, &l->later_timer);
    l->later_timer.data = l;
    memset(io, 0, sizeof *io);
    inner->data = l;
    io->version = 1; /* no async_work: raft uses it only for an fsm of version 3 */
    io->impl = l;
    io->init = d_init;
    io->close = kvr_io_layer_close;
    io->load = d_load;
    io->start = d_start;
    io->bootstrap = d_bootstrap;
    io->recover = d_recover;
    io->set_term = d_set_term;
    io->set_vote = d_set_vote;
    io->send = d_send;
    io->append = d_append;
    io->truncate = d_truncate;
    io->snapshot_put = d_snapshot_put;
    io->snapshot_get = d_snapshot_get;
    io->time = d_time;
    io->random = d_random;
}

static void discard_closed(uv_handle_t *h)
{
    kvr_io_layer *l = h->data;
    if (l->release)
        l->release(l);
    free(l);
}

void kvr_io_layer_discard(struct raft_io *io)
{
    kvr_io_layer *l = kvr_io_layer_of(io);
    if (!l)
        return;
    io->impl = NULL;
    uv_close((uv_handle_t *)&l->later_timer, discard_closed);
}
