/* kvr_nats_core: see kvr_nats_core.h. */
#define _GNU_SOURCE /* memmem, memrchr */
#include "kvr_nats_core.h"

#include "kvr_json.h"
#include "kvr_log.h"
#include "kvr_nkey.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NC_LINE_MAX (256 * 1024)
#define NC_TOKEN_MAX 1024
#define NC_HDR_SLACK (64 * 1024)
#define NC_DEFAULT_MAX_PAYLOAD (1024 * 1024)
#define NC_FLUSH_AT (64 * 1024) /* write at once past this, not only before the loop sleeps */
#define NC_READ_CHUNK (64 * 1024)
#define NC_MAX_SERVERS 64 /* pool bound: INFO connect_urls cannot grow it further */
#define NC_TLS_CHUNK (256 * 1024)

typedef struct nc_url {
    char host[256];
    int port;
    char *user, *pass, *token;
    bool tls;           /* tls:// */
    char tls_name[256]; /* name or IP the server's certificate must carry */
    bool discovered;    /* from INFO connect_urls */
} nc_url;

typedef struct nc_sub {
    uint64_t sid;
    char *subject, *queue;
    void *data;
} nc_sub;

/* One TCP connection attempt. Freed in its close callback, which libuv runs after the
 * callback of any write still pending on it. */
typedef struct nc_sock {
    uv_tcp_t tcp;
    uv_connect_t creq;
    uv_write_t wreq;
    kvr_buf wbuf; /* bytes handed to uv_write */
    bool writing;
    kvr_nats_core *c;
    /* TLS (after INFO): ssl reads what on_read puts into rbio and writes records into wbio;
     * tls_out holds records not yet handed to the socket, raw is the read buffer. */
    SSL *ssl;
    BIO *rbio, *wbio;
    kvr_buf tls_out;
    char *raw;
} nc_sock;

typedef struct nc_resolve {
    uv_getaddrinfo_t req;
    kvr_nats_core *c;
    int port;
    uint64_t gen;
} nc_resolve;

enum { NC_IDLE, NC_RESOLVING, NC_TCP, NC_INFO_WAIT, NC_TLS, NC_HANDSHAKE, NC_UP };

struct kvr_nats_core {
    uv_loop_t *loop;
    kvr_nats_core_opts o;
    char *name, *user, *password, *token, *nkey_seed, *jwt;
    char *nonce;      /* from the current attempt's INFO, signed in CONNECT */
    SSL_CTX *ssl_ctx; /* NULL: TLS not configured */
    nc_url *urls;
    int n_urls, next_url, cur_url;
    nc_sock *sock;        /* current attempt or connection; NULL when idle */
    nc_resolve *resolve;  /* current name lookup, or NULL */
    int resolves_pending; /* lookups whose callback has not run (cancelled ones included) */
    uint64_t gen;         /* attempt number: stale lookups compare it */
    uv_timer_t retry_timer, ping_timer, hs_timer;
    uv_prepare_t flush_prep;
    uv_check_t flush_check;
    int st;
    bool ever_up, closing;
    int attempts; /* failed attempts since the last handshake */
    int pings_out;
    size_t max_payload;
    kvr_buf in, out;
    nc_sub **subs; /* by sid - 1; NULL once unsubscribed */
    uint64_t n_subs;
    uint64_t rng;
    int handles_open;
    void (*close_cb)(void *);
    void *close_data;
};

static void nc_attempt(kvr_nats_core *c);
static void nc_drop(kvr_nats_core *c, const char *why);
static void nc_flush(kvr_nats_core *c);
static int tls_encrypt(kvr_nats_core *c, nc_sock *s);
static int send_handshake(kvr_nats_core *c);

bool kvr_nats_core_valid_token(const char *s)
{
    if (!s || !*s)
        return false;
    size_t n = 0;
    for (; s[n]; n++) {
        unsigned char ch = (unsigned char)s[n];
        if (ch <= ' ' || ch == 0x7f || n >= NC_TOKEN_MAX)
            return false;
    }
    return true;
}

/* ---------- options ---------- */

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

