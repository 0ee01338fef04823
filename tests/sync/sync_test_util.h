/* Helpers shared by the sync tests: building commands and workers. */
#ifndef SYNC_TEST_UTIL_H
#define SYNC_TEST_UTIL_H

#include "fsm.h"

#include <stdio.h>
#include <string.h>

static inline void tu_rid(uint8_t rid[16], uint64_t n)
{
    memset(rid, 0, 16);
    memcpy(rid, &n, 8);
    rid[15] = 0xab;
}

static inline kvr_cmd tu_worker_up(uint64_t id, const char *model, const char *ns, char *urlbuf,
                                   size_t urlcap)
{
    snprintf(urlbuf, urlcap, "http://127.0.0.1:%u", (unsigned)(9000 + id));
    kvr_cmd c = {.type = KVR_CMD_WORKER_UP};
    c.u.worker = (kvr_worker_info){.id = id,
                                   .ns = kvr_slice_of(ns),
                                   .model = kvr_slice_of(model),
                                   .url = kvr_slice_of(urlbuf),
                                   .role = KVR_ROLE_BOTH,
                                   .block_size = 64,
                                   .capacity_blocks = 16384};
    return c;
}

static inline kvr_cmd tu_route(uint64_t n, uint64_t frontend, uint64_t now, uint32_t blocks,
                               const kvr_route_candidate *cand, uint32_t ncand)
{
    kvr_cmd c = {.type = KVR_CMD_ROUTE};
    tu_rid(c.u.route.request_id, n);
    c.u.route.frontend_id = frontend;
    c.u.route.now_ms = now;
    c.u.route.request_blocks = blocks;
    c.u.route.model = kvr_slice_of("m");
    c.u.route.ns = kvr_slice_of("ns");
    c.u.route.candidates = cand;
    c.u.route.n_candidates = ncand;
    return c;
}

static inline kvr_cmd tu_req(kvr_cmd_type t, uint64_t n)
{
    kvr_cmd c = {.type = t};
    tu_rid(c.u.request_id, n);
    return c;
}

#endif
