/* sync_fwd: forwarding a follower's commands to the leader over the forward port (the Raft
 * port + 1): length-prefixed msgpack frames (fwd_wire.h: requests, replies), the peer_auth
 * handshake on every connection, the leader's side that turns a request into a pending
 * command, and the follower's side that matches replies by rpc id.
 * Loop thread only (sync_int.h). */
#include "sync_int.h"
#include "fwd_wire.h"

#include "kvr_log.h"
#include "kvr_mp.h"

#include <stdlib.h>
#include <string.h>

int sync_send_reply(conn *c, uint64_t rpc, int status, const kvr_fsm_result *r)
{
    if (!c || c->closing)
        return KVR_ECLOSED;
    return kvr_fwd_encode_rep(&c->out, rpc, status, r);
}

/* ---------------------------------------------------------------------------------------- */
/* Forwarding connections */

static void conn_closed(uv_handle_t *h)
{
    conn *c = h->data;
    kvr_sync *s = c->s;
    kvr_buf_free(&c->in);
    kvr_buf_free(&c->out);
    kvr_buf_free(&c->wbuf);
    free(c);
    s->handles_open--;
}

void sync_conn_close(conn *c)
{
    if (c->closing)
        return;
    kvr_sync *s = c->s;
    c->closing = true;
    if (c->authing) {
        c->authing = false;
        if (c->inbound)
            s->n_authing--;
    }
    c->tcp.data = c; /* the handshake may have pointed it at c->hs */
    /* unlink */
    for (conn **pp = &s->conns; *pp; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    for (int i = 0; i <= KVR_CONSENSUS_MAX_PEERS; i++)
        if (s->clients[i] == c)
            s->clients[i] = NULL;
    /* whoever waited on this connection retries or stops waiting */
    for (pending *p = s->head.next; p != &s->head; p = p->next) {
        if (p->from == c)
            p->from = NULL, p->internal = true; /* answer goes nowhere */
        if (p->via == c && p->state == P_FWD) {
            sync_fwd_slot_clear(s, p);
            p->state = P_WAIT;
        }
    }
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)hint;
    conn *c = h->data;
    if (kvr_buf_reserve(&c->in, 65536) != 0) {
        buf->base = NULL;
        buf->len = 0;
        return;
    }
    buf->base = c->in.base + c->in.len;
    buf->len = c->in.cap - c->in.len;
}

static void handle_request(conn *c, const kvr_fwd_msg *m)
{
    kvr_sync *s = c->s;
    uint64_t rpc = m->rpc;
    kvr_slice cmd = m->cmd;
    s->m.forwarded_in++;
    if (s->closing || kvr_consensus_get_role(s->cons) != KVR_ROLE_LEADER) {
        sync_send_reply(c, rpc, KVR_EAGAIN, NULL);
        return;
    }
    pending *p = sync_pending_new(s, cmd.base, cmd.len);
    if (!p) {
        sync_send_reply(c, rpc, KVR_ENOMEM, NULL);
        return;
    }
    p->from = c;
    p->from_rpc = rpc;
    sync_plist_add(s, p);
    sync_enqueue_batch(s, p);
}