static int parse_one_url(const char *s, size_t len, nc_url *u, kvr_err *err)
{
    memset(u, 0, sizeof *u);
    while (len && (*s == ' ' || *s == '\t'))
        s++, len--;
    while (len && (s[len - 1] == ' ' || s[len - 1] == '\t'))
        len--;
    if (len >= 7 && !strncmp(s, "nats://", 7)) {
        s += 7, len -= 7;
    } else if (len >= 6 && !strncmp(s, "tls://", 6)) {
        s += 6, len -= 6;
        u->tls = true;
    } else if (memchr(s, ':', len) && len >= 3 && memmem(s, len, "://", 3)) {
        /* no credentials in this message: the scheme is all that is shown */
        const char *sep = memmem(s, len, "://", 3);
        return kvr_err_set(err, KVR_EUNSUPPORTED, "nats url: scheme %.*s:// (nats:// or tls://)",
                           (int)(sep - s), s);
    }
    const char *at = memchr(s, '@', len);
    if (at) {
        const char *colon = memchr(s, ':', (size_t)(at - s));
        if (colon) {
            u->user = strndup(s, (size_t)(colon - s));
            u->pass = strndup(colon + 1, (size_t)(at - colon - 1));
        } else {
            u->token = strndup(s, (size_t)(at - s));
        }
        len -= (size_t)(at + 1 - s);
        s = at + 1;
    }
    const char *hs = s, *he;
    const char *port_at = NULL;
    if (len && *s == '[') { /* [v6]:port */
        const char *rb = memchr(s, ']', len);
        if (!rb)
            return kvr_err_set(err, KVR_EINVAL, "nats url: unterminated [ in %.*s", (int)len, s);
        hs = s + 1;
        he = rb;
        if (rb + 1 < s + len && rb[1] == ':')
            port_at = rb + 2;
    } else {
        const char *colon = memrchr(s, ':', len);
        he = colon ? colon : s + len;
        if (colon)
            port_at = colon + 1;
    }
    if (he <= hs || (size_t)(he - hs) >= sizeof u->host)
        return kvr_err_set(err, KVR_EINVAL, "nats url: bad host in %.*s", (int)len, s);
    memcpy(u->host, hs, (size_t)(he - hs));
    u->host[he - hs] = 0;
    memcpy(u->tls_name, u->host, sizeof u->tls_name);
    u->port = 4222;
    if (port_at) {
        char pb[8];
        size_t pl = (size_t)(s + len - port_at);
        char *e;
        if (pl == 0 || pl >= sizeof pb)
            return kvr_err_set(err, KVR_EINVAL, "nats url: bad port in %.*s", (int)len, s);
        memcpy(pb, port_at, pl);
        pb[pl] = 0;
        long p = strtol(pb, &e, 10);
        if (*e || p <= 0 || p > 65535)
            return kvr_err_set(err, KVR_EINVAL, "nats url: bad port in %.*s", (int)len, s);
        u->port = (int)p;
    }
    return 0;
}

static void free_urls(kvr_nats_core *c)
{
    for (int i = 0; i < c->n_urls; i++) {
        free(c->urls[i].user);
        kvr_nkey_wipe(c->urls[i].pass);
        kvr_nkey_wipe(c->urls[i].token);
    }
    free(c->urls);
    c->urls = NULL;
    c->n_urls = 0;
}

static int parse_urls(kvr_nats_core *c, const char *urls, kvr_err *err)
{
    int n = 1;
    for (const char *p = urls; *p; p++)
        n += *p == ',';
    if (n > NC_MAX_SERVERS)
        return kvr_err_set(err, KVR_ELIMIT, "nats: more than %d urls", NC_MAX_SERVERS);
    c->urls = calloc(NC_MAX_SERVERS, sizeof *c->urls);
    if (!c->urls)
        return kvr_err_set(err, KVR_ENOMEM, "nats: out of memory");
    const char *p = urls;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        int rc = parse_one_url(p, len, &c->urls[c->n_urls], err);
        c->n_urls++;
        if (rc != 0)
            return rc;
        if (!comma)
            break;
        p = comma + 1;
    }
    return 0;
}

/* ---------- handles and close ---------- */

static void free_core(kvr_nats_core *c)
{
    for (uint64_t i = 0; i < c->n_subs; i++)
        if (c->subs[i]) {
            free(c->subs[i]->subject);
            free(c->subs[i]->queue);
            free(c->subs[i]);
        }
    free(c->subs);
    free_urls(c);
    free(c->name);
    free(c->user);
    free(c->password);
    free(c->token);
    kvr_nkey_wipe(c->nkey_seed);
    free(c->jwt);
    free(c->nonce);
    if (c->ssl_ctx)
        SSL_CTX_free(c->ssl_ctx);
    kvr_buf_free(&c->in);
    kvr_buf_free(&c->out);
    free(c);
}

static void maybe_finish_close(kvr_nats_core *c)
{
    if (!c->closing || c->handles_open > 0 || c->resolves_pending > 0)
        return;
    void (*cb)(void *) = c->close_cb;
    void *data = c->close_data;
    free_core(c);
    if (cb)
        cb(data);
}

static void handle_closed(uv_handle_t *h)
{
    kvr_nats_core *c = h->data;
    c->handles_open--;
    maybe_finish_close(c);
}

static void sock_closed(uv_handle_t *h)
{
    nc_sock *s = h->data;
    kvr_nats_core *c = s->c;
    kvr_buf_free(&s->wbuf);
    kvr_buf_free(&s->tls_out);
    if (s->ssl)
        SSL_free(s->ssl); /* and its BIOs */
    free(s->raw);
    free(s);
    c->handles_open--;
    maybe_finish_close(c);
}

static void sock_close(kvr_nats_core *c)
{
    nc_sock *s = c->sock;
    if (!s)
        return;
    c->sock = NULL;
    uv_close((uv_handle_t *)&s->tcp, sock_closed);
}

/* ---------- writing ---------- */

static void on_write(uv_write_t *w, int status)
{
    nc_sock *s = w->data;
    kvr_nats_core *c = s->c;
    s->writing = false;
    s->wbuf.len = 0;
    if (s != c->sock || c->closing)
        return; /* an old connection's write, cancelled by its close */
    if (status < 0) {
        nc_drop(c, uv_strerror(status));
        return;
    }
    nc_flush(c);
}

/* Writes what is queued: directly when the socket takes it, else through uv_write (new frames
 * then accumulate in out until that write is done). Only whole frames are ever left in out, so
 * a connection lost with a write in flight leaves out valid for the next one. */
