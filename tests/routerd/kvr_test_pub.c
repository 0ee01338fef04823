/* kvr-test-pub: publishes KV-event batches and worker heartbeats to NATS for routerd tests.
 *
 *   kvr-test-pub --nats URL [--core] < script      (one command per line, '#' comments)
 *   kvr-test-pub tokens P N                          prints {"token_ids":[...]} of prefix P
 *   kvr-test-pub --nats URL beat-loop NS W MODEL URL BS STARTED_MS [INTERVAL_MS]
 * Heartbeats announce capacity_blocks $KVR_TEST_PUB_CAPACITY (default 16384).
 *
 * Prefix model: token k of prefix P is tok(P,k) = (P*1000003 + k) mod 2^31; block b of prefix
 * P (block size B) holds tokens [b*B, b*B+B) and has external hash ext(P,b) = P*100000 + b + 1.
 * So two workers storing the same blocks of the same prefix share seq hashes, and a /v1/match
 * on the tokens of prefix P gives each worker the number of leading blocks it stored.
 *
 * Script commands (FMT: array|map, HASH: int|bytes):
 *   store NS W FMT HASH P B0 N [BS]     BlockStored of blocks B0..B0+N-1 of prefix P (BS default 64),
 *                                       parent ext(P,B0-1) or nil when B0 == 0
 *   remove NS W FMT HASH P B0 N         BlockRemoved of those blocks
 *   clear NS W FMT                      AllBlocksCleared
 *   orphan NS W FMT HASH P B0 N [BS]    BlockStored whose parent is a hash nobody stored
 *   raw SUBJECT HEX                     any payload (hex bytes; "-" for empty)
 *   beat NS W MODEL URL BS STARTED_MS   one heartbeat
 *   sleep MS
 *   route MODEL NS P NTOKENS RID [TOKENS]
 *                                       NATS request on kvr.route (seq hashes of prefix P's first
 *                                       NTOKENS tokens, block size 64, request id RID as 16
 *                                       bytes; "tokens" field TOKENS if given); prints "route ok=1 worker=W overlap=O mode=M
 *                                       router=R" or "route ok=0 error=..."
 *   purge STREAM                        purges every message of a JetStream stream
 *   rev RID EVENT                       publishes {"request_id","event"} on kvr.route.event
 * Event publishes go through JetStream (acked, so the stream holds them in order) unless --core.
 * Prints "last_seq=N" (stream sequence of the last acked publish) at the end. */
#include "kv_event.h"
#include "kvr_buf.h"
#include "kvr_hash.h"
#include "kvr_mp.h"
#include "route_msg.h"

#include <inttypes.h>
#include <nats/nats.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_BLOCKS 4096

static natsConnection *nc;
static jsCtx *js;
static bool core;
static uint64_t last_seq;

static uint32_t tok(uint64_t p, uint64_t k)
{
    return (uint32_t)((p * 1000003ull + k) & 0x7fffffffu);
}

static uint64_t ext(uint64_t p, uint64_t b)
{
    return p * 100000ull + b + 1;
}

static int publish(const char *subject, const void *data, size_t len)
{
    if (core) {
        natsStatus s = natsConnection_Publish(nc, subject, data, (int)len);
        if (s != NATS_OK) {
            fprintf(stderr, "publish %s: %s\n", subject, natsStatus_GetText(s));
            return -1;
        }
        return 0;
    }
    jsPubAck *pa = NULL;
    jsErrCode jerr = 0;
    natsStatus s = js_Publish(&pa, js, subject, data, (int)len, NULL, &jerr);
    if (s != NATS_OK) {
        fprintf(stderr, "js publish %s: %s (%d)\n", subject, natsStatus_GetText(s), (int)jerr);
        return -1;
    }
    last_seq = pa->Sequence;
    jsPubAck_Destroy(pa);
    return 0;
}

