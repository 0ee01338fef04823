/* libFuzzer target for kvr_nats_core's protocol parser: arbitrary bytes as if a NATS server
 * had sent them. The stream is parsed twice, once in one piece and once split into pieces
 * whose size the first input byte chooses, because a socket may split it anywhere. Checks: no
 * memory error or undefined behaviour; every delivery names a live subscription, carries a
 * payload no larger than the bytes fed and a status of 0 or three digits; and both ways of
 * feeding deliver exactly the same messages, in the same order, up to the first protocol
 * error. The third subscription is drained (kvr_nats_core_drain) once the handshake ends: its
 * drain ends at most once, at the same message in both ways, and nothing of it comes after.
 * Any violation aborts. */
#include "kvr_log.h"
#include "kvr_nats_core.h"
#include "fuzz_check.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

enum { NSUBS = 3 };

typedef struct run {
    int subs[NSUBS];
    kvr_nats_core *c;
    uint64_t drain_sid;
    int drained; /* on_drained calls */
    uint64_t hash;
    uint64_t n;
    size_t fed;
    bool closed;
    uint64_t pong_seq; /* the last on_pong */
} run;

static uint64_t mix(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h * 0x100000001b3ull;
}

static void on_msg(void *cb_data, void *sub_data, const kvr_nats_core_msg *m)
{
    run *r = cb_data;
    int *sub = sub_data;
    CHECK(sub >= r->subs && sub < r->subs + NSUBS);
    CHECK(m->subject.len > 0 && m->subject.len <= r->fed);
    CHECK(m->data.len <= r->fed && m->reply.len <= r->fed);
    CHECK(m->status == 0 || (m->status >= 100 && m->status <= 999));
    r->hash = mix(r->hash, m->subject.base, m->subject.len);
    r->hash = mix(r->hash, m->reply.base, m->reply.len);
    r->hash = mix(r->hash, m->data.base, m->data.len);
    r->hash = mix(r->hash, &m->status, sizeof m->status);
    int which = (int)(sub - r->subs);
    CHECK(!(which == NSUBS - 1 && r->drained));
    r->hash = mix(r->hash, &which, sizeof which);
    r->n++;
}

static void on_event(void *cb_data, kvr_nats_core_event ev)
{
    run *r = cb_data;
    if (ev == KVR_NATS_CORE_CONNECTED && r->drain_sid) {
        int rc = kvr_nats_core_drain(r->c, r->drain_sid);
        CHECK(rc == 0 || rc == KVR_ENOMEM);
        r->drain_sid = 0;
    }
}

static void on_drained(void *cb_data, void *sub_data)
{
    run *r = cb_data;
    CHECK(sub_data == &r->subs[NSUBS - 1]);
    CHECK(r->drained == 0);
    r->drained++;
    r->hash = mix(r->hash, &r->n, sizeof r->n);
}

/* a refused publish names a subject: not empty, without the quote that ends it, no space or
 * control byte */
static void on_pub_denied(void *cb_data, const char *subject, size_t len)
{
    run *r = cb_data;
    CHECK(len > 0 && memchr(subject, '"', len) == NULL);
    for (size_t i = 0; i < len; i++)
        CHECK((unsigned char)subject[i] > ' ' && subject[i] != 0x7f);
    r->hash = mix(r->hash, subject, len);
}

/* PONGs on an up connection count up by one */
static void on_pong(void *cb_data, uint64_t pong_seq)
{
    run *r = cb_data;
    CHECK(pong_seq == r->pong_seq + 1 || r->pong_seq == 0);
    r->pong_seq = pong_seq;
    r->hash = mix(r->hash, &pong_seq, sizeof pong_seq);
}

static void on_closed(void *data)
{
    ((run *)data)->closed = true;
}

/* Feeds data in pieces of `piece` bytes (0: one piece), stopping at the first error. */
static void feed(run *r, const uint8_t *data, size_t size, size_t piece)
{
    uv_loop_t loop;
    CHECK(uv_loop_init(&loop) == 0);
    kvr_nats_core_opts o = {.urls = "nats://127.0.0.1:1",
                            .cb_data = r,
                            .on_msg = on_msg,
                            .on_event = on_event,
                            .on_drained = on_drained,
                            .on_pub_denied = on_pub_denied,
                            .on_pong = on_pong};
    kvr_nats_core *c = NULL;
    kvr_err err;
    CHECK(kvr_nats_core_init(&c, &loop, &o, &err) == 0);
    r->c = c;
    for (int i = 0; i < NSUBS; i++)
        CHECK(kvr_nats_core_subscribe(c,
                                      i == 0   ? "a.>"
                                      : i == 1 ? "_INBOX.x.*"
                                               : "b",
                                      i == 1 ? NULL : "q", &r->subs[i], &r->drain_sid) == 0);
    size_t off = 0;
    while (off < size) {
        size_t n = piece && size - off > piece ? piece : size - off;
        r->fed += n;
        int rc = kvr_nats_core_feed(c, data + off, n);
        off += n;
        if (rc != 0)
            break;
    }
    /* a publish after whatever the input did must still be accepted or refused cleanly */
    int prc = kvr_nats_core_publish(c, "a.b", "_INBOX.x.1", "x", 1);
    CHECK(prc == 0 || prc == KVR_EAGAIN || prc == KVR_ELIMIT);
    kvr_nats_core_close(c, on_closed, r);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(r->closed);
    CHECK(uv_loop_close(&loop) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool init;
    if (!init) {
        kvr_log_setup("fuzz", NULL, KVR_LOG_ERROR);
        init = true;
    }
    if (size < 1)
        return 0;
    size_t piece = 1 + data[0] % 64;
    data++, size--;
    run whole = {0}, pieces = {0};
    feed(&whole, data, size, 0);
    feed(&pieces, data, size, piece);
    CHECK(whole.n == pieces.n);
    CHECK(whole.hash == pieces.hash);
    CHECK(whole.drained == pieces.drained);
    return 0;
}