static void nc_flush(kvr_nats_core *c)
{
    nc_sock *s = c->sock;
    if (!s || s->writing)
        return;
    kvr_buf *src = &c->out;
    if (s->ssl) {
        /* TLS: frames become records only when the socket can take them, so out stays the
         * bounded queue; handshake records (before CONNECT) go out in any state */
        if (tls_encrypt(c, s) != 0)
            return;
        src = &s->tls_out;
    } else if (c->st < NC_HANDSHAKE) {
        return;
    }
    if (src->len == 0)
        return;
    uv_buf_t b = uv_buf_init(src->base, (unsigned)src->len);
    int n = uv_try_write((uv_stream_t *)&s->tcp, &b, 1);
    if (n == UV_EAGAIN)
        n = 0;
    if (n < 0) {
        nc_drop(c, uv_strerror(n));
        return;
    }
    kvr_buf_consume(src, (size_t)n);
    if (src->len == 0)
        return;
    kvr_buf t = s->wbuf;
    s->wbuf = *src;
    *src = t;
    src->len = 0;
    b = uv_buf_init(s->wbuf.base, (unsigned)s->wbuf.len);
    s->wreq.data = s;
    int rc = uv_write(&s->wreq, (uv_stream_t *)&s->tcp, &b, 1, on_write);
    if (rc != 0) {
        s->wbuf.len = 0;
        nc_drop(c, uv_strerror(rc));
        return;
    }
    s->writing = true;
}

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
static int tls_encrypt(kvr_nats_core *c, nc_sock *s)
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
static int tls_start(kvr_nats_core *c, const nc_url *u)
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

static int tls_ctx_init(kvr_nats_core *c, const kvr_nats_core_opts *o, kvr_err *err)
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

static void on_prepare(uv_prepare_t *p)
{
    nc_flush(p->data);
}

/* Also right after the I/O callbacks of a turn, before other modules' prepare work (kvr_sync
 * proposes its next Raft entry there: a disk submission the answers should not wait for). */
static void on_check(uv_check_t *h)
{
    nc_flush(h->data);
}

/* ---------- connection lifecycle ---------- */

static int64_t backoff_ms(kvr_nats_core *c)
{
    int64_t base = c->o.reconnect_wait_ms, cap = c->o.max_reconnect_wait_ms, d = base;
    for (int i = 1; i < c->attempts && d < cap; i++)
        d *= 2;
    if (d > cap)
        d = cap;
    c->rng ^= c->rng << 13;
    c->rng ^= c->rng >> 7;
    c->rng ^= c->rng << 17;
    return d + (int64_t)(c->rng % (uint64_t)(d / 4 + 1));
}

static void on_retry(uv_timer_t *t)
{
    nc_attempt(t->data);
}

/* Drops the connection or attempt and schedules the next one. */
static void nc_drop(kvr_nats_core *c, const char *why)
{
    bool was_up = c->st == NC_UP;
    sock_close(c);
    if (c->resolve) {
        uv_cancel((uv_req_t *)&c->resolve->req); /* its callback still runs and frees it */
        c->resolve = NULL;
    }
    c->in.len = 0;
    c->st = NC_IDLE;
    uv_timer_stop(&c->hs_timer);
    if (c->closing)
        return;
    c->attempts++;
    int64_t d = backoff_ms(c);
    if (was_up)
        KVR_LOG_WARN("nats disconnected", "reason=\"%s\" retry_ms=%" PRId64, why, d);
    else if (c->attempts == 1 || c->attempts % 20 == 0)
        KVR_LOG_WARN("nats connect failed", "reason=\"%s\" attempts=%d retry_ms=%" PRId64, why,
                     c->attempts, d);
    uv_timer_start(&c->retry_timer, on_retry, (uint64_t)d, 0);
    if (was_up && c->o.on_event)
        c->o.on_event(c->o.cb_data, KVR_NATS_CORE_DISCONNECTED);
}

static void on_hs_timeout(uv_timer_t *t)
{
    nc_drop(t->data, "connect timed out");
}

static void on_ping(uv_timer_t *t)
{
    kvr_nats_core *c = t->data;
    if (c->st != NC_UP)
        return;
    if (c->pings_out >= c->o.max_pings_out) {
        nc_drop(c, "stale connection (pings unanswered)");
        return;
    }
    c->pings_out++;
    kvr_buf_append(&c->out, "PING\r\n", 6);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)hint;
    nc_sock *s = h->data;
    kvr_nats_core *c = s->c;
    if (s->raw) { /* TLS: records, decrypted in on_read */
        buf->base = s->raw;
        buf->len = NC_READ_CHUNK;
        return;
    }
    if (kvr_buf_reserve(&c->in, NC_READ_CHUNK) != 0) {
        buf->base = NULL;
        buf->len = 0;
        return;
    }
    buf->base = c->in.base + c->in.len;
    buf->len = c->in.cap - c->in.len;
}

static void on_connect(uv_connect_t *req, int status)
{
    nc_sock *s = req->data;
    kvr_nats_core *c = s->c;
    if (s != c->sock || c->closing)
        return;
    if (status < 0) {
        nc_drop(c, uv_strerror(status));
        return;
    }
    uv_tcp_nodelay(&s->tcp, 1);
    int rc = uv_read_start((uv_stream_t *)&s->tcp, on_alloc, on_read);
    if (rc != 0) {
        nc_drop(c, uv_strerror(rc));
        return;
    }
    c->st = NC_INFO_WAIT;
}

