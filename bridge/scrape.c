/* bridge/scrape: see scrape.h. */
#include "scrape.h"

#include <stdlib.h>
#include <string.h>

/* Finds label `name` in `a="x",b="y"` (lab, n bytes); copies its value into v (cap). */
static bool label(const char *lab, size_t n, const char *name, char *v, size_t cap)
{
    size_t nl = strlen(name);
    for (size_t i = 0; i + nl + 2 <= n; i++) {
        if ((i == 0 || lab[i - 1] == ',') && memcmp(lab + i, name, nl) == 0 && lab[i + nl] == '=' &&
            lab[i + nl + 1] == '"') {
            size_t j = i + nl + 2, k = 0;
            while (j < n && lab[j] != '"') {
                if (lab[j] == '\\' && j + 1 < n)
                    j++;
                if (k + 1 < cap)
                    v[k++] = lab[j];
                j++;
            }
            v[k] = 0;
            return j < n;
        }
    }
    return false;
}

/* Adds the comma-separated names of list to out's adapters (deduplicated, bounded). */
static void add_loras(kvr_bridge_scrape *out, const char *list)
{
    const char *p = list;
    while (*p) {
        size_t n = strcspn(p, ",");
        const char *q = p;
        size_t m = n;
        while (m && *q == ' ')
            q++, m--;
        while (m && q[m - 1] == ' ')
            m--;
        bool dup = false;
        for (uint32_t i = 0; i < out->n_loras && !dup; i++)
            dup = strlen(out->loras[i]) == m && memcmp(out->loras[i], q, m) == 0;
        if (m > 0 && m <= KVR_LORA_NAME_MAX && !dup && out->n_loras < KVR_HB_MAX_LORAS) {
            memcpy(out->loras[out->n_loras], q, m);
            out->loras[out->n_loras++][m] = 0;
        }
        p += n;
        if (*p == ',')
            p++;
    }
}

void kvr_bridge_parse_metrics(const char *text, size_t len, int rank, int dp,
                              kvr_bridge_scrape *out)
{
    memset(out, 0, sizeof *out);
    const char *p = text, *end = text + len;
    char line[4096], v[256], big[4096];
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
        const char *next = nl ? nl + 1 : end;
        if (n == 0 || n >= sizeof line || *p == '#') {
            p = next;
            continue;
        }
        memcpy(line, p, n);
        line[n] = 0;
        p = next;
        size_t name_len = strcspn(line, "{ ");
        const char *lab = "";
        size_t lab_len = 0;
        const char *rest = line + name_len;
        if (*rest == '{') {
            const char *close = strrchr(rest, '}');
            if (!close)
                continue;
            lab = rest + 1; /* inside the braces: line[name_len] is cut below */
            lab_len = (size_t)(close - rest - 1);
            rest = close + 1;
        }
        char *e;
        double val = strtod(rest, &e);
        if (e == rest)
            continue;
        if (dp > 1 && label(lab, lab_len, "engine", v, sizeof v) && atoi(v) != rank)
            continue;
        line[name_len] = 0;
        const char *name = line;
        if (!out->model[0] && label(lab, lab_len, "model_name", v, sizeof v))
            strcpy(out->model, v);
        if (!strcmp(name, "vllm:num_requests_running") ||
            !strcmp(name, "sglang:num_running_reqs")) {
            out->running += val;
            out->has_running = true;
        } else if (!strcmp(name, "vllm:num_requests_waiting") ||
                   !strcmp(name, "sglang:num_queue_reqs")) {
            out->waiting += val;
            out->has_waiting = true;
        } else if (!strcmp(name, "vllm:kv_cache_usage_perc") ||
                   !strcmp(name, "sglang:token_usage")) {
            out->usage = val;
            out->has_usage = true;
        } else if (!strcmp(name, "vllm:lora_requests_info")) {
            if (out->has_loras && val < out->lora_ts)
                continue; /* an older label set prometheus_client still exposes */
            out->has_loras = true;
            out->lora_ts = val;
            out->n_loras = 0;
            if (label(lab, lab_len, "running_lora_adapters", big, sizeof big))
                add_loras(out, big);
            if (label(lab, lab_len, "waiting_lora_adapters", big, sizeof big))
                add_loras(out, big);
        } else if (!strcmp(name, "process_start_time_seconds")) {
            out->start_s = val;
            out->has_start = val > 0;
        } else if (!strcmp(name, "vllm:cache_config_info") ||
                   !strcmp(name, "sglang:cache_config_info")) {
            if (label(lab, lab_len, "block_size", v, sizeof v) ||
                label(lab, lab_len, "page_size", v, sizeof v)) {
                out->block_size = strtoull(v, NULL, 10);
                out->has_block_size = out->block_size > 0;
            }
            if (label(lab, lab_len, "num_gpu_blocks", v, sizeof v) ||
                label(lab, lab_len, "num_pages", v, sizeof v)) {
                out->capacity = strtoull(v, NULL, 10);
                out->has_capacity = true;
            }
        }
    }
}
