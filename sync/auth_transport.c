#include "auth_transport.h"

#include "kvr_log.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef struct at_conn at_conn;
typedef struct at_impl at_impl;

/* One connection from accept/connect until its handshake ends (then raft owns the stream). */
struct at_conn {
    kvr_auth_hs hs;
    at_impl *t;
    uv_tcp_t *tcp; /* raft_malloc: raft frees it with raft_free once it has the stream */
    uv_connect_t connect;
    struct raft_uv_connect *req; /* outgoing only */
    bool outgoing, closing;
    bool connecting;       /* outgoing, TCP connect not finished */
    int64_t connect_dl_ms; /* while connecting: give up then (KVR_AUTH_CONNECT_MS) */
    int status; /* raft status for req->cb when the connection fails */
    at_conn *prev, *next;
};

struct at_impl {
    struct raft_uv_transport *transport;
    uv_loop_t *loop;
    const kvr_auth_key *key;
    raft_id id;
    char address[KVR_AUTH_ADDR + 1];
    uv_tcp_t listener;
    uv_timer_t timer; /* handshake deadlines */
    bool listener_open, timer_open, closing;
    unsigned n_incoming;
    at_conn head;
    raft_uv_accept_cb accept_cb;
    raft_uv_transport_close_cb close_cb;
    kvr_auth_transport_stats st;
};

static void list_add(at_impl *t, at_conn *c)
{
    c->next = t->head.next;
    c->prev = &t->head;
    t->head.next->prev = c;
    t->head.next = c;
}

static void list_del(at_conn *c)
{
    if (!c->next)
        return;
    c->prev->next = c->next;
    c->next->prev = c->prev;
    c->next = c->prev = NULL;
}

static void maybe_closed(at_impl *t)
{
    if (!t->closing || !t->close_cb || t->listener_open || t->timer_open ||
        t->head.next != &t->head)
        return;
    raft_uv_transport_close_cb cb = t->close_cb;
    t->close_cb = NULL;
    cb(t->transport);
}

static void conn_closed(uv_handle_t *h)
{
    at_conn *c = h->data;
    at_impl *t = c->t;
    list_del(c);
    if (!c->outgoing)
        t->n_incoming--;
    raft_free(c->tcp);
    if (c->outgoing)
        c->req->cb(c->req, NULL, c->status);
    free(c);
    maybe_closed(t);
}

static void conn_fail(at_conn *c, int raft_status)
{
    if (c->closing)
        return;
    c->closing = true;
    c->status = raft_status;
    c->tcp->data = c; /* the handshake may have pointed it at c->hs */
    uv_close((uv_handle_t *)c->tcp, conn_closed);
}

/* --- buffered reads for raft's receiving side ---
 *
 * raft 0.15's reader (uv_recv.c) asks libuv for exactly the next part of a message: its
 * 16-byte preamble, then its header, then its payload, each a read() of its own; and since
 * every read fills the buffer it was given, libuv reads once more until EAGAIN. So each
 * AppendEntries cost a follower 4 read syscalls and each result cost the leader 3 (measured
 * with strace under `kvr-bench raft`: 69% of the leader's reads were raft's). An accepted
 * stream therefore carries a read buffer: libuv reads into it (one read() per wake-up, for
 * as many messages as have arrived) and the bytes are handed on to raft's own alloc/read
 * callbacks in the pieces it asks for. The stream is the first member, so raft's
 * raft_free(stream) frees the buffer with it. */
#define AT_READ_BUF (64 * 1024)

typedef struct at_stream {
    uv_tcp_t tcp; /* first: raft frees the whole allocation with raft_free(stream) */
    uv_alloc_cb raft_alloc;
    uv_read_cb raft_read;
    size_t len;
    char buf[AT_READ_BUF];
} at_stream;

static void buffered_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)hint;
    at_stream *s = (at_stream *)h;
    buf->base = s->buf + s->len;
    buf->len = sizeof s->buf - s->len;
}

/* Hands what was read to raft's reader in the pieces it asks for. Raft may close the stream
 * from its read callback (a malformed message): the memory stays valid until the close
 * callback, which runs on a later loop phase, so only the closing flag is checked. */