static void start_tcp(kvr_nats_core *c, const struct sockaddr *sa)
{
    nc_sock *s = calloc(1, sizeof *s);
    if (!s) {
        nc_drop(c, "out of memory");
        return;
    }
    s->c = c;
    kvr_buf_init(&s->wbuf);
    uv_tcp_init(c->loop, &s->tcp);
    s->tcp.data = s;
    s->creq.data = s;
    c->handles_open++;
    c->sock = s;
    c->st = NC_TCP;
    int rc = uv_tcp_connect(&s->creq, &s->tcp, sa, on_connect);
    if (rc != 0)
        nc_drop(c, uv_strerror(rc));
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    nc_resolve *r = req->data;
    kvr_nats_core *c = r->c;
    c->resolves_pending--;
    bool current = c->resolve == r && r->gen == c->gen && !c->closing;
    if (current)
        c->resolve = NULL;
    if (current) {
        if (status < 0 || !res) {
            nc_drop(c, status < 0 ? uv_strerror(status) : "no address");
        } else {
            if (res->ai_family == AF_INET)
                ((struct sockaddr_in *)res->ai_addr)->sin_port = htons((uint16_t)r->port);
            else if (res->ai_family == AF_INET6)
                ((struct sockaddr_in6 *)res->ai_addr)->sin6_port = htons((uint16_t)r->port);
            start_tcp(c, res->ai_addr);
        }
    }
    if (res)
        uv_freeaddrinfo(res);
    free(r);
    maybe_finish_close(c);
}

static void nc_attempt(kvr_nats_core *c)
{
    if (c->closing || c->st != NC_IDLE)
        return;
    c->cur_url = c->next_url++ % c->n_urls;
    const nc_url *u = &c->urls[c->cur_url];
    c->gen++;
    uv_timer_start(&c->hs_timer, on_hs_timeout, (uint64_t)c->o.connect_timeout_ms, 0);
    struct sockaddr_in6 sa;
    if (uv_ip4_addr(u->host, u->port, (struct sockaddr_in *)&sa) == 0 ||
        uv_ip6_addr(u->host, u->port, &sa) == 0) {
        start_tcp(c, (const struct sockaddr *)&sa);
        return;
    }
    nc_resolve *r = calloc(1, sizeof *r);
    if (!r) {
        nc_drop(c, "out of memory");
        return;
    }
    r->c = c;
    r->port = u->port;
    r->gen = c->gen;
    r->req.data = r;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    c->st = NC_RESOLVING;
    int rc = uv_getaddrinfo(c->loop, &r->req, on_resolved, u->host, NULL, &hints);
    if (rc != 0) {
        free(r);
        nc_drop(c, uv_strerror(rc));
        return;
    }
    c->resolve = r;
    c->resolves_pending++;
}

/* ---------- protocol: building ---------- */

static int append_sub(kvr_buf *b, const nc_sub *s)
{
    return kvr_buf_appendf(b, "SUB %s%s%s %" PRIu64 "\r\n", s->subject, s->queue ? " " : "",
                           s->queue ? s->queue : "", s->sid);
}

/* CONNECT, PING and every subscription, ahead of what was queued while disconnected. */
static int build_handshake(kvr_nats_core *c, const nc_url *u, kvr_buf *hs)
{
    const char *user = u->user ? u->user : c->user;
    const char *pass = u->user ? u->pass : c->password;
    const char *token = u->token ? u->token : (u->user ? NULL : c->token);
    char pub[KVR_NKEY_PUB_LEN + 1] = "", sig[KVR_NKEY_SIG_LEN + 1] = "";
    if (c->nkey_seed && c->nonce) {
        kvr_err e = {0};
        if (kvr_nkey_sign(c->nkey_seed, c->nonce, strlen(c->nonce), sig, &e) != 0 ||
            (!c->jwt && kvr_nkey_public(c->nkey_seed, pub, &e) != 0)) {
            KVR_LOG_ERROR_RL(5, "nats nkey", "error=\"%s\"", e.msg);
            return KVR_EINVAL;
        }
    }
    int rc = kvr_buf_appendf(hs,
                             "CONNECT {\"verbose\":false,\"pedantic\":false,"
                             "\"tls_required\":%s,\"lang\":\"C\",\"version\":\"kvroute\","
                             "\"protocol\":1,\"echo\":true,\"headers\":true,"
                             "\"no_responders\":true",
                             c->sock && c->sock->ssl ? "true" : "false");
    struct {
        const char *key, *val;
    } f[] = {{"name", c->name},
             {"user", user},
             {"pass", pass},
             {"auth_token", token},
             {"jwt", sig[0] ? c->jwt : NULL},
             {"nkey", pub[0] ? pub : NULL},
             {"sig", sig[0] ? sig : NULL}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
        if (!f[i].val)
            continue;
        rc |= kvr_buf_appendf(hs, ",\"%s\":\"", f[i].key);
        rc |= kvr_json_append_escaped(hs, f[i].val, strlen(f[i].val));
        rc |= kvr_buf_append(hs, "\"", 1);
    }
    rc |= kvr_buf_append_cstr(hs, "}\r\nPING\r\n");
    for (uint64_t i = 0; i < c->n_subs; i++)
        if (c->subs[i])
            rc |= append_sub(hs, c->subs[i]);
    rc |= kvr_buf_append(hs, c->out.base, c->out.len);
    OPENSSL_cleanse(sig, sizeof sig);
    return rc ? KVR_ENOMEM : 0;
}

