/* kvr_nats against a real nats-server -js (URL in argv[1], started by test_nats.sh).
 * Every check runs on one libuv loop; callbacks must arrive on the loop thread. */
#include "kvr_log.h"
#include "kvr_nats.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failures;
#define CHECK(c, ...)                                                                              \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #c);                            \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

static uv_loop_t loop;
static pthread_t loop_thread;
static kvr_nats kn, kn2;

/* Runs the loop until *flag or timeout_ms. */
static bool run_until(volatile bool *flag, int timeout_ms)
{
    int64_t end = kvr_mono_ms() + timeout_ms;
    while (!*flag && kvr_mono_ms() < end)
        uv_run(&loop, UV_RUN_ONCE);
    return *flag;
}

static void noop_timer(uv_timer_t *t) {}

/* ---- pub/sub ---- */
static int got_msgs;
static bool got_done;
static char last_subject[128];
static bool wrong_thread;

static void on_msg(const kvr_nats_msg *m, void *data)
{
    if (!pthread_equal(pthread_self(), loop_thread))
        wrong_thread = true;
    got_msgs++;
    snprintf(last_subject, sizeof(last_subject), "%s", m->subject);
    if (got_msgs == *(int *)data)
        got_done = true;
}

/* ---- request/reply ---- */
static void on_request_self(const kvr_nats_msg *m, void *data)
{
    kvr_nats_respond(&kn, m->reply, "ok", 2);
}

static char last_reply_subject[256];
static void on_request(const kvr_nats_msg *m, void *data)
{
    snprintf(last_reply_subject, sizeof last_reply_subject, "%s", m->reply ? m->reply : "");
    char buf[256];
    int n = snprintf(buf, sizeof(buf), "echo:%.*s", (int)m->len, m->data);
    kvr_nats_respond(&kn2, m->reply, buf, (size_t)n);
}

typedef struct {
    bool done;
    int status;
    char reply[256];
    int calls;
} req_result;

static void on_reply(int status, const char *data, size_t len, void *cbdata)
{
    req_result *r = cbdata;
    if (!pthread_equal(pthread_self(), loop_thread))
        wrong_thread = true;
    r->calls++;
    r->done = true;
    r->status = status;
    if (status == 0)
        snprintf(r->reply, sizeof(r->reply), "%.*s", (int)len, data);
}

/* ---- JetStream ---- */
typedef struct {
    bool done;
    int status;
    kvr_nats_stream_info info;
} stream_result;

static void on_stream(int status, const kvr_nats_stream_info *info, const char *errmsg, void *data)
{
    stream_result *r = data;
    r->done = true;
    r->status = status;
    if (info)
        r->info = *info;
    else
        fprintf(stderr, "stream op: %s\n", errmsg);
}

static uint64_t js_seqs[4096];
static int js_n;
static bool js_done;
static int js_want;
static bool js_order_ok = true;
static void on_js(const kvr_nats_msg *m, void *data)
{
    if (!pthread_equal(pthread_self(), loop_thread))
        wrong_thread = true;
    if (js_n > 0 && m->stream_seq <= js_seqs[js_n - 1])
        js_order_ok = false;
    if (js_n < 4096)
        js_seqs[js_n++] = m->stream_seq;
    if (js_n >= js_want)
        js_done = true;
}

/* the backpressure consumer: the first message holds the loop up, so the consumer's delivery
 * thread meets a full queue (8 messages) and must wait instead of dropping */
static int bp_n, bp_want;
static uint64_t bp_last;
static bool bp_done, bp_order_ok = true;
static void on_js_bp(const kvr_nats_msg *m, void *data)
{
    if (!pthread_equal(pthread_self(), loop_thread))
        wrong_thread = true;
    if (bp_n == 0)
        usleep(300 * 1000);
    if (m->stream_seq <= bp_last)
        bp_order_ok = false;
    bp_last = m->stream_seq;
    if (++bp_n >= bp_want)
        bp_done = true;
}

static bool closed1, closed2;
static void on_closed(kvr_nats *k)
{
    if (k == &kn)
        closed1 = true;
    else
        closed2 = true;
}

static bool connected;
static void on_state(kvr_nats *k, kvr_nats_state st, void *data)
{
    if (st == KVR_NATS_CONNECTED)
        connected = true;
}

