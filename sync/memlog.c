#include "memlog.h"

#include "io_layer.h"

#include <stdlib.h>
#include <string.h>

#define MEMLOG_MAX_VOTERS 16

/* Completions (appends, snapshots) reach raft on a later loop turn through io_layer's queue:
 * raft 0.15 does work after append() and snapshot_put() return that must precede their
 * callbacks. */
typedef struct memlog {
    kvr_io_layer base; /* first: io->impl points here */
    struct raft_configuration bootstrap;
    bool has_bootstrap, bootstrapped;
    unsigned hold_ms;
    /* durable state as loaded by the inner io */
    raft_term term;
    raft_id vote;
    /* the last snapshot (a copy; raft frees its own) */
    struct raft_snapshot snap;
    bool has_snap;
    /* vote rule */
    bool rule_off, restricted, may_vote;
    raft_term start_term;
    raft_index catchup_target; /* the first leader's last (or commit) index seen (0: none yet) */
    raft_time caught_up_at;    /* 0: not yet */
    uint64_t withheld;
    struct {
        raft_id id;
        raft_term last_term;
        raft_index last_index;
    } asked[MEMLOG_MAX_VOTERS];
    unsigned n_asked;
} memlog;

static memlog *ml_of(struct raft_io *io)
{
    return io->impl;
}

/* --- snapshots --- */

static void snap_clear(struct raft_snapshot *s)
{
    raft_configuration_close(&s->configuration);
    for (unsigned i = 0; i < s->n_bufs; i++)
        raft_free(s->bufs[i].base);
    raft_free(s->bufs);
    memset(s, 0, sizeof *s);
}

static int conf_copy(struct raft_configuration *dst, const struct raft_configuration *src)
{
    raft_configuration_init(dst);
    for (unsigned i = 0; i < src->n; i++) {
        int rv = raft_configuration_add(dst, src->servers[i].id, src->servers[i].address,
                                        src->servers[i].role);
        if (rv) {
            raft_configuration_close(dst);
            return rv;
        }
    }
    return 0;
}

/* Deep copy into one buffer (raft's snapshot of the FSM may come in several). */
static int snap_copy(struct raft_snapshot *dst, const struct raft_snapshot *src)
{
    memset(dst, 0, sizeof *dst);
    size_t len = 0;
    for (unsigned i = 0; i < src->n_bufs; i++)
        len += src->bufs[i].len;
    dst->bufs = raft_malloc(sizeof *dst->bufs);
    void *base = raft_malloc(len ? len : 1);
    if (!dst->bufs || !base) {
        raft_free(dst->bufs);
        raft_free(base);
        dst->bufs = NULL;
        return RAFT_NOMEM;
    }
    size_t off = 0;
    for (unsigned i = 0; i < src->n_bufs; i++) {
        memcpy((char *)base + off, src->bufs[i].base, src->bufs[i].len);
        off += src->bufs[i].len;
    }
    dst->bufs[0].base = base;
    dst->bufs[0].len = len;
    dst->n_bufs = 1;
    int rv = conf_copy(&dst->configuration, &src->configuration);
    if (rv) {
        raft_free(base);
        raft_free(dst->bufs);
        memset(dst, 0, sizeof *dst);
        return rv;
    }
    dst->index = src->index;
    dst->term = src->term;
    dst->configuration_index = src->configuration_index;
    return 0;
}

/* --- the vote rule --- */

static struct raft *raft_of(memlog *m)
{
    return m->base.outer->data;
}

static bool is_other_voter(memlog *m, raft_id id)
{
    struct raft *r = raft_of(m);
    const struct raft_configuration *c = &r->configuration;
    for (unsigned i = 0; i < c->n; i++)
        if (c->servers[i].id == id)
            return c->servers[i].role == RAFT_VOTER && id != r->id;
    return false;
}

