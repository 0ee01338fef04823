/* kvr_tmpl unit tests (cmocka): one or more cases per construct, expected outputs generated
 * from jinja2 (unit_cases.py -> test_tmpl_cases.inc), plus the refusals and limits a reference
 * comparison cannot show: unsupported constructs named at compile time, syntax errors with a
 * position, raise_exception's message, and runaway templates stopped by the render limits. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kvr_tmpl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const struct {
    const char *name, *src, *ctx, *want;
} CASES[] = {
#include "test_tmpl_cases.inc"
};

/* Renders src with ctx (JSON text); returns the status, output in out (NUL-terminated). */
static int render(const char *src, const char *ctx, const kvr_tmpl_limits *lim, kvr_buf *out,
                  kvr_err *err)
{
    kvr_tmpl *t = NULL;
    int rc = kvr_tmpl_compile(src, strlen(src), &t, err);
    if (rc)
        return rc;
    cJSON *c = cJSON_Parse(ctx);
    assert_non_null(c);
    rc = kvr_tmpl_render(t, c, lim, out, err);
    cJSON_Delete(c);
    kvr_tmpl_free(t);
    assert_int_equal(kvr_buf_append(out, "", 1), 0);
    out->len--;
    return rc;
}

static void test_constructs(void **state)
{
    (void)state;
    size_t bad = 0;
    for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) {
        kvr_buf out;
        kvr_buf_init(&out);
        kvr_err err = {0};
        int rc = render(CASES[i].src, CASES[i].ctx, NULL, &out, &err);
        if (rc || strcmp(out.base, CASES[i].want) != 0) {
            fprintf(stderr, "case %s: rc %d (%s)\n  got  [%s]\n  want [%s]\n", CASES[i].name, rc,
                    err.msg, out.base ? out.base : "", CASES[i].want);
            bad++;
        }
        kvr_buf_free(&out);
    }
    assert_int_equal(bad, 0);
}

static void expect_compile_error(const char *src, const char *needle)
{
    kvr_tmpl *t = NULL;
    kvr_err err = {0};
    int rc = kvr_tmpl_compile(src, strlen(src), &t, &err);
    if (rc == 0 || strstr(err.msg, needle) == NULL)
        fprintf(stderr, "template %s: rc %d, message [%s], wanted [%s]\n", src, rc, err.msg,
                needle);
    assert_true(rc < 0);
    assert_null(t);
    assert_non_null(strstr(err.msg, needle));
}

static void test_refused_at_compile(void **state)
{
    (void)state;
    expect_compile_error("{% for x in xs recursive %}{% endfor %}", "recursive");
    expect_compile_error("{% include 'a' %}", "include");
    expect_compile_error("{% macro w() %}{{ caller() }}{% endmacro %}{% call w() %}x{% endcall %}",
                         "call");
    expect_compile_error("{% if x %}unclosed", "line 1");
    expect_compile_error("{{ 1 + }}", "line 1");
}

static void expect_render_error(const char *src, const kvr_tmpl_limits *lim, int want_rc,
                                const char *needle)
{
    kvr_buf out;
    kvr_buf_init(&out);
    kvr_err err = {0};
    int rc = render(src, "{}", lim, &out, &err);
    if (rc != want_rc || strstr(err.msg, needle) == NULL)
        fprintf(stderr, "template %s: rc %d, message [%s], wanted %d [%s]\n", src, rc, err.msg,
                want_rc, needle);
    assert_int_equal(rc, want_rc);
    assert_non_null(strstr(err.msg, needle));
    kvr_buf_free(&out);
}

static void test_render_errors_and_limits(void **state)
{
    (void)state;
    expect_render_error("{{ raise_exception('no system role') }}", NULL, KVR_EINVAL,
                        "raise_exception: no system role");
    kvr_tmpl_limits small = {.max_steps = 100000, .max_output = 1 << 16, .max_depth = 16};
    /* a loop that would run 10^10 times, infinite recursion, output doubling */
    expect_render_error("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                        "{% endfor %}",
                        &small, KVR_ELIMIT, "");
    expect_render_error("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}", &small,
                        KVR_ELIMIT, "");
    expect_render_error("{% for i in range(100000) %}xxxxxxxxxxxxxxxx{% endfor %}", &small,
                        KVR_ELIMIT, "");
}

