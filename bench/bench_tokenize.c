/* kvr-bench tokenize: the tokenizer library (tokenizer/) and chat templates (template/) against
 * the Rust `tokenizers` library, per model found in the model cache (scripts/fetch-models).
 *
 * For each model: encode throughput on one core of ours and of @anush008/tokenizers (the Rust
 * library through Node: tests/tokenizer/bench.js, run as a child process after ours, so the
 * two never share the core) on the same text, as MB/s and tokens/s and their ratio; the time
 * to template (the model's own chat template) and tokenize an ~8,000-token chat prompt, p50 and
 * p99 over many runs; the RSS a loaded tokenizer adds (ours: in this process; Rust: in node).
 *
 * Single-threaded; the text is generated here (mixed prose in several scripts, code, numbers,
 * whitespace runs, emoji) and written to a temporary file both sides read. */
#include "kvr_bench.h"
#include "kvr_hftok.h"
#include "kvr_tmpl.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef KVR_SOURCE_DIR
#define KVR_SOURCE_DIR "."
#endif

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static long rss_kb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6))
            kb = strtol(line + 6, NULL, 10);
    if (f)
        fclose(f);
    return kb;
}

/* The RSS one load adds, measured in a fresh child so models loaded before (and memory malloc
 * kept from them) do not hide it. Negative on failure. */
static double load_rss_mib(const char *dir)
{
    int fd[2];
    if (pipe(fd) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        kvr_err err = {0};
        kvr_hftok *t = NULL;
        long r0 = rss_kb();
        double v = kvr_hftok_load(dir, &t, &err) ? -1 : (double)(rss_kb() - r0) / 1024.0;
        ssize_t w = write(fd[1], &v, sizeof v);
        _exit(w == (ssize_t)sizeof v ? 0 : 1);
    }
    close(fd[1]);
    double v = -1;
    if (pid < 0 || read(fd[0], &v, sizeof v) != (ssize_t)sizeof v)
        v = -1;
    close(fd[0]);
    if (pid > 0)
        waitpid(pid, NULL, 0);
    return v;
}

static int is_dir(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* A deterministic mixed text of about `bytes` bytes, whole lines. */
static int gen_text(kvr_buf *out, size_t bytes)
{
    static const char *const pieces[] = {
        "The quick brown fox jumps over the lazy dog while the router hashes blocks of tokens.",
        "Caching the prefix saves the prefill; a request that lands elsewhere pays it again.",
        "Le routeur choisit le serveur dont le cache contient déjà le plus long préfixe.",
        "Der Router wählt den Server, dessen Cache schon das längste Präfix enthält.",
        "路由器选择缓存中已经包含最长前缀的服务器，从而节省预填充的时间。",
        "ルーターは最も長いプレフィックスをキャッシュ済みのサーバーを選びます。",
        "Маршрутизатор выбирает сервер, в кэше которого уже есть самый длинный префикс.",
        "الموجه يختار الخادم الذي يحتوي على أطول بادئة في ذاكرته المؤقتة.",
        "राउटर उस सर्वर को चुनता है जिसके कैश में सबसे लंबा उपसर्ग पहले से है।",
        "def route(req):\n    best = max(workers, key=lambda w: w.overlap(req.blocks))\n"
        "    return best.id if best.load < 0.9 else None",
        "for (size_t i = 0; i < n; i++) { if (blocks[i] != want[i]) break; }",
        "Totals: 1234567 requests, 98.76% hits, 0.0042 s p50, 3.14159 ms p99, id 0x7fffA3.",
        "Emoji 😀🚀👍🏽 and combining: e\xCC\x81 n\xCC\x83 — “quotes” … done.",
        "    indented   text\twith\ttabs   and    runs of     spaces.",
    };
    const size_t np = sizeof pieces / sizeof pieces[0];
    uint64_t x = 0x9E3779B97F4A7C15ull;
    while (out->len < bytes) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        const char *p = pieces[x % np];
        if (kvr_buf_append_cstr(out, p) || kvr_buf_append(out, (x >> 20) % 3 ? " " : "\n", 1))
            return KVR_ENOMEM;
    }
    return kvr_buf_append(out, "\n", 1);
}

