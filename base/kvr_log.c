#include "kvr_log.h"
#include "kvr_err.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *log_component = "kvr";
static const char *log_instance = NULL;
static _Atomic int log_level = KVR_LOG_INFO;
static _Atomic int log_fd = 2;

static const char *level_names[] = {"debug", "info", "warn", "error", "off"};

void kvr_log_setup(const char *component, const char *instance, kvr_log_level level)
{
    if (component != NULL)
        log_component = component;
    log_instance = instance;
    atomic_store(&log_level, (int)level);
}

int kvr_log_parse_level(const char *s, kvr_log_level *out)
{
    for (int i = 0; i <= KVR_LOG_OFF; i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (kvr_log_level)i;
            return 0;
        }
    }
    if (strcmp(s, "warning") == 0) {
        *out = KVR_LOG_WARN;
        return 0;
    }
    return KVR_EINVAL;
}

kvr_log_level kvr_log_get_level(void)
{
    return (kvr_log_level)atomic_load(&log_level);
}

void kvr_log_set_fd(int fd)
{
    atomic_store(&log_fd, fd);
}

int64_t kvr_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t kvr_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t kvr_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void emit_va(kvr_log_level level, const char *msg, uint64_t suppressed, const char *fmt,
                    va_list ap)
{
    char line[2048];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line,
                     "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s comp=%s%s%s msg=\"%s\"",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, level_names[level], log_component,
                     log_instance ? " id=" : "", log_instance ? log_instance : "", msg);
    if (n < 0)
        return;
    size_t len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
    if (fmt[0] != '\0' && len < sizeof line - 2) {
        line[len++] = ' ';
        int m = vsnprintf(line + len, sizeof line - len, fmt, ap);
        if (m > 0)
            len += (size_t)m < sizeof line - len ? (size_t)m : sizeof line - len - 1;
    }
    if (suppressed > 0 && len < sizeof line - 2) {
        int m = snprintf(line + len, sizeof line - len, " suppressed=%" PRIu64, suppressed);
        if (m > 0)
            len += (size_t)m < sizeof line - len ? (size_t)m : sizeof line - len - 1;
    }
    if (len >= sizeof line - 1)
        len = sizeof line - 2;
    line[len++] = '\n';
    ssize_t w = write(atomic_load(&log_fd), line, len);
    (void)w;
}

void kvr_log_emit(kvr_log_level level, const char *msg, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    emit_va(level, msg, 0, fmt, ap);
    va_end(ap);
}

void kvr_log_emit_rl(kvr_log_rl *rl, int seconds, kvr_log_level level, const char *msg,
                     const char *fmt, ...)
{
    /* Not atomic: under a race two lines may pass or a count may be off by one, which is fine
     * for a rate limiter whose only job is to keep a flood of bad input out of the log. */
    int64_t now = kvr_mono_ms();
    if (rl->last_ms != 0 && now - rl->last_ms < (int64_t)seconds * 1000) {
        rl->suppressed++;
        return;
    }
    uint64_t suppressed = rl->suppressed;
    rl->suppressed = 0;
    rl->last_ms = now;
    va_list ap;
    va_start(ap, fmt);
    emit_va(level, msg, suppressed, fmt, ap);
    va_end(ap);
}
