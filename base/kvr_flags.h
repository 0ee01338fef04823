/* kvr_flags: tiny command-line flag parser.
 *
 *   const char *listen = ":8000"; int64_t port = 0; int64_t timeout_ms = 500; bool verbose = false;
 *   kvr_flag flags[] = {
 *       {"listen", KVR_FLAG_STRING, &listen, "address to listen on"},
 *       {"timeout", KVR_FLAG_DURATION, &timeout_ms, "per-try timeout (10s, 500ms)"},
 *       {"verbose", KVR_FLAG_BOOL, &verbose, "log more"},
 *   };
 *   int rv = kvr_flags_parse(flags, 3, argc - 1, argv + 1, NULL, 0, NULL, &err);
 *   if (rv == KVR_FLAGS_HELP) { kvr_flags_usage(stdout, "kvr-x", flags, 3); exit(0); }
 *   if (rv < 0) { fprintf(stderr, "%s\n", err.msg); exit(2); }
 *
 * Accepts `--name value`, `--name=value` (also a single leading dash). Bools: `--name`,
 * `--name=true|false|1|0|yes|no`, `--no-name`. `--` ends flags. Unknown flag, missing value or
 * bad value → KVR_EINVAL with a clear message. Destinations keep their prior value (the
 * default) unless given. Strings point into argv (not copied). Any thread; no global state. */
#ifndef KVR_FLAGS_H
#define KVR_FLAGS_H

#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum {
    KVR_FLAG_STRING,   /* const char ** */
    KVR_FLAG_INT,      /* int64_t * */
    KVR_FLAG_U64,      /* uint64_t * */
    KVR_FLAG_DOUBLE,   /* double * */
    KVR_FLAG_DURATION, /* int64_t * milliseconds; "250ms", "10s", "1.5s", "2m", "1h", "500us"
                          (rounded up to 1 ms if non-zero); a bare number means SECONDS */
    KVR_FLAG_BOOL,     /* bool * */
    KVR_FLAG_SIZE,     /* int64_t * bytes; "4MiB", "64k", "1.5GB", "512" (units are powers of
                          1024, case-insensitive; at most 1 PiB) */
} kvr_flag_type;

typedef struct kvr_flag {
    const char *name; /* without dashes */
    kvr_flag_type type;
    void *dst;
    const char *help;
    bool set; /* out: given on the command line */
} kvr_flag;

#define KVR_FLAGS_HELP 1 /* --help or -h was given */

/* argv: the arguments only (no program name). Positional arguments go to pos (up to pos_cap,
 * count in *npos); with pos == NULL any positional argument is an error. Returns 0,
 * KVR_FLAGS_HELP, or KVR_EINVAL with err filled. */
int kvr_flags_parse(kvr_flag *flags, size_t nflags, int argc, char **argv, const char **pos,
                    size_t pos_cap, size_t *npos, kvr_err *err);

/* Prints "usage: prog [flags]" and one line per flag with its type and current value. */
void kvr_flags_usage(FILE *f, const char *prog, const kvr_flag *flags, size_t nflags);

/* Parses a size as above into bytes. Returns 0 or KVR_EINVAL. */
int kvr_parse_size(const char *s, int64_t *out_bytes);

/* Parses a duration as above into milliseconds. Returns 0 or KVR_EINVAL. */
int kvr_parse_duration_ms(const char *s, int64_t *out_ms);

#endif
