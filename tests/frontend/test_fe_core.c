/* Unit tests: tokenizer, request parsing/validation, error JSON, stream rewriting, auth,
 * worker table, pool selection, route codec. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

#include "fe_core.h"
#include "fe_pool.h"
#include "kvr_heartbeat.h"
#include "kvr_heartbeat.h"
#include "route_msg.h"
#include "kvr_mp.h"
#include "kvr_tok.h"

static void test_byte_tokenizer(void **state)
{
    (void)state;
    const kvr_tokenizer *t = kvr_tok_byte();
    assert_string_equal(kvr_tok_name(t), "byte");
    kvr_buf ids, text;
    kvr_buf_init(&ids);
    kvr_buf_init(&text);
    assert_int_equal(kvr_tok_encode(t, kvr_slice_of("h\xc3\xa9"), &ids, NULL), 0);
    assert_int_equal(kvr_tok_count(&ids), 3);
    assert_int_equal(kvr_tok_ids(&ids)[0], 'h');
    assert_int_equal(kvr_tok_ids(&ids)[1], 0xc3);
    assert_int_equal(kvr_tok_ids(&ids)[2], 0xa9);
    uint32_t mixed[] = {'a', 300, 'b', 256, 0xffffffffu, 'c'};
    assert_int_equal(kvr_tok_decode(t, mixed, 6, &text, NULL), 0);
    assert_int_equal(text.len, 3);
    assert_memory_equal(text.base, "abc", 3);
    kvr_tokenizer *o = NULL;
    assert_int_equal(kvr_tok_open(NULL, &o, NULL), 0);
    assert_ptr_equal(o, t);
    kvr_err e = {0};
    assert_int_equal(kvr_tok_open("hf:llama", &o, &e), KVR_EUNSUPPORTED);
    assert_non_null(strstr(e.msg, "hf:llama"));
    kvr_buf_free(&ids);
    kvr_buf_free(&text);
}

static void test_chatml(void **state)
{
    (void)state;
    kvr_chat_msg m[2] = {{kvr_slice_of("system"), kvr_slice_of("be brief")},
                         {kvr_slice_of("user"), kvr_slice_of("hi")}};
    kvr_buf out;
    kvr_buf_init(&out);
    assert_int_equal(kvr_tok_chat(kvr_tok_byte(), m, 2, 1, &out, NULL), 0);
    const char *want = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                       "<|im_start|>assistant\n";
    assert_int_equal(out.len, strlen(want));
    assert_memory_equal(out.base, want, out.len);
    assert_int_equal(kvr_tok_chatml(m, KVR_TOK_MAX_MESSAGES + 1, 0, &out, NULL), KVR_ELIMIT);
    kvr_buf_free(&out);
}

static void test_json_escape(void **state)
{
    (void)state;
    kvr_buf out;
    kvr_buf_init(&out);
    const char in[] = "a\"b\\c\n\x01\xc3\xa9\xff\xe2\x82";
    assert_int_equal(kvr_tok_json_escape(&out, in, sizeof in - 1), 0);
    const char *want = "a\\\"b\\\\c\\n\\u0001\xc3\xa9\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd";
    assert_int_equal(out.len, strlen(want));
    assert_memory_equal(out.base, want, out.len);
    kvr_buf_free(&out);
}

static int parse(const char *body, bool chat, fe_req *r, fe_http_error *e)
{
    fe_req_init(r);
    memset(e, 0, sizeof *e);
    return fe_parse_request(body, strlen(body), chat, kvr_tok_byte(), r, e);
}

static void test_parse_completion(void **state)
{
    (void)state;
    fe_req r;
    fe_http_error e;
    assert_int_equal(parse("{\"model\":\"m1\",\"prompt\":\"abc\",\"max_tokens\":5,\"stream\":true,"
                           "\"stream_options\":{\"include_usage\":true}}",
                           false, &r, &e),
                     0);
    assert_string_equal(r.model, "m1");
    assert_true(r.stream);
    assert_true(r.include_usage);
    assert_int_equal(r.max_tokens, 5);
    assert_int_equal(kvr_tok_count(&r.tokens), 3);
    assert_int_equal(kvr_tok_ids(&r.tokens)[2], 'c');
    assert_false(r.has_kv_params);
    fe_req_free(&r);
    /* a client's kv_transfer_params, however its key is spelled (fe_disagg.c drops them) */
    assert_int_equal(
        parse("{\"model\":\"m1\",\"prompt\":\"\\u00e9\",\"kv_transfer_param\\u0073\":{}}", false,
              &r, &e),
        0);
    assert_true(r.has_kv_params);
    fe_req_free(&r);

    assert_int_equal(parse("{\"model\":\"m\",\"prompt\":[1,2,4294967295]}", false, &r, &e), 0);
    assert_false(r.stream);
    assert_int_equal(r.max_tokens, -1);
    assert_int_equal(kvr_tok_count(&r.tokens), 3);
    assert_int_equal(kvr_tok_ids(&r.tokens)[2], 4294967295u);
    kvr_buf body;
    kvr_buf_init(&body);
    assert_int_equal(fe_upstream_body(&body, &r), 0);
    assert_int_equal(kvr_buf_append(&body, "", 1), 0);
    assert_string_equal(body.base, "{\"model\":\"m\",\"stream\":true,\"stream_options\":{"
                                   "\"include_usage\":true},\"prompt\":[1,2,4294967295]}");
    kvr_buf_free(&body);
    fe_req_free(&r);
}

