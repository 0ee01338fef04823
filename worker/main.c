/* kvr-worker: a simulated inference engine behind an OpenAI-compatible HTTP API that
 * publishes real KV-cache events and heartbeats on NATS (DESIGN 3, 4, 9).
 *
 * One libuv loop thread owns everything: the engine (worker/engine.h), the HTTP server, the
 * NATS bridge (its callbacks arrive on this thread), the timers.
 *
 * Clocks: the engine runs on a simulated clock in ns. `drive()` maps it onto the monotonic
 * wall clock (uv_hrtime since start): it runs a step whenever the engine's clock is at or
 * behind the wall clock, and delivers a step's tokens when the wall clock reaches the step's
 * end. When idle the engine clock jumps to the wall clock. If steps take more CPU than the
 * simulated time they stand for, the engine falls behind: lag = wall - sim at the start of a
 * step, exported as kvr_worker_sim_lag_seconds (and _max); kvr_worker_clock_seconds{clock=
 * "sim"|"wall"} exports both clocks, so over a saturated window 1 - d(sim)/d(wall) is the
 * fraction of time the engine lost (an idle engine's clock jumps to the wall clock).
 *
 * Output granularity: tokens a stream gets in one delivery (normally one step; several when
 * the timer wakes after several short steps, e.g. at high --speedup) go out as one SSE chunk,
 * whose choices[0].text and token_ids hold all of them. */
#include "worker.h"
#include "kvr_flags.h"
#include "kvr_model_card.h"

worker W;

/* ------------------------------------------------------------------ flags */

/* Parses argv into o (common/kvr_flags, like the other binaries). Returns 0, KVR_FLAGS_HELP
 * (usage printed) or KVR_EINVAL with err filled. */
/* --lora NAME is repeatable, which kvr_flags is not: it is taken out of argv first (also
 * --lora=NAME). Returns the new argc. */
static int take_loras(opts *o, int argc, char **argv, kvr_err *err)
{
    int out = 1;
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        if (strcmp(argv[i], "--lora") == 0 || strcmp(argv[i], "-lora") == 0) {
            if (i + 1 >= argc)
                return kvr_err_set(err, KVR_EINVAL, "--lora needs a name");
            v = argv[++i];
        } else if (strncmp(argv[i], "--lora=", 7) == 0) {
            v = argv[i] + 7;
        } else {
            argv[out++] = argv[i];
            continue;
        }
        if (o->n_loras >= KVR_ENGINE_MAX_LORAS)
            return kvr_err_set(err, KVR_EINVAL, "at most %u --lora", KVR_ENGINE_MAX_LORAS);
        size_t len = strlen(v);
        if (len == 0 || len > KVR_LORA_NAME_MAX || strpbrk(v, "\"\\\t\r\n"))
            return kvr_err_set(err, KVR_EINVAL,
                               "--lora names are 1..%d bytes without quotes, backslashes or "
                               "control characters",
                               KVR_LORA_NAME_MAX);
        for (uint32_t j = 0; j < o->n_loras; j++)
            if (strcmp(o->loras[j], v) == 0)
                return kvr_err_set(err, KVR_EINVAL, "--lora %s given twice", v);
        o->loras[o->n_loras++] = v;
    }
    argv[out] = NULL;
    return out;
}

