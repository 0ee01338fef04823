#include "termguard.h"

#include "kvr_log.h"

#include <stdlib.h>
#include <string.h>

/* A request answered on a later loop turn without reaching the inner io. */
typedef struct tg_done {
    bool is_send; /* else an append */
    void *req;
    void *cb;
    struct tg_done *next;
} tg_done;

typedef struct termguard {
    struct raft_io *outer, *inner;
    uv_timer_t done_timer;
    tg_done *head, **tail;
    raft_io_close_cb close_cb;
    raft_io_tick_cb tick_cb;
    raft_io_recv_cb recv_cb;
    bool muted;
    uint64_t failed, dropped;
} termguard;

static termguard *tg_of(struct raft_io *io)
{
    return io->impl;
}

static void copy_errmsg(termguard *t)
{
    memcpy(t->outer->errmsg, t->inner->errmsg, sizeof t->outer->errmsg);
}

static void done_run(uv_timer_t *timer)
{
    termguard *t = timer->data;
    tg_done *d = t->head;
    t->head = NULL;
    t->tail = &t->head;
    while (d) {
        tg_done *next = d->next;
        if (d->is_send)
            ((raft_io_send_cb)d->cb)(d->req, RAFT_CANCELED);
        else
            ((raft_io_append_cb)d->cb)(d->req, RAFT_IOERR);
        free(d);
        d = next;
    }
}

static int done_later(termguard *t, bool is_send, void *req, void *cb)
{
    tg_done *d = calloc(1, sizeof *d);
    if (!d)
        return RAFT_NOMEM;
    d->is_send = is_send;
    d->req = req;
    d->cb = cb;
    *t->tail = d;
    t->tail = &d->next;
    if (!uv_is_active((uv_handle_t *)&t->done_timer))
        uv_timer_start(&t->done_timer, done_run, 0, 0);
    return 0;
}

/* A term or vote the inner io could not store: success for raft, silence for everyone. */
static int stored_or_mute(termguard *t, int rv, const char *what)
{
    if (rv == 0)
        return 0;
    t->failed++;
    if (!t->muted) {
        t->muted = true;
        KVR_LOG_ERROR("raft term or vote could not be stored: this router stops speaking Raft "
                      "until it restarts",
                      "what=%s status=%d raft=\"%s\"", what, rv, t->inner->errmsg);
    }
    return 0;
}

static int tg_set_term(struct raft_io *io, raft_term term)
{
    termguard *t = tg_of(io);
    return stored_or_mute(t, t->inner->set_term(t->inner, term), "term");
}

static int tg_set_vote(struct raft_io *io, raft_id id)
{
    termguard *t = tg_of(io);
    return stored_or_mute(t, t->inner->set_vote(t->inner, id), "vote");
}

static int tg_send(struct raft_io *io, struct raft_io_send *req, const struct raft_message *msg,
                   raft_io_send_cb cb)
{
    termguard *t = tg_of(io);
    if (!t->muted)
        return t->inner->send(t->inner, req, msg, cb);
    t->dropped++;
    return done_later(t, true, req, (void *)cb);
}

/* Entries of a term that is not durable are not written either: after a restart the log
 * must not hold a term newer than the one loaded. */
static int tg_append(struct raft_io *io, struct raft_io_append *req,
                     const struct raft_entry entries[], unsigned n, raft_io_append_cb cb)
{
    termguard *t = tg_of(io);
    if (!t->muted) {
        int rv = t->inner->append(t->inner, req, entries, n, cb);
        if (rv)
            copy_errmsg(t);
        return rv;
    }
    return done_later(t, false, req, (void *)cb);
}

/* --- delegated --- */

static void inner_tick(struct raft_io *inner)
{
    termguard *t = inner->data;
    t->tick_cb(t->outer);
}

static void inner_recv(struct raft_io *inner, struct raft_message *msg)
{
    termguard *t = inner->data;
    t->recv_cb(t->outer, msg);
}

static int tg_init(struct raft_io *io, raft_id id, const char *address)
{
    termguard *t = tg_of(io);
    int rv = t->inner->init(t->inner, id, address);
    if (rv)
        copy_errmsg(t);
    return rv;
}

static int tg_load(struct raft_io *io, raft_term *term, raft_id *vote,
                   struct raft_snapshot **snapshot, raft_index *start_index,
                   struct raft_entry *entries[], size_t *n_entries)
{
    termguard *t = tg_of(io);
    int rv = t->inner->load(t->inner, term, vote, snapshot, start_index, entries, n_entries);
    if (rv)
        copy_errmsg(t);
    return rv;
}