static void handle_reply(conn *c, const kvr_fwd_msg *m)
{
    kvr_sync *s = c->s;
    uint64_t rpc = m->rpc;
    pending *p = s->fwd_slots[rpc & (FWD_SLOTS - 1)];
    if (!p || p->rpc_id != rpc || p->state != P_FWD)
        return; /* late answer to a try we gave up on */
    sync_fwd_slot_clear(s, p);
    if (m->status != 0) {
        p->state = P_WAIT; /* not leader any more, or it lost the entry: retry */
        s->m.forward_retries++;
        return;
    }
    int64_t now_ns = kvr_mono_ns();
    sync_hop(s, KVR_SYNC_HOP_FORWARD, p->fwd_start_us * 1000, now_ns);
    s->m.forward_latency_us_sum += (uint64_t)(now_ns / 1000 - p->fwd_start_us);
    s->m.forward_latency_count++;
    p->res = m->res;
    p->have_res = true;
    p->status = 0;
    p->mode = KVR_SYNC_RAFT;
    sync_pending_finish(s, p);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    conn *c = st->data;
    if (nread < 0) {
        sync_conn_close(c);
        return;
    }
    c->in.len += (size_t)nread;
    size_t off = 0;
    while (!c->closing) {
        kvr_slice body;
        size_t used;
        int rc = kvr_fwd_frame_next(c->in.base + off, c->in.len - off, &body, &used);
        if (rc == 0)
            break;
        if (rc < 0) {
            KVR_LOG_WARN_RL(5, "sync forward frame too large", "len=%zu", used);
            sync_conn_close(c);
            return;
        }
        off += used;
        kvr_fwd_msg m;
        rc = kvr_fwd_decode(body.base, body.len, &m);
        if (m.kind == KVR_FWD_REQ && c->inbound) {
            if (rc == 0) {
                handle_request(c, &m);
                continue;
            }
            KVR_LOG_WARN_RL(5, "sync malformed forwarded request", "peer=inbound");
        } else if (m.kind == KVR_FWD_REP && !c->inbound) {
            if (rc == 0) {
                handle_reply(c, &m);
                continue;
            }
            KVR_LOG_WARN_RL(5, "sync malformed forward reply", "peer=%u", c->peer);
        }
        sync_conn_close(c);
        return;
    }
    if (!c->closing)
        kvr_buf_consume(&c->in, off);
}

static void on_write(uv_write_t *w, int status)
{
    conn *c = w->data;
    c->writing = false;
    c->wbuf.len = 0;
    if (status < 0) {
        sync_conn_close(c);
        return;
    }
    if (c->out.len && !c->closing)
        sync_conn_flush(c);
}

void sync_conn_flush(conn *c)
{
    if (c->closing || c->writing || !c->connected || c->out.len == 0)
        return;
    /* Most of the time the socket takes everything at once: then there is no write request
     * whose callback (next loop turn) must run before the following frames can go. */
    uv_buf_t tb = uv_buf_init(c->out.base, (unsigned)c->out.len);
    int n = uv_try_write((uv_stream_t *)&c->tcp, &tb, 1);
    if (n < 0 && n != UV_EAGAIN) {
        sync_conn_close(c);
        return;
    }
    if (n > 0)
        kvr_buf_consume(&c->out, (size_t)n);
    if (c->out.len == 0)
        return;
    /* swap out → wbuf so new frames can accumulate while this write is in flight */
    kvr_buf t = c->wbuf;
    c->wbuf = c->out;
    c->out = t;
    c->out.len = 0;
    uv_buf_t b = uv_buf_init(c->wbuf.base, (unsigned)c->wbuf.len);
    c->wreq.data = c;
    if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_write) != 0) {
        sync_conn_close(c);
        return;
    }
    c->writing = true;
}

static conn *conn_new(kvr_sync *s, bool inbound)
{
    conn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->s = s;
    c->inbound = inbound;
    kvr_buf_init(&c->in);
    kvr_buf_init(&c->out);
    kvr_buf_init(&c->wbuf);
    uv_tcp_init(s->loop, &c->tcp);
    c->tcp.data = c;
    s->handles_open++;
    c->next = s->conns;
    s->conns = c;
    return c;
}

static void on_auth_done(kvr_auth_hs *hs, int status)
{
    conn *c = hs->data;
    kvr_sync *s = c->s;
    c->authing = false;
    if (c->inbound)
        s->n_authing--;
    if (status != 0) {
        if (c->inbound) {
            s->auth_refused++;
            KVR_LOG_WARN_RL(5, "sync forward port: peer refused, failed authentication",
                            "error=\"%s\"", kvr_strerror(status));
        } else {
            KVR_LOG_WARN_RL(5, "sync forward: leader failed authentication", "peer=%u error=\"%s\"",
                            c->peer, kvr_strerror(status));
        }
        sync_conn_close(c);
        return;
    }
    c->connected = true;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    sync_conn_flush(c);
}

