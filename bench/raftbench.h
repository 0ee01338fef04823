/* kvr-bench raft: shared pieces of bench_raft.c (in-process variant, best-effort simulation,
 * dispatcher) and raftbench_proc.c (real router processes, the default).
 *
 * Threads: single-threaded (the caller's). Memory: nothing kept between calls. */
#ifndef RAFTBENCH_H
#define RAFTBENCH_H

#include <stdint.h>

/* Default parameters of the best-effort broadcast simulation. */
#define RAFTBENCH_BE_DELAY_MS 2.0
#define RAFTBENCH_BE_HOLD_MS 2000.0
#define RAFTBENCH_BE_RATE 2000.0

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
