/* bookings.h: where a router's bookings live (private to kvr-routerd, see routerd_int.h).
 *
 * Three implementations of one interface, chosen once at start (rd_bookings_open) from the
 * flags: no --peers → local (bookings_local.c: this router's own FSM), no --peers and
 * --best-effort → best-effort (bookings_best_effort.c: the local FSM, every booking, FREE
 * and PREFILL_DONE broadcast on kvr.route.bcast and the others' applied as they arrive),
 * --peers → Raft (bookings_raft.c: kvr_sync, the replicated FSM). Everything else in
 * routerd calls through rd->bk and never asks which one it has, except where the answer is
 * the policy itself (rd->bk->mode == RD_BOOKINGS_RAFT: route events are relayed to the
 * majority, see route_api.c).
 *
 * Threads: every function runs on the loop thread; every callback too. */
#ifndef KVR_ROUTERD_BOOKINGS_H
#define KVR_ROUTERD_BOOKINGS_H

#include "fsm.h"
#include "kvr_err.h"
#include "kvr_json.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct kvr_routerd kvr_routerd;

typedef enum rd_bookings_mode {
    RD_BOOKINGS_LOCAL = 0,
    RD_BOOKINGS_BEST_EFFORT,
    RD_BOOKINGS_RAFT,
} rd_bookings_mode;

/* How one command was decided: agreed through Raft, or applied to a local copy only (local
 * and best-effort modes, or Raft degraded). Also the label values of
 * kvr_routerd_route_decisions_total{mode} and the route reply's "mode" (rd_decided_name). */
typedef enum rd_decided {
    RD_DECIDED_RAFT = 0,
    RD_DECIDED_LOCAL = 1,
    RD_DECIDED__N
} rd_decided;
extern const char *const rd_decided_names[]; /* "raft", "local", NULL */
static inline const char *rd_decided_name(rd_decided d)
{
    return d == RD_DECIDED_RAFT ? "raft" : "local";
}

/* A command's answer. status 0: res holds the FSM result; else a KVR_E* code and res is NULL
 * (or, for a local apply, unused). */
typedef void (*rd_cmd_cb)(kvr_routerd *rd, int status, const kvr_fsm_result *res, rd_decided how,
                          void *data);

/* Membership changes (POST /admin/raft/...); TRANSFER hands leadership to voter id (0: the
 * most up-to-date one). */
typedef enum rd_member_op {
    RD_MEMBER_ADD,
    RD_MEMBER_PROMOTE,
    RD_MEMBER_REMOVE,
    RD_MEMBER_TRANSFER
} rd_member_op;
typedef void (*rd_member_cb)(int status, void *data);

typedef struct rd_bookings_ops {
    rd_bookings_mode mode;
    const char *name; /* logs */
    /* The leader's housekeeping owns worker liveness, lease expiry and request expiry for
     * every replica (sync.h, liveness.h): the router's own tick leaves them alone. */
    bool leader_housekeeping;
    /* Sets up what the mode needs beyond rd->fsm (which every mode has). Logs its failures. */
    int (*open)(kvr_routerd *rd);
    /* Its own NATS subjects, once rd->nats is initialised. NULL: none. */
    int (*subscribe)(kvr_routerd *rd, kvr_err *err);
    /* Submits cmd; cb (may be NULL) runs once, possibly before this returns (local modes). */
    int (*submit)(kvr_routerd *rd, const kvr_cmd *cmd, rd_cmd_cb cb, void *data);
    /* Submits a ROUTE (cmd->type KVR_CMD_ROUTE); same contract as submit. */
    int (*route)(kvr_routerd *rd, const kvr_cmd *cmd, rd_cmd_cb cb, void *data);
    /* The state machine route decisions see (never NULL). */
    const kvr_fsm *(*state)(kvr_routerd *rd);
    /* Writes the members of /v1/state's "raft" object. */
    void (*state_json)(kvr_routerd *rd, kvr_jw *w);
    /* Starts closing; returns true when rd_closed_one(rd) will be called once it is closed,
     * false when there was nothing to close. */
    bool (*close)(kvr_routerd *rd);
    /* Worker liveness (liveness.h). owns: this router proposes WORKER_DOWN for the state it
     * books on; commits: it is the one whose WORKER_DOWN commits now (it publishes clears). */
    bool (*owns_liveness)(kvr_routerd *rd);
    bool (*commits_liveness)(kvr_routerd *rd);
    void (*worker_heard)(kvr_routerd *rd, uint64_t id, bool valid);
    void (*liveness_hold)(kvr_routerd *rd); /* no beat could be heard until now */
    void (*frontend_seen)(kvr_routerd *rd, uint64_t frontend_id);
    /* First thing in every tick (may be NULL). */
    void (*tick)(kvr_routerd *rd, int64_t now);
    /* Membership change; cb(status, data) runs later when this returns 0. KVR_EAGAIN: not
     * the leader (*leader set). NULL: the mode has no membership (409). */
    int (*membership)(kvr_routerd *rd, rd_member_op op, uint32_t id, const char *addr,
                      rd_member_cb cb, void *data, uint32_t *leader);
} rd_bookings_ops;

extern const rd_bookings_ops rd_bookings_local, rd_bookings_best_effort, rd_bookings_raft;

/* Picks rd->bk from rd->cfg and opens it. Returns 0 or a KVR_E* code (logged). */
int rd_bookings_open(kvr_routerd *rd);

/* bookings_local.c, shared with best-effort: applies cmd to rd->fsm on this router's clock
 * and, for a WORKER_DOWN it committed, queues the worker's clear. */
void rd_local_apply(kvr_routerd *rd, const kvr_cmd *cmd, kvr_fsm_result *res);
/* bookings_local.c: the local FSM's operations best-effort shares. */
const kvr_fsm *rd_local_state(kvr_routerd *rd);
void rd_local_state_json(kvr_routerd *rd, kvr_jw *w);
bool rd_local_owns_liveness(kvr_routerd *rd);
void rd_local_worker_heard(kvr_routerd *rd, uint64_t id, bool valid);
void rd_local_liveness_hold(kvr_routerd *rd);
void rd_local_frontend_seen(kvr_routerd *rd, uint64_t frontend_id);

#endif