static int parse_flags(opts *o, int argc, char **argv, kvr_err *err)
{
    *o = (opts){.listen = "127.0.0.1:9001",
                .nats = "nats://127.0.0.1:4222",
                .ns = "default",
                .model = "sim",
                .role = "both",
                .event_format = "array",
                .hash_format = "int",
                .log_level = "info",
                .kv_events = "nats",
                .zmq_endpoint = "tcp://127.0.0.1:5557",
                .zmq_topic = "",
                .zmq_replay_layout = "new",
                .zmq_buffer_steps = 10000,
                .id = 1,
                .seed = 0,
                .event_buffer_max = 10000,
                .resync_after_ms = 2500,
                .announce_delay_ms = 1500,
                .stream_interval = 1,
                .block_size = 64,
                .capacity_blocks = 16384,
                .max_num_seqs = 256,
                .max_batched_tokens = 8192,
                .max_model_len = 131072,
                .speedup = 1.0};
    wk_dg_opts_default(&o->dg);
    if ((argc = take_loras(o, argc, argv, err)) < 0)
        return argc;
    kvr_flag fl[] = {
        {"listen", KVR_FLAG_STRING, &o->listen, "HTTP address (HOST:PORT)", false},
        {"nats", KVR_FLAG_STRING, &o->nats, "NATS URL(s) (--kv-events nats)", false},
        {"namespace", KVR_FLAG_STRING, &o->ns, "kvroute namespace", false},
        {"model", KVR_FLAG_STRING, &o->model, "model name served", false},
        {"id", KVR_FLAG_U64, &o->id, "worker id", false},
        {"role", KVR_FLAG_STRING, &o->role, "both|prefill|decode", false},
        {"kv-events", KVR_FLAG_STRING, &o->kv_events,
         "nats (kvroute's own path) or zmq (vLLM's ZMQ publisher, for kvr-bridge)", false},
        {"zmq-endpoint", KVR_FLAG_STRING, &o->zmq_endpoint, "PUB endpoint to bind (zmq)", false},
        {"zmq-replay-endpoint", KVR_FLAG_STRING, &o->zmq_replay,
         "ROUTER replay endpoint to bind (zmq; none by default)", false},
        {"zmq-topic", KVR_FLAG_STRING, &o->zmq_topic, "topic frame (zmq)", false},
        {"zmq-replay-layout", KVR_FLAG_STRING, &o->zmq_replay_layout,
         "new ([\"\", topic, seq, payload], vLLM #45177) or old ([\"\", seq, payload])", false},
        {"zmq-buffer-steps", KVR_FLAG_U64, &o->zmq_buffer_steps, "batches kept for replay", false},
        {"event-format", KVR_FLAG_STRING, &o->event_format, "array|map (event encoding)", false},
        {"hash-format", KVR_FLAG_STRING, &o->hash_format, "int|bytes (block hash encoding)", false},
        {"block-size", KVR_FLAG_U64, &o->block_size, "tokens per KV block", false},
        {"capacity-blocks", KVR_FLAG_U64, &o->capacity_blocks, "KV cache size in blocks", false},
        {"max-num-seqs", KVR_FLAG_U64, &o->max_num_seqs, "running sequences at most", false},
        {"max-batched-tokens", KVR_FLAG_U64, &o->max_batched_tokens, "tokens per step at most",
         false},
        {"max-model-len", KVR_FLAG_U64, &o->max_model_len, "prompt + output tokens at most", false},
        {"speedup", KVR_FLAG_DOUBLE, &o->speedup, "simulated time runs this much faster", false},
        {"seed", KVR_FLAG_U64, &o->seed, "output token seed", false},
        {"event-buffer-max", KVR_FLAG_U64, &o->event_buffer_max,
         "event payloads held while NATS is away", false},
        {"resync-after-ms", KVR_FLAG_U64, &o->resync_after_ms,
         "an outage longer than this resyncs instead of flushing", false},
        {"announce-delay-ms", KVR_FLAG_U64, &o->announce_delay_ms,
         "heartbeat to first event after a (re)connect", false},
        {"stream-interval", KVR_FLAG_U64, &o->stream_interval, "tokens per SSE chunk at least",
         false},
        {"advertise-url", KVR_FLAG_STRING, &o->advertise, "URL in heartbeats", false},
        {"tokenizer", KVR_FLAG_STRING, &o->tokenizer,
         "Hugging Face model directory (tokenizer.json, tokenizer_config.json): prompts and "
         "chats tokenized as the model does, output decoded to its text; byte (default): the "
         "byte tokenizer and ChatML",
         false},
        {"mdc-sum", KVR_FLAG_STRING, &o->mdc_sum_flag,
         "model card checksum in heartbeats (default: from --model-dir, else from a --tokenizer "
         "directory, else none)",
         false},
        {"model-dir", KVR_FLAG_STRING, &o->model_dir,
         "directory of tokenizer.json (+ tokenizer_config.json, chat_template.jinja): the "
         "heartbeat's mdc_sum is their checksum, as kvr-bridge --model-dir computes it",
         false},
        {"log-level", KVR_FLAG_STRING, &o->log_level, "debug|info|warn|error", false},
        KVR_NATS_FLAG_ENTRIES(&o->nats_sec),
        WK_DG_FLAG_ENTRIES(&o->dg),
    };
    size_t nfl = sizeof fl / sizeof fl[0];
    int rv = kvr_flags_parse(fl, nfl, argc - 1, argv + 1, NULL, 0, NULL, err);
    if (rv == KVR_FLAGS_HELP) {
        kvr_flags_usage(stdout, "kvr-worker", fl, nfl);
        printf("  --lora NAME  a LoRA adapter served (repeatable, at most %u): requests whose "
               "model is NAME run under it, their blocks hashed apart\n",
               KVR_ENGINE_MAX_LORAS);
    }
    if (rv != 0)
        return rv;
    if (strcmp(o->role, "both") && strcmp(o->role, "prefill") && strcmp(o->role, "decode"))
        return kvr_err_set(err, KVR_EINVAL, "--role must be both, prefill or decode");
    if ((rv = wk_dg_opts_check(&o->dg, o->role, err)) != 0)
        return rv;
    if (strcmp(o->event_format, "array") && strcmp(o->event_format, "map"))
        return kvr_err_set(err, KVR_EINVAL, "--event-format must be array or map");
    if (strcmp(o->hash_format, "int") && strcmp(o->hash_format, "bytes"))
        return kvr_err_set(err, KVR_EINVAL, "--hash-format must be int or bytes");
    if (strcmp(o->kv_events, "nats") && strcmp(o->kv_events, "zmq"))
        return kvr_err_set(err, KVR_EINVAL, "--kv-events must be nats or zmq");
    if (strcmp(o->zmq_replay_layout, "new") && strcmp(o->zmq_replay_layout, "old"))
        return kvr_err_set(err, KVR_EINVAL, "--zmq-replay-layout must be new or old");
    if (o->zmq_buffer_steps < 1 || o->zmq_buffer_steps > 1000000)
        return kvr_err_set(err, KVR_EINVAL, "--zmq-buffer-steps must be in 1..1000000");
    if (strlen(o->zmq_topic) > 255 || strlen(o->zmq_endpoint) > 255 ||
        (o->zmq_replay && strlen(o->zmq_replay) > 255))
        return kvr_err_set(err, KVR_EINVAL, "--zmq-* values are limited to 255 bytes");
    if (o->stream_interval < 1 || o->stream_interval > 1000000)
        return kvr_err_set(err, KVR_EINVAL, "--stream-interval must be in 1..1000000 tokens");
    if (o->event_buffer_max < 1 || o->event_buffer_max > 10000000)
        return kvr_err_set(err, KVR_EINVAL, "--event-buffer-max must be in 1..10000000");
    if (!(o->speedup > 0))
        return kvr_err_set(err, KVR_EINVAL, "--speedup must be > 0");
    uint64_t lim32[] = {o->block_size, o->capacity_blocks, o->max_num_seqs, o->max_batched_tokens,
                        o->max_model_len};
    for (size_t i = 0; i < 5; i++)
        if (lim32[i] == 0 || lim32[i] > UINT32_MAX)
            return kvr_err_set(err, KVR_EINVAL, "sizes must be in 1..2^32-1");
    if (strlen(o->ns) == 0 || strlen(o->ns) > 100 || strpbrk(o->ns, ". *>\t\r\n"))
        return kvr_err_set(err, KVR_EINVAL,
                           "--namespace must be 1..100 chars without . * > or spaces");
    if (strlen(o->model) > 100)
        return kvr_err_set(err, KVR_EINVAL, "--model is longer than 100 chars");
    for (uint32_t i = 0; i < o->n_loras; i++)
        if (strcmp(o->loras[i], o->model) == 0)
            return kvr_err_set(err, KVR_EINVAL, "--lora %s is the base model's name", o->model);
    if (o->mdc_sum_flag) {
        if (strlen(o->mdc_sum_flag) >= sizeof o->mdc_sum)
            return kvr_err_set(err, KVR_EINVAL, "--mdc-sum is longer than %zu chars",
                               sizeof o->mdc_sum - 1);
        snprintf(o->mdc_sum, sizeof o->mdc_sum, "%s", o->mdc_sum_flag);
    } else if (o->model_dir) {
        int rc = kvr_model_card_sum(o->model_dir, o->mdc_sum, sizeof o->mdc_sum, err);
        if (rc)
            return rc;
    } else if (o->tokenizer && strcmp(o->tokenizer, "byte") != 0) {
        /* a worker that tokenizes with a model's files announces their checksum; a directory
         * it cannot read is refused with the tokenizer loader's own message, later */
        kvr_err ignored = {0};
        if (kvr_model_card_sum(o->tokenizer, o->mdc_sum, sizeof o->mdc_sum, &ignored) != 0)
            o->mdc_sum[0] = '\0';
    }
    return kvr_nats_flags_load(&o->nats_sec, err);
}

