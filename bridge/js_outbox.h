/* js_outbox: ordered, acknowledged, pipelined publishing into one JetStream subject.
 *
 * Each payload is sent as a NATS request on the subject; JetStream answers the reply inbox
 * with a PubAck ({"stream":..,"seq":..}) or {"error":..}. Up to max_inflight requests are
 * outstanding at once (pipelined, in push order on one connection, so the stream stores them
 * in that order); the rest wait in the outbox, bounded by max_bytes. Nothing is retried: a
 * publish that fails (error reply, timeout, no stream) is reported through on_loss, and the
 * owner decides what to do (kvr-bridge publishes AllBlocksCleared: the index may have missed
 * an event). Payloads queued behind a failure are dropped with it, since they would apply on
 * top of a missing event.
 *
 * Not done here: the Nats-Msg-Id header. kvr_nats (common/kvr_nats.h) has no publish or
 * request with headers (HPUB), so a retry could not be deduplicated by JetStream; hence no
 * retries. See bridge/README.md.
 *
 * Threads: loop thread only (the one running kn). Memory: payloads are copied by push. */
#ifndef KVR_BRIDGE_JS_OUTBOX_H
#define KVR_BRIDGE_JS_OUTBOX_H

#include "kvr_buf.h"
#include "kvr_nats.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct js_outbox js_outbox;
/* Loop thread: a publish failed (status: KVR_ETIMEDOUT, KVR_NATS_NO_RESPONDERS, KVR_EIO for
 * an error reply, KVR_ELIMIT when the outbox overflowed, ...). */
typedef void (*js_outbox_loss_cb)(js_outbox *ob, int status, void *data);

typedef struct js_outbox_entry js_outbox_entry;

typedef struct js_outbox_stats {
    uint64_t pushed, acked, failed, dropped; /* dropped: queued payloads discarded on a loss */
    size_t inflight, queued, queued_bytes;
} js_outbox_stats;

struct js_outbox {
    kvr_nats *nats;
    char subject[256];
    size_t max_inflight, max_bytes;
    uint32_t timeout_ms;
    bool paused; /* push queues, nothing is sent (until js_outbox_resume) */
    js_outbox_loss_cb on_loss;
    void *data;
    /* latency of acks, ns, for the bench: a ring of the last lat_cap samples */
    int64_t *lat;
    size_t lat_cap, lat_n;
    /* private */
    js_outbox_entry *head, *tail; /* queue, not yet sent */
    uint64_t epoch;               /* bumped on a loss: replies of older requests are ignored */
    js_outbox_stats st;
};

/* max_inflight 0 → 256, max_bytes 0 → 64 MiB, timeout_ms 0 → 5000. Starts paused. */
int js_outbox_init(js_outbox *ob, kvr_nats *kn, const char *subject, size_t max_inflight,
                   size_t max_bytes, uint32_t timeout_ms, js_outbox_loss_cb on_loss, void *data);
/* Queues a copy of the payload and sends what the window allows. KVR_ELIMIT when it does not
 * fit in max_bytes (then on_loss has NOT been called: the caller handles it). */
int js_outbox_push(js_outbox *ob, const void *data, size_t len);
void js_outbox_resume(js_outbox *ob);
void js_outbox_pause(js_outbox *ob);
/* Drops every queued payload (counted as dropped); in-flight requests still complete. */
void js_outbox_drop_queued(js_outbox *ob);
void js_outbox_get_stats(const js_outbox *ob, js_outbox_stats *out);
/* Keeps the last cap ack latencies (for kvr-bench). */
int js_outbox_track_latency(js_outbox *ob, size_t cap);
/* Frees the queue. In-flight requests complete later into nothing (their callbacks only touch
 * a heap context that they free), so ob may be freed after this. */
void js_outbox_free(js_outbox *ob);

#endif
