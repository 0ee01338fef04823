/* kvr-bench subcommands. Each lives in its own bench_<name>.c and is declared weak here so
 * that the binary links while a subcommand is still being written; a missing one says so. */
#ifndef KVR_BENCH_H
#define KVR_BENCH_H

int kvr_bench_indexer(int argc, char **argv) __attribute__((weak));
int kvr_bench_run(int argc, char **argv) __attribute__((weak));
int kvr_bench_compare(int argc, char **argv) __attribute__((weak));
int kvr_bench_ceiling(int argc, char **argv) __attribute__((weak));
int kvr_bench_raft(int argc, char **argv) __attribute__((weak));
int kvr_bench_route(int argc, char **argv) __attribute__((weak));
int kvr_bench_ingest(int argc, char **argv) __attribute__((weak));
int kvr_bench_proxy(int argc, char **argv) __attribute__((weak));
int kvr_bench_worker(int argc, char **argv) __attribute__((weak));
int kvr_bench_bridge(int argc, char **argv) __attribute__((weak));
int kvr_bench_tokenize(int argc, char **argv) __attribute__((weak));
int kvr_bench_epp(int argc, char **argv) __attribute__((weak));

#endif
