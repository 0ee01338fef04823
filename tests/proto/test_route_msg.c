/* proto/route_msg: our encoder against golden vectors written by another encoder
 * (python3-msgpack, gen_route_golden.py), our decoder on them, and every bound it enforces. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdbool.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvr_mp.h"
#include "route_msg.h"

static const uint8_t RID[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

static kvr_slice S(const char *s)
{
    return (kvr_slice){s, strlen(s)};
}

/* Reads golden/<name>.msgpack into out (caller frees out->base via kvr_buf_free). */
static void golden(const char *name, kvr_buf *out)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s.msgpack", KVR_GOLDEN_DIR, name);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    char chunk[4096];
    size_t n;
    kvr_buf_init(out);
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        assert_int_equal(kvr_buf_append(out, chunk, n), 0);
    fclose(f);
}

static void assert_same_bytes(const kvr_buf *ours, const char *name)
{
    kvr_buf g;
    golden(name, &g);
    assert_int_equal(ours->len, g.len);
    assert_memory_equal(ours->base, g.base, g.len);
    kvr_buf_free(&g);
}

static void assert_slice(kvr_slice s, const char *want)
{
    assert_int_equal(s.len, strlen(want));
    assert_memory_equal(s.base, want, s.len);
}

static const kvr_route_req_limits LIM = {.max_tokens = UINT32_MAX, .max_hashes = 64};

static void test_request_golden(void **state)
{
    (void)state;
    uint64_t hs[3] = {1, UINT64_MAX, 77};
    kvr_route_req rq = {.frontend_id = 9,
                        .model = S("m"),
                        .ns = S("ns"),
                        .tokens = 200,
                        .seq_hashes = hs,
                        .n_hashes = 3};
    memcpy(rq.request_id, RID, 16);
    kvr_buf b;
    kvr_buf_init(&b);
    assert_int_equal(kvr_route_req_encode(&b, &rq), 0);
    assert_same_bytes(&b, "req_basic");
    assert_memory_equal(b.base + KVR_ROUTE_REQ_ID_OFFSET, RID, 16);

    uint64_t hs2[5] = {1ull << 63, 0, 65535, 65536, 1ull << 32};
    kvr_route_req r2 = {.frontend_id = 1ull << 40,
                        .model = S("Qwen/Qwen3-8B"),
                        .ns = S("prod"),
                        .role = S("prefill"),
                        .tokens = UINT32_MAX,
                        .seq_hashes = hs2,
                        .n_hashes = 5};
    memcpy(r2.request_id, RID, 16);
    kvr_buf_reset(&b);
    assert_int_equal(kvr_route_req_encode(&b, &r2), 0);
    assert_same_bytes(&b, "req_role");

    kvr_route_req r3 = {.model = S("m"), .ns = S("")};
    memcpy(r3.request_id, RID, 16);
    kvr_buf_reset(&b);
    assert_int_equal(kvr_route_req_encode(&b, &r3), 0);
    assert_same_bytes(&b, "req_no_hashes");
    kvr_buf_free(&b);
}