static int tg_start(struct raft_io *io, unsigned msecs, raft_io_tick_cb tick, raft_io_recv_cb recv)
{
    termguard *t = tg_of(io);
    t->tick_cb = tick;
    t->recv_cb = recv;
    int rv = t->inner->start(t->inner, msecs, inner_tick, inner_recv);
    if (rv)
        copy_errmsg(t);
    return rv;
}

static int tg_bootstrap(struct raft_io *io, const struct raft_configuration *conf)
{
    termguard *t = tg_of(io);
    int rv = t->inner->bootstrap(t->inner, conf);
    if (rv)
        copy_errmsg(t);
    return rv;
}

static int tg_recover(struct raft_io *io, const struct raft_configuration *conf)
{
    termguard *t = tg_of(io);
    int rv = t->inner->recover(t->inner, conf);
    if (rv)
        copy_errmsg(t);
    return rv;
}

static int tg_truncate(struct raft_io *io, raft_index index)
{
    termguard *t = tg_of(io);
    int rv = t->inner->truncate(t->inner, index);
    if (rv)
        copy_errmsg(t);
    return rv;
}

static int tg_snapshot_put(struct raft_io *io, unsigned trailing, struct raft_io_snapshot_put *req,
                           const struct raft_snapshot *snapshot, raft_io_snapshot_put_cb cb)
{
    termguard *t = tg_of(io);
    int rv = t->inner->snapshot_put(t->inner, trailing, req, snapshot, cb);
    if (rv)
        copy_errmsg(t);
    return rv;
}

static int tg_snapshot_get(struct raft_io *io, struct raft_io_snapshot_get *req,
                           raft_io_snapshot_get_cb cb)
{
    termguard *t = tg_of(io);
    return t->inner->snapshot_get(t->inner, req, cb);
}

static raft_time tg_time(struct raft_io *io)
{
    termguard *t = tg_of(io);
    return t->inner->time(t->inner);
}

static int tg_random(struct raft_io *io, int min, int max)
{
    termguard *t = tg_of(io);
    return t->inner->random(t->inner, min, max);
}

/* --- close --- */

static void timer_closed(uv_handle_t *h)
{
    termguard *t = h->data;
    struct raft_io *outer = t->outer;
    raft_io_close_cb cb = t->close_cb;
    free(t);
    outer->impl = NULL;
    if (cb)
        cb(outer);
}

static void inner_closed(struct raft_io *inner)
{
    termguard *t = inner->data;
    uv_close((uv_handle_t *)&t->done_timer, timer_closed);
}

static void tg_close(struct raft_io *io, raft_io_close_cb cb)
{
    termguard *t = tg_of(io);
    t->close_cb = cb;
    uv_timer_stop(&t->done_timer);
    /* raft waits for every request it made: answer those still queued */
    tg_done *d = t->head;
    t->head = NULL;
    t->tail = &t->head;
    while (d) {
        tg_done *next = d->next;
        if (d->is_send)
            ((raft_io_send_cb)d->cb)(d->req, RAFT_CANCELED);
        else
            ((raft_io_append_cb)d->cb)(d->req, RAFT_CANCELED);
        free(d);
        d = next;
    }
    t->inner->close(t->inner, inner_closed);
}

int kvr_termguard_init(struct raft_io *io, struct raft_io *inner, uv_loop_t *loop)
{
    termguard *t = calloc(1, sizeof *t);
    if (!t)
        return RAFT_NOMEM;
    t->outer = io;
    t->inner = inner;
    t->tail = &t->head;
    uv_timer_init(loop, &t->done_timer);
    t->done_timer.data = t;
    memset(io, 0, sizeof *io);
    inner->data = t;
    io->version = 1;
    io->impl = t;
    io->init = tg_init;
    io->close = tg_close;
    io->load = tg_load;
    io->start = tg_start;
    io->bootstrap = tg_bootstrap;
    io->recover = tg_recover;
    io->set_term = tg_set_term;
    io->set_vote = tg_set_vote;
    io->send = tg_send;
    io->append = tg_append;
    io->truncate = tg_truncate;
    io->snapshot_put = tg_snapshot_put;
    io->snapshot_get = tg_snapshot_get;
    io->time = tg_time;
    io->random = tg_random;
    return 0;
}

void kvr_termguard_get_stats(struct raft_io *io, kvr_termguard_stats *out)
{
    memset(out, 0, sizeof *out);
    termguard *t = tg_of(io);
    if (!t)
        return;
    out->muted = t->muted;
    out->failed_writes = t->failed;
    out->dropped_sends = t->dropped;
}

static void discard_closed(uv_handle_t *h)
{
    free(h->data);
}

void kvr_termguard_discard(struct raft_io *io)
{
    termguard *t = tg_of(io);
    if (!t)
        return;
    io->impl = NULL;
    uv_close((uv_handle_t *)&t->done_timer, discard_closed);
}