static void expect_400(const char *body, bool chat, const char *param)
{
    fe_req r;
    fe_http_error e;
    assert_int_equal(parse(body, chat, &r, &e), KVR_EINVAL);
    assert_int_equal(e.status, 400);
    assert_string_equal(e.type, "invalid_request_error");
    assert_string_equal(e.param, param);
    assert_true(strlen(e.message) > 0);
    fe_req_free(&r);
}

static void test_parse_errors(void **state)
{
    (void)state;
    expect_400("{\"model\":\"m\",\"prompt\":\"a\"", false, "");
    expect_400("[1,2]", false, "");
    expect_400("{\"model\":\"m\",\"prompt\":\"a\"} trailing", false, "");
    expect_400("", false, "");
    expect_400("{\"prompt\":\"a\"}", false, "model");
    expect_400("{\"model\":7,\"prompt\":\"a\"}", false, "model");
    expect_400("{\"model\":\"m\"}", false, "prompt");
    expect_400("{\"model\":\"m\",\"prompt\":5}", false, "prompt");
    expect_400("{\"model\":\"m\",\"prompt\":[1,-2]}", false, "prompt");
    expect_400("{\"model\":\"m\",\"prompt\":[1.5]}", false, "prompt");
    expect_400("{\"model\":\"m\",\"prompt\":[]}", false, "prompt");
    expect_400("{\"model\":\"m\",\"prompt\":\"\"}", false, "prompt");
    expect_400("{\"model\":\"m\",\"prompt\":\"a\",\"stream\":\"yes\"}", false, "stream");
    expect_400("{\"model\":\"m\",\"prompt\":\"a\",\"max_tokens\":0}", false, "max_tokens");
    expect_400("{\"model\":\"m\",\"prompt\":\"a\",\"max_tokens\":\"5\"}", false, "max_tokens");
    expect_400("{\"model\":\"m\",\"prompt\":\"a\",\"stream_options\":3}", false, "stream_options");
    expect_400("{\"model\":\"m\"}", true, "messages");
    expect_400("{\"model\":\"m\",\"messages\":{}}", true, "messages");
    expect_400("{\"model\":\"m\",\"messages\":[]}", true, "messages");
    expect_400("{\"model\":\"m\",\"messages\":[{\"content\":\"x\"}]}", true, "messages");
    expect_400("{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":5}]}", true,
               "messages");
    expect_400("{\"model\":\"m\",\"messages\":[\"hi\"]}", true, "messages");
}

static void test_parse_whitespace(void **state)
{
    (void)state;
    fe_req r;
    fe_http_error e;
    assert_int_equal(parse(" {\"model\":\"m\",\"prompt\":\"a\"}\r\n ", false, &r, &e), 0);
    fe_req_free(&r);
}

static void test_parse_chat(void **state)
{
    (void)state;
    fe_req r;
    fe_http_error e;
    assert_int_equal(parse("{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},"
                           "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
                           "{\"type\":\"text\",\"text\":\"b\"}]}]}",
                           true, &r, &e),
                     0);
    /* text parts joined with "\n", as vLLM does for string-content templates */
    const char *want = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n"
                       "<|im_start|>assistant\n";
    assert_int_equal(kvr_tok_count(&r.tokens), strlen(want));
    for (size_t i = 0; i < strlen(want); i++)
        assert_int_equal(kvr_tok_ids(&r.tokens)[i], (unsigned char)want[i]);
    fe_req_free(&r);
}

static void test_error_json(void **state)
{
    (void)state;
    fe_http_error e;
    fe_error_set(&e, 404, "invalid_request_error", "model", "model_not_found",
                 "The model `x\"y` does not exist");
    kvr_buf out;
    kvr_buf_init(&out);
    assert_int_equal(fe_error_json(&out, &e), 0);
    cJSON *j = cJSON_ParseWithLength(out.base, out.len);
    assert_non_null(j);
    cJSON *err = cJSON_GetObjectItem(j, "error");
    assert_string_equal(cJSON_GetObjectItem(err, "message")->valuestring,
                        "The model `x\"y` does not exist");
    assert_string_equal(cJSON_GetObjectItem(err, "type")->valuestring, "invalid_request_error");
    assert_string_equal(cJSON_GetObjectItem(err, "param")->valuestring, "model");
    assert_string_equal(cJSON_GetObjectItem(err, "code")->valuestring, "model_not_found");
    cJSON_Delete(j);
    kvr_buf_reset(&out);
    fe_error_set(&e, 400, "invalid_request_error", NULL, NULL, "bad");
    assert_int_equal(fe_error_json(&out, &e), 0);
    j = cJSON_ParseWithLength(out.base, out.len);
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "error"), "param")));
    cJSON_Delete(j);
    kvr_buf_free(&out);
}