static void buffered_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    at_stream *s = (at_stream *)st;
    if (nread <= 0) {
        (void)buf;
        uv_buf_t none = uv_buf_init(NULL, 0);
        if (nread < 0)
            s->raft_read(st, nread, &none); /* EOF or error: raft closes the stream */
        return;
    }
    s->len += (size_t)nread;
    size_t off = 0;
    while (off < s->len && !uv_is_closing((uv_handle_t *)st) && uv_is_readable(st) &&
           s->tcp.read_cb == buffered_read) {
        uv_buf_t b = uv_buf_init(NULL, 0);
        s->raft_alloc((uv_handle_t *)st, AT_READ_BUF, &b);
        if (b.base == NULL || b.len == 0) {
            s->raft_read(st, UV_ENOBUFS, &b);
            break;
        }
        size_t n = s->len - off < b.len ? s->len - off : b.len;
        memcpy(b.base, s->buf + off, n);
        off += n;
        s->raft_read(st, (ssize_t)n, &b);
    }
    /* raft takes every byte it is offered (it allocates whatever the current message part
     * still lacks), so the buffer is empty again unless the stream is going away */
    if (off < s->len)
        memmove(s->buf, s->buf + off, s->len - off);
    s->len -= off;
}

/* After raft's accept callback started reading the stream: put the buffer in front. */
static void buffer_reads(uv_stream_t *st)
{
    at_stream *s = (at_stream *)st;
    if (uv_is_closing((uv_handle_t *)st) || !st->read_cb || !st->alloc_cb)
        return;
    s->raft_alloc = st->alloc_cb;
    s->raft_read = st->read_cb;
    s->len = 0;
    /* the two callbacks libuv looks up on every read event (public fields of uv_stream_t) */
    st->alloc_cb = buffered_alloc;
    st->read_cb = buffered_read;
}

static void hs_done(kvr_auth_hs *hs, int status)
{
    at_conn *c = hs->data;
    at_impl *t = c->t;
    if (status != 0) {
        if (c->outgoing) {
            t->st.connect_failed++;
            KVR_LOG_WARN_RL(5, "raft peer failed authentication", "direction=out error=\"%s\"",
                            kvr_strerror(status));
        } else {
            t->st.refused++;
            KVR_LOG_WARN_RL(5, "raft peer refused: failed authentication", "error=\"%s\"",
                            kvr_strerror(status));
        }
        conn_fail(c, RAFT_NOCONNECTION);
        return;
    }
    list_del(c);
    uv_stream_t *stream = (uv_stream_t *)c->tcp;
    if (c->outgoing) {
        t->st.connected++;
        struct raft_uv_connect *req = c->req;
        free(c);
        req->cb(req, stream, 0);
    } else {
        t->n_incoming--;
        t->st.accepted++;
        raft_id id = hs->peer_id;
        char addr[KVR_AUTH_ADDR + 1];
        memcpy(addr, hs->peer_addr, sizeof addr);
        free(c);
        if (id == 0 || !addr[0]) {
            /* authenticated but no Raft identity: a forward-port client cannot get here (the
             * context differs), so this is a bug or a hostile key holder; drop it */
            uv_close((uv_handle_t *)stream, (uv_close_cb)raft_free);
            return;
        }
        t->accept_cb(t->transport, id, addr, stream);
        buffer_reads(stream);
    }
}

/* Dead peers must be noticed in seconds, not minutes. Across a partition (packets dropped,
 * not refused) a stream raft keeps writing to retransmits with exponential backoff, and a
 * connect retries its SYN the same way: after a 60 s partition the next attempt could be 30 s
 * away or more, and the healed follower waited that long for its leader (47 s measured).
 * TCP_USER_TIMEOUT closes a stream whose data stays unacknowledged this long (raft then
 * reconnects), and a connect gets the same time to finish before it is abandoned (raft
 * retries it after its connect retry delay). */
#define KVR_AUTH_USER_TIMEOUT_MS 3000
#define KVR_AUTH_CONNECT_MS 2000

static void set_user_timeout(uv_tcp_t *tcp)
{
    uv_os_fd_t fd;
    unsigned int ms = KVR_AUTH_USER_TIMEOUT_MS;
    if (uv_fileno((uv_handle_t *)tcp, &fd) == 0)
        (void)setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms);
}