/* ------------------------------------------------------------------ metrics */

static void collect(kvr_metrics *m, void *arg)
{
    worker *w = arg;
    kvr_engine_stats s;
    kvr_engine_get_stats(w->eng, &s);
    kvr_metric_counter_set(w->m_prompt, 0, s.prompt_tokens_total);
    kvr_metric_counter_set(w->m_cached, 0, s.cached_tokens_total);
    kvr_metric_counter_set(w->m_gen, 0, s.generated_tokens_total);
    kvr_metric_counter_set(w->m_steps, 0, s.steps);
    kvr_metric_counter_set(w->m_prefill_tok, 0, s.prefill_tokens_total);
    kvr_metric_counter_set(w->m_step_kind, 0, s.decode_steps - s.mixed_steps);
    kvr_metric_counter_set(w->m_step_kind, 1, s.mixed_steps);
    kvr_metric_counter_set(w->m_step_kind, 2, s.steps - s.decode_steps);
    kvr_metric_counter_set(w->m_preempt, 0, s.preemptions);
    kvr_metric_counter_set(w->m_requests, 0, s.requests_total);
    kvr_metric_counter_set(w->m_finished, 0, s.finished_total);
    kvr_metric_counter_set(w->m_cancelled, 0, s.cancelled_total);
    kvr_metric_counter_set(w->m_stored, 0, s.stored_blocks_total);
    kvr_metric_counter_set(w->m_removed, 0, s.removed_blocks_total);
    kvr_metric_set(w->m_running, 0, s.running);
    kvr_metric_set(w->m_waiting, 0, s.waiting + wk_dg_waiting(w));
    kvr_metric_set(w->m_used, 0, s.used_blocks);
    kvr_metric_set(w->m_cached_blocks, 0, s.cached_blocks);
    kvr_metric_set(w->m_capacity, 0, s.capacity_blocks);
    /* lag now: if busy and behind, the distance between the wall and the engine clocks */
    int64_t lag = 0;
    if (kvr_engine_has_work(w->eng)) {
        lag = wk_wall_ns(w) - kvr_engine_now_ns(w->eng);
        if (lag < 0)
            lag = 0;
    }
    kvr_metric_set(w->m_lag, 0, (double)lag / 1e9);
    kvr_metric_set(w->m_lag_max, 0, (double)w->lag_max_ns / 1e9);
    kvr_metric_set(w->m_lag_erased, 0, (double)w->lag_erased_ns / 1e9);
    kvr_metric_set(w->m_busy, 0, (double)kvr_engine_now_ns(w->eng) / 1e9);
    kvr_metric_set(w->m_busy, 1, (double)wk_wall_ns(w) / 1e9);
}