static void test_request_decode(void **state)
{
    (void)state;
    const char *names[] = {"req_basic", "req_role", "req_no_hashes", "req_unknown_key"};
    for (size_t i = 0; i < 4; i++) {
        kvr_buf g;
        golden(names[i], &g);
        uint64_t hb[64];
        kvr_route_req rq;
        kvr_err err = {0};
        assert_int_equal(kvr_route_req_decode(g.base, g.len, &LIM, hb, &rq, &err), 0);
        assert_memory_equal(rq.request_id, RID, 16);
        if (i == 0) {
            assert_int_equal(rq.frontend_id, 9);
            assert_slice(rq.model, "m");
            assert_slice(rq.ns, "ns");
            assert_int_equal(rq.role.len, 0);
            assert_int_equal(rq.tokens, 200);
            assert_int_equal(rq.n_hashes, 3);
            assert_true(rq.seq_hashes[1] == UINT64_MAX);
        } else if (i == 1) {
            assert_slice(rq.role, "prefill");
            assert_true(rq.frontend_id == 1ull << 40);
            assert_int_equal(rq.tokens, UINT32_MAX);
            assert_true(rq.seq_hashes[0] == 1ull << 63 && rq.seq_hashes[4] == 1ull << 32);
        } else if (i == 2) {
            assert_int_equal(rq.n_hashes, 0);
            assert_int_equal(rq.ns.len, 0);
        } else {
            assert_int_equal(rq.n_hashes, 1);
            assert_int_equal(rq.seq_hashes[0], 5);
        }
        /* every proper prefix is refused, never read past */
        for (size_t cut = 0; cut < g.len; cut++)
            assert_true(kvr_route_req_decode(g.base, cut, &LIM, hb, &rq, NULL) < 0);
        kvr_buf_free(&g);
    }
}

/* Builds a request with one field replaced by a raw value. */
static void req_with(kvr_buf *b, const char *key, int (*write)(kvr_buf *, const void *),
                     const void *arg)
{
    const char *keys[] = {"request_id", "frontend_id", "model",
                          "namespace",  "tokens",      "seq_hashes"};
    bool extra = true; /* a key outside the 6 required ones is appended as a 7th */
    for (size_t i = 0; i < 6; i++)
        extra = extra && strcmp(keys[i], key) != 0;
    kvr_buf_reset(b);
    kvr_mp_write_map(b, extra ? 7 : 6);
    if (extra) {
        kvr_mp_write_cstr(b, key);
        write(b, arg);
    }
    for (size_t i = 0; i < 6; i++) {
        kvr_mp_write_cstr(b, keys[i]);
        if (strcmp(keys[i], key) == 0) {
            write(b, arg);
        } else if (i == 0) {
            kvr_mp_write_bin(b, RID, 16);
        } else if (i == 1 || i == 4) {
            kvr_mp_write_uint(b, 1);
        } else if (i == 5) {
            kvr_mp_write_array(b, 0);
        } else {
            kvr_mp_write_cstr(b, "x");
        }
    }
}

static int w_bin15(kvr_buf *b, const void *a)
{
    (void)a;
    return kvr_mp_write_bin(b, RID, 15);
}
static int w_uint(kvr_buf *b, const void *a)
{
    return kvr_mp_write_uint(b, *(const uint64_t *)a);
}
static int w_str(kvr_buf *b, const void *a)
{
    return kvr_mp_write_cstr(b, a);
}
static int w_hashes(kvr_buf *b, const void *a)
{
    uint32_t n = *(const uint32_t *)a;
    int rc = kvr_mp_write_array(b, n);
    for (uint32_t i = 0; i < n && !rc; i++)
        rc = kvr_mp_write_uint(b, i);
    return rc;
}
static int w_nil(kvr_buf *b, const void *a)
{
    (void)a;
    return kvr_mp_write_nil(b);
}

static void expect_refused(kvr_buf *b, int code, const char *in_msg)
{
    uint64_t hb[64];
    kvr_route_req rq;
    kvr_err err = {0};
    kvr_route_req_limits lim = {.max_tokens = 1000, .max_hashes = 64};
    assert_int_equal(kvr_route_req_decode(b->base, b->len, &lim, hb, &rq, &err), code);
    if (!strstr(err.msg, in_msg))
        fail_msg("error \"%s\" does not name \"%s\"", err.msg, in_msg);
}

