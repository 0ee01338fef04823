/* worker/zmq_pub.c: vLLM's ZMQ KV-event publisher, in C (see zmq_pub.h for the wire format). */
#include "zmq_pub.h"

#include "kvr_log.h"
#include "kvr_mp.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define PUB_HWM 100000                /* vLLM's default hwm */
#define BUFFER_MAX_BYTES (256u << 20) /* the replay buffer also stops at this many bytes */
#define REPLAY_PER_TICK 512           /* batches one replay sends per loop turn */
#define MAX_REPLAYS 16                /* replays running at once; more requests are ignored */
#define MAX_ID 256                    /* ZMQ routing ids are at most 255 bytes */

typedef struct slot {
    uint64_t seq;
    kvr_buf b;
} slot;

typedef struct replay {
    uint8_t id[MAX_ID];
    size_t id_len;
    uint64_t next; /* next seq to send */
} replay;

struct wk_zmq {
    uv_poll_t poll; /* on the ROUTER's ZMQ_FD; first member: the close callback frees z */
    uv_timer_t tick;
    int open_handles;
    void *ctx, *pub, *router;
    char topic[256];
    size_t topic_len;
    bool old_layout, map_events, bytes_hashes;
    int64_t dp_rank;
    uint64_t seq;         /* next seq to publish */
    slot *ring;           /* buffer_steps slots; slot of seq s is ring[s % cap] */
    uint64_t cap, oldest; /* oldest: seq of the oldest buffered batch */
    size_t bytes;
    replay replays[MAX_REPLAYS];
    int n_replays;
    kvr_buf enc;
};

/* ------------------------------------------------------------------ encoding */

static int put_hash(kvr_buf *b, uint64_t h, bool bytes)
{
    if (!bytes)
        return kvr_mp_write_uint(b, h);
    uint8_t raw[32];
    kvr_kv_hash_to_bytes(h, raw);
    return kvr_mp_write_bin(b, raw, sizeof raw);
}

static int put_hashes(kvr_buf *b, const kvr_kv_event *e, bool bytes)
{
    int rc = kvr_mp_write_array(b, e->n_hashes);
    for (uint32_t i = 0; rc == 0 && i < e->n_hashes; i++)
        rc = put_hash(b, e->hashes[i], bytes);
    return rc;
}

static int put_stored_fields(kvr_buf *b, const kvr_kv_event *e, bool map, bool bytes)
{
    int rc = 0;
    if (map)
        rc |= kvr_mp_write_cstr(b, "block_hashes");
    rc |= put_hashes(b, e, bytes);
    if (map)
        rc |= kvr_mp_write_cstr(b, "parent_block_hash");
    rc |= e->has_parent ? put_hash(b, e->parent, bytes) : kvr_mp_write_nil(b);
    if (map)
        rc |= kvr_mp_write_cstr(b, "token_ids");
    rc |= kvr_mp_write_array(b, e->n_tokens);
    for (uint32_t i = 0; rc == 0 && i < e->n_tokens; i++)
        rc = kvr_mp_write_uint(b, e->tokens[i]);
    if (map)
        rc |= kvr_mp_write_cstr(b, "block_size");
    rc |= kvr_mp_write_uint(b, e->block_size);
    /* lora_id, medium, lora_name have no default in vLLM's struct: always written */
    if (map)
        rc |= kvr_mp_write_cstr(b, "lora_id");
    rc |= e->has_lora_id ? kvr_mp_write_int(b, e->lora_id) : kvr_mp_write_nil(b);
    if (map)
        rc |= kvr_mp_write_cstr(b, "medium");
    rc |= kvr_mp_write_cstr(b, "GPU");
    if (map)
        rc |= kvr_mp_write_cstr(b, "lora_name");
    /* a --lora request's blocks name their adapter, as vLLM's do */
    rc |= e->lora_name.len ? kvr_mp_write_str(b, e->lora_name.base, e->lora_name.len)
                           : kvr_mp_write_nil(b);
    if (map) { /* newer builds set it (volcano-sh/kthena#1535's v0.26.0 capture) */
        rc |= kvr_mp_write_cstr(b, "kv_cache_spec_kind");
        rc |= kvr_mp_write_cstr(b, "full_attention");
    }
    return rc ? KVR_ENOMEM : 0;
}