/* The status of a JetStream call about a stream that does not exist: KVR_ENOTFOUND is the
 * server's answer; no connection gives KVR_ECLOSED (cnats gave up on refused credentials),
 * KVR_EAGAIN or KVR_ETIMEDOUT. */
static bool js_answered(int status)
{
    return status == KVR_ENOTFOUND;
}

/* Authentication check, on both connections a kvr_nats makes with the same credentials: the
 * core one (kvroute's client) and the JetStream one (cnats). "connect": the core connection
 * reaches a connected state and answers a request through itself, and a JetStream call gets
 * the server's answer; "noconnect": neither connects (within 2 s for the core one; the
 * JetStream call gets no answer within its 5 s wait), the server refusing the credentials.
 * opts: "user=NAME:PASS", "token=T" (credentials as options, not in the URL), "nkey=FILE",
 * "creds=FILE", "ca=FILE", "cert=FILE", "key=FILE" (TLS). */
static int auth_check(const char *url, bool want_connect, int nopt, char **opts)
{
    kvr_log_setup("test_nats_auth", NULL, KVR_LOG_WARN);
    uv_loop_init(&loop);
    loop_thread = pthread_self();
    uv_timer_t tick;
    uv_timer_init(&loop, &tick);
    uv_timer_start(&tick, noop_timer, 10, 10);
    char user[64] = "", *pass = NULL;
    kvr_nats_opts o = {.url = url, .name = "test-nats-auth", .on_state = on_state};
    for (int i = 0; i < nopt; i++) {
        const char *a = opts[i];
        if (!strncmp(a, "user=", 5)) {
            snprintf(user, sizeof user, "%s", a + 5);
            pass = strchr(user, ':');
            if (pass)
                *pass++ = 0;
            o.user = user;
            o.password = pass;
        } else if (!strncmp(a, "token=", 6)) {
            o.token = a + 6;
        } else if (!strncmp(a, "nkey=", 5))
            o.nkey_seed_file = a + 5;
        else if (!strncmp(a, "creds=", 6))
            o.creds_file = a + 6;
        else if (!strncmp(a, "ca=", 3))
            o.tls_ca_file = a + 3;
        else if (!strncmp(a, "cert=", 5))
            o.tls_cert_file = a + 5;
        else if (!strncmp(a, "key=", 4))
            o.tls_key_file = a + 4;
    }
    kvr_err err = {0};
    if (!want_connect && kvr_nats_init(&kn, &loop, &o, &err) != 0) {
        /* cnats closes for good on an authentication error: refused is refused */
        fprintf(stderr, "test_nats auth (noconnect): refused at init: %s\n", err.msg);
        return 0;
    }
    CHECK(want_connect || kn.impl, "init");
    if (want_connect)
        CHECK(kvr_nats_init(&kn, &loop, &o, &err) == 0, "%s", err.msg);
    stream_result js = {0};
    if (!want_connect)
        CHECK(kvr_nats_js_stream_info(&kn, "T_AUTH_NONE", on_stream, &js) == 0, "stream info");
    bool up = run_until(&connected, want_connect ? 5000 : 2000);
    if (want_connect) {
        CHECK(up, "not connected to %s", url);
        CHECK(kvr_nats_subscribe(&kn, "t.auth", NULL, on_request_self, NULL, NULL, &err) == 0, "%s", err.msg);
        req_result r = {0};
        CHECK(kvr_nats_request(&kn, "t.auth", "x", 1, 3000, on_reply, &r) == 0, "request");
        CHECK(run_until(&r.done, 4000) && r.status == 0, "request through an authenticated connection: %d", r.status);
        /* the JetStream connection may still be on its way up: asked again until it answers */
        int64_t end = kvr_mono_ms() + 8000;
        do {
            js = (stream_result){0};
            CHECK(kvr_nats_js_stream_info(&kn, "T_AUTH_NONE", on_stream, &js) == 0, "stream info");
            CHECK(run_until(&js.done, 7000), "stream info callback");
            bool never = false;
            if (!js_answered(js.status))
                run_until(&never, 100);
        } while ((js.status == KVR_EAGAIN || js.status == KVR_ETIMEDOUT) &&
                 kvr_mono_ms() < end);
        CHECK(js_answered(js.status), "no JetStream answer through %s: %d", url, js.status);
    } else {
        CHECK(!up, "connected to %s with credentials the server refuses", url);
        CHECK(run_until(&js.done, 7000), "stream info callback");
        CHECK(!js_answered(js.status), "JetStream answered (%d) with credentials the server refuses",
              js.status);
    }
    fprintf(stderr, "test_nats auth: jetstream stream info status %d\n", js.status);
    kvr_nats_close(&kn, on_closed);
    int64_t end = kvr_mono_ms() + 10000;
    while (!closed1 && kvr_mono_ms() < end)
        uv_run(&loop, UV_RUN_ONCE);
    CHECK(closed1, "close callback");
    uv_close((uv_handle_t *)&tick, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0, "loop has open handles");
    kvr_nats_global_shutdown(2000);
    if (failures)
        return 1;
    fprintf(stderr, "test_nats auth (%s%s%s): passed\n", want_connect ? "connect" : "noconnect",
            nopt ? ", " : "", nopt ? opts[nopt - 1] : "");
    return 0;
}

