/* kvr-bridge: a sidecar that puts a real vLLM or SGLang engine behind kvroute (issue 13).
 *
 * One loop thread owns everything: the engine's ZMQ sockets (polled through ZMQ_FD with a
 * uv_poll_t; ZMQ_FD is edge-triggered, so every wake-up drains until ZMQ_EVENTS has no
 * POLLIN, and every send re-checks), the NATS connection, the metrics scrape (libcurl multi
 * on libuv) and the timers. Each data-parallel rank r is its own worker (id + r), with its own
 * SUB (engine port + r), replay DEALER (replay port + r) and JetStream outbox. The wire
 * format is in frame.h (with the vLLM/SGLang sources it was checked in). */
#include "bridge_priv.h"
#include "kvr_err.h"
#include "kvr_flags.h"
#include "kvr_log.h"
#include "kvr_model_card.h"

#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

/* ------------------------------------------------------------------ lifecycle */

static void close_walk(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void on_nats_closed(kvr_nats *kn)
{
    bridge *br = kn->data;
    uv_walk(br->loop, close_walk, NULL);
}

static void on_signal(uv_signal_t *s, int signum)
{
    bridge *br = s->data;
    if (br->closing)
        return;
    br->closing = true;
    KVR_LOG_INFO("stopping", "signal=%d", signum);
    br_log_stats(br);
    for (int i = 0; i < br->n; i++) {
        rank *rk = &br->ranks[i];
        br_zpoll_close(rk->sub_zp);
        br_zpoll_close(rk->dealer_zp);
        rk->sub_zp = rk->dealer_zp = NULL;
        rk->sub = rk->dealer = NULL;
        uv_timer_stop(&rk->replay_timer);
        uv_timer_stop(&rk->probe_timer);
    }
    uv_idle_stop(&br->idle);
    uv_timer_stop(&br->hb_timer);
    uv_timer_stop(&br->scrape_timer);
    uv_timer_stop(&br->stats_timer);
    uv_timer_stop(&br->announce_timer);
    uv_signal_stop(&br->sigterm);
    uv_signal_stop(&br->sigint);
    kvr_curl_close(&br->curl, NULL);
    kvr_nats_close(&br->nats, on_nats_closed);
}

/* vLLM's offset_endpoint_port: rank r adds r to the TCP port (inproc gets "_dp<r>"). */
static int offset_port(const char *ep, int r, char *out, size_t cap)
{
    if (r == 0 || strncmp(ep, "inproc://", 9) == 0) {
        int n = r == 0 ? snprintf(out, cap, "%s", ep) : snprintf(out, cap, "%s_dp%d", ep, r);
        return n > 0 && (size_t)n < cap ? 0 : KVR_EINVAL;
    }
    const char *c = strrchr(ep, ':');
    char *e;
    long port = c ? strtol(c + 1, &e, 10) : -1;
    if (!c || *e || port <= 0 || port + r > 65535)
        return KVR_EINVAL;
    int n = snprintf(out, cap, "%.*s:%ld", (int)(c - ep), ep, port + r);
    return n > 0 && (size_t)n < cap ? 0 : KVR_EINVAL;
}

int main(int argc, char **argv)
{
    static bridge B;
    bridge *br = &B;
    br->topic = "";
    br->ns = "default";
    br->engine = "vllm";
    br->role = "both";
    br->log_level = "info";
    br->dp = 1;
    br->scrape_ms = 250;
    br->stats_ms = 10000;
    br->announce_ms = 500;
    br->replay_timeout_ms = 1000;
    br->max_inflight = 256;
    br->outbox_bytes = 64 << 20;
    kvr_flag flags[] = {
        {"engine-url", KVR_FLAG_STRING, &br->engine_url, "engine base URL (http://HOST:PORT)",
         false},
        {"zmq", KVR_FLAG_STRING, &br->zmq_ep, "engine's KV-event PUB endpoint (tcp://HOST:5557)",
         false},
        {"replay", KVR_FLAG_STRING, &br->replay, "engine's replay ROUTER endpoint (optional)",
         false},
        {"topic", KVR_FLAG_STRING, &br->topic, "topic prefix to subscribe to", false},
        {"data-parallel-size", KVR_FLAG_INT, &br->dp,
         "engine DP ranks: rank r = ports +r, worker id +r", false},
        {"nats", KVR_FLAG_STRING, &br->nats_url, "NATS URL(s)", false},
        {"namespace", KVR_FLAG_STRING, &br->ns, "kvroute namespace", false},
        {"id", KVR_FLAG_U64, &br->id, "worker id of rank 0", false},
        {"engine", KVR_FLAG_STRING, &br->engine, "vllm or sglang", false},
        {"model-dir", KVR_FLAG_STRING, &br->model_dir, "the engine's model directory: its tokenizer + chat template checksum goes in the heartbeat's mdc_sum",
         false},
        {"model", KVR_FLAG_STRING, &br->model, "model name (default: model_name from /metrics)",
         false},
        {"block-size", KVR_FLAG_INT, &br->block_size,
         "block size when /metrics has no cache_config_info", false},
        {"scrape-interval", KVR_FLAG_DURATION, &br->scrape_ms, "engine /metrics and /health period",
         false},
        {"announce-delay", KVR_FLAG_DURATION, &br->announce_ms, "first heartbeat to first event",
         false},
        {"replay-timeout", KVR_FLAG_DURATION, &br->replay_timeout_ms, "replay silence that ends it",
         false},
        {"max-inflight", KVR_FLAG_INT, &br->max_inflight, "JetStream publishes awaiting their ack",
         false},
        {"outbox-bytes", KVR_FLAG_SIZE, &br->outbox_bytes, "bound of queued event bytes per rank",
         false},
        {"stats-interval", KVR_FLAG_DURATION, &br->stats_ms, "period of the counters' log line",
         false},
        {"log-level", KVR_FLAG_STRING, &br->log_level, "debug|info|warn|error", false},
        {"role", KVR_FLAG_STRING, &br->role,
         "the engine's role in its heartbeats: both, or prefill|decode for a vLLM instance run "
         "with the NixlConnector as kv_producer / kv_consumer side of a disaggregated pool",
         false},
        KVR_NATS_FLAG_ENTRIES(&br->nf),
    };
    size_t nflags = sizeof flags / sizeof flags[0];
    kvr_err err = {0};
    int rv = kvr_flags_parse(flags, nflags, argc - 1, argv + 1, NULL, 0, NULL, &err);
    if (rv == KVR_FLAGS_HELP) {
        kvr_flags_usage(stdout, "kvr-bridge", flags, nflags);
        return 0;
    }
    if (rv < 0) {
        fprintf(stderr, "kvr-bridge: %s\n", err.msg);
        return 2;
    }
    const char *missing = !br->engine_url ? "--engine-url"
                          : !br->zmq_ep   ? "--zmq"
                          : !br->nats_url ? "--nats"
                          : !flags[7].set ? "--id"
                                          : NULL;
    if (missing) {
        fprintf(stderr, "kvr-bridge: %s is required\n", missing);
        return 2;
    }
    if (br->dp < 1 || br->dp > MAX_RANKS ||
        (strcmp(br->engine, "vllm") && strcmp(br->engine, "sglang")) || br->scrape_ms < 1 ||
        (strcmp(br->role, "both") && strcmp(br->role, "prefill") && strcmp(br->role, "decode")) ||
        br->stats_ms < 1 || br->max_inflight < 1 || br->outbox_bytes < 4096 || br->block_size < 0 ||
        strlen(br->ns) > 64 || strlen(br->engine_url) > 900 || strlen(br->topic) > 255) {
        fprintf(stderr,
                "kvr-bridge: bad flag value (--data-parallel-size 1..%d, --engine vllm|sglang, "
                "--role both|prefill|decode, "
                "--namespace up to 64 bytes, ...)\n",
                MAX_RANKS);
        return 2;
    }
    kvr_log_level lvl;
    if (kvr_log_parse_level(br->log_level, &lvl) != 0) {
        fprintf(stderr, "kvr-bridge: bad --log-level\n");
        return 2;
    }
    char idbuf[32];
    snprintf(idbuf, sizeof idbuf, "%" PRIu64, br->id);
    kvr_log_setup("bridge", idbuf, lvl);
    signal(SIGPIPE, SIG_IGN);
    if (kvr_nats_flags_load(&br->nf, &err) != 0) {
        fprintf(stderr, "kvr-bridge: %s\n", err.msg);
        return 2;
    }
    if (br->model_dir && kvr_model_card_sum(br->model_dir, br->mdc_sum, sizeof br->mdc_sum,
                                            &err) != 0) {
        fprintf(stderr, "kvr-bridge: --model-dir: %s\n", err.msg);
        return 2;
    }
    br->loop = uv_default_loop();
    br->started_ms = kvr_now_ms();
    br->zctx = zmq_ctx_new();
    kvr_kv_decoder_init(&br->dec, NULL);
    kvr_buf_init(&br->out);
    kvr_buf_init(&br->scratch);
    kvr_buf_init(&br->enc);
    kvr_buf_init(&br->metrics_body);
    kvr_nats_opts no = {.url = br->nats_url, .name = "kvr-bridge"};
    kvr_nats_flags_fill(&br->nf, &no);
    /* rank 0's id: the credential's worker id (kvr-nats-auth.sh worker:NS:ID) */
    char inbox[KVR_NATS_INBOX_PREFIX_MAX + 1];
    no.inbox_prefix = kvr_nats_role_inbox(inbox, sizeof inbox, "worker", br->ns, br->id);
    br->nats.data = br;
    if (kvr_nats_init(&br->nats, br->loop, &no, &err) != 0 ||
        kvr_curl_init(&br->curl, br->loop, NULL, &err) != 0) {
        fprintf(stderr, "kvr-bridge: %s\n", err.msg);
        return 1;
    }
    br->n = (int)br->dp;
    uv_idle_init(br->loop, &br->idle); /* before the first replay request drains from it */
    br->idle.data = br;
    for (int i = 0; i < br->n; i++) {
        rank *rk = &br->ranks[i];
        rk->br = br;
        rk->r = i;
        rk->wid = br->id + (uint64_t)i;
        snprintf(rk->subj_kv, sizeof rk->subj_kv, "kvr.kv.%s.%" PRIu64, br->ns, rk->wid);
        snprintf(rk->subj_hb, sizeof rk->subj_hb, "kvr.workers.%s.%" PRIu64, br->ns, rk->wid);
        if (offset_port(br->zmq_ep, i, rk->sub_ep, sizeof rk->sub_ep) != 0 ||
            (br->replay && offset_port(br->replay, i, rk->replay_ep, sizeof rk->replay_ep) != 0)) {
            fprintf(stderr, "kvr-bridge: cannot offset the port of --zmq/--replay for rank %d\n",
                    i);
            return 2;
        }
        uv_timer_init(br->loop, &rk->replay_timer);
        rk->replay_timer.data = rk;
        uv_timer_init(br->loop, &rk->probe_timer);
        rk->probe_timer.data = rk;
        if (js_outbox_init(&rk->ob, &br->nats, rk->subj_kv, (size_t)br->max_inflight,
                           (size_t)br->outbox_bytes, 5000, br_on_loss, rk) != 0 ||
            br_open_sub(rk, br->topic) != 0 || br_open_dealer(rk) != 0) {
            fprintf(stderr, "kvr-bridge: cannot set up rank %d\n", i);
            return 1;
        }
        /* Resume: what this bridge (or its previous run) forwarded is unknown here, so ask
         * the engine for everything it still buffers. If that starts at seq 0 the index gets
         * the engine's whole history again (stores and removals re-applied in order leave the
         * same set); if it starts later, or there is no replay socket, earlier batches are
         * gone and the worker is cleared first. */
        if (rk->dealer) {
            br_start_replay(rk, 0);
            br_probe_tail(rk);
        } else {
            br_publish_clear(rk, "start without a replay socket");
        }
    }
    uv_timer_init(br->loop, &br->hb_timer);
    uv_timer_init(br->loop, &br->scrape_timer);
    uv_timer_init(br->loop, &br->stats_timer);
    uv_timer_init(br->loop, &br->announce_timer);
    br->hb_timer.data = br->scrape_timer.data = br->stats_timer.data = br->announce_timer.data = br;
    uv_timer_start(&br->scrape_timer, br_on_scrape, 0, (uint64_t)br->scrape_ms);
    uv_timer_start(&br->hb_timer, br_on_hb_timer, 1000, 1000);
    uv_timer_start(&br->stats_timer, br_on_stats_timer, (uint64_t)br->stats_ms,
                   (uint64_t)br->stats_ms);
    uv_signal_init(br->loop, &br->sigterm);
    uv_signal_init(br->loop, &br->sigint);
    br->sigterm.data = br->sigint.data = br;
    uv_signal_start(&br->sigterm, on_signal, SIGTERM);
    uv_signal_start(&br->sigint, on_signal, SIGINT);
    char red[512];
    KVR_LOG_INFO("started",
                 "engine=%s url=%s zmq=%s replay=%s ranks=%d nats=%s namespace=%s id=%" PRIu64,
                 br->engine, br->engine_url, br->zmq_ep, br->replay ? br->replay : "-", br->n,
                 kvr_nats_redact_url(br->nats_url, red, sizeof red), br->ns, br->id);
    uv_run(br->loop, UV_RUN_DEFAULT);
    for (int i = 0; i < br->n; i++) {
        br_pending_free(&br->ranks[i]);
        js_outbox_free(&br->ranks[i].ob);
    }
    kvr_kv_decoder_free(&br->dec);
    kvr_buf_free(&br->out);
    kvr_buf_free(&br->scratch);
    kvr_buf_free(&br->enc);
    kvr_buf_free(&br->metrics_body);
    zmq_ctx_term(br->zctx);
    kvr_nats_flags_free(&br->nf);
    kvr_nats_global_shutdown(2000);
    return 0;
}
