#include "kvr_err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

const char *kvr_strerror(int code)
{
    switch (code) {
    case KVR_OK: return "ok";
    case KVR_EINVAL: return "invalid input";
    case KVR_ENOMEM: return "out of memory";
    case KVR_ETRUNC: return "truncated input";
    case KVR_ELIMIT: return "over limit";
    case KVR_EIO: return "i/o error";
    case KVR_ENOTFOUND: return "not found";
    case KVR_ECORRUPT: return "corrupt data";
    case KVR_ETIMEDOUT: return "timed out";
    case KVR_EAGAIN: return "try again";
    case KVR_ECLOSED: return "closed";
    case KVR_EEXIST: return "already exists";
    case KVR_ETYPE: return "wrong type";
    case KVR_EUNSUPPORTED: return "unsupported";
    default: return "unknown error";
    }
}

int kvr_err_set(kvr_err *err, int code, const char *fmt, ...)
{
    if (err == NULL)
        return code;
    err->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    return code;
}

int kvr_err_wrap(kvr_err *err, int code, const char *fmt, ...)
{
    if (err == NULL)
        return code;
    char prefix[KVR_ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    if (n < 0)
        return err->code;
    /* Build "prefix: old" by hand: bounded copies, truncation is fine for a message. */
    char out[KVR_ERR_MSG_MAX];
    size_t plen = strnlen(prefix, sizeof out - 1);
    memcpy(out, prefix, plen);
    size_t pos = plen;
    if (pos + 2 < sizeof out) {
        out[pos++] = ':';
        out[pos++] = ' ';
    }
    size_t olen = strnlen(err->msg, sizeof err->msg);
    if (olen > sizeof out - 1 - pos)
        olen = sizeof out - 1 - pos;
    memcpy(out + pos, err->msg, olen);
    pos += olen;
    out[pos] = '\0';
    memcpy(err->msg, out, pos + 1);
    if (err->code == 0)
        err->code = code;
    return err->code;
}
