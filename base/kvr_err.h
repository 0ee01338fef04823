/* kvr_err: status codes and error messages that gain context as they bubble up.
 *
 * Every kvroute function that can fail returns an int: 0 on success, a negative KVR_E* code
 * on failure. Functions that can explain a failure also take a `kvr_err *` (may be NULL) and
 * fill it; callers that add context call kvr_err_wrap(), which prepends "context: ". */
#ifndef KVR_ERR_H
#define KVR_ERR_H

#include <stddef.h>

enum {
    KVR_OK = 0,
    KVR_EINVAL = -1,    /* malformed input or bad argument */
    KVR_ENOMEM = -2,    /* allocation failed */
    KVR_ETRUNC = -3,    /* input ends before the structure it claims */
    KVR_ELIMIT = -4,    /* a length, count or depth is over a configured bound */
    KVR_EIO = -5,       /* system call or library I/O failure */
    KVR_ENOTFOUND = -6, /* no such key, worker, file */
    KVR_ECORRUPT = -7,  /* checksum or format check failed */
    KVR_ETIMEDOUT = -8,
    KVR_EAGAIN = -9,    /* try again later (e.g. not leader, queue full) */
    KVR_ECLOSED = -10,  /* handle is closing or closed */
    KVR_EEXIST = -11,
    KVR_ETYPE = -12,    /* a value has the wrong type */
    KVR_EUNSUPPORTED = -13,
};

#define KVR_ERR_MSG_MAX 512

typedef struct kvr_err {
    int code;
    char msg[KVR_ERR_MSG_MAX];
} kvr_err;

/* Name of a KVR_E* code ("invalid input", ...). Never NULL. */
const char *kvr_strerror(int code);

/* Sets err (if not NULL) to code and a printf-style message; returns code so callers can
 * write `return kvr_err_set(err, KVR_EINVAL, "bad %s", what);`. */
int kvr_err_set(kvr_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Prepends "context: " to err's message (if err is not NULL); returns err->code or code
 * when err is NULL. */
int kvr_err_wrap(kvr_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