static void note_ask(memlog *m, raft_id id, raft_term last_term, raft_index last_index)
{
    for (unsigned i = 0; i < m->n_asked; i++) {
        if (m->asked[i].id == id) {
            /* the latest request stands: a candidate's log only grows while we wait */
            m->asked[i].last_term = last_term;
            m->asked[i].last_index = last_index;
            return;
        }
    }
    if (m->n_asked < MEMLOG_MAX_VOTERS) {
        m->asked[m->n_asked].id = id;
        m->asked[m->n_asked].last_term = last_term;
        m->asked[m->n_asked].last_index = last_index;
        m->n_asked++;
    }
}

static bool log_ge(raft_term t1, raft_index i1, raft_term t2, raft_index i2)
{
    return t1 > t2 || (t1 == t2 && i1 >= i2);
}

/* May this router grant its vote to candidate id now? */
static bool vote_allowed(memlog *m, raft_id candidate)
{
    if (m->rule_off || !m->restricted || m->may_vote)
        return true;
    if (m->caught_up_at && m->base.inner->time(m->base.inner) >= m->caught_up_at + m->hold_ms) {
        m->may_vote = true;
        return true;
    }
    /* whole-group restart: every other voter has asked since we started */
    struct raft *r = raft_of(m);
    const struct raft_configuration *c = &r->configuration;
    raft_term cand_term = 0;
    raft_index cand_index = 0;
    bool cand_seen = false;
    for (unsigned i = 0; i < c->n; i++) {
        if (c->servers[i].role != RAFT_VOTER || c->servers[i].id == r->id)
            continue;
        bool seen = false;
        for (unsigned j = 0; j < m->n_asked; j++) {
            if (m->asked[j].id == c->servers[i].id) {
                seen = true;
                if (m->asked[j].id == candidate) {
                    cand_seen = true;
                    cand_term = m->asked[j].last_term;
                    cand_index = m->asked[j].last_index;
                }
            }
        }
        if (!seen)
            return false;
    }
    if (!cand_seen)
        return false;
    for (unsigned j = 0; j < m->n_asked; j++)
        if (is_other_voter(m, m->asked[j].id) &&
            !log_ge(cand_term, cand_index, m->asked[j].last_term, m->asked[j].last_index))
            return false;
    return true;
}

static void recv_hook(kvr_io_layer *l, struct raft_message *msg)
{
    memlog *m = (memlog *)l;
    if (msg->type == RAFT_IO_REQUEST_VOTE) {
        const struct raft_request_vote *rv = &msg->request_vote;
        note_ask(m, rv->candidate_id ? rv->candidate_id : msg->server_id, rv->last_log_term,
                 rv->last_log_index);
    }
    raft_term leader_term = 0;
    raft_index leader_commit = 0;
    if (msg->type == RAFT_IO_APPEND_ENTRIES) {
        leader_term = msg->append_entries.term;
        leader_commit = msg->append_entries.leader_commit;
        /* the leader sends everything from the follower's next index to its last index: the
         * end of this message is the leader's last index when it sent it, a moment after we
         * restarted. Holding up to there means holding every entry we acknowledged before. */
        raft_index end = msg->append_entries.prev_log_index + msg->append_entries.n_entries;
        if (end > leader_commit)
            leader_commit = end;
    } else if (msg->type == RAFT_IO_INSTALL_SNAPSHOT) {
        leader_term = msg->install_snapshot.term;
        leader_commit = msg->install_snapshot.last_index;
    }
    l->recv_cb(l->outer, msg); /* raft appends the entries to its log before returning */
    if (leader_term && m->restricted && !m->caught_up_at && leader_term >= m->start_term) {
        if (m->catchup_target == 0)
            m->catchup_target = leader_commit ? leader_commit : 1;
        if (raft_last_index(raft_of(m)) >= m->catchup_target) {
            m->caught_up_at = m->base.inner->time(m->base.inner);
            if (m->caught_up_at == 0)
                m->caught_up_at = 1;
        }
    }
}

/* --- raft_io methods --- */

