/* CHECK(c) for fuzz targets: a violated property aborts, which libFuzzer reports as a finding
 * (and the seed replay as a failed test). */
#ifndef KVR_FUZZ_CHECK_H
#define KVR_FUZZ_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(c)                                                                                   \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c);                  \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#endif
