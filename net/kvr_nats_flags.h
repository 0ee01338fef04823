/* kvr_nats_flags: the NATS security flags every binary takes, one set, one meaning.
 *
 *   --nats-user NAME            user (password from --nats-password-file or $KVR_NATS_PASSWORD)
 *   --nats-password-file FILE   the password, first line of FILE
 *   --nats-token-file FILE      token (or $KVR_NATS_TOKEN)
 *   --nats-nkey FILE            user NKEY seed file ("SU...")
 *   --nats-creds FILE           .creds file (user JWT + NKEY seed)
 *   --nats-tls-ca FILE          CA bundle (PEM) the server's certificate must chain to; turns
 *                               TLS on (so does a tls:// URL in --nats)
 *   --nats-tls-cert FILE        client certificate (PEM), with --nats-tls-key: mutual TLS
 *   --nats-tls-key FILE
 *
 * Secrets come from files or the environment, never from argv (visible in ps and
 * /proc/PID/cmdline). User and password / token in the URL (nats://u:p@h:4222) still work;
 * log lines print them redacted (kvr_nats_redact_url).
 *
 * Use: put KVR_NATS_FLAG_ENTRIES(&nf) in a kvr_flag array (or parse by name with
 * kvr_nats_flags_set), call kvr_nats_flags_load once after parsing (reads the files), then
 * kvr_nats_flags_fill for every kvr_nats_opts. kvr_nats_flags_argv forwards the set flags to
 * a child process (kvrctl).
 *
 * Memory: strings given to the flags point into argv; the loaded secrets are owned by the
 * kvr_nats_flags and wiped by kvr_nats_flags_free. Threads: any, not concurrently. */
#ifndef KVR_NATS_FLAGS_H
#define KVR_NATS_FLAGS_H

#include "kvr_err.h"
#include "kvr_flags.h"
#include "kvr_nats.h"

typedef struct kvr_nats_flags {
    const char *user, *password_file, *token_file, *nkey, *creds;
    const char *tls_ca, *tls_cert, *tls_key;
    char *password, *token; /* loaded by kvr_nats_flags_load */
} kvr_nats_flags;

#define KVR_NATS_FLAGS_N 8

#define KVR_NATS_FLAG_ENTRIES(nf)                                                                  \
    {"nats-user", KVR_FLAG_STRING, &(nf)->user, "NATS user", false},                               \
        {"nats-password-file", KVR_FLAG_STRING, &(nf)->password_file,                              \
         "file holding the NATS password (else $KVR_NATS_PASSWORD)", false},                       \
        {"nats-token-file", KVR_FLAG_STRING, &(nf)->token_file,                                    \
         "file holding the NATS token (else $KVR_NATS_TOKEN)", false},                             \
        {"nats-nkey", KVR_FLAG_STRING, &(nf)->nkey, "NATS user NKEY seed file", false},            \
        {"nats-creds", KVR_FLAG_STRING, &(nf)->creds, "NATS .creds file (JWT + seed)", false},     \
        {"nats-tls-ca", KVR_FLAG_STRING, &(nf)->tls_ca,                                            \
         "CA (PEM) for the NATS server's certificate; turns TLS on", false},                       \
        {"nats-tls-cert", KVR_FLAG_STRING, &(nf)->tls_cert,                                        \
         "client certificate (PEM) for mutual TLS with NATS", false},                              \
    {                                                                                              \
        "nats-tls-key", KVR_FLAG_STRING, &(nf)->tls_key, "client key (PEM) for --nats-tls-cert",   \
            false                                                                                  \
    }

/* For parsers other than kvr_flags (kvr-worker): name without dashes. Returns 1 when name is
 * one of the flags above (value stored), 0 when it is not. */
int kvr_nats_flags_set(kvr_nats_flags *nf, const char *name, size_t name_len, const char *value);

/* Reads the password/token files (or the environment) and checks the combination: one of
 * token, nkey, creds, user; cert and key together. Blocking; call at startup. */
int kvr_nats_flags_load(kvr_nats_flags *nf, kvr_err *err);

/* Sets o's credential and TLS fields from nf (pointers into nf: keep nf alive until
 * kvr_nats_init has returned). */
void kvr_nats_flags_fill(const kvr_nats_flags *nf, kvr_nats_opts *o);

/* Appends "--nats-x", "value" pairs for every flag given (file paths only, never a secret)
 * to argv at *argc, up to max entries. Returns 0 or KVR_ELIMIT. */
int kvr_nats_flags_argv(const kvr_nats_flags *nf, char **argv, int *argc, int max);

void kvr_nats_flags_free(kvr_nats_flags *nf);

#endif