/* Returns the JSON after "data: " of the single SSE event in out. */
static cJSON *sse_json(const kvr_buf *out)
{
    assert_true(out->len > 8);
    assert_memory_equal(out->base, "data: ", 6);
    assert_memory_equal(out->base + out->len - 2, "\n\n", 2);
    cJSON *j = cJSON_ParseWithLength(out->base + 6, out->len - 8);
    assert_non_null(j);
    return j;
}

#define EV1                                                                                        \
    "{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\"He\"," \
    "\"finish_reason\":null}]}"
#define EV2                                                                                        \
    "{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":"        \
    "\"y\\n\",\"finish_reason\":\"length\"}]}"
#define EVU                                                                                        \
    "{\"id\":\"cmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,"    \
    "\"total_tokens\":5}}"

static void test_relay_chat_stream(void **state)
{
    (void)state;
    fe_req r;
    fe_http_error e;
    assert_int_equal(
        parse(
            "{\"model\":\"m\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
            "\"stream_options\":{\"include_usage\":true}}",
            true, &r, &e),
        0);
    fe_relay rl;
    fe_relay_init(&rl, &r, "chatcmpl-abc", 1700000000);
    kvr_buf out;
    kvr_buf_init(&out);
    assert_int_equal(fe_relay_event(&rl, EV1, strlen(EV1), &out, NULL), FE_EV_CHUNK);
    cJSON *j = sse_json(&out);
    assert_string_equal(cJSON_GetObjectItem(j, "object")->valuestring, "chat.completion.chunk");
    assert_string_equal(cJSON_GetObjectItem(j, "id")->valuestring, "chatcmpl-abc");
    cJSON *c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    cJSON *d = cJSON_GetObjectItem(c0, "delta");
    assert_string_equal(cJSON_GetObjectItem(d, "role")->valuestring, "assistant");
    assert_string_equal(cJSON_GetObjectItem(d, "content")->valuestring, "He");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(c0, "finish_reason")));
    cJSON_Delete(j);
    kvr_buf_reset(&out);
    assert_int_equal(fe_relay_event(&rl, EV2, strlen(EV2), &out, NULL), FE_EV_CHUNK);
    j = sse_json(&out);
    c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    d = cJSON_GetObjectItem(c0, "delta");
    assert_null(cJSON_GetObjectItem(d, "role"));
    assert_string_equal(cJSON_GetObjectItem(d, "content")->valuestring, "y\n");
    assert_string_equal(cJSON_GetObjectItem(c0, "finish_reason")->valuestring, "length");
    cJSON_Delete(j);
    kvr_buf_reset(&out);
    assert_int_equal(fe_relay_event(&rl, EVU, strlen(EVU), &out, NULL), FE_EV_USAGE);
    j = sse_json(&out);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "choices")), 0);
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "usage"), "total_tokens")->valueint,
                     5);
    cJSON_Delete(j);
    kvr_buf_reset(&out);
    assert_int_equal(fe_relay_event(&rl, "[DONE]", 6, &out, NULL), FE_EV_DONE);
    assert_int_equal(out.len, 0);
    kvr_err ke = {0};
    assert_int_equal(fe_relay_event(&rl, "{nope", 5, &out, &ke), KVR_EINVAL);
    const char *errev = "{\"error\":{\"message\":\"boom\"}}";
    assert_int_equal(fe_relay_event(&rl, errev, strlen(errev), &out, &ke), FE_EV_ERROR);
    assert_non_null(strstr(ke.msg, "boom"));
    fe_relay_free(&rl);
    kvr_buf_free(&out);
    fe_req_free(&r);
}