typedef struct enc_res {
    double mbps, tps, rss_mib, load_s;
    double mbps_cpu, tps_cpu; /* per CPU second: steadier than wall time on a shared machine */
    size_t tokens;
} enc_res;

/* Ours: prompts of ~4 KiB (whole lines), one encode each, as tests/tokenizer/bench.js does. */
static int bench_ours(const kvr_hftok *t, const kvr_buf *txt, double secs, enc_res *r, kvr_err *err)
{
    kvr_buf ids;
    kvr_buf_init(&ids);
    size_t iters = 0, ntok = 0;
    double t0 = now_s(), el, c0 = cpu_s();
    int rc = 0;
    do {
        size_t total = 0;
        for (size_t a = 0; a < txt->len;) {
            size_t b = a + 4096 < txt->len ? a + 4096 : txt->len;
            while (b < txt->len && txt->base[b - 1] != '\n')
                b++;
            ids.len = 0;
            if ((rc = kvr_hftok_encode(t, (kvr_slice){txt->base + a, b - a}, 0, &ids, err)) != 0)
                goto done;
            total += kvr_tok_count(&ids);
            a = b;
        }
        ntok += total;
        r->tokens = total;
        iters++;
        el = now_s() - t0;
    } while (el < secs);
    r->mbps = (double)txt->len * (double)iters / el / 1e6;
    r->tps = (double)ntok / el;
    double cpu = cpu_s() - c0;
    r->mbps_cpu = (double)txt->len * (double)iters / cpu / 1e6;
    r->tps_cpu = (double)ntok / cpu;
done:
    kvr_buf_free(&ids);
    return rc;
}