static int ml_init(struct raft_io *io, raft_id id, const char *address)
{
    memlog *m = ml_of(io);
    struct raft_io *inner = m->base.inner;
    int rv = inner->init(inner, id, address);
    if (rv) {
        kvr_io_layer_copy_errmsg(&m->base);
        return rv;
    }
    /* Term and vote from the inner io (its own log, from an earlier --raft-log disk run, is
     * dropped: memory mode never reads entries from disk). */
    struct raft_snapshot *snap = NULL;
    raft_index start = 0;
    struct raft_entry *entries = NULL;
    size_t n = 0;
    rv = inner->load(inner, &m->term, &m->vote, &snap, &start, &entries, &n);
    if (rv) {
        kvr_io_layer_copy_errmsg(&m->base);
        return rv;
    }
    if (snap) {
        snap_clear(snap);
        raft_free(snap);
    }
    void *last_batch = NULL;
    for (size_t i = 0; i < n; i++) {
        if (entries[i].batch == NULL)
            raft_free(entries[i].buf.base);
        else if (entries[i].batch != last_batch)
            raft_free(entries[i].batch); /* uv loads entries in consecutive batches */
        last_batch = entries[i].batch;
    }
    raft_free(entries);
    m->start_term = m->term;
    /* term <= 1: nothing was ever acknowledged (a bootstrapped group has no leader in term 1) */
    m->restricted = m->term > 1;
    return 0;
}

static void release(kvr_io_layer *l)
{
    memlog *m = (memlog *)l;
    if (m->has_snap)
        snap_clear(&m->snap);
    if (m->has_bootstrap)
        raft_configuration_close(&m->bootstrap);
}

static int entry_for(memlog *m, struct raft_entry **out, size_t *n)
{
    struct raft_buffer buf;
    int rv = raft_configuration_encode(&m->bootstrap, &buf);
    if (rv)
        return rv;
    struct raft_entry *e = raft_malloc(sizeof *e);
    if (!e) {
        raft_free(buf.base);
        return RAFT_NOMEM;
    }
    e->term = 1;
    e->type = RAFT_CHANGE;
    e->buf = buf;
    e->batch = NULL;
    *out = e;
    *n = 1;
    return 0;
}

static int ml_load(struct raft_io *io, raft_term *term, raft_id *voted_for,
                   struct raft_snapshot **snapshot, raft_index *start_index,
                   struct raft_entry *entries[], size_t *n_entries)
{
    memlog *m = ml_of(io);
    *term = m->term;
    *voted_for = m->vote;
    *snapshot = NULL;
    *start_index = 1;
    *entries = NULL;
    *n_entries = 0;
    if (m->bootstrapped)
        return entry_for(m, entries, n_entries);
    return 0;
}

/* Every router builds the same entry 1 from the same peer list, on every start. */
static int ml_bootstrap(struct raft_io *io, const struct raft_configuration *conf)
{
    memlog *m = ml_of(io);
    if (!m->has_bootstrap) {
        int rv = conf_copy(&m->bootstrap, conf);
        if (rv)
            return rv;
        m->has_bootstrap = true;
    }
    if (m->term == 0) {
        int rv = m->base.inner->set_term(m->base.inner, 1);
        if (rv)
            return rv;
        m->term = 1;
    }
    m->bootstrapped = true;
    return 0;
}

static int ml_recover(struct raft_io *io, const struct raft_configuration *conf)
{
    (void)io;
    (void)conf;
    return RAFT_NOTFOUND; /* nothing on disk to recover */
}

static int ml_set_term(struct raft_io *io, raft_term term)
{
    memlog *m = ml_of(io);
    int rv = m->base.inner->set_term(m->base.inner, term);
    if (rv == 0) {
        m->term = term;
        m->vote = 0;
    }
    return rv;
}

static int ml_set_vote(struct raft_io *io, raft_id id)
{
    memlog *m = ml_of(io);
    int rv = m->base.inner->set_vote(m->base.inner, id);
    if (rv == 0)
        m->vote = id;
    return rv;
}

static int ml_send(struct raft_io *io, struct raft_io_send *req, const struct raft_message *msg,
                   raft_io_send_cb cb)
{
    memlog *m = ml_of(io);
    if (msg->type == RAFT_IO_REQUEST_VOTE_RESULT && msg->request_vote_result.vote_granted &&
        !vote_allowed(m, msg->server_id)) {
        /* the inner io encodes the message before send returns: a copy on the stack will do */
        struct raft_message copy = *msg;
        copy.request_vote_result.vote_granted = false;
        m->withheld++;
        return m->base.inner->send(m->base.inner, req, &copy, cb);
    }
    return m->base.inner->send(m->base.inner, req, msg, cb);
}

