/* bench_util.h: small helpers shared by kvr-bench's subcommands. All are plain functions with
 * no state, callable from any thread. */
#ifndef KVR_BENCH_UTIL_H
#define KVR_BENCH_UTIL_H

/* A loopback TCP port that was free when asked (another process may take it after): -1 on
 * error. */
int bench_free_port(void);

/* Quantile q (0..1) of a cumulative histogram of nb buckets with upper bounds le[] (the last
 * may be +Inf) and cumulative counts cum[], linear inside the bucket as Prometheus'
 * histogram_quantile. Returns the bound's unit (seconds for our metrics), NAN when empty. */
double bench_hist_quantile(const double *le, const double *cum, int nb, double q);

/* CPU seconds (user + system) process pid has used so far, from /proc/PID/stat; pid 0 is this
 * process. -1 when the process is gone. */
double bench_proc_cpu_s(int pid);

#endif
