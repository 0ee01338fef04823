/* kvr_nats_drain against a real nats-server (URL in argv[1]): two subscribers A and B share a
 * queue group while a third connection publishes numbered messages as fast as the loop lets
 * it; halfway through A leaves the group. Every message must reach A or B exactly once, and
 * A must get none after its drained callback. With "unsubscribe" as argv[2] A leaves with
 * kvr_nats_unsubscribe instead (what routers did before): the messages the server had routed
 * to A before it saw the UNSUB are lost, which the test reports (it is expected to fail that
 * way: the check of the check). Exit 0 on success. */
#include "kvr_nats.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define N_MSGS 40000
#define PER_TICK 400

static uv_loop_t *loop;
static kvr_nats pub, a, b;
static kvr_nats_sub *sub_a, *sub_b;
static uint8_t seen[N_MSGS];
static unsigned got_a, got_b, after_drain, dup, bad;
static unsigned sent;
static bool plain_unsub, drained, left;
static unsigned left_at;
static uv_timer_t tick, wait_t;
static int phase; /* 0 connect, 1 publish, 2 settle, 3 done */

static void on_msg(const kvr_nats_msg *m, void *data)
{
    bool is_a = data == &a;
    char buf[16];
    if (m->len == 0 || m->len >= sizeof buf) {
        bad++;
        return;
    }
    memcpy(buf, m->data, m->len);
    buf[m->len] = 0;
    unsigned long n = strtoul(buf, NULL, 10);
    if (n >= N_MSGS) {
        bad++;
        return;
    }
    if (seen[n])
        dup++;
    seen[n] = 1;
    if (is_a) {
        got_a++;
        if (drained)
            after_drain++;
    } else {
        got_b++;
    }
}

static void on_drained(void *data)
{
    (void)data;
    drained = true;
}

static void closed(kvr_nats *kn)
{
    (void)kn;
}

static int result = 2;

static void finish(uv_timer_t *t)
{
    (void)t;
    phase = 3;
    uv_timer_stop(&tick);
    unsigned lost = 0;
    for (unsigned i = 0; i < N_MSGS; i++)
        lost += !seen[i];
    printf("sent=%u a=%u b=%u left_at=%u drained=%d lost=%u dup=%u after_drain=%u bad=%u\n", sent,
           got_a, got_b, left_at, drained, lost, dup, after_drain, bad);
    result = 0;
    if (sent != N_MSGS || lost || dup || after_drain || bad || !got_a || !got_b)
        result = 1;
    if (!plain_unsub && !drained)
        result = 1;
    kvr_nats_close(&pub, closed);
    kvr_nats_close(&a, closed);
    kvr_nats_close(&b, closed);
    uv_close((uv_handle_t *)&tick, NULL);
    uv_close((uv_handle_t *)&wait_t, NULL);
}

static void on_tick(uv_timer_t *t)
{
    (void)t;
    if (phase == 0) {
        if (!kvr_nats_connected(&pub) || !kvr_nats_connected(&a) || !kvr_nats_connected(&b))
            return;
        phase = 1; /* subscriptions went out with the handshake; the timer gave them 100 ms */
        return;
    }
    if (phase != 1)
        return;
    char buf[16];
    for (int i = 0; i < PER_TICK && sent < N_MSGS; i++) {
        int len = snprintf(buf, sizeof buf, "%u", sent);
        if (kvr_nats_publish(&pub, "t.drain", buf, (size_t)len) != 0)
            break; /* the out buffer is full: next tick */
        sent++;
    }
    if (!left && sent >= N_MSGS / 2) {
        left = true;
        left_at = sent;
        if (plain_unsub) {
            kvr_nats_unsubscribe(sub_a);
        } else {
            int rc = kvr_nats_drain(sub_a, on_drained, NULL);
            if (rc == 1)
                drained = true;
            else if (rc != 0) {
                fprintf(stderr, "drain: %d\n", rc);
                exit(1);
            }
        }
    }
    if (sent == N_MSGS) {
        phase = 2;
        uv_timer_start(&wait_t, finish, 1500, 0);
    }
}

static void give_up(uv_timer_t *t)
{
    (void)t;
    fprintf(stderr, "timed out in phase %d\n", phase);
    exit(2);
}

static int nats_connect(kvr_nats *kn, const char *url, const char *name)
{
    kvr_nats_opts o = {.url = url, .name = name};
    kvr_err err = {0};
    if (kvr_nats_init(kn, loop, &o, &err) != 0) {
        fprintf(stderr, "%s: %s\n", name, err.msg);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_nats_drain NATS_URL [unsubscribe]\n");
        return 2;
    }
    plain_unsub = argc > 2 && strcmp(argv[2], "unsubscribe") == 0;
    loop = uv_default_loop();
    if (nats_connect(&pub, argv[1], "drain-pub") || nats_connect(&a, argv[1], "drain-a") ||
        nats_connect(&b, argv[1], "drain-b"))
        return 2;
    kvr_err err = {0};
    if (kvr_nats_subscribe(&a, "t.drain", "q", on_msg, &a, &sub_a, &err) != 0 ||
        kvr_nats_subscribe(&b, "t.drain", "q", on_msg, &b, &sub_b, &err) != 0) {
        fprintf(stderr, "subscribe: %s\n", err.msg);
        return 2;
    }
    uv_timer_init(loop, &tick);
    uv_timer_init(loop, &wait_t);
    uv_timer_start(&tick, on_tick, 100, 1);
    uv_timer_t deadline;
    uv_timer_init(loop, &deadline);
    uv_timer_start(&deadline, give_up, 30000, 0);
    uv_unref((uv_handle_t *)&deadline);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&deadline, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    return result;
}
