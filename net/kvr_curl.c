/* kvr_curl: libcurl multi on libuv (socket + timer callbacks → uv_poll / uv_timer).
 *
 * curl forbids most multi API calls from inside its own callbacks (CURLM_RECURSIVE_API_CALL),
 * and a user callback (on_data...) may want to start or cancel a request. So
 * `in_socket_action` marks the curl calls on the stack that can run callbacks
 * (curl_multi_socket_action, curl_easy_pause); adds and removals requested meanwhile are
 * deferred and done by sweep() once the stack has unwound. */
#include "kvr_curl.h"
#include "kvr_log.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct kvr_curl_req {
    kvr_curl_req *next, *prev;
    kvr_curl *kc;
    CURL *easy;
    struct curl_slist *hdrs;
    char *body;
    kvr_curl_opts o;
    kvr_buf collected;
    long status;
    bool in_multi;
    bool headers_done;
    bool cancelled; /* no more callbacks; remove and free at the next sweep/completion */
    bool aborted;   /* a callback asked to abort */
    bool limit_hit;
    bool paused;
    bool stalled;        /* no byte for stall_timeout_ms (see cb_progress) */
    uint64_t last_rx_ms; /* monotonic: last response byte, or start, or while paused */
    char errbuf[CURL_ERROR_SIZE];
};

typedef struct sock_ctx {
    uv_poll_t poll;
    struct sock_ctx *next, *prev;
    bool closing;
    curl_socket_t fd;
    kvr_curl *kc;
} sock_ctx;

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static CURLcode g_global_rc;

static void global_init(void)
{
    g_global_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static int depth_of(kvr_curl *kc);
static void sweep(kvr_curl *kc);
static void check_done(kvr_curl *kc);

/* ---------------------------------------------------------------- handles */

static void on_poll_closed_(uv_handle_t *h);

static void maybe_closed(kvr_curl *kc)
{
    if (kc->closing && kc->handles_open == 0 && kc->close_cb != NULL) {
        kvr_curl_close_cb cb = kc->close_cb;
        kc->close_cb = NULL;
        cb(kc);
    }
}

static void sock_close(sock_ctx *s)
{
    if (s->closing)
        return;
    s->closing = true;
    kvr_curl *kc = s->kc;
    if (s->prev)
        s->prev->next = s->next;
    else
        kc->socks = s->next;
    if (s->next)
        s->next->prev = s->prev;
    uv_poll_stop(&s->poll);
    uv_close((uv_handle_t *)&s->poll, on_poll_closed_);
}

static void on_poll_closed_(uv_handle_t *h)
{
    sock_ctx *s = h->data;
    kvr_curl *kc = s->kc;
    free(s);
    kc->handles_open--;
    maybe_closed(kc);
}

static void on_timer_closed(uv_handle_t *h)
{
    kvr_curl *kc = h->data;
    kc->handles_open--;
    maybe_closed(kc);
}

/* ---------------------------------------------------------------- multi glue */

static void socket_action(kvr_curl *kc, curl_socket_t fd, int ev)
{
    int running = 0;
    kc->in_socket_action = true;
    curl_multi_socket_action(kc->multi, fd, ev, &running);
    kc->in_socket_action = false;
    check_done(kc);
    sweep(kc);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    sock_ctx *s = h->data;
    int ev = 0;
    if (status < 0)
        ev = CURL_CSELECT_ERR;
    else {
        if (events & UV_READABLE)
            ev |= CURL_CSELECT_IN;
        if (events & UV_WRITABLE)
            ev |= CURL_CSELECT_OUT;
    }
    socket_action(s->kc, s->fd, ev);
}

static void on_timeout(uv_timer_t *t)
{
    kvr_curl *kc = t->data;
    socket_action(kc, CURL_SOCKET_TIMEOUT, 0);
}

static int cb_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    kvr_curl *kc = userp;
    sock_ctx *s = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (s != NULL) {
            sock_close(s);
            curl_multi_assign(kc->multi, fd, NULL);
        }
        return 0;
    }
    if (s == NULL) {
        s = calloc(1, sizeof *s);
        if (s == NULL)
            return -1;
        s->fd = fd;
        s->kc = kc;
        if (uv_poll_init_socket(kc->loop, &s->poll, fd) != 0) {
            free(s);
            return -1;
        }
        s->poll.data = s;
        kc->handles_open++;
        s->next = kc->socks;
        if (s->next)
            s->next->prev = s;
        kc->socks = s;
        curl_multi_assign(kc->multi, fd, s);
    }
    int ev = 0;
    if (what & CURL_POLL_IN)
        ev |= UV_READABLE;
    if (what & CURL_POLL_OUT)
        ev |= UV_WRITABLE;
    uv_poll_start(&s->poll, ev, on_poll);
    return 0;
}