static void test_relay_usage_hidden_and_aggregate(void **state)
{
    (void)state;
    fe_req r;
    fe_http_error e;
    /* Streaming completion without include_usage: the usage chunk is not forwarded. */
    assert_int_equal(parse("{\"model\":\"m\",\"stream\":true,\"prompt\":\"x\"}", false, &r, &e), 0);
    fe_relay rl;
    fe_relay_init(&rl, &r, "cmpl-z", 1);
    kvr_buf out;
    kvr_buf_init(&out);
    assert_int_equal(fe_relay_event(&rl, EV1, strlen(EV1), &out, NULL), FE_EV_CHUNK);
    cJSON *j = sse_json(&out);
    assert_string_equal(cJSON_GetObjectItem(j, "object")->valuestring, "text_completion");
    assert_string_equal(
        cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0), "text")
            ->valuestring,
        "He");
    cJSON_Delete(j);
    kvr_buf_reset(&out);
    assert_int_equal(fe_relay_event(&rl, EVU, strlen(EVU), &out, NULL), FE_EV_USAGE);
    assert_int_equal(out.len, 0);
    assert_true(rl.have_usage);
    /* Counts a lying worker sends that no int64 holds (found by fuzz_frontend under UBSan) or
     * that are negative or fractional are ignored, not converted; the stream goes on. */
    static const char *const bad_usage[] = {
        "{\"usage\":{\"prompt_tokens\":2.8e49,\"completion_tokens\":1}}",
        "{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":-1e300}}",
        "{\"usage\":{\"prompt_tokens\":-3,\"completion_tokens\":1}}",
        "{\"usage\":{\"prompt_tokens\":1.5,\"completion_tokens\":1}}",
    };
    for (size_t i = 0; i < sizeof bad_usage / sizeof bad_usage[0]; i++) {
        rl.have_usage = false;
        assert_true(fe_relay_event(&rl, bad_usage[i], strlen(bad_usage[i]), &out, NULL) >= 0);
        assert_false(rl.have_usage);
    }
    fe_relay_free(&rl);
    fe_req_free(&r);

    /* Non-streaming chat: aggregated. */
    assert_int_equal(parse("{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}",
                           true, &r, &e),
                     0);
    fe_relay_init(&rl, &r, "chatcmpl-q", 2);
    assert_int_equal(fe_relay_event(&rl, EV1, strlen(EV1), &out, NULL), FE_EV_CHUNK);
    assert_int_equal(fe_relay_event(&rl, EV2, strlen(EV2), &out, NULL), FE_EV_CHUNK);
    assert_int_equal(fe_relay_event(&rl, EVU, strlen(EVU), &out, NULL), FE_EV_USAGE);
    assert_int_equal(out.len, 0);
    assert_int_equal(fe_relay_final_json(&rl, &out), 0);
    j = cJSON_ParseWithLength(out.base, out.len);
    assert_non_null(j);
    assert_string_equal(cJSON_GetObjectItem(j, "object")->valuestring, "chat.completion");
    cJSON *c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    assert_string_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(c0, "message"), "content")->valuestring, "Hey\n");
    assert_string_equal(cJSON_GetObjectItem(c0, "finish_reason")->valuestring, "length");
    assert_int_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(j, "usage"), "completion_tokens")->valueint, 2);
    cJSON_Delete(j);
    kvr_buf_reset(&out);
    assert_int_equal(fe_relay_error_event(&out, "worker died"), 0);
    assert_non_null(strstr(out.base, "data: [DONE]\n\n"));
    fe_relay_free(&rl);
    kvr_buf_free(&out);
    fe_req_free(&r);
}

static void test_relay_utf8_split(void **state)
{
    (void)state;
    fe_req r;
    fe_http_error e;
    assert_int_equal(parse("{\"model\":\"m\",\"stream\":true,\"prompt\":\"x\"}", false, &r, &e), 0);
    fe_relay rl;
    fe_relay_init(&rl, &r, "c", 1);
    kvr_buf out;
    kvr_buf_init(&out);
    /* "é" (c3 a9) and "€" (e2 82 ac) cut across chunks by byte tokens */
    const char *ev[] = {
        "{\"choices\":[{\"index\":0,\"text\":\"a\xc3\",\"finish_reason\":null}]}",
        "{\"choices\":[{\"index\":0,\"text\":\"\xa9\xe2\",\"finish_reason\":null}]}",
        "{\"choices\":[{\"index\":0,\"text\":\"\x82\",\"finish_reason\":null}]}",
        "{\"choices\":[{\"index\":0,\"text\":\"\xac!\",\"finish_reason\":null}]}",
        "{\"choices\":[{\"index\":0,\"text\":\"\xc3\",\"finish_reason\":\"length\"}]}",
    };
    const char *want[] = {"a", "\xc3\xa9", "", "\xe2\x82\xac!", "\xef\xbf\xbd"};
    for (int i = 0; i < 5; i++) {
        kvr_buf_reset(&out);
        assert_int_equal(fe_relay_event(&rl, ev[i], strlen(ev[i]), &out, NULL), FE_EV_CHUNK);
        cJSON *j = sse_json(&out);
        const char *t =
            cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0), "text")
                ->valuestring;
        assert_string_equal(t, want[i]);
        cJSON_Delete(j);
    }
    fe_relay_free(&rl);
    kvr_buf_free(&out);
    fe_req_free(&r);
}

