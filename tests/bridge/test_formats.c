/* bridge_formats: the engine schemas kvr-bridge must pass through, decoded by the routers' own
 * decoder (common/kv_event.h) and checked by the bridge (kvr_bridge_check_batch):
 * - what kvr-worker --kv-events zmq writes (worker/zmq_pub.h: vLLM's array events with their
 *   trailing lora_id/medium/lora_name, vLLM's map events, int and bytes hashes);
 * - SGLang's variants (python/sglang/srt/disaggregation/kv_events.py history): the original
 *   5-field BlockStored and hashes-only BlockRemoved, a cache_salt metadata map at array
 *   position 7 (#30827, the change that made Dynamo drop whole batches), and tagged-map
 *   events with extra keys (#37482).
 * Every such batch must be accepted whole (forwarded byte for byte, nothing rewritten).
 * Also the model card checksum (base/kvr_model_card.h) against a one-shot reference. */
#include "frame.h"
#include "kv_event.h"
#include "kvr_mp.h"
#include "kvr_model_card.h"
#include "zmq_pub.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <xxhash.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

static const uint64_t H[2] = {0x8000000000000001ull, 42};
static const uint32_t T[8] = {1, 2, 3, 4, 5, 6, 7, 8};

/* Checks a payload: accepted whole by the bridge and decoded as one BlockStored of H (parent
 * 77) with T in blocks of 4, then one BlockRemoved of H[0]. want_hash maps a hash as sent to
 * the u64 the decoder reports. */
static void expect_store_remove(const kvr_buf *in, bool bytes)
{
    kvr_kv_decoder d;
    kvr_kv_decoder_init(&d, NULL);
    kvr_buf out, scratch;
    kvr_buf_init(&out);
    kvr_buf_init(&scratch);
    kvr_bridge_check res;
    kvr_err err = {0};
    int rc = kvr_bridge_check_batch(&d, in->base, in->len, &out, &scratch, &res, &err);
    if (rc != 0)
        fail_msg("check_batch: %s", err.msg);
    assert_false(res.rewritten);
    assert_int_equal(res.good, 2);
    assert_int_equal(res.bad, 0);
    kvr_kv_batch b;
    assert_int_equal(kvr_kv_decode(&d, in->base, in->len, &b, NULL, NULL), 0);
    assert_int_equal(b.n_events, 2);
    const kvr_kv_event *s = &b.events[0], *r = &b.events[1];
    assert_int_equal(s->type, KVR_KV_STORED);
    assert_int_equal(s->n_hashes, 2);
    for (int i = 0; i < 2; i++)
        assert_true(s->hashes[i] == (bytes ? kvr_kv_hash_bytes_id(H[i]) : H[i]));
    assert_true(s->has_parent);
    assert_true(s->parent == (bytes ? kvr_kv_hash_bytes_id(77) : 77));
    assert_int_equal(s->n_tokens, 8);
    assert_memory_equal(s->tokens, T, sizeof T);
    assert_int_equal(s->block_size, 4);
    assert_int_equal(r->type, KVR_KV_REMOVED);
    assert_int_equal(r->n_hashes, 1);
    assert_true(r->hashes[0] == s->hashes[0]);
    kvr_buf_free(&out);
    kvr_buf_free(&scratch);
    kvr_kv_decoder_free(&d);
}

