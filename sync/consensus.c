#include "consensus.h"

#include "auth_transport.h"
#include "disklog.h"
#include "termguard.h"
#include "kvr_log.h"
#include "memlog.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <raft/uv.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>

struct kvr_consensus {
    uv_loop_t *loop;
    struct raft_uv_transport transport;
    struct raft_io io;    /* what raft uses: memlog or disklog, over tg_io */
    struct raft_io tg_io; /* termguard over uv_io (a term or vote not stored mutes the node) */
    struct raft_io uv_io; /* raft_uv (network, timers, term and vote; the log in disk mode) */
    bool memlog_inited, disklog_inited, termguard_inited;
    struct raft_fsm fsm;
    struct raft raft;
    kvr_consensus_fsm *cbs;
    uint32_t id;
    char addr[64];
    char *data_dir;
    kvr_peer peers[KVR_CONSENSUS_MAX_PEERS];
    int n_peers;
    kvr_consensus_options opts;
    bool io_inited, transport_inited, raft_inited, started;
    bool authenticated;    /* transport is auth_transport (a cluster secret), else raft_uv_tcp */
    uv_timer_t free_timer; /* waits for a snapshot before close; closed last, frees the struct */
    unsigned close_waits, close_phase;
    struct raft_transfer close_transfer;
    void (*close_cb)(void *);
    void *close_data;
};

/* --- raft_fsm adapter --- */

static int fsm_apply(struct raft_fsm *fsm, const struct raft_buffer *buf, void **result)
{
    kvr_consensus_fsm *cbs = fsm->data;
    /* raft 0.15 does not pass the index; the caller tracks applied entries itself. */
    cbs->apply(cbs->data, 0, buf->base, buf->len);
    *result = NULL;
    return 0; /* P2: always 0, outcomes live in the state machine's results */
}

static int fsm_snapshot(struct raft_fsm *fsm, struct raft_buffer *bufs[], unsigned *n_bufs)
{
    kvr_consensus_fsm *cbs = fsm->data;
    kvr_buf b;
    kvr_buf_init(&b);
    int rc = cbs->snapshot(cbs->data, &b);
    if (rc) {
        kvr_buf_free(&b);
        return RAFT_NOMEM;
    }
    /* P5: both the array and each base are released by raft with raft_free. */
    struct raft_buffer *arr = raft_malloc(sizeof *arr);
    void *base = raft_malloc(b.len ? b.len : 1);
    if (!arr || !base) {
        raft_free(arr);
        raft_free(base);
        kvr_buf_free(&b);
        return RAFT_NOMEM;
    }
    memcpy(base, b.base, b.len);
    arr[0].base = base;
    arr[0].len = b.len;
    kvr_buf_free(&b);
    *bufs = arr;
    *n_bufs = 1;
    return 0;
}

static int fsm_restore(struct raft_fsm *fsm, struct raft_buffer *buf)
{
    kvr_consensus_fsm *cbs = fsm->data;
    int rc = cbs->restore(cbs->data, buf->base, buf->len);
    if (rc)
        return RAFT_CORRUPT; /* raft keeps ownership of buf on failure */
    raft_free(buf->base); /* P3: restore owns the buffer on success */
    return 0;
}

void kvr_consensus_raft_fsm(struct raft_fsm *out, kvr_consensus_fsm *cbs)
{
    memset(out, 0, sizeof *out);
    out->version = 1; /* P1 */
    out->data = cbs;
    out->apply = fsm_apply;
    out->snapshot = fsm_snapshot;
    out->restore = fsm_restore;
}

/* --- TCP_NODELAY on raft's own sockets ---
 * The 0.15 TCP transport never sets TCP_NODELAY, so small AppendEntries after a partial
 * segment wait for the peer's delayed ACK: ~40 ms latency tails under load (measured with
 * kvr-bench raft). We wrap the transport's connect/listen to set it on every stream. The
 * wrapped callbacks are the same functions for every transport instance (raft's uv backend
 * passes fixed ones), so they are kept in process-wide variables. */
static int (*tcp_connect)(struct raft_uv_transport *, struct raft_uv_connect *, raft_id,
                          const char *, raft_uv_connect_cb);