static int cb_timer(CURLM *multi, long timeout_ms, void *userp)
{
    kvr_curl *kc = userp;
    if (kc->closing)
        return 0;
    if (timeout_ms < 0)
        uv_timer_stop(&kc->timer);
    else
        uv_timer_start(&kc->timer, on_timeout, (uint64_t)timeout_ms, 0);
    return 0;
}

/* ---------------------------------------------------------------- requests */

static void req_unlink(kvr_curl_req *r)
{
    kvr_curl *kc = r->kc;
    if (r->prev)
        r->prev->next = r->next;
    else
        kc->reqs = r->next;
    if (r->next)
        r->next->prev = r->prev;
    r->next = r->prev = NULL;
    kc->active--;
    if (r->easy && r->in_multi)
        curl_multi_remove_handle(kc->multi, r->easy);
    r->in_multi = false;
}

static void req_free(kvr_curl_req *r)
{
    if (r->easy)
        curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->hdrs);
    free(r->body);
    kvr_buf_free(&r->collected);
    free(r);
}

static void req_unlink_free(kvr_curl_req *r)
{
    req_unlink(r);
    req_free(r);
}

static int depth_of(kvr_curl *kc)
{
    return kc->in_socket_action ? 1 : 0;
}

/* Deferred work: add new handles, drop cancelled ones. */
static void sweep(kvr_curl *kc)
{
    if (depth_of(kc) || kc->closing)
        return;
    kvr_curl_req *r = kc->reqs;
    while (r != NULL) {
        kvr_curl_req *next = r->next;
        if (r->cancelled) {
            req_unlink_free(r);
        } else if (!r->in_multi) {
            CURLMcode mc = curl_multi_add_handle(kc->multi, r->easy);
            if (mc == CURLM_OK) {
                r->in_multi = true;
            } else {
                snprintf(r->errbuf, sizeof r->errbuf, "curl_multi_add_handle: %s",
                         curl_multi_strerror(mc));
                req_unlink(r);
                r->o.on_done(r, KVR_EIO, 0, r->errbuf, (kvr_slice){"", 0});
                req_free(r);
                if (kc->closing)
                    return;
                next = kc->reqs; /* on_done may have changed the list: rescan */
            }
        }
        r = next;
    }
}

static void finish(kvr_curl_req *r, CURLcode rc)
{
    if (r->cancelled) {
        req_unlink_free(r);
        return;
    }
    long http = 0;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &http);
    int result = 0;
    const char *msg = "";
    if (rc == CURLE_OK) {
        result = 0;
    } else if (r->limit_hit) {
        result = KVR_ELIMIT;
        msg = "response body over the limit";
    } else if (r->stalled) {
        result = KVR_ETIMEDOUT;
        msg = "no data from the server within the stall timeout";
    } else if (r->aborted) {
        result = KVR_ECLOSED;
        msg = "aborted by callback";
    } else if (rc == CURLE_OPERATION_TIMEDOUT) {
        result = KVR_ETIMEDOUT;
        msg = r->errbuf[0] ? r->errbuf : curl_easy_strerror(rc);
    } else {
        result = KVR_EIO;
        msg = r->errbuf[0] ? r->errbuf : curl_easy_strerror(rc);
    }
    kvr_slice body = {r->collected.base ? r->collected.base : "", r->collected.len};
    /* Detached first, so on_done may start requests or even close the client. */
    req_unlink(r);
    r->o.on_done(r, result, http, msg, body);
    req_free(r);
}