static void worker_encoding(void **st)
{
    (void)st;
    kvr_kv_event ev[2] = {{.type = KVR_KV_STORED,
                           .n_hashes = 2,
                           .hashes = H,
                           .has_parent = true,
                           .parent = 77,
                           .n_tokens = 8,
                           .tokens = T,
                           .block_size = 4},
                          {.type = KVR_KV_REMOVED, .n_hashes = 1, .hashes = H}};
    kvr_kv_batch batch = {.ts = 1789095808.8, .n_events = 2, .events = ev};
    for (int map = 0; map < 2; map++) {
        for (int bytes = 0; bytes < 2; bytes++) {
            kvr_buf b;
            kvr_buf_init(&b);
            assert_int_equal(wk_zmq_encode(&b, &batch, map, bytes, 3), 0);
            expect_store_remove(&b, bytes);
            /* the envelope is vLLM's positional [ts, events, dp_rank] in both forms */
            kvr_mp_reader r;
            kvr_mp_reader_init(&r, b.base, b.len);
            uint32_t n;
            double ts;
            assert_int_equal(kvr_mp_read_array(&r, &n), 0);
            assert_int_equal(n, 3);
            assert_int_equal(kvr_mp_read_double(&r, &ts), 0);
            assert_true(ts == 1789095808.8);
            assert_int_equal(kvr_mp_skip(&r), 0);
            int64_t dp;
            assert_int_equal(kvr_mp_read_int(&r, &dp), 0);
            assert_int_equal(dp, 3);
            /* array events carry vLLM's 8 BlockStored fields (lora_id, medium, lora_name) */
            if (!map) {
                kvr_mp_reader_init(&r, b.base, b.len);
                assert_int_equal(kvr_mp_read_array(&r, &n), 0);
                assert_int_equal(kvr_mp_skip(&r), 0);
                assert_int_equal(kvr_mp_read_array(&r, &n), 0);
                assert_int_equal(kvr_mp_read_array(&r, &n), 0);
                assert_int_equal(n, 8);
            }
            kvr_buf_free(&b);
        }
    }
    /* a block stored under a LoRA adapter names it (both forms), and decodes back */
    ev[0].lora_name = kvr_slice_of("sql-lora");
    for (int map = 0; map < 2; map++) {
        kvr_buf b;
        kvr_buf_init(&b);
        assert_int_equal(wk_zmq_encode(&b, &batch, map, 0, 0), 0);
        kvr_kv_decoder d;
        kvr_kv_decoder_init(&d, NULL);
        kvr_kv_batch got;
        assert_int_equal(kvr_kv_decode(&d, b.base, b.len, &got, NULL, NULL), 0);
        assert_true(kvr_slice_eq_cstr(got.events[0].lora_name, "sql-lora"));
        assert_int_equal(got.events[1].lora_name.len, 0);
        kvr_kv_decoder_free(&d);
        kvr_buf_free(&b);
    }
}

static void put_hashes(kvr_buf *b, int n)
{
    kvr_mp_write_array(b, (uint32_t)n);
    for (int i = 0; i < n; i++)
        kvr_mp_write_uint(b, H[i]);
}

static void put_tokens(kvr_buf *b)
{
    kvr_mp_write_array(b, 8);
    for (int i = 0; i < 8; i++)
        kvr_mp_write_uint(b, T[i]);
}

/* [ts, [stored, removed], 0] with SGLang's array events: variant 0 = the original 5-field
 * BlockStored / hashes-only BlockRemoved; 1 = medium (#18205) and the cache_salt map at
 * position 7 (#30827) */
static void sglang_array(void **st)
{
    (void)st;
    for (int v = 0; v < 2; v++) {
        kvr_buf b;
        kvr_buf_init(&b);
        kvr_mp_write_array(&b, 3);
        kvr_mp_write_double(&b, 12.5);
        kvr_mp_write_array(&b, 2);
        kvr_mp_write_array(&b, v ? 8 : 5);
        kvr_mp_write_cstr(&b, "BlockStored");
        put_hashes(&b, 2);
        kvr_mp_write_uint(&b, 77);
        put_tokens(&b);
        kvr_mp_write_uint(&b, 4);
        if (v) {
            kvr_mp_write_nil(&b);         /* lora_id */
            kvr_mp_write_cstr(&b, "GPU"); /* medium */
            kvr_mp_write_map(&b, 2);      /* cache_salt and friends */
            kvr_mp_write_cstr(&b, "cache_salt");
            kvr_mp_write_cstr(&b, "tenant-7");
            kvr_mp_write_cstr(&b, "extra");
            kvr_mp_write_array(&b, 1);
            kvr_mp_write_uint(&b, 1);
        }
        kvr_mp_write_array(&b, v ? 3 : 2);
        kvr_mp_write_cstr(&b, "BlockRemoved");
        put_hashes(&b, 1);
        if (v)
            kvr_mp_write_cstr(&b, "GPU");
        kvr_mp_write_uint(&b, 0);
        expect_store_remove(&b, false);
        kvr_buf_free(&b);
    }
}