static void test_auth(void **state)
{
    (void)state;
    const char *h = "Bearer s3cret";
    assert_true(fe_auth_ok("s3cret", h, strlen(h)));
    assert_false(fe_auth_ok("s3cret", "Bearer s3cres", 13));
    assert_false(fe_auth_ok("s3cret", "Bearer s3cret2", 14));
    assert_false(fe_auth_ok("s3cret", "Bearer s3cre", 12));
    /* the scheme is case-insensitive (RFC 7235 2.1); the credential is not */
    assert_true(fe_auth_ok("s3cret", "bearer s3cret", 13));
    assert_true(fe_auth_ok("s3cret", "BEARER s3cret", 13));
    assert_true(fe_auth_ok("s3cret", "Bearer  s3cret", 14));
    assert_false(fe_auth_ok("s3cret", "Bearer S3CRET", 13));
    assert_false(fe_auth_ok("s3cret", "Bearers3cret", 12));
    assert_false(fe_auth_ok("s3cret", "Basic s3cret", 12));
    assert_false(fe_auth_ok("s3cret", "Bearer ", 7));
    assert_false(fe_auth_ok("", "Bearer ", 7));
    assert_false(fe_auth_ok("s3cret", "", 0));
}

static void heartbeat(kvr_buf *b, uint64_t id, const char *ns, const char *model, uint32_t active,
                      uint32_t used)
{
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%u", (unsigned)(9000 + id));
    kvr_buf_reset(b);
    assert_int_equal(kvr_mp_write_map(b, 9), 0);
    kvr_mp_write_cstr(b, "id");
    kvr_mp_write_uint(b, id);
    kvr_mp_write_cstr(b, "namespace");
    kvr_mp_write_cstr(b, ns);
    kvr_mp_write_cstr(b, "model");
    kvr_mp_write_cstr(b, model);
    kvr_mp_write_cstr(b, "url");
    kvr_mp_write_cstr(b, url);
    kvr_mp_write_cstr(b, "active");
    kvr_mp_write_uint(b, active);
    kvr_mp_write_cstr(b, "waiting");
    kvr_mp_write_uint(b, 0);
    kvr_mp_write_cstr(b, "used_blocks");
    kvr_mp_write_uint(b, used);
    kvr_mp_write_cstr(b, "mdc_sum");
    kvr_mp_write_cstr(b, "x");
    kvr_mp_write_cstr(b, "extra");
    kvr_mp_write_array(b, 2);
    kvr_mp_write_uint(b, 1);
    kvr_mp_write_uint(b, 2);
}

/* Defect 8 (issue 18): while NATS is down, heartbeats cannot arrive; workers must not expire
 * for missing them, and after the reconnect they get a full TTL to beat again. */
static void test_pool_blind(void **state)
{
    (void)state;
    fe_pool p;
    assert_int_equal(fe_pool_init(&p, "ns", false, 7), 0);
    kvr_buf b;
    kvr_buf_init(&b);
    heartbeat(&b, 1, "ns", "m", 0, 0);
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, 1000, NULL), 0);
    heartbeat(&b, 2, "ns", "m", 0, 0);
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, 1000 - p.ttl_ms - 1, NULL), 0);
    /* NATS goes down at 1500: worker 2 was already past its TTL and goes, worker 1 stays */
    fe_pool_set_blind(&p, true, 1500);
    assert_int_equal(p.n, 1);
    int64_t t = 1500 + 10 * p.ttl_ms; /* a long outage */
    fe_pool_expire(&p, t);
    assert_int_equal(fe_pool_live(&p, "m", t), 1);
    assert_non_null(fe_pool_choose(&p, FE_MODE_LEAST, "ns", "m", t, false, 0));
    char ns[FE_NS_MAX];
    assert_int_equal(fe_pool_pick_ns(&p, "m", t, ns), 0);
    /* back at t: a full TTL from now, then gone if it never beats */
    fe_pool_set_blind(&p, false, t);
    fe_pool_expire(&p, t + p.ttl_ms);
    assert_int_equal(fe_pool_live(&p, "m", t + p.ttl_ms), 1);
    fe_pool_expire(&p, t + p.ttl_ms + 1);
    assert_int_equal(fe_pool_live(&p, "m", t + p.ttl_ms + 1), 0);
    assert_int_equal(p.n, 0);
    kvr_buf_free(&b);
    fe_pool_free(&p);
}

static void heartbeat_url(kvr_buf *b, uint64_t id, const char *url)
{
    kvr_buf_reset(b);
    kvr_mp_write_map(b, 4);
    kvr_mp_write_cstr(b, "id");
    kvr_mp_write_uint(b, id);
    kvr_mp_write_cstr(b, "namespace");
    kvr_mp_write_cstr(b, "default");
    kvr_mp_write_cstr(b, "model");
    kvr_mp_write_cstr(b, "m");
    kvr_mp_write_cstr(b, "url");
    kvr_mp_write_cstr(b, url);
}

