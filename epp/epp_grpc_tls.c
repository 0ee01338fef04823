/* epp_grpc_tls: the TLS server context (see epp_grpc_tls.h). */
#include "epp_grpc_tls.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <uv.h>

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg)
{
    (void)ssl;
    (void)arg;
    static const unsigned char h2[] = {2, 'h', '2'};
    unsigned char *o = NULL;
    if (SSL_select_next_proto(&o, outlen, h2, sizeof h2, in, inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_ALERT_FATAL; /* gRPC is HTTP/2 only */
    *out = o;
    return SSL_TLSEXT_ERR_OK;
}

static int self_signed(SSL_CTX *ctx, kvr_err *err)
{
    EVP_PKEY *k = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    X509_EXTENSION *ext = NULL;
    BIGNUM *bn = NULL;
    int rc = KVR_EIO;
    if (!k || !x)
        goto out;
    unsigned char serial[8];
    uv_random(NULL, NULL, serial, sizeof serial, 0, NULL);
    serial[0] &= 0x7f;
    bn = BN_bin2bn(serial, sizeof serial, NULL);
    if (!bn || !BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)))
        goto out;
    X509_set_version(x, 2);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 10L * 365 * 24 * 3600);
    X509_NAME *nm = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(nm, "CN", MBSTRING_ASC, (const unsigned char *)"kvr-epp", -1, -1, 0);
    X509_set_issuer_name(x, nm);
    X509_set_pubkey(x, k);
    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
    ext = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name,
                              "DNS:kvr-epp,DNS:localhost,IP:127.0.0.1");
    if (!ext || !X509_add_ext(x, ext, -1))
        goto out;
    if (!X509_sign(x, k, EVP_sha256()) || SSL_CTX_use_certificate(ctx, x) != 1 ||
        SSL_CTX_use_PrivateKey(ctx, k) != 1)
        goto out;
    rc = 0;
out:
    X509_EXTENSION_free(ext);
    BN_free(bn);
    X509_free(x);
    EVP_PKEY_free(k);
    if (rc)
        kvr_err_set(err, rc, "self-signed certificate: %s",
                    ERR_reason_error_string(ERR_get_error()));
    return rc;
}

int epp_grpc_tls_ctx(const char *cert_dir, const char *client_ca, void **out, kvr_err *err)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx)
        return kvr_err_set(err, KVR_ENOMEM, "SSL_CTX_new failed");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);
    if (cert_dir && cert_dir[0]) {
        char crt[1024], key[1024];
        snprintf(crt, sizeof crt, "%s/tls.crt", cert_dir);
        snprintf(key, sizeof key, "%s/tls.key", cert_dir);
        if (SSL_CTX_use_certificate_chain_file(ctx, crt) != 1 ||
            SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_check_private_key(ctx) != 1) {
            kvr_err_set(err, KVR_EINVAL, "--cert-path %s: tls.crt / tls.key: %s", cert_dir,
                        ERR_reason_error_string(ERR_get_error()));
            SSL_CTX_free(ctx);
            return KVR_EINVAL;
        }
    } else if (self_signed(ctx, err)) {
        SSL_CTX_free(ctx);
        return KVR_EIO;
    }
    if (client_ca && client_ca[0]) {
        if (SSL_CTX_load_verify_locations(ctx, client_ca, NULL) != 1) {
            kvr_err_set(err, KVR_EINVAL, "--client-ca-file %s: %s", client_ca,
                        ERR_reason_error_string(ERR_get_error()));
            SSL_CTX_free(ctx);
            return KVR_EINVAL;
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    }
    *out = ctx;
    return 0;
}

void epp_grpc_tls_free(void *ctx)
{
    SSL_CTX_free(ctx);
}