static int setup_metrics(worker *w)
{
    kvr_metrics *m = w->metrics = kvr_metrics_new();
    if (!m)
        return KVR_ENOMEM;
    static const char *const clocks[] = {"sim", "wall", NULL};
    w->m_prompt = kvr_metrics_counter(m, "kvr_worker_prompt_tokens_total",
                                      "Prompt tokens of admitted requests", NULL, NULL);
    w->m_cached = kvr_metrics_counter(m, "kvr_worker_cached_tokens_total",
                                      "Prompt tokens served from the prefix cache", NULL, NULL);
    w->m_gen =
        kvr_metrics_counter(m, "kvr_worker_generated_tokens_total", "Generated tokens", NULL, NULL);
    w->m_running = kvr_metrics_gauge(m, "kvr_worker_running_seqs", "Running sequences", NULL, NULL);
    w->m_waiting = kvr_metrics_gauge(m, "kvr_worker_waiting_seqs", "Waiting sequences", NULL, NULL);
    w->m_used = kvr_metrics_gauge(m, "kvr_worker_kv_blocks_used",
                                  "KV blocks referenced by sequences", NULL, NULL);
    w->m_cached_blocks = kvr_metrics_gauge(m, "kvr_worker_kv_blocks_cached",
                                           "Full (hashed) KV blocks in the cache", NULL, NULL);
    w->m_capacity = kvr_metrics_gauge(m, "kvr_worker_kv_blocks_capacity",
                                      "KV cache capacity in blocks", NULL, NULL);
    w->m_steps = kvr_metrics_counter(m, "kvr_worker_steps_total", "Engine steps", NULL, NULL);
    w->m_prefill_tok =
        kvr_metrics_counter(m, "kvr_worker_prefill_tokens_total",
                            "Prompt tokens computed (not cached, not pulled)", NULL, NULL);
    static const char *const kinds[] = {"decode", "mixed", "prefill", NULL};
    w->m_step_kind = kvr_metrics_counter(
        m, "kvr_worker_steps_by_kind_total",
        "Engine steps: decode only, mixed (decode beside a prefill chunk: every decoder waits "
        "for the chunk), prefill only",
        "kind", kinds);
    w->m_preempt = kvr_metrics_counter(m, "kvr_worker_preemptions_total",
                                       "Sequences preempted for lack of KV blocks", NULL, NULL);
    w->m_requests = kvr_metrics_counter(m, "kvr_worker_requests_total",
                                        "Requests accepted by the engine", NULL, NULL);
    w->m_finished = kvr_metrics_counter(m, "kvr_worker_requests_finished_total",
                                        "Requests finished", NULL, NULL);
    w->m_cancelled = kvr_metrics_counter(m, "kvr_worker_requests_cancelled_total",
                                         "Requests cancelled (client gone)", NULL, NULL);
    w->m_stored = kvr_metrics_counter(m, "kvr_worker_kv_blocks_stored_total",
                                      "Blocks stored (BlockStored)", NULL, NULL);
    w->m_removed = kvr_metrics_counter(m, "kvr_worker_kv_blocks_removed_total",
                                       "Blocks evicted (BlockRemoved)", NULL, NULL);
    w->m_lag =
        kvr_metrics_gauge(m, "kvr_worker_sim_lag_seconds",
                          "How far the simulated clock is behind the wall clock now", NULL, NULL);
    w->m_lag_max = kvr_metrics_gauge(m, "kvr_worker_sim_lag_max_seconds",
                                     "Largest lag seen at the start of a step", NULL, NULL);
    w->m_lag_erased = kvr_metrics_gauge(
        m, "kvr_worker_sim_lag_erased_seconds",
        "Lag forgiven when the engine went idle (its last step had started late), total", NULL,
        NULL);
    w->m_busy =
        kvr_metrics_gauge(m, "kvr_worker_clock_seconds",
                          "The engine's simulated clock and the wall clock, since start (sim falls "
                          "behind wall only when steps cost more CPU than the time they stand for)",
                          "clock", clocks);
    w->m_ev_pub =
        kvr_metrics_counter(m, "kvr_worker_kv_events_total", "KV events encoded", NULL, NULL);
    w->m_ev_batches = kvr_metrics_counter(m, "kvr_worker_kv_event_batches_published_total",
                                          "KV event payloads published", NULL, NULL);
    w->m_ev_dropped = kvr_metrics_counter(
        m, "kvr_worker_kv_event_batches_dropped_total",
        "KV event payloads dropped (buffer overflow while NATS was away)", NULL, NULL);
    w->m_resyncs = kvr_metrics_counter(m, "kvr_worker_kv_resyncs_total",
                                       "AllBlocksCleared + full cache republished", NULL, NULL);
    w->m_evbuf =
        kvr_metrics_gauge(m, "kvr_worker_kv_event_batches_buffered",
                          "KV event payloads not yet acknowledged by the stream", NULL, NULL);
    w->m_ev_retries = kvr_metrics_counter(
        m, "kvr_worker_kv_event_publish_retries_total",
        "KV event publishes not acknowledged (timeout, no stream, JetStream error), sent again",
        NULL, NULL);
    w->m_ev_reorders = kvr_metrics_counter(
        m, "kvr_worker_kv_event_reorders_total",
        "Resyncs because our KV events reached the stream out of order", NULL, NULL);
    w->m_bad_req = kvr_metrics_counter(m, "kvr_worker_bad_requests_total",
                                       "Requests rejected as malformed", NULL, NULL);
    w->m_hb =
        kvr_metrics_counter(m, "kvr_worker_heartbeats_total", "Heartbeats published", NULL, NULL);
    kvr_metrics_on_collect(m, collect, w);
    kvr_metrics_add_http_server(m, "kvr_worker_http", &w->http);
    return 0;
}

