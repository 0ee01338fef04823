/* bookings.c: picks the bookings implementation (bookings.h) from the flags. */
#include "bookings.h"
#include "routerd_int.h"

const char *const rd_decided_names[] = {"raft", "local", NULL};

int rd_bookings_open(kvr_routerd *rd)
{
    const kvr_routerd_config *cfg = &rd->cfg;
    if (cfg->peers && *cfg->peers) {
        rd->bk = &rd_bookings_raft;
    } else {
        rd->bk = cfg->best_effort ? &rd_bookings_best_effort : &rd_bookings_local;
    }
    return rd->bk->open ? rd->bk->open(rd) : 0;
}

void rd_log_cmd_failure(kvr_routerd *rd, int status, const kvr_fsm_result *res,
                        rd_decided how, void *data)
{
    (void)rd;
    (void)res;
    (void)how;
    const char *what = data;
    if (status != 0)
        KVR_LOG_WARN_RL(5, "command failed", "cmd=%s status=\"%s\"", what, kvr_strerror(status));
}