static int (*tcp_listen)(struct raft_uv_transport *, raft_uv_accept_cb);
static raft_uv_connect_cb user_connect_cb;
static raft_uv_accept_cb user_accept_cb;

/* As on the authenticated transport (auth_transport.c): a stream whose data stays unacked
 * for 3 s is closed so raft reconnects, instead of retransmitting with minutes of backoff
 * across a partition and keeping a healed follower waiting. */
static void set_user_timeout(uv_stream_t *stream)
{
    uv_os_fd_t fd;
    unsigned int ms = 3000;
    if (uv_fileno((uv_handle_t *)stream, &fd) == 0)
        (void)setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms);
}

static void nodelay_connect_cb(struct raft_uv_connect *req, struct uv_stream_s *stream, int status)
{
    if (status == 0 && stream && stream->type == UV_TCP) {
        uv_tcp_nodelay((uv_tcp_t *)stream, 1);
        set_user_timeout(stream);
    }
    user_connect_cb(req, stream, status);
}

static int nodelay_connect(struct raft_uv_transport *t, struct raft_uv_connect *req, raft_id id,
                           const char *address, raft_uv_connect_cb cb)
{
    user_connect_cb = cb;
    return tcp_connect(t, req, id, address, nodelay_connect_cb);
}

static void nodelay_accept_cb(struct raft_uv_transport *t, raft_id id, const char *address,
                              struct uv_stream_s *stream)
{
    if (stream && stream->type == UV_TCP) {
        uv_tcp_nodelay((uv_tcp_t *)stream, 1);
        set_user_timeout(stream);
    }
    user_accept_cb(t, id, address, stream);
}

static int nodelay_listen(struct raft_uv_transport *t, raft_uv_accept_cb cb)
{
    user_accept_cb = cb;
    return tcp_listen(t, nodelay_accept_cb);
}

/* --- peers --- */

int kvr_consensus_parse_peers(const char *s, kvr_peer *out, int max, kvr_err *err)
{
    int n = 0;
    if (!s || !*s)
        return kvr_err_set(err, KVR_EINVAL, "peers: empty list");
    const char *p = s;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        const char *at = memchr(p, '@', len);
        if (!at || at == p)
            return kvr_err_set(err, KVR_EINVAL, "peers: \"%.*s\" is not id@host:port", (int)len, p);
        char idbuf[16];
        size_t il = (size_t)(at - p);
        if (il >= sizeof idbuf)
            return kvr_err_set(err, KVR_EINVAL, "peers: id too long in \"%.*s\"", (int)len, p);
        memcpy(idbuf, p, il);
        idbuf[il] = 0;
        char *e;
        unsigned long id = strtoul(idbuf, &e, 10);
        if (*e || id == 0 || id > UINT32_MAX)
            return kvr_err_set(err, KVR_EINVAL, "peers: bad id \"%s\"", idbuf);
        size_t al = len - il - 1;
        if (al == 0 || al >= sizeof out[0].addr || !memchr(at + 1, ':', al))
            return kvr_err_set(err, KVR_EINVAL, "peers: bad address in \"%.*s\"", (int)len, p);
        if (n >= max)
            return kvr_err_set(err, KVR_ELIMIT, "peers: more than %d", max);
        for (int i = 0; i < n; i++)
            if (out[i].id == id)
                return kvr_err_set(err, KVR_EINVAL, "peers: duplicate id %lu", id);
        out[n].id = (uint32_t)id;
        memcpy(out[n].addr, at + 1, al);
        out[n].addr[al] = 0;
        n++;
        p += len;
        if (*p == ',')
            p++;
    }
    return n;
}

static int mkdir_p(const char *path)
{
    char tmp[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof tmp)
        return -ENAMETOOLONG;
    memcpy(tmp, path, n + 1);
    for (char *q = tmp + 1; *q; q++) {
        if (*q == '/') {
            *q = 0;
            if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
                return -errno;
            *q = '/';
        }
    }
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
        return -errno;
    return 0;
}

/* --- lifecycle --- */

static void transport_free(kvr_consensus *c)
{
    if (c->authenticated)
        kvr_auth_transport_free(&c->transport);
    else
        raft_uv_tcp_close(&c->transport);
}

