/* Unit tests: SSE parser (every split position), JSON helpers, JSON writer, flags, metrics
 * rendering (golden text). */
#define _GNU_SOURCE
#include "kvr_flags.h"
#include "kvr_json.h"
#include "kvr_metrics.h"
#include "kvr_sse.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

/* ---------------------------------------------------------------- SSE */

typedef struct collected {
    kvr_buf all; /* "event|data\n" per event */
    int n;
    int stop_after;
} collected;

static int collect(void *arg, kvr_slice ev, kvr_slice data)
{
    collected *c = arg;
    kvr_buf_appendf(&c->all, "%.*s|%.*s\n", (int)ev.len, ev.base, (int)data.len, data.base);
    c->n++;
    return (c->stop_after && c->n >= c->stop_after) ? 42 : 0;
}

static const char SSE_STREAM[] = ": comment\r\n"
                                 "data: {\"a\":1}\r\n\r\n"
                                 "event: delta\n"
                                 "data:line1\n"
                                 "data: line2\n"
                                 "id: 7\n"
                                 "\n"
                                 "data\r\r"      /* empty data field, CR line ends */
                                 "retry: 10\n\n" /* no data: no event */
                                 "data: [DONE]\n\n"
                                 "data: partial"; /* never terminated: no event */

static const char SSE_EXPECT[] = "|{\"a\":1}\n"
                                 "delta|line1\nline2\n"
                                 "|\n"
                                 "|[DONE]\n";

static void test_sse_every_split(void **state)
{
    size_t len = sizeof SSE_STREAM - 1;
    for (size_t i = 0; i <= len; i++) {
        for (size_t j = i; j <= len; j++) {
            collected c = {0};
            kvr_sse p;
            kvr_sse_init(&p, 0, 0, collect, &c);
            kvr_err err;
            assert_int_equal(kvr_sse_feed(&p, SSE_STREAM, i, &err), 0);
            assert_int_equal(kvr_sse_feed(&p, SSE_STREAM + i, j - i, &err), 0);
            assert_int_equal(kvr_sse_feed(&p, SSE_STREAM + j, len - j, &err), 0);
            kvr_buf_append(&c.all, "", 1);
            if (strcmp(c.all.base, SSE_EXPECT) != 0)
                fail_msg("split %zu/%zu gave:\n%s", i, j, c.all.base);
            kvr_buf_free(&c.all);
            kvr_sse_free(&p);
        }
    }
    /* Byte by byte. */
    collected c = {0};
    kvr_sse p;
    kvr_sse_init(&p, 0, 0, collect, &c);
    kvr_err err;
    for (size_t i = 0; i < len; i++)
        assert_int_equal(kvr_sse_feed(&p, SSE_STREAM + i, 1, &err), 0);
    kvr_buf_append(&c.all, "", 1);
    assert_string_equal(c.all.base, SSE_EXPECT);
    kvr_buf_free(&c.all);
    kvr_sse_free(&p);
}

static void test_sse_limits_and_stop(void **state)
{
    collected c = {0};
    kvr_sse p;
    kvr_err err = {0};
    kvr_sse_init(&p, 16, 25, collect, &c);
    assert_int_equal(kvr_sse_feed(&p, "data: 0123456789", 16, &err), 0);
    assert_int_equal(kvr_sse_feed(&p, "x", 1, &err), KVR_ELIMIT);
    assert_non_null(strstr(err.msg, "line longer than 16"));
    assert_int_equal(kvr_sse_feed(&p, "\n\n", 2, &err), KVR_ELIMIT); /* sticky */
    kvr_sse_reset(&p);
    /* event data over max_event, lines each short */
    const char *many = "data: 0123456789\ndata: 0123456789\ndata: 0123456789\n\n";
    assert_int_equal(kvr_sse_feed(&p, many, strlen(many), &err), KVR_ELIMIT);
    assert_non_null(strstr(err.msg, "over 25"));
    kvr_sse_reset(&p);
    /* callback stop value is returned */
    c.stop_after = 1;
    assert_int_equal(kvr_sse_feed(&p, "data: a\n\ndata: b\n\n", 18, &err), 42);
    assert_int_equal(c.n, 1);
    kvr_buf_free(&c.all);
    kvr_sse_free(&p);
}

