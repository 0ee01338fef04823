/* kvr-bridge: the engine's ZMQ sockets on the loop (bridge_priv.h). ZMQ_FD is
 * edge-triggered, so every wake-up drains until ZMQ_EVENTS has no POLLIN, and every send
 * re-checks. */
#include "bridge_priv.h"
#include "kvr_err.h"
#include "kvr_log.h"

#include <inttypes.h>
#include <stdlib.h>
#include <zmq.h>

/* ------------------------------------------------------------------ ZMQ */

static void handle_msg(rank *rk, bool is_sub, zmq_msg_t *f, int n)
{
    kvr_bridge_frame fr[MAX_FRAMES];
    for (int i = 0; i < n; i++)
        fr[i] = (kvr_bridge_frame){zmq_msg_data(&f[i]), zmq_msg_size(&f[i])};
    uint64_t seq;
    if (is_sub) {
        if (n != 3 || kvr_bridge_read_seq(fr[1].data, fr[1].len, &seq) != 0) {
            rk->malformed++;
            KVR_LOG_WARN_RL(5, "malformed live message", "worker=%" PRIu64 " frames=%d", rk->wid,
                            n);
            return;
        }
        br_on_live(rk, seq, fr[2].data, fr[2].len);
        return;
    }
    kvr_bridge_frame payload;
    kvr_err err = {0};
    if (n < 1 || fr[0].len != 0 ||
        kvr_bridge_parse_replay(fr + 1, (size_t)n - 1, &seq, &payload, &err) != 0) {
        rk->malformed++;
        KVR_LOG_WARN_RL(5, "malformed replay message", "worker=%" PRIu64 " frames=%d err=\"%s\"",
                        rk->wid, n, err.msg);
        return;
    }
    br_on_replayed(rk, seq, payload.data, payload.len);
}

/* Reads whole multipart messages until the socket has none or the budget is spent. Returns
 * true when messages may remain (ZMQ_FD will not signal them again: edge-triggered). */
static bool drain_sock(rank *rk, void *sock, int *budget)
{
    bool is_sub = sock == rk->sub;
    while (sock && *budget > 0) {
        int ev = 0;
        size_t sz = sizeof ev;
        if (zmq_getsockopt(sock, ZMQ_EVENTS, &ev, &sz) != 0 || !(ev & ZMQ_POLLIN))
            return false;
        zmq_msg_t f[MAX_FRAMES];
        int n = 0, more = 1;
        bool over = false;
        while (more) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&m);
                break;
            }
            more = zmq_msg_more(&m);
            if (n < MAX_FRAMES) {
                f[n++] = m;
            } else {
                over = true;
                zmq_msg_close(&m);
            }
        }
        (*budget)--;
        if (over)
            rk->malformed++;
        else
            handle_msg(rk, is_sub, f, n);
        for (int i = 0; i < n; i++)
            zmq_msg_close(&f[i]);
        if (!is_sub && sock != rk->dealer)
            return false; /* the dealer was replaced while handling */
    }
    return sock && *budget <= 0;
}

static void on_idle(uv_idle_t *h)
{
    bridge *br = h->data;
    bool more = false;
    for (int i = 0; i < br->n; i++) {
        rank *rk = &br->ranks[i];
        int budget = DRAIN_BUDGET / 2;
        more |= drain_sock(rk, rk->dealer, &budget);
        budget = DRAIN_BUDGET / 2;
        more |= drain_sock(rk, rk->sub, &budget);
    }
    if (!more)
        uv_idle_stop(h);
}

static void drain_now(rank *rk, void *sock)
{
    int budget = DRAIN_BUDGET;
    if (drain_sock(rk, sock, &budget))
        uv_idle_start(&rk->br->idle, on_idle);
}

void br_drain_soon(bridge *br)
{
    uv_idle_start(&br->idle, on_idle);
}

static void on_zpoll(uv_poll_t *p, int status, int events)
{
    zpoll *z = (zpoll *)p;
    drain_now(z->rk, z->sock);
}

static void on_zpoll_closed(uv_handle_t *h)
{
    zpoll *z = (zpoll *)h;
    zmq_close(z->sock);
    free(z);
}

void br_zpoll_close(zpoll *z)
{
    if (!z)
        return;
    uv_poll_stop(&z->h);
    uv_close((uv_handle_t *)&z->h, on_zpoll_closed);
}

/* Wraps sock (owned from now on, closed on failure too). */
static zpoll *zpoll_open(rank *rk, void *sock)
{
    int fd;
    size_t sz = sizeof fd;
    zpoll *z = calloc(1, sizeof *z);
    if (!z || zmq_getsockopt(sock, ZMQ_FD, &fd, &sz) != 0 ||
        uv_poll_init(rk->br->loop, &z->h, fd) != 0) {
        free(z);
        zmq_close(sock);
        return NULL;
    }
    z->rk = rk;
    z->sock = sock;
    uv_poll_start(&z->h, UV_READABLE, on_zpoll);
    return z;
}

int br_open_dealer(rank *rk)
{
    if (!rk->replay_ep[0])
        return 0;
    br_zpoll_close(rk->dealer_zp);
    rk->dealer_zp = NULL;
    rk->dealer = NULL;
    void *d = zmq_socket(rk->br->zctx, ZMQ_DEALER);
    if (!d)
        return KVR_EIO;
    int zero = 0;
    zmq_setsockopt(d, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_connect(d, rk->replay_ep) != 0) {
        KVR_LOG_ERROR("replay endpoint", "endpoint=%s err=\"%s\"", rk->replay_ep,
                      zmq_strerror(zmq_errno()));
        zmq_close(d);
        return KVR_EIO;
    }
    if (!(rk->dealer_zp = zpoll_open(rk, d)))
        return KVR_EIO;
    rk->dealer = d;
    return 0;
}

int br_open_sub(rank *rk, const char *topic)
{
    void *s = zmq_socket(rk->br->zctx, ZMQ_SUB);
    if (!s)
        return KVR_EIO;
    int zero = 0, hwm = 100000; /* vLLM's own PUB hwm default */
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(s, ZMQ_SUBSCRIBE, topic, strlen(topic));
    if (zmq_connect(s, rk->sub_ep) != 0) {
        KVR_LOG_ERROR("zmq endpoint", "endpoint=%s err=\"%s\"", rk->sub_ep,
                      zmq_strerror(zmq_errno()));
        zmq_close(s);
        return KVR_EIO;
    }
    if (!(rk->sub_zp = zpoll_open(rk, s)))
        return KVR_EIO;
    rk->sub = s;
    return 0;
}
