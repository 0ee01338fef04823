/* tmpl_render MODEL_DIR CONV.json [--bench N]: renders CONV ({messages, tools, documents,
 * add_generation_prompt, chat_template_kwargs}) with the model's chat template to stdout;
 * with --bench, renders N times and prints the mean time per render to stderr. */
#include "kvr_tmpl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: tmpl_render MODEL_DIR CONV.json [--bench N]\n");
        return 2;
    }
    long iters = argc >= 5 && strcmp(argv[3], "--bench") == 0 ? atol(argv[4]) : 0;
    kvr_err err = {0};
    kvr_chat_tmpl *ct = NULL;
    if (kvr_chat_tmpl_load_dir(argv[1], &ct, &err) != 0) {
        fprintf(stderr, "load: %s\n", err.msg);
        return 1;
    }
    FILE *f = fopen(argv[2], "rb");
    if (f == NULL) {
        perror(argv[2]);
        return 1;
    }
    static char text[8 << 20];
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    cJSON *conv = cJSON_Parse(text);
    if (conv == NULL) {
        fprintf(stderr, "%s: bad JSON\n", argv[2]);
        return 1;
    }
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(conv, "tools");
    const cJSON *docs = cJSON_GetObjectItemCaseSensitive(conv, "documents");
    kvr_chat_req req = {
        .messages = cJSON_GetObjectItemCaseSensitive(conv, "messages"),
        .tools = cJSON_IsNull(tools) ? NULL : tools,
        .documents = cJSON_IsNull(docs) ? NULL : docs,
        .kwargs = cJSON_GetObjectItemCaseSensitive(conv, "chat_template_kwargs"),
        .add_generation_prompt =
            cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(conv, "add_generation_prompt")),
    };
    kvr_buf out;
    kvr_buf_init(&out);
    int rv = kvr_chat_render(ct, &req, NULL, &out, &err);
    if (rv != 0) {
        printf("ERROR\n");
        fprintf(stderr, "render: %s\n", err.msg);
    } else {
        fwrite(out.base, 1, out.len, stdout);
    }
    if (rv == 0 && iters > 0) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long i = 0; i < iters; i++) {
            kvr_buf_reset(&out);
            if (kvr_chat_render(ct, &req, NULL, &out, &err) != 0)
                return 1;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double us = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / 1e3 / iters;
        fprintf(stderr, "bench: %zu bytes of prompt, %.1f us per render (%ld renders)\n", out.len,
                us, iters);
    }
    kvr_buf_free(&out);
    cJSON_Delete(conv);
    kvr_chat_tmpl_free(ct);
    return 0;
}