static void test_sse_encoder_roundtrip(void **state)
{
    const char *cases[] = {"{\"x\":1}", "a\nb", "", "trailing\n", "\n\n"};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        kvr_buf out;
        kvr_buf_init(&out);
        assert_int_equal(kvr_sse_append_event(&out, cases[k], strlen(cases[k])), 0);
        collected c = {0};
        kvr_sse p;
        kvr_err err;
        kvr_sse_init(&p, 0, 0, collect, &c);
        assert_int_equal(kvr_sse_feed(&p, out.base, out.len, &err), 0);
        assert_int_equal(c.n, 1);
        kvr_buf want;
        kvr_buf_init(&want);
        kvr_buf_appendf(&want, "|%s\n", cases[k]);
        kvr_buf_append(&want, "", 1);
        kvr_buf_append(&c.all, "", 1);
        assert_string_equal(c.all.base, want.base);
        kvr_buf_free(&want);
        kvr_buf_free(&c.all);
        kvr_buf_free(&out);
        kvr_sse_free(&p);
    }
    kvr_buf out;
    kvr_buf_init(&out);
    kvr_sse_append_event(&out, "a\nb", 3);
    kvr_buf_append(&out, "", 1);
    assert_string_equal(out.base, "data: a\ndata: b\n\n");
    kvr_buf_free(&out);
}

/* ---------------------------------------------------------------- JSON */

static cJSON *parse_ok(const char *s)
{
    cJSON *j = NULL;
    kvr_err err = {0};
    int rv = kvr_json_parse(kvr_slice_of(s), 0, 0, &j, &err);
    if (rv != 0)
        fail_msg("parse %s: %s", s, err.msg);
    return j;
}

static void test_json_parse_bounds(void **state)
{
    cJSON *j = NULL;
    kvr_err err = {0};
    /* not NUL-terminated input: a slice of a larger buffer */
    const char buf[] = "{\"a\":1}GARBAGE";
    assert_int_equal(kvr_json_parse((kvr_slice){buf, 7}, 0, 0, &j, &err), 0);
    cJSON_Delete(j);
    assert_int_equal(kvr_json_parse((kvr_slice){buf, 10}, 0, 0, &j, &err), KVR_EINVAL);
    assert_non_null(strstr(err.msg, "trailing"));
    assert_int_equal(kvr_json_parse(kvr_slice_of("{\"a\":"), 0, 0, &j, &err), KVR_EINVAL);
    assert_non_null(strstr(err.msg, "invalid JSON near byte"));
    assert_int_equal(kvr_json_parse(kvr_slice_of(""), 0, 0, &j, &err), KVR_EINVAL);
    assert_int_equal(kvr_json_parse(kvr_slice_of("[1,2,3]"), 4, 0, &j, &err), KVR_ELIMIT);
    assert_non_null(strstr(err.msg, "over the limit"));
    /* depth: 5 levels ok with limit 5, 6 levels refused before cJSON recurses */
    assert_int_equal(kvr_json_parse(kvr_slice_of("[[[[[1]]]]]"), 0, 5, &j, &err), 0);
    cJSON_Delete(j);
    assert_int_equal(kvr_json_parse(kvr_slice_of("[[[[[[1]]]]]]"), 0, 5, &j, &err), KVR_ELIMIT);
    assert_non_null(strstr(err.msg, "deeper than 5"));
    /* brackets inside strings do not count */
    assert_int_equal(kvr_json_parse(kvr_slice_of("{\"k\":\"[[[[[[[[\\\"[[[[\"}"), 0, 2, &j, &err),
                     0);
    cJSON_Delete(j);
    /* 100k-deep nesting: refused quickly, no stack overflow */
    size_t n = 100000;
    char *deep = malloc(2 * n);
    memset(deep, '[', n);
    memset(deep + n, ']', n);
    assert_int_equal(kvr_json_parse((kvr_slice){deep, 2 * n}, 0, 0, &j, &err), KVR_ELIMIT);
    free(deep);
}

