/* kvr_nats_flags: see kvr_nats_flags.h. */
#include "kvr_nats_flags.h"

#include "kvr_nkey.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *name; /* with the dashes, as forwarded */
    size_t off;
} nf_field;

static const nf_field fields[KVR_NATS_FLAGS_N] = {
    {"--nats-user", offsetof(kvr_nats_flags, user)},
    {"--nats-password-file", offsetof(kvr_nats_flags, password_file)},
    {"--nats-token-file", offsetof(kvr_nats_flags, token_file)},
    {"--nats-nkey", offsetof(kvr_nats_flags, nkey)},
    {"--nats-creds", offsetof(kvr_nats_flags, creds)},
    {"--nats-tls-ca", offsetof(kvr_nats_flags, tls_ca)},
    {"--nats-tls-cert", offsetof(kvr_nats_flags, tls_cert)},
    {"--nats-tls-key", offsetof(kvr_nats_flags, tls_key)},
};

static const char **field(kvr_nats_flags *nf, size_t i)
{
    return (const char **)((char *)nf + fields[i].off);
}

int kvr_nats_flags_set(kvr_nats_flags *nf, const char *name, size_t name_len, const char *value)
{
    for (size_t i = 0; i < KVR_NATS_FLAGS_N; i++)
        if (strlen(fields[i].name + 2) == name_len &&
            !strncmp(fields[i].name + 2, name, name_len)) {
            *field(nf, i) = value;
            return 1;
        }
    return 0;
}

static int load_secret(const char *file, const char *env, const char *what, char **out,
                       kvr_err *err)
{
    if (file) {
        int rc = kvr_nkey_read_file(file, out, err);
        if (rc != 0)
            return kvr_err_wrap(err, rc, "--nats-%s-file", what);
        if (!**out)
            return kvr_err_set(err, KVR_EINVAL, "--nats-%s-file %s is empty", what, file);
        return 0;
    }
    const char *e = getenv(env);
    if (e && *e && !(*out = strdup(e)))
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    return 0;
}

int kvr_nats_flags_load(kvr_nats_flags *nf, kvr_err *err)
{
    int rc = load_secret(nf->password_file, "KVR_NATS_PASSWORD", "password", &nf->password, err);
    if (rc == 0)
        rc = load_secret(nf->token_file, "KVR_NATS_TOKEN", "token", &nf->token, err);
    if (rc != 0)
        return rc;
    int methods = !!nf->user + !!nf->token + !!nf->nkey + !!nf->creds;
    if (methods > 1)
        return kvr_err_set(err, KVR_EINVAL,
                           "NATS authentication: one of --nats-user, --nats-token-file, "
                           "--nats-nkey, --nats-creds");
    if (nf->password && !nf->user && nf->password_file)
        return kvr_err_set(err, KVR_EINVAL, "--nats-password-file needs --nats-user");
    if (!nf->tls_cert != !nf->tls_key)
        return kvr_err_set(err, KVR_EINVAL, "--nats-tls-cert and --nats-tls-key go together");
    return 0;
}

void kvr_nats_flags_fill(const kvr_nats_flags *nf, kvr_nats_opts *o)
{
    if (nf->user) {
        o->user = nf->user;
        o->password = nf->password;
    }
    if (nf->token)
        o->token = nf->token;
    o->nkey_seed_file = nf->nkey;
    o->creds_file = nf->creds;
    o->tls_ca_file = nf->tls_ca;
    o->tls_cert_file = nf->tls_cert;
    o->tls_key_file = nf->tls_key;
}

int kvr_nats_flags_argv(const kvr_nats_flags *nf, char **argv, int *argc, int max)
{
    for (size_t i = 0; i < KVR_NATS_FLAGS_N; i++) {
        const char *v = *field((kvr_nats_flags *)nf, i);
        if (!v)
            continue;
        if (*argc + 2 > max)
            return KVR_ELIMIT;
        argv[(*argc)++] = (char *)fields[i].name;
        argv[(*argc)++] = (char *)v;
    }
    return 0;
}

void kvr_nats_flags_free(kvr_nats_flags *nf)
{
    kvr_nkey_wipe(nf->password);
    kvr_nkey_wipe(nf->token);
    nf->password = nf->token = NULL;
}
