/* Units for the NATS security pieces: URL redaction (every credential form), the NKEY codec
 * against a seed/public pair and a signature made by tests/nats/nkeys.py's independent
 * implementation (python3-cryptography, fixed below), .creds parsing, and the shared flags. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvr_nats.h"
#include "kvr_nats_flags.h"
#include "kvr_nkey.h"

static void test_redact(void **state)
{
    (void)state;
    static const struct {
        const char *in, *want;
    } cases[] = {
        {"nats://alice:s3cret@10.0.0.1:4222", "nats://***@10.0.0.1:4222"},
        {"nats://t0ken@h:4222", "nats://***@h:4222"},
        {"tls://u:p@a:1,nats://b:2,c:pw@d:3", "tls://***@a:1,nats://b:2,***@d:3"},
        {"nats://127.0.0.1:4222", "nats://127.0.0.1:4222"},
        {"u:p@ss@h:4222", "***@h:4222"}, /* an @ inside the password */
        {"", ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char out[256];
        assert_string_equal(kvr_nats_redact_url(cases[i].in, out, sizeof out), cases[i].want);
    }
    char small[8];
    kvr_nats_redact_url("nats://alice:s3cret@h:1", small, sizeof small);
    assert_null(strstr(small, "s3c"));
    assert_int_equal(strlen(small), 7);
}

/* From nkeys.py (python3-cryptography), not from kvr_nkey. */
#define SEED "SUACS7RY2HI6R6VN5HZB7VUM767DK3FYV7H6QBBSSMRA7PQADYNQOOCADQ"
#define PUB "UBA2ZNYQFTTBMDFXMC5PKO3I3KHGJ2XS4PTDGOSPRZJB26UYCS5DKZZ5"
#define SIG_NONCE                                                                                  \
    "6PHqNRdVQhMBdvHMOs6PFsTclN6qDRpVsJIpN7OyYswCv2jY3gI2dBXP0Zxed9TV9JGroA-Rcra5gxVaAFqRBA"

static void test_nkey(void **state)
{
    (void)state;
    char pub[KVR_NKEY_PUB_LEN + 1], sig[KVR_NKEY_SIG_LEN + 1];
    kvr_err err = {0};
    assert_int_equal(kvr_nkey_public(SEED, pub, &err), 0);
    assert_string_equal(pub, PUB);
    assert_int_equal(kvr_nkey_sign(SEED, "nonce", 5, sig, &err), 0);
    assert_int_equal(strlen(sig), KVR_NKEY_SIG_LEN);
    assert_string_equal(sig, SIG_NONCE);
    char bad[] = SEED;
    bad[10] = bad[10] == 'A' ? 'B' : 'A'; /* checksum */
    assert_int_equal(kvr_nkey_public(bad, pub, &err), KVR_EINVAL);
    assert_int_equal(kvr_nkey_public(PUB, pub, &err), KVR_EINVAL); /* not a seed */
    assert_int_equal(kvr_nkey_public("", pub, &err), KVR_EINVAL);
}

static void test_creds(void **state)
{
    (void)state;
    const char *text = "-----BEGIN NATS USER JWT-----\neyJ.abc.def\n------END NATS USER JWT------\n"
                       "\n*** IMPORTANT ***\n\n-----BEGIN USER NKEY SEED-----\n" SEED
                       "\n------END USER NKEY SEED------\n";
    char *jwt = NULL, *seed = NULL;
    kvr_err err = {0};
    assert_int_equal(kvr_nkey_parse_creds(text, &jwt, &seed, &err), 0);
    assert_string_equal(jwt, "eyJ.abc.def");
    assert_string_equal(seed, SEED);
    free(jwt);
    kvr_nkey_wipe(seed);
    assert_int_equal(kvr_nkey_parse_creds("-----BEGIN NATS USER JWT-----\nx\n", &jwt, &seed, &err),
                     KVR_EINVAL);
    assert_null(jwt);
    assert_null(seed);
}

static void test_flags(void **state)
{
    (void)state;
    kvr_nats_flags nf = {0};
    kvr_flag flags[] = {KVR_NATS_FLAG_ENTRIES(&nf)};
    char *argv[] = {"--nats-creds", "/c.creds", "--nats-tls-ca=/ca.pem"};
    kvr_err err = {0};
    assert_int_equal(kvr_flags_parse(flags, KVR_NATS_FLAGS_N, 3, argv, NULL, 0, NULL, &err), 0);
    assert_int_equal(kvr_nats_flags_load(&nf, &err), 0);
    kvr_nats_opts o = {0};
    kvr_nats_flags_fill(&nf, &o);
    assert_string_equal(o.creds_file, "/c.creds");
    assert_string_equal(o.tls_ca_file, "/ca.pem");
    char *fw[8];
    int n = 0;
    assert_int_equal(kvr_nats_flags_argv(&nf, fw, &n, 8), 0);
    assert_int_equal(n, 4);
    assert_string_equal(fw[0], "--nats-creds");
    assert_string_equal(fw[3], "/ca.pem");
    /* two authentication methods at once are refused */
    assert_int_equal(kvr_nats_flags_set(&nf, "nats-user", 9, "bob"), 1);
    assert_int_equal(kvr_nats_flags_load(&nf, &err), KVR_EINVAL);
    assert_int_equal(kvr_nats_flags_set(&nf, "nats-nope", 9, "x"), 0);
    kvr_nats_flags_free(&nf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_redact),
        cmocka_unit_test(test_nkey),
        cmocka_unit_test(test_creds),
        cmocka_unit_test(test_flags),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
