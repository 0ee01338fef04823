/* kvr-worker-probe: test helper for the worker's process tests (not shipped).
 *
 *   gen --seed S (--text STR | --chat-user STR) --n N
 *       prints the N token ids the engine will generate for that prompt, as a JSON array
 *   ensure-stream --nats URL
 *       creates the JetStream stream KVR_EVENTS (kvr.kv.>) if missing
 *   digest --nats URL --subject SUBJ --worker-id N --cache FILE [--block-size B]
 *       replays SUBJ from KVR_EVENTS into the project's indexer (as a router does), and
 *       compares its digest with the worker's /debug/cache dump in FILE; exit 0 when equal
 *   heartbeat --nats URL --subject SUBJ
 *       prints the next heartbeat on SUBJ as JSON
 *   cache-digest --cache FILE --worker-id N
 *       the index digest (%016x, as routerd's /v1/state shows it) that FILE's blocks would give
 */
#include "engine.h"
#include "index.h"
#include "kv_event.h"
#include "kvr_mp.h"
#include "kvr_nats.h"
#include "kvr_tok.h"

#include <cjson/cJSON.h>
#include <nats/nats.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

static const char *arg(int argc, char **argv, const char *name, const char *def)
{
    for (int i = 2; i + 1 < argc; i++)
        if (!strcmp(argv[i], name))
            return argv[i + 1];
    return def;
}

static int cmd_gen(int argc, char **argv)
{
    uint64_t seed = strtoull(arg(argc, argv, "--seed", "0"), NULL, 10);
    uint32_t n = (uint32_t)strtoul(arg(argc, argv, "--n", "16"), NULL, 10);
    const char *text = arg(argc, argv, "--text", NULL);
    const char *user = arg(argc, argv, "--chat-user", NULL);
    kvr_buf prompt, toks;
    kvr_buf_init(&prompt);
    kvr_buf_init(&toks);
    if (user) {
        kvr_chat_msg m = {KVR_SLICE_LIT("user"), kvr_slice_of(user)};
        kvr_tok_chatml(&m, 1, 1, &prompt, NULL);
    } else {
        kvr_buf_append_cstr(&prompt, text ? text : "");
    }
    kvr_tok_encode(kvr_tok_byte(), (kvr_slice){prompt.base, prompt.len}, &toks, NULL);
    uint32_t *out = calloc(n ? n : 1, sizeof *out);
    kvr_engine_gen_tokens(seed, kvr_tok_ids(&toks), (uint32_t)kvr_tok_count(&toks), out, n);
    printf("[");
    for (uint32_t i = 0; i < n; i++)
        printf(i ? ",%u" : "%u", out[i]);
    printf("]\n");
    free(out);
    kvr_buf_free(&prompt);
    kvr_buf_free(&toks);
    return 0;
}

/* ---- async plumbing ---- */

typedef struct probe {
    uv_loop_t *loop;
    kvr_nats nats;
    uv_timer_t timer;
    int rc;
    bool done;
    uint64_t start_ms;
} probe;

static void on_closed(kvr_nats *kn)
{
    (void)kn;
}

static void finish(probe *p, int rc)
{
    if (p->done)
        return;
    p->done = true;
    p->rc = rc;
    uv_timer_stop(&p->timer);
    uv_close((uv_handle_t *)&p->timer, NULL);
    kvr_nats_close(&p->nats, on_closed);
}

static int start_nats(probe *p, const char *url)
{
    kvr_err err = {0};
    p->loop = uv_default_loop();
    kvr_nats_opts o = {.url = url, .name = "kvr-worker-probe"};
    if (kvr_nats_init(&p->nats, p->loop, &o, &err) != 0) {
        fprintf(stderr, "probe: nats: %s\n", err.msg);
        return 1;
    }
    uv_timer_init(p->loop, &p->timer);
    p->timer.data = p;
    p->start_ms = uv_now(p->loop);
    return 0;
}

static int run(probe *p)
{
    uv_run(p->loop, UV_RUN_DEFAULT);
    kvr_nats_global_shutdown(2000);
    return p->rc;
}

static void on_deadline(uv_timer_t *t)
{
    probe *p = t->data;
    fprintf(stderr, "probe: timed out\n");
    finish(p, 3);
}

static void on_stream(int status, const kvr_nats_stream_info *info, const char *errmsg, void *data)
{
    probe *p = data;
    if (status != 0)
        fprintf(stderr, "probe: ensure stream: %s\n", errmsg ? errmsg : "failed");
    else
        printf("{\"first_seq\":%" PRIu64 ",\"last_seq\":%" PRIu64 "}\n", info->first_seq,
               info->last_seq);
    finish(p, status == 0 ? 0 : 1);
}

