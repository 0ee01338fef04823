/* kvr_nats: see kvr_nats.h. Core traffic on the loop-native client (kvr_nats_core.h),
 * JetStream on cnats.
 *
 * This file: the core connection, requests, init, subscriptions, publishes, close. The queue
 * from cnats' threads is kvr_nats_queue.c, JetStream kvr_nats_js.c, shared state
 * kvr_nats_int.h. */
#include "kvr_nats_int.h"

#include "kvr_log.h"
#include "kvr_nkey.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---------- the core connection ---------- */

/* msg_id (may be NULL): sent as the Nats-Msg-Id header, JetStream's de-duplication key. */
static int pub_hdr(kvr_nats_impl *ki, const char *subject, const char *reply, const char *msg_id,
                   const void *data, size_t len)
{
    if (!msg_id)
        return kvr_nats_core_publish(ki->core, subject, reply, data, len);
    char hdr[320];
    int hl = snprintf(hdr, sizeof hdr, "NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n", msg_id);
    if (hl < 0 || (size_t)hl >= sizeof hdr)
        return KVR_EINVAL;
    return kvr_nats_core_hpublish(ki->core, subject, reply, hdr, (size_t)hl, data, len);
}

/* Core client callbacks, on the loop thread. The slices point into the read buffer; subject
 * and reply are copied to NUL-terminated strings (the API promises C strings), the payload is
 * passed as it is. */
static void core_on_msg(void *cb_data, void *sub_data, const kvr_nats_core_msg *cm)
{
    kvr_nats_impl *ki = cb_data;
    kvr_nats_sub *sub = sub_data;
    char subject[KN_SUBJECT_MAX + 1], reply[KN_SUBJECT_MAX + 1];
    if (sub->dead || ki->closing)
        return;
    if (cm->subject.len > KN_SUBJECT_MAX || cm->reply.len > KN_SUBJECT_MAX)
        return;
    memcpy(subject, cm->subject.base, cm->subject.len);
    subject[cm->subject.len] = 0;
    if (sub->is_inbox) {
        /* a no-responders status is a 503 header with no payload */
        kn_inbox_msg(ki, subject, cm->status == 503 && cm->data.len == 0, cm->data.base,
                     cm->data.len);
        return;
    }
    if (cm->reply.len)
        memcpy(reply, cm->reply.base, cm->reply.len);
    reply[cm->reply.len] = 0;
    kvr_nats_msg m = {subject, cm->reply.len ? reply : NULL, cm->data.base, cm->data.len, 0, 0};
    ki->stats.msgs_in++;
    ki->stats.bytes_in += m.len;
    sub->cb(&m, sub->data);
}

static void core_on_drained(void *cb_data, void *sub_data)
{
    (void)cb_data;
    kvr_nats_sub *sub = sub_data;
    sub->dead = true;
    sub->sid = 0;
    if (sub->drained_cb)
        sub->drained_cb(sub->drained_data);
}

static void core_on_pub_denied(void *cb_data, const char *subject, size_t len)
{
    kn_fallback_denied(cb_data, subject, len);
}

static void core_on_pong(void *cb_data, uint64_t pong_seq)
{
    kn_fallback_pong(cb_data, pong_seq);
}

static void core_on_event(void *cb_data, kvr_nats_core_event ev)
{
    kvr_nats_impl *ki = cb_data;
    kvr_nats_state st = ev == KVR_NATS_CORE_CONNECTED     ? KVR_NATS_CONNECTED
                        : ev == KVR_NATS_CORE_RECONNECTED ? KVR_NATS_RECONNECTED
                                                          : KVR_NATS_DISCONNECTED;
    atomic_store(&ki->connected, st != KVR_NATS_DISCONNECTED);
    if (st == KVR_NATS_DISCONNECTED)
        kn_fallback_reset(ki); /* its PINGs and 503s are gone with the connection */
    if (st == KVR_NATS_RECONNECTED)
        ki->stats.reconnects++;
    ki->core_up = st != KVR_NATS_DISCONNECTED;
    if (ki->on_state && !ki->closing)
        ki->on_state(ki->kn, st, ki->state_data);
    if (ki->core_up)
        kn_consumers_core_up(ki);
}

