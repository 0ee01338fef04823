/* kvr-bench raft: the pieces shared by bench_raft.c (dispatcher, in-process variant) and
 * raftbench_proc.c (real router processes, the default). The workload and the simulations live
 * in raftbench_sim.c, so neither variant calls the other: bench_raft.c → raftbench_proc.c →
 * raftbench_sim.c, and bench_raft.c → raftbench_sim.c.
 *
 * Threads: single-threaded (the caller's). Memory: nothing kept between calls. */
#ifndef RAFTBENCH_H
#define RAFTBENCH_H

#include "fsm.h"

#include <stdint.h>

/* Default parameters of the best-effort broadcast simulation. */
#define RAFTBENCH_BE_DELAY_MS 2.0
#define RAFTBENCH_BE_HOLD_MS 2000.0
#define RAFTBENCH_BE_RATE 2000.0

/* Request i of the workload: id, blocks and a few overlapping candidates (written to cand), all
 * derived from i and seed. The command's slices point into cand, model and ns. */
kvr_cmd raftbench_make_route(uint64_t i, uint64_t seed, uint32_t n_workers,
                             kvr_route_candidate cand[4], const char *model, const char *ns);

/* Routes (and frees) per second of the same n requests applied, encoded, to one local FSM. */
double raftbench_local_rate(uint64_t n, uint64_t seed, uint32_t n_workers, const char *model,
                            const char *ns);

/* The best-effort simulation below with the given model and namespace names. */
double raftbench_best_effort_sim(uint64_t n, uint64_t seed, uint32_t n_workers, double rate_per_s,
                                 double delay_ms, double hold_ms, const char *model,
                                 const char *ns, uint64_t *stale_out);

/* Simulated best-effort booking broadcast between 3 routers (simulated time, no sockets):
 * n requests at rate_per_s spread round-robin over the routers, each booking/free reaching the
 * other routers delay_ms later, bookings held hold_ms. Returns the share of decisions made on
 * a view of the chosen worker's load lower than the truth (a double booking); *stale_out gets
 * their count. */
double raftbench_best_effort_rate(uint64_t n, uint64_t seed, uint32_t n_workers, double rate_per_s,
                                  double delay_ms, double hold_ms, uint64_t *stale_out);

/* `kvr-bench raft --mode process` (default): real kvr-routerd processes started with kvrctl.
 * argv as given to the subcommand (argv[0] is "raft"); --mode already removed. */
int raftbench_process(int argc, char **argv);

#endif
