/* bridge_frame: the bridge's engine-side codecs: seq frames, both replay layouts, batch
 * validation that keeps a bad event's good neighbours (array and map envelopes), the clear
 * batch, and the /metrics reader (vLLM and SGLang names, DP engine label). */
#include "frame.h"
#include "kv_event.h"
#include "kvr_mp.h"
#include "scrape.h"

#include <stdio.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

static void seq_frames(void **st)
{
    uint64_t s;
    uint8_t b[8] = {0, 0, 0, 0, 0, 0, 1, 2};
    assert_int_equal(kvr_bridge_read_seq(b, 8, &s), 0);
    assert_int_equal(s, 258);
    assert_int_equal(kvr_bridge_read_seq(b, 7, &s), KVR_EINVAL);
    uint8_t end[8];
    memset(end, 0xff, 8);
    kvr_bridge_frame old[2] = {{end, 8}, {"", 0}};
    kvr_bridge_frame neu[3] = {{"t", 1}, {b, 8}, {"xy", 2}};
    kvr_bridge_frame pl;
    assert_int_equal(kvr_bridge_parse_replay(old, 2, &s, &pl, NULL), 0);
    assert_true(s == KVR_BRIDGE_SEQ_END);
    assert_int_equal(kvr_bridge_parse_replay(neu, 3, &s, &pl, NULL), 0);
    assert_int_equal(s, 258);
    assert_int_equal(pl.len, 2);
    assert_int_equal(kvr_bridge_parse_replay(neu, 1, &s, &pl, NULL), KVR_EINVAL);
    kvr_bridge_frame badseq[2] = {{"abc", 3}, {"", 0}};
    assert_int_equal(kvr_bridge_parse_replay(badseq, 2, &s, &pl, NULL), KVR_EINVAL);
}

/* ["BlockStored", [h], nil, tokens(bs), bs, nil] */
static void stored(kvr_buf *b, uint64_t h, uint32_t bs, uint32_t ntok)
{
    kvr_mp_write_array(b, 6);
    kvr_mp_write_cstr(b, "BlockStored");
    kvr_mp_write_array(b, 1);
    kvr_mp_write_uint(b, h);
    kvr_mp_write_nil(b);
    kvr_mp_write_array(b, ntok);
    for (uint32_t i = 0; i < ntok; i++)
        kvr_mp_write_uint(b, i);
    kvr_mp_write_uint(b, bs);
    kvr_mp_write_nil(b);
}

static void salvage(void **st, bool map)
{
    kvr_kv_decoder d;
    kvr_kv_decoder_init(&d, NULL);
    kvr_buf in, out, scratch;
    kvr_buf_init(&in);
    kvr_buf_init(&out);
    kvr_buf_init(&scratch);
    if (map) {
        kvr_mp_write_map(&in, 3);
        kvr_mp_write_cstr(&in, "ts");
        kvr_mp_write_double(&in, 1.5);
        kvr_mp_write_cstr(&in, "events");
    } else {
        kvr_mp_write_array(&in, 3);
        kvr_mp_write_double(&in, 1.5);
    }
    kvr_mp_write_array(&in, 3);
    stored(&in, 7, 4, 4);
    stored(&in, 8, 4, 3); /* bad: 3 tokens for one block of 4 */
    stored(&in, 9, 4, 4);
    if (map)
        kvr_mp_write_cstr(&in, "data_parallel_rank");
    kvr_mp_write_uint(&in, 1);
    kvr_bridge_check res;
    assert_int_equal(kvr_bridge_check_batch(&d, in.base, in.len, &out, &scratch, &res, NULL), 0);
    assert_true(res.rewritten);
    assert_int_equal(res.good, 2);
    assert_int_equal(res.bad, 1);
    kvr_kv_batch b;
    assert_int_equal(kvr_kv_decode(&d, out.base, out.len, &b, NULL, NULL), 0);
    assert_int_equal(b.n_events, 2);
    assert_int_equal(b.events[0].hashes[0], 7);
    assert_int_equal(b.events[1].hashes[0], 9);
    assert_true(b.has_dp_rank && b.dp_rank == 1);
    /* a good batch is forwarded as it is */
    kvr_buf_reset(&in);
    kvr_mp_write_array(&in, 2);
    kvr_mp_write_double(&in, 1.5);
    kvr_mp_write_array(&in, 1);
    stored(&in, 7, 4, 4);
    assert_int_equal(kvr_bridge_check_batch(&d, in.base, in.len, &out, &scratch, &res, NULL), 0);
    assert_false(res.rewritten);
    assert_int_equal(res.good, 1);
    /* garbage envelopes */
    static const uint8_t g1[] = {0xc1}, g2[] = {0x92, 0x01}, g3[] = {0x91, 0x01};
    assert_int_equal(kvr_bridge_check_batch(&d, g1, 1, &out, &scratch, &res, NULL), KVR_EINVAL);
    assert_int_equal(kvr_bridge_check_batch(&d, g2, 2, &out, &scratch, &res, NULL), KVR_EINVAL);
    assert_int_equal(kvr_bridge_check_batch(&d, g3, 2, &out, &scratch, &res, NULL), KVR_EINVAL);
    kvr_buf_free(&in);
    kvr_buf_free(&out);
    kvr_buf_free(&scratch);
    kvr_kv_decoder_free(&d);
}