static void on_timer(uv_timer_t *timer)
{
    at_impl *t = timer->data;
    int64_t now = kvr_mono_ms();
    for (at_conn *c = t->head.next, *nx; c != &t->head; c = nx) {
        nx = c->next;
        if (!c->closing && c->connecting && now >= c->connect_dl_ms) {
            t->st.connect_failed++;
            KVR_LOG_DEBUG("raft peer connect timed out", "after_ms=%d", KVR_AUTH_CONNECT_MS);
            conn_fail(c, RAFT_NOCONNECTION);
            continue;
        }
        if (!c->closing && kvr_auth_expired(&c->hs, now)) {
            if (c->outgoing)
                t->st.connect_failed++;
            else
                t->st.refused++;
            KVR_LOG_WARN_RL(5, "raft peer handshake timed out", "direction=%s",
                            c->outgoing ? "out" : "in");
            conn_fail(c, RAFT_NOCONNECTION);
        }
    }
}

static int ensure_timer(at_impl *t)
{
    if (t->timer_open)
        return 0;
    if (uv_timer_init(t->loop, &t->timer) != 0)
        return RAFT_IOERR;
    t->timer.data = t;
    t->timer_open = true;
    uv_timer_start(&t->timer, on_timer, 250, 250);
    return 0;
}

static at_conn *conn_new(at_impl *t, bool outgoing)
{
    at_conn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    /* incoming streams carry raft's read buffer (at_stream); outgoing ones raft only writes */
    c->tcp = raft_malloc(outgoing ? sizeof *c->tcp : sizeof(at_stream));
    if (!c->tcp) {
        free(c);
        return NULL;
    }
    c->t = t;
    c->outgoing = outgoing;
    c->hs.data = c;
    uv_tcp_init(t->loop, c->tcp);
    c->tcp->data = c;
    list_add(t, c);
    if (!outgoing)
        t->n_incoming++;
    return c;
}

static int parse_addr(const char *address, struct sockaddr_in *sa)
{
    char host[64];
    const char *colon = strrchr(address, ':');
    if (!colon || (size_t)(colon - address) >= sizeof host)
        return RAFT_NOCONNECTION;
    memcpy(host, address, (size_t)(colon - address));
    host[colon - address] = 0;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port <= 0 || port > 65535 || uv_ip4_addr(host, (int)port, sa) != 0)
        return RAFT_NOCONNECTION;
    return 0;
}

static void on_connection(uv_stream_t *server, int status)
{
    at_impl *t = server->data;
    if (status < 0 || t->closing)
        return;
    at_conn *c = conn_new(t, false);
    if (!c)
        return;
    if (uv_accept(server, (uv_stream_t *)c->tcp) != 0) {
        conn_fail(c, RAFT_NOCONNECTION);
        return;
    }
    if (t->n_incoming > KVR_AUTH_TRANSPORT_MAX_PENDING) {
        t->st.refused++;
        KVR_LOG_WARN_RL(5, "raft port: too many handshakes at once, closing", "max=%d",
                        KVR_AUTH_TRANSPORT_MAX_PENDING);
        conn_fail(c, RAFT_NOCONNECTION);
        return;
    }
    uv_tcp_nodelay(c->tcp, 1);
    set_user_timeout(c->tcp);
    if (kvr_auth_start(&c->hs, (uv_stream_t *)c->tcp, t->key, true, KVR_AUTH_CTX_RAFT, 0, NULL,
                       hs_done) != 0)
        conn_fail(c, RAFT_NOCONNECTION);
}

static void on_connected(uv_connect_t *req, int status)
{
    at_conn *c = req->data;
    c->connecting = false;
    if (c->closing)
        return; /* the close callback reports it */
    if (status < 0) {
        c->t->st.connect_failed++;
        conn_fail(c, RAFT_NOCONNECTION);
        return;
    }
    uv_tcp_nodelay(c->tcp, 1);
    set_user_timeout(c->tcp);
    if (kvr_auth_start(&c->hs, (uv_stream_t *)c->tcp, c->t->key, false, KVR_AUTH_CTX_RAFT, c->t->id,
                       c->t->address, hs_done) != 0) {
        c->t->st.connect_failed++;
        conn_fail(c, RAFT_NOCONNECTION);
    }
}

/* --- raft_uv_transport methods --- */

static int at_init(struct raft_uv_transport *transport, raft_id id, const char *address)
{
    at_impl *t = transport->impl;
    if (strlen(address) > KVR_AUTH_ADDR) {
        snprintf(transport->errmsg, sizeof transport->errmsg, "address too long");
        return RAFT_INVALID;
    }
    t->id = id;
    snprintf(t->address, sizeof t->address, "%s", address);
    return 0;
}