static void test_json_getters(void **state)
{
    cJSON *j =
        parse_ok("{\"model\":\"m\",\"max_tokens\":16,\"frac\":1.5,\"big\":9007199254740993,"
                 "\"neg\":-3,\"stream\":true,\"s\":\"12\",\"arr\":[1],\"obj\":{},\"nul\":null,"
                 "\"huge\":1e300}");
    kvr_err err = {0};
    const char *s = NULL;
    int64_t i = 0;
    uint64_t u = 0;
    double d = 0;
    bool b = false;
    const cJSON *a = NULL;
    assert_int_equal(kvr_json_get_string(j, "model", true, &s, &err), 0);
    assert_string_equal(s, "m");
    assert_int_equal(kvr_json_get_string(j, "max_tokens", true, &s, &err), KVR_ETYPE);
    assert_string_equal(err.msg, "field 'max_tokens' must be a string");
    assert_int_equal(kvr_json_get_int(j, "max_tokens", true, 1, 100, &i, &err), 0);
    assert_int_equal(i, 16);
    assert_int_equal(kvr_json_get_int(j, "max_tokens", true, 1, 10, &i, &err), KVR_EINVAL);
    assert_string_equal(err.msg, "field 'max_tokens' must be between 1 and 10");
    assert_int_equal(kvr_json_get_int(j, "frac", true, 0, 100, &i, &err), KVR_ETYPE);
    assert_string_equal(err.msg, "field 'frac' must be an integer");
    assert_int_equal(kvr_json_get_int(j, "s", true, 0, 100, &i, &err), KVR_ETYPE);
    assert_int_equal(kvr_json_get_int(j, "big", true, INT64_MIN, INT64_MAX, &i, &err), KVR_ETYPE);
    assert_int_equal(kvr_json_get_int(j, "huge", true, INT64_MIN, INT64_MAX, &i, &err), KVR_ETYPE);
    assert_int_equal(kvr_json_get_int(j, "neg", true, INT64_MIN, INT64_MAX, &i, &err), 0);
    assert_int_equal(i, -3);
    assert_int_equal(kvr_json_get_u64(j, "neg", true, &u, &err), KVR_EINVAL);
    assert_string_equal(err.msg, "field 'neg' must be a non-negative integer");
    assert_int_equal(kvr_json_get_u64(j, "max_tokens", true, &u, &err), 0);
    assert_int_equal(u, 16);
    assert_int_equal(kvr_json_get_double(j, "frac", true, &d, &err), 0);
    assert_true(d == 1.5);
    assert_int_equal(kvr_json_get_double(j, "model", true, &d, &err), KVR_ETYPE);
    assert_int_equal(kvr_json_get_bool(j, "stream", true, &b, &err), 0);
    assert_true(b);
    assert_int_equal(kvr_json_get_bool(j, "s", true, &b, &err), KVR_ETYPE);
    assert_string_equal(err.msg, "field 's' must be a boolean");
    assert_int_equal(kvr_json_get_array(j, "arr", true, &a, &err), 0);
    assert_int_equal(kvr_json_get_array(j, "obj", true, &a, &err), KVR_ETYPE);
    assert_int_equal(kvr_json_get_object(j, "obj", true, &a, &err), 0);
    assert_int_equal(kvr_json_get_object(j, "arr", true, &a, &err), KVR_ETYPE);
    /* missing / null */
    i = 77;
    assert_int_equal(kvr_json_get_int(j, "absent", false, 0, 100, &i, &err), KVR_ENOTFOUND);
    assert_int_equal(i, 77);
    assert_int_equal(kvr_json_get_int(j, "nul", false, 0, 100, &i, &err), KVR_ENOTFOUND);
    assert_int_equal(kvr_json_get_string(j, "absent", true, &s, &err), KVR_EINVAL);
    assert_string_equal(err.msg, "missing field 'absent'");
    /* non-object */
    cJSON *arr = parse_ok("[1]");
    assert_int_equal(kvr_json_get_string(arr, "x", true, &s, &err), KVR_EINVAL);
    cJSON_Delete(arr);
    /* exact ints at the edge */
    cJSON *edge = parse_ok("[9007199254740991,-9007199254740991,0.5,9007199254740992]");
    assert_int_equal(kvr_json_int_exact(cJSON_GetArrayItem(edge, 0), &i), 0);
    assert_int_equal(i, 9007199254740991LL);
    assert_int_equal(kvr_json_int_exact(cJSON_GetArrayItem(edge, 1), &i), 0);
    assert_int_equal(i, -9007199254740991LL);
    assert_int_equal(kvr_json_int_exact(cJSON_GetArrayItem(edge, 2), &i), KVR_ETYPE);
    /* 2^53 is where doubles stop being exact (2^53 + 1 parses as 2^53): refused */
    assert_int_equal(kvr_json_int_exact(cJSON_GetArrayItem(edge, 3), &i), KVR_ETYPE);
    cJSON_Delete(edge);
    cJSON_Delete(j);
}