static int fmt_of(const char *s, kvr_kv_format *f)
{
    if (!strcmp(s, "array"))
        *f = KVR_KV_FORMAT_ARRAY;
    else if (!strcmp(s, "map"))
        *f = KVR_KV_FORMAT_MAP;
    else
        return -1;
    return 0;
}

static int hash_of(const char *s, kvr_kv_hash_format *h)
{
    if (!strcmp(s, "int"))
        *h = KVR_KV_HASH_INT;
    else if (!strcmp(s, "bytes"))
        *h = KVR_KV_HASH_BYTES;
    else
        return -1;
    return 0;
}

static int send_batch(const char *ns, uint64_t w, kvr_kv_event *ev, kvr_kv_format f,
                      kvr_kv_hash_format h)
{
    kvr_kv_batch b = {.ts = 1.0, .n_events = 1, .events = ev};
    kvr_buf out;
    kvr_buf_init(&out);
    if (kvr_kv_encode(&out, &b, f, h) != 0) {
        fprintf(stderr, "encode failed\n");
        return -1;
    }
    char subj[256];
    snprintf(subj, sizeof(subj), "kvr.kv.%s.%" PRIu64, ns, w);
    int rc = publish(subj, out.base, out.len);
    kvr_buf_free(&out);
    return rc;
}

static int do_store(char **a, int n, bool orphan)
{
    if (n < 8)
        return -1;
    const char *ns = a[1];
    uint64_t w = strtoull(a[2], NULL, 10), p = strtoull(a[5], NULL, 10);
    uint64_t b0 = strtoull(a[6], NULL, 10), nb = strtoull(a[7], NULL, 10);
    uint32_t bs = n > 8 ? (uint32_t)strtoul(a[8], NULL, 10) : 64;
    kvr_kv_format f;
    kvr_kv_hash_format h;
    if (fmt_of(a[3], &f) || hash_of(a[4], &h) || nb == 0 || nb > MAX_BLOCKS || bs == 0 || bs > 4096)
        return -1;
    static uint64_t hashes[MAX_BLOCKS];
    uint32_t *toks = malloc(nb * bs * sizeof(uint32_t));
    if (!toks)
        return -1;
    for (uint64_t i = 0; i < nb; i++) {
        hashes[i] = ext(p, b0 + i);
        for (uint32_t j = 0; j < bs; j++)
            toks[i * bs + j] = tok(p, (b0 + i) * bs + j);
    }
    kvr_kv_event ev = {.type = KVR_KV_STORED,
                       .n_hashes = (uint32_t)nb,
                       .hashes = hashes,
                       .has_parent = b0 > 0 || orphan,
                       .parent = orphan ? 0xdeadbeefcafeull : (b0 > 0 ? ext(p, b0 - 1) : 0),
                       .n_tokens = (uint32_t)(nb * bs),
                       .tokens = toks,
                       .block_size = bs};
    int rc = send_batch(ns, w, &ev, f, h);
    free(toks);
    return rc;
}

static int do_remove(char **a, int n)
{
    if (n < 8)
        return -1;
    uint64_t w = strtoull(a[2], NULL, 10), p = strtoull(a[5], NULL, 10);
    uint64_t b0 = strtoull(a[6], NULL, 10), nb = strtoull(a[7], NULL, 10);
    kvr_kv_format f;
    kvr_kv_hash_format h;
    if (fmt_of(a[3], &f) || hash_of(a[4], &h) || nb == 0 || nb > MAX_BLOCKS)
        return -1;
    static uint64_t hashes[MAX_BLOCKS];
    for (uint64_t i = 0; i < nb; i++)
        hashes[i] = ext(p, b0 + i);
    kvr_kv_event ev = {.type = KVR_KV_REMOVED, .n_hashes = (uint32_t)nb, .hashes = hashes};
    return send_batch(a[1], w, &ev, f, h);
}