/* Issue 18: the worker URL allow-list, a full table of expired one-shot workers, loop stalls. */
static void test_pool_edges(void **state)
{
    (void)state;
    fe_pool p;
    assert_int_equal(fe_pool_init(&p, "default", false, 7), 0);
    kvr_cidr_list allow = {0};
    assert_int_equal(kvr_cidr_list_add_csv(&allow, "private", NULL), 0);
    p.allow = &allow;
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_err err = {0};
    heartbeat_url(&b, 1, "http://8.8.8.8:80");
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, 0, &err), KVR_EINVAL);
    heartbeat_url(&b, 2, "http://attacker.example:80");
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, 0, &err), KVR_EINVAL);
    assert_int_equal(p.refused_url, 2);
    assert_int_equal(p.n, 0);
    /* one-shot fakes fill the table at t=0; a real worker is refused while they are within
     * their TTL, and takes a slot once they have expired even if no tick ran meanwhile */
    char url[64];
    for (uint64_t id = 100; id < 100 + FE_POOL_MAX_WORKERS; id++) {
        snprintf(url, sizeof url, "http://10.0.%u.%u:80", (unsigned)(id >> 8) & 255,
                 (unsigned)id & 255);
        heartbeat_url(&b, id, url);
        assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, 0, &err), 0);
    }
    heartbeat_url(&b, 9, "http://127.0.0.1:9009");
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, 1000, &err), KVR_ELIMIT);
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, p.ttl_ms + 1, &err), 0);
    assert_int_equal(p.n, 1);
    assert_int_equal(fe_pool_live(&p, NULL, p.ttl_ms + 1), 1);
    /* a stall of 10 s: the worker's deadline moves on by it */
    fe_pool_shift(&p, 10000, p.ttl_ms + 10001);
    assert_int_equal(fe_pool_live(&p, NULL, p.ttl_ms + 10001), 1);
    fe_pool_expire(&p, p.ttl_ms + 10001);
    assert_int_equal(p.n, 1);
    /* never past now: a worker beaten just now does not gain the stall on top */
    fe_pool_shift(&p, 10000, p.ttl_ms + 10001);
    assert_true(p.w[0].last_seen_ms <= p.ttl_ms + 10001);
    kvr_buf_free(&b);
    fe_pool_free(&p);
}

static void test_pool(void **state)
{
    (void)state;
    fe_pool p;
    assert_int_equal(fe_pool_init(&p, "P", true, 42), 0);
    kvr_buf b;
    kvr_buf_init(&b);
    int64_t now = 1000;
    char ns[FE_NS_MAX];
    assert_int_equal(fe_pool_pick_ns(&p, "m", now, ns), KVR_EAGAIN);
    for (uint64_t id = 1; id <= 3; id++) {
        heartbeat(&b, id, "P-aaaa1111", "m", (uint32_t)id, 0);
        assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, now, NULL), 0);
    }
    heartbeat(&b, 4, "P-bbbb2222", "m", 9, 0);
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, now, NULL), 0);
    heartbeat(&b, 5, "Q", "m", 0, 0); /* other namespace: ignored */
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, now, NULL), 0);
    heartbeat(&b, 6, "P2", "m", 0, 0); /* "P2" is not "P-…" */
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, now, NULL), 0);
    assert_int_equal(p.n, 4);
    assert_int_equal(fe_pool_live(&p, "m", now), 4);
    assert_int_equal(fe_pool_pick_ns(&p, "other", now, ns), KVR_ENOTFOUND);

    int a = 0, bb = 0;
    for (int i = 0; i < 4000; i++) {
        assert_int_equal(fe_pool_pick_ns(&p, "m", now, ns), 0);
        if (strcmp(ns, "P-aaaa1111") == 0)
            a++;
        else if (strcmp(ns, "P-bbbb2222") == 0)
            bb++;
        else
            fail();
    }
    assert_in_range(a, 2800, 3200); /* 3:1 */
    assert_int_equal(a + bb, 4000);

    fe_worker *w = fe_pool_choose(&p, FE_MODE_LEAST, "P-aaaa1111", "m", now, false, 0);
    assert_int_equal(w->id, 1);
    w = fe_pool_choose(&p, FE_MODE_LEAST, "P-aaaa1111", "m", now, true, 1);
    assert_int_equal(w->id, 2);
    uint64_t seq[6];
    for (int i = 0; i < 6; i++)
        seq[i] = fe_pool_choose(&p, FE_MODE_RR, "P-aaaa1111", "m", now, false, 0)->id;
    assert_int_equal(seq[0], 1);
    assert_int_equal(seq[1], 2);
    assert_int_equal(seq[2], 3);
    assert_int_equal(seq[3], 1);
    /* exclusion of the only worker still returns it */
    w = fe_pool_choose(&p, FE_MODE_LEAST, "P-bbbb2222", "m", now, true, 4);
    assert_int_equal(w->id, 4);

    kvr_buf_reset(&b);
    assert_int_equal(fe_pool_models_json(&p, now, &b), 0);
    cJSON *j = cJSON_ParseWithLength(b.base, b.len);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "data")), 1);
    cJSON_Delete(j);

    /* Pool a stops beating: everything goes to b. */
    now += 2000;
    heartbeat(&b, 4, "P-bbbb2222", "m", 9, 0);
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, now, NULL), 0);
    now += 1500;
    for (int i = 0; i < 100; i++) {
        assert_int_equal(fe_pool_pick_ns(&p, "m", now, ns), 0);
        assert_string_equal(ns, "P-bbbb2222");
    }
    fe_pool_expire(&p, now);
    assert_int_equal(p.n, 1);

    /* malformed heartbeats */
    kvr_err e = {0};
    assert_true(fe_pool_heartbeat(&p, "\x93\x01", 2, now, &e) < 0);
    kvr_buf_reset(&b);
    kvr_mp_write_map(&b, 1);
    kvr_mp_write_cstr(&b, "id");
    kvr_mp_write_cstr(&b, "x");
    assert_true(fe_pool_heartbeat(&p, b.base, b.len, now, &e) < 0);
    assert_int_equal(p.rejected, 2);
    kvr_buf_free(&b);
    fe_pool_free(&p);
}