static void test_json_escape_and_writer(void **state)
{
    kvr_buf b;
    kvr_buf_init(&b);
    const char in[] = "a\"b\\c\n\t\x01 caf\xc3\xa9 \xff end \xe2\x82";
    assert_int_equal(kvr_json_append_string(&b, in, sizeof in - 1), 0);
    kvr_buf_append(&b, "", 1);
    assert_string_equal(
        b.base,
        "\"a\\\"b\\\\c\\n\\t\\u0001 caf\xc3\xa9 \xef\xbf\xbd end \xef\xbf\xbd\xef\xbf\xbd\"");
    /* the output parses back */
    cJSON *j = NULL;
    kvr_err err;
    assert_int_equal(kvr_json_parse((kvr_slice){b.base, b.len - 1}, 0, 0, &j, &err), 0);
    assert_true(cJSON_IsString(j));
    cJSON_Delete(j);
    kvr_buf_reset(&b);

    kvr_jw w;
    kvr_jw_init(&w, &b);
    kvr_jw_obj(&w);
    kvr_jw_key(&w, "id");
    kvr_jw_u64(&w, 18446744073709551615ULL);
    kvr_jw_key(&w, "neg");
    kvr_jw_int(&w, -5);
    kvr_jw_key(&w, "list");
    kvr_jw_arr(&w);
    kvr_jw_double(&w, 0.1);
    kvr_jw_double(&w, 2);
    kvr_jw_bool(&w, false);
    kvr_jw_null(&w);
    kvr_jw_str(&w, "x\"y");
    kvr_jw_obj(&w);
    kvr_jw_end(&w);
    kvr_jw_end(&w);
    kvr_jw_key(&w, "raw");
    kvr_jw_raw(&w, "[1,2]", 5);
    kvr_jw_key(&w, "nan");
    kvr_jw_double(&w, 0.0 / 0.0);
    kvr_jw_end(&w);
    assert_int_equal(kvr_jw_finish(&w), 0);
    kvr_buf_append(&b, "", 1);
    assert_string_equal(b.base,
                        "{\"id\":18446744073709551615,\"neg\":-5,\"list\":[0.1,2,false,null,"
                        "\"x\\\"y\",{}],\"raw\":[1,2],\"nan\":null}");
    kvr_buf_reset(&b);
    /* misuse is reported */
    kvr_jw_init(&w, &b);
    kvr_jw_obj(&w);
    kvr_jw_int(&w, 1); /* value without key */
    assert_int_equal(kvr_jw_finish(&w), KVR_EINVAL);
    kvr_jw_init(&w, &b);
    kvr_jw_arr(&w);
    assert_int_equal(kvr_jw_finish(&w), KVR_EINVAL); /* unbalanced */
    kvr_jw_init(&w, &b);
    kvr_jw_end(&w);
    assert_int_equal(kvr_jw_finish(&w), KVR_EINVAL);
    kvr_jw_init(&w, &b);
    for (int i = 0; i < KVR_JW_MAX_DEPTH + 1; i++)
        kvr_jw_arr(&w);
    assert_int_equal(kvr_jw_finish(&w), KVR_EINVAL);
    kvr_buf_free(&b);
}