/* CONNECT goes out ahead of everything queued; the handshake ends at the server's PONG. */
static int send_handshake(kvr_nats_core *c)
{
    kvr_buf hs;
    kvr_buf_init(&hs);
    int rc = build_handshake(c, &c->urls[c->cur_url], &hs);
    if (rc != 0) {
        kvr_buf_free(&hs);
        return rc;
    }
    kvr_buf_free(&c->out);
    c->out = hs;
    c->st = NC_HANDSHAKE;
    nc_flush(c);
    return 0;
}

/* ---------- protocol: parsing ---------- */

/* Splits a control line's arguments at spaces/tabs. Returns the count, at most max. */
static int split_args(const char *p, const char *end, kvr_slice *out, int max)
{
    int n = 0;
    while (p < end) {
        while (p < end && (*p == ' ' || *p == '\t'))
            p++;
        if (p >= end)
            break;
        const char *s = p;
        while (p < end && *p != ' ' && *p != '\t')
            p++;
        if (n == max)
            return max + 1;
        out[n++] = (kvr_slice){s, (size_t)(p - s)};
    }
    return n;
}

static bool parse_u64(kvr_slice s, uint64_t *out)
{
    if (s.len == 0 || s.len > 19)
        return false;
    uint64_t v = 0;
    for (size_t i = 0; i < s.len; i++) {
        if (s.base[i] < '0' || s.base[i] > '9')
            return false;
        v = v * 10 + (uint64_t)(s.base[i] - '0');
    }
    *out = v;
    return true;
}

static bool op_is(const char *line, size_t len, const char *op)
{
    size_t n = strlen(op);
    if (len < n || strncasecmp(line, op, n) != 0)
        return false;
    return len == n || line[n] == ' ' || line[n] == '\t';
}

/* A server of the cluster named in INFO connect_urls joins the pool, with the credentials and
 * TLS name of the URL it was learned from (cnats does the same for implicit servers). */
static void add_discovered(kvr_nats_core *c, const char *hostport)
{
    if (c->n_urls >= NC_MAX_SERVERS || strchr(hostport, '@') || strstr(hostport, "://"))
        return;
    nc_url d;
    if (parse_one_url(hostport, strlen(hostport), &d, NULL) != 0)
        return;
    for (int i = 0; i < c->n_urls; i++)
        if (c->urls[i].port == d.port && !strcmp(c->urls[i].host, d.host))
            return;
    const nc_url *from = &c->urls[c->cur_url];
    d.user = from->user ? strdup(from->user) : NULL;
    d.pass = from->pass ? strdup(from->pass) : NULL;
    d.token = from->token ? strdup(from->token) : NULL;
    if ((from->user && !d.user) || (from->pass && !d.pass) || (from->token && !d.token)) {
        free(d.user);
        kvr_nkey_wipe(d.pass);
        kvr_nkey_wipe(d.token);
        return;
    }
    d.tls = from->tls;
    memcpy(d.tls_name, from->tls_name, sizeof d.tls_name);
    d.discovered = true;
    c->urls[c->n_urls++] = d;
    KVR_LOG_INFO("nats server discovered", "server=%s:%d servers=%d", d.host, d.port, c->n_urls);
}

/* INFO: max_payload, the nonce to sign, the cluster's other servers, and TLS: it starts here
 * when configured or when the server requires it. Returns NULL or why the connection must be
 * dropped. */
static const char *handle_info(kvr_nats_core *c, const char *json, size_t len)
{
    cJSON *j = cJSON_ParseWithLength(json, len);
    if (!j)
        return "malformed INFO";
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, "max_payload");
    if (cJSON_IsNumber(v) && v->valuedouble > 0 && v->valuedouble < (double)((uint64_t)1 << 40))
        c->max_payload = (size_t)v->valuedouble;
    const cJSON *urls = cJSON_GetObjectItemCaseSensitive(j, "connect_urls");
    const cJSON *it;
    cJSON_ArrayForEach(it, urls)
    {
        if (cJSON_IsString(it))
            add_discovered(c, it->valuestring);
    }
    bool tls_req = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "tls_required"));
    const cJSON *nonce = cJSON_GetObjectItemCaseSensitive(j, "nonce");
    const char *why = NULL;
    if (c->st != NC_INFO_WAIT)
        goto out; /* an update (cluster topology) */
    free(c->nonce);
    c->nonce = cJSON_IsString(nonce) ? strdup(nonce->valuestring) : NULL;
    if (c->nkey_seed && !c->nonce) {
        why = "server sent no nonce for NKEY authentication";
        goto out;
    }
    const nc_url *u = &c->urls[c->cur_url];
    if (tls_req || u->tls || c->ssl_ctx) {
        if (!c->ssl_ctx) {
            KVR_LOG_ERROR_RL(5, "nats server requires TLS: configure the TLS options",
                             "server=%s:%d", u->host, u->port);
            why = "server requires TLS";
        } else if (tls_start(c, u) != 0) {
            why = "tls: could not start the handshake";
        } else {
            nc_flush(c); /* ClientHello */
        }
        goto out;
    }
    if (send_handshake(c) != 0)
        why = "could not build CONNECT";