static int cmd_ensure_stream(int argc, char **argv)
{
    probe p = {0};
    if (start_nats(&p, arg(argc, argv, "--nats", "nats://127.0.0.1:4222")))
        return 1;
    kvr_nats_stream_cfg c = {.name = "KVR_EVENTS", .subjects = "kvr.kv.>", .max_age_ms = 3600000};
    if (kvr_nats_js_ensure_stream(&p.nats, &c, on_stream, &p) != 0)
        return 1;
    uv_timer_start(&p.timer, on_deadline, 15000, 0);
    return run(&p);
}

/* ---- digest ---- */

static uint64_t cache_digest(const char *file, uint64_t worker, uint64_t *n_blocks)
{
    FILE *f = fopen(file, "rb");
    if (!f) {
        perror(file);
        exit(2);
    }
    kvr_buf b;
    kvr_buf_init(&b);
    char tmp[65536];
    size_t n;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0)
        kvr_buf_append(&b, tmp, n);
    fclose(f);
    cJSON *root = cJSON_ParseWithLength(b.base, b.len);
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(root, "seq_hashes");
    if (!cJSON_IsArray(arr)) {
        fprintf(stderr, "probe: %s has no seq_hashes\n", file);
        exit(2);
    }
    uint64_t sum = 0;
    *n_blocks = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, arr)
    {
        sum += kvr_index_pair_mix(worker, strtoull(it->valuestring, NULL, 10));
        (*n_blocks)++;
    }
    cJSON_Delete(root);
    kvr_buf_free(&b);
    return sum;
}

/* Synchronous cnats JetStream subscription (a test tool may block): every message of the
 * subject from the stream's start, until the consumer reports nothing pending and nothing
 * more arrives for a moment. */
static int cmd_digest(int argc, char **argv)
{
    kvr_err err = {0};
    uint64_t worker_id = strtoull(arg(argc, argv, "--worker-id", "1"), NULL, 10);
    uint32_t bs = (uint32_t)strtoul(arg(argc, argv, "--block-size", "64"), NULL, 10);
    const char *subject = arg(argc, argv, "--subject", NULL);
    const char *cache = arg(argc, argv, "--cache", NULL);
    const char *url = arg(argc, argv, "--nats", "nats://127.0.0.1:4222");
    if (!subject || !cache) {
        fprintf(stderr, "probe digest: --subject and --cache are required\n");
        return 2;
    }
    kvr_index *idx;
    kvr_index_opts io = {.block_size = bs};
    if (kvr_index_create(&idx, &io, &err) != 0)
        return 2;
    kvr_kv_decoder dec;
    kvr_kv_decoder_init(&dec, NULL);
    natsConnection *nc = NULL;
    jsCtx *js = NULL;
    natsSubscription *sub = NULL;
    jsErrCode jerr = 0;
    natsStatus s = natsConnection_ConnectTo(&nc, url);
    if (s == NATS_OK)
        s = natsConnection_JetStream(&js, nc, NULL);
    jsSubOptions so;
    jsSubOptions_Init(&so);
    so.Stream = "KVR_EVENTS";
    so.Config.DeliverPolicy = js_DeliverAll;
    so.Config.AckPolicy = js_AckNone;
    if (s == NATS_OK)
        s = js_SubscribeSync(&sub, js, subject, NULL, &so, &jerr);
    if (s != NATS_OK) {
        fprintf(stderr, "probe: subscribe %s: %s (%d)\n", subject, natsStatus_GetText(s), (int)jerr);
        return 1;
    }
    uint64_t payloads = 0, rejected = 0, apply_errors = 0, pending = 1;
    for (;;) {
        natsMsg *m = NULL;
        s = natsSubscription_NextMsg(&m, sub, pending ? 5000 : 700);
        if (s == NATS_TIMEOUT)
            break;
        if (s != NATS_OK) {
            fprintf(stderr, "probe: next: %s\n", natsStatus_GetText(s));
            return 1;
        }
        jsMsgMetaData *meta = NULL;
        if (natsMsg_GetMetaData(&meta, m) == NATS_OK) {
            pending = meta->NumPending;
            jsMsgMetaData_Destroy(meta);
        }
        payloads++;
        kvr_kv_batch b;
        if (kvr_kv_decode(&dec, natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m), &b, NULL,
                          &err) != 0) {
            fprintf(stderr, "probe: payload rejected: %s\n", err.msg);
            rejected++;
        } else {
            apply_errors += kvr_index_apply_batch(idx, worker_id, b.events, b.n_events, &err);
        }
        natsMsg_Destroy(m);
    }
    natsSubscription_Unsubscribe(sub);
    natsSubscription_Destroy(sub);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    nats_CloseAndWait(2000);
    uint64_t n_cache;
    uint64_t want = cache_digest(cache, worker_id, &n_cache);
    kvr_index_stats st;
    kvr_index_stats_get(idx, &st);
    uint64_t got = kvr_index_digest(idx);
    printf("{\"equal\":%s,\"index_digest\":\"%" PRIu64 "\",\"cache_digest\":\"%" PRIu64
           "\",\"index_entries\":%" PRIu64 ",\"cache_blocks\":%" PRIu64 ",\"payloads\":%" PRIu64
           ",\"rejected\":%" PRIu64 ",\"apply_errors\":%" PRIu64 ",\"clears\":%" PRIu64
           ",\"stores\":%" PRIu64 ",\"removes\":%" PRIu64 ",\"dropped_unknown_parent\":%" PRIu64
           "}\n",
           got == want ? "true" : "false", got, want, st.entries, n_cache, payloads, rejected,
           apply_errors, st.clears, st.stores, st.removes, st.dropped_unknown_parent);
    kvr_kv_decoder_free(&dec);
    kvr_index_destroy(idx);
    return got == want && rejected == 0 ? 0 : 1;
}