static int put_event(kvr_buf *b, const kvr_kv_event *e, bool map, bool bytes)
{
    int rc = 0;
    switch (e->type) {
    case KVR_KV_STORED:
        rc |= map ? kvr_mp_write_map(b, 9) : kvr_mp_write_array(b, 8);
        if (map)
            rc |= kvr_mp_write_cstr(b, "type");
        rc |= kvr_mp_write_cstr(b, "BlockStored");
        return rc ? KVR_ENOMEM : put_stored_fields(b, e, map, bytes);
    case KVR_KV_REMOVED:
        rc |= map ? kvr_mp_write_map(b, 3) : kvr_mp_write_array(b, 3);
        if (map)
            rc |= kvr_mp_write_cstr(b, "type");
        rc |= kvr_mp_write_cstr(b, "BlockRemoved");
        if (map)
            rc |= kvr_mp_write_cstr(b, "block_hashes");
        rc |= put_hashes(b, e, bytes);
        if (map)
            rc |= kvr_mp_write_cstr(b, "medium");
        rc |= kvr_mp_write_cstr(b, "GPU");
        return rc ? KVR_ENOMEM : 0;
    case KVR_KV_CLEARED:
        rc |= map ? kvr_mp_write_map(b, 1) : kvr_mp_write_array(b, 1);
        if (map)
            rc |= kvr_mp_write_cstr(b, "type");
        rc |= kvr_mp_write_cstr(b, "AllBlocksCleared");
        return rc ? KVR_ENOMEM : 0;
    }
    return KVR_EINVAL;
}

int wk_zmq_encode(kvr_buf *out, const kvr_kv_batch *batch, bool map_events, bool bytes_hashes,
                  int64_t dp_rank)
{
    kvr_buf_reset(out);
    int rc = kvr_mp_write_array(out, 3) | kvr_mp_write_double(out, batch->ts) |
             kvr_mp_write_array(out, batch->n_events);
    if (rc)
        return KVR_ENOMEM;
    for (uint32_t i = 0; i < batch->n_events; i++)
        if ((rc = put_event(out, &batch->events[i], map_events, bytes_hashes)) != 0)
            return rc;
    return kvr_mp_write_int(out, dp_rank) ? KVR_ENOMEM : 0;
}

/* ------------------------------------------------------------------ replay buffer */

static slot *slot_of(wk_zmq *z, uint64_t seq)
{
    return &z->ring[seq % z->cap];
}

static void drop_oldest(wk_zmq *z)
{
    slot *s = slot_of(z, z->oldest);
    z->bytes -= s->b.len;
    kvr_buf_free(&s->b);
    z->oldest++;
}

static void put_seq(uint8_t out[8], uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        out[i] = (uint8_t)v;
}