out:
    cJSON_Delete(j);
    return why;
}

static void handle_pong(kvr_nats_core *c)
{
    c->pings_out = 0;
    if (c->st != NC_HANDSHAKE)
        return;
    c->st = NC_UP;
    c->attempts = 0;
    uv_timer_stop(&c->hs_timer);
    bool first = !c->ever_up;
    c->ever_up = true;
    KVR_LOG_INFO(first ? "nats connected" : "nats reconnected", "server=%s:%d tls=%s",
                 c->urls[c->cur_url].host, c->urls[c->cur_url].port,
                 c->sock && c->sock->ssl ? "yes" : "no");
    if (c->o.on_event)
        c->o.on_event(c->o.cb_data, first ? KVR_NATS_CORE_CONNECTED : KVR_NATS_CORE_RECONNECTED);
}

/* "NATS/1.0 503 ..." → 503; "NATS/1.0" → 0. */
static int header_status(const char *h, size_t len)
{
    if (len < 8 || memcmp(h, "NATS/1.0", 8) != 0)
        return 0;
    size_t i = 8;
    while (i < len && h[i] == ' ')
        i++;
    int v = 0, digits = 0;
    while (i < len && h[i] >= '0' && h[i] <= '9' && digits < 4)
        v = v * 10 + (h[i++] - '0'), digits++;
    return digits == 3 && v >= 100 ? v : 0;
}

/* Parses every complete operation in c->in. Returns false when the connection was dropped or
 * closed meanwhile (c->in then no longer holds what it did). */
static bool parse(kvr_nats_core *c)
{
    size_t off = 0;
    nc_sock *sock = c->sock;
    const char *why = NULL;
    while (off < c->in.len) {
        const char *line = c->in.base + off;
        size_t avail = c->in.len - off;
        const char *eol = memmem(line, avail, "\r\n", 2);
        if (!eol) {
            if (avail > NC_LINE_MAX)
                why = "protocol line too long";
            break;
        }
        size_t ll = (size_t)(eol - line);
        if (op_is(line, ll, "MSG") || op_is(line, ll, "HMSG")) {
            bool hmsg = line[0] == 'H' || line[0] == 'h';
            kvr_slice a[6];
            int n = split_args(line + (hmsg ? 4 : 3), eol, a, 5);
            uint64_t sid, hdr = 0, total;
            int want = hmsg ? 4 : 3;
            if (n != want && n != want + 1) {
                why = "malformed MSG";
                break;
            }
            kvr_slice reply = n == want + 1 ? a[2] : (kvr_slice){NULL, 0};
            if (!parse_u64(a[1], &sid) || !parse_u64(a[n - 1], &total) ||
                (hmsg && (!parse_u64(a[n - 2], &hdr) || hdr > total))) {
                why = "malformed MSG";
                break;
            }
            if (total > c->max_payload + NC_HDR_SLACK) {
                why = "message over max_payload";
                break;
            }
            size_t need = ll + 2 + (size_t)total + 2;
            if (avail < need)
                break;
            const char *payload = eol + 2;
            if (payload[total] != '\r' || payload[total + 1] != '\n') {
                why = "message not terminated by CRLF";
                break;
            }
            off += need;
            nc_sub *s = sid >= 1 && sid <= c->n_subs ? c->subs[sid - 1] : NULL;
            if (!s)
                continue; /* unsubscribed meanwhile */
            kvr_nats_core_msg m = {
                .subject = a[0],
                .reply = reply,
                .data = {payload + hdr, (size_t)(total - hdr)},
                .status = hmsg ? header_status(payload, (size_t)hdr) : 0,
            };
            c->o.on_msg(c->o.cb_data, s->data, &m);
        } else if (op_is(line, ll, "PING")) {
            off += ll + 2;
            kvr_buf_append(&c->out, "PONG\r\n", 6);
        } else if (op_is(line, ll, "PONG")) {
            off += ll + 2;
            handle_pong(c);
        } else if (op_is(line, ll, "+OK")) {
            off += ll + 2;
        } else if (op_is(line, ll, "-ERR")) {
            KVR_LOG_WARN_RL(5, "nats server error", "error=\"%.*s\"",
                            (int)(ll - 4 > 200 ? 200 : ll - 4), line + 4);
            off += ll + 2;
            /* the server closes the connection after a fatal error; a permissions error on
             * one subject is not fatal */
        } else if (op_is(line, ll, "INFO")) {
            off += ll + 2;
            why = handle_info(c, line + 4, ll - 4);
            if (why)
                break;
        } else {
            why = "unknown protocol operation";
            break;
        }
        if (c->closing || c->sock != sock)
            return false;
    }
    if (why) {
        KVR_LOG_WARN_RL(5, "nats protocol error", "reason=\"%s\"", why);
        nc_drop(c, why);
        return false;
    }
    kvr_buf_consume(&c->in, off);
    return true;
}

/* Feeds n record bytes from s->raw to OpenSSL: finishes the handshake (then CONNECT), and
 * appends what decrypts to c->in. Returns 0, or -1 after dropping the connection. */