/* Mutated inputs: every parser answers 0 or a clean error, never crashes (ASan/valgrind
 * runs of this test check memory too). */
static void test_mutations(void **state)
{
    (void)state;
    static const char *seeds[] = {
        "{\"model\":\"m\",\"prompt\":\"abc\",\"max_tokens\":5,\"stream\":true,"
        "\"stream_options\":{\"include_usage\":true}}",
        "{\"model\":\"m\",\"prompt\":[1,2,3,70000]}",
        "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\","
        "\"text\":\"a\"}]}]}",
        EV1,
        EVU,
    };
    uint64_t x = 88172645463325252ull;
    char buf[512];
    kvr_buf out, hb;
    kvr_buf_init(&out);
    kvr_buf_init(&hb);
    fe_pool p;
    assert_int_equal(fe_pool_init(&p, "P", true, 1), 0);
    heartbeat(&hb, 1, "P-x", "m", 1, 1);
    for (int it = 0; it < 20000; it++) {
        const char *seed = seeds[it % 5];
        size_t n = strlen(seed);
        memcpy(buf, seed, n);
        int muts = 1 + it % 4;
        for (int k = 0; k < muts; k++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            size_t pos = (size_t)(x % n);
            switch ((x >> 32) % 3) {
            case 0:
                buf[pos] = (char)(x >> 40);
                break; /* flip a byte */
            case 1:
                n = pos + 1;
                break; /* truncate */
            default:
                buf[pos] = "{}[]\",:0-e\\"[(x >> 40) % 12]; /* structural byte */
            }
        }
        fe_req r;
        fe_http_error e;
        fe_req_init(&r);
        int rc = fe_parse_request(buf, n, it % 2, kvr_tok_byte(), &r, &e);
        assert_true(rc == 0 || (rc == KVR_EINVAL && e.status == 400));
        fe_relay rl;
        fe_relay_init(&rl, &r, "id", 1);
        rl.stream = it % 3 != 0;
        kvr_err ke;
        kvr_buf_reset(&out);
        rc = fe_relay_event(&rl, buf, n, &out, &ke);
        assert_true(rc >= 0 || rc == KVR_EINVAL);
        fe_relay_free(&rl);
        fe_req_free(&r);
        /* heartbeats: mutate the msgpack too */
        size_t hn = hb.len;
        memcpy(buf, hb.base, hn);
        buf[(x >> 8) % hn] = (char)(x >> 16);
        if (it % 7 == 0)
            hn = (x >> 24) % hn;
        (void)fe_pool_heartbeat(&p, buf, hn, 0, &ke);
        kvr_route_reply rep;
        (void)kvr_route_reply_decode(buf, hn, &rep, &ke);
    }
    assert_true(p.n <= FE_POOL_MAX_WORKERS);
    fe_pool_free(&p);
    kvr_buf_free(&out);
    kvr_buf_free(&hb);
}

/* A heartbeat from kvr_heartbeat_encode with adapters and a model card checksum. */
static void hb_lora(kvr_buf *b, uint64_t id, const char *mdc, const char *const *loras, uint32_t n,
                    uint32_t active)
{
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%u", (unsigned)(9000 + id));
    kvr_heartbeat hb = {.id = id,
                        .ns = kvr_slice_of("ns"),
                        .model = kvr_slice_of("m"),
                        .url = kvr_slice_of(url),
                        .role = kvr_slice_of("both"),
                        .mdc_sum = kvr_slice_of(mdc),
                        .block_size = 16,
                        .active = active};
    for (uint32_t i = 0; i < n; i++)
        hb.loras[hb.n_loras++] = kvr_slice_of(loras[i]);
    kvr_buf_reset(b);
    assert_int_equal(kvr_heartbeat_encode(b, &hb), 0);
}