static void salvage_array(void **st)
{
    salvage(st, false);
}
static void salvage_map(void **st)
{
    salvage(st, true);
}

static void clear_batch(void **st)
{
    kvr_buf b;
    kvr_buf_init(&b);
    assert_int_equal(kvr_bridge_encode_clear(&b, 2.0, 3), 0);
    kvr_kv_decoder d;
    kvr_kv_decoder_init(&d, NULL);
    kvr_kv_batch k;
    assert_int_equal(kvr_kv_decode(&d, b.base, b.len, &k, NULL, NULL), 0);
    assert_int_equal(k.n_events, 1);
    assert_int_equal(k.events[0].type, KVR_KV_CLEARED);
    assert_int_equal(k.dp_rank, 3);
    kvr_kv_decoder_free(&d);
    kvr_buf_free(&b);
}

static void metrics(void **st)
{
    const char *v =
        "# HELP x\n"
        "vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3\n"
        "vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 5\n"
        "vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 2\n"
        "vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.25\n"
        "vllm:cache_config_info{block_size=\"16\",engine=\"1\",num_gpu_blocks=\"800\"} 1\n";
    kvr_bridge_scrape s;
    kvr_bridge_parse_metrics(v, strlen(v), 1, 2, &s);
    assert_true(s.running == 5 && s.waiting == 2 && s.usage == 0.25);
    assert_int_equal(s.block_size, 16);
    assert_int_equal(s.capacity, 800);
    assert_string_equal(s.model, "m");
    const char *g =
        "sglang:num_running_reqs{model_name=\"q\"} 4\nsglang:num_queue_reqs{model_name=\"q\"} 1\n"
        "sglang:token_usage{model_name=\"q\"} 0.5\n"
        "sglang:cache_config_info{page_size=\"32\",num_pages=\"100\"} 1";
    kvr_bridge_parse_metrics(g, strlen(g), 0, 1, &s);
    assert_true(s.running == 4 && s.waiting == 1 && s.usage == 0.5);
    assert_int_equal(s.block_size, 32);
    assert_int_equal(s.capacity, 100);
}

/* vllm:lora_requests_info as vLLM's v1 loggers expose it: a gauge set to the current time
 * under labels that change, every label set ever seen still exposed; the latest wins. */
static void metrics_loras(void **st)
{
    (void)st;
    const char *v =
        "# HELP vllm:lora_requests_info Running stats on lora requests.\n"
        "# TYPE vllm:lora_requests_info gauge\n"
        "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"\","
        "waiting_lora_adapters=\"\"} 1.7651e+09\n"
        "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"sql-lora,chat-lora\","
        "waiting_lora_adapters=\"sql-lora, tool-lora\"} 1.765100042e+09\n"
        "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"old-lora\","
        "waiting_lora_adapters=\"\"} 1.76510001e+09\n"
        "vllm:num_requests_running{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B\"} 2\n";
    kvr_bridge_scrape s;
    kvr_bridge_parse_metrics(v, strlen(v), 0, 1, &s);
    assert_true(s.has_loras);
    assert_int_equal(s.n_loras, 3);
    assert_string_equal(s.loras[0], "sql-lora");
    assert_string_equal(s.loras[1], "chat-lora");
    assert_string_equal(s.loras[2], "tool-lora");
    assert_true(s.running == 2);
    /* the latest series is the empty one: no adapters */
    const char *e = "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"a\","
                    "waiting_lora_adapters=\"\"} 100\n"
                    "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"\","
                    "waiting_lora_adapters=\"\"} 200\n";
    kvr_bridge_parse_metrics(e, strlen(e), 0, 1, &s);
    assert_true(s.has_loras);
    assert_int_equal(s.n_loras, 0);
    /* bounded: 70 names, one too long; at most KVR_HB_MAX_LORAS kept, the long one skipped */
    static char big[4000];
    size_t n =
        (size_t)snprintf(big, sizeof big, "vllm:lora_requests_info{running_lora_adapters=\"");
    memset(big + n, 'x', KVR_LORA_NAME_MAX + 1);
    n += KVR_LORA_NAME_MAX + 1;
    for (int i = 0; i < 70; i++)
        n += (size_t)snprintf(big + n, sizeof big - n, ",l%d", i);
    n += (size_t)snprintf(big + n, sizeof big - n, "\",waiting_lora_adapters=\"\"} 1\n");
    kvr_bridge_parse_metrics(big, n, 0, 1, &s);
    assert_int_equal(s.n_loras, KVR_HB_MAX_LORAS);
    assert_string_equal(s.loras[0], "l0");
    /* no such series: none, and not "has" */
    kvr_bridge_parse_metrics("x 1\n", 4, 0, 1, &s);
    assert_false(s.has_loras);
}

int main(void)
{
    const struct CMUnitTest t[] = {cmocka_unit_test(seq_frames),  cmocka_unit_test(salvage_array),
                                   cmocka_unit_test(salvage_map), cmocka_unit_test(clear_batch),
                                   cmocka_unit_test(metrics),     cmocka_unit_test(metrics_loras)};
    return cmocka_run_group_tests(t, NULL, NULL);
}
