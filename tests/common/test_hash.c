/* kvr_hash against vectors computed independently in Python (gen_hash_vectors.py with
 * python3-xxhash), checked in as hash_vectors.txt. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>

#include "kv_event.h"
#include "kvr_hash.h"
#include "testutil.h"

#ifndef KVR_TEST_DATA_DIR
#error "KVR_TEST_DATA_DIR must be defined"
#endif

#define MAXV 4096

static uint64_t parse_u64(const char *s)
{
    assert_non_null(s);
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    assert_true(*end == '\0' && errno == 0);
    return v;
}

/* Reads count tokens after a line's keyword into v; returns how many (rest of line). */
static size_t read_list(char **p, uint64_t *v, size_t cap)
{
    char *line = tu_line(p);
    size_t n = 0;
    for (char *t; (t = tu_tok(&line)) != NULL;) {
        assert_true(n < cap);
        v[n++] = parse_u64(t);
    }
    return n;
}

static void test_vectors(void **state)
{
    char *data = tu_read_file(KVR_TEST_DATA_DIR "/hash_vectors.txt", NULL);
    assert_non_null(data);
    char *p = data;
    static uint64_t toks[MAXV], local[MAXV], seq[MAXV], seqp[MAXV + 1], got[MAXV];
    static uint32_t t32[MAXV];
    int cases = 0, bytes_cases = 0, kv_cases = 0;
    int block_sizes_seen = 0;
    for (char *kw; (kw = tu_tok(&p)) != NULL;) {
        if (kw[0] == '#') {
            tu_line(&p);
        } else if (strcmp(kw, "case") == 0) {
            tu_tok(&p); /* name */
            uint32_t bs = (uint32_t)parse_u64(tu_tok(&p));
            size_t n = parse_u64(tu_tok(&p));
            assert_string_equal(tu_tok(&p), "tokens");
            assert_int_equal(read_list(&p, toks, MAXV), n);
            assert_string_equal(tu_tok(&p), "local");
            size_t nl = read_list(&p, local, MAXV);
            assert_string_equal(tu_tok(&p), "seq");
            assert_int_equal(read_list(&p, seq, MAXV), nl);
            assert_string_equal(tu_tok(&p), "seqp");
            assert_int_equal(read_list(&p, seqp, MAXV + 1), nl + 1);
            assert_int_equal(nl, n / bs);
            for (size_t i = 0; i < n; i++)
                t32[i] = (uint32_t)toks[i];
            for (size_t i = 0; i < nl; i++)
                assert_true(kvr_hash_block(t32 + i * bs, bs) == local[i]);
            for (size_t i = 1; i < nl; i++)
                assert_true(kvr_hash_chain(seq[i - 1], local[i]) == seq[i]);
            assert_int_equal(kvr_hash_seq(t32, n, bs, false, 0, got, MAXV), nl);
            for (size_t i = 0; i < nl; i++)
                assert_true(got[i] == seq[i]);
            assert_int_equal(kvr_hash_seq(t32, n, bs, true, seqp[0], got, MAXV), nl);
            for (size_t i = 0; i < nl; i++)
                assert_true(got[i] == seqp[i + 1]);
            /* max_out caps the output */
            if (nl > 1)
                assert_int_equal(kvr_hash_seq(t32, n, bs, false, 0, got, 1), 1);
            block_sizes_seen |= bs == 1 ? 1 : bs == 16 ? 2 : bs == 64 ? 4 : 0;
            cases++;
        } else if (strcmp(kw, "bytes") == 0) {
            unsigned char b[512];
            size_t n = tu_unhex(tu_tok(&p), b, sizeof b);
            assert_true(kvr_hash_bytes(b, n) == parse_u64(tu_tok(&p)));
            bytes_cases++;
        } else if (strcmp(kw, "kvbytes") == 0) {
            uint64_t h = parse_u64(tu_tok(&p));
            unsigned char want[32];
            assert_int_equal(tu_unhex(tu_tok(&p), want, sizeof want), 32);
            uint8_t b[32];
            kvr_kv_hash_to_bytes(h, b);
            assert_memory_equal(b, want, 32);
            assert_true(kvr_kv_hash_bytes_id(h) == parse_u64(tu_tok(&p)));
            kv_cases++;
        } else {
            fail_msg("unknown keyword %s", kw);
        }
    }
    assert_true(cases >= 12);
    assert_int_equal(block_sizes_seen, 7);
    assert_true(bytes_cases >= 3);
    assert_true(kv_cases >= 3);
    free(data);
}

static void test_block_size_zero_and_partial(void **state)
{
    uint32_t t[20] = {0};
    uint64_t out[4];
    assert_int_equal(kvr_hash_seq(t, 20, 0, false, 0, out, 4), 0);
    assert_int_equal(kvr_hash_seq(t, 15, 16, false, 0, out, 4), 0);
    assert_int_equal(kvr_hash_seq(t, 20, 16, false, 0, out, 4), 1);
    /* "hello": docs/DEPENDENCIES.md 3 */
    assert_true(kvr_hash_bytes("hello", 5) == 0x9555e8555c62dcfdull);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vectors),
        cmocka_unit_test(test_block_size_zero_and_partial),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
