/* kvr_flags: --name value / --name=value command-line flags. */
#include "kvr_flags.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

int kvr_parse_duration_ms(const char *s, int64_t *out_ms)
{
    if (s == NULL || *s == '\0')
        return KVR_EINVAL;
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (end == s || errno != 0 || !isfinite(v) || v < 0)
        return KVR_EINVAL;
    double mul; /* to milliseconds */
    if (*end == '\0' || strcmp(end, "s") == 0)
        mul = 1000;
    else if (strcmp(end, "ms") == 0)
        mul = 1;
    else if (strcmp(end, "us") == 0)
        mul = 0.001;
    else if (strcmp(end, "m") == 0 || strcmp(end, "min") == 0)
        mul = 60000;
    else if (strcmp(end, "h") == 0)
        mul = 3600000;
    else
        return KVR_EINVAL;
    double ms = v * mul;
    if (ms > 9.2e15)
        return KVR_EINVAL;
    int64_t r = (int64_t)ms;
    if ((double)r < ms)
        r++; /* round up so that a non-zero duration never becomes 0 */
    *out_ms = r;
    return 0;
}

static int parse_bool(const char *v, bool *out)
{
    if (!strcasecmp(v, "true") || !strcmp(v, "1") || !strcasecmp(v, "yes") || !strcasecmp(v, "on"))
        *out = true;
    else if (!strcasecmp(v, "false") || !strcmp(v, "0") || !strcasecmp(v, "no") ||
             !strcasecmp(v, "off"))
        *out = false;
    else
        return KVR_EINVAL;
    return 0;
}

static int set_value(kvr_flag *f, const char *v, kvr_err *err)
{
    char *end;
    errno = 0;
    switch (f->type) {
    case KVR_FLAG_STRING:
        *(const char **)f->dst = v;
        return 0;
    case KVR_FLAG_INT: {
        long long x = strtoll(v, &end, 0);
        if (*v == '\0' || *end != '\0' || errno != 0)
            return kvr_err_set(err, KVR_EINVAL, "flag --%s: '%s' is not an integer", f->name, v);
        *(int64_t *)f->dst = (int64_t)x;
        return 0;
    }
    case KVR_FLAG_U64: {
        if (*v == '-')
            return kvr_err_set(err, KVR_EINVAL, "flag --%s: '%s' must not be negative", f->name, v);
        unsigned long long x = strtoull(v, &end, 0);
        if (*v == '\0' || *end != '\0' || errno != 0)
            return kvr_err_set(err, KVR_EINVAL, "flag --%s: '%s' is not an unsigned integer",
                               f->name, v);
        *(uint64_t *)f->dst = (uint64_t)x;
        return 0;
    }
    case KVR_FLAG_DOUBLE: {
        double x = strtod(v, &end);
        if (*v == '\0' || *end != '\0' || errno != 0 || !isfinite(x))
            return kvr_err_set(err, KVR_EINVAL, "flag --%s: '%s' is not a number", f->name, v);
        *(double *)f->dst = x;
        return 0;
    }
    case KVR_FLAG_DURATION:
        if (kvr_parse_duration_ms(v, (int64_t *)f->dst) != 0)
            return kvr_err_set(err, KVR_EINVAL,
                               "flag --%s: '%s' is not a duration (e.g. 500ms, 10s, 2m)", f->name,
                               v);
        return 0;
    case KVR_FLAG_SIZE:
        if (kvr_parse_size(v, (int64_t *)f->dst) != 0)
            return kvr_err_set(err, KVR_EINVAL,
                               "flag --%s: '%s' is not a size (e.g. 4MiB, 64k, 1GiB)", f->name, v);
        return 0;
    case KVR_FLAG_BOOL:
        if (parse_bool(v, (bool *)f->dst) != 0)
            return kvr_err_set(err, KVR_EINVAL, "flag --%s: '%s' is not true or false", f->name, v);
        return 0;
    }
    return kvr_err_set(err, KVR_EINVAL, "flag --%s: bad type", f->name);
}

static kvr_flag *find(kvr_flag *flags, size_t n, const char *name, size_t len)
{
    for (size_t i = 0; i < n; i++)
        if (strlen(flags[i].name) == len && memcmp(flags[i].name, name, len) == 0)
            return &flags[i];
    return NULL;
}