int kvr_consensus_init(kvr_consensus **out, uv_loop_t *loop, const kvr_consensus_options *o,
                       kvr_consensus_fsm *fsm, kvr_err *err)
{
    int rc;
    kvr_consensus *c = calloc(1, sizeof *c);
    if (!c)
        return kvr_err_set(err, KVR_ENOMEM, "consensus: out of memory");
    c->loop = loop;
    c->cbs = fsm;
    c->id = o->id;
    c->opts = *o;
    if (!o->addr || strlen(o->addr) >= sizeof c->addr) {
        rc = kvr_err_set(err, KVR_EINVAL, "consensus: bad raft address");
        goto fail;
    }
    snprintf(c->addr, sizeof c->addr, "%s", o->addr);
    c->opts.addr = c->addr;
    c->opts.peers = NULL;
    rc = kvr_consensus_parse_peers(o->peers, c->peers, KVR_CONSENSUS_MAX_PEERS, err);
    if (rc < 0)
        goto fail;
    c->n_peers = rc;
    c->data_dir = strdup(o->data_dir ? o->data_dir : "");
    if (!c->data_dir || !o->data_dir || !*o->data_dir) {
        rc = kvr_err_set(err, KVR_EINVAL, "consensus: no data dir");
        goto fail;
    }
    c->opts.data_dir = c->data_dir;
    if ((rc = mkdir_p(c->data_dir)) != 0) {
        rc = kvr_err_set(err, KVR_EIO, "consensus: creating %s: %s", c->data_dir, strerror(-rc));
        goto fail;
    }
    kvr_consensus_raft_fsm(&c->fsm, fsm);
    if (o->auth_key && o->auth_key->len) {
        /* peers prove the cluster secret before raft reads a byte (auth_transport.h) */
        if ((rc = kvr_auth_transport_init(&c->transport, loop, o->auth_key)) != 0) {
            rc = kvr_err_set(err, KVR_ENOMEM, "consensus: auth transport: %s", raft_strerror(rc));
            goto fail;
        }
        c->authenticated = true;
        c->transport_inited = true;
    } else if ((rc = raft_uv_tcp_init(&c->transport, loop)) != 0) {
        rc = kvr_err_set(err, KVR_EIO, "consensus: raft_uv_tcp_init: %s", raft_strerror(rc));
        goto fail;
    } else {
        c->transport_inited = true;
    }
    if (!c->authenticated && c->transport.connect != nodelay_connect) {
        tcp_connect = c->transport.connect;
        tcp_listen = c->transport.listen;
        c->transport.connect = nodelay_connect;
        c->transport.listen = nodelay_listen;
    }
    if ((rc = raft_uv_init(&c->uv_io, loop, c->data_dir, &c->transport)) != 0) {
        rc = kvr_err_set(err, KVR_EIO, "consensus: raft_uv_init %s: %s", c->data_dir, raft_strerror(rc));
        goto fail;
    }
    c->io_inited = true;
    if ((rc = kvr_termguard_init(&c->tg_io, &c->uv_io, loop)) != 0) {
        rc = kvr_err_set(err, KVR_ENOMEM, "consensus: term guard: %s", raft_strerror(rc));
        goto fail;
    }
    c->termguard_inited = true;
    struct raft_io *io = &c->tg_io;
    if (o->memory_log) {
        kvr_memlog_options mo = {.bootstrap = NULL, .hold_ms = o->memory_hold_ms};
        if ((rc = kvr_memlog_init(&c->io, &c->tg_io, loop, &mo)) != 0) {
            rc = kvr_err_set(err, KVR_ENOMEM, "consensus: memory log: %s", raft_strerror(rc));
            goto fail;
        }
        c->memlog_inited = true;
        io = &c->io;
        /* tests only: show what the vote rule prevents (tests/routerd/test_raft_mem.sh) */
        const char *off = getenv("KVR_TEST_NO_VOTE_RULE");
        if (off && *off == '1')
            kvr_memlog_disable_vote_rule(&c->io, true);
    } else {
        if ((rc = kvr_disklog_init(&c->io, &c->tg_io, loop)) != 0) {
            rc = kvr_err_set(err, KVR_ENOMEM, "consensus: disk log: %s", raft_strerror(rc));
            goto fail;
        }
        c->disklog_inited = true;
        io = &c->io;
    }
    if ((rc = raft_init(&c->raft, io, &c->fsm, c->id, c->addr)) != 0) {
        rc = kvr_err_set(err, KVR_EIO, "consensus: raft_init: %s (%s)", raft_strerror(rc),
                         raft_errmsg(&c->raft));
        goto fail;
    }
    c->raft_inited = true;
    c->raft.data = c;
    raft_set_election_timeout(&c->raft, o->election_timeout_ms ? o->election_timeout_ms : 1000);
    raft_set_heartbeat_timeout(&c->raft, o->heartbeat_timeout_ms ? o->heartbeat_timeout_ms : 100);
    raft_set_snapshot_threshold(&c->raft, o->snapshot_threshold ? o->snapshot_threshold : 1024);
    raft_set_snapshot_trailing(&c->raft, o->snapshot_trailing ? o->snapshot_trailing : 256); /* P4 */
    raft_set_pre_vote(&c->raft, true);
    /* 0.15 default is 30 s; a follower that answers an InstallSnapshot with RAFT_BUSY (it was
     * taking its own snapshot) is retried only after this timeout, so a restarted node would
     * sit behind for 30 s (seen in our 3-node test). */
    raft_set_install_snapshot_timeout(&c->raft, o->install_snapshot_timeout_ms ? o->install_snapshot_timeout_ms : 5000);
    uv_timer_init(loop, &c->free_timer);
    c->free_timer.data = c;
    *out = c;
    return 0;
fail:
    /* Before raft_init succeeded nothing async is running: uv/tcp backends close synchronously
     * enough to free here only if raft_init never took them; close them through raft when it did. */
    if (c->memlog_inited && !c->raft_inited)
        kvr_memlog_discard(&c->io);
    if (c->disklog_inited && !c->raft_inited)
        kvr_disklog_discard(&c->io);
    if (c->termguard_inited && !c->raft_inited)
        kvr_termguard_discard(&c->tg_io);
    if (c->io_inited && !c->raft_inited)
        raft_uv_close(&c->uv_io);
    if (c->transport_inited && !c->raft_inited)
        transport_free(c);
    free(c->data_dir);
    free(c);
    return rc;
}