static int tls_read(kvr_nats_core *c, nc_sock *s, size_t n)
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
        if (send_handshake(c) != 0) {
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

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    nc_sock *s = st->data;
    kvr_nats_core *c = s->c;
    if (s != c->sock || c->closing)
        return;
    if (nread < 0) {
        nc_drop(c, nread == UV_EOF ? "closed by server" : uv_strerror((int)nread));
        return;
    }
    if (s->ssl && buf->base == s->raw) {
        if (tls_read(c, s, (size_t)nread) != 0)
            return;
        if (parse(c))
            nc_flush(c); /* TLS answers (tickets, key updates) and what parse queued */
        return;
    }
    c->in.len += (size_t)nread;
    if (parse(c) && c->out.len >= NC_FLUSH_AT)
        nc_flush(c);
}

/* ---------- public API ---------- */

int kvr_nats_core_init(kvr_nats_core **out, uv_loop_t *loop, const kvr_nats_core_opts *o,
                       kvr_err *err)
{
    *out = NULL;
    if (!o || !o->urls || !*o->urls || !o->on_msg)
        return kvr_err_set(err, KVR_EINVAL, "nats: urls and on_msg are required");
    kvr_nats_core *c = calloc(1, sizeof *c);
    if (!c)
        return kvr_err_set(err, KVR_ENOMEM, "nats: out of memory");
    c->loop = loop;
    c->o = *o;
    c->o.urls = NULL;
    c->o.connect_timeout_ms = o->connect_timeout_ms > 0 ? o->connect_timeout_ms : 2000;
    c->o.reconnect_wait_ms = o->reconnect_wait_ms > 0 ? o->reconnect_wait_ms : 100;
    c->o.max_reconnect_wait_ms = o->max_reconnect_wait_ms > 0 ? o->max_reconnect_wait_ms : 2000;
    if (c->o.max_reconnect_wait_ms < c->o.reconnect_wait_ms)
        c->o.max_reconnect_wait_ms = c->o.reconnect_wait_ms;
    c->o.ping_interval_ms = o->ping_interval_ms > 0 ? o->ping_interval_ms : 2000;
    c->o.max_pings_out = o->max_pings_out > 0 ? o->max_pings_out : 3;
    c->o.pending_max = o->pending_max ? o->pending_max : (8u << 20);
    c->o.out_max = o->out_max ? o->out_max : (64u << 20);
    c->max_payload = NC_DEFAULT_MAX_PAYLOAD;
    c->rng = (uint64_t)getpid() * 0x9E3779B97F4A7C15ull ^ (uint64_t)time(NULL) ^ (uintptr_t)c;
    if (!c->rng)
        c->rng = 1;
    kvr_buf_init(&c->in);
    kvr_buf_init(&c->out);
    c->name = dup_or_null(o->name);
    c->user = dup_or_null(o->user);
    c->password = dup_or_null(o->password);
    c->token = dup_or_null(o->token);
    c->nkey_seed = dup_or_null(o->nkey_seed);
    c->jwt = dup_or_null(o->jwt);
    c->o.name = c->o.user = c->o.password = c->o.token = c->o.nkey_seed = c->o.jwt = NULL;
    c->o.tls_ca_file = c->o.tls_cert_file = c->o.tls_key_file = NULL;
    if ((o->name && !c->name) || (o->user && !c->user) || (o->password && !c->password) ||
        (o->token && !c->token) || (o->nkey_seed && !c->nkey_seed) || (o->jwt && !c->jwt)) {
        free_core(c);
        return kvr_err_set(err, KVR_ENOMEM, "nats: out of memory");
    }
    int rc = parse_urls(c, o->urls, err);
    if (rc == 0 && c->jwt && !c->nkey_seed)
        rc = kvr_err_set(err, KVR_EINVAL, "nats: a user JWT needs its NKEY seed (creds)");
    if (rc == 0 && c->nkey_seed) {
        char pub[KVR_NKEY_PUB_LEN + 1];
        rc = kvr_nkey_public(c->nkey_seed, pub, err); /* a bad seed fails here, not per attempt */
    }
    bool tls = o->tls || o->tls_ca_file || o->tls_cert_file || o->tls_key_file;
    for (int i = 0; i < c->n_urls; i++)
        tls |= c->urls[i].tls;
    if (rc == 0 && tls)
        rc = tls_ctx_init(c, o, err);
    if (rc != 0) {
        free_core(c);
        return rc;
    }
    uv_timer_init(loop, &c->retry_timer);
    uv_timer_init(loop, &c->ping_timer);
    uv_timer_init(loop, &c->hs_timer);
    uv_prepare_init(loop, &c->flush_prep);
    uv_check_init(loop, &c->flush_check);
    c->retry_timer.data = c->ping_timer.data = c->hs_timer.data = c->flush_prep.data = c;
    c->flush_check.data = c;
    c->handles_open = 5;
    uv_prepare_start(&c->flush_prep, on_prepare);
    uv_check_start(&c->flush_check, on_check);
    /* they must not keep the loop alive on their own */
    uv_unref((uv_handle_t *)&c->flush_prep);
    uv_unref((uv_handle_t *)&c->flush_check);
    uv_timer_start(&c->ping_timer, on_ping, (uint64_t)c->o.ping_interval_ms,
                   (uint64_t)c->o.ping_interval_ms);
    uv_timer_start(&c->retry_timer, on_retry, 0, 0);
    *out = c;
    return 0;
}

