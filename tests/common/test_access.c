/* Unit tests: kvr_access (Bearer check, token files, worker URL allow-list). */
#include "kvr_access.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

#include <cmocka.h>

static bool ok(const char *key, const char *h)
{
    return kvr_bearer_ok(key, h, strlen(h));
}

static void test_bearer(void **state)
{
    (void)state;
    assert_true(ok("tok", "Bearer tok"));
    assert_true(ok("tok", "bearer tok"));
    assert_true(ok("tok", "bEaReR \ttok "));
    assert_false(ok("tok", "Bearer TOK"));
    assert_false(ok("tok", "Bearer to"));
    assert_false(ok("tok", "Bearer tokk"));
    assert_false(ok("tok", "Bearertok"));
    assert_false(ok("tok", "Basic tok"));
    assert_false(ok("tok", "Bearer"));
    assert_false(ok("", "Bearer "));
    assert_false(ok(NULL, "Bearer x"));
}

static void test_token_file(void **state)
{
    (void)state;
    char path[] = "/tmp/kvr-access-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "  s3cret\n", 9), 9);
    close(fd);
    char *t = NULL;
    kvr_err err = {0};
    assert_int_equal(kvr_token_file_read(path, &t, &err), 0);
    assert_string_equal(t, "s3cret");
    free(t);
    fd = open(path, O_WRONLY | O_TRUNC);
    assert_int_equal(write(fd, "\n \n", 3), 3);
    close(fd);
    assert_int_equal(kvr_token_file_read(path, &t, &err), KVR_EINVAL);
    assert_null(t);
    unlink(path);
    assert_int_equal(kvr_token_file_read(path, &t, &err), KVR_EIO);
}

static bool url_ok(const kvr_cidr_list *l, const char *u)
{
    return kvr_cidr_url_allowed(l, u, strlen(u));
}

static void test_cidr(void **state)
{
    (void)state;
    kvr_cidr_list l = {0};
    kvr_err err = {0};
    assert_false(url_ok(&l, "http://127.0.0.1:80"));
    assert_int_equal(kvr_cidr_list_add_csv(&l, "private", &err), 0);
    assert_true(url_ok(&l, "http://127.0.0.1:8000"));
    assert_true(url_ok(&l, "http://10.1.2.3:8000/"));
    assert_true(url_ok(&l, "http://172.31.255.255"));
    assert_false(url_ok(&l, "http://172.32.0.1:80"));
    assert_true(url_ok(&l, "http://192.168.0.9:1"));
    assert_true(url_ok(&l, "http://[::1]:8000"));
    assert_true(url_ok(&l, "http://[fd00::5]:8000"));
    assert_false(url_ok(&l, "http://[2001:db8::1]:8000"));
    assert_false(url_ok(&l, "http://8.8.8.8:80"));
    assert_false(url_ok(&l, "http://evil.example:80"));
    assert_false(url_ok(&l, "http://127.0.0.1@evil.example:80"));
    assert_false(url_ok(&l, "http://2130706433:80")); /* curl's shorthand forms are refused */
    assert_false(url_ok(&l, "127.0.0.1:80"));
    assert_false(url_ok(&l, ""));
    kvr_cidr_list l2 = {0};
    assert_int_equal(kvr_cidr_list_add_csv(&l2, "8.8.8.0/24,2001:db8::/32", &err), 0);
    assert_true(url_ok(&l2, "http://8.8.8.8:80"));
    assert_false(url_ok(&l2, "http://8.8.9.8:80"));
    assert_true(url_ok(&l2, "http://[2001:db8::1]:80"));
    assert_false(url_ok(&l2, "http://127.0.0.1:80"));
    assert_int_equal(kvr_cidr_list_add(&l2, "10.0.0.0/33", &err), KVR_EINVAL);
    assert_int_equal(kvr_cidr_list_add(&l2, "nonsense", &err), KVR_EINVAL);
    assert_int_equal(kvr_cidr_list_add(&l2, "10.0.0.0/", &err), KVR_EINVAL);
    kvr_cidr_list any = {0};
    assert_int_equal(kvr_cidr_list_add(&any, "any", &err), 0);
    assert_true(url_ok(&any, "http://worker-0.svc:80"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bearer),
        cmocka_unit_test(test_token_file),
        cmocka_unit_test(test_cidr),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