int kvr_consensus_start(kvr_consensus *c, kvr_err *err)
{
    int rc;
    if (!c->opts.join) {
        struct raft_configuration conf;
        raft_configuration_init(&conf);
        for (int i = 0; i < c->n_peers; i++) {
            if ((rc = raft_configuration_add(&conf, c->peers[i].id, c->peers[i].addr, RAFT_VOTER)) != 0) {
                raft_configuration_close(&conf);
                return kvr_err_set(err, KVR_EINVAL, "consensus: configuration: %s", raft_strerror(rc));
            }
        }
        rc = raft_bootstrap(&c->raft, &conf);
        raft_configuration_close(&conf);
        if (rc != 0 && rc != RAFT_CANTBOOTSTRAP) /* already bootstrapped: a restart, fine */
            return kvr_err_set(err, KVR_EIO, "consensus: bootstrap: %s", raft_strerror(rc));
    }
    if ((rc = raft_start(&c->raft)) != 0)
        return kvr_err_set(err, KVR_EIO, "consensus: raft_start: %s (%s)", raft_strerror(rc),
                           raft_errmsg(&c->raft));
    c->started = true;
    return 0;
}

static int map_status(int status)
{
    switch (status) {
    case 0:
        return 0;
    case RAFT_NOTLEADER:
    case RAFT_LEADERSHIPLOST:
    case RAFT_CANTCHANGE:
    case RAFT_BUSY:
        return KVR_EAGAIN;
    case RAFT_SHUTDOWN:
    case RAFT_CANCELED:
        return KVR_ECLOSED;
    case RAFT_NOMEM:
        return KVR_ENOMEM;
    default:
        return KVR_EIO;
    }
}

static void apply_cb(struct raft_apply *r, int status, void *result)
{
    (void)result;
    kvr_consensus_req *req = (kvr_consensus_req *)r;
    req->cb(req, map_status(status));
}

