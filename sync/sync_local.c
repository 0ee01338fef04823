/* sync_local: degraded (local) mode. Without a quorum for degraded_after_ms a router answers
 * from its own copy of the state machine and logs what it applied; when a leader is back,
 * reconcile re-proposes that log (see sync.h). Loop thread only (sync_int.h). */
#include "sync_int.h"

#include "kvr_log.h"

#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------- */
/* Local (degraded) mode */

static int local_log_add(kvr_sync *s, const char *cmd, size_t len)
{
    if (s->n_log >= LOCAL_LOG_MAX) {
        KVR_LOG_WARN_RL(5, "sync local log full; command will not be reconciled", "max=%u", LOCAL_LOG_MAX);
        return KVR_ELIMIT;
    }
    if (s->n_log == s->cap_log) {
        uint32_t nc = s->cap_log ? s->cap_log * 2 : 256;
        local_rec *nl = realloc(s->log, nc * sizeof *nl);
        if (!nl)
            return KVR_ENOMEM;
        s->log = nl;
        s->cap_log = nc;
    }
    char *c = malloc(len ? len : 1);
    if (!c)
        return KVR_ENOMEM;
    memcpy(c, cmd, len);
    s->log[s->n_log++] = (local_rec){c, len};
    return 0;
}

void sync_apply_local(kvr_sync *s, pending *p)
{
    if (!s->local) {
        s->local = kvr_fsm_clone(s->fsm);
        if (!s->local) {
            p->status = KVR_ENOMEM;
            sync_pending_ready(s, p);
            return;
        }
    }
    kvr_fsm_apply_bytes(s->local, p->cmd, p->cmd_len, &p->res);
    p->have_res = true;
    p->status = 0;
    p->mode = KVR_SYNC_LOCAL;
    if (p->res.outcome != KVR_OUT_INVALID)
        local_log_add(s, p->cmd, p->cmd_len);
    s->m.degraded_answers++;
    sync_pending_ready(s, p);
}

static int rid_cmp(const void *a, const void *b)
{
    return memcmp(a, b, KVR_REQUEST_ID_LEN);
}

/* Re-proposes what local mode did, now that a leader is back (see sync.h). */
void sync_reconcile(kvr_sync *s)
{
    kvr_fsm *lf = s->local;
    uint32_t n = s->n_log;
    local_rec *log = s->log;
    s->local = NULL;
    s->log = NULL;
    s->n_log = s->cap_log = 0;
    KVR_LOG_INFO("sync reconciling local commands", "count=%u", n);
    kvr_route_candidate *cand = malloc(KVR_FSM_MAX_CANDIDATES * sizeof *cand);
    kvr_buf b;
    kvr_buf_init(&b);
    /* Requests routed locally: their net effect is decided from the local replica, so their
     * own FREE/PREFILL_DONE records are folded into the pinned ROUTE below. */
    uint8_t *routed = malloc((size_t)(n ? n : 1) * KVR_REQUEST_ID_LEN);
    uint32_t n_routed = 0;
    for (uint32_t i = 0; cand && routed && i < n; i++) {
        kvr_cmd c;
        if (kvr_cmd_decode(log[i].cmd, log[i].len, &c, cand, NULL) == 0 && c.type == KVR_CMD_ROUTE)
            memcpy(routed + (size_t)n_routed++ * KVR_REQUEST_ID_LEN, c.u.route.request_id,
                   KVR_REQUEST_ID_LEN);
    }
    if (routed)
        qsort(routed, n_routed, KVR_REQUEST_ID_LEN, rid_cmp);
    for (uint32_t i = 0; cand && routed && i < n; i++) {
        kvr_cmd c;
        if (kvr_cmd_decode(log[i].cmd, log[i].len, &c, cand, NULL) != 0)
            continue;
        const uint8_t *rid = kvr_cmd_request_id(&c);
        if (rid && c.type != KVR_CMD_ROUTE &&
            bsearch(rid, routed, n_routed, KVR_REQUEST_ID_LEN, rid_cmp))
            continue;
        b.len = 0;
        if (c.type == KVR_CMD_ROUTE) {
            kvr_fsm_booking_view bv;
            if (kvr_fsm_booking_get(lf, c.u.route.request_id, &bv) != 0) {
                /* finished while local. The same ROUTE may also sit in this node's Raft log
                 * (proposed before the quorum was lost) and commit later: free it there. */
                kvr_cmd fr = {.type = KVR_CMD_FREE};
                memcpy(fr.u.request_id, c.u.route.request_id, KVR_REQUEST_ID_LEN);
                pending *p;
                if (kvr_cmd_encode(&fr, &b, NULL) == 0 && (p = sync_pending_new(s, b.base, b.len))) {
                    p->internal = true;
                    p->reconcile = true;
                    sync_plist_add(s, p);
                    sync_dispatch(s, p);
                    s->m.reconciled++;
                }
                continue;
            }
            kvr_route_candidate pin = {bv.worker_id, bv.overlap};
            c.u.route.pin_worker = bv.worker_id;
            c.u.route.candidates = &pin;
            c.u.route.n_candidates = 1;
            if (kvr_cmd_encode(&c, &b, NULL) != 0)
                continue;
            pending *p = sync_pending_new(s, b.base, b.len);
            if (p) {
                p->internal = true;
                p->reconcile = true;
                sync_plist_add(s, p);
                sync_dispatch(s, p);
                s->m.reconciled++;
            }
            if (bv.prefill_blocks == 0 && bv.blocks > bv.overlap) {
                kvr_cmd pd = {.type = KVR_CMD_PREFILL_DONE};
                memcpy(pd.u.request_id, bv.request_id, KVR_REQUEST_ID_LEN);
                b.len = 0;
                if (kvr_cmd_encode(&pd, &b, NULL) == 0 && (p = sync_pending_new(s, b.base, b.len))) {
                    p->internal = true;
                    p->reconcile = true;
                    sync_plist_add(s, p);
                    sync_dispatch(s, p);
                }
            }
        } else {
            pending *p = sync_pending_new(s, log[i].cmd, log[i].len);
            if (p) {
                p->internal = true;
                p->reconcile = true;
                sync_plist_add(s, p);
                sync_dispatch(s, p);
                s->m.reconciled++;
            }
        }
    }
    kvr_buf_free(&b);
    free(cand);
    free(routed);
    for (uint32_t i = 0; i < n; i++)
        free(log[i].cmd);
    free(log);
    kvr_fsm_free(lf);
}