/* vLLM's names (vllm/v1/metrics/loggers.py), labelled model_name and engine (the DP rank) as
 * vLLM labels them, so kvr-bridge reads this worker as it reads a vLLM engine: load, KV usage
 * (0..1: blocks referenced by sequences; cached blocks at refcount 0 count as free, as in
 * vLLM's block pool), block size and capacity from cache_config_info's labels, and the prefix
 * cache counters. process_start_time_seconds tells one process from the next (the bridge's
 * started_ms). Appended after kvroute's own families. */
static void append_vllm_metrics(worker *w, kvr_buf *b)
{
    kvr_engine_stats s;
    kvr_engine_get_stats(w->eng, &s);
    char l[160];
    snprintf(l, sizeof l, "model_name=\"%s\",engine=\"0\"", w->o.model);
    double usage = s.capacity_blocks ? (double)s.used_blocks / s.capacity_blocks : 0;
    kvr_buf_appendf(
        b,
        "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n"
        "# TYPE process_start_time_seconds gauge\n"
        "process_start_time_seconds %.3f\n"
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        "vllm:num_requests_running{%s} %u.0\n"
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        "vllm:num_requests_waiting{%s} %u.0\n"
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        "vllm:kv_cache_usage_perc{%s} %.6f\n"
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of "
        "queried tokens.\n"
        "# TYPE vllm:prefix_cache_queries_total counter\n"
        "vllm:prefix_cache_queries_total{%s} %" PRIu64 ".0\n"
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached "
        "tokens.\n"
        "# TYPE vllm:prefix_cache_hits_total counter\n"
        "vllm:prefix_cache_hits_total{%s} %" PRIu64 ".0\n"
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
        "# TYPE vllm:cache_config_info gauge\n"
        "vllm:cache_config_info{block_size=\"%" PRIu64 "\",cache_dtype=\"auto\",engine=\"0\","
        "enable_prefix_caching=\"True\",num_gpu_blocks=\"%" PRIu64 "\"} 1.0\n",
        (double)w->started_ms / 1000.0, l, s.running, l, s.waiting + wk_dg_waiting(w), l, usage, l,
        (uint64_t)s.prompt_tokens_total, l, (uint64_t)s.cached_tokens_total, w->o.block_size,
        w->o.capacity_blocks);
    if (w->o.n_loras == 0)
        return;
    /* vLLM lists the adapters of running and waiting requests; this stand-in lists every
     * --lora as running (all are always loaded), under the start time as vLLM's value */
    kvr_buf_appendf(b,
                    "# HELP vllm:lora_requests_info Running stats on lora requests.\n"
                    "# TYPE vllm:lora_requests_info gauge\n"
                    "vllm:lora_requests_info{max_lora=\"%u\",running_lora_adapters=\"",
                    w->o.n_loras);
    for (uint32_t i = 0; i < w->o.n_loras; i++)
        kvr_buf_appendf(b, "%s%s", i ? "," : "", w->o.loras[i]);
    kvr_buf_appendf(b, "\",waiting_lora_adapters=\"\"} %.3f\n", (double)w->started_ms / 1000.0);
}