/* ---------------------------------------------------------------- flags */

static void test_flags(void **state)
{
    const char *listen = ":8000", *nats = NULL;
    int64_t n = 1, dur = 500;
    uint64_t id = 0;
    double speed = 1.0;
    bool verbose = false, color = true;
    kvr_flag flags[] = {
        {"listen", KVR_FLAG_STRING, &listen, "listen address", false},
        {"nats", KVR_FLAG_STRING, &nats, "NATS url", false},
        {"n", KVR_FLAG_INT, &n, "count", false},
        {"id", KVR_FLAG_U64, &id, "id", false},
        {"speedup", KVR_FLAG_DOUBLE, &speed, "speed", false},
        {"timeout", KVR_FLAG_DURATION, &dur, "timeout", false},
        {"verbose", KVR_FLAG_BOOL, &verbose, "verbose", false},
        {"color", KVR_FLAG_BOOL, &color, "color", false},
    };
    size_t nf = sizeof flags / sizeof flags[0];
    char *argv[] = {"up",        "--listen",   "127.0.0.1:9",
                    "--n=-4",    "-id",        "18446744073709551615",
                    "--speedup", "2.5",        "--timeout=10s",
                    "--verbose", "--no-color", "extra",
                    "--",        "--notaflag"};
    const char *pos[4];
    size_t np = 0;
    kvr_err err = {0};
    assert_int_equal(kvr_flags_parse(flags, nf, 14, argv, pos, 4, &np, &err), 0);
    assert_string_equal(listen, "127.0.0.1:9");
    assert_null(nats);
    assert_int_equal(n, -4);
    assert_true(id == UINT64_MAX);
    assert_true(speed == 2.5);
    assert_int_equal(dur, 10000);
    assert_true(verbose);
    assert_false(color);
    assert_int_equal(np, 3);
    assert_string_equal(pos[0], "up");
    assert_string_equal(pos[1], "extra");
    assert_string_equal(pos[2], "--notaflag");
    assert_true(flags[0].set);
    assert_false(flags[1].set);

    char *bad1[] = {"--nope", "1"};
    assert_int_equal(kvr_flags_parse(flags, nf, 2, bad1, NULL, 0, NULL, &err), KVR_EINVAL);
    assert_string_equal(err.msg, "unknown flag '--nope' (see --help)");
    char *bad2[] = {"--n", "x1"};
    assert_int_equal(kvr_flags_parse(flags, nf, 2, bad2, NULL, 0, NULL, &err), KVR_EINVAL);
    assert_string_equal(err.msg, "flag --n: 'x1' is not an integer");
    char *bad3[] = {"--timeout"};
    assert_int_equal(kvr_flags_parse(flags, nf, 1, bad3, NULL, 0, NULL, &err), KVR_EINVAL);
    assert_string_equal(err.msg, "flag --timeout needs a value");
    char *bad4[] = {"--timeout", "10 parsecs"};
    assert_int_equal(kvr_flags_parse(flags, nf, 2, bad4, NULL, 0, NULL, &err), KVR_EINVAL);
    char *bad5[] = {"--id=-1"};
    assert_int_equal(kvr_flags_parse(flags, nf, 1, bad5, NULL, 0, NULL, &err), KVR_EINVAL);
    char *bad6[] = {"stray"};
    assert_int_equal(kvr_flags_parse(flags, nf, 1, bad6, NULL, 0, NULL, &err), KVR_EINVAL);
    assert_string_equal(err.msg, "unexpected argument 'stray'");
    char *bad7[] = {"--verbose=maybe"};
    assert_int_equal(kvr_flags_parse(flags, nf, 1, bad7, NULL, 0, NULL, &err), KVR_EINVAL);
    char *help[] = {"--help"};
    assert_int_equal(kvr_flags_parse(flags, nf, 1, help, NULL, 0, NULL, &err), KVR_FLAGS_HELP);

    int64_t ms = 0;
    assert_int_equal(kvr_parse_duration_ms("250ms", &ms), 0);
    assert_int_equal(ms, 250);
    assert_int_equal(kvr_parse_duration_ms("1.5s", &ms), 0);
    assert_int_equal(ms, 1500);
    assert_int_equal(kvr_parse_duration_ms("2", &ms), 0);
    assert_int_equal(ms, 2000);
    assert_int_equal(kvr_parse_duration_ms("2m", &ms), 0);
    assert_int_equal(ms, 120000);
    assert_int_equal(kvr_parse_duration_ms("1h", &ms), 0);
    assert_int_equal(ms, 3600000);
    assert_int_equal(kvr_parse_duration_ms("10us", &ms), 0);
    assert_int_equal(ms, 1);
    assert_int_equal(kvr_parse_duration_ms("0", &ms), 0);
    assert_int_equal(ms, 0);
    assert_int_equal(kvr_parse_duration_ms("-1s", &ms), KVR_EINVAL);
    assert_int_equal(kvr_parse_duration_ms("s", &ms), KVR_EINVAL);
    assert_int_equal(kvr_parse_duration_ms("", &ms), KVR_EINVAL);

    char *out = NULL;
    size_t outlen = 0;
    FILE *f = open_memstream(&out, &outlen);
    kvr_flags_usage(f, "kvr-test", flags, 2);
    fclose(f);
    assert_non_null(strstr(out, "usage: kvr-test [flags]"));
    assert_non_null(strstr(out, "--listen string"));
    assert_non_null(strstr(out, "(default \"127.0.0.1:9\")"));
    free(out);
}