static int at_listen(struct raft_uv_transport *transport, raft_uv_accept_cb cb)
{
    at_impl *t = transport->impl;
    struct sockaddr_in sa;
    int rv;
    t->accept_cb = cb;
    if (parse_addr(t->address, &sa) != 0) {
        snprintf(transport->errmsg, sizeof transport->errmsg, "bad address %s", t->address);
        return RAFT_INVALID;
    }
    if ((rv = ensure_timer(t)) != 0)
        return rv;
    uv_tcp_init(t->loop, &t->listener);
    t->listener.data = t;
    t->listener_open = true;
    if ((rv = uv_tcp_bind(&t->listener, (const struct sockaddr *)&sa, 0)) != 0 ||
        (rv = uv_listen((uv_stream_t *)&t->listener, 128, on_connection)) != 0) {
        snprintf(transport->errmsg, sizeof transport->errmsg, "listen %s: %s", t->address,
                 uv_strerror(rv));
        return RAFT_IOERR; /* the handle is closed by at_close */
    }
    return 0;
}

static int at_connect(struct raft_uv_transport *transport, struct raft_uv_connect *req, raft_id id,
                      const char *address, raft_uv_connect_cb cb)
{
    at_impl *t = transport->impl;
    (void)id;
    struct sockaddr_in sa;
    int rv;
    if (parse_addr(address, &sa) != 0)
        return RAFT_NOCONNECTION;
    if ((rv = ensure_timer(t)) != 0)
        return rv;
    at_conn *c = conn_new(t, true);
    if (!c)
        return RAFT_NOMEM;
    req->cb = cb;
    c->req = req;
    c->connect.data = c;
    c->connecting = true;
    c->connect_dl_ms = kvr_mono_ms() + KVR_AUTH_CONNECT_MS;
    if (uv_tcp_connect(&c->connect, c->tcp, (const struct sockaddr *)&sa, on_connected) != 0) {
        /* fail without calling req->cb: raft treats a non-zero return as "no callback" */
        list_del(c);
        c->outgoing = false;
        t->n_incoming++; /* undone by conn_closed */
        c->closing = true;
        uv_close((uv_handle_t *)c->tcp, conn_closed);
        return RAFT_NOCONNECTION;
    }
    set_user_timeout(c->tcp);
    return 0;
}

static void listener_closed(uv_handle_t *h)
{
    at_impl *t = h->data;
    t->listener_open = false;
    maybe_closed(t);
}

static void timer_closed(uv_handle_t *h)
{
    at_impl *t = h->data;
    t->timer_open = false;
    maybe_closed(t);
}

static void at_close(struct raft_uv_transport *transport, raft_uv_transport_close_cb cb)
{
    at_impl *t = transport->impl;
    t->closing = true;
    t->close_cb = cb;
    if (t->listener_open && !uv_is_closing((uv_handle_t *)&t->listener))
        uv_close((uv_handle_t *)&t->listener, listener_closed);
    if (t->timer_open && !uv_is_closing((uv_handle_t *)&t->timer))
        uv_close((uv_handle_t *)&t->timer, timer_closed);
    for (at_conn *c = t->head.next, *nx; c != &t->head; c = nx) {
        nx = c->next;
        conn_fail(c, RAFT_CANCELED);
    }
    maybe_closed(t);
}

int kvr_auth_transport_init(struct raft_uv_transport *transport, uv_loop_t *loop,
                            const kvr_auth_key *key)
{
    at_impl *t = calloc(1, sizeof *t);
    if (!t)
        return RAFT_NOMEM;
    t->transport = transport;
    t->loop = loop;
    t->key = key;
    t->head.next = t->head.prev = &t->head;
    transport->impl = t;
    transport->init = at_init;
    transport->listen = at_listen;
    transport->connect = at_connect;
    transport->close = at_close;
    return 0;
}

void kvr_auth_transport_free(struct raft_uv_transport *transport)
{
    free(transport->impl);
    transport->impl = NULL;
}

void kvr_auth_transport_get_stats(struct raft_uv_transport *transport,
                                  kvr_auth_transport_stats *out)
{
    at_impl *t = transport->impl;
    if (t)
        *out = t->st;
    else
        memset(out, 0, sizeof *out);
}