int kvr_nats_core_subscribe(kvr_nats_core *c, const char *subject, const char *queue,
                            void *sub_data, uint64_t *sid)
{
    if (c->closing)
        return KVR_ECLOSED;
    if (!kvr_nats_core_valid_token(subject) ||
        (queue && *queue && !kvr_nats_core_valid_token(queue)))
        return KVR_EINVAL;
    nc_sub **ns = realloc(c->subs, (size_t)(c->n_subs + 1) * sizeof *ns);
    if (!ns)
        return KVR_ENOMEM;
    c->subs = ns;
    nc_sub *s = calloc(1, sizeof *s);
    if (!s)
        return KVR_ENOMEM;
    s->subject = strdup(subject);
    s->queue = queue && *queue ? strdup(queue) : NULL;
    if (!s->subject || (queue && *queue && !s->queue)) {
        free(s->subject);
        free(s->queue);
        free(s);
        return KVR_ENOMEM;
    }
    s->data = sub_data;
    s->sid = c->n_subs + 1;
    c->subs[c->n_subs++] = s;
    /* before the handshake, the handshake itself sends every subscription */
    if (c->st >= NC_HANDSHAKE && append_sub(&c->out, s) != 0) {
        c->subs[--c->n_subs] = NULL;
        free(s->subject);
        free(s->queue);
        free(s);
        return KVR_ENOMEM;
    }
    if (sid)
        *sid = s->sid;
    return 0;
}

int kvr_nats_core_unsubscribe(kvr_nats_core *c, uint64_t sid)
{
    if (sid < 1 || sid > c->n_subs || !c->subs[sid - 1])
        return 0;
    nc_sub *s = c->subs[sid - 1];
    c->subs[sid - 1] = NULL;
    if (!c->closing && c->st >= NC_HANDSHAKE)
        kvr_buf_appendf(&c->out, "UNSUB %" PRIu64 "\r\n", sid);
    free(s->subject);
    free(s->queue);
    free(s);
    return 0;
}

int kvr_nats_core_publish(kvr_nats_core *c, const char *subject, const char *reply,
                          const void *data, size_t len)
{
    if (c->closing)
        return KVR_ECLOSED;
    if (!kvr_nats_core_valid_token(subject) || (reply && !kvr_nats_core_valid_token(reply)))
        return KVR_EINVAL;
    if (len > c->max_payload)
        return KVR_ELIMIT;
    size_t sl = strlen(subject), rl = reply ? strlen(reply) : 0;
    size_t frame = 4 + sl + 1 + rl + 1 + 20 + 2 + len + 2;
    size_t cap = c->st == NC_UP || c->st == NC_HANDSHAKE ? c->o.out_max : c->o.pending_max;
    if (c->out.len + frame > cap)
        return KVR_EAGAIN;
    if (kvr_buf_reserve(&c->out, frame) != 0)
        return KVR_ENOMEM;
    char *p = c->out.base + c->out.len;
    memcpy(p, "PUB ", 4);
    p += 4;
    memcpy(p, subject, sl);
    p += sl;
    *p++ = ' ';
    if (rl) {
        memcpy(p, reply, rl);
        p += rl;
        *p++ = ' ';
    }
    char num[24];
    int nl = snprintf(num, sizeof num, "%zu\r\n", len);
    memcpy(p, num, (size_t)nl);
    p += nl;
    if (len)
        memcpy(p, data, len);
    p += len;
    *p++ = '\r';
    *p++ = '\n';
    c->out.len = (size_t)(p - c->out.base);
    if (c->out.len >= NC_FLUSH_AT)
        nc_flush(c);
    return 0;
}

int kvr_nats_core_feed(kvr_nats_core *c, const void *data, size_t len)
{
    if (c->closing)
        return KVR_ECLOSED;
    if (c->st < NC_INFO_WAIT) {
        uv_timer_stop(&c->retry_timer);
        uv_timer_stop(&c->hs_timer);
        c->st = NC_INFO_WAIT;
    }
    if (kvr_buf_append(&c->in, data, len) != 0)
        return KVR_ENOMEM;
    if (parse(c))
        return 0;
    return c->closing ? KVR_ECLOSED : KVR_EINVAL;
}

bool kvr_nats_core_connected(const kvr_nats_core *c)
{
    return c && c->st == NC_UP;
}

void kvr_nats_core_close(kvr_nats_core *c, void (*close_cb)(void *data), void *data)
{
    if (c->closing)
        return;
    c->closing = true;
    c->close_cb = close_cb;
    c->close_data = data;
    /* best effort: what was published just before closing */
    if (c->sock && !c->sock->writing && c->st >= NC_HANDSHAKE && c->out.len) {
        uv_buf_t b = uv_buf_init(c->out.base, (unsigned)c->out.len);
        uv_try_write((uv_stream_t *)&c->sock->tcp, &b, 1);
    }
    sock_close(c);
    if (c->resolve) {
        uv_cancel((uv_req_t *)&c->resolve->req);
        c->resolve = NULL;
    }
    c->st = NC_IDLE;
    uv_close((uv_handle_t *)&c->retry_timer, handle_closed);
    uv_close((uv_handle_t *)&c->ping_timer, handle_closed);
    uv_close((uv_handle_t *)&c->hs_timer, handle_closed);
    uv_close((uv_handle_t *)&c->flush_prep, handle_closed);
    uv_close((uv_handle_t *)&c->flush_check, handle_closed);
}