static int do_clear(char **a, int n)
{
    if (n < 4)
        return -1;
    kvr_kv_format f;
    if (fmt_of(a[3], &f))
        return -1;
    kvr_kv_event ev = {.type = KVR_KV_CLEARED};
    return send_batch(a[1], strtoull(a[2], NULL, 10), &ev, f, KVR_KV_HASH_INT);
}

static int do_raw(char **a, int n)
{
    if (n < 3)
        return -1;
    size_t hl = strcmp(a[2], "-") == 0 ? 0 : strlen(a[2]);
    if (hl % 2)
        return -1;
    unsigned char *buf = malloc(hl / 2 + 1);
    if (!buf)
        return -1;
    for (size_t i = 0; i < hl / 2; i++) {
        unsigned v;
        if (sscanf(a[2] + 2 * i, "%2x", &v) != 1) {
            free(buf);
            return -1;
        }
        buf[i] = (unsigned char)v;
    }
    int rc = publish(a[1], buf, hl / 2);
    free(buf);
    return rc;
}

static int beat(const char *ns, uint64_t w, const char *model, const char *url, uint32_t bs,
                uint64_t started)
{
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_mp_write_map(&b, 12);
    kvr_mp_write_cstr(&b, "id");
    kvr_mp_write_uint(&b, w);
    kvr_mp_write_cstr(&b, "namespace");
    kvr_mp_write_cstr(&b, ns);
    kvr_mp_write_cstr(&b, "model");
    kvr_mp_write_cstr(&b, model);
    kvr_mp_write_cstr(&b, "role");
    kvr_mp_write_cstr(&b, "both");
    kvr_mp_write_cstr(&b, "url");
    kvr_mp_write_cstr(&b, url);
    kvr_mp_write_cstr(&b, "block_size");
    kvr_mp_write_uint(&b, bs);
    kvr_mp_write_cstr(&b, "capacity_blocks");
    /* KVR_TEST_PUB_CAPACITY: the capacity heartbeats announce (routerd_approx's LRU bound) */
    const char *cap = getenv("KVR_TEST_PUB_CAPACITY");
    kvr_mp_write_uint(&b, cap && *cap ? strtoull(cap, NULL, 10) : 16384);
    kvr_mp_write_cstr(&b, "active");
    kvr_mp_write_uint(&b, 0);
    kvr_mp_write_cstr(&b, "waiting");
    kvr_mp_write_uint(&b, 0);
    kvr_mp_write_cstr(&b, "used_blocks");
    kvr_mp_write_uint(&b, 0);
    kvr_mp_write_cstr(&b, "mdc_sum");
    kvr_mp_write_cstr(&b, "test");
    kvr_mp_write_cstr(&b, "started_ms");
    kvr_mp_write_uint(&b, started);
    char subj[256];
    snprintf(subj, sizeof(subj), "kvr.workers.%s.%" PRIu64, ns, w);
    natsStatus s = natsConnection_Publish(nc, subj, b.base, (int)b.len);
    kvr_buf_free(&b);
    if (s == NATS_OK)
        s = natsConnection_FlushTimeout(nc, 2000);
    return s == NATS_OK ? 0 : -1;
}

static void rid_bytes(const char *rid, uint8_t out[16])
{
    memset(out, 0, 16);
    size_t n = strlen(rid);
    memcpy(out, rid, n > 16 ? 16 : n);
}