/* ---------------------------------------------------------------- metrics */

static const char GOLDEN[] = "# HELP kvr_test_requests_total Requests handled.\n"
                             "# TYPE kvr_test_requests_total counter\n"
                             "kvr_test_requests_total 3\n"
                             "# HELP kvr_test_rejected_total Rejected events by reason.\n"
                             "# TYPE kvr_test_rejected_total counter\n"
                             "kvr_test_rejected_total{reason=\"truncated\"} 2\n"
                             "kvr_test_rejected_total{reason=\"bad \\\"type\\\"\"} 0\n"
                             "# HELP kvr_test_load_ratio Load with a\\nnewline.\n"
                             "# TYPE kvr_test_load_ratio gauge\n"
                             "kvr_test_load_ratio 0.25\n"
                             "# HELP kvr_test_latency_seconds Latency.\n"
                             "# TYPE kvr_test_latency_seconds histogram\n"
                             "kvr_test_latency_seconds_bucket{le=\"0.01\"} 1\n"
                             "kvr_test_latency_seconds_bucket{le=\"0.1\"} 3\n"
                             "kvr_test_latency_seconds_bucket{le=\"1\"} 3\n"
                             "kvr_test_latency_seconds_bucket{le=\"+Inf\"} 4\n"
                             "kvr_test_latency_seconds_sum 5.205\n"
                             "kvr_test_latency_seconds_count 4\n"
                             "# HELP kvr_test_ttft_seconds TTFT by mode.\n"
                             "# TYPE kvr_test_ttft_seconds histogram\n"
                             "kvr_test_ttft_seconds_bucket{mode=\"raft\",le=\"0.5\"} 0\n"
                             "kvr_test_ttft_seconds_bucket{mode=\"raft\",le=\"+Inf\"} 0\n"
                             "kvr_test_ttft_seconds_sum{mode=\"raft\"} 0\n"
                             "kvr_test_ttft_seconds_count{mode=\"raft\"} 0\n"
                             "kvr_test_ttft_seconds_bucket{mode=\"local\",le=\"0.5\"} 1\n"
                             "kvr_test_ttft_seconds_bucket{mode=\"local\",le=\"+Inf\"} 1\n"
                             "kvr_test_ttft_seconds_sum{mode=\"local\"} 0.5\n"
                             "kvr_test_ttft_seconds_count{mode=\"local\"} 1\n"
                             "# HELP kvr_test_collected Set by a hook.\n"
                             "# TYPE kvr_test_collected gauge\n"
                             "kvr_test_collected 42\n";