int kvr_flags_parse(kvr_flag *flags, size_t nflags, int argc, char **argv, const char **pos,
                    size_t pos_cap, size_t *npos, kvr_err *err)
{
    size_t np = 0;
    if (npos)
        *npos = 0;
    bool only_pos = false;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (only_pos || a[0] != '-' || a[1] == '\0') {
            if (pos == NULL)
                return kvr_err_set(err, KVR_EINVAL, "unexpected argument '%s'", a);
            if (np >= pos_cap)
                return kvr_err_set(err, KVR_EINVAL, "too many arguments (at '%s')", a);
            pos[np++] = a;
            if (npos)
                *npos = np;
            continue;
        }
        if (strcmp(a, "--") == 0) {
            only_pos = true;
            continue;
        }
        const char *name = a + 1;
        if (*name == '-')
            name++;
        if (strcmp(name, "help") == 0 || strcmp(name, "h") == 0)
            return KVR_FLAGS_HELP;
        const char *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        kvr_flag *f = find(flags, nflags, name, nlen);
        if (f == NULL && eq == NULL && nlen > 3 && strncmp(name, "no-", 3) == 0) {
            kvr_flag *b = find(flags, nflags, name + 3, nlen - 3);
            if (b != NULL && b->type == KVR_FLAG_BOOL) {
                *(bool *)b->dst = false;
                b->set = true;
                continue;
            }
        }
        if (f == NULL)
            return kvr_err_set(err, KVR_EINVAL, "unknown flag '--%.*s' (see --help)", (int)nlen,
                               name);
        const char *v;
        if (eq != NULL) {
            v = eq + 1;
        } else if (f->type == KVR_FLAG_BOOL) {
            v = "true";
        } else {
            if (i + 1 >= argc)
                return kvr_err_set(err, KVR_EINVAL, "flag --%s needs a value", f->name);
            v = argv[++i];
        }
        int rv = set_value(f, v, err);
        if (rv != 0)
            return rv;
        f->set = true;
    }
    return 0;
}

static const char *type_name(kvr_flag_type t)
{
    switch (t) {
    case KVR_FLAG_STRING:
        return "string";
    case KVR_FLAG_INT:
        return "int";
    case KVR_FLAG_U64:
        return "uint";
    case KVR_FLAG_DOUBLE:
        return "number";
    case KVR_FLAG_DURATION:
        return "duration";
    case KVR_FLAG_SIZE:
        return "size";
    case KVR_FLAG_BOOL:
        return "";
    }
    return "?";
}

void kvr_flags_usage(FILE *f, const char *prog, const kvr_flag *flags, size_t nflags)
{
    fprintf(f, "usage: %s [flags]\n", prog);
    for (size_t i = 0; i < nflags; i++) {
        const kvr_flag *fl = &flags[i];
        char def[64] = "";
        switch (fl->type) {
        case KVR_FLAG_STRING: {
            const char *s = *(const char *const *)fl->dst;
            if (s)
                snprintf(def, sizeof def, "\"%.50s\"", s);
            break;
        }
        case KVR_FLAG_INT:
            snprintf(def, sizeof def, "%" PRId64, *(int64_t *)fl->dst);
            break;
        case KVR_FLAG_U64:
            snprintf(def, sizeof def, "%" PRIu64, *(uint64_t *)fl->dst);
            break;
        case KVR_FLAG_DOUBLE:
            snprintf(def, sizeof def, "%g", *(double *)fl->dst);
            break;
        case KVR_FLAG_DURATION:
            snprintf(def, sizeof def, "%" PRId64 "ms", *(int64_t *)fl->dst);
            break;
        case KVR_FLAG_SIZE:
            snprintf(def, sizeof def, "%" PRId64 " bytes", *(int64_t *)fl->dst);
            break;
        case KVR_FLAG_BOOL:
            snprintf(def, sizeof def, "%s", *(bool *)fl->dst ? "true" : "false");
            break;
        }
        fprintf(f, "  --%s %s\n        %s%s%s%s\n", fl->name, type_name(fl->type),
                fl->help ? fl->help : "", def[0] ? " (default " : "", def, def[0] ? ")" : "");
    }
}

int kvr_parse_size(const char *s, int64_t *out)
{
    static const struct {
        const char *unit[3];
        double mul;
    } units[] = {
        {{"b", "", ""}, 1.0},
        {{"k", "kb", "kib"}, 1024.0},
        {{"m", "mb", "mib"}, 1024.0 * 1024},
        {{"g", "gb", "gib"}, 1024.0 * 1024 * 1024},
        {{"t", "tb", "tib"}, 1024.0 * 1024 * 1024 * 1024},
    };
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno != 0 || !isfinite(v) || v < 0)
        return KVR_EINVAL;
    while (*end == ' ')
        end++;
    double mul = 0;
    if (*end == '\0')
        mul = 1;
    for (size_t i = 0; i < sizeof units / sizeof units[0] && mul == 0; i++)
        for (size_t j = 0; j < 3 && mul == 0; j++)
            if (units[i].unit[j][0] && strcasecmp(end, units[i].unit[j]) == 0)
                mul = units[i].mul;
    if (mul == 0 || v * mul > 1125899906842624.0) /* 1 PiB: far past any real limit */
        return KVR_EINVAL;
    *out = (int64_t)(v * mul);
    return 0;
}