void wk_metrics_respond(worker *w, kvr_http_req *req)
{
    kvr_buf b;
    kvr_buf_init(&b);
    if (kvr_metrics_render(w->metrics, &b) == 0)
        append_vllm_metrics(w, &b);
    if (!b.base)
        wk_respond_error(req, 500, "server_error", "out of memory");
    else
        kvr_http_respond(req, 200, "text/plain; version=0.0.4", b.base, b.len);
    kvr_buf_free(&b);
}

/* ------------------------------------------------------------------ shutdown */

static void on_closed_handle(uv_handle_t *h)
{
    (void)h;
}

static void on_nats_closed(kvr_nats *kn)
{
    (void)kn;
    W.nats_ok = false;
}

static void on_http_closed(kvr_http_server *s)
{
    (void)s;
}

static void shutdown_all(worker *w)
{
    if (w->closing)
        return;
    /* whatever is still running is cancelled: clients see their streams end */
    for (size_t i = 0; i < w->n_future; i++) {
        wreq *r = w->future[i];
        r->in_future = false;
        r->n_ready_toks = r->toks.len / sizeof(uint32_t);
        r->done_ready = r->done_future;
        wk_mark_ready(w, r);
    }
    w->n_future = 0;
    wk_flush_ready(w);
    w->closing = true; /* pending requests get 503 */
    wk_admit_pending(w, 0);
    w->closing = false;
    /* drain timeout or second signal: cut what is left */
    while (w->live) {
        wreq *r = w->live;
        if (r->seq)
            kvr_engine_cancel(w->eng, r->seq);
        r->seq = NULL;
        if (r->http) {
            r->http->data = NULL;
            if (r->started)
                kvr_http_stream_end(r->http);
            else
                wk_respond_error(r->http, 503, "unavailable", "worker is shutting down");
            r->http = NULL;
        }
        wk_wreq_free(r);
    }
    w->n_ready = 0;
    w->closing = true;
    wk_publish_engine_events(w);
    uv_timer_stop(&w->drive_timer);
    uv_timer_stop(&w->hb_timer);
    uv_timer_stop(&w->drain_timer);
    uv_timer_stop(&w->flush_timer);
    uv_close((uv_handle_t *)&w->flush_timer, on_closed_handle);
    uv_timer_stop(&w->retry_timer);
    uv_close((uv_handle_t *)&w->retry_timer, on_closed_handle);
    uv_close((uv_handle_t *)&w->drive_timer, on_closed_handle);
    uv_close((uv_handle_t *)&w->hb_timer, on_closed_handle);
    uv_close((uv_handle_t *)&w->drain_timer, on_closed_handle);
    uv_close((uv_handle_t *)&w->sigterm, on_closed_handle);
    uv_close((uv_handle_t *)&w->sigint, on_closed_handle);
    kvr_http_server_close(&w->http, on_http_closed);
    if (w->nats_ok)
        kvr_nats_close(&w->nats, on_nats_closed);
    wk_zmq_close(w->zmq);
    wk_dg_close(w);
}

static uint64_t drain_started;

