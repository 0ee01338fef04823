/* kvr_flags: implementation in progress (first commit: interface only). */
#include "kvr_flags.h"

int kvr_flags_parse(kvr_flag *flags, size_t nflags, int argc, char **argv, const char **pos, size_t pos_cap, size_t *npos, kvr_err *err) { return kvr_err_set(err, KVR_EUNSUPPORTED, "kvr_flags: not implemented yet"); }
void kvr_flags_usage(FILE *f, const char *prog, const kvr_flag *flags, size_t nflags) {}
int kvr_parse_duration_ms(const char *s, int64_t *out_ms) { return KVR_EUNSUPPORTED; }
