/* disagg: kvr-worker's prefill and decode roles, speaking vLLM's NixlConnector proxy protocol
 * (issue 15 item 1; DESIGN 9; checked against vLLM's
 * tests/v1/kv_connector/nixl_integration/toy_proxy_server.py and the NIXL connector's
 * scheduler: update_state_after_alloc, request_finished).
 *
 * --role prefill: a non-streaming request whose kv_transfer_params.do_remote_decode is true
 *   runs as usual (its blocks enter the cache and KV events), then the full blocks of its
 *   prompt are held (referenced, never evicted) and the answer carries, at top level,
 *   kv_transfer_params = {do_remote_prefill: true, do_remote_decode: false, remote_block_ids,
 *   remote_engine_id, remote_request_id, remote_host, remote_port, tp_size}. The hold ends when
 *   a decoder has read the blocks over the side channel, or after --kv-hold-timeout.
 * --role decode: a request whose kv_transfer_params.do_remote_prefill is true and carries
 *   remote_engine_id, remote_request_id, remote_host, remote_port and a non-empty
 *   remote_block_ids (vLLM's validity rule) pulls those blocks from the side channel
 *   (worker/kv_xfer.h), checks each block's ext hash against its own prompt's, makes them
 *   cached (BlockStored events), then runs: its prefill computes only what was not
 *   transferred. A prefix it already caches is not asked for. Invalid params, a refusal, a
 *   broken or stalled connection, a mismatch: the request recomputes its prefill locally and
 *   still completes. Empty remote_block_ids: nothing to pull.
 * --role both (the default): kv_transfer_params are ignored, as before.
 *
 * Threads: everything on the worker's loop thread. Memory: the module owns its holds,
 * connections and pulls; a request's state (wreq.dg) is freed with the request
 * (wk_dg_req_free from wk_wreq_free); a pull whose request goes away is closed and freed in
 * its handles' close callbacks. */
#ifndef KVR_WORKER_DISAGG_H
#define KVR_WORKER_DISAGG_H

#include "kvr_err.h"
#include "kvr_flags.h"

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct wk_dg_opts {
    uint64_t kv_port;         /* side channel TCP port (prefill; 0: the OS picks) */
    const char *kv_host;      /* bind address (default: --listen's host) */
    const char *kv_advertise; /* remote_host in the answers (default: the bind host) */
    const char *kv_secret_file;
    uint64_t kv_bytes_per_block;
    double kv_bandwidth;    /* bytes/s per transfer, wall clock; 0: unpaced */
    double kv_hold_timeout; /* s (vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT) */
    double kv_pull_timeout; /* s, a whole pull (decode) */
} wk_dg_opts;

#define WK_DG_FLAG_ENTRIES(d)                                                                      \
    {"kv-port", KVR_FLAG_U64, &(d)->kv_port,                                                       \
     "KV side channel TCP port (--role prefill; 0: any free port)", false},                        \
        {"kv-host", KVR_FLAG_STRING, &(d)->kv_host,                                                \
         "KV side channel bind address (default: --listen's host)", false},                        \
        {"kv-advertise-host", KVR_FLAG_STRING, &(d)->kv_advertise,                                 \
         "remote_host in kv_transfer_params (default: the bind address)", false},                  \
        {"kv-secret-file", KVR_FLAG_STRING, &(d)->kv_secret_file,                                  \
         "shared secret of the KV side channel, 16..1024 bytes, mode 600 (--role prefill|decode)", \
         false},                                                                                   \
        {"kv-bytes-per-block", KVR_FLAG_U64, &(d)->kv_bytes_per_block,                             \
         "bytes a block weighs on the KV side channel (16..64 MiB)", false},                       \
        {"kv-bandwidth", KVR_FLAG_DOUBLE, &(d)->kv_bandwidth,                                      \
         "bytes/s of one KV transfer, wall clock (0: unpaced)", false},                            \
        {"kv-hold-timeout", KVR_FLAG_DOUBLE, &(d)->kv_hold_timeout,                                \
         "seconds a prefill worker holds blocks no decoder has read", false},                      \
        {"kv-pull-timeout", KVR_FLAG_DOUBLE, &(d)->kv_pull_timeout,                                \
         "seconds a decode worker waits for a whole pull before recomputing", false}

struct worker;
struct wreq;
struct kvr_buf;

void wk_dg_opts_default(wk_dg_opts *o);
/* After flag parsing: bounds, and a secret file is required by the prefill and decode roles. */
int wk_dg_opts_check(const wk_dg_opts *o, const char *role, kvr_err *err);

/* After the loop, engine and metrics exist: loads the secret, binds the side channel
 * (prefill), registers the metrics. */
int wk_dg_start(struct worker *w, kvr_err *err);
/* Shutdown: closes the side channel, its connections and every pull (loop thread). */
void wk_dg_close(struct worker *w);

/* handle_completion's engine admission. Adds r to the engine now, or (decode role, valid
 * params) starts a pull and adds it when the pull ends. prompt is copied. Returns 0, or a
 * KVR_E* code with err set (nothing started; the caller answers the error). */
int wk_dg_admit(struct worker *w, struct wreq *r, const cJSON *root, const uint32_t *prompt,
                uint32_t n_prompt, uint32_t max_tokens, uint32_t lora, kvr_err *err);
/* An engine output of r (r->dg set): a finished prefill leg holds its blocks. */
struct kvr_engine_output;
void wk_dg_on_output(struct worker *w, struct wreq *r, const struct kvr_engine_output *o);
/* Appends ,"kv_transfer_params":{...} to a non-streamed answer (r->dg set). */
void wk_dg_append_params(struct wreq *r, struct kvr_buf *b);
/* Requests waiting for their KV pull (not in the engine yet): counted as waiting in the
 * heartbeat and /metrics, as vLLM counts its WAITING_FOR_REMOTE_KVS requests. */
uint32_t wk_dg_waiting(const struct worker *w);
/* The request is being freed: its pull is abandoned, its import references dropped. */
void wk_dg_req_free(struct wreq *r);

#endif
