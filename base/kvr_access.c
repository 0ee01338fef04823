#include "kvr_access.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

bool kvr_bearer_ok(const char *key, const char *authz, size_t authz_len)
{
    static const char scheme[] = "bearer";
    size_t sl = sizeof scheme - 1, kl = key ? strlen(key) : 0;
    if (kl == 0 || !authz || authz_len <= sl || strncasecmp(authz, scheme, sl) != 0 ||
        (authz[sl] != ' ' && authz[sl] != '\t'))
        return false;
    const char *t = authz + sl;
    size_t tl = authz_len - sl;
    while (tl && (*t == ' ' || *t == '\t'))
        t++, tl--;
    while (tl && (t[tl - 1] == ' ' || t[tl - 1] == '\t'))
        tl--;
    /* The loop runs over the presented length only, so its time says nothing about the key. */
    unsigned diff = tl != kl;
    for (size_t i = 0; i < tl; i++)
        diff |= (unsigned char)t[i] ^ (i < kl ? (unsigned char)key[i] : 0u);
    return diff == 0;
}

int kvr_token_file_read(const char *path, char **out, kvr_err *err)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return kvr_err_set(err, KVR_EIO, "opening %s: %s", path, strerror(errno));
    char buf[4097];
    size_t n = fread(buf, 1, sizeof buf, f);
    int rerr = ferror(f);
    fclose(f);
    if (rerr)
        return kvr_err_set(err, KVR_EIO, "reading %s", path);
    if (n > 4096)
        return kvr_err_set(err, KVR_ELIMIT, "%s: token longer than 4096 bytes", path);
    size_t a = 0, b = n;
    while (a < b && isspace((unsigned char)buf[a]))
        a++;
    while (b > a && isspace((unsigned char)buf[b - 1]))
        b--;
    if (a == b)
        return kvr_err_set(err, KVR_EINVAL, "%s: empty token", path);
    for (size_t i = a; i < b; i++)
        if (!isgraph((unsigned char)buf[i]))
            return kvr_err_set(err, KVR_EINVAL, "%s: token has a space or control byte", path);
    char *s = malloc(b - a + 1);
    if (!s)
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    memcpy(s, buf + a, b - a);
    s[b - a] = 0;
    *out = s;
    return 0;
}

/* Parses an IPv4 or IPv6 literal into the 128-bit form (IPv4 mapped). */
static bool parse_ip(const char *s, uint8_t out[16], bool *v4)
{
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, s, &a4) == 1) {
        memset(out, 0, 10);
        out[10] = out[11] = 0xff;
        memcpy(out + 12, &a4, 4);
        *v4 = true;
        return true;
    }
    if (inet_pton(AF_INET6, s, &a6) == 1) {
        memcpy(out, &a6, 16);
        *v4 = false;
        return true;
    }
    return false;
}

static bool in_cidr(const kvr_cidr *c, const uint8_t a[16])
{
    unsigned bits = c->bits;
    for (unsigned i = 0; i < 16 && bits; i++) {
        unsigned take = bits >= 8 ? 8 : bits;
        uint8_t mask = (uint8_t)(0xff << (8 - take));
        if ((a[i] & mask) != (c->addr[i] & mask))
            return false;
        bits -= take;
    }
    return true;
}

int kvr_cidr_list_add(kvr_cidr_list *l, const char *spec, kvr_err *err)
{
    if (strcmp(spec, "any") == 0) {
        l->any = true;
        return 0;
    }
    if (strcmp(spec, "private") == 0) {
        static const char *const priv[] = {"127.0.0.0/8",   "::1/128",        "10.0.0.0/8",
                                           "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"};
        for (size_t i = 0; i < sizeof priv / sizeof *priv; i++) {
            int rc = kvr_cidr_list_add(l, priv[i], err);
            if (rc)
                return rc;
        }
        return 0;
    }
    if (l->n >= KVR_CIDR_MAX)
        return kvr_err_set(err, KVR_ELIMIT, "more than %d worker CIDRs", KVR_CIDR_MAX);
    char ip[64];
    const char *slash = strchr(spec, '/');
    size_t il = slash ? (size_t)(slash - spec) : strlen(spec);
    if (il == 0 || il >= sizeof ip)
        return kvr_err_set(err, KVR_EINVAL, "bad CIDR \"%s\"", spec);
    memcpy(ip, spec, il);
    ip[il] = 0;
    kvr_cidr c = {0};
    bool v4;
    if (!parse_ip(ip, c.addr, &v4))
        return kvr_err_set(err, KVR_EINVAL, "bad CIDR \"%s\": not an IP address", spec);
    long bits = v4 ? 32 : 128;
    if (slash) {
        char *end = NULL;
        errno = 0;
        bits = strtol(slash + 1, &end, 10);
        if (errno || !end || end == slash + 1 || *end || bits < 0 || bits > (v4 ? 32 : 128))
            return kvr_err_set(err, KVR_EINVAL, "bad CIDR \"%s\": bad prefix length", spec);
    }
    c.bits = (uint8_t)(v4 ? bits + 96 : bits);
    l->c[l->n++] = c;
    return 0;
}

int kvr_cidr_list_add_csv(kvr_cidr_list *l, const char *specs, kvr_err *err)
{
    const char *p = specs;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        char one[96];
        if (n >= sizeof one)
            return kvr_err_set(err, KVR_EINVAL, "bad CIDR \"%.*s\"", (int)(n > 64 ? 64 : n), p);
        memcpy(one, p, n);
        one[n] = 0;
        if (n) {
            int rc = kvr_cidr_list_add(l, one, err);
            if (rc)
                return rc;
        }
        p += n;
        if (*p == ',')
            p++;
    }
    return 0;
}

bool kvr_cidr_url_allowed(const kvr_cidr_list *l, const char *url, size_t url_len)
{
    if (l->any)
        return true;
    const char *p = url, *end = url + url_len;
    const char *sep = NULL;
    for (const char *q = p; q + 2 < end; q++)
        if (q[0] == ':' && q[1] == '/' && q[2] == '/') {
            sep = q;
            break;
        }
    if (!sep)
        return false;
    p = sep + 3;
    /* userinfo is refused outright: "http://10.0.0.1@evil:80" must not read as 10.0.0.1 */
    for (const char *q = p; q < end && *q != '/' && *q != '?' && *q != '#'; q++)
        if (*q == '@')
            return false;
    char host[64];
    size_t hl = 0;
    if (p < end && *p == '[') {
        const char *rb = memchr(p, ']', (size_t)(end - p));
        if (!rb)
            return false;
        hl = (size_t)(rb - p - 1);
        if (hl == 0 || hl >= sizeof host)
            return false;
        memcpy(host, p + 1, hl);
    } else {
        const char *q = p;
        while (q < end && *q != ':' && *q != '/' && *q != '?' && *q != '#')
            q++;
        hl = (size_t)(q - p);
        if (hl == 0 || hl >= sizeof host)
            return false;
        memcpy(host, p, hl);
    }
    host[hl] = 0;
    uint8_t a[16];
    bool v4;
    if (!parse_ip(host, a, &v4))
        return false;
    for (size_t i = 0; i < l->n; i++)
        if (in_cidr(&l->c[i], a))
            return true;
    return false;
}