static void test_request_bounds(void **state)
{
    (void)state;
    kvr_buf b;
    kvr_buf_init(&b);
    req_with(&b, "request_id", w_bin15, NULL);
    expect_refused(&b, KVR_EINVAL, "request_id");
    uint64_t big = 1001;
    req_with(&b, "tokens", w_uint, &big);
    expect_refused(&b, KVR_ELIMIT, "tokens");
    uint64_t huge = 1ull << 40; /* near 2^32 and above: never truncated into a small count */
    req_with(&b, "tokens", w_uint, &huge);
    expect_refused(&b, KVR_ELIMIT, "tokens");
    uint32_t n65 = 65;
    req_with(&b, "seq_hashes", w_hashes, &n65);
    expect_refused(&b, KVR_ELIMIT, "seq_hashes");
    char name[200];
    memset(name, 'a', sizeof name - 1);
    name[sizeof name - 1] = '\0';
    req_with(&b, "model", w_str, name);
    expect_refused(&b, KVR_ELIMIT, "model");
    req_with(&b, "namespace", w_str, name);
    expect_refused(&b, KVR_ELIMIT, "namespace");
    req_with(&b, "model", w_str, "");
    expect_refused(&b, KVR_EINVAL, "missing model");
    req_with(&b, "frontend_id", w_nil, NULL);
    expect_refused(&b, KVR_ETYPE, "frontend_id");
    /* trailing bytes after the map */
    req_with(&b, "tokens", w_uint, &(uint64_t){5});
    kvr_mp_write_nil(&b);
    expect_refused(&b, KVR_EINVAL, "trailing");
    /* not a map at all */
    kvr_buf_reset(&b);
    kvr_mp_write_array(&b, 0);
    expect_refused(&b, KVR_ETYPE, "not a msgpack map");
    /* the encoder refuses what the decoder would */
    kvr_route_req rq = {.model = {name, 199}};
    assert_int_equal(kvr_route_req_encode(&b, &rq), KVR_EINVAL);
    kvr_buf_free(&b);
}

/* "lora" and "mdc_sum": optional, after the hashes (the id offset is unchanged), absent when
 * empty (the old encoding), bounded, and other strings' types refused. */
static void test_request_lora_mdc(void **state)
{
    (void)state;
    uint64_t hs[2] = {11, 22};
    kvr_route_req rq = {.frontend_id = 5,
                        .model = S("m"),
                        .ns = S("ns"),
                        .tokens = 40,
                        .seq_hashes = hs,
                        .n_hashes = 2};
    memcpy(rq.request_id, RID, 16);
    kvr_buf plain, b;
    kvr_buf_init(&plain);
    kvr_buf_init(&b);
    assert_int_equal(kvr_route_req_encode(&plain, &rq), 0);
    rq.lora = S("sql-lora");
    rq.mdc_sum = S("0123abcd");
    assert_int_equal(kvr_route_req_encode(&b, &rq), 0);
    assert_memory_equal(b.base + KVR_ROUTE_REQ_ID_OFFSET, RID, 16);
    uint64_t hb[64];
    kvr_route_req o;
    kvr_err err = {0};
    assert_int_equal(kvr_route_req_decode(b.base, b.len, &LIM, hb, &o, &err), 0);
    assert_slice(o.lora, "sql-lora");
    assert_slice(o.mdc_sum, "0123abcd");
    assert_int_equal(o.n_hashes, 2);
    assert_int_equal(kvr_route_req_decode(plain.base, plain.len, &LIM, hb, &o, &err), 0);
    assert_int_equal(o.lora.len, 0);
    assert_int_equal(o.mdc_sum.len, 0);
    /* plain is a prefix of b except the map header: the new keys only extend the message */
    assert_int_equal((uint8_t)b.base[0], (uint8_t)plain.base[0] + 2);
    assert_memory_equal(b.base + 1, plain.base + 1, plain.len - 1);
    char name[200];
    memset(name, 'a', sizeof name - 1);
    name[sizeof name - 1] = '\0';
    req_with(&b, "lora", w_str, name);
    expect_refused(&b, KVR_ELIMIT, "lora");
    req_with(&b, "mdc_sum", w_str, name);
    expect_refused(&b, KVR_ELIMIT, "mdc_sum");
    req_with(&b, "lora", w_nil, NULL);
    expect_refused(&b, KVR_ETYPE, "lora");
    rq.lora = (kvr_slice){name, 199};
    kvr_buf_reset(&b);
    assert_int_equal(kvr_route_req_encode(&b, &rq), KVR_EINVAL);
    kvr_buf_free(&plain);
    kvr_buf_free(&b);
}

