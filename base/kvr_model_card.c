/* base/kvr_model_card.c: the tokenizer + chat template checksum (see kvr_model_card.h). */
#include "kvr_model_card.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <xxhash.h>

static const char *const FILES[] = {"tokenizer.json", "tokenizer_config.json",
                                    "chat_template.jinja"};

/* Hashes one file into st as model_card.h says. Returns 0, or KVR_ENOTFOUND when absent. */
static int add_file(XXH3_state_t *st, const char *dir, const char *name, kvr_err *err)
{
    char path[4096];
    if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path)
        return kvr_err_set(err, KVR_ELIMIT, "model dir path too long");
    XXH3_64bits_update(st, name, strlen(name) + 1);
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (errno != ENOENT)
            return kvr_err_set(err, KVR_EIO, "%s: %s", path, strerror(errno));
        static const uint8_t absent[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
        XXH3_64bits_update(st, absent, sizeof absent);
        return KVR_ENOTFOUND;
    }
    int rc = 0;
    long len = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        len = ftell(f);
    if (len < 0 || fseek(f, 0, SEEK_SET) != 0) {
        rc = kvr_err_set(err, KVR_EIO, "%s: cannot size it", path);
        goto out;
    }
    if ((unsigned long)len > KVR_MODEL_CARD_MAX_FILE) {
        rc = kvr_err_set(err, KVR_ELIMIT, "%s: %ld bytes, over %u", path, len,
                         KVR_MODEL_CARD_MAX_FILE);
        goto out;
    }
    uint8_t le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (uint8_t)((uint64_t)len >> (8 * i));
    XXH3_64bits_update(st, le, sizeof le);
    char buf[65536];
    size_t n, total = 0;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
        XXH3_64bits_update(st, buf, n);
        total += n;
    }
    if (ferror(f) || total != (size_t)len)
        rc = kvr_err_set(err, KVR_EIO, "%s: changed or unreadable while reading", path);
out:
    fclose(f);
    return rc;
}

int kvr_model_card_sum(const char *dir, char *out, size_t out_len, kvr_err *err)
{
    if (out_len < KVR_MODEL_CARD_SUM_LEN + 1)
        return kvr_err_set(err, KVR_EINVAL, "model card sum buffer too small");
    XXH3_state_t *st = XXH3_createState();
    if (!st)
        return kvr_err_set(err, KVR_ENOMEM, "xxh3 state");
    XXH3_64bits_reset(st);
    int rc = 0;
    for (size_t i = 0; i < sizeof FILES / sizeof FILES[0]; i++) {
        rc = add_file(st, dir, FILES[i], err);
        if (rc == KVR_ENOTFOUND && i == 0) {
            rc = kvr_err_set(err, KVR_ENOTFOUND, "%s/tokenizer.json not found", dir);
            break;
        }
        if (rc == KVR_ENOTFOUND)
            rc = 0;
        if (rc != 0)
            break;
    }
    if (rc == 0)
        snprintf(out, out_len, "tok1:%016" PRIx64, (uint64_t)XXH3_64bits_digest(st));
    XXH3_freeState(st);
    return rc;
}
