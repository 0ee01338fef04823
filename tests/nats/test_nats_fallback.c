/* kvr_nats_publish_fallback against a real nats-server (URL in argv[1]). A publisher sends
 * numbered messages to "t.lead" with "t.any" as the fallback; L (and later L2) subscribe to
 * t.lead in a queue group, F to t.any.
 *   phase 1: L subscribed: every message reaches L, none F (10,000 messages through 4,096
 *            slots: each is released once a PING sent after it is answered).
 *   phase 2: L gone (drained): every message reaches F, through the server's no-responders
 *            answer.
 *   phase 3: messages flow while the subscriber changes, as when the Raft leader changes: L2
 *            subscribes after PHASE3/2 messages. Every message reaches L2 or F exactly once.
 * With "plain" as argv[2] the publisher uses kvr_nats_publish (no fallback): phase 2 loses
 * every message, which the test reports (the check of the check).
 * With "denied PUB_URL" the publisher connects as a user the server does not let publish on
 * t.lead (a cluster whose permissions predate the subject): the server drops each message with
 * an -ERR and no 503, and all PHASE1 messages must still reach F, none L. Exit 0 on success. */
#include "kvr_nats.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define PHASE1 10000 /* more than the 4,096 slots: each must be released at its PONG */
#define PHASE2 1000
#define PHASE3 2000
#define N_MSGS (PHASE1 + PHASE2 + PHASE3)
#define PER_TICK 100

static uv_loop_t *loop;
static kvr_nats pub, l1, l2, f;
static kvr_nats_sub *sub_l1;
static uint8_t seen[N_MSGS];
static unsigned got[3], dup, bad, on_f_early;
static unsigned sent;
static bool plain, drained, l1_ready, denied_mode;
static unsigned probes, probes_on_f;
static uv_timer_t tick, wait_t;
static int phase; /* 0 connect, 1-3 publish, 4 settle, 5 done */
static int result = 2;

