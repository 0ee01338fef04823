/* worker/disagg_priv.h: what kvr-worker's disaggregation files share besides disagg.h and
 * worker.h (nothing outside worker/ includes it). Loop thread only, as everything in disagg.h.
 *   disagg.c       request admission and the two roles' request paths (the prefill answer's
 *                  kv_transfer_params), the metrics, start and close
 *   disagg_hold.c  prefill side: the held blocks and the KV side channel server
 *   disagg_pull.c  decode side: the side channel client, one pull per request */
#ifndef KVR_WORKER_DISAGG_PRIV_H
#define KVR_WORKER_DISAGG_PRIV_H

#include "disagg.h"
#include "kv_xfer.h"
#include "peer_auth.h" /* kvr_auth_key_load: the secret file policy the routers use */
#include "worker.h"

#define DG_MAX_CONNS 64        /* side channel connections at once; more are closed at accept */
#define DG_MAX_HOLDS 65536     /* past it the oldest hold is dropped */
#define DG_BUCKETS 4096        /* hold table: chained, keyed by XXH3 of the request id */
#define DG_REQ_TIMEOUT_MS 5000 /* accept to a whole REQ */
#define DG_STALL_MS 10000      /* a transfer with no byte moving for this long is abandoned */
#define DG_CHUNK_MAX 65536u    /* one write in flight per transfer, at most this many bytes */
#define DG_READ_BUF 65536u

/* Metric label indices; the label names are in disagg.c (wk_dg_start), in this order. */
enum { SND_OK, SND_AUTH, SND_UNKNOWN, SND_BLOCKS, SND_BAD, SND_BUSY, SND_FAILED };
enum {
    PULL_OK,
    PULL_EMPTY,
    PULL_INVALID,
    PULL_REFUSED,
    PULL_FAILED,
    PULL_MISMATCH,
    PULL_CANCELLED
};
enum { HOLD_READ, HOLD_EXPIRED, HOLD_ABORTED, HOLD_DROPPED };

typedef struct dg_hold {
    struct dg_hold *hnext;         /* bucket chain */
    struct dg_hold *fprev, *fnext; /* by deadline (one timeout for all: insertion order) */
    uint64_t key;
    int64_t deadline_ms;
    uint32_t n;
    uint32_t *blocks; /* engine references, dropped by kvr_engine_unhold */
    char rid[KVX_MAX_ID + 1];
} dg_hold;

typedef struct wk_dg wk_dg;

/* server side: one decoder's transfer */
typedef struct dg_conn {
    wk_dg *d;
    struct dg_conn *prev, *next;
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wr;
    int open; /* handles not closed yet */
    bool writing, closing, close_after_write, sending;
    uint8_t ns[KVX_NONCE];
    uint8_t hello[KVX_HELLO_LEN], resp[KVX_RESP_LEN];
    uint8_t *in; /* the REQ, KVX_REQ_HEAD then exactly its length */
    size_t in_len, in_cap, need;
    uint8_t sink[64]; /* reads after the REQ: the decoder sends nothing more */
    dg_hold *hold;    /* owned while sending */
    uint32_t n, bpb;
    uint32_t *ids;
    uint64_t *ext;
    uint64_t total, sent;
    uint64_t t0_ns;
    int64_t last_ms;
    uint8_t *chunk;
} dg_conn;

/* decoder side: one request's pull */
typedef struct dg_pull {
    wk_dg *d;
    struct dg_pull *prev, *next;
    wreq *r; /* NULL once abandoned */
    uv_getaddrinfo_t gai;
    uv_connect_t creq;
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wr;
    int open;
    bool tcp_on, resolving, connecting, done;
    int phase; /* 0 hello, 1 resp, 2 data */
    uint8_t ns[KVX_NONCE], mac_c[KVX_MAC];
    uint8_t hb[KVX_RESP_LEN];
    size_t hgot;
    kvr_buf reqb;
    char host[256], port_s[8];
    char rid[KVX_MAX_ID + 1], eng[KVX_MAX_ID + 1];
    uint32_t *ids; /* asked, n_ask */
    uint64_t *ext; /* expected ext hash of each asked block */
    uint32_t n_ask, first, k;
    uint32_t bpb;
    uint64_t total, got;
    uint8_t bh[KVX_BLOCK_HEAD];
    uint64_t t0_ns;
    int64_t deadline_ms, last_ms;
    uint32_t *prompt;
    uint32_t n_prompt, max_tokens, lora;
    uint8_t rbuf[DG_READ_BUF];
} dg_pull;

/* a request's state (wreq.dg) */
enum { DGR_PREFILL = 1, DGR_DECODE = 2 };
typedef struct wk_dgreq {
    int kind;
    /* prefill leg: prompt kept until the finish holds its blocks; then the answer's params */
    uint32_t *prompt;
    uint32_t n_prompt, lora;
    bool held;
    uint32_t *blocks;
    uint32_t n_blocks;
    char rid[KVX_MAX_ID + 1];
    /* decode: the pull while it runs; then the imported blocks' references */
    dg_pull *pull;
    uint32_t *imp;
    uint32_t n_imp;
} wk_dgreq;

struct wk_dg {
    worker *w;
    const wk_dg_opts *o;
    bool prefill, decode, closing;
    kvr_auth_key key;
    kvx_key kk;
    char engine_id[64];
    char host[128], adv[128];
    int port;
    uv_tcp_t srv;
    bool srv_on;
    uv_timer_t hold_timer;
    bool hold_timer_on;
    dg_hold *buckets[DG_BUCKETS];
    dg_hold *fhead, *ftail;
    size_t n_holds;
    uint64_t held_blocks;
    dg_conn *conns;
    size_t n_conns;
    dg_pull *pulls;
    uint32_t n_pulls; /* in flight: their requests wait, as vLLM's WAITING_FOR_REMOTE_KVS do */
    kvr_metric *m_sends, *m_pulls, *m_bytes, *m_secs, *m_held, *m_holds, *m_hold_n;
};

/* disagg_hold.c */
/* Registers the blocks a finished prefill leg holds (takes blocks[]). */
void dg_hold_add(wk_dg *d, const char *rid, uint32_t *blocks, uint32_t n);
/* Takes h out of the table and the deadline list (the caller frees or keeps it). */
void dg_hold_unlink(wk_dg *d, dg_hold *h);
/* Drops the engine references of an unlinked hold and frees it (why: HOLD_*, counted). */
void dg_hold_release(wk_dg *d, dg_hold *h, int why);
/* Closes a side channel connection (a hold it was sending is released as aborted). */
void dg_conn_close(dg_conn *c);
/* The side channel server's listen callback (d->srv). */
void dg_on_side_conn(uv_stream_t *srv, int status);

/* disagg_pull.c */
/* Ends a pull with result (PULL_*, counted): its request, if still there, is admitted. */
void dg_pull_finish(dg_pull *p, int result);
/* Decode role: do_remote_prefill params -> 0: a pull started (it adds r when it ends); else
 * r is not added yet and recomputes: a PULL_* reason to count, or -1 (already counted). */
int dg_start_pull(wk_dg *d, wreq *r, const cJSON *kvp, const uint32_t *prompt, uint32_t n,
                  uint32_t max_tokens, uint32_t lora);

/* disagg.c */
/* Adds r to the engine (kvr_engine_add_lora). */
int dg_engine_add(worker *w, wreq *r, const uint32_t *prompt, uint32_t n, uint32_t max_tokens,
                  uint32_t lora, kvr_err *err);

#endif