static void drain_tick(uv_timer_t *t)
{
    worker *w = t->data;
    if (w->live_reqs == 0 && w->n_pend == 0) {
        KVR_LOG_INFO("drained, exiting", "live=%zu", w->live_reqs);
        shutdown_all(w);
        return;
    }
    if (uv_now(w->loop) - drain_started >= DRAIN_TIMEOUT_MS) {
        KVR_LOG_WARN("drain timeout: cancelling the rest", "live=%zu", w->live_reqs);
        shutdown_all(w);
    }
}

static void on_signal(uv_signal_t *s, int signum)
{
    worker *w = s->data;
    if (w->draining) {
        KVR_LOG_WARN("second signal: exiting now", "signal=%d", signum);
        shutdown_all(w);
        return;
    }
    w->draining = true;
    drain_started = uv_now(w->loop);
    KVR_LOG_INFO("draining", "signal=%d live=%zu", signum, w->live_reqs);
    uv_timer_start(&w->drain_timer, drain_tick, 0, 50);
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv)
{
    worker *w = &W;
    kvr_err err = {0};
    int rc = parse_flags(&w->o, argc, argv, &err);
    if (rc == KVR_FLAGS_HELP)
        return 0;
    if (rc < 0) {
        fprintf(stderr, "kvr-worker: %s (--help lists the flags)\n", err.msg);
        return 2;
    }
    kvr_log_level lvl;
    if (kvr_log_parse_level(w->o.log_level, &lvl) != 0) {
        fprintf(stderr, "kvr-worker: bad --log-level '%s'\n", w->o.log_level);
        return 2;
    }
    static char idbuf[32];
    snprintf(idbuf, sizeof idbuf, "%" PRIu64, w->o.id);
    kvr_log_setup("worker", idbuf, lvl);
    signal(SIGPIPE, SIG_IGN);

    if (w->o.tokenizer && strcmp(w->o.tokenizer, "byte") != 0) {
        /* the model's chat template is needed too: a worker standing in for a model that
         * tokenized chats as ChatML would send the router hashes no engine computes */
        if ((rc = kvr_tok_open_dir(w->o.tokenizer, &w->tok_hf, &err)) != 0 ||
            (rc = kvr_chat_tmpl_load_dir(w->o.tokenizer, &w->tmpl, &err)) != 0) {
            fprintf(stderr, "kvr-worker: --tokenizer %s: %s\n", w->o.tokenizer, err.msg);
            return 2;
        }
        w->hf = kvr_tok_hf(w->tok_hf);
        KVR_LOG_INFO("tokenizer", "dir=%s vocab=%zu", w->o.tokenizer, kvr_hftok_vocab_size(w->hf));
    }

    kvr_engine_config ec;
    kvr_engine_config_default(&ec);
    ec.block_size = (uint32_t)w->o.block_size;
    ec.capacity_blocks = (uint32_t)w->o.capacity_blocks;
    ec.max_num_seqs = (uint32_t)w->o.max_num_seqs;
    ec.max_batched_tokens = (uint32_t)w->o.max_batched_tokens;
    ec.max_model_len = (uint32_t)w->o.max_model_len;
    ec.speedup = w->o.speedup;
    ec.seed = w->o.seed;
    ec.loras = w->o.loras;
    ec.n_loras = w->o.n_loras;
    if ((rc = kvr_engine_new(&ec, &w->eng, &err)) != 0) {
        fprintf(stderr, "kvr-worker: engine: %s\n", err.msg);
        return 2;
    }
    w->efmt = strcmp(w->o.event_format, "map") == 0 ? KVR_KV_FORMAT_MAP : KVR_KV_FORMAT_ARRAY;
    w->hfmt = strcmp(w->o.hash_format, "bytes") == 0 ? KVR_KV_HASH_BYTES : KVR_KV_HASH_INT;
    snprintf(w->subj_kv, sizeof w->subj_kv, "kvr.kv.%s.%" PRIu64, w->o.ns, w->o.id);
    snprintf(w->subj_hb, sizeof w->subj_hb, "kvr.workers.%s.%" PRIu64, w->o.ns, w->o.id);
    kvr_buf_init(&w->scratch);

    w->loop = uv_default_loop();
    w->t0 = uv_hrtime();
    w->started_ms = kvr_now_ms();

    kvr_http_config hc = {
        .on_request = wk_on_request, .max_body_bytes = 64u << 20, .max_connections = 20000};
    if (kvr_http_server_init(&w->http, w->loop, &hc) != 0) {
        fprintf(stderr, "kvr-worker: http init failed\n");
        return 2;
    }
    w->http.data = w;
    if (setup_metrics(w) != 0) {
        fprintf(stderr, "kvr-worker: out of memory\n");
        return 2;
    }
    if (wk_dg_start(w, &err) != 0) {
        fprintf(stderr, "kvr-worker: %s\n", err.msg);
        return 2;
    }
    if (kvr_http_listen(&w->http, w->o.listen, &err) != 0) {
        fprintf(stderr, "kvr-worker: listen %s: %s\n", w->o.listen, err.msg);
        return 2;
    }
    if (w->o.advertise) {
        snprintf(w->url, sizeof w->url, "%s", w->o.advertise);
    } else {
        const char *colon = strrchr(w->o.listen, ':');
        size_t hl = colon ? (size_t)(colon - w->o.listen) : 0;
        char host[128] = "127.0.0.1";
        if (hl > 0 && hl < sizeof host && strncmp(w->o.listen, "0.0.0.0", hl) != 0) {
            memcpy(host, w->o.listen, hl);
            host[hl] = 0;
        }
        snprintf(w->url, sizeof w->url, "http://%s:%d", host, kvr_http_server_port(&w->http));
    }

    bool zmq = strcmp(w->o.kv_events, "zmq") == 0;
    if (zmq) {
        wk_zmq_config zc = {.endpoint = w->o.zmq_endpoint,
                            .replay_endpoint = w->o.zmq_replay,
                            .topic = w->o.zmq_topic,
                            .replay_old_layout = strcmp(w->o.zmq_replay_layout, "old") == 0,
                            .buffer_steps = w->o.zmq_buffer_steps,
                            .map_events = w->efmt == KVR_KV_FORMAT_MAP,
                            .bytes_hashes = w->hfmt == KVR_KV_HASH_BYTES};
        if (wk_zmq_open(w->loop, &zc, &w->zmq, &err) != 0) {
            fprintf(stderr, "kvr-worker: zmq: %s\n", err.msg);
            return 2;
        }
    } else {
        kvr_nats_opts no = {
            .url = w->o.nats, .name = "kvr-worker", .on_state = wk_on_nats_state, .state_data = w};
        kvr_nats_flags_fill(&w->o.nats_sec, &no);
        char inbox[KVR_NATS_INBOX_PREFIX_MAX + 1];
        no.inbox_prefix = kvr_nats_role_inbox(inbox, sizeof inbox, "worker", w->o.ns, w->o.id);
        if (kvr_nats_init(&w->nats, w->loop, &no, &err) != 0) {
            fprintf(stderr, "kvr-worker: nats: %s\n", err.msg);
            return 2;
        }
        w->nats_ok = true;
    }

    uv_timer_init(w->loop, &w->drive_timer);
    w->drive_timer.data = w;
    uv_timer_init(w->loop, &w->hb_timer);
    w->hb_timer.data = w;
    uv_timer_init(w->loop, &w->drain_timer);
    w->drain_timer.data = w;
    uv_timer_init(w->loop, &w->flush_timer);
    w->flush_timer.data = w;
    uv_timer_init(w->loop, &w->retry_timer);
    w->retry_timer.data = w;
    /* The first thing the routers see from this incarnation: forget what an earlier one had. */
    if (!zmq) {
        kvr_engine_queue_resync(w->eng);
        wk_publish_engine_events(w);
        uv_timer_start(&w->hb_timer, wk_heartbeat, 0, 1000);
    } /* else as vLLM: seq 0 is the first real batch; kvr-bridge heartbeats from /metrics */
    uv_signal_init(w->loop, &w->sigterm);
    w->sigterm.data = w;
    uv_signal_start(&w->sigterm, on_signal, SIGTERM);
    uv_signal_init(w->loop, &w->sigint);
    w->sigint.data = w;
    uv_signal_start(&w->sigint, on_signal, SIGINT);

    char nats_red[512];
    KVR_LOG_INFO("listening",
                 "addr=%s url=%s kv_events=%s nats=%s ns=%s model=%s block_size=%" PRIu64
                 " capacity_blocks=%" PRIu64 " speedup=%g started_ms=%" PRId64,
                 w->o.listen, w->url, zmq ? w->o.zmq_endpoint : "nats",
                 kvr_nats_redact_url(w->o.nats, nats_red, sizeof nats_red), w->o.ns, w->o.model,
                 w->o.block_size, w->o.capacity_blocks, w->o.speedup, w->started_ms);
    uv_run(w->loop, UV_RUN_DEFAULT);
    kvr_nats_global_shutdown(2000);
    wk_ev_buffer_drop(w);
    kvr_metrics_free(w->metrics);
    free(w->ob);
    free(w->ready);
    free(w->future);
    kvr_buf_free(&w->scratch);
    kvr_engine_free(w->eng);
    kvr_chat_tmpl_free(w->tmpl);
    kvr_tok_destroy(w->tok_hf);
    uv_loop_close(w->loop);
    return 0;
}
