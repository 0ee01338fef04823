/* kvr_access: small access checks shared by the router and the frontend (docs/SECURITY.md
 * sections 4 and 5).
 *
 *  - Bearer tokens: the auth scheme is compared case-insensitively (RFC 7235 2.1), the
 *    credential in constant time over the presented length.
 *  - Token files: one secret per file, surrounding whitespace trimmed.
 *  - Worker URL allow-list: the host of a worker's advertised URL must be an IP literal
 *    inside one of the configured CIDRs. Hostnames are refused: checking them would need a
 *    DNS lookup on the loop thread, and a name an attacker controls can resolve anywhere.
 *
 * Pure functions, no threads, no globals: callable from any thread. */
#ifndef KVR_ACCESS_H
#define KVR_ACCESS_H

#include "kvr_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* True if authz (an Authorization header value, not NUL-terminated) is "Bearer <key>"
 * (scheme in any case, one or more spaces). An empty key never matches. */
bool kvr_bearer_ok(const char *key, const char *authz, size_t authz_len);

/* Reads the secret in path into *out (malloc'd, caller frees), trimmed of surrounding
 * whitespace. Refuses an empty file and one over 4 KiB. */
int kvr_token_file_read(const char *path, char **out, kvr_err *err);

#define KVR_CIDR_MAX 64

typedef struct kvr_cidr {
    uint8_t addr[16]; /* IPv4 as ::ffff:a.b.c.d */
    uint8_t bits;     /* prefix length over the 128-bit form */
} kvr_cidr;

typedef struct kvr_cidr_list {
    kvr_cidr c[KVR_CIDR_MAX];
    size_t n;
    bool any; /* "any": every URL passes, hostnames too */
} kvr_cidr_list;

/* Adds "a.b.c.d/n", "x::y/n", a bare address (a /32 or /128), "any", or "private" (the
 * default set: 127.0.0.0/8, ::1, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7). */
int kvr_cidr_list_add(kvr_cidr_list *l, const char *spec, kvr_err *err);
/* Adds each comma-separated spec of specs. */
int kvr_cidr_list_add_csv(kvr_cidr_list *l, const char *specs, kvr_err *err);

/* True if url's host ("http://H:port/...", "http://[v6]:port") is an IP inside l. An empty
 * list allows nothing. */
bool kvr_cidr_url_allowed(const kvr_cidr_list *l, const char *url, size_t url_len);

#endif