/* Rust: node bench.js NODE_MODULES MODEL_DIR FILE SECONDS prints one JSON line. */
static int bench_rust(const char *js, const char *mods, const char *dir, const char *file,
                      double secs, enc_res *r, kvr_err *err)
{
    char cmd[4096];
    int n = snprintf(cmd, sizeof cmd, "node '%s' '%s' '%s' '%s' %.1f", js, mods, dir, file, secs);
    if (n < 0 || (size_t)n >= sizeof cmd || strchr(js, '\'') || strchr(mods, '\'') ||
        strchr(dir, '\''))
        return kvr_err_set(err, KVR_EINVAL, "paths too long or with quotes");
    FILE *p = popen(cmd, "r");
    if (!p)
        return kvr_err_set(err, KVR_EIO, "popen node: %s", strerror(errno));
    char line[1024] = "";
    char last[1024] = "";
    while (fgets(line, sizeof line, p))
        if (line[0] == '{')
            memcpy(last, line, sizeof last);
    int st = pclose(p);
    cJSON *j = last[0] ? cJSON_Parse(last) : NULL;
    if (st != 0 || !j) {
        cJSON_Delete(j);
        return kvr_err_set(err, KVR_EIO, "node bench.js failed (exit status %d)", st);
    }
    const cJSON *v;
    r->mbps = (v = cJSON_GetObjectItem(j, "MBps")) ? v->valuedouble : 0;
    r->tps = (v = cJSON_GetObjectItem(j, "tokens_per_s")) ? v->valuedouble : 0;
    r->rss_mib = (v = cJSON_GetObjectItem(j, "rss_mib")) ? v->valuedouble : 0;
    r->load_s = (v = cJSON_GetObjectItem(j, "load_s")) ? v->valuedouble : 0;
    r->mbps_cpu = (v = cJSON_GetObjectItem(j, "MBps_cpu")) ? v->valuedouble : 0;
    r->tps_cpu = (v = cJSON_GetObjectItem(j, "tokens_per_cpu_s")) ? v->valuedouble : 0;
    r->tokens = (v = cJSON_GetObjectItem(j, "tokens")) ? (size_t)v->valuedouble : 0;
    cJSON_Delete(j);
    return 0;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct chat_res {
    size_t tokens, msgs, bytes;
    double p50_us, p99_us, max_us;
    double render_p50_us;                  /* the template alone */
    double cpu_p50_us, cpu_p99_us;         /* CPU time of the thread: what one core spends */
    double old_cpu_p50_us, old_cpu_p99_us; /* the same with the fast paths off (old code) */
} chat_res;

static int render_encode(const kvr_chat_tmpl *ct, const kvr_hftok *t, const cJSON *msgs,
                         kvr_buf *txt, kvr_buf *ids, kvr_err *err)
{
    kvr_chat_req req = {.messages = msgs, .add_generation_prompt = true};
    txt->len = 0;
    ids->len = 0;
    int rc = kvr_chat_render(ct, &req, NULL, txt, err);
    /* apply_chat_template(tokenize=True) encodes without adding special tokens: the template
     * wrote them */
    return rc ? rc : kvr_hftok_encode(t, (kvr_slice){txt->base, txt->len}, 0, ids, err);
}

/* A conversation grown from the text's lines until it templates to >= target tokens, then
 * templated and tokenized `runs` times. */
static double pct(const double *v, int runs, double q)
{
    size_t i = (size_t)((double)runs * q);
    return v[i < (size_t)runs ? i : (size_t)runs - 1];
}

static int g_old = 1; /* --no-old: skip the fast-paths-off side (for profiling the new one) */

static int bench_chat(const char *dir, kvr_hftok *t, const kvr_buf *text, size_t target, int runs,
                      chat_res *r, kvr_err *err)
{
    kvr_chat_tmpl *ct = NULL;
    cJSON *msgs = cJSON_CreateArray();
    kvr_buf txt, ids;
    kvr_buf_init(&txt);
    kvr_buf_init(&ids);
    double *lat = calloc((size_t)runs, sizeof(double));
    int rc;
    if (!msgs || !lat) {
        rc = kvr_err_set(err, KVR_ENOMEM, "out of memory");
        goto done;
    }
    if ((rc = kvr_chat_tmpl_load_dir(dir, &ct, err)) != 0)
        goto done;
    cJSON *sys = cJSON_CreateObject();
    cJSON_AddStringToObject(sys, "role", "system");
    cJSON_AddStringToObject(sys, "content", "You are a helpful assistant.");
    cJSON_AddItemToArray(msgs, sys);
    size_t pos = 0, k = 0;
    for (;;) {
        if ((rc = render_encode(ct, t, msgs, &txt, &ids, err)) != 0)
            goto done;
        if (kvr_tok_count(&ids) >= target && k % 2 == 1) /* ends on a user turn */
            break;
        /* about 1.5 KiB of whole lines per message */
        size_t a = pos, b = a + 1536 < text->len ? a + 1536 : text->len;
        while (b < text->len && text->base[b - 1] != '\n')
            b++;
        pos = b >= text->len ? 0 : b;
        char *c = strndup(text->base + a, b - a);
        cJSON *m = cJSON_CreateObject();
        if (!c || !m) {
            free(c);
            cJSON_Delete(m);
            rc = kvr_err_set(err, KVR_ENOMEM, "out of memory");
            goto done;
        }
        cJSON_AddStringToObject(m, "role", k++ % 2 ? "assistant" : "user");
        cJSON_AddStringToObject(m, "content", c);
        free(c);
        cJSON_AddItemToArray(msgs, m);
    }
    double *cl = calloc((size_t)runs, sizeof(double)), *ol = calloc((size_t)runs, sizeof(double));
    if (!cl || !ol) {
        free(cl);
        free(ol);
        rc = kvr_err_set(err, KVR_ENOMEM, "out of memory");
        goto done;
    }
    kvr_buf old_ids;
    kvr_buf_init(&old_ids);
    /* old (fast paths off) and new interleaved run by run, so both see the same machine load;
     * the ids must agree */
    for (int i = 0; i < runs && !rc; i++) {
        kvr_hftok_set_fast(t, 0);
        double c0 = cpu_s();
        rc = g_old ? render_encode(ct, t, msgs, &txt, &old_ids, err) : 0;
        ol[i] = (cpu_s() - c0) * 1e6;
        kvr_hftok_set_fast(t, 1);
        if (rc)
            break;
        double t0 = now_s();
        c0 = cpu_s();
        if ((rc = render_encode(ct, t, msgs, &txt, &ids, err)) != 0)
            break;
        lat[i] = (now_s() - t0) * 1e6;
        cl[i] = (cpu_s() - c0) * 1e6;
        if (g_old && (old_ids.len != ids.len || memcmp(old_ids.base, ids.base, ids.len)))
            rc = kvr_err_set(err, KVR_EINVAL, "fast and plain encodes give different ids");
    }
    kvr_buf_free(&old_ids);
    if (rc) {
        free(cl);
        free(ol);
        goto done;
    }
    qsort(lat, (size_t)runs, sizeof(double), cmp_d);
    qsort(cl, (size_t)runs, sizeof(double), cmp_d);
    qsort(ol, (size_t)runs, sizeof(double), cmp_d);
    r->cpu_p50_us = pct(cl, runs, 0.5);
    r->cpu_p99_us = pct(cl, runs, 0.99);
    r->old_cpu_p50_us = pct(ol, runs, 0.5);
    r->old_cpu_p99_us = pct(ol, runs, 0.99);
    free(cl);
    free(ol);
    double *rl = calloc((size_t)runs, sizeof(double));
    if (!rl) {
        rc = kvr_err_set(err, KVR_ENOMEM, "out of memory");
        goto done;
    }
    kvr_chat_req req = {.messages = msgs, .add_generation_prompt = true};
    for (int i = 0; i < runs && !rc; i++) { /* the template alone, to see where time goes */
        double t0 = now_s();
        txt.len = 0;
        rc = kvr_chat_render(ct, &req, NULL, &txt, err);
        rl[i] = (now_s() - t0) * 1e6;
    }
    qsort(rl, (size_t)runs, sizeof(double), cmp_d);
    r->render_p50_us = rl[runs / 2];
    free(rl);
    if (rc)
        goto done;
    r->tokens = kvr_tok_count(&ids);
    r->bytes = txt.len;
    r->msgs = (size_t)cJSON_GetArraySize(msgs);
    r->p50_us = lat[runs / 2];
    r->p99_us = lat[(size_t)((double)runs * 0.99) < (size_t)runs ? (size_t)((double)runs * 0.99)
                                                                 : (size_t)runs - 1];
    r->max_us = lat[runs - 1];
done:
    free(lat);
    cJSON_Delete(msgs);
    kvr_buf_free(&txt);
    kvr_buf_free(&ids);
    kvr_chat_tmpl_free(ct);
    return rc;
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: kvr-bench tokenize [options]\n"
            "  Per model in the cache: encode throughput on one core, ours vs the Rust\n"
            "  `tokenizers` library (@anush008/tokenizers via node), MB/s, tokens/s and ratio;\n"
            "  an ~8,000-token chat prompt templated (the model's chat template) and tokenized,\n"
            "  p50/p99; RSS a loaded tokenizer adds. One JSON line per model, then a table.\n"
            "  --cache DIR        model cache (default $KVR_MODEL_CACHE or ~/.cache/kvroute;\n"
            "                     filled by scripts/fetch-models)\n"
            "  --models A,B,..    families under DIR/models (default qwen3,llama3_1,gemma3)\n"
            "  --seconds S        encode time per side and model (default 3)\n"
            "  --text-kib N       size of the generated text (default 256)\n"
            "  --chat-tokens N    prompt size for the chat timing (default 8000)\n"
            "  --runs N           chat timing runs (default 300)\n"
            "  --bench-js FILE    the Node side (default tests/tokenizer/bench.js of the source)\n"
            "  --no-rust          ours only\n"
            "  --no-old           skip the old side (fast paths off: kvr_hftok_set_fast)\n");
}