/* Sends up to REPLAY_PER_TICK batches of each running replay. Returns true when some remain. */
static bool replay_step(wk_zmq *z)
{
    static const uint8_t end_seq[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    for (int k = 0; k < z->n_replays;) {
        replay *r = &z->replays[k];
        if (r->next < z->oldest)
            r->next = z->oldest; /* overrun while replaying: the client sees the gap */
        int sent = 0;
        bool ok = true;
        for (; r->next < z->seq && sent < REPLAY_PER_TICK && ok; r->next++, sent++) {
            slot *s = slot_of(z, r->next);
            uint8_t sq[8];
            put_seq(sq, r->next);
            ok = zmq_send(z->router, r->id, r->id_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0 &&
                 zmq_send(z->router, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0 &&
                 (z->old_layout ||
                  zmq_send(z->router, z->topic, z->topic_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0) &&
                 zmq_send(z->router, sq, 8, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0 &&
                 zmq_send(z->router, s->b.base, s->b.len, ZMQ_DONTWAIT) >= 0;
        }
        if (ok && r->next < z->seq) {
            k++;
            continue;
        }
        if (ok) { /* every batch sent: the end marker */
            ok = zmq_send(z->router, r->id, r->id_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0 &&
                 zmq_send(z->router, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0 &&
                 (z->old_layout || zmq_send(z->router, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0) &&
                 zmq_send(z->router, end_seq, 8, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0 &&
                 zmq_send(z->router, "", 0, ZMQ_DONTWAIT) >= 0;
        }
        if (!ok)
            KVR_LOG_WARN_RL(5, "replay send failed (client gone?)", "err=\"%s\"",
                            zmq_strerror(zmq_errno()));
        z->replays[k] = z->replays[--z->n_replays];
    }
    return z->n_replays > 0;
}

/* Reads every waiting request (ZMQ_FD is edge-triggered: drain until ZMQ_EVENTS says none). */
static void read_requests(wk_zmq *z)
{
    for (int budget = 1024; budget > 0; budget--) {
        int ev = 0;
        size_t sz = sizeof ev;
        if (zmq_getsockopt(z->router, ZMQ_EVENTS, &ev, &sz) != 0 || !(ev & ZMQ_POLLIN))
            return;
        zmq_msg_t f[3];
        int n = 0;
        bool more = true;
        while (more) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, z->router, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&m);
                break;
            }
            more = zmq_msg_more(&m);
            if (n < 3)
                f[n] = m;
            else
                zmq_msg_close(&m);
            n++;
        }
        bool valid = n == 3 && zmq_msg_size(&f[0]) < MAX_ID && zmq_msg_size(&f[1]) == 0 &&
                     zmq_msg_size(&f[2]) == 8;
        if (!valid)
            KVR_LOG_WARN_RL(5, "replay request ignored: not [id, \"\", seq(8)]", "frames=%d", n);
        if (valid && z->n_replays < MAX_REPLAYS) {
            replay *r = &z->replays[z->n_replays++];
            r->id_len = zmq_msg_size(&f[0]);
            memcpy(r->id, zmq_msg_data(&f[0]), r->id_len);
            const uint8_t *p = zmq_msg_data(&f[2]);
            r->next = 0;
            for (int i = 0; i < 8; i++)
                r->next = (r->next << 8) | p[i];
            KVR_LOG_INFO("replay requested", "from=%" PRIu64 " next=%" PRIu64 " oldest=%" PRIu64,
                         r->next, z->seq, z->oldest);
        }
        for (int i = 0; i < n && i < 3; i++)
            zmq_msg_close(&f[i]);
    }
}

static void on_tick(uv_timer_t *t)
{
    wk_zmq *z = t->data;
    read_requests(z);
    if (replay_step(z))
        uv_timer_start(&z->tick, on_tick, 0, 0); /* more next turn: the loop stays responsive */
    read_requests(z);                            /* our sends may have consumed the fd's edge */
}

static void on_poll(uv_poll_t *p, int status, int events)
{
    (void)status;
    (void)events;
    wk_zmq *z = (wk_zmq *)p;
    read_requests(z);
    if (z->n_replays)
        uv_timer_start(&z->tick, on_tick, 0, 0);
}

/* ------------------------------------------------------------------ open, publish, close */

static int bind_sock(void *ctx, int type, const char *ep, void **out, kvr_err *err)
{
    void *s = zmq_socket(ctx, type);
    if (!s)
        return kvr_err_set(err, KVR_ENOMEM, "zmq_socket: %s", zmq_strerror(zmq_errno()));
    int zero = 0, hwm = PUB_HWM;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    /* ROUTER: no HWM, so a replay's burst is never dropped; its size is bounded by the buffer */
    zmq_setsockopt(s, ZMQ_SNDHWM, type == ZMQ_PUB ? &hwm : &zero, sizeof hwm);
    if (zmq_bind(s, ep) != 0) {
        int e = zmq_errno();
        zmq_close(s);
        return kvr_err_set(err, KVR_EIO, "bind %s: %s", ep, zmq_strerror(e));
    }
    *out = s;
    return 0;
}

int wk_zmq_open(uv_loop_t *loop, const wk_zmq_config *cfg, wk_zmq **out, kvr_err *err)
{
    if (cfg->buffer_steps < 1 || strlen(cfg->topic) >= sizeof(((wk_zmq *)0)->topic))
        return kvr_err_set(err, KVR_EINVAL, "bad zmq config");
    wk_zmq *z = calloc(1, sizeof *z);
    if (!z || !(z->ring = calloc(cfg->buffer_steps, sizeof *z->ring))) {
        free(z);
        return kvr_err_set(err, KVR_ENOMEM, "zmq publisher");
    }
    z->cap = cfg->buffer_steps;
    z->topic_len = strlen(cfg->topic);
    memcpy(z->topic, cfg->topic, z->topic_len);
    z->old_layout = cfg->replay_old_layout;
    z->map_events = cfg->map_events;
    z->bytes_hashes = cfg->bytes_hashes;
    z->dp_rank = cfg->dp_rank;
    kvr_buf_init(&z->enc);
    int rc;
    z->ctx = zmq_ctx_new();
    if (!z->ctx) {
        rc = kvr_err_set(err, KVR_ENOMEM, "zmq_ctx_new");
        goto fail;
    }
    if ((rc = bind_sock(z->ctx, ZMQ_PUB, cfg->endpoint, &z->pub, err)) != 0)
        goto fail;
    if (cfg->replay_endpoint &&
        (rc = bind_sock(z->ctx, ZMQ_ROUTER, cfg->replay_endpoint, &z->router, err)) != 0)
        goto fail;
    if (z->router) {
        int fd;
        size_t sz = sizeof fd;
        if (zmq_getsockopt(z->router, ZMQ_FD, &fd, &sz) != 0 ||
            uv_poll_init(loop, &z->poll, fd) != 0) {
            rc = kvr_err_set(err, KVR_EIO, "polling the replay socket failed");
            goto fail;
        }
        z->poll.data = z;
        z->open_handles++;
        uv_poll_start(&z->poll, UV_READABLE, on_poll);
    }
    uv_timer_init(loop, &z->tick);
    z->tick.data = z;
    z->open_handles++;
    *out = z;
    return 0;
fail:
    if (z->router)
        zmq_close(z->router);
    if (z->pub)
        zmq_close(z->pub);
    if (z->ctx)
        zmq_ctx_term(z->ctx);
    free(z->ring);
    free(z);
    return rc;
}

uint64_t wk_zmq_next_seq(const wk_zmq *z)
{
    return z->seq;
}

int wk_zmq_publish(wk_zmq *z, const kvr_kv_batch *batch)
{
    int rc = wk_zmq_encode(&z->enc, batch, z->map_events, z->bytes_hashes, z->dp_rank);
    if (rc != 0)
        return rc;
    uint64_t seq = z->seq++;
    /* keep it for replay first (vLLM buffers every batch it publishes) */
    if (seq - z->oldest >= z->cap)
        drop_oldest(z);
    slot *s = slot_of(z, seq);
    kvr_buf_init(&s->b);
    if (kvr_buf_append(&s->b, z->enc.base, z->enc.len) != 0) {
        /* nothing kept from here back: a replay sees the gap */
        while (z->oldest < seq)
            drop_oldest(z);
        z->oldest = seq + 1;
        return KVR_ENOMEM;
    }
    s->seq = seq;
    z->bytes += s->b.len;
    while (z->bytes > BUFFER_MAX_BYTES && z->oldest < seq)
        drop_oldest(z);
    uint8_t sq[8];
    put_seq(sq, seq);
    /* PUB never blocks; over its HWM it drops, as vLLM's does */
    if (zmq_send(z->pub, z->topic, z->topic_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(z->pub, sq, 8, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(z->pub, z->enc.base, z->enc.len, ZMQ_DONTWAIT) < 0)
        KVR_LOG_WARN_RL(5, "zmq publish dropped", "seq=%" PRIu64 " err=\"%s\"", seq,
                        zmq_strerror(zmq_errno()));
    return 0;
}

static void on_closed(uv_handle_t *h)
{
    wk_zmq *z = h->data;
    if (--z->open_handles > 0)
        return;
    while (z->oldest < z->seq)
        drop_oldest(z);
    /* the sockets go only now: the poll handle watched the ROUTER's fd until it closed */
    if (z->router)
        zmq_close(z->router);
    zmq_close(z->pub);
    zmq_ctx_term(z->ctx);
    free(z->ring);
    kvr_buf_free(&z->enc);
    free(z);
}

void wk_zmq_close(wk_zmq *z)
{
    if (!z)
        return;
    if (z->router) {
        uv_poll_stop(&z->poll);
        uv_close((uv_handle_t *)&z->poll, on_closed);
    }
    uv_timer_stop(&z->tick);
    uv_close((uv_handle_t *)&z->tick, on_closed);
}
