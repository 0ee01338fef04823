/* epp_grpc_tls: the TLS server context an epp_grpc_server serves with (epp_grpc_limits.tls):
 * OpenSSL, TLS 1.2+, ALPN "h2" only, the certificate from a directory or made at start.
 * Any thread; the context is shared, read-only, by the connections that use it. */
#ifndef EPP_GRPC_TLS_H
#define EPP_GRPC_TLS_H

#include "kvr_err.h"

/* A TLS server context (SSL_CTX *) for epp_grpc_limits.tls: TLS 1.2+, ALPN "h2" only (a
 * client offering ALPN without h2 is refused). cert_dir: a directory holding tls.crt (chain,
 * PEM) and tls.key; NULL or "": a self-signed P-256 certificate made now (CN kvr-epp, SANs
 * kvr-epp, localhost, 127.0.0.1; 10 years), as the reference EPP does by default. Free it with
 * epp_grpc_tls_free after the servers using it are closed. client_ca (NULL or "": none): a PEM
 * bundle; with it every client must present a certificate it signed (mutual TLS: the gateway
 * proves who it is), and a handshake without one, or with another's, fails. */
int epp_grpc_tls_ctx(const char *cert_dir, const char *client_ca, void **out, kvr_err *err);
void epp_grpc_tls_free(void *ctx);

#endif