/* ---- heartbeat ---- */

static void print_mp(kvr_mp_reader *r)
{
    kvr_slice s;
    uint64_t u;
    uint32_t n;
    switch (kvr_mp_peek(r)) {
    case KVR_MP_UINT:
        kvr_mp_read_uint(r, &u);
        printf("%" PRIu64, u);
        break;
    case KVR_MP_STR:
        kvr_mp_read_str(r, &s);
        printf("\"%.*s\"", (int)s.len, s.base);
        break;
    case KVR_MP_MAP:
        kvr_mp_read_map(r, &n);
        printf("{");
        for (uint32_t i = 0; i < n; i++) {
            if (i)
                printf(",");
            print_mp(r);
            printf(":");
            print_mp(r);
        }
        printf("}");
        break;
    case KVR_MP_ARRAY:
        kvr_mp_read_array(r, &n);
        printf("[");
        for (uint32_t i = 0; i < n; i++) {
            if (i)
                printf(",");
            print_mp(r);
        }
        printf("]");
        break;
    default:
        kvr_mp_skip(r);
        printf("null");
    }
}

static void on_hb(const kvr_nats_msg *m, void *data)
{
    probe *p = data;
    if (p->done)
        return;
    kvr_mp_reader r;
    kvr_mp_reader_init(&r, m->data, m->len);
    print_mp(&r);
    printf("\n");
    fflush(stdout);
    finish(p, 0);
}

static int cmd_heartbeat(int argc, char **argv)
{
    probe p = {0};
    kvr_err err = {0};
    const char *subject = arg(argc, argv, "--subject", NULL);
    if (!subject)
        return 2;
    if (start_nats(&p, arg(argc, argv, "--nats", "nats://127.0.0.1:4222")))
        return 1;
    if (kvr_nats_subscribe(&p.nats, subject, NULL, on_hb, &p, NULL, &err) != 0)
        return 1;
    uv_timer_start(&p.timer, on_deadline, 10000, 0);
    return run(&p);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: kvr-worker-probe gen|ensure-stream|digest|heartbeat ...\n");
        return 2;
    }
    if (!strcmp(argv[1], "gen"))
        return cmd_gen(argc, argv);
    if (!strcmp(argv[1], "ensure-stream"))
        return cmd_ensure_stream(argc, argv);
    if (!strcmp(argv[1], "digest"))
        return cmd_digest(argc, argv);
    if (!strcmp(argv[1], "heartbeat"))
        return cmd_heartbeat(argc, argv);
    if (!strcmp(argv[1], "cache-digest")) {
        const char *cache = arg(argc, argv, "--cache", NULL);
        if (!cache)
            return 2;
        uint64_t n;
        uint64_t d = cache_digest(cache, strtoull(arg(argc, argv, "--worker-id", "1"), NULL, 10), &n);
        printf("%016" PRIx64 "\n", d);
        return 0;
    }
    fprintf(stderr, "probe: unknown command %s\n", argv[1]);
    return 2;
}