/* SGLang's tagged-map events (#37482) with keys vLLM does not have */
static void sglang_tagged_maps(void **st)
{
    (void)st;
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_mp_write_array(&b, 3);
    kvr_mp_write_double(&b, 12.5);
    kvr_mp_write_array(&b, 2);
    kvr_mp_write_map(&b, 8);
    kvr_mp_write_cstr(&b, "cache_salt"); /* unknown keys first: order must not matter */
    kvr_mp_write_map(&b, 1);
    kvr_mp_write_cstr(&b, "salt");
    kvr_mp_write_cstr(&b, "abc");
    kvr_mp_write_cstr(&b, "type");
    kvr_mp_write_cstr(&b, "BlockStored");
    kvr_mp_write_cstr(&b, "block_hashes");
    put_hashes(&b, 2);
    kvr_mp_write_cstr(&b, "parent_block_hash");
    kvr_mp_write_uint(&b, 77);
    kvr_mp_write_cstr(&b, "token_ids");
    put_tokens(&b);
    kvr_mp_write_cstr(&b, "block_size");
    kvr_mp_write_uint(&b, 4);
    kvr_mp_write_cstr(&b, "medium");
    kvr_mp_write_cstr(&b, "GPU");
    kvr_mp_write_cstr(&b, "priority");
    kvr_mp_write_int(&b, -1);
    kvr_mp_write_map(&b, 3);
    kvr_mp_write_cstr(&b, "type");
    kvr_mp_write_cstr(&b, "BlockRemoved");
    kvr_mp_write_cstr(&b, "block_hashes");
    put_hashes(&b, 1);
    kvr_mp_write_cstr(&b, "medium");
    kvr_mp_write_nil(&b);
    kvr_mp_write_uint(&b, 0);
    expect_store_remove(&b, false);
    kvr_buf_free(&b);
}

static void write_file(const char *dir, const char *name, const char *text)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* the reference: model_card.h's format, computed in one shot over the concatenation */
static void ref_add(kvr_buf *b, const char *name, const char *text)
{
    kvr_buf_append(b, name, strlen(name) + 1);
    uint64_t n = text ? strlen(text) : UINT64_MAX;
    for (int i = 0; i < 8; i++) {
        uint8_t c = (uint8_t)(n >> (8 * i));
        kvr_buf_append(b, &c, 1);
    }
    if (text)
        kvr_buf_append(b, text, strlen(text));
}

static void model_card(void **st)
{
    (void)st;
    char dir[] = "/tmp/kvr-model-card-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char sum[32], sum2[32], want[32];
    kvr_err err = {0};
    assert_int_equal(kvr_model_card_sum(dir, sum, sizeof sum, &err), KVR_ENOTFOUND);
    write_file(dir, "tokenizer.json", "{\"model\":{\"type\":\"BPE\"}}");
    write_file(dir, "tokenizer_config.json", "{\"chat_template\":\"{{ messages }}\"}");
    assert_int_equal(kvr_model_card_sum(dir, sum, sizeof sum, &err), 0);
    kvr_buf b;
    kvr_buf_init(&b);
    ref_add(&b, "tokenizer.json", "{\"model\":{\"type\":\"BPE\"}}");
    ref_add(&b, "tokenizer_config.json", "{\"chat_template\":\"{{ messages }}\"}");
    ref_add(&b, "chat_template.jinja", NULL);
    snprintf(want, sizeof want, "tok1:%016llx", (unsigned long long)XXH3_64bits(b.base, b.len));
    assert_string_equal(sum, want);
    /* another chat template, in its own file: another sum */
    write_file(dir, "chat_template.jinja", "{{ messages }}");
    assert_int_equal(kvr_model_card_sum(dir, sum2, sizeof sum2, &err), 0);
    assert_string_not_equal(sum, sum2);
    assert_int_equal(kvr_model_card_sum(dir, sum2, 8, &err), KVR_EINVAL);
    char p[512];
    snprintf(p, sizeof p, "%s/chat_template.jinja", dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/tokenizer_config.json", dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/tokenizer.json", dir);
    unlink(p);
    rmdir(dir);
    kvr_buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest t[] = {
        cmocka_unit_test(worker_encoding), cmocka_unit_test(sglang_array),
        cmocka_unit_test(sglang_tagged_maps), cmocka_unit_test(model_card)};
    return cmocka_run_group_tests(t, NULL, NULL);
}