static void check_done(kvr_curl *kc)
{
    CURLMsg *m;
    int left;
    while (!kc->closing && (m = curl_multi_info_read(kc->multi, &left)) != NULL) {
        if (m->msg != CURLMSG_DONE)
            continue;
        kvr_curl_req *r = NULL;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
        CURLcode rc = m->data.result;
        if (r != NULL)
            finish(r, rc);
    }
}

static uint64_t mono_ms(void)
{
    return uv_hrtime() / 1000000u;
}

/* Stall detection: libcurl's own low-speed check averages over several seconds and counts
 * the upload too, so a silent server is noticed late; this checks the time since the last
 * response byte instead. Paused time (client backpressure) does not count. */
static int cb_progress(void *ud, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                       curl_off_t ulnow)
{
    (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
    kvr_curl_req *r = ud;
    uint64_t now = mono_ms();
    if (r->paused || r->cancelled) {
        r->last_rx_ms = now;
        return 0;
    }
    if (now - r->last_rx_ms >= (uint64_t)r->o.stall_timeout_ms) {
        r->stalled = true;
        return 1;
    }
    return 0;
}

static size_t cb_write(char *ptr, size_t size, size_t nmemb, void *ud)
{
    kvr_curl_req *r = ud;
    size_t n = size * nmemb;
    r->last_rx_ms = mono_ms();
    if (r->cancelled)
        return 0;
    if (r->o.on_data != NULL) {
        int rv = r->o.on_data(r, ptr, n);
        if (r->cancelled)
            return 0;
        if (rv == KVR_CURL_PAUSE) {
            r->paused = true;
            return CURL_WRITEFUNC_PAUSE;
        }
        if (rv != 0) {
            r->aborted = true;
            return 0;
        }
        return n;
    }
    if (r->collected.len + n > r->o.max_body || kvr_buf_append(&r->collected, ptr, n) != 0) {
        r->limit_hit = true;
        return 0;
    }
    return n;
}

static kvr_slice trim(const char *p, size_t n)
{
    while (n && (*p == ' ' || *p == '\t')) {
        p++;
        n--;
    }
    while (n && (p[n - 1] == ' ' || p[n - 1] == '\t' || p[n - 1] == '\r' || p[n - 1] == '\n'))
        n--;
    return (kvr_slice){p, n};
}

static size_t cb_header(char *buf, size_t size, size_t nitems, void *ud)
{
    kvr_curl_req *r = ud;
    size_t n = size * nitems;
    r->last_rx_ms = mono_ms(); /* a header line is a sign of life too */
    if (r->cancelled)
        return 0;
    if (n >= 5 && memcmp(buf, "HTTP/", 5) == 0) {
        /* Status line: "HTTP/1.1 200 OK". A 1xx is followed by another one. */
        const char *sp = memchr(buf, ' ', n);
        r->status = sp ? strtol(sp + 1, NULL, 10) : 0;
        return n;
    }
    kvr_slice line = trim(buf, n);
    if (line.len == 0) {
        if (r->status >= 200 && !r->headers_done) {
            r->headers_done = true;
            if (r->o.on_headers != NULL) {
                int rv = r->o.on_headers(r, r->status);
                if (r->cancelled)
                    return 0;
                if (rv != 0) {
                    r->aborted = true;
                    return 0;
                }
            }
        }
        return n;
    }
    if (r->o.on_header != NULL && r->status >= 200) {
        const char *colon = memchr(line.base, ':', line.len);
        if (colon != NULL) {
            kvr_slice name = trim(line.base, (size_t)(colon - line.base));
            kvr_slice value = trim(colon + 1, line.len - (size_t)(colon - line.base) - 1);
            int rv = r->o.on_header(r, name, value);
            if (r->cancelled)
                return 0;
            if (rv != 0) {
                r->aborted = true;
                return 0;
            }
        }
    }
    return n;
}

/* ---------------------------------------------------------------- API */

int kvr_curl_init(kvr_curl *kc, uv_loop_t *loop, const kvr_curl_config *cfg, kvr_err *err)
{
    void *data = kc->data;
    memset(kc, 0, sizeof *kc);
    kc->data = data;
    kc->loop = loop;
    pthread_once(&g_once, global_init);
    if (g_global_rc != CURLE_OK)
        return kvr_err_set(err, KVR_EIO, "curl_global_init: %s", curl_easy_strerror(g_global_rc));
    kc->multi = curl_multi_init();
    if (kc->multi == NULL)
        return kvr_err_set(err, KVR_ENOMEM, "curl_multi_init failed");
    long host = cfg && cfg->max_host_connections ? cfg->max_host_connections : 64;
    long total = cfg ? cfg->max_total_connections : 0;
    kc->connect_timeout_ms = cfg && cfg->connect_timeout_ms ? cfg->connect_timeout_ms : 5000;
    curl_multi_setopt(kc->multi, CURLMOPT_SOCKETFUNCTION, cb_socket);
    curl_multi_setopt(kc->multi, CURLMOPT_SOCKETDATA, kc);
    curl_multi_setopt(kc->multi, CURLMOPT_TIMERFUNCTION, cb_timer);
    curl_multi_setopt(kc->multi, CURLMOPT_TIMERDATA, kc);
    curl_multi_setopt(kc->multi, CURLMOPT_MAX_HOST_CONNECTIONS, host);
    if (total > 0)
        curl_multi_setopt(kc->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, total);
    /* Keep enough idle connections cached for reuse under load. */
    curl_multi_setopt(kc->multi, CURLMOPT_MAXCONNECTS, host > 16 ? host : 16L);
    uv_timer_init(loop, &kc->timer);
    kc->timer.data = kc;
    kc->handles_open = 1;
    return 0;
}

int kvr_curl_start(kvr_curl *kc, const kvr_curl_opts *opts, kvr_curl_req **out, kvr_err *err)
{
    if (out)
        *out = NULL;
    if (kc->closing)
        return kvr_err_set(err, KVR_ECLOSED, "curl client is closing");
    if (opts == NULL || opts->url == NULL || opts->on_done == NULL)
        return kvr_err_set(err, KVR_EINVAL, "curl request needs a url and on_done");
    kvr_curl_req *r = calloc(1, sizeof *r);
    if (r == NULL)
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    r->kc = kc;
    r->o = *opts;
    if (r->o.max_body == 0)
        r->o.max_body = 16 * 1024 * 1024;
    r->easy = curl_easy_init();
    if (r->easy == NULL)
        goto nomem;
    CURL *e = r->easy;
    bool user_expect = false;
    if (opts->headers != NULL) {
        for (const char *const *h = opts->headers; *h != NULL; h++) {
            struct curl_slist *n = curl_slist_append(r->hdrs, *h);
            if (n == NULL)
                goto nomem;
            r->hdrs = n;
            if (strncasecmp(*h, "Expect:", 7) == 0)
                user_expect = true;
        }
    }
    const char *method = opts->method ? opts->method : (opts->body ? "POST" : "GET");
    if (opts->body != NULL || strcmp(method, "POST") == 0) {
        /* No "Expect: 100-continue" round trip for big bodies: our servers answer directly. */
        if (!user_expect) {
            struct curl_slist *n = curl_slist_append(r->hdrs, "Expect:");
            if (n == NULL)
                goto nomem;
            r->hdrs = n;
        }
        r->body = malloc(opts->body_len ? opts->body_len : 1);
        if (r->body == NULL)
            goto nomem;
        if (opts->body_len)
            memcpy(r->body, opts->body, opts->body_len);
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)opts->body_len);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, r->body);
        if (strcmp(method, "POST") != 0)
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    } else if (strcmp(method, "GET") == 0) {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    } else if (strcmp(method, "HEAD") == 0) {
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    } else {
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    }
    if (curl_easy_setopt(e, CURLOPT_URL, opts->url) != CURLE_OK) {
        free(r->body);
        curl_slist_free_all(r->hdrs);
        curl_easy_cleanup(e);
        free(r);
        return kvr_err_set(err, KVR_EINVAL, "bad url '%s'", opts->url);
    }
    curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)r);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->hdrs);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, cb_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, cb_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    if (opts->timeout_ms > 0)
        curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, opts->timeout_ms);
    if (opts->stall_timeout_ms > 0) {
        /* cb_progress does the check. The low-speed limit is a backstop, and it makes
         * libcurl wake a silent transfer every second, so cb_progress runs even then. */
        r->last_rx_ms = mono_ms();
        curl_easy_setopt(e, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, cb_progress);
        curl_easy_setopt(e, CURLOPT_XFERINFODATA, r);
        curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L);
        curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, (opts->stall_timeout_ms + 999) / 1000 + 30);
    }
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                     opts->connect_timeout_ms > 0 ? opts->connect_timeout_ms
                                                  : kc->connect_timeout_ms);
    if (opts->ca_file && *opts->ca_file)
        curl_easy_setopt(e, CURLOPT_CAINFO, opts->ca_file);
    r->next = kc->reqs;
    if (kc->reqs)
        kc->reqs->prev = r;
    kc->reqs = r;
    kc->active++;
    if (!depth_of(kc)) {
        CURLMcode mc = curl_multi_add_handle(kc->multi, e);
        if (mc != CURLM_OK) {
            req_unlink_free(r);
            return kvr_err_set(err, KVR_EIO, "curl_multi_add_handle: %s", curl_multi_strerror(mc));
        }
        r->in_multi = true;
    } /* else added by sweep() once curl's stack unwinds */
    if (out)
        *out = r;
    return 0;
