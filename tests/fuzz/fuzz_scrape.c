/* libFuzzer target: kvr-bridge's reader of an engine's Prometheus /metrics text
 * (bridge/scrape.c), whose output becomes the worker heartbeat (DESIGN section 4). The first
 * byte picks the data-parallel size (1..4) and rank; the rest is the text. Invariants: every
 * string the reader keeps is NUL-terminated inside its field; the adapter names are unique,
 * non-empty, at most KVR_LORA_NAME_MAX bytes, without commas or edge spaces, at most
 * KVR_HB_MAX_LORAS of them; and the heartbeat encoder accepts what the bridge would send. Any
 * violation aborts. */
#include "fuzz_check.h"
#include "kvr_buf.h"
#include "kvr_heartbeat.h"
#include "scrape.h"

#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static kvr_bridge_scrape s; /* ~8 KiB: off the fuzzer's stack */
    static kvr_heartbeat hb;
    if (size == 0)
        return 0;
    int dp = 1 + (data[0] & 3), rank = (data[0] >> 2) % dp;
    kvr_bridge_parse_metrics((const char *)data + 1, size - 1, rank, dp, &s);
    CHECK(memchr(s.model, 0, sizeof s.model) != NULL);
    CHECK(s.n_loras <= KVR_HB_MAX_LORAS);
    CHECK(s.n_loras == 0 || s.has_loras);
    memset(&hb, 0, sizeof hb);
    for (uint32_t i = 0; i < s.n_loras; i++) {
        const char *n = s.loras[i];
        CHECK(memchr(n, 0, KVR_LORA_NAME_MAX + 1) != NULL);
        size_t len = strlen(n);
        CHECK(len > 0 && len <= KVR_LORA_NAME_MAX && !strchr(n, ','));
        CHECK(n[0] != ' ' && n[len - 1] != ' ');
        for (uint32_t j = 0; j < i; j++)
            CHECK(strcmp(n, s.loras[j]) != 0);
        hb.loras[i] = (kvr_slice){n, len};
    }
    hb.n_loras = s.n_loras;
    hb.model = (kvr_slice){s.model, strlen(s.model)};
    kvr_buf b;
    kvr_buf_init(&b);
    CHECK(kvr_heartbeat_encode(&b, &hb) == 0);
    kvr_buf_free(&b);
    return 0;
}
