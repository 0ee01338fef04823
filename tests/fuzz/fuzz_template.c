/* libFuzzer target: the chat-template interpreter (template/). The input is a template source,
 * optionally followed by "\n\x01\n" and a JSON context object (else a small conversation).
 * Properties: a template compiles or is refused with a message (never a crash); a compiled one
 * renders or fails with a message; output, arena memory, steps and nesting stay within the
 * limits the render was given, so garbage, deep nesting, recursive macros and huge loops all
 * end quickly with KVR_ELIMIT instead of running away. */
#include "fuzz_check.h"
#include "kvr_tmpl.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char DEFAULT_CTX[] =
    "{\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
    "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Hi \\u00e9\"}]},"
    "{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{\"type\":\"function\","
    "\"function\":{\"name\":\"f\",\"arguments\":{\"x\":1.5,\"y\":[true,null]}}}]},"
    "{\"role\":\"tool\",\"content\":\"42\"}],"
    "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":{}}}],"
    "\"add_generation_prompt\":true,\"bos_token\":\"<s>\",\"eos_token\":\"</s>\"}";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    size_t slen = size;
    cJSON *ctx = NULL;
    for (size_t i = 0; i + 3 <= size; i++)
        if (!memcmp(s + i, "\n\x01\n", 3)) {
            slen = i;
            ctx = cJSON_ParseWithLength(s + i + 3, size - i - 3);
            break;
        }
    if (ctx == NULL)
        ctx = cJSON_Parse(DEFAULT_CTX);
    CHECK(ctx != NULL);
    kvr_err err = {0};
    kvr_tmpl *t = NULL;
    int rc = kvr_tmpl_compile(s, slen, &t, &err);
    if (rc) {
        CHECK(rc < 0 && err.msg[0] != '\0' && t == NULL);
        cJSON_Delete(ctx);
        return 0;
    }
    /* Tighter than the defaults so one input stays in the milliseconds. */
    kvr_tmpl_limits lim = {
        .max_output = 1u << 20, .max_memory = 16u << 20, .max_steps = 200000, .max_depth = 32};
    kvr_buf out;
    kvr_buf_init(&out);
    memset(&err, 0, sizeof(err));
    rc = kvr_tmpl_render(t, ctx, &lim, &out, &err);
    if (rc)
        CHECK(rc < 0 && err.msg[0] != '\0');
    CHECK(out.len <= lim.max_output);
    /* A render is a pure function of template and context (strftime_now aside, which the
     * fuzzer cannot reach within one second's change): the same twice. */
    kvr_buf again;
    kvr_buf_init(&again);
    kvr_err err2 = {0};
    int rc2 = kvr_tmpl_render(t, ctx, &lim, &again, &err2);
    CHECK(rc2 == rc);
    kvr_buf_free(&again);
    kvr_buf_free(&out);
    kvr_tmpl_free(t);
    cJSON_Delete(ctx);
    return 0;
}