int kvr_consensus_propose(kvr_consensus *c, kvr_consensus_req *req, const void *buf, size_t len,
                          kvr_consensus_cb cb)
{
    if (raft_state(&c->raft) != RAFT_LEADER)
        return KVR_EAGAIN;
    /* The 0.15 uv backend stores entries in batches and reads them back assuming each entry's
     * length is a multiple of 8 (upstream later added a check, cd3bd28): an entry of another
     * length is returned corrupted after a restart. Pad with zeros. */
    size_t padded = (len + 7) & ~(size_t)7;
    if (padded == 0)
        padded = 8;
    void *base = raft_malloc(padded); /* P3: raft frees it once raft_apply returned 0 */
    if (!base)
        return KVR_ENOMEM;
    memcpy(base, buf, len);
    memset((char *)base + len, 0, padded - len);
    struct raft_buffer b = {base, padded};
    req->cb = cb;
    int rv = raft_apply(&c->raft, &req->raft, &b, 1, apply_cb);
    if (rv != 0) {
        raft_free(base); /* still ours on failure */
        return map_status(rv);
    }
    return 0;
}

static void change_cb(struct raft_change *r, int status)
{
    kvr_consensus_change *req = (kvr_consensus_change *)r;
    req->cb(req, map_status(status));
}

int kvr_consensus_add(kvr_consensus *c, kvr_consensus_change *req, uint32_t id, const char *addr)
{
    int rv = raft_add(&c->raft, &req->raft, id, addr, change_cb);
    return rv == 0 ? 0 : (rv == RAFT_DUPLICATEID || rv == RAFT_DUPLICATEADDRESS) ? KVR_EEXIST : map_status(rv);
}

int kvr_consensus_assign_voter(kvr_consensus *c, kvr_consensus_change *req, uint32_t id)
{
    int rv = raft_assign(&c->raft, &req->raft, id, RAFT_VOTER, change_cb);
    return rv == 0 ? 0 : rv == RAFT_BADROLE ? KVR_EEXIST : rv == RAFT_NOTFOUND ? KVR_ENOTFOUND : map_status(rv);
}

int kvr_consensus_remove(kvr_consensus *c, kvr_consensus_change *req, uint32_t id)
{
    int rv = raft_remove(&c->raft, &req->raft, id, change_cb);
    return rv == 0 ? 0 : rv == RAFT_BADID ? KVR_ENOTFOUND : map_status(rv);
}

static void transfer_cb(struct raft_transfer *r)
{
    kvr_consensus_transfer *req = (kvr_consensus_transfer *)r;
    req->cb(req);
}

int kvr_consensus_transfer_leadership(kvr_consensus *c, kvr_consensus_transfer *req, uint32_t id)
{
    int rv = raft_transfer(&c->raft, &req->raft, id, transfer_cb);
    return rv == 0 ? 0 : rv == RAFT_BADID || rv == RAFT_NOTFOUND ? KVR_ENOTFOUND : map_status(rv);
}

const char *kvr_consensus_errmsg(kvr_consensus *c)
{
    const char *m = raft_errmsg(&c->raft);
    return m ? m : "";
}

kvr_consensus_role kvr_consensus_get_role(kvr_consensus *c)
{
    switch (raft_state(&c->raft)) {
    case RAFT_FOLLOWER:
        return KVR_ROLE_FOLLOWER;
    case RAFT_CANDIDATE:
        return KVR_ROLE_CANDIDATE;
    case RAFT_LEADER:
        return KVR_ROLE_LEADER;
    default:
        return KVR_ROLE_UNAVAILABLE;
    }
}

const char *kvr_consensus_role_name(kvr_consensus_role r)
{
    switch (r) {
    case KVR_ROLE_FOLLOWER:
        return "follower";
    case KVR_ROLE_CANDIDATE:
        return "candidate";
    case KVR_ROLE_LEADER:
        return "leader";
    default:
        return "unavailable";
    }
}

uint32_t kvr_consensus_leader(kvr_consensus *c, const char **addr)
{
    raft_id id = 0;
    const char *a = NULL;
    raft_leader(&c->raft, &id, &a);
    if (addr)
        *addr = a;
    return (uint32_t)id;
}

uint64_t kvr_consensus_term(kvr_consensus *c) { return c->raft.current_term; }
uint64_t kvr_consensus_commit_index(kvr_consensus *c) { return c->raft.commit_index; }
uint64_t kvr_consensus_applied_index(kvr_consensus *c) { return raft_last_applied(&c->raft); }
uint32_t kvr_consensus_id(kvr_consensus *c) { return c->id; }

