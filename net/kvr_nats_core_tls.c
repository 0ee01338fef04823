/* kvr_nats_core_tls.c: TLS for the loop-native NATS client (kvr_nats_core.h) through OpenSSL
 * memory BIOs: context set-up, handshake, encrypting what the client writes and decrypting what
 * it reads, on the loop thread. Shared state: kvr_nats_core_int.h. */
#define _GNU_SOURCE
#include "kvr_nats_core_int.h"

#include "kvr_log.h"

#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------- TLS ---------- */

static const char *tls_error(nc_sock *s, char *buf, size_t cap)
{
    long vr = s->ssl ? SSL_get_verify_result(s->ssl) : X509_V_OK;
    unsigned long e = ERR_get_error();
    if (vr != X509_V_OK)
        snprintf(buf, cap, "tls: certificate verify failed: %s", X509_verify_cert_error_string(vr));
    else if (e)
        snprintf(buf, cap, "tls: %s",
                 ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "error");
    else
        snprintf(buf, cap, "tls: handshake failed");
    ERR_clear_error();
    return buf;
}

/* Encrypts what out holds (once the TLS handshake is done) and moves every pending record
 * into tls_out. Returns 0, or -1 after dropping the connection. */
int nc_tls_encrypt(kvr_nats_core *c, nc_sock *s)
{
    while (c->st >= NC_HANDSHAKE && c->out.len) {
        size_t n = c->out.len < NC_TLS_CHUNK ? c->out.len : NC_TLS_CHUNK;
        int w = SSL_write(s->ssl, c->out.base, (int)n);
        if (w <= 0) {
            int e = SSL_get_error(s->ssl, w);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
                break; /* a post-handshake message first; out is kept */
            char eb[160];
            nc_drop(c, tls_error(s, eb, sizeof eb));
            return -1;
        }
        kvr_buf_consume(&c->out, (size_t)w);
    }
    size_t pend;
    while ((pend = BIO_ctrl_pending(s->wbio)) > 0) {
        if (kvr_buf_reserve(&s->tls_out, pend) != 0) {
            nc_drop(c, "out of memory");
            return -1;
        }
        int r = BIO_read(s->wbio, s->tls_out.base + s->tls_out.len, (int)pend);
        if (r <= 0)
            break;
        s->tls_out.len += (size_t)r;
    }
    return 0;
}

/* After INFO: a TLS client session on memory BIOs, verifying the server's name or IP. */
int nc_tls_start(kvr_nats_core *c, const nc_url *u)
{
    nc_sock *s = c->sock;
    if (!s)
        return KVR_EINVAL; /* kvr_nats_core_feed: no socket to secure */
    s->raw = malloc(NC_READ_CHUNK);
    s->ssl = SSL_new(c->ssl_ctx);
    s->rbio = BIO_new(BIO_s_mem());
    s->wbio = BIO_new(BIO_s_mem());
    if (!s->raw || !s->ssl || !s->rbio || !s->wbio) {
        BIO_free(s->rbio);
        BIO_free(s->wbio);
        s->rbio = s->wbio = NULL;
        return KVR_ENOMEM;
    }
    BIO_set_mem_eof_return(s->rbio, -1);   /* empty means "want more", not end of stream */
    SSL_set_bio(s->ssl, s->rbio, s->wbio); /* ssl owns them now */
    SSL_set_connect_state(s->ssl);
    X509_VERIFY_PARAM *vp = SSL_get0_param(s->ssl);
    if (X509_VERIFY_PARAM_set1_ip_asc(vp, u->tls_name) != 1) {
        if (SSL_set1_host(s->ssl, u->tls_name) != 1 ||
            SSL_set_tlsext_host_name(s->ssl, u->tls_name) != 1)
            return KVR_EINVAL;
    }
    c->st = NC_TLS;
    int r = SSL_do_handshake(s->ssl);
    if (r <= 0 && SSL_get_error(s->ssl, r) != SSL_ERROR_WANT_READ)
        return KVR_EIO;
    return 0;
}

int nc_tls_ctx_init(kvr_nats_core *c, const kvr_nats_core_opts *o, kvr_err *err)
{
    const char *what = "creating the context";
    c->ssl_ctx = SSL_CTX_new(TLS_client_method());
    if (!c->ssl_ctx)
        goto fail;
    SSL_CTX_set_min_proto_version(c->ssl_ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(c->ssl_ctx, SSL_VERIFY_PEER, NULL);
    what = o->tls_ca_file ? o->tls_ca_file : "the system CA store";
    if (o->tls_ca_file ? SSL_CTX_load_verify_locations(c->ssl_ctx, o->tls_ca_file, NULL) != 1
                       : SSL_CTX_set_default_verify_paths(c->ssl_ctx) != 1)
        goto fail;
    if (!o->tls_cert_file != !o->tls_key_file)
        return kvr_err_set(err, KVR_EINVAL, "nats tls: client cert and key go together");
    if (o->tls_cert_file) {
        what = o->tls_cert_file;
        if (SSL_CTX_use_certificate_chain_file(c->ssl_ctx, o->tls_cert_file) != 1)
            goto fail;
        what = o->tls_key_file;
        if (SSL_CTX_use_PrivateKey_file(c->ssl_ctx, o->tls_key_file, SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_check_private_key(c->ssl_ctx) != 1)
            goto fail;
    }
    return 0;
fail:;
    unsigned long e = ERR_get_error();
    ERR_clear_error();
    return kvr_err_set(err, KVR_EINVAL, "nats tls: loading %s: %s", what,
                       e && ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "failed");
}

void nc_on_prepare(uv_prepare_t *p)
{
    nc_flush(p->data);
}

/* Also right after the I/O callbacks of a turn, before other modules' prepare work (kvr_sync
 * proposes its next Raft entry there: a disk submission the answers should not wait for). */
void nc_on_check(uv_check_t *h)
{
    nc_flush(h->data);
}

/* Feeds n record bytes from s->raw to OpenSSL: finishes the handshake (then CONNECT), and
 * appends what decrypts to c->in. Returns 0, or -1 after dropping the connection. */
int nc_tls_read(kvr_nats_core *c, nc_sock *s, size_t n)
{
    char eb[160];
    if (n && BIO_write(s->rbio, s->raw, (int)n) != (int)n) {
        nc_drop(c, "out of memory");
        return -1;
    }
    if (c->st == NC_TLS) {
        int r = SSL_do_handshake(s->ssl);
        if (r <= 0) {
            if (SSL_get_error(s->ssl, r) != SSL_ERROR_WANT_READ) {
                nc_drop(c, tls_error(s, eb, sizeof eb));
                return -1;
            }
            nc_flush(c);
            return c->sock == s ? 0 : -1;
        }
        if (nc_send_handshake(c) != 0) {
            nc_drop(c, "out of memory");
            return -1;
        }
    }
    for (;;) {
        if (kvr_buf_reserve(&c->in, NC_READ_CHUNK) != 0) {
            nc_drop(c, "out of memory");
            return -1;
        }
        int r = SSL_read(s->ssl, c->in.base + c->in.len, (int)(c->in.cap - c->in.len));
        if (r > 0) {
            c->in.len += (size_t)r; /* at most one read's records more than before */
            continue;
        }
        int e = SSL_get_error(s->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
            break;
        nc_drop(c, e == SSL_ERROR_ZERO_RETURN ? "closed by server" : tls_error(s, eb, sizeof eb));
        return -1;
    }
    return 0;
}
