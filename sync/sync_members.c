/* sync_members: membership administration on the leader (add, promote, remove a node,
 * leadership transfer), each a consensus change answered through kvr_sync_change_cb.
 * Loop thread only (sync_int.h). */
#include "sync_int.h"

#include <stdlib.h>

/* --- membership --- */

typedef struct change_ctx {
    kvr_consensus_change req;
    kvr_consensus_transfer treq;
    kvr_sync *s;
    kvr_sync_change_cb cb;
    void *data;
} change_ctx;

static void change_done(kvr_consensus_change *req, int status)
{
    change_ctx *cx = req->data;
    if (cx->cb)
        cx->cb(cx->s, status, cx->data);
    free(cx);
}

static change_ctx *change_new(kvr_sync *s, kvr_sync_change_cb cb, void *data)
{
    change_ctx *cx = calloc(1, sizeof *cx);
    if (!cx)
        return NULL;
    cx->s = s;
    cx->cb = cb;
    cx->data = data;
    cx->req.cb = change_done;
    cx->req.data = cx;
    return cx;
}

static int not_leader(kvr_sync *s, uint32_t *leader)
{
    if (s->closing || !s->cons)
        return KVR_ECLOSED;
    if (kvr_consensus_get_role(s->cons) == KVR_ROLE_LEADER)
        return 0;
    if (leader)
        *leader = kvr_consensus_leader(s->cons, NULL);
    return KVR_EAGAIN;
}

int kvr_sync_add_node(kvr_sync *s, uint32_t id, const char *raft_addr, kvr_sync_change_cb cb,
                      void *data, uint32_t *leader)
{
    int rc = not_leader(s, leader);
    if (rc)
        return rc;
    change_ctx *cx = change_new(s, cb, data);
    if (!cx)
        return KVR_ENOMEM;
    if ((rc = kvr_consensus_add(s->cons, &cx->req, id, raft_addr)) != 0)
        free(cx);
    return rc;
}

int kvr_sync_promote_node(kvr_sync *s, uint32_t id, kvr_sync_change_cb cb, void *data,
                          uint32_t *leader)
{
    int rc = not_leader(s, leader);
    if (rc)
        return rc;
    change_ctx *cx = change_new(s, cb, data);
    if (!cx)
        return KVR_ENOMEM;
    if ((rc = kvr_consensus_assign_voter(s->cons, &cx->req, id)) != 0)
        free(cx);
    return rc;
}

int kvr_sync_remove_node(kvr_sync *s, uint32_t id, kvr_sync_change_cb cb, void *data,
                         uint32_t *leader)
{
    int rc = not_leader(s, leader);
    if (rc)
        return rc;
    change_ctx *cx = change_new(s, cb, data);
    if (!cx)
        return KVR_ENOMEM;
    if ((rc = kvr_consensus_remove(s->cons, &cx->req, id)) != 0)
        free(cx);
    return rc;
}

static void transfer_done(kvr_consensus_transfer *req)
{
    change_ctx *cx = req->data;
    /* raft calls this when this node steps down, often before it has heard who won (a vote
     * request carries no leader): having stepped down is the success, the winner is named
     * later by /v1/state. Still leading: the transfer timed out. */
    bool stepped_down = cx->s->cons && kvr_consensus_get_role(cx->s->cons) != KVR_ROLE_LEADER;
    if (cx->cb)
        cx->cb(cx->s, stepped_down ? 0 : KVR_EAGAIN, cx->data);
    free(cx);
}

int kvr_sync_transfer(kvr_sync *s, uint32_t id, kvr_sync_change_cb cb, void *data, uint32_t *leader)
{
    int rc = not_leader(s, leader);
    if (rc)
        return rc;
    change_ctx *cx = change_new(s, cb, data);
    if (!cx)
        return KVR_ENOMEM;
    cx->treq.cb = transfer_done;
    cx->treq.data = cx;
    if ((rc = kvr_consensus_transfer_leadership(s->cons, &cx->treq, id)) != 0)
        free(cx);
    return rc;
}