static void test_reply_golden(void **state)
{
    (void)state;
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_route_reply ok = {.ok = true,
                          .worker_id = 3,
                          .url = S("http://127.0.0.1:9003"),
                          .overlap_blocks = 2,
                          .router_id = 1,
                          .mode = S("raft")};
    assert_int_equal(kvr_route_reply_encode(&b, &ok), 0);
    assert_same_bytes(&b, "reply_ok");
    kvr_route_reply view = {.ok = true,
                            .worker_id = UINT64_MAX,
                            .url = S("http://10.0.0.7:8000"),
                            .router_id = 3,
                            .mode = S("local"),
                            .has_view = true,
                            .worker_bookings = 4,
                            .decided_ns = 123456789012ull};
    kvr_buf_reset(&b);
    assert_int_equal(kvr_route_reply_encode(&b, &view), 0);
    assert_same_bytes(&b, "reply_local_view");
    kvr_route_reply best = ok;
    best.best_overlap_blocks = 7;
    kvr_buf_reset(&b);
    assert_int_equal(kvr_route_reply_encode(&b, &best), 0);
    assert_same_bytes(&b, "reply_best");
    kvr_route_reply rem = {.ok = true,
                           .worker_id = 4,
                           .url = S("http://127.0.0.1:9004"),
                           .router_id = 2,
                           .mode = S("raft"),
                           .disagg = S("remote"),
                           .prefill_worker_id = (1ull << 40) + 1,
                           .prefill_url = S("http://127.0.0.1:9001")};
    kvr_buf_reset(&b);
    assert_int_equal(kvr_route_reply_encode(&b, &rem), 0);
    assert_same_bytes(&b, "reply_disagg_remote");
    kvr_route_reply loc = rem;
    loc.disagg = S("local");
    loc.overlap_blocks = 3;
    loc.prefill_worker_id = 0;
    loc.prefill_url = (kvr_slice){0};
    kvr_buf_reset(&b);
    assert_int_equal(kvr_route_reply_encode(&b, &loc), 0);
    assert_same_bytes(&b, "reply_disagg_local");
    kvr_route_reply bad_rem = rem;
    bad_rem.prefill_url = (kvr_slice){0};
    kvr_buf_reset(&b);
    assert_int_equal(kvr_route_reply_encode(&b, &bad_rem), KVR_EINVAL);
    kvr_route_reply no = {.error = S("no live worker for this model/namespace")};
    kvr_buf_reset(&b);
    assert_int_equal(kvr_route_reply_encode(&b, &no), 0);
    assert_same_bytes(&b, "reply_error");
    kvr_route_reply waking = {.error = S("pool waking"), .pool_waking = true,
                              .retry_after_ms = 250};
    kvr_buf_reset(&b);
    assert_int_equal(kvr_route_reply_encode(&b, &waking), 0);
    assert_same_bytes(&b, "reply_waking");

    kvr_route_reply r;
    kvr_buf g;
    golden("reply_local_view", &g);
    assert_int_equal(kvr_route_reply_decode(g.base, g.len, &r, NULL), 0);
    assert_true(r.ok && r.has_view && r.worker_bookings == 4 && r.decided_ns == 123456789012ull);
    assert_true(r.worker_id == UINT64_MAX);
    assert_slice(r.url, "http://10.0.0.7:8000");
    assert_slice(r.mode, "local");
    for (size_t cut = 0; cut < g.len; cut++)
        assert_true(kvr_route_reply_decode(g.base, cut, &r, NULL) < 0);
    kvr_buf_free(&g);
    golden("reply_ok", &g); /* no best_overlap_blocks: read as overlap_blocks */
    assert_int_equal(kvr_route_reply_decode(g.base, g.len, &r, NULL), 0);
    assert_true(r.overlap_blocks == 2 && r.best_overlap_blocks == 2);
    kvr_buf_free(&g);
    golden("reply_best", &g);
    assert_int_equal(kvr_route_reply_decode(g.base, g.len, &r, NULL), 0);
    assert_true(r.overlap_blocks == 2 && r.best_overlap_blocks == 7);
    kvr_buf_free(&g);
    golden("reply_disagg_remote", &g);
    assert_int_equal(kvr_route_reply_decode(g.base, g.len, &r, NULL), 0);
    assert_slice(r.disagg, "remote");
    assert_true(r.prefill_worker_id == (1ull << 40) + 1 && r.worker_id == 4);
    assert_slice(r.prefill_url, "http://127.0.0.1:9001");
    kvr_buf_free(&g);
    golden("reply_disagg_local", &g);
    assert_int_equal(kvr_route_reply_decode(g.base, g.len, &r, NULL), 0);
    assert_slice(r.disagg, "local");
    assert_true(r.prefill_worker_id == 0 && r.prefill_url.len == 0);
    kvr_buf_free(&g);
    golden("reply_ok", &g);
    assert_int_equal(kvr_route_reply_decode(g.base, g.len, &r, NULL), 0);
    assert_int_equal(r.disagg.len, 0);
    kvr_buf_free(&g);
    golden("reply_error", &g);
    assert_int_equal(kvr_route_reply_decode(g.base, g.len, &r, NULL), 0);
    assert_false(r.ok);
    assert_slice(r.error, "no live worker for this model/namespace");
    assert_false(r.pool_waking);
    kvr_buf_free(&g);
    golden("reply_waking", &g);
    assert_int_equal(kvr_route_reply_decode(g.base, g.len, &r, NULL), 0);
    assert_true(!r.ok && r.pool_waking && r.retry_after_ms == 250);
    assert_slice(r.error, "pool waking");
    kvr_buf_free(&g);

    /* an ok reply without a url is refused; an empty url cannot be encoded */
    kvr_buf_reset(&b);
    kvr_mp_write_map(&b, 2);
    kvr_mp_write_cstr(&b, "ok");
    kvr_mp_write_bool(&b, true);
    kvr_mp_write_cstr(&b, "worker_id");
    kvr_mp_write_uint(&b, 1);
    kvr_err err = {0};
    assert_int_equal(kvr_route_reply_decode(b.base, b.len, &r, &err), KVR_EINVAL);
    kvr_route_reply bad = {.ok = true, .worker_id = 1, .mode = S("raft")};
    assert_int_equal(kvr_route_reply_encode(&b, &bad), KVR_EINVAL);
    /* a long error text from a peer is cut to the bound, not refused */
    char longerr[600];
    memset(longerr, 'e', sizeof longerr - 1);
    longerr[sizeof longerr - 1] = '\0';
    kvr_buf_reset(&b);
    kvr_mp_write_map(&b, 2);
    kvr_mp_write_cstr(&b, "ok");
    kvr_mp_write_bool(&b, false);
    kvr_mp_write_cstr(&b, "error");
    kvr_mp_write_cstr(&b, longerr);
    assert_int_equal(kvr_route_reply_decode(b.base, b.len, &r, NULL), 0);
    assert_int_equal(r.error.len, KVR_ROUTE_ERROR_MAX);
    kvr_buf_free(&b);
}