/* ---------- requests ---------- */

static kn_req **req_slot(kvr_nats_impl *ki, uint64_t id)
{
    kn_req **pp = &ki->req_buckets[id & (KN_REQ_BUCKETS - 1)];
    while (*pp && (*pp)->id != id)
        pp = &(*pp)->next;
    return pp;
}

static void req_timer_closed(uv_handle_t *h)
{
    free(h->data);
}

static void req_finish(kn_req *r, int status, const char *data, size_t len)
{
    kvr_nats_impl *ki = r->ki;
    kn_req **pp = req_slot(ki, r->id);
    if (*pp == r)
        *pp = r->next;
    uv_timer_stop(&r->timer);
    uv_close((uv_handle_t *)&r->timer, req_timer_closed);
    if (status == KVR_ETIMEDOUT)
        ki->stats.request_timeouts++;
    else if (status == KVR_NATS_NO_RESPONDERS)
        ki->stats.request_no_responders++;
    r->cb(status, status == 0 ? data : NULL, status == 0 ? len : 0, r->cbdata);
}

static void req_timeout(uv_timer_t *t)
{
    req_finish(t->data, KVR_ETIMEDOUT, NULL, 0);
}

void kn_inbox_msg(kvr_nats_impl *ki, const char *subject, bool no_responders, const char *data,
                  size_t len)
{
    const char *dot = strrchr(subject, '.');
    if (!dot)
        return;
    if (dot[1] == 'f') {
        kn_fallback_msg(ki, dot + 2, no_responders);
        return;
    }
    char *end = NULL;
    errno = 0;
    unsigned long long id = strtoull(dot + 1, &end, 10);
    if (errno || !end || *end)
        return;
    kn_req **pp = req_slot(ki, id);
    if (!*pp)
        return; /* late reply after a timeout */
    if (no_responders)
        req_finish(*pp, KVR_NATS_NO_RESPONDERS, NULL, 0);
    else
        req_finish(*pp, 0, data, len);
}

int kn_request_hdr(kvr_nats *kn, const char *subject, const char *msg_id, const void *data,
                   size_t len, uint32_t timeout_ms, kvr_nats_reply_cb cb, void *cbdata)
{
    kvr_nats_impl *ki = kn->impl;
    if (!ki || ki->closing)
        return KVR_ECLOSED;
    if (!subject || !*subject || !cb || len > INT32_MAX)
        return KVR_EINVAL;
    kn_req *r = calloc(1, sizeof(*r));
    if (!r)
        return KVR_ENOMEM;
    r->id = ++ki->next_req_id;
    r->ki = ki;
    r->cb = cb;
    r->cbdata = cbdata;
    char reply[sizeof(ki->inbox) + 24];
    snprintf(reply, sizeof(reply), "%s.%" PRIu64, ki->inbox, r->id);
    int rc = pub_hdr(ki, subject, reply, msg_id, data, len);
    if (rc != 0) {
        free(r);
        return rc;
    }
    uv_timer_init(ki->loop, &r->timer);
    r->timer.data = r;
    uv_timer_start(&r->timer, req_timeout, timeout_ms ? timeout_ms : 1, 0);
    kn_req **pp = &ki->req_buckets[r->id & (KN_REQ_BUCKETS - 1)];
    r->next = *pp;
    *pp = r;
    ki->stats.requests++;
    ki->stats.msgs_out++;
    ki->stats.bytes_out += len;
    return 0;
}

int kvr_nats_request(kvr_nats *kn, const char *subject, const void *data, size_t len,
                     uint32_t timeout_ms, kvr_nats_reply_cb cb, void *cbdata)
{
    return kn_request_hdr(kn, subject, NULL, data, len, timeout_ms, cb, cbdata);
}

