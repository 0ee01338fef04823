#include "termguard.h"

#include "io_layer.h"
#include "kvr_log.h"

#include <stdlib.h>
#include <string.h>

typedef struct termguard {
    kvr_io_layer base; /* first: io->impl points here */
    bool muted;
    uint64_t failed, dropped;
} termguard;

static termguard *tg_of(struct raft_io *io)
{
    return io->impl;
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
    return kvr_io_layer_send_later(&t->base, req, cb, RAFT_CANCELED);
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
    return kvr_io_layer_append_later(&t->base, req, cb, RAFT_IOERR);
}

int kvr_termguard_init(struct raft_io *io, struct raft_io *inner, uv_loop_t *loop)
{
    termguard *t = calloc(1, sizeof *t);
    if (!t)
        return RAFT_NOMEM;
    kvr_io_layer_init(&t->base, io, inner, loop);
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

void kvr_termguard_discard(struct raft_io *io)
{
    kvr_io_layer_discard(io);
}
