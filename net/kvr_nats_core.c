/* kvr_nats_core: see kvr_nats_core.h.
 *
 * This file: options and server URLs, handles and close, writing, the connection lifecycle
 * (resolve, connect, handshake timeout, ping, backoff) and the public API. TLS is
 * kvr_nats_core_tls.c, the protocol kvr_nats_core_proto.c, shared state kvr_nats_core_int.h. */
#define _GNU_SOURCE /* memmem, memrchr */
#include "kvr_nats_core_int.h"

#include "kvr_log.h"
#include "kvr_nkey.h"

#include <inttypes.h>
#include <openssl/err.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void nc_attempt(kvr_nats_core *c);

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

int nc_parse_one_url(const char *s, size_t len, nc_url *u, kvr_err *err)
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
        int rc = nc_parse_one_url(p, len, &c->urls[c->n_urls], err);
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
void nc_flush(kvr_nats_core *c)
{
    nc_sock *s = c->sock;
    if (!s || s->writing)
        return;
    kvr_buf *src = &c->out;
    if (s->ssl) {
        /* TLS: frames become records only when the socket can take them, so out stays the
         * bounded queue; handshake records (before CONNECT) go out in any state */
        if (nc_tls_encrypt(c, s) != 0)
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
void nc_drop(kvr_nats_core *c, const char *why)
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
    nc_end_drains(c, true); /* the server forgets the connection's subscriptions */
    if (was_up && c->o.on_event && !c->closing)
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
    c->ping_seq++;
    kvr_buf_append(&c->out, "PING\r\n", 6);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)hint;
    nc_sock *s = h->data;
    kvr_nats_core *c = s->c;
    if (s->raw) { /* TLS: records, decrypted in nc_on_read */
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
    int rc = uv_read_start((uv_stream_t *)&s->tcp, on_alloc, nc_on_read);
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
        rc = nc_tls_ctx_init(c, o, err);
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
    uv_prepare_start(&c->flush_prep, nc_on_prepare);
    uv_check_start(&c->flush_check, nc_on_check);
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
    if (c->st >= NC_HANDSHAKE && nc_append_sub(&c->out, s) != 0) {
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
    if (s->drain_at)
        c->n_draining--; /* its UNSUB is out already */
    else if (!c->closing && c->st >= NC_HANDSHAKE)
        kvr_buf_appendf(&c->out, "UNSUB %" PRIu64 "\r\n", sid);
    free(s->subject);
    free(s->queue);
    free(s);
    return 0;
}

int kvr_nats_core_drain(kvr_nats_core *c, uint64_t sid)
{
    if (sid < 1 || sid > c->n_subs || !c->subs[sid - 1] || c->subs[sid - 1]->drain_at)
        return KVR_ENOTFOUND;
    if (c->closing || c->st != NC_UP) {
        kvr_nats_core_unsubscribe(c, sid);
        return 1;
    }
    nc_sub *s = c->subs[sid - 1];
    if (kvr_buf_appendf(&c->out, "UNSUB %" PRIu64 "\r\nPING\r\n", sid) != 0)
        return KVR_ENOMEM;
    s->drain_at = ++c->ping_seq;
    c->n_draining++;
    return 0;
}

void nc_end_drains(kvr_nats_core *c, bool all)
{
    for (uint64_t i = 0; i < c->n_subs && c->n_draining; i++) {
        nc_sub *s = c->subs[i];
        if (!s || !s->drain_at || (!all && s->drain_at > c->pong_seq))
            continue;
        c->subs[i] = NULL;
        c->n_draining--;
        void *data = s->data;
        free(s->subject);
        free(s->queue);
        free(s);
        if (c->o.on_drained)
            c->o.on_drained(c->o.cb_data, data);
    }
}

uint64_t kvr_nats_core_ping(kvr_nats_core *c)
{
    if (c->closing || c->st != NC_UP || kvr_buf_append(&c->out, "PING\r\n", 6) != 0)
        return 0;
    return ++c->ping_seq;
}

int kvr_nats_core_publish(kvr_nats_core *c, const char *subject, const char *reply,
                          const void *data, size_t len)
{
    return kvr_nats_core_hpublish(c, subject, reply, NULL, 0, data, len);
}

/* Writes v in decimal at p (at most 20 digits); returns the end. */
static char *put_size(char *p, size_t v)
{
    char t[24];
    int n = 0;
    do {
        t[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = t[--n];
    return p;
}

int kvr_nats_core_hpublish(kvr_nats_core *c, const char *subject, const char *reply,
                           const void *hdr, size_t hlen, const void *data, size_t len)
{
    if (c->closing)
        return KVR_ECLOSED;
    if (!kvr_nats_core_valid_token(subject) || (reply && !kvr_nats_core_valid_token(reply)))
        return KVR_EINVAL;
    if (hlen > NC_HDR_MAX || (hlen && hlen < 12))
        return KVR_EINVAL;
    if (len > c->max_payload || hlen + len > c->max_payload)
        return KVR_ELIMIT;
    size_t sl = strlen(subject), rl = reply ? strlen(reply) : 0;
    size_t frame = 5 + sl + 1 + rl + 1 + 42 + 2 + hlen + len + 2;
    size_t cap = c->st == NC_UP || c->st == NC_HANDSHAKE ? c->o.out_max : c->o.pending_max;
    if (c->out.len + frame > cap)
        return KVR_EAGAIN;
    if (kvr_buf_reserve(&c->out, frame) != 0)
        return KVR_ENOMEM;
    char *p = c->out.base + c->out.len;
    if (hlen) {
        memcpy(p, "HPUB ", 5);
        p += 5;
    } else {
        memcpy(p, "PUB ", 4);
        p += 4;
    }
    memcpy(p, subject, sl);
    p += sl;
    *p++ = ' ';
    if (rl) {
        memcpy(p, reply, rl);
        p += rl;
        *p++ = ' ';
    }
    /* the sizes by hand: snprintf was ~1% of a router's CPU under kvr-bench raft */
    if (hlen) {
        p = put_size(p, hlen);
        *p++ = ' ';
        p = put_size(p, hlen + len);
    } else {
        p = put_size(p, len);
    }
    *p++ = '\r';
    *p++ = '\n';
    if (hlen)
        memcpy(p, hdr, hlen);
    p += hlen;
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
    if (nc_parse(c))
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