/* ---------- inbox prefixes ---------- */

/* Dot-separated tokens of [A-Za-z0-9_-]: no wildcard, no empty token, no space (a subject
 * with one would split the protocol line). */
static bool inbox_prefix_valid(const char *p)
{
    size_t n = strlen(p), tok = 0;
    if (n == 0 || n > KVR_NATS_INBOX_PREFIX_MAX)
        return false;
    for (size_t i = 0; i <= n; i++) {
        char c = p[i];
        if (c == '.' || c == '\0') {
            if (tok == 0)
                return false;
            tok = 0;
        } else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                   c == '_' || c == '-') {
            tok++;
        } else {
            return false;
        }
    }
    return true;
}

const char *kvr_nats_role_inbox(char *out, size_t cap, const char *role, const char *ns,
                                uint64_t id)
{
    int n;
    if (ns && *ns && id)
        n = snprintf(out, cap, "_INBOX.%s.%s.%" PRIu64, role, ns, id);
    else if (id)
        n = snprintf(out, cap, "_INBOX.%s.%" PRIu64, role, id);
    else
        n = snprintf(out, cap, "_INBOX.%s", role);
    if (n < 0 || (size_t)n >= cap || !inbox_prefix_valid(out) || (ns && *ns && strchr(ns, '.')))
        return NULL;
    return out;
}

/* ---------- core API ---------- */