static int do_route(char **a, int n)
{
    if (n < 6)
        return -1;
    uint64_t p = strtoull(a[3], NULL, 10), nt = strtoull(a[4], NULL, 10);
    if (nt > 1u << 20)
        return -1;
    uint32_t *toks = malloc((nt + 1) * sizeof(uint32_t));
    uint64_t *seq = malloc((nt / 64 + 1) * sizeof(uint64_t));
    if (!toks || !seq)
        return -1;
    for (uint64_t k = 0; k < nt; k++)
        toks[k] = tok(p, k);
    size_t ns = kvr_hash_seq(toks, nt, 64, false, 0, seq, nt / 64 + 1);
    uint8_t rid[16];
    rid_bytes(a[5], rid);
    kvr_buf b;
    kvr_buf_init(&b);
    uint64_t claimed = n > 6 ? strtoull(a[6], NULL, 10) : nt; /* a lie, if asked for */
    kvr_route_req rq = {.frontend_id = 77,
                        .model = {a[1], strlen(a[1])},
                        .ns = {a[2], strlen(a[2])},
                        .role = {"both", 4},
                        .tokens = claimed > UINT32_MAX ? UINT32_MAX : (uint32_t)claimed,
                        .seq_hashes = seq,
                        .n_hashes = ns};
    memcpy(rq.request_id, rid, 16);
    if (kvr_route_req_encode(&b, &rq) != 0) {
        free(toks);
        free(seq);
        kvr_buf_free(&b);
        return -1;
    }
    free(toks);
    free(seq);
    /* like a frontend: retry the same request id (routers dedupe by it) on a timeout or no
     * responders, up to 10 tries */
    natsMsg *reply = NULL;
    natsStatus s = NATS_OK;
    int tries = 0;
    for (; tries < 10; tries++) {
        s = natsConnection_Request(&reply, nc, "kvr.route", b.base, (int)b.len, 2000);
        if (s == NATS_OK)
            break;
        usleep(100000);
    }
    kvr_buf_free(&b);
    if (s != NATS_OK) {
        printf("route ok=0 error=%s\n", natsStatus_GetText(s));
        fflush(stdout);
        return 0;
    }
    kvr_route_reply rep;
    kvr_err derr = {0};
    bool ok = false;
    uint64_t worker = 0, overlap = 0, router = 0;
    kvr_slice mode = {"", 0}, err = {"", 0};
    if (kvr_route_reply_decode(natsMsg_GetData(reply), (size_t)natsMsg_GetDataLength(reply), &rep,
                               &derr) != 0) {
        err = (kvr_slice){derr.msg, strlen(derr.msg)};
    } else {
        ok = rep.ok;
        worker = rep.worker_id;
        overlap = rep.overlap_blocks;
        router = rep.router_id;
        mode = rep.mode;
        if (rep.error.len)
            err = rep.error;
    }
    if (ok)
        printf("route ok=1 worker=%" PRIu64 " overlap=%" PRIu64 " mode=%.*s router=%" PRIu64
               " rid=%s tries=%d\n",
               worker, overlap, (int)mode.len, mode.base, router, a[5], tries + 1);
    else
        printf("route ok=0 error=%.*s\n", (int)err.len, err.base);
    fflush(stdout);
    natsMsg_Destroy(reply);
    return 0;
}

static int do_rev(char **a, int n)
{
    if (n < 3)
        return -1;
    uint8_t rid[16];
    rid_bytes(a[1], rid);
    kvr_buf b;
    kvr_buf_init(&b);
    kvr_route_event ev = {.type = strcmp(a[2], "free") == 0           ? KVR_ROUTE_EVENT_FREE
                                  : strcmp(a[2], "prefill_done") == 0 ? KVR_ROUTE_EVENT_PREFILL_DONE
                                                                      : 0};
    memcpy(ev.request_id, rid, 16);
    if (kvr_route_event_encode(&b, &ev) != 0) {
        kvr_buf_free(&b);
        return -1;
    }
    natsStatus s = natsConnection_Publish(nc, "kvr.route.event", b.base, (int)b.len);
    kvr_buf_free(&b);
    if (s == NATS_OK)
        s = natsConnection_FlushTimeout(nc, 2000);
    return s == NATS_OK ? 0 : -1;
}

