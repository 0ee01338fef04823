/* bridge/scrape: reads an engine's Prometheus /metrics text into the heartbeat's numbers.
 * Pure function, any thread.
 *
 * Names (see ../shared notes and the engines' sources: vLLM vllm/v1/metrics/loggers.py;
 * SGLang's names as llm-d's metric extractor reads them):
 *   vLLM:   vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc
 *           (0..1), vllm:cache_config_info{block_size="16",num_gpu_blocks="N",...}
 *   SGLang: sglang:num_running_reqs, sglang:num_queue_reqs, sglang:token_usage (0..1),
 *           sglang:cache_config_info{page_size,num_pages}
 * process_start_time_seconds (prometheus_client's process collector, both engines) tells one
 * engine process from the next. Both name the model in the model_name label. vLLM labels each
 * data-parallel engine's series engine="<rank>"; with dp > 1 only the series of `rank` (or with no
 * engine label) count. Lines are bounded (4 KiB); longer ones are skipped.
 *
 * LoRA adapters (vLLM only): vllm:lora_requests_info{max_lora="4",
 * running_lora_adapters="a,b",waiting_lora_adapters="c"} <time set>. prometheus_client keeps
 * every label set ever set, so the series with the largest value (the latest time) is the
 * current one; its running and waiting names (comma-separated, deduplicated; a name over
 * KVR_LORA_NAME_MAX bytes is skipped; at most KVR_HB_MAX_LORAS) are the adapters the heartbeat
 * lists. */
#ifndef KVR_BRIDGE_SCRAPE_H
#define KVR_BRIDGE_SCRAPE_H

#include "kvr_heartbeat.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kvr_bridge_scrape {
    bool has_running, has_waiting, has_usage, has_block_size, has_capacity, has_start;
    double running, waiting, usage;
    double start_s; /* process_start_time_seconds: the engine process's life, for started_ms */
    uint64_t block_size, capacity;
    char model[256];
    bool has_loras;
    double lora_ts; /* value of the vllm:lora_requests_info series the names come from */
    uint32_t n_loras;
    char loras[KVR_HB_MAX_LORAS][KVR_LORA_NAME_MAX + 1];
} kvr_bridge_scrape;

void kvr_bridge_parse_metrics(const char *text, size_t len, int rank, int dp,
                              kvr_bridge_scrape *out);

#endif