/* vLLM's content format: a template that loops over a message's content ("openai") gets the
 * list; one that does not ("string") gets the text parts joined with "\n" when the request
 * asks for vLLM's view (vllm_content), and the list as transformers passes it otherwise. */
/* Strings that are not UTF-8 (a prompt may hold anything) are split into one item per lead
 * byte, a stray continuation byte at the start being an item of its own, as the filters that
 * iterate a string expect; the list was sized one item short (fuzz_template, UBSan). */
static void test_string_not_utf8(void **state)
{
    (void)state;
    static const struct {
        const char *src, *want;
    } cases[] = {
        {"{{ '\x97"
         "bc' | reverse }}",
         "cb\x97"},
        {"{{ '\x97"
         "bc' | list | length }}",
         "3"},
        {"{{ '\x97\x97' | list | length }}", "1"},
        {"{{ ('\x97' ~ 'h\xc3\xa9') | reverse }}", "\xc3\xa9h\x97"},
        {"{% for c in '\x80z' %}[{{ c }}]{% endfor %}", "[\x80][z]"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kvr_buf out;
        kvr_buf_init(&out);
        kvr_err err = {0};
        assert_int_equal(render(cases[i].src, "{}", NULL, &out, &err), 0);
        assert_string_equal(out.base, cases[i].want);
        kvr_buf_free(&out);
    }
}

static void test_vllm_content_format(void **state)
{
    (void)state;
    static const struct {
        const char *tmpl;
        bool openai;
        const char *want_vllm;
    } T[] = {
        {"{% for m in messages %}[{{ m.content }}]{% endfor %}", false, "[a\nb]"},
        {"{% for message in messages %}{% for p in message['content'] %}<{{ p.text }}>"
         "{% endfor %}{% endfor %}",
         true, "<a><><b>"}, /* the list as given: the image part has no text */
        {"{% set loop_messages = messages %}{% for message in loop_messages %}"
         "{% for item in message.content %}<{{ item.text }}>{% endfor %}{% endfor %}",
         true, "<a><><b>"}, /* the list as given: the image part has no text */
    };
    const char *msgs = "[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
                       "{\"type\":\"image_url\",\"image_url\":{}},"
                       "{\"type\":\"text\",\"text\":\"b\"}]}]";
    for (size_t i = 0; i < sizeof T / sizeof T[0]; i++) {
        cJSON *cfg = cJSON_CreateObject();
        cJSON_AddStringToObject(cfg, "chat_template", T[i].tmpl);
        kvr_chat_tmpl *ct = NULL;
        kvr_err err = {0};
        assert_int_equal(kvr_chat_tmpl_from_config(cfg, &ct, &err), 0);
        assert_int_equal(kvr_chat_tmpl_openai_content(ct, false), T[i].openai);
        cJSON *m = cJSON_Parse(msgs);
        kvr_buf out;
        kvr_buf_init(&out);
        kvr_chat_req req = {.messages = m, .vllm_content = true};
        assert_int_equal(kvr_chat_render(ct, &req, NULL, &out, &err), 0);
        assert_int_equal(out.len, strlen(T[i].want_vllm));
        assert_memory_equal(out.base, T[i].want_vllm, out.len);
        /* unchanged request: the caller's tree is not modified */
        char *again = cJSON_PrintUnformatted(m);
        cJSON *m0 = cJSON_Parse(msgs);
        char *orig = cJSON_PrintUnformatted(m0);
        assert_string_equal(again, orig);
        free(again);
        free(orig);
        cJSON_Delete(m0);
        kvr_buf_free(&out);
        cJSON_Delete(m);
        kvr_chat_tmpl_free(ct);
        cJSON_Delete(cfg);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_constructs),
        cmocka_unit_test(test_refused_at_compile),
        cmocka_unit_test(test_render_errors_and_limits),
        cmocka_unit_test(test_vllm_content_format),
        cmocka_unit_test(test_string_not_utf8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