static void test_event_golden(void **state)
{
    (void)state;
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_route_event ev = {.type = KVR_ROUTE_EVENT_FREE};
    memcpy(ev.request_id, RID, 16);
    assert_int_equal(kvr_route_event_encode(&b, &ev), 0);
    assert_same_bytes(&b, "event_free");
    ev.type = KVR_ROUTE_EVENT_PREFILL_DONE;
    kvr_buf_reset(&b);
    assert_int_equal(kvr_route_event_encode(&b, &ev), 0);
    assert_same_bytes(&b, "event_prefill_done");
    kvr_route_event d;
    assert_int_equal(kvr_route_event_decode(b.base, b.len, &d, NULL), 0);
    assert_int_equal(d.type, KVR_ROUTE_EVENT_PREFILL_DONE);
    assert_memory_equal(d.request_id, RID, 16);
    for (size_t cut = 0; cut < b.len; cut++)
        assert_true(kvr_route_event_decode(b.base, cut, &d, NULL) < 0);
    /* relayed by a router without quorum: a third key, only when true */
    ev.type = KVR_ROUTE_EVENT_FREE;
    ev.relayed = true;
    kvr_buf_reset(&b);
    assert_int_equal(kvr_route_event_encode(&b, &ev), 0);
    assert_same_bytes(&b, "event_free_relayed");
    assert_int_equal(kvr_route_event_decode(b.base, b.len, &d, NULL), 0);
    assert_true(d.relayed);
    ev.relayed = false;
    /* unknown event names and types are refused both ways */
    kvr_buf_reset(&b);
    kvr_mp_write_map(&b, 2);
    kvr_mp_write_cstr(&b, "request_id");
    kvr_mp_write_bin(&b, RID, 16);
    kvr_mp_write_cstr(&b, "event");
    kvr_mp_write_cstr(&b, "explode");
    kvr_err err = {0};
    assert_int_equal(kvr_route_event_decode(b.base, b.len, &d, &err), KVR_EINVAL);
    assert_non_null(strstr(err.msg, "explode"));
    ev.type = (kvr_route_event_type)9;
    assert_int_equal(kvr_route_event_encode(&b, &ev), KVR_EINVAL);
    kvr_buf_free(&b);
}