void sync_on_accept(uv_stream_t *server, int status)
{
    kvr_sync *s = server->data;
    if (status < 0 || s->closing)
        return;
    conn *c = conn_new(s, true);
    if (!c)
        return;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        sync_conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    if (s->key.len) {
        /* Not one byte of a forwarded command is parsed before the peer proved the cluster
         * secret (defect 2: a raw EXPIRE here freed every booking on every replica). */
        if (s->n_authing >= FWD_MAX_AUTHING) {
            s->auth_refused++;
            KVR_LOG_WARN_RL(5, "sync forward port: too many handshakes at once, closing", "max=%d",
                            FWD_MAX_AUTHING);
            sync_conn_close(c);
            return;
        }
        c->hs.data = c;
        if (kvr_auth_start(&c->hs, (uv_stream_t *)&c->tcp, &s->key, true, KVR_AUTH_CTX_FORWARD, 0,
                           NULL, on_auth_done) != 0) {
            sync_conn_close(c);
            return;
        }
        c->authing = true;
        s->n_authing++;
        return;
    }
    c->connected = true;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

typedef struct connect_req {
    uv_connect_t req;
    conn *c;
} connect_req;

static void on_connect(uv_connect_t *req, int status)
{
    connect_req *cr = (connect_req *)req;
    conn *c = cr->c;
    free(cr);
    if (c->closing)
        return;
    if (status < 0) {
        KVR_LOG_DEBUG("sync forward connect failed", "peer=%u err=%s", c->peer, uv_strerror(status));
        sync_conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    if (c->s->key.len) {
        /* frames queued meanwhile stay in c->out until the leader proved the secret too */
        c->hs.data = c;
        if (kvr_auth_start(&c->hs, (uv_stream_t *)&c->tcp, &c->s->key, false, KVR_AUTH_CTX_FORWARD,
                           c->s->o.id, c->s->raft_addr, on_auth_done) != 0) {
            sync_conn_close(c);
            return;
        }
        c->authing = true;
        return;
    }
    c->connected = true;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    sync_conn_flush(c);
}

/* host:port of a raft address → sockaddr of its forwarding port (port + 1). */
int sync_fwd_sockaddr(const char *raft_addr, struct sockaddr_in *sa)
{
    char host[64];
    const char *colon = strrchr(raft_addr, ':');
    if (!colon || (size_t)(colon - raft_addr) >= sizeof host)
        return KVR_EINVAL;
    memcpy(host, raft_addr, (size_t)(colon - raft_addr));
    host[colon - raft_addr] = 0;
    long port = strtol(colon + 1, NULL, 10);
    if (port <= 0 || port >= 65535)
        return KVR_EINVAL;
    return uv_ip4_addr(host, (int)port + 1, sa) == 0 ? 0 : KVR_EINVAL;
}

static conn *client_for(kvr_sync *s, uint32_t peer, const char *raft_addr)
{
    int slot = (int)(peer % (KVR_CONSENSUS_MAX_PEERS + 1));
    conn *c = s->clients[slot];
    if (c && c->peer == peer)
        return c;
    if (c)
        sync_conn_close(c);
    struct sockaddr_in sa;
    if (!raft_addr || sync_fwd_sockaddr(raft_addr, &sa) != 0)
        return NULL;
    c = conn_new(s, false);
    if (!c)
        return NULL;
    c->peer = peer;
    connect_req *cr = calloc(1, sizeof *cr);
    if (!cr) {
        sync_conn_close(c);
        return NULL;
    }
    cr->c = c;
    if (uv_tcp_connect(&cr->req, &c->tcp, (const struct sockaddr *)&sa, on_connect) != 0) {
        free(cr);
        sync_conn_close(c);
        return NULL;
    }
    s->clients[slot] = c;
    return c;
}

void sync_forward(kvr_sync *s, pending *p, uint32_t leader, const char *leader_addr)
{
    uint64_t rpc = ++s->next_rpc;
    uint32_t slot = (uint32_t)(rpc & (FWD_SLOTS - 1));
    if (s->fwd_slots[slot]) {
        p->state = P_WAIT; /* 65536 forwards in flight: wait for a slot */
        return;
    }
    conn *c = client_for(s, leader, leader_addr);
    if (!c) {
        p->state = P_WAIT;
        return;
    }
    if (kvr_fwd_encode_req(&c->out, rpc, p->cmd, p->cmd_len) != 0) {
        p->state = P_WAIT;
        return;
    }
    s->fwd_slots[slot] = p;
    p->rpc_id = rpc;
    p->via = c;
    p->state = P_FWD;
    p->fwd_start_us = kvr_mono_ns() / 1000;
    p->try_deadline_ms = kvr_mono_ms() + s->o.forward_timeout_ms;
    s->m.forwards++;
}