static void on_msg(const kvr_nats_msg *m, void *data)
{
    int who = data == &l1 ? 0 : data == &l2 ? 1 : 2;
    if (m->len == 5 && memcmp(m->data, "probe", 5) == 0) {
        l1_ready |= who == 0; /* L's subscription is in place at the server */
        probes_on_f += who == 2;
        return;
    }
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
    got[who]++;
    if (who == 2 && n < PHASE1)
        on_f_early++; /* phase 1 had a subscriber: nothing may reach the fallback */
    if (who == 0 && n >= PHASE1)
        bad++; /* L left before phase 2 */
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

static void finish_denied(void)
{
    kvr_nats_stats st;
    kvr_nats_get_stats(&pub, &st);
    unsigned lost = 0;
    for (unsigned i = 0; i < PHASE1; i++)
        lost += !seen[i];
    printf("denied: sent=%u l1=%u fallback=%u lost=%u dup=%u bad=%u fallbacks=%llu "
           "straight=%llu\n",
           sent, got[0], got[2], lost, dup, bad, (unsigned long long)st.fallbacks,
           (unsigned long long)st.fallback_busy);
    result = sent == PHASE1 && !lost && !dup && !bad && !got[0] && got[2] == PHASE1 ? 0 : 1;
}

static void finish(uv_timer_t *t)
{
    (void)t;
    phase = 5;
    if (denied_mode) {
        finish_denied();
        goto close;
    }
    uv_timer_stop(&tick);
    unsigned lost = 0, lost2 = 0;
    for (unsigned i = 0; i < N_MSGS; i++) {
        lost += !seen[i];
        lost2 += !seen[i] && i >= PHASE1 && i < PHASE1 + PHASE2;
    }
    kvr_nats_stats st;
    kvr_nats_get_stats(&pub, &st);
    printf("sent=%u l1=%u l2=%u fallback=%u lost=%u (phase 2: %u) dup=%u bad=%u "
           "phase1_on_fallback=%u fallbacks=%llu busy=%llu probes=%u (on fallback %u)\n",
           sent, got[0], got[1], got[2], lost, lost2, dup, bad, on_f_early,
           (unsigned long long)st.fallbacks, (unsigned long long)st.fallback_busy, probes / 20 + 1,
           probes_on_f);
    result = 0;
    if (sent != N_MSGS || lost || dup || bad || on_f_early || got[0] != PHASE1 || !got[1] ||
        got[2] < PHASE2 || st.fallbacks + st.fallback_busy != got[2] + probes_on_f)
        result = 1;
close:
    kvr_nats_close(&pub, closed);
    kvr_nats_close(&l1, closed);
    kvr_nats_close(&l2, closed);
    kvr_nats_close(&f, closed);
    uv_close((uv_handle_t *)&tick, NULL);
    uv_close((uv_handle_t *)&wait_t, NULL);
}

static void next_phase(uv_timer_t *t)
{
    (void)t;
    phase++;
}

static void on_tick(uv_timer_t *t)
{
    (void)t;
    if (phase == 0 && denied_mode) {
        /* nothing the publisher sends on t.lead can reach L: give the subscriptions 300 ms */
        if (kvr_nats_connected(&pub) && kvr_nats_connected(&l1) && kvr_nats_connected(&l2) &&
            kvr_nats_connected(&f) && probes++ == 300)
            phase = 1;
        return;
    }
    if (phase == 0) {
        /* connected is not yet subscribed at the server: probe t.lead (with the fallback, so
         * a probe nobody took shows up on F) until one reaches L */
        if (l1_ready) {
            phase = 1;
            return;
        }
        if (kvr_nats_connected(&pub) && kvr_nats_connected(&l1) && kvr_nats_connected(&l2) &&
            kvr_nats_connected(&f) && probes++ % 20 == 0)
            kvr_nats_publish_fallback(&pub, "t.lead", "t.any", "probe", 5);
        return;
    }
    if (phase < 1 || phase > 3 || uv_is_active((uv_handle_t *)&wait_t))
        return;
    unsigned end = phase == 1 ? PHASE1 : phase == 2 ? PHASE1 + PHASE2 : N_MSGS;
    if (phase == 2 && !drained)
        return;
    char buf[16];
    for (int i = 0; i < PER_TICK && sent < end; i++) {
        int len = snprintf(buf, sizeof buf, "%u", sent);
        int rc = plain ? kvr_nats_publish(&pub, "t.lead", buf, (size_t)len)
                       : kvr_nats_publish_fallback(&pub, "t.lead", "t.any", buf, (size_t)len);
        if (rc != 0)
            break; /* the out buffer is full: next tick */
        sent++;
        if (phase == 3 && sent == PHASE1 + PHASE2 + PHASE3 / 2) {
            kvr_err err = {0};
            kvr_nats_sub *s2;
            if (kvr_nats_subscribe(&l2, "t.lead", "ql", on_msg, &l2, &s2, &err) != 0) {
                fprintf(stderr, "subscribe l2: %s\n", err.msg);
                exit(2);
            }
        }
    }
    if (sent < end)
        return;
    if (phase == 1 && denied_mode) {
        phase = 4;
        uv_timer_start(&wait_t, finish, 1500, 0);
        return;
    }
    if (phase == 1) {
        if (got[0] + got[2] < PHASE1)
            return; /* L takes all of phase 1 before it leaves */
        int rc = kvr_nats_drain(sub_l1, on_drained, NULL);
        if (rc == 1)
            drained = true;
        else if (rc != 0) {
            fprintf(stderr, "drain: %d\n", rc);
            exit(2);
        }
        phase = 2;
        return;
    }
    if (phase == 2) {
        uv_timer_start(&wait_t, next_phase, 300, 0); /* phase 2's answers back first */
        return;
    }
    phase = 4;
    uv_timer_start(&wait_t, finish, 1500, 0);
}

static void give_up(uv_timer_t *t)
{
    (void)t;
    fprintf(stderr, "timed out in phase %d (sent %u)\n", phase, sent);
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
        fprintf(stderr, "usage: test_nats_fallback NATS_URL [plain | denied PUB_URL]\n");
        return 2;
    }
    plain = argc > 2 && strcmp(argv[2], "plain") == 0;
    denied_mode = argc > 3 && strcmp(argv[2], "denied") == 0;
    loop = uv_default_loop();
    if (nats_connect(&pub, denied_mode ? argv[3] : argv[1], "fb-pub") ||
        nats_connect(&l1, argv[1], "fb-l1") || nats_connect(&l2, argv[1], "fb-l2") ||
        nats_connect(&f, argv[1], "fb-any"))
        return 2;
    kvr_err err = {0};
    kvr_nats_sub *sf;
    if (kvr_nats_subscribe(&l1, "t.lead", "ql", on_msg, &l1, &sub_l1, &err) != 0 ||
        kvr_nats_subscribe(&f, "t.any", "qa", on_msg, &f, &sf, &err) != 0) {
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
