/* kvr_log: logfmt logging, one line per event, one write(2) per line.
 *
 *   KVR_LOG_INFO("routed", "request=%s worker=%" PRIu64, id, w);
 * prints
 *   ts=2026-11-22T05:30:00.123Z level=info comp=routerd id=1 msg=routed request=... worker=...
 *
 * Thread-safe (each line is formatted into a stack buffer and written with one write(2)).
 * KVR_LOG_*_RL(seconds, ...) is rate-limited per call site: at most one line per `seconds`,
 * and the next line that passes says how many were suppressed. */
#ifndef KVR_LOG_H
#define KVR_LOG_H

#include <inttypes.h>
#include <stdint.h>

typedef enum { KVR_LOG_DEBUG = 0, KVR_LOG_INFO, KVR_LOG_WARN, KVR_LOG_ERROR, KVR_LOG_OFF } kvr_log_level;

/* Process-wide settings; call once at start-up before other threads log. `component` and
 * `instance` (may be NULL) are stored by pointer: pass string literals or long-lived strings. */
void kvr_log_setup(const char *component, const char *instance, kvr_log_level level);
/* Parses "debug|info|warn|error|off"; returns 0 or KVR_EINVAL. */
int kvr_log_parse_level(const char *s, kvr_log_level *out);
kvr_log_level kvr_log_get_level(void);
/* Log to this fd (default 2). */
void kvr_log_set_fd(int fd);

void kvr_log_emit(kvr_log_level level, const char *msg, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

typedef struct kvr_log_rl {
    int64_t last_ms;
    uint64_t suppressed;
} kvr_log_rl;
void kvr_log_emit_rl(kvr_log_rl *rl, int seconds, kvr_log_level level, const char *msg,
                     const char *fmt, ...) __attribute__((format(printf, 5, 6)));

#define KVR_LOG_(lvl, msg, ...)                                                                    \
    do {                                                                                           \
        if ((lvl) >= kvr_log_get_level())                                                          \
            kvr_log_emit((lvl), (msg), "" __VA_ARGS__);                                            \
    } while (0)
#define KVR_LOG_DEBUG(msg, ...) KVR_LOG_(KVR_LOG_DEBUG, msg, __VA_ARGS__)
#define KVR_LOG_INFO(msg, ...) KVR_LOG_(KVR_LOG_INFO, msg, __VA_ARGS__)
#define KVR_LOG_WARN(msg, ...) KVR_LOG_(KVR_LOG_WARN, msg, __VA_ARGS__)
#define KVR_LOG_ERROR(msg, ...) KVR_LOG_(KVR_LOG_ERROR, msg, __VA_ARGS__)

#define KVR_LOG_RL_(lvl, secs, msg, ...)                                                           \
    do {                                                                                           \
        static kvr_log_rl kvr_rl_site_;                                                            \
        if ((lvl) >= kvr_log_get_level())                                                          \
            kvr_log_emit_rl(&kvr_rl_site_, (secs), (lvl), (msg), "" __VA_ARGS__);                  \
    } while (0)
#define KVR_LOG_WARN_RL(secs, msg, ...) KVR_LOG_RL_(KVR_LOG_WARN, secs, msg, __VA_ARGS__)
#define KVR_LOG_ERROR_RL(secs, msg, ...) KVR_LOG_RL_(KVR_LOG_ERROR, secs, msg, __VA_ARGS__)

/* Milliseconds: wall clock (CLOCK_REALTIME) and monotonic (CLOCK_MONOTONIC). */
int64_t kvr_now_ms(void);
int64_t kvr_mono_ms(void);
/* Monotonic nanoseconds. */
int64_t kvr_mono_ns(void);

#endif
