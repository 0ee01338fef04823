/* kvr_heartbeat: round trip, unknown keys skipped, missing keys reported, wrong types refused. */
#include "kvr_err.h"
#include "kvr_heartbeat.h"
#include "kvr_mp.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>
#include <cmocka.h>

static void test_round_trip(void **state)
{
    kvr_heartbeat in = {.id = 7,
                        .ns = KVR_SLICE_LIT("ns"),
                        .model = KVR_SLICE_LIT("m"),
                        .url = KVR_SLICE_LIT("http://127.0.0.1:9001"),
                        .role = KVR_SLICE_LIT("both"),
                        .mdc_sum = KVR_SLICE_LIT("abc"),
                        .block_size = 64,
                        .capacity_blocks = 16384,
                        .active = 3,
                        .waiting = 1,
                        .used_blocks = 900,
                        .started_ms = 1763790000000ull};
    kvr_buf b;
    kvr_buf_init(&b);
    assert_int_equal(kvr_heartbeat_encode(&b, &in), 0);
    kvr_heartbeat out;
    assert_int_equal(kvr_heartbeat_decode(b.base, b.len, &out), 0);
    assert_int_equal(out.has, (1u << 12) - 1);
    assert_int_equal(out.id, 7);
    assert_true(kvr_slice_eq_cstr(out.url, "http://127.0.0.1:9001"));
    assert_true(kvr_slice_eq_cstr(out.mdc_sum, "abc"));
    assert_int_equal(out.block_size, 64);
    assert_int_equal(out.used_blocks, 900);
    assert_int_equal(out.started_ms, 1763790000000ull);
    /* every truncation is refused */
    for (size_t n = 0; n < b.len; n++)
        assert_int_not_equal(kvr_heartbeat_decode(b.base, n, &out), 0);
    kvr_buf_free(&b);
}

static void test_unknown_and_missing(void **state)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_mp_write_map(&b, 3);
    kvr_mp_write_cstr(&b, "id");
    kvr_mp_write_uint(&b, 9);
    kvr_mp_write_cstr(&b, "future_field");
    kvr_mp_write_array(&b, 2);
    kvr_mp_write_nil(&b);
    kvr_mp_write_cstr(&b, "x");
    kvr_mp_write_cstr(&b, "block_size");
    kvr_mp_write_uint(&b, 16);
    kvr_heartbeat hb;
    assert_int_equal(kvr_heartbeat_decode(b.base, b.len, &hb), 0);
    assert_int_equal(hb.has, KVR_HB_ID | KVR_HB_BLOCK_SIZE);
    assert_int_equal(hb.id, 9);
    assert_int_equal(hb.ns.len, 0);
    kvr_buf_free(&b);
}

static void test_wrong_types(void **state)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_mp_write_map(&b, 1);
    kvr_mp_write_cstr(&b, "id");
    kvr_mp_write_cstr(&b, "seven");
    kvr_heartbeat hb;
    assert_int_equal(kvr_heartbeat_decode(b.base, b.len, &hb), KVR_ETYPE);
    kvr_buf_reset(&b);
    kvr_mp_write_map(&b, 1);
    kvr_mp_write_cstr(&b, "url");
    kvr_mp_write_uint(&b, 1);
    assert_int_equal(kvr_heartbeat_decode(b.base, b.len, &hb), KVR_ETYPE);
    kvr_buf_reset(&b);
    kvr_mp_write_array(&b, 0);
    assert_int_equal(kvr_heartbeat_decode(b.base, b.len, &hb), KVR_ETYPE);
    kvr_buf_free(&b);
}

/* "loras": encoded only when non-empty, decoded as borrowed names, bounded before use. */
static void test_loras(void **state)
{
    (void)state;
    kvr_heartbeat in = {.id = 3, .block_size = 16};
    kvr_buf b;
    kvr_buf_init(&b);
    assert_int_equal(kvr_heartbeat_encode(&b, &in), 0);
    kvr_heartbeat out;
    assert_int_equal(kvr_heartbeat_decode(b.base, b.len, &out), 0);
    assert_false(out.has & KVR_HB_LORAS);
    assert_int_equal(out.n_loras, 0);
    kvr_buf_reset(&b);
    in.loras[0] = kvr_slice_of("sql-lora");
    in.loras[1] = kvr_slice_of("chat-lora");
    in.n_loras = 2;
    assert_int_equal(kvr_heartbeat_encode(&b, &in), 0);
    assert_int_equal(kvr_heartbeat_decode(b.base, b.len, &out), 0);
    assert_true(out.has & KVR_HB_LORAS);
    assert_int_equal(out.n_loras, 2);
    assert_true(kvr_slice_eq_cstr(out.loras[0], "sql-lora"));
    assert_true(kvr_slice_eq_cstr(out.loras[1], "chat-lora"));
    assert_true(out.loras[1].base >= b.base && out.loras[1].base < b.base + b.len); /* borrowed */
    for (size_t n = 0; n < b.len; n++)
        assert_int_not_equal(kvr_heartbeat_decode(b.base, n, &out), 0);
    /* over the bounds: refused by the encoder and by the decoder */
    static char big[KVR_LORA_NAME_MAX + 1];
    memset(big, 'a', sizeof big);
    in.loras[1] = (kvr_slice){big, sizeof big};
    assert_int_equal(kvr_heartbeat_encode(&b, &in), KVR_EINVAL);
    in.n_loras = KVR_HB_MAX_LORAS + 1;
    assert_int_equal(kvr_heartbeat_encode(&b, &in), KVR_EINVAL);
    kvr_buf_reset(&b);
    kvr_mp_write_map(&b, 1);
    kvr_mp_write_cstr(&b, "loras");
    kvr_mp_write_array(&b, 1);
    kvr_mp_write_str(&b, big, sizeof big);
    assert_int_equal(kvr_heartbeat_decode(b.base, b.len, &out), KVR_ELIMIT);
    kvr_buf_reset(&b);
    kvr_mp_write_map(&b, 1);
    kvr_mp_write_cstr(&b, "loras");
    kvr_mp_write_array(&b, KVR_HB_MAX_LORAS + 1);
    for (int i = 0; i <= KVR_HB_MAX_LORAS; i++)
        kvr_mp_write_cstr(&b, "x");
    assert_int_equal(kvr_heartbeat_decode(b.base, b.len, &out), KVR_ELIMIT);
    kvr_buf_reset(&b);
    kvr_mp_write_map(&b, 1);
    kvr_mp_write_cstr(&b, "loras");
    kvr_mp_write_cstr(&b, "not-an-array");
    assert_int_equal(kvr_heartbeat_decode(b.base, b.len, &out), KVR_ETYPE);
    kvr_buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_unknown_and_missing),
        cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_loras),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