const char *kvr_consensus_peer_addr(kvr_consensus *c, uint32_t id)
{
    const struct raft_configuration *conf = &c->raft.configuration;
    for (unsigned i = 0; i < conf->n; i++)
        if (conf->servers[i].id == id)
            return conf->servers[i].address;
    for (int i = 0; i < c->n_peers; i++)
        if (c->peers[i].id == id)
            return c->peers[i].addr;
    return NULL;
}

void kvr_consensus_memlog_stats_get(kvr_consensus *c, kvr_consensus_memlog_stats *out)
{
    memset(out, 0, sizeof *out);
    if (!c->memlog_inited)
        return;
    kvr_memlog_stats st;
    kvr_memlog_get_stats(&c->io, &st);
    out->memory_log = true;
    out->restricted = st.restricted;
    out->may_vote = st.may_vote;
    out->withheld = st.withheld;
}

bool kvr_consensus_log_fenced(kvr_consensus *c)
{
    kvr_disklog_stats st = {0};
    if (c->disklog_inited)
        kvr_disklog_get_stats(&c->io, &st);
    return st.fenced || kvr_consensus_muted(c);
}

bool kvr_consensus_muted(kvr_consensus *c)
{
    kvr_termguard_stats st = {0};
    if (c->termguard_inited)
        kvr_termguard_get_stats(&c->tg_io, &st);
    return st.muted;
}

void kvr_consensus_disable_vote_rule(kvr_consensus *c)
{
    if (c->memlog_inited)
        kvr_memlog_disable_vote_rule(&c->io, true);
}

static bool snapshot_in_progress(kvr_consensus *c)
{
    return c->raft.snapshot.pending.term != 0 || c->raft.snapshot.put.data != NULL;
}

static void close_transfer_cb(struct raft_transfer *req);

static void free_timer_closed(uv_handle_t *h)
{
    kvr_consensus *c = h->data;
    void (*cb)(void *) = c->close_cb;
    void *data = c->close_data;
    free(c->data_dir);
    free(c);
    if (cb)
        cb(data);
}

static void raft_closed(struct raft *r)
{
    kvr_consensus *c = r->data;
    /* P9: the backends are closed from raft's close callback. */
    raft_uv_close(&c->uv_io); /* memlog (memory mode) freed itself in its close */
    transport_free(c);
    /* Free on a later callback so the backends' own handle closes run first. */
    uv_close((uv_handle_t *)&c->free_timer, free_timer_closed);
}

/* Close steps run from our own timer, never from inside a raft callback (the transfer
 * callback fires from raft's tick; closing raft under its own feet crashed 0.15). */
static void close_step(uv_timer_t *t)
{
    kvr_consensus *c = t->data;
    uv_timer_stop(t);
    if (c->close_phase == 0) {
        c->close_phase = 1;
        /* A leader hands over first (as canonical/raft's example server does): in-flight
         * entries finish and the group elects at once instead of after an election timeout;
         * raft_close of a busy 0.15 leader crashed inside libraft in our tests. */
        if (c->started && raft_state(&c->raft) == RAFT_LEADER && c->raft.transfer == NULL) {
            memset(&c->close_transfer, 0, sizeof c->close_transfer);
            c->close_transfer.data = c;
            if (raft_transfer(&c->raft, &c->close_transfer, 0, close_transfer_cb) == 0)
                return; /* close_transfer_cb restarts the timer */
        }
    }
    /* raft_close while a snapshot is being written is another 0.15 crash window: wait for
     * it, at most ~5 s. */
    if (c->started && snapshot_in_progress(c) && ++c->close_waits < 1000) {
        uv_timer_start(t, close_step, 5, 0);
        return;
    }
    c->close_phase = 2;
    raft_close(&c->raft, raft_closed);
}

static void close_transfer_cb(struct raft_transfer *req)
{
    kvr_consensus *c = req->data;
    uv_timer_start(&c->free_timer, close_step, 0, 0);
}

void kvr_consensus_close(kvr_consensus *c, void (*close_cb)(void *data), void *data)
{
    c->close_cb = close_cb;
    c->close_data = data;
    uv_timer_start(&c->free_timer, close_step, 0, 0);
}