static int ml_append(struct raft_io *io, struct raft_io_append *req,
                     const struct raft_entry entries[], unsigned n, raft_io_append_cb cb)
{
    (void)entries;
    (void)n;
    /* raft holds the entries in its in-memory log (and owns their buffers): nothing to keep */
    return kvr_io_layer_append_later(&ml_of(io)->base, req, cb, 0);
}

static int ml_truncate(struct raft_io *io, raft_index index)
{
    (void)io;
    (void)index;
    return 0;
}

static int ml_snapshot_put(struct raft_io *io, unsigned trailing, struct raft_io_snapshot_put *req,
                           const struct raft_snapshot *snapshot, raft_io_snapshot_put_cb cb)
{
    (void)trailing;
    memlog *m = ml_of(io);
    struct raft_snapshot copy;
    int rv = snap_copy(&copy, snapshot);
    if (rv)
        return rv;
    if (m->has_snap)
        snap_clear(&m->snap);
    m->snap = copy;
    m->has_snap = true;
    return kvr_io_layer_put_later(&m->base, req, cb, 0);
}

static int ml_snapshot_get(struct raft_io *io, struct raft_io_snapshot_get *req,
                           raft_io_snapshot_get_cb cb)
{
    memlog *m = ml_of(io);
    if (!m->has_snap)
        return RAFT_NOTFOUND;
    struct raft_snapshot *s = raft_malloc(sizeof *s);
    if (!s)
        return RAFT_NOMEM;
    int rv = snap_copy(s, &m->snap);
    if (rv) {
        raft_free(s);
        return rv;
    }
    rv = kvr_io_layer_get_later(&m->base, req, cb, s);
    if (rv) {
        snap_clear(s);
        raft_free(s);
    }
    return rv;
}

int kvr_memlog_init(struct raft_io *io, struct raft_io *inner, uv_loop_t *loop,
                    const kvr_memlog_options *o)
{
    memlog *m = calloc(1, sizeof *m);
    if (!m)
        return RAFT_NOMEM;
    m->hold_ms = o && o->hold_ms ? o->hold_ms : 4000;
    if (o && o->bootstrap) {
        int rv = conf_copy(&m->bootstrap, o->bootstrap);
        if (rv) {
            free(m);
            return rv;
        }
        m->has_bootstrap = true;
    }
    /* network, timers, term and vote go to the inner io; the log stays here */
    kvr_io_layer_init(&m->base, io, inner, loop);
    m->base.recv_hook = recv_hook;
    m->base.release = release;
    io->init = ml_init;
    io->load = ml_load;
    io->bootstrap = ml_bootstrap;
    io->recover = ml_recover;
    io->set_term = ml_set_term;
    io->set_vote = ml_set_vote;
    io->send = ml_send;
    io->append = ml_append;
    io->truncate = ml_truncate;
    io->snapshot_put = ml_snapshot_put;
    io->snapshot_get = ml_snapshot_get;
    return 0;
}

void kvr_memlog_get_stats(struct raft_io *io, kvr_memlog_stats *out)
{
    memlog *m = ml_of(io);
    memset(out, 0, sizeof *out);
    if (!m)
        return;
    out->restricted = m->restricted;
    out->may_vote =
        !m->restricted || m->may_vote ||
        (m->caught_up_at && m->base.inner->time(m->base.inner) >= m->caught_up_at + m->hold_ms);
    out->withheld = m->withheld;
    out->start_term = m->start_term;
    out->caught_up_ms = m->caught_up_at;
}

void kvr_memlog_discard(struct raft_io *io)
{
    kvr_io_layer_discard(io);
}

void kvr_memlog_disable_vote_rule(struct raft_io *io, bool disable)
{
    memlog *m = ml_of(io);
    if (m)
        m->rule_off = disable;
}
