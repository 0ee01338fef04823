/* kvr_nats_core_proto.c: the NATS client protocol for kvr_nats_core.h: CONNECT/SUB building
 * and the parser of what the server sends (INFO, MSG, HMSG, PING, PONG, +OK, -ERR), bounded
 * line and payload sizes; the read callback feeds it. Shared state: kvr_nats_core_int.h. */
#define _GNU_SOURCE /* memmem, memrchr */
#include "kvr_nats_core_int.h"

#include "kvr_log.h"
#include "kvr_json.h"
#include "kvr_nkey.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------- protocol: building ---------- */

int nc_append_sub(kvr_buf *b, const nc_sub *s)
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
        if (c->subs[i] && !c->subs[i]->drain_at)
            rc |= nc_append_sub(hs, c->subs[i]);
    rc |= kvr_buf_append(hs, c->out.base, c->out.len);
    OPENSSL_cleanse(sig, sizeof sig);
    return rc ? KVR_ENOMEM : 0;
}

/* CONNECT goes out ahead of everything queued; the handshake ends at the server's PONG. */
int nc_send_handshake(kvr_nats_core *c)
{
    /* the server forgot the old connection's subscriptions: a drain in progress is over */
    nc_end_drains(c, true);
    c->ping_seq = 1; /* the handshake's own PING */
    c->pong_seq = 0;
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
    if (nc_parse_one_url(hostport, strlen(hostport), &d, NULL) != 0)
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
        } else if (nc_tls_start(c, u) != 0) {
            why = "tls: could not start the handshake";
        } else {
            nc_flush(c); /* ClientHello */
        }
        goto out;
    }
    if (nc_send_handshake(c) != 0)
        why = "could not build CONNECT";
out:
    cJSON_Delete(j);
    return why;
}

/* -ERR 'Permissions Violation for Publish to "subject"': tell the owner which subject. */
static void handle_err(kvr_nats_core *c, const char *text, size_t len)
{
    static const char pfx[] = "'Permissions Violation for Publish to \"";
    while (len && *text == ' ')
        text++, len--;
    if (!c->o.on_pub_denied || len < sizeof pfx - 1 + 2 || memcmp(text, pfx, sizeof pfx - 1))
        return;
    const char *subj = text + sizeof pfx - 1;
    const char *end = memchr(subj, '"', len - (sizeof pfx - 1));
    if (!end || end == subj)
        return;
    for (const char *p = subj; p < end; p++)
        if ((unsigned char)*p <= ' ' || *p == 0x7f)
            return; /* no subject has spaces or control bytes: not the server's message */
    c->o.on_pub_denied(c->o.cb_data, subj, (size_t)(end - subj));
}

static void handle_pong(kvr_nats_core *c)
{
    c->pings_out = 0;
    c->pong_seq++;
    if (c->n_draining)
        nc_end_drains(c, false);
    if (c->st == NC_UP && c->o.on_pong) {
        c->o.on_pong(c->o.cb_data, c->pong_seq);
        return;
    }
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
bool nc_parse(kvr_nats_core *c)
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
            handle_err(c, line + 4, ll - 4);
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

void nc_on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
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
        if (nc_tls_read(c, s, (size_t)nread) != 0)
            return;
        if (nc_parse(c))
            nc_flush(c); /* TLS answers (tickets, key updates) and what nc_parse queued */
        return;
    }
    c->in.len += (size_t)nread;
    if (nc_parse(c) && c->out.len >= NC_FLUSH_AT)
        nc_flush(c);
}
