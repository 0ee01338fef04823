#include "disklog.h"

#include "io_layer.h"
#include "kvr_log.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* One append in flight through the inner io: raft's request and callback, and the request the
 * inner io sees (its callback finds this struct again). */
typedef struct dl_append {
    struct raft_io_append inner_req;
    struct raft_io_append *req;
    raft_io_append_cb cb;
    struct disklog *d;
    bool orphan; /* the inner io refused it at once but may still call back: swallow that */
} dl_append;

typedef struct dl_put {
    struct raft_io_snapshot_put inner_req;
    struct raft_io_snapshot_put *req;
    raft_io_snapshot_put_cb cb;
    struct disklog *d;
    bool install;
} dl_put;

typedef struct disklog {
    kvr_io_layer base; /* first: io->impl points here */
    bool fenced;
    uint64_t failed, refused, fenced_ms;
} disklog;

static disklog *dl_of(struct raft_io *io)
{
    return io->impl;
}

/* --- appends --- */

static void fence(disklog *d, int status)
{
    d->failed++;
    if (d->fenced)
        return;
    d->fenced = true;
    d->fenced_ms = d->base.inner->time(d->base.inner);
    KVR_LOG_ERROR("raft log fenced: an append failed, no later entry is written until a "
                  "restart or a leader's snapshot",
                  "status=%d raft=\"%s\"", status, d->base.inner->errmsg);
}

static void inner_append_cb(struct raft_io_append *inner_req, int status)
{
    dl_append *a = (dl_append *)((char *)inner_req - offsetof(dl_append, inner_req));
    disklog *d = a->d;
    if (a->orphan) {
        free(a);
        return;
    }
    if (status != 0 && status != RAFT_CANCELED)
        fence(d, status);
    else if (status == 0 && d->fenced)
        /* written after a failed batch (it was queued behind it): raft must not count it, or
         * its stored count runs past the hole */
        status = RAFT_IOERR;
    raft_io_append_cb cb = a->cb;
    struct raft_io_append *req = a->req;
    free(a);
    cb(req, status);
}

static int dl_append_fn(struct raft_io *io, struct raft_io_append *req,
                        const struct raft_entry entries[], unsigned n, raft_io_append_cb cb)
{
    disklog *d = dl_of(io);
    if (d->fenced) {
        d->refused++;
        return kvr_io_layer_append_later(&d->base, req, cb, RAFT_IOERR);
    }
    dl_append *a = calloc(1, sizeof *a);
    if (!a)
        return RAFT_NOMEM;
    a->req = req;
    a->cb = cb;
    a->d = d;
    int rv = d->base.inner->append(d->base.inner, &a->inner_req, entries, n, inner_append_cb);
    if (rv == 0)
        return 0;
    /* raft_uv 0.15 may fail an append at once after queueing it (UvAppend: a write it could
     * not start), while raft frees its request on a failed call: raft_uv would later call back
     * into freed memory (read in the source, not seen). So raft never sees a failed call: the
     * fence goes up and raft's request fails on a later loop turn, like a failed write; the
     * inner request is kept in case raft_uv calls it back (it is then freed, unreported; when
     * raft_uv had not queued it, that is a small leak, once per fence). */
    kvr_io_layer_copy_errmsg(&d->base);
    fence(d, rv);
    a->orphan = true;
    if (kvr_io_layer_append_later(&d->base, req, cb, RAFT_IOERR) != 0)
        return rv; /* out of memory: raft's own failure path, as without disklog */
    return 0;
}

/* --- snapshots --- */

static void inner_put_cb(struct raft_io_snapshot_put *inner_req, int status)
{
    dl_put *p = (dl_put *)((char *)inner_req - offsetof(dl_put, inner_req));
    disklog *d = p->d;
    if (status == 0 && p->install && d->fenced) {
        /* the leader's snapshot replaced the log on disk and raft's count restarts from it */
        d->fenced = false;
        d->fenced_ms = 0;
        KVR_LOG_INFO("raft log fence lifted: a leader's snapshot replaced the log", "failed=%llu",
                     (unsigned long long)d->failed);
    }
    raft_io_snapshot_put_cb cb = p->cb;
    struct raft_io_snapshot_put *req = p->req;
    free(p);
    cb(req, status);
}

static int dl_snapshot_put(struct raft_io *io, unsigned trailing, struct raft_io_snapshot_put *req,
                           const struct raft_snapshot *snapshot, raft_io_snapshot_put_cb cb)
{
    disklog *d = dl_of(io);
    dl_put *p = calloc(1, sizeof *p);
    if (!p)
        return RAFT_NOMEM;
    p->req = req;
    p->cb = cb;
    p->d = d;
    p->install = trailing == 0;
    int rv =
        d->base.inner->snapshot_put(d->base.inner, trailing, &p->inner_req, snapshot, inner_put_cb);
    if (rv) {
        kvr_io_layer_copy_errmsg(&d->base);
        free(p);
    }
    return rv;
}

int kvr_disklog_init(struct raft_io *io, struct raft_io *inner, uv_loop_t *loop)
{
    disklog *d = calloc(1, sizeof *d);
    if (!d)
        return RAFT_NOMEM;
    kvr_io_layer_init(&d->base, io, inner, loop);
    io->append = dl_append_fn;
    io->snapshot_put = dl_snapshot_put;
    return 0;
}

void kvr_disklog_get_stats(struct raft_io *io, kvr_disklog_stats *out)
{
    memset(out, 0, sizeof *out);
    disklog *d = dl_of(io);
    if (!d)
        return;
    out->fenced = d->fenced;
    out->failed_appends = d->failed;
    out->refused = d->refused;
    out->fenced_ms = d->fenced_ms;
}

void kvr_disklog_discard(struct raft_io *io)
{
    kvr_io_layer_discard(io);
}