nomem:
    if (r->easy)
        curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->hdrs);
    free(r->body);
    free(r);
    return kvr_err_set(err, KVR_ENOMEM, "out of memory");
}

void kvr_curl_cancel(kvr_curl_req *r)
{
    if (r == NULL || r->cancelled)
        return;
    r->cancelled = true;
    kvr_curl *kc = r->kc;
    if (!depth_of(kc))
        req_unlink_free(r);
    /* else: sweep() after the current curl call, or finish() if it completes first. */
}

int kvr_curl_pause(kvr_curl_req *r)
{
    if (r->cancelled || !r->in_multi)
        return KVR_EINVAL;
    if (curl_easy_pause(r->easy, CURLPAUSE_RECV) != CURLE_OK)
        return KVR_EIO;
    r->paused = true;
    return 0;
}

int kvr_curl_resume(kvr_curl_req *r)
{
    if (r->cancelled || !r->in_multi)
        return KVR_EINVAL;
    if (!r->paused)
        return 0;
    r->paused = false;
    kvr_curl *kc = r->kc;
    /* Unpausing may deliver buffered data to on_data right here. */
    bool outer = kc->in_socket_action;
    kc->in_socket_action = true;
    CURLcode rc = curl_easy_pause(r->easy, CURLPAUSE_CONT);
    kc->in_socket_action = outer;
    if (!outer)
        sweep(kc); /* r itself may have been cancelled meanwhile: do not touch it below */
    return rc == CURLE_OK ? 0 : KVR_EIO;
}

bool kvr_curl_paused(const kvr_curl_req *r)
{
    return r->paused;
}

void *kvr_curl_req_data(const kvr_curl_req *r)
{
    return r->o.data;
}

void kvr_curl_req_set_data(kvr_curl_req *r, void *data)
{
    r->o.data = data;
}

size_t kvr_curl_active(const kvr_curl *kc)
{
    return kc->active;
}

void kvr_curl_close(kvr_curl *kc, kvr_curl_close_cb close_cb)
{
    if (kc->closing)
        return;
    kc->closing = true;
    kc->close_cb = close_cb;
    while (kc->reqs != NULL) {
        kc->reqs->cancelled = true;
        req_unlink_free(kc->reqs);
    }
    /* Cleanup closes cached connections; the socket callback then closes their polls. */
    curl_multi_cleanup(kc->multi);
    kc->multi = NULL;
    while (kc->socks != NULL)
        sock_close(kc->socks);
    uv_timer_stop(&kc->timer);
    uv_close((uv_handle_t *)&kc->timer, on_timer_closed);
}