static int connect_nats(const char *url)
{
    natsOptions *o = NULL;
    natsOptions_Create(&o);
    natsOptions_SetURL(o, url);
    natsOptions_SetMaxReconnect(o, -1);
    natsOptions_SetReconnectWait(o, 100);
    natsStatus s = natsConnection_Connect(&nc, o);
    natsOptions_Destroy(o);
    if (s != NATS_OK) {
        fprintf(stderr, "connect %s: %s\n", url, natsStatus_GetText(s));
        return -1;
    }
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = 10000;
    if (natsConnection_JetStream(&js, nc, &jo) != NATS_OK)
        return -1;
    return 0;
}

int main(int argc, char **argv)
{
    const char *url = NULL;
    int i = 1;
    for (; i < argc; i++) {
        if (!strcmp(argv[i], "--nats") && i + 1 < argc)
            url = argv[++i];
        else if (!strcmp(argv[i], "--core"))
            core = true;
        else
            break;
    }
    if (i < argc && !strcmp(argv[i], "tokens")) {
        if (i + 2 >= argc)
            return 2;
        uint64_t p = strtoull(argv[i + 1], NULL, 10), n = strtoull(argv[i + 2], NULL, 10);
        printf("{\"token_ids\":[");
        for (uint64_t k = 0; k < n; k++)
            printf("%s%u", k ? "," : "", tok(p, k));
        printf("]}\n");
        return 0;
    }
    if (!url) {
        fprintf(stderr, "usage: kvr-test-pub --nats URL [--core] < script | tokens P N | beat-loop ...\n");
        return 2;
    }
    if (connect_nats(url) != 0)
        return 1;
    if (i < argc && !strcmp(argv[i], "beat-loop")) {
        if (i + 6 >= argc)
            return 2;
        int interval = i + 7 < argc ? atoi(argv[i + 7]) : 1000;
        for (;;) {
            beat(argv[i + 1], strtoull(argv[i + 2], NULL, 10), argv[i + 3], argv[i + 4],
                 (uint32_t)strtoul(argv[i + 5], NULL, 10), strtoull(argv[i + 6], NULL, 10));
            usleep((useconds_t)interval * 1000);
        }
    }
    char line[8192];
    int lineno = 0, rc = 0;
    while (fgets(line, sizeof(line), stdin)) {
        lineno++;
        char *a[16];
        int n = 0;
        for (char *t = strtok(line, " \t\r\n"); t && n < 16; t = strtok(NULL, " \t\r\n"))
            a[n++] = t;
        if (n == 0 || a[0][0] == '#')
            continue;
        int r;
        if (!strcmp(a[0], "store"))
            r = do_store(a, n, false);
        else if (!strcmp(a[0], "orphan"))
            r = do_store(a, n, true);
        else if (!strcmp(a[0], "remove"))
            r = do_remove(a, n);
        else if (!strcmp(a[0], "clear"))
            r = do_clear(a, n);
        else if (!strcmp(a[0], "raw"))
            r = do_raw(a, n);
        else if (!strcmp(a[0], "beat"))
            r = n >= 7 ? beat(a[1], strtoull(a[2], NULL, 10), a[3], a[4],
                              (uint32_t)strtoul(a[5], NULL, 10), strtoull(a[6], NULL, 10))
                       : -1;
        else if (!strcmp(a[0], "route"))
            r = do_route(a, n);
        else if (!strcmp(a[0], "purge")) {
            jsErrCode jerr = 0;
            r = n >= 2 && js_PurgeStream(js, a[1], NULL, &jerr) == NATS_OK ? 0 : -1;
        } else if (!strcmp(a[0], "rev"))
            r = do_rev(a, n);
        else if (!strcmp(a[0], "sleep"))
            r = n >= 2 ? (usleep((useconds_t)atoi(a[1]) * 1000), 0) : -1;
        else
            r = -1;
        if (r != 0) {
            fprintf(stderr, "kvr-test-pub: line %d (%s) failed\n", lineno, a[0]);
            rc = 1;
            break;
        }
    }
    natsConnection_FlushTimeout(nc, 5000);
    printf("last_seq=%" PRIu64 "\n", last_seq);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    nats_Close();
    return rc;
}