static void hook(kvr_metrics *m, void *arg)
{
    kvr_metric_set(arg, 0, 42);
}

static void test_metrics_golden(void **state)
{
    kvr_metrics *m = kvr_metrics_new();
    assert_non_null(m);
    kvr_metric *req =
        kvr_metrics_counter(m, "kvr_test_requests_total", "Requests handled.", NULL, NULL);
    const char *const reasons[] = {"truncated", "bad \"type\"", NULL};
    kvr_metric *rej = kvr_metrics_counter(m, "kvr_test_rejected_total",
                                          "Rejected events by reason.", "reason", reasons);
    kvr_metric *load =
        kvr_metrics_gauge(m, "kvr_test_load_ratio", "Load with a\nnewline.", NULL, NULL);
    const double b[] = {0.01, 0.1, 1};
    kvr_metric *lat =
        kvr_metrics_histogram(m, "kvr_test_latency_seconds", "Latency.", b, 3, NULL, NULL);
    const double b2[] = {0.5};
    const char *const modes[] = {"raft", "local", NULL};
    kvr_metric *ttft =
        kvr_metrics_histogram(m, "kvr_test_ttft_seconds", "TTFT by mode.", b2, 1, "mode", modes);
    kvr_metric *col = kvr_metrics_gauge(m, "kvr_test_collected", "Set by a hook.", NULL, NULL);
    assert_non_null(req);
    assert_non_null(rej);
    assert_non_null(load);
    assert_non_null(lat);
    assert_non_null(ttft);
    assert_non_null(col);
    assert_int_equal(kvr_metrics_on_collect(m, hook, col), 0);
    kvr_metric_inc(req);
    kvr_metric_add(req, 0, 2);
    kvr_metric_add_atomic(rej, 0, 2);
    kvr_metric_add(rej, 7, 1); /* out of range: ignored */
    kvr_metric_set(load, 0, 0.25);
    kvr_metric_observe(lat, 0, 0.005);
    kvr_metric_observe(lat, 0, 0.1); /* le is inclusive */
    kvr_metric_observe(lat, 0, 0.1);
    kvr_metric_observe(lat, 0, 5);
    kvr_metric_observe(ttft, 1, 0.5);
    kvr_metric_observe(req, 0, 1); /* wrong kind: ignored */
    kvr_buf out;
    kvr_buf_init(&out);
    assert_int_equal(kvr_metrics_render(m, &out), 0);
    kvr_buf_append(&out, "", 1);
    assert_string_equal(out.base, GOLDEN);
    kvr_buf_free(&out);
    assert_int_equal(kvr_metric_counter_value(rej, 0), 2);
    assert_int_equal(kvr_metric_histogram_count(lat, 0), 4);

    /* registration errors */
    assert_null(kvr_metrics_counter(m, "kvr_test_requests_total", "dup", NULL, NULL));
    assert_null(kvr_metrics_counter(m, "9bad", "x", NULL, NULL));
    assert_null(kvr_metrics_counter(m, "kvr bad", "x", NULL, NULL));
    const double unsorted[] = {1, 0.5};
    assert_null(kvr_metrics_histogram(m, "kvr_h", "x", unsorted, 2, NULL, NULL));
    const char *const none[] = {NULL};
    assert_null(kvr_metrics_counter(m, "kvr_c", "x", "reason", none));
    assert_null(kvr_metrics_counter(m, "kvr_c2", "x", "le", reasons));
    kvr_metrics_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sse_every_split),
        cmocka_unit_test(test_sse_limits_and_stop),
        cmocka_unit_test(test_sse_encoder_roundtrip),
        cmocka_unit_test(test_json_parse_bounds),
        cmocka_unit_test(test_json_getters),
        cmocka_unit_test(test_json_escape_and_writer),
        cmocka_unit_test(test_flags),
        cmocka_unit_test(test_metrics_golden),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
