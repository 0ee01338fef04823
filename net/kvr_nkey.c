/* kvr_nkey: see kvr_nkey.h. */
#include "kvr_nkey.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NK_PREFIX_SEED (18 << 3) /* 'S' */
#define NK_PREFIX_USER (20 << 3) /* 'U' */
#define NK_SEED_RAW 36           /* 2 prefix bytes + 32 + 2 CRC */
#define NK_PUB_RAW 35            /* 1 prefix byte + 32 + 2 CRC */

static const char b32[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

static uint16_t crc16(const uint8_t *p, size_t n)
{
    uint16_t crc = 0;
    for (size_t i = 0; i < n; i++) {
        crc ^= (uint16_t)(p[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = crc & 0x8000 ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

/* Decodes unpadded base32; returns bytes written or -1. */
static int b32_decode(const char *s, size_t n, uint8_t *out, size_t cap)
{
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        const char *p = strchr(b32, s[i]);
        if (!s[i] || !p)
            return -1;
        acc = (acc << 5) | (uint32_t)(p - b32);
        bits += 5;
        if (bits >= 8) {
            if (o == cap)
                return -1;
            out[o++] = (uint8_t)(acc >> (bits - 8));
            bits -= 8;
        }
    }
    return (int)o;
}

static void b32_encode(const uint8_t *p, size_t n, char *out)
{
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        acc = (acc << 8) | p[i];
        bits += 8;
        while (bits >= 5) {
            out[o++] = b32[(acc >> (bits - 5)) & 31];
            bits -= 5;
        }
    }
    if (bits > 0)
        out[o++] = b32[(acc << (5 - bits)) & 31];
    out[o] = 0;
}

/* The 32-byte Ed25519 seed of a user seed string. */
static int decode_seed(const char *seed, uint8_t raw32[32], kvr_err *err)
{
    uint8_t raw[NK_SEED_RAW + 4];
    size_t n = seed ? strlen(seed) : 0;
    int got = b32_decode(seed ? seed : "", n, raw, sizeof raw);
    if (got != NK_SEED_RAW)
        return kvr_err_set(err, KVR_EINVAL, "nkey seed: not a base32 seed of the right length");
    uint16_t want = (uint16_t)(raw[NK_SEED_RAW - 2] | raw[NK_SEED_RAW - 1] << 8);
    if (crc16(raw, NK_SEED_RAW - 2) != want) {
        OPENSSL_cleanse(raw, sizeof raw);
        return kvr_err_set(err, KVR_EINVAL, "nkey seed: checksum mismatch");
    }
    int b1 = raw[0] & 0xf8, type = ((raw[0] & 7) << 5) | ((raw[1] & 0xf8) >> 3);
    if (b1 != NK_PREFIX_SEED || type != NK_PREFIX_USER) {
        OPENSSL_cleanse(raw, sizeof raw);
        return kvr_err_set(err, KVR_EINVAL, "nkey seed: not a user seed (SU...)");
    }
    memcpy(raw32, raw + 2, 32);
    OPENSSL_cleanse(raw, sizeof raw);
    return 0;
}

static int load_key(const char *seed, EVP_PKEY **pk, kvr_err *err)
{
    uint8_t raw[32];
    int rc = decode_seed(seed, raw, err);
    if (rc != 0)
        return rc;
    *pk = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, raw, sizeof raw);
    OPENSSL_cleanse(raw, sizeof raw);
    if (!*pk)
        return kvr_err_set(err, KVR_EIO, "nkey: OpenSSL refused the Ed25519 key");
    return 0;
}

int kvr_nkey_public(const char *seed, char *pub, kvr_err *err)
{
    EVP_PKEY *pk = NULL;
    int rc = load_key(seed, &pk, err);
    if (rc != 0)
        return rc;
    uint8_t raw[NK_PUB_RAW];
    size_t len = 32;
    raw[0] = NK_PREFIX_USER;
    if (EVP_PKEY_get_raw_public_key(pk, raw + 1, &len) != 1 || len != 32) {
        EVP_PKEY_free(pk);
        return kvr_err_set(err, KVR_EIO, "nkey: no public key");
    }
    EVP_PKEY_free(pk);
    uint16_t crc = crc16(raw, 33);
    raw[33] = (uint8_t)crc;
    raw[34] = (uint8_t)(crc >> 8);
    b32_encode(raw, sizeof raw, pub);
    return 0;
}

int kvr_nkey_sign(const char *seed, const char *nonce, size_t nonce_len, char *sig, kvr_err *err)
{
    EVP_PKEY *pk = NULL;
    int rc = load_key(seed, &pk, err);
    if (rc != 0)
        return rc;
    uint8_t s[64];
    size_t slen = sizeof s;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool ok = md && EVP_DigestSignInit(md, NULL, NULL, NULL, pk) == 1 &&
              EVP_DigestSign(md, s, &slen, (const uint8_t *)nonce, nonce_len) == 1 && slen == 64;
    EVP_MD_CTX_free(md);
    EVP_PKEY_free(pk);
    if (!ok)
        return kvr_err_set(err, KVR_EIO, "nkey: signing the nonce failed");
    /* base64url without padding, as nats.go's RawURLEncoding */
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t o = 0;
    for (size_t i = 0; i < slen; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16;
        size_t left = slen - i;
        if (left > 1)
            v |= (uint32_t)s[i + 1] << 8;
        if (left > 2)
            v |= s[i + 2];
        sig[o++] = b64[(v >> 18) & 63];
        sig[o++] = b64[(v >> 12) & 63];
        if (left > 1)
            sig[o++] = b64[(v >> 6) & 63];
        if (left > 2)
            sig[o++] = b64[v & 63];
    }
    sig[o] = 0;
    return 0;
}

/* The first non-empty line after the line holding marker, trimmed; NULL when absent. */
static char *block_after(const char *text, const char *marker)
{
    const char *m = strstr(text, marker);
    if (!m)
        return NULL;
    const char *p = strchr(m, '\n');
    while (p) {
        p++;
        while (*p == ' ' || *p == '\t' || *p == '\r')
            p++;
        if (*p == '\n')
            continue;
        if (!*p || *p == '-')
            return NULL;
        size_t n = strcspn(p, " \t\r\n");
        return strndup(p, n);
    }
    return NULL;
}

int kvr_nkey_parse_creds(const char *text, char **jwt, char **seed, kvr_err *err)
{
    *jwt = block_after(text, "BEGIN NATS USER JWT");
    *seed = block_after(text, "BEGIN USER NKEY SEED");
    if (!*jwt || !*seed) {
        free(*jwt);
        kvr_nkey_wipe(*seed);
        *jwt = *seed = NULL;
        return kvr_err_set(err, KVR_EINVAL,
                           "creds: want a NATS USER JWT block and a USER NKEY SEED block");
    }
    return 0;
}

int kvr_nkey_read_file(const char *path, char **out, kvr_err *err)
{
    *out = NULL;
    FILE *f = fopen(path, "r");
    if (!f)
        return kvr_err_set(err, KVR_EIO, "reading %s: %s", path, strerror(errno));
    size_t cap = 64 * 1024;
    char *buf = malloc(cap + 1);
    if (!buf) {
        fclose(f);
        return kvr_err_set(err, KVR_ENOMEM, "reading %s: out of memory", path);
    }
    size_t n = fread(buf, 1, cap + 1, f);
    bool bad = ferror(f);
    fclose(f);
    if (bad || n > cap) {
        OPENSSL_cleanse(buf, n > cap ? cap : n);
        free(buf);
        return kvr_err_set(err, bad ? KVR_EIO : KVR_ELIMIT, "reading %s: %s", path,
                           bad ? "read error" : "over 64 KiB");
    }
    while (n &&
           (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ' || buf[n - 1] == '\t'))
        n--;
    buf[n] = 0;
    *out = buf;
    return 0;
}

void kvr_nkey_wipe(char *s)
{
    if (!s)
        return;
    OPENSSL_cleanse(s, strlen(s));
    free(s);
}

/* Before main, so before libcurl or cnats initialise OpenSSL: no OpenSSL cleanup at exit.
 * cnats' own exit handler frees OpenSSL's compression-method stack, and OpenSSL's would then
 * free it again (a double free at exit seen with cnats TLS in a process that also uses
 * libcurl, e.g. kvr-bench route with TLS). The OS reclaims everything at exit anyway. */
__attribute__((constructor)) static void nkey_openssl_no_atexit(void)
{
    OPENSSL_init_crypto(OPENSSL_INIT_NO_ATEXIT, NULL);
}
