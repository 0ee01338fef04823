/* LD_PRELOAD shim for bridge_path: after each complete zmq_send (a replay request's last
 * frame) the sending thread sleeps 300 ms while the file named by KVR_TEST_SLOW_SEND exists.
 * The engine stand-in answers in that time, so the bridge finds the whole answer already
 * queued when it goes on: the race a preempted bridge meets on a busy machine, made certain.
 * Built by the test with the system compiler (no sanitizer: it only forwards and sleeps). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdlib.h>
#include <unistd.h>

#define SHIM_SNDMORE 2 /* ZMQ_SNDMORE, stable in the libzmq ABI */

int zmq_send(void *s, const void *buf, size_t len, int flags)
{
    static int (*real)(void *, const void *, size_t, int);
    if (!real)
        *(void **)&real = dlsym(RTLD_NEXT, "zmq_send");
    if (!real)
        abort();
    int rc = real(s, buf, len, flags);
    const char *f = getenv("KVR_TEST_SLOW_SEND");
    if (rc >= 0 && !(flags & SHIM_SNDMORE) && f && access(f, F_OK) == 0)
        usleep(300 * 1000);
    return rc;
}
