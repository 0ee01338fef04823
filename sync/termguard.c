#include "termguard.h"

#include "io_layer.h"
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
    kvr_io_layer base; /* first: io->impl points here */
    uv_timer_t done_timer;
    tg_done *head, **tail;
    bool muted;
    uint64_t failed, dropped;
} termguard;

static termguard *tg_of(struct raft_io *io)
{
    return io->impl;
}

/* Answers every queued request (sends with RAFT_CANCELED, appends with append_status),
 * taking the queue first: a callback may queue more. */
static void answer_queued(termguard *t, int append_status)
{
    tg_done *d = t->head;
    t->head = NULL;
    t->tail = &t->head;
    while (d) {
        tg_done *next = d->next;
        if (d->is_send)
            ((raft_io_send_cb)d->cb)(d->req, RAFT_CANCELED);
        else
            ((raft_io_append_cb)d->cb)(d->req, append_status);
        free(d);
        d = next;
    }
}

static void done_run(uv_timer_t *timer)
{
    answer_queued(timer->data, RAFT_IOERR);
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
                      "what=%s status=%d raft=\"%s\"", what, rv, t->base.inner->errmsg);
    }
    return 0;
}

static int tg_set_term(struct raft_io *io, raft_term term)
{
    termguard *t = tg_of(io);
    return stored_or_mute(t, t->base.inner->set_term(t->base.inner, term), "term");
}

static int tg_set_vote(struct raft_io *io, raft_id id)
{
    termguard *t = tg_of(io);
    return stored_or_mute(t, t->base.inner->set_vote(t->base.inner, id), "vote");
}

static int tg_send(struct raft_io *io, struct raft_io_send *req, const struct raft_message *msg,
                   raft_io_send_cb cb)
{
    termguard *t = tg_of(io);
    if (!t->muted)
        return t->base.inner->send(t->base.inner, req, msg, cb);
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
        int rv = t->base.inner->append(t->base.inner, req, entries, n, cb);
        if (rv)
            kvr_io_layer_copy_errmsg(&t->base);
        return rv;
    }
    return done_later(t, false, req, (void *)cb);
}

/* --- close --- */

static void timer_closed(uv_handle_t *h)
{
    kvr_io_layer_closed(h->data);
}

static void inner_closed(kvr_io_layer *l)
{
    termguard *t = (termguard *)l;
    uv_close((uv_handle_t *)&t->done_timer, timer_closed);
}

static void tg_close(struct raft_io *io, raft_io_close_cb cb)
{
    termguard *t = tg_of(io);
    uv_timer_stop(&t->done_timer);
    /* raft waits for every request it made: answer those still queued */
    answer_queued(t, RAFT_CANCELED);
    kvr_io_layer_close(io, cb);
}

int kvr_termguard_init(struct raft_io *io, struct raft_io *inner, uv_loop_t *loop)
{
    termguard *t = calloc(1, sizeof *t);
    if (!t)
        return RAFT_NOMEM;
    kvr_io_layer_init(&t->base, io, inner, inner_closed);
    t->tail = &t->head;
    uv_timer_init(loop, &t->done_timer);
    t->done_timer.data = t;
    io->close = tg_close;
    io->set_term = tg_set_term;
    io->set_vote = tg_set_vote;
    io->send = tg_send;
    io->append = tg_append;
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