/* Where a client sends requests and events: the leader's subjects first, kvr.route and
 * kvr.route.event for 500 ms after the leader's subject had no responders, and always with
 * leader_first off. */
static void test_route_target(void **state)
{
    (void)state;
    kvr_route_target t = {.leader_first = true};
    assert_string_equal(kvr_route_target_subject(&t, 1, 1000), KVR_ROUTE_LEADER_SUBJECT);
    assert_string_equal(kvr_route_target_subject(&t, 2, 1000), KVR_ROUTE_SUBJECT);
    assert_true(kvr_route_target_events_to_leader(&t, 1000));
    assert_false(kvr_route_target_no_responders(&t, KVR_ROUTE_SUBJECT, 1000));
    assert_true(kvr_route_target_events_to_leader(&t, 1000));
    assert_true(kvr_route_target_no_responders(&t, KVR_ROUTE_LEADER_SUBJECT, 1000));
    assert_string_equal(kvr_route_target_subject(&t, 1, 1499), KVR_ROUTE_SUBJECT);
    assert_false(kvr_route_target_events_to_leader(&t, 1499));
    assert_string_equal(kvr_route_target_subject(&t, 1, 1500), KVR_ROUTE_LEADER_SUBJECT);
    assert_true(kvr_route_target_events_to_leader(&t, 1500));
    kvr_route_target off = {.leader_first = false};
    assert_string_equal(kvr_route_target_subject(&off, 1, 1000), KVR_ROUTE_SUBJECT);
    assert_false(kvr_route_target_events_to_leader(&off, 1000));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_request_golden), cmocka_unit_test(test_request_decode),
        cmocka_unit_test(test_request_bounds), cmocka_unit_test(test_reply_golden),
        cmocka_unit_test(test_event_golden),   cmocka_unit_test(test_request_lora_mdc),
        cmocka_unit_test(test_route_target),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