static bool reconnected;
static void on_state_rc(kvr_nats *k, kvr_nats_state st, void *data)
{
    if (st == KVR_NATS_CONNECTED)
        connected = true;
    if (st == KVR_NATS_RECONNECTED)
        reconnected = true;
}

/* "discover": given only server A's URL, connect, learn the cluster's other servers from INFO
 * connect_urls (logged "nats server discovered"), and once the test kills A, reconnect to one
 * of them and answer a request through it. */
static int discover_check(const char *url)
{
    kvr_log_setup("test_nats_discover", NULL, KVR_LOG_INFO);
    uv_loop_init(&loop);
    loop_thread = pthread_self();
    uv_timer_t tick;
    uv_timer_init(&loop, &tick);
    uv_timer_start(&tick, noop_timer, 10, 10);
    kvr_nats_opts o = {.url = url, .name = "test-nats-discover", .on_state = on_state_rc};
    kvr_err err = {0};
    CHECK(kvr_nats_init(&kn, &loop, &o, &err) == 0, "%s", err.msg);
    CHECK(run_until(&connected, 5000), "not connected to %s", url);
    CHECK(run_until(&reconnected, 30000), "no reconnect to a discovered server");
    CHECK(kvr_nats_subscribe(&kn, "t.disc", NULL, on_request_self, NULL, NULL, &err) == 0, "%s",
          err.msg);
    req_result r = {0};
    CHECK(kvr_nats_request(&kn, "t.disc", "x", 1, 3000, on_reply, &r) == 0, "request");
    CHECK(run_until(&r.done, 4000) && r.status == 0, "request after failover: %d", r.status);
    kvr_nats_close(&kn, on_closed);
    int64_t end = kvr_mono_ms() + 10000;
    while (!closed1 && kvr_mono_ms() < end)
        uv_run(&loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&tick, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    kvr_nats_global_shutdown(2000);
    if (failures)
        return 1;
    fprintf(stderr, "test_nats discover: passed\n");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 2 && !strcmp(argv[2], "discover"))
        return discover_check(argv[1]);
    if (argc > 2 && (!strcmp(argv[2], "connect") || !strcmp(argv[2], "noconnect")))
        return auth_check(argv[1], !strcmp(argv[2], "connect"), argc - 3, argv + 3);
    if (argc != 2) {
        fprintf(stderr, "usage: test_nats NATS_URL [discover | connect|noconnect OPTS...]\n");
        return 2;
    }
    kvr_log_setup("test_nats", NULL, KVR_LOG_INFO);
    uv_loop_init(&loop);
    loop_thread = pthread_self();
    uv_timer_t tick; /* keeps uv_run(ONCE) from returning at once when idle */
    uv_timer_init(&loop, &tick);
    uv_timer_start(&tick, noop_timer, 10, 10);

    kvr_err err = {0};
    /* 0. inbox prefixes: a role's names (deploy/nats/kvr-nats-auth.sh allows each role its
     * own), and a prefix that is no subject is refused before anything connects */
    char ib[KVR_NATS_INBOX_PREFIX_MAX + 1];
    CHECK(kvr_nats_role_inbox(ib, sizeof ib, "worker", "default", 3) &&
              !strcmp(ib, "_INBOX.worker.default.3"),
          "worker inbox");
    CHECK(kvr_nats_role_inbox(ib, sizeof ib, "frontend", NULL, 5) &&
              !strcmp(ib, "_INBOX.frontend.5"),
          "frontend inbox");
    CHECK(kvr_nats_role_inbox(ib, sizeof ib, "router", NULL, 0) && !strcmp(ib, "_INBOX.router"),
          "router inbox");
    CHECK(!kvr_nats_role_inbox(ib, sizeof ib, "worker", "a.b", 3), "namespace with a dot");
    CHECK(!kvr_nats_role_inbox(ib, sizeof ib, "worker", "a>", 3), "namespace with a wildcard");
    CHECK(!kvr_nats_role_inbox(ib, 12, "worker", "default", 3), "truncated");
    char longp[KVR_NATS_INBOX_PREFIX_MAX + 2];
    memset(longp, 'a', sizeof longp - 1);
    longp[sizeof longp - 1] = 0;
    const char *bad[] = {"",         "_INBOX.", ".x",       "_INBOX..x", "_INBOX.>",
                         "_INBOX.*", "a b",     "a\r\nPUB", longp};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kvr_nats_opts ob = {.url = argv[1], .inbox_prefix = bad[i]};
        kvr_nats kb = {0};
        CHECK(kvr_nats_init(&kb, &loop, &ob, &err) == KVR_EINVAL && !kb.impl,
              "inbox prefix %zu accepted", i);
    }
    /* kn asks under a frontend's prefix: the replies in step 2 (core) and the JetStream API
     * answers (cnats' connection) reach it there */
    kvr_nats_opts o = {.url = argv[1],
                       .name = "test-nats",
                       .on_state = on_state,
                       .queue_max_msgs = 8 /* JetStream backpressure, section 3 */,
                       .inbox_prefix = "_INBOX.frontend.42"};
    CHECK(kvr_nats_init(&kn, &loop, &o, &err) == 0, "%s", err.msg);
    kvr_nats_opts o2 = {.url = argv[1], .name = "test-nats-2"};
    CHECK(kvr_nats_init(&kn2, &loop, &o2, &err) == 0, "%s", err.msg);
    CHECK(run_until(&connected, 5000), "state callback connected");

    /* 1. pub/sub: 5000 messages, none lost (the core client delivers in its read callback and
     * TCP holds the sender back) */
    int want = 5000;
    kvr_nats_sub *sub = NULL;
    CHECK(kvr_nats_subscribe(&kn, "t.ps.*", NULL, on_msg, &want, &sub, &err) == 0, "%s", err.msg);
    /* make sure the SUB reached the server before publishing from the other connection */
    req_result warm = {0};
    kvr_nats_request(&kn, "t.nobody", "x", 1, 1000, on_reply, &warm);
    run_until(&warm.done, 2000);
    for (int i = 0; i < want; i++) {
        char s[64];
        snprintf(s, sizeof(s), "t.ps.%d", i);
        CHECK(kvr_nats_publish(&kn2, s, "hello", 5) == 0, "publish %d", i);
    }
    CHECK(run_until(&got_done, 10000), "got %d of %d", got_msgs, want);
    CHECK(strcmp(last_subject, "t.ps.4999") == 0, "last subject %s", last_subject);
    kvr_nats_unsubscribe(sub);
    /* after unsubscribe nothing more arrives */
    int before = got_msgs;
    kvr_nats_publish(&kn2, "t.ps.after", "x", 1);
    req_result fl = {0};
    kvr_nats_request(&kn2, "t.nobody", "x", 1, 1000, on_reply, &fl);
    run_until(&fl.done, 2000);
    kvr_nats_request(&kn, "t.nobody", "x", 1, 1000, on_reply, &warm);
    uv_timer_t pause;
    uv_timer_init(&loop, &pause);
    uv_timer_start(&pause, noop_timer, 100, 0);
    bool never_set = false;
    run_until(&never_set, 150);
    uv_close((uv_handle_t *)&pause, NULL);
    CHECK(got_msgs == before, "%d messages after unsubscribe", got_msgs - before);
    /* subjects that would break the protocol stream are refused, not sent */
    CHECK(kvr_nats_publish(&kn, "a b", "x", 1) == KVR_EINVAL, "subject with a space");
    CHECK(kvr_nats_publish(&kn, "a\r\nPUB x 1", "x", 1) == KVR_EINVAL, "subject with CRLF");
    CHECK(kvr_nats_subscribe(&kn, "a b", NULL, on_msg, &want, NULL, &err) != 0, "sub with space");
    /* a payload over the server's max_payload (8 MB in testenv.sh) is refused before it
     * costs the connection */
    static char big[(8 << 20) + 16];
    int brc = kvr_nats_publish(&kn, "t.big", big, sizeof big);
    CHECK(brc != 0, "over-size publish accepted");

    /* 2. request/reply, no responders, timeout */
    CHECK(kvr_nats_subscribe(&kn2, "t.echo", "q", on_request, NULL, NULL, &err) == 0, "%s", err.msg);
    req_result r1 = {0};
    kvr_nats_request(&kn2, "t.nobody", "x", 1, 1000, on_reply, &warm); /* flush kn2's SUB */
    req_result flush2 = {0};
    kvr_nats_request(&kn2, "t.nobody2", "x", 1, 1000, on_reply, &flush2);
    run_until(&flush2.done, 2000);
    CHECK(kvr_nats_request(&kn, "t.echo", "abc", 3, 2000, on_reply, &r1) == 0, "request");
    CHECK(!r1.done, "callback ran inside kvr_nats_request");
    CHECK(run_until(&r1.done, 3000), "reply");
    CHECK(r1.status == 0 && strcmp(r1.reply, "echo:abc") == 0, "status %d reply %s", r1.status,
          r1.reply);
    CHECK(!strncmp(last_reply_subject, "_INBOX.frontend.42.", 19), "reply subject %s",
          last_reply_subject);
    req_result r2 = {0};
    CHECK(kvr_nats_request(&kn, "t.nobody.here", "x", 1, 2000, on_reply, &r2) == 0, "request");
    CHECK(run_until(&r2.done, 3000), "no-responders reply");
    CHECK(r2.status == KVR_NATS_NO_RESPONDERS, "status %d", r2.status);
    /* a subscriber that never answers → timeout */
    int never = 1 << 30;
    CHECK(kvr_nats_subscribe(&kn2, "t.silent", NULL, on_msg, &never, NULL, &err) == 0, "%s", err.msg);
    req_result flush3 = {0};
    kvr_nats_request(&kn2, "t.nobody3", "x", 1, 1000, on_reply, &flush3);
    run_until(&flush3.done, 2000);
    req_result r3 = {0};
    int64_t t0 = kvr_mono_ms();
    CHECK(kvr_nats_request(&kn, "t.silent", "x", 1, 300, on_reply, &r3) == 0, "request");
    CHECK(run_until(&r3.done, 3000), "timeout reply");
    CHECK(r3.status == KVR_ETIMEDOUT, "status %d", r3.status);
    CHECK(kvr_mono_ms() - t0 >= 290, "timed out too early");
    CHECK(r1.calls == 1 && r2.calls == 1 && r3.calls == 1, "callbacks ran more than once");

    /* 3. JetStream: ensure stream (twice: idempotent), publish, consume from start and from 5 */
    kvr_nats_stream_cfg sc = {.name = "T_EVENTS", .subjects = "t.kv.>", .max_age_ms = 3600000,
                              .max_bytes = 64 << 20};
    stream_result s1 = {0}, s2 = {0};
    CHECK(kvr_nats_js_ensure_stream(&kn, &sc, on_stream, &s1) == 0, "ensure");
    CHECK(run_until(&s1.done, 8000) && s1.status == 0, "ensure status %d", s1.status);
    CHECK(kvr_nats_js_ensure_stream(&kn, &sc, on_stream, &s2) == 0, "ensure 2");
    CHECK(run_until(&s2.done, 8000) && s2.status == 0, "ensure 2 status %d", s2.status);
    uint64_t base = s2.info.last_seq;
    for (int i = 0; i < 20; i++) {
        char s[64];
        snprintf(s, sizeof(s), "t.kv.ns.%d", i % 3);
        kvr_nats_publish(&kn2, s, "ev", 2);
    }
    stream_result s3 = {0};
    for (int tries = 0; tries < 50 && s3.info.last_seq < base + 20; tries++) {
        s3.done = false;
        kvr_nats_js_stream_info(&kn, "T_EVENTS", on_stream, &s3);
        run_until(&s3.done, 5000);
    }
    CHECK(s3.status == 0 && s3.info.last_seq == base + 20, "last seq %" PRIu64, s3.info.last_seq);
    stream_result s4 = {0};
    kvr_nats_js_stream_info(&kn, "NO_SUCH_STREAM", on_stream, &s4);
    CHECK(run_until(&s4.done, 5000) && s4.status == KVR_ENOTFOUND, "missing stream: %d", s4.status);

    kvr_nats_consumer *c = NULL;
    js_want = 16;
    CHECK(kvr_nats_js_consume(&kn, "T_EVENTS", "t.kv.>", base + 5, on_js, NULL, &c, &err) == 0,
          "%s", err.msg);
    CHECK(run_until(&js_done, 8000), "consumed %d of 16", js_n);
    CHECK(js_n == 16 && js_seqs[0] == base + 5 && js_seqs[15] == base + 20, "n %d first %" PRIu64,
          js_n, js_seqs[0]);
    CHECK(js_order_ok, "out of order");
    CHECK(kvr_nats_consumer_last_seq(c) == base + 20, "last seq");
    /* live messages keep arriving */
    js_done = false;
    js_want = 18;
    kvr_nats_publish(&kn2, "t.kv.ns.9", "ev", 2);
    kvr_nats_publish(&kn2, "t.kv.ns.9", "ev", 2);
    CHECK(run_until(&js_done, 5000), "live: %d", js_n);
    CHECK(js_seqs[17] == base + 22, "live seq %" PRIu64, js_seqs[17]);
    kvr_nats_consumer_stop(c);

    /* JetStream backpressure: 1000 events through a queue of 8 (kn's queue_max_msgs) while the
     * loop is held up, none lost, in stream order */
    bp_want = 1000;
    for (int i = 0; i < bp_want; i++) {
        char s[64];
        snprintf(s, sizeof(s), "t.kv.bp.%d", i % 7);
        CHECK(kvr_nats_publish(&kn2, s, "event", 5) == 0, "publish %d", i);
    }
    stream_result s5 = {0};
    for (int tries = 0; tries < 50 && s5.info.last_seq < base + 22 + (uint64_t)bp_want; tries++) {
        s5.done = false;
        kvr_nats_js_stream_info(&kn, "T_EVENTS", on_stream, &s5);
        run_until(&s5.done, 5000);
    }
    CHECK(s5.info.last_seq == base + 22 + (uint64_t)bp_want, "last seq %" PRIu64,
          s5.info.last_seq);
    kvr_nats_consumer *cb = NULL;
    CHECK(kvr_nats_js_consume(&kn, "T_EVENTS", "t.kv.bp.>", 0, on_js_bp, NULL, &cb, &err) == 0,
          "%s", err.msg);
    CHECK(run_until(&bp_done, 15000), "consumed %d of %d", bp_n, bp_want);
    CHECK(bp_order_ok && bp_last == base + 22 + (uint64_t)bp_want, "order or last seq %" PRIu64,
          bp_last);
    kvr_nats_stats st;
    kvr_nats_get_stats(&kn, &st);
    fprintf(stderr, "backpressure waits: %" PRIu64 ", consumer restarts: %" PRIu64 "\n",
            st.backpressure_waits, st.consumer_restarts);
    CHECK(st.backpressure_waits > 0, "backpressure never engaged");
    kvr_nats_consumer_stop(cb);

    CHECK(!wrong_thread, "a callback ran off the loop thread");

    /* 4. close: pending request completes with KVR_ECLOSED */
    req_result r4 = {0};
    kvr_nats_request(&kn, "t.silent", "x", 1, 5000, on_reply, &r4);
    kvr_nats_close(&kn, on_closed);
    CHECK(r4.done && r4.status == KVR_ECLOSED, "pending request on close: %d", r4.status);
    kvr_nats_close(&kn2, on_closed);
    bool both = false;
    int64_t end = kvr_mono_ms() + 10000;
    while (!(closed1 && closed2) && kvr_mono_ms() < end)
        uv_run(&loop, UV_RUN_ONCE);
    both = closed1 && closed2;
    CHECK(both, "close callbacks");
    uv_close((uv_handle_t *)&tick, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0, "loop has open handles");
    kvr_nats_global_shutdown(2000);
    if (failures) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    fprintf(stderr, "test_nats: all passed\n");
    return 0;
}