int kvr_nats_init(kvr_nats *kn, uv_loop_t *loop, const kvr_nats_opts *o, kvr_err *err)
{
    kn->impl = NULL;
    if (!o || !o->url || !*o->url)
        return kvr_err_set(err, KVR_EINVAL, "nats: url is required");
    const char *inbox_prefix = o->inbox_prefix ? o->inbox_prefix : "_INBOX";
    if (!inbox_prefix_valid(inbox_prefix))
        return kvr_err_set(err, KVR_EINVAL, "nats: bad inbox prefix \"%.*s\"",
                           KVR_NATS_INBOX_PREFIX_MAX, inbox_prefix);
    kvr_nats_impl *ki = calloc(1, sizeof(*ki));
    if (!ki)
        return kvr_err_set(err, KVR_ENOMEM, "nats: out of memory");
    ki->kn = kn;
    ki->loop = loop;
    ki->on_state = o->on_state;
    ki->state_data = o->state_data;
    ki->max_msgs = o->queue_max_msgs ? o->queue_max_msgs : 65536;
    ki->max_bytes = o->queue_max_bytes ? o->queue_max_bytes : (256u << 20);
    pthread_mutex_init(&ki->mu, NULL);
    pthread_cond_init(&ki->cv, NULL);
    int rc = 0;
    char *seed = NULL, *jwt = NULL, nkey_pub[KVR_NKEY_PUB_LEN + 1];
    natsOptions *no = NULL;
    natsStatus s = natsOptions_Create(&no);
    if (s != NATS_OK) {
        rc = kvr_err_set(err, KVR_ENOMEM, "nats: creating options: %s", natsStatus_GetText(s));
        goto fail;
    }
    ki->reconnect_wait_ms = o->reconnect_wait_ms > 0 ? o->reconnect_wait_ms : 100;
    ki->max_reconnect_wait_ms = o->max_reconnect_wait_ms > 0 ? o->max_reconnect_wait_ms : 2000;
    if (ki->max_reconnect_wait_ms < ki->reconnect_wait_ms)
        ki->max_reconnect_wait_ms = ki->reconnect_wait_ms;
#define CHK(call, what)                                                                            \
    do {                                                                                           \
        s = (call);                                                                                \
        if (s != NATS_OK) {                                                                        \
            rc = kvr_err_set(err, KVR_EINVAL, "nats: %s: %s", what, natsStatus_GetText(s));        \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)
    CHK(kn_set_servers(no, o->url), "url");
    /* the core client tries the URLs in the order given; cnats does the same, so a process's
     * core and JetStream connections sit on the same server, and the operator spreads
     * processes over a cluster by the order of their URLs */
    CHK(natsOptions_SetNoRandomize(no, true), "no randomize");
    if (o->user || o->password)
        CHK(natsOptions_SetUserInfo(no, o->user, o->password), "user info");
    if (o->token)
        CHK(natsOptions_SetToken(no, o->token), "token");
    if (o->nkey_seed_file && o->creds_file) {
        rc = kvr_err_set(err, KVR_EINVAL, "nats: an NKEY seed file or a creds file, not both");
        goto fail;
    }
    /* read once here (startup, off any loop's hot path): the core client signs nonces with
     * the seed; cnats reads the files itself */
    if (o->nkey_seed_file) {
        rc = kvr_nkey_read_file(o->nkey_seed_file, &seed, err);
        if (rc == 0)
            rc = kvr_nkey_public(seed, nkey_pub, err);
        if (rc != 0) {
            kvr_err_wrap(err, rc, "nats nkey %s", o->nkey_seed_file);
            goto fail;
        }
        CHK(natsOptions_SetNKeyFromSeed(no, nkey_pub, o->nkey_seed_file), "nkey");
    }
    if (o->creds_file) {
        char *text = NULL;
        rc = kvr_nkey_read_file(o->creds_file, &text, err);
        if (rc == 0)
            rc = kvr_nkey_parse_creds(text, &jwt, &seed, err);
        if (rc == 0)
            rc = kvr_nkey_public(seed, nkey_pub, err);
        kvr_nkey_wipe(text);
        if (rc != 0) {
            kvr_err_wrap(err, rc, "nats creds %s", o->creds_file);
            goto fail;
        }
        CHK(natsOptions_SetUserCredentialsFromFiles(no, o->creds_file, NULL), "creds");
    }
    if (o->tls || o->tls_ca_file || o->tls_cert_file || o->tls_key_file) {
        CHK(natsOptions_SetSecure(no, true), "tls");
        if (o->tls_ca_file)
            CHK(natsOptions_LoadCATrustedCertificates(no, o->tls_ca_file), "tls ca file");
        if (o->tls_cert_file || o->tls_key_file) {
            if (!o->tls_cert_file || !o->tls_key_file) {
                rc = kvr_err_set(err, KVR_EINVAL, "nats: tls cert and key go together");
                goto fail;
            }
            CHK(natsOptions_LoadCertificatesChain(no, o->tls_cert_file, o->tls_key_file),
                "tls cert/key");
        }
    }
    CHK(natsOptions_SetTimeout(no, o->connect_timeout_ms > 0 ? o->connect_timeout_ms : 2000),
        "timeout");
    CHK(natsOptions_SetMaxReconnect(no, -1), "max reconnect");
    CHK(natsOptions_SetCustomReconnectDelay(no, kn_reconnect_delay, ki), "reconnect delay");
    CHK(natsOptions_SetPingInterval(no, o->ping_interval_ms > 0 ? o->ping_interval_ms : 2000),
        "ping interval");
    CHK(natsOptions_SetMaxPingsOut(no, 3), "max pings out");
    CHK(natsOptions_SetReconnectBufSize(no, 8 << 20), "reconnect buffer");
    /* The JetStream connection's options (the core client takes its own below). cnats
     * otherwise leaves small publishes to its flusher thread, which adds ~1 ms to every
     * management request and flow-control reply. Each consumer gets its own delivery thread
     * (not the process-wide one), so a consumer blocked on a full queue (backpressure) holds up
     * only itself. Its state changes only re-create consumers: the user's state callback
     * follows the core connection. */
    {
        char jname[256];
        snprintf(jname, sizeof(jname), "%s-js", o->name ? o->name : "kvr");
        CHK(natsOptions_SetName(no, jname), "name");
    }
    CHK(natsOptions_SetSendAsap(no, true), "send asap");
    if (o->inbox_prefix)
        CHK(natsOptions_SetCustomInboxPrefix(no, inbox_prefix), "inbox prefix");
    CHK(natsOptions_UseGlobalMessageDelivery(no, false), "message delivery");
    CHK(natsOptions_SetDisconnectedCB(no, kn_on_js_conn_noop, ki), "disconnected cb");
    CHK(natsOptions_SetReconnectedCB(no, kn_on_js_reconnected, ki), "reconnected cb");
    CHK(natsOptions_SetClosedCB(no, kn_on_js_closed, ki), "closed cb");
    CHK(natsOptions_SetErrorHandler(no, kn_on_nats_error, ki), "error handler");
    CHK(natsOptions_SetRetryOnFailedConnect(no, true, kn_on_js_conn_noop, ki), "retry connect");
#undef CHK

    if (uv_async_init(loop, &ki->async, kn_on_async) != 0) {
        rc = kvr_err_set(err, KVR_EIO, "nats: uv_async_init failed");
        goto fail;
    }
    ki->async.data = ki;
    ki->handles_open++;
    uv_timer_init(loop, &ki->watchdog);
    ki->watchdog.data = ki;
    ki->handles_open++;
    uv_timer_init(loop, &ki->fb_timer);
    ki->fb_timer.data = ki;
    ki->handles_open++;
    kn->impl = ki;

    {
        kvr_nats_core_opts co = {
            .urls = o->url,
            .name = o->name,
            .user = o->user,
            .password = o->password,
            .token = o->token,
            .nkey_seed = seed,
            .jwt = jwt,
            .tls = o->tls,
            .tls_ca_file = o->tls_ca_file,
            .tls_cert_file = o->tls_cert_file,
            .tls_key_file = o->tls_key_file,
            .connect_timeout_ms = o->connect_timeout_ms,
            .reconnect_wait_ms = (int)ki->reconnect_wait_ms,
            .max_reconnect_wait_ms = (int)ki->max_reconnect_wait_ms,
            .ping_interval_ms = o->ping_interval_ms,
            .max_pings_out = 3,
            .cb_data = ki,
            .on_msg = core_on_msg,
            .on_event = core_on_event,
            .on_drained = core_on_drained,
            .on_pub_denied = core_on_pub_denied,
            .on_pong = core_on_pong,
        };
        rc = kvr_nats_core_init(&ki->core, loop, &co, err);
        if (rc != 0)
            goto fail_handles;
        ki->handles_open++; /* until its close callback */
    }
    s = natsConnection_Connect(&ki->jnc, no);
    if (s != NATS_OK && s != NATS_NOT_YET_CONNECTED) {
        char red[512];
        rc = kvr_err_set(err, KVR_EIO, "nats: connecting to %s: %s",
                         kvr_nats_redact_url(o->url, red, sizeof red), natsStatus_GetText(s));
        goto fail_handles;
    }
    natsOptions_Destroy(no);
    no = NULL;

    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = KN_JS_WAIT_MS;
    s = natsConnection_JetStream(&ki->js, ki->jnc, &jo);
    if (s != NATS_OK) {
        rc = kvr_err_set(err, KVR_EIO, "nats: jetstream context: %s", natsStatus_GetText(s));
        goto fail_handles;
    }

    /* the request inbox */
    natsInbox *inbox = NULL;
    s = natsInbox_Create(&inbox);
    if (s != NATS_OK) {
        rc = kvr_err_set(err, KVR_ENOMEM, "nats: inbox: %s", natsStatus_GetText(s));
        goto fail_handles;
    }
    /* cnats writes "_INBOX.<nuid>"; the nuid part under this process's prefix */
    const char *nuid = strrchr((const char *)inbox, '.');
    snprintf(ki->inbox, sizeof(ki->inbox), "%s.%s", inbox_prefix,
             nuid ? nuid + 1 : (const char *)inbox);
    natsInbox_Destroy(inbox);
    char wild[sizeof(ki->inbox) + 4];
    snprintf(wild, sizeof(wild), "%s.*", ki->inbox);
    kvr_nats_sub *isub = NULL;
    rc = kvr_nats_subscribe(kn, wild, NULL, NULL, NULL, &isub, err);
    if (rc != 0)
        goto fail_handles;
    uv_timer_start(&ki->watchdog, kn_on_watchdog, KN_WATCHDOG_MS, KN_WATCHDOG_MS);
    kvr_nkey_wipe(seed); /* the native client keeps its own copy */
    free(jwt);
    return 0;

fail_handles:
    /* the handles are closed by the caller's loop; simplest: mark and close synchronously */
    kn->impl = NULL;
    if (ki->core)
        kvr_nats_core_close(ki->core, NULL, NULL);
    ki->core = NULL;
    if (ki->js)
        jsCtx_Destroy(ki->js);
    ki->js = NULL;
    if (no)
        natsOptions_Destroy(no);
    if (ki->jnc) {
        natsConnection_Close(ki->jnc);
        natsConnection_Destroy(ki->jnc);
        ki->jnc = NULL;
    }
    /* handles must be closed before ki is freed; leak ki to keep the loop's handle list valid */
    uv_close((uv_handle_t *)&ki->async, NULL);
    uv_close((uv_handle_t *)&ki->watchdog, NULL);
    uv_close((uv_handle_t *)&ki->fb_timer, NULL);
    ki->close_started = true;
    ki->closing = true;
    kvr_nkey_wipe(seed);
    free(jwt);
    return rc;
fail:
    kvr_nkey_wipe(seed);
    free(jwt);
    if (no)
        natsOptions_Destroy(no);
    pthread_mutex_destroy(&ki->mu);
    pthread_cond_destroy(&ki->cv);
    free(ki);
    return rc;
}

bool kvr_nats_connected(const kvr_nats *kn)
{
    return kn->impl && atomic_load(&kn->impl->connected);
}

int kvr_nats_subscribe(kvr_nats *kn, const char *subject, const char *queue_group,
                       kvr_nats_msg_cb on_msg, void *data, kvr_nats_sub **out, kvr_err *err)
{
    kvr_nats_impl *ki = kn->impl;
    if (!ki || ki->closing)
        return kvr_err_set(err, KVR_ECLOSED, "nats connection closed");
    bool inbox = on_msg == NULL && ki->inbox_sub == NULL;
    if (!subject || !*subject || strlen(subject) > KN_SUBJECT_MAX || (!on_msg && !inbox))
        return kvr_err_set(err, KVR_EINVAL, "subscribe: bad subject or callback");
    kvr_nats_sub *sub = calloc(1, sizeof(*sub));
    if (!sub)
        return kvr_err_set(err, KVR_ENOMEM, "subscribe: out of memory");
    sub->ki = ki;
    sub->cb = on_msg;
    sub->data = data;
    sub->is_inbox = inbox;
    int rc = kvr_nats_core_subscribe(ki->core, subject, queue_group, sub, &sub->sid);
    if (rc != 0) {
        free(sub);
        return kvr_err_set(err, rc, "subscribing to %s: %s", subject, kvr_strerror(rc));
    }
    if (inbox)
        ki->inbox_sub = sub;
    sub->next_all = ki->subs;
    ki->subs = sub;
    if (out)
        *out = sub;
    return 0;
}

int kvr_nats_unsubscribe(kvr_nats_sub *sub)
{
    if (!sub || sub->dead)
        return 0;
    sub->dead = true;
    if (sub->sid && sub->ki->core) {
        kvr_nats_core_unsubscribe(sub->ki->core, sub->sid);
        sub->sid = 0;
    }
    return 0;
}

int kvr_nats_drain(kvr_nats_sub *sub, void (*drained_cb)(void *data), void *data)
{
    if (!sub || sub->dead)
        return 1;
    if (!sub->sid || !sub->ki->core || sub->ki->closing) {
        kvr_nats_unsubscribe(sub);
        return 1;
    }
    sub->drained_cb = drained_cb;
    sub->drained_data = data;
    int rc = kvr_nats_core_drain(sub->ki->core, sub->sid);
    if (rc == 0)
        return 0;
    sub->drained_cb = NULL;
    kvr_nats_unsubscribe(sub);
    return rc == KVR_ENOMEM ? KVR_ENOMEM : 1;
}

int kvr_nats_publish(kvr_nats *kn, const char *subject, const void *data, size_t len)
{
    kvr_nats_impl *ki = kn->impl;
    if (!ki || ki->closing)
        return KVR_ECLOSED;
    if (!subject || !*subject || len > INT32_MAX)
        return KVR_EINVAL;
    int rc = pub_hdr(ki, subject, NULL, NULL, data, len);
    if (rc != 0)
        return rc;
    ki->stats.msgs_out++;
    ki->stats.bytes_out += len;
    return 0;
}

int kvr_nats_respond(kvr_nats *kn, const char *reply, const void *data, size_t len)
{
    if (!reply || !*reply)
        return KVR_EINVAL;
    return kvr_nats_publish(kn, reply, data, len);
}

void kvr_nats_get_stats(const kvr_nats *kn, kvr_nats_stats *out)
{
    kvr_nats_impl *ki = kn->impl;
    memset(out, 0, sizeof(*out));
    if (!ki)
        return;
    *out = ki->stats;
    pthread_mutex_lock(&ki->mu);
    out->backpressure_waits = ki->bp_waits;
    out->queue_len = ki->q_msgs;
    pthread_mutex_unlock(&ki->mu);
}

/* ---------- close ---------- */

static void close_run(uv_work_t *req)
{
    kvr_nats_impl *ki = req->data;
    if (ki->jnc)
        natsConnection_Close(ki->jnc);
    pthread_mutex_lock(&ki->mu);
    ki->jnc_closed |= ki->jnc == NULL;
    pthread_mutex_unlock(&ki->mu);
    /* Wait (bounded) for cnats' closed callback: its reconnected callback is delivered
     * asynchronously and would otherwise touch ki after handle_closed freed it. */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 5;
    pthread_mutex_lock(&ki->mu);
    while (!ki->jnc_closed) {
        if (pthread_cond_timedwait(&ki->cv, &ki->mu, &until) != 0)
            break;
    }
    bool closed = ki->jnc_closed;
    pthread_mutex_unlock(&ki->mu);
    if (!closed)
        KVR_LOG_WARN("nats: closed callback not delivered", "wait_s=%d", 5);
    for (kvr_nats_sub *s = ki->subs; s; s = s->next_all) {
        if (s->ns) {
            natsSubscription_Destroy(s->ns);
            s->ns = NULL;
        }
    }
    for (size_t i = 0; i < ki->n_graveyard; i++)
        natsSubscription_Destroy(ki->graveyard[i]);
    ki->n_graveyard = 0;
    if (ki->js)
        jsCtx_Destroy(ki->js);
    ki->js = NULL;
    if (ki->jnc)
        natsConnection_Destroy(ki->jnc);
    ki->jnc = NULL;
    nats_ReleaseThreadMemory();
}

static void release(kvr_nats_impl *ki)
{
    if (--ki->handles_open > 0)
        return;
    kvr_nats *kn = ki->kn;
    kvr_nats_close_cb cb = ki->close_cb;
    kn_queue_free(ki);
    kn_fallback_free(ki);
    for (kvr_nats_sub *s = ki->subs; s;) {
        kvr_nats_sub *nx = s->next_all;
        free(s);
        s = nx;
    }
    for (kvr_nats_consumer *c = ki->consumers; c;) {
        kvr_nats_consumer *nx = c->next;
        free(c->stream);
        free(c->filter);
        free(c);
        c = nx;
    }
    free(ki->graveyard);
    pthread_mutex_destroy(&ki->mu);
    pthread_cond_destroy(&ki->cv);
    free(ki);
    kn->impl = NULL;
    if (cb)
        cb(kn);
}

static void handle_closed(uv_handle_t *h)
{
    release(h->data);
}

static void core_closed(void *data)
{
    kvr_nats_impl *ki = data;
    ki->core = NULL;
    release(ki);
}

static void close_after(uv_work_t *req, int status)
{
    kvr_nats_impl *ki = req->data;
    uv_close((uv_handle_t *)&ki->async, handle_closed);
    uv_close((uv_handle_t *)&ki->watchdog, handle_closed);
    uv_close((uv_handle_t *)&ki->fb_timer, handle_closed);
}

void kn_maybe_start_close(kvr_nats_impl *ki)
{
    if (ki->close_started || ki->works > 0)
        return;
    ki->close_started = true;
    ki->close_work.data = ki;
    if (uv_queue_work(ki->loop, &ki->close_work, close_run, close_after) != 0) {
        close_run(&ki->close_work);
        close_after(&ki->close_work, 0);
    }
}

int kvr_nats_close(kvr_nats *kn, kvr_nats_close_cb close_cb)
{
    kvr_nats_impl *ki = kn->impl;
    if (!ki || ki->closing)
        return KVR_ECLOSED;
    ki->closing = true;
    ki->close_cb = close_cb;
    uv_timer_stop(&ki->watchdog);
    uv_timer_stop(&ki->fb_timer);
    pthread_mutex_lock(&ki->mu);
    ki->q_closing = true;
    pthread_cond_broadcast(&ki->cv);
    pthread_mutex_unlock(&ki->mu);
    for (size_t b = 0; b < KN_REQ_BUCKETS; b++)
        while (ki->req_buckets[b])
            req_finish(ki->req_buckets[b], KVR_ECLOSED, NULL, 0);
    for (kvr_nats_consumer *c = ki->consumers; c; c = c->next) {
        c->stopped = true;
        if (c->current && c->current->ns) {
            kn_graveyard_add(ki, c->current->ns);
            c->current->ns = NULL;
        }
    }
    if (ki->core) {
        atomic_store(&ki->connected, false);
        kvr_nats_core_close(ki->core, core_closed, ki); /* no core callback after this */
    }
    if (ki->on_state)
        ki->on_state(kn, KVR_NATS_CLOSED, ki->state_data);
    kn_maybe_start_close(ki);
    return 0;
}

void kvr_nats_global_shutdown(int timeout_ms)
{
    nats_CloseAndWait(timeout_ms > 0 ? timeout_ms : 2000);
}

/* ---------- redaction ---------- */

const char *kvr_nats_redact_url(const char *urls, char *out, size_t cap)
{
    if (cap == 0)
        return out;
    size_t o = 0;
    const char *p = urls ? urls : "";
    /* per comma-separated URL: everything between "://" (or the start) and the last '@'
     * before the next comma is a credential */
    while (*p && o + 1 < cap) {
        size_t len = strcspn(p, ",");
        const char *at = NULL;
        for (size_t i = 0; i < len; i++)
            if (p[i] == '@')
                at = p + i;
        const char *sep = NULL;
        for (size_t i = 0; i + 2 < len; i++)
            if (p[i] == ':' && p[i + 1] == '/' && p[i + 2] == '/') {
                sep = p + i + 3;
                break;
            }
        const char *cred = sep && (!at || sep <= at) ? sep : p;
        for (const char *q = p; q < p + len && o + 1 < cap;) {
            if (at && q == cred) {
                const char *mask = "***@";
                for (size_t k = 0; mask[k] && o + 1 < cap; k++)
                    out[o++] = mask[k];
                q = at + 1;
                continue;
            }
            out[o++] = *q++;
        }
        p += len;
        if (*p == ',' && o + 1 < cap)
            out[o++] = *p++;
    }
    out[o] = 0;
    return out;
}
