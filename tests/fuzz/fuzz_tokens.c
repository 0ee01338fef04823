/* libFuzzer target: kvr_json_scan_tokens, the router's streaming parser for
 * {"token_ids":[...], "model", "namespace"} bodies, and kvr_json_decode_string. Properties:
 * no crash or out-of-bounds access; never more ids than the bound; and whatever the scanner
 * accepts, cJSON accepts too with the same token ids, model and namespace (checked when the
 * input has no escapes, whose spelling of member names the two may read differently). */
#include "fuzz_check.h"
#include "kvr_json.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TOKENS 512

static size_t count_sub(const uint8_t *d, size_t n, const char *needle)
{
    size_t k = strlen(needle), c = 0;
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(d + i, needle, k) == 0)
            c++;
    return c;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint32_t toks[MAX_TOKENS + 1];
    toks[MAX_TOKENS] = 0xdeadbeef; /* canary past the bound */
    kvr_json_tokreq tr = {.tokens = toks, .max_tokens = MAX_TOKENS};
    kvr_err err = {0};
    kvr_slice body = {(const char *)data, size};
    int rc = kvr_json_scan_tokens(body, 8, &tr, &err);
    CHECK(toks[MAX_TOKENS] == 0xdeadbeef);
    if (rc != 0) {
        CHECK(rc == KVR_EINVAL || rc == KVR_ELIMIT || rc == KVR_ETYPE);
        CHECK(err.msg[0] != '\0');
        return 0;
    }
    CHECK(tr.n_tokens <= MAX_TOKENS);
    char model[128], ns[64];
    int mrc = tr.model.base ? kvr_json_decode_string(tr.model, model, sizeof model, &err) : 1;
    int nrc = tr.ns.base ? kvr_json_decode_string(tr.ns, ns, sizeof ns, &err) : 1;
    CHECK(mrc == 0 || mrc == 1 || mrc == KVR_ELIMIT || mrc == KVR_EINVAL);
    CHECK(nrc == 0 || nrc == 1 || nrc == KVR_ELIMIT || nrc == KVR_EINVAL);
    if (memchr(data, '\\', size) != NULL)
        return 0;
    /* Duplicate names are undefined in JSON (RFC 8259: SHOULD be unique); cJSON keeps the first
     * and the scanner may keep another, so the comparison below holds for unique names only. */
    if (count_sub(data, size, "\"model\"") > 1 || count_sub(data, size, "\"namespace\"") > 1 ||
        count_sub(data, size, "\"token_ids\"") > 1)
        return 0;
    cJSON *root = NULL;
    CHECK(kvr_json_parse(body, 0, 64, &root, &err) == 0);
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(root, "token_ids");
    CHECK(cJSON_IsArray(arr));
    CHECK((size_t)cJSON_GetArraySize(arr) == tr.n_tokens);
    size_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, arr)
    {
        CHECK(cJSON_IsNumber(it) && it->valuedouble == (double)toks[i]);
        i++;
    }
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (tr.model.base) {
        CHECK(cJSON_IsString(m));
        if (mrc == 0)
            CHECK(strcmp(m->valuestring, model) == 0);
    } else {
        CHECK(m == NULL || cJSON_IsNull(m));
    }
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(root, "namespace");
    if (tr.ns.base) {
        CHECK(cJSON_IsString(n));
        if (nrc == 0)
            CHECK(strcmp(n->valuestring, ns) == 0);
    } else {
        CHECK(n == NULL || cJSON_IsNull(n));
    }
    cJSON_Delete(root);
    return 0;
}
