/* bench_util.c: small helpers every kvr-bench subcommand may use (bench_util.h). */
#include "bench_util.h"

#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* A loopback TCP port free at the time of the call (bound, read, closed). */
int bench_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof(a);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &l) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

/* Quantile q of the histogram delta (after - before, summed into acc), linear inside the
 * bucket (Prometheus' histogram_quantile). Returns seconds, NAN when empty. */
double bench_hist_quantile(const double *le, const double *cum, int nb, double q)
{
    if (nb == 0 || cum[nb - 1] <= 0)
        return NAN;
    double rank = q * cum[nb - 1];
    for (int i = 0; i < nb; i++) {
        if (cum[i] >= rank) {
            if (isinf(le[i]))
                return i > 0 ? le[i - 1] : NAN;
            double lo = i > 0 ? le[i - 1] : 0, clo = i > 0 ? cum[i - 1] : 0;
            double n = cum[i] - clo;
            return n > 0 ? lo + (le[i] - lo) * (rank - clo) / n : le[i];
        }
    }
    return le[nb - 1];
}

/* CPU seconds (user + system) a process has used so far, from /proc/<pid>/stat; -1 when gone.
 * pid 0: this process. */
double bench_proc_cpu_s(int pid)
{
    char path[64], buf[1024];
    if (pid)
        snprintf(path, sizeof path, "/proc/%d/stat", pid);
    else
        snprintf(path, sizeof path, "/proc/self/stat");
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* comm may hold spaces */
    if (!p)
        return -1;
    unsigned long long ut = 0, st = 0;
    /* after ")": state(3) ... utime is field 14, stime 15 */
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}