int kvr_bench_tokenize(int argc, char **argv)
{
    const char *cache = getenv("KVR_MODEL_CACHE");
    char cache_def[1024], models_def[] = "qwen3,llama3_1,gemma3";
    const char *models = models_def, *js = KVR_SOURCE_DIR "/tests/tokenizer/bench.js";
    double secs = 3;
    size_t text_kib = 256, chat_tokens = 8000;
    int runs = 300, rust = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--no-rust")) {
            rust = 0;
            continue;
        } else if (!strcmp(a, "--no-old")) {
            g_old = 0;
            continue;
        }
        if (!v) {
            fprintf(stderr, "kvr-bench tokenize: %s needs a value\n", a);
            return 2;
        }
        i++;
        if (!strcmp(a, "--cache"))
            cache = v;
        else if (!strcmp(a, "--models"))
            models = v;
        else if (!strcmp(a, "--seconds"))
            secs = atof(v);
        else if (!strcmp(a, "--text-kib"))
            text_kib = strtoul(v, NULL, 10);
        else if (!strcmp(a, "--chat-tokens"))
            chat_tokens = strtoul(v, NULL, 10);
        else if (!strcmp(a, "--runs"))
            runs = atoi(v);
        else if (!strcmp(a, "--bench-js"))
            js = v;
        else {
            fprintf(stderr, "kvr-bench tokenize: unknown option %s\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (secs <= 0 || secs > 600 || runs < 1 || runs > 1000000 || text_kib < 1 || text_kib > 65536 ||
        chat_tokens < 1 || chat_tokens > 1000000) {
        fprintf(stderr, "kvr-bench tokenize: option out of range\n");
        return 2;
    }
    if (!cache) {
        const char *home = getenv("HOME");
        snprintf(cache_def, sizeof cache_def, "%s/.cache/kvroute", home ? home : ".");
        cache = cache_def;
    }
    char mods[1100], file[] = "/tmp/kvr-bench-tokenize-XXXXXX";
    snprintf(mods, sizeof mods, "%s/node/node_modules", cache);
    if (rust && access(js, R_OK) != 0) {
        fprintf(stderr, "kvr-bench tokenize: %s not found (--bench-js, or --no-rust)\n", js);
        return 2;
    }
    kvr_buf text;
    kvr_buf_init(&text);
    int fd = mkstemp(file), status = 0;
    if (fd < 0 || gen_text(&text, text_kib * 1024) ||
        write(fd, text.base, text.len) != (ssize_t)text.len) {
        fprintf(stderr, "kvr-bench tokenize: cannot write the text to %s\n", file);
        if (fd >= 0)
            close(fd), unlink(file);
        kvr_buf_free(&text);
        return 1;
    }
    close(fd);
    char list[256], line[64][160];
    int nl = 0;
    snprintf(list, sizeof list, "%s", models);
    for (char *save = NULL, *m = strtok_r(list, ",", &save); m; m = strtok_r(NULL, ",", &save)) {
        char dir[1400];
        snprintf(dir, sizeof dir, "%s/models/%s", cache, m);
        if (!is_dir(dir)) {
            fprintf(stderr, "kvr-bench tokenize: %s: not in the cache (scripts/fetch-models)\n",
                    dir);
            continue;
        }
        kvr_err err = {0};
        kvr_hftok *t = NULL;
        enc_res ours = {0}, rs = {0}, old = {0};
        chat_res ch = {0};
        ours.rss_mib = load_rss_mib(dir);
        double t0 = now_s();
        if (kvr_hftok_load(dir, &t, &err)) {
            fprintf(stderr, "kvr-bench tokenize: %s: %s\n", m, err.msg);
            status = 1;
            continue;
        }
        ours.load_s = now_s() - t0;
        kvr_hftok_set_fast(t, 0);
        int orc = g_old ? bench_ours(t, &text, secs, &old, &err) : 0;
        kvr_hftok_set_fast(t, 1);
        if (orc || bench_ours(t, &text, secs, &ours, &err) ||
            bench_chat(dir, t, &text, chat_tokens, runs, &ch, &err)) {
            fprintf(stderr, "kvr-bench tokenize: %s: %s\n", m, err.msg);
            kvr_hftok_free(t);
            status = 1;
            continue;
        }
        kvr_hftok_free(t);
        if (rust && bench_rust(js, mods, dir, file, secs, &rs, &err)) {
            fprintf(stderr, "kvr-bench tokenize: %s: rust side: %s\n", m, err.msg);
            status = 1;
        }
        if (rust && rs.tokens && rs.tokens != ours.tokens) {
            fprintf(stderr, "kvr-bench tokenize: %s: token counts differ (ours %zu, rust %zu)\n", m,
                    ours.tokens, rs.tokens);
            status = 1;
        }
        printf("{\"bench\":\"tokenize\",\"model\":\"%s\",\"text_bytes\":%zu,\"tokens\":%zu,"
               "\"ours_MBps\":%.2f,\"ours_tokens_per_s\":%.0f,\"ours_rss_mib\":%.1f,"
               "\"ours_load_s\":%.3f,\"rust_MBps\":%.2f,\"rust_tokens_per_s\":%.0f,"
               "\"rust_rss_mib\":%.1f,\"rust_load_s\":%.2f,\"speedup\":%.2f,"
               "\"chat_tokens\":%zu,\"chat_messages\":%zu,\"chat_p50_us\":%.0f,"
               "\"chat_p99_us\":%.0f,\"chat_max_us\":%.0f,\"chat_render_p50_us\":%.0f,"
               "\"chat_runs\":%d,\"ours_MBps_cpu\":%.2f,\"ours_tokens_per_cpu_s\":%.0f,"
               "\"rust_MBps_cpu\":%.2f,\"rust_tokens_per_cpu_s\":%.0f,\"speedup_cpu\":%.2f,"
               "\"chat_cpu_p50_us\":%.0f,\"chat_cpu_p99_us\":%.0f,\"old_chat_cpu_p50_us\":%.0f,"
               "\"old_chat_cpu_p99_us\":%.0f,\"old_MBps_cpu\":%.2f}\n",
               m, text.len, ours.tokens, ours.mbps, ours.tps, ours.rss_mib, ours.load_s, rs.mbps,
               rs.tps, rs.rss_mib, rs.load_s, rs.mbps > 0 ? ours.mbps / rs.mbps : 0, ch.tokens,
               ch.msgs, ch.p50_us, ch.p99_us, ch.max_us, ch.render_p50_us, runs, ours.mbps_cpu,
               ours.tps_cpu, rs.mbps_cpu, rs.tps_cpu,
               rs.mbps_cpu > 0 ? ours.mbps_cpu / rs.mbps_cpu : 0, ch.cpu_p50_us, ch.cpu_p99_us,
               ch.old_cpu_p50_us, ch.old_cpu_p99_us, old.mbps_cpu);
        fflush(stdout);
        if (nl < 64)
            snprintf(
                line[nl++], sizeof line[0],
                "%-10s %8.2f %8.2f %8.2f %8.2f %6.2fx %10.0f %10.0f %7zu %8.0f %8.0f %8.0f %8.0f "
                "%8.1f %8.1f",
                m, old.mbps_cpu, ours.mbps_cpu, rs.mbps_cpu, ours.mbps,
                rs.mbps_cpu > 0 ? ours.mbps_cpu / rs.mbps_cpu : 0, ours.tps_cpu, rs.tps_cpu,
                ch.tokens, ch.old_cpu_p50_us, ch.old_cpu_p99_us, ch.cpu_p50_us, ch.cpu_p99_us,
                ours.rss_mib, rs.rss_mib);
    }
    unlink(file);
    kvr_buf_free(&text);
    if (nl) {
        /* MB/s and tokens/s per CPU second (wall MB/s: "C wall"); chat: CPU us per prompt,
         * old = fast paths off (kvr_hftok_set_fast(t, 0)) in the same run */
        printf("\n%-10s %8s %8s %8s %8s %7s %10s %10s %7s %8s %8s %8s %8s %8s %8s\n", "model",
               "oldMB/s", "C MB/s", "RustMB/s", "C wall", "ratio", "C tok/s", "Rust tok/s",
               "chat tk", "old p50", "old p99", "cpu p50", "cpu p99", "C MiB", "Rust MiB");
        for (int i = 0; i < nl; i++)
            printf("%s\n", line[i]);
    } else {
        fprintf(stderr, "kvr-bench tokenize: no model measured\n");
        status = 1;
    }
    return status;
}