/* Issue 13: adapters from heartbeats (kept, changed, freed), the LoRA and model-card filters
 * of the local choice, /v1/models with adapters. */
static void test_pool_lora_mdc(void **state)
{
    (void)state;
    fe_pool p;
    assert_int_equal(fe_pool_init(&p, "ns", false, 7), 0);
    kvr_buf b;
    kvr_buf_init(&b);
    static const char *const a[] = {"A", "B"}, *const c[] = {"C"};
    hb_lora(&b, 1, "tok1:good", a, 2, 9); /* busiest, lists A */
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, 1000, NULL), 0);
    hb_lora(&b, 2, "", NULL, 0, 0); /* idle, no adapters, unknown card */
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, 1000, NULL), 0);
    hb_lora(&b, 3, "tok1:bad", c, 1, 0); /* idle, another model card */
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, 1000, NULL), 0);
    assert_string_equal(fe_pool_lora_base(&p, "A", 1000), "m");
    assert_null(fe_pool_lora_base(&p, "Z", 1000));
    fe_filter fa = {.lora = "A", .mdc_sum = "tok1:good"};
    for (int i = 0; i < 4; i++) /* A: only worker 1, however loaded */
        assert_int_equal(fe_pool_choose_f(&p, FE_MODE_LEAST, "ns", "m", 1000, false, 0, &fa)->id,
                         1);
    fe_filter fz = {.lora = "Z", .mdc_sum = "tok1:good"}; /* nobody lists Z: any matching card */
    for (int i = 0; i < 8; i++) {
        fe_worker *w = fe_pool_choose_f(&p, FE_MODE_RANDOM, "ns", "m", 1000, false, 0, &fz);
        assert_true(w->id == 1 || w->id == 2);
    }
    fe_filter fc = {.lora = "C", .mdc_sum = "tok1:good"}; /* C only on a mismatched worker */
    assert_int_equal(fe_pool_choose_f(&p, FE_MODE_LEAST, "ns", "m", 1000, false, 0, &fc)->id, 2);
    assert_int_equal(fe_pool_choose(&p, FE_MODE_LEAST, "ns", "m", 1000, false, 0)->id, 2);
    char ns[FE_NS_MAX];
    assert_int_equal(fe_pool_pick_ns_f(&p, "m", 1000, &fa, ns), 0);
    assert_string_equal(ns, "ns");
    kvr_buf j;
    kvr_buf_init(&j);
    assert_int_equal(fe_pool_models_json(&p, 1000, &j), 0);
    assert_non_null(strstr(j.base, "\"id\":\"A\""));
    assert_non_null(strstr(j.base, "\"parent\":\"m\""));
    assert_non_null(strstr(j.base, "\"id\":\"C\""));
    kvr_buf_free(&j);
    /* the list changes, then the worker expires: no leak (valgrind run), no stale adapter */
    hb_lora(&b, 1, "tok1:good", c, 1, 9);
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, 1001, NULL), 0);
    assert_false(fe_worker_has_lora(fe_pool_find(&p, "ns", 1), "A"));
    assert_true(fe_worker_has_lora(fe_pool_find(&p, "ns", 1), "C"));
    hb_lora(&b, 1, "tok1:good", c, 1, 9); /* same list: kept */
    assert_int_equal(fe_pool_heartbeat(&p, b.base, b.len, 1002, NULL), 0);
    fe_pool_expire(&p, 1001 + p.ttl_ms + 1);
    assert_int_equal(p.n, 1);
    assert_null(fe_pool_lora_base(&p, "A", 1002));
    kvr_buf_free(&b);
    fe_pool_free(&p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_byte_tokenizer),
        cmocka_unit_test(test_chatml),
        cmocka_unit_test(test_json_escape),
        cmocka_unit_test(test_parse_completion),
        cmocka_unit_test(test_parse_errors),
        cmocka_unit_test(test_parse_whitespace),
        cmocka_unit_test(test_parse_chat),
        cmocka_unit_test(test_error_json),
        cmocka_unit_test(test_relay_chat_stream),
        cmocka_unit_test(test_relay_usage_hidden_and_aggregate),
        cmocka_unit_test(test_relay_utf8_split),
        cmocka_unit_test(test_auth),
        cmocka_unit_test(test_pool),
        cmocka_unit_test(test_pool_blind),
        cmocka_unit_test(test_pool_lora_mdc),
        cmocka_unit_test(test_pool_edges),
        cmocka_unit_test(test_mutations),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
