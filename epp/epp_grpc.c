/* epp_grpc: HTTP/2 streams as gRPC calls (see epp_grpc.h): the nghttp2 server session's
 * callbacks turn a stream's request headers, DATA and END_STREAM into on_call, on_message and
 * on_half_close, and epp_grpc_send / finish into response HEADERS, DATA and trailers. The
 * connection under the session (socket, TLS, write queue) is epp_grpc_conn.c; the message
 * framing is epp_grpc_frame.c. */
#include "epp_grpc_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void call_closed(epp_grpc_conn *c, epp_grpc_call *call);

/* ---------- sending ---------- */

#define NV(n, v)                                                                                   \
    {                                                                                              \
        (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NONE             \
    }

static int submit_trailers(epp_grpc_conn *c, epp_grpc_call *call, bool trailers_only)
{
    char st[12], msg[768];
    snprintf(st, sizeof st, "%d", call->status_);
    epp_grpc_pct_encode(call->message_, msg, sizeof msg);
    nghttp2_nv nva[5];
    size_t n = 0;
    if (trailers_only) {
        nghttp2_nv a = NV(":status", "200"), b = NV("content-type", "application/grpc");
        nva[n++] = a;
        nva[n++] = b;
    }
    nghttp2_nv s = NV("grpc-status", st);
    nva[n++] = s;
    if (msg[0]) {
        nghttp2_nv m = NV("grpc-message", msg);
        nva[n++] = m;
    }
    call->trailers_sent_ = true;
    if (trailers_only)
        return nghttp2_submit_response(c->ng, call->sid_, nva, n, NULL);
    return nghttp2_submit_trailer(c->ng, call->sid_, nva, n);
}

static ssize_t data_read(nghttp2_session *ng, int32_t sid, uint8_t *buf, size_t length,
                         uint32_t *flags, nghttp2_data_source *src, void *ud)
{
    (void)ng;
    (void)sid;
    epp_grpc_conn *c = ud;
    epp_grpc_call *call = src->ptr;
    size_t avail = call->out_.len - call->out_off_;
    if (avail) {
        size_t n = avail < length ? avail : length;
        memcpy(buf, call->out_.base + call->out_off_, n);
        call->out_off_ += n;
        c->s->stats.buffered -= n;
        if (call->out_off_ == call->out_.len) {
            kvr_buf_reset(&call->out_);
            call->out_off_ = 0;
        }
        return (ssize_t)n;
    }
    if (call->finishing_) {
        *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
        if (submit_trailers(c, call, false))
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        return 0;
    }
    call->deferred_ = true;
    return NGHTTP2_ERR_DEFERRED;
}

static int start_response(epp_grpc_conn *c, epp_grpc_call *call)
{
    nghttp2_nv nva[] = {NV(":status", "200"), NV("content-type", "application/grpc"),
                        NV("grpc-accept-encoding", "identity")};
    nghttp2_data_provider dp = {.source.ptr = call, .read_callback = data_read};
    call->started_ = true;
    return nghttp2_submit_response(c->ng, call->sid_, nva, sizeof nva / sizeof *nva, &dp);
}

int epp_grpc_send(epp_grpc_call *call, const void *msg, size_t len)
{
    epp_grpc_conn *c = call->conn_;
    if (call->finishing_ || call->closed_ || !c)
        return KVR_EINVAL;
    epp_grpc_server *s = call->server;
    if (s->stats.buffered + len + 5 > s->lim.max_buffered)
        return KVR_ELIMIT;
    uint8_t pfx[EPP_GRPC_PREFIX];
    epp_grpc_frame_prefix(pfx, len);
    if (kvr_buf_append(&call->out_, pfx, sizeof pfx) || kvr_buf_append(&call->out_, msg, len))
        return KVR_ENOMEM;
    s->stats.buffered += len + 5;
    s->stats.messages_out++;
    if (!call->started_) {
        if (start_response(c, call))
            return KVR_EIO;
    } else if (call->deferred_) {
        call->deferred_ = false;
        nghttp2_session_resume_data(c->ng, call->sid_);
    }
    epp_grpc_conn_flush(c);
    return 0;
}

void epp_grpc_finish(epp_grpc_call *call, int status, const char *message)
{
    epp_grpc_conn *c = call->conn_;
    if (call->finishing_ || call->closed_ || !c)
        return;
    call->finishing_ = true;
    call->status_ = status;
    snprintf(call->message_, sizeof call->message_, "%s", message ? message : "");
    if (!call->started_) {
        submit_trailers(c, call, true);
    } else if (call->deferred_) {
        call->deferred_ = false;
        nghttp2_session_resume_data(c->ng, call->sid_);
    }
    epp_grpc_conn_flush(c);
}

void epp_grpc_flush(epp_grpc_call *call)
{
    if (call->conn_)
        epp_grpc_conn_flush(call->conn_);
}

/* ---------- nghttp2 callbacks ---------- */

static epp_grpc_call *call_of(epp_grpc_conn *c, int32_t sid)
{
    return nghttp2_session_get_stream_user_data(c->ng, sid);
}

static int on_begin_headers(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
    epp_grpc_conn *c = ud;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    epp_grpc_call *call = calloc(1, sizeof *call);
    if (!call)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    call->server = c->s;
    call->conn_ = c;
    call->sid_ = f->hd.stream_id;
    kvr_buf_init(&call->in_);
    kvr_buf_init(&call->out_);
    nghttp2_session_set_stream_user_data(ng, f->hd.stream_id, call);
    call->next_ = c->calls;
    if (call->next_)
        call->next_->prev_ = call;
    c->calls = call;
    c->s->stats.calls++;
    c->s->stats.open_calls++;
    return 0;
}

static int on_header(nghttp2_session *ng, const nghttp2_frame *f, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags, void *ud)
{
    (void)ng;
    (void)flags;
    epp_grpc_conn *c = ud;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    epp_grpc_call *call = call_of(c, f->hd.stream_id);
    if (!call)
        return 0;
#define IS(s) (namelen == sizeof(s) - 1 && memcmp(name, s, namelen) == 0)
    if (IS(":path")) {
        if (valuelen >= sizeof call->path_) {
            call->refused_ = true;
            return 0;
        }
        memcpy(call->path_, value, valuelen);
        call->path_[valuelen] = 0;
    } else if (IS("content-type")) {
        if (valuelen < 16 || memcmp(value, "application/grpc", 16) != 0)
            call->refused_ = true;
    } else if (IS("grpc-encoding")) {
        if (!(valuelen == 8 && memcmp(value, "identity", 8) == 0)) {
            call->refused_ = true;
            snprintf(call->message_, sizeof call->message_, "grpc-encoding %.*s not supported",
                     (int)(valuelen > 64 ? 64 : valuelen), (const char *)value);
        }
    }
#undef IS
    return 0;
}

static void half_close(epp_grpc_conn *c, epp_grpc_call *call)
{
    if (call->half_closed_)
        return;
    call->half_closed_ = true;
    if (call->finishing_ || !call->accepted_)
        return;
    if (call->in_.len) {
        epp_grpc_finish(call, EPP_GRPC_INTERNAL, "stream ended inside a message");
        return;
    }
    if (c->s->h.on_half_close)
        c->s->h.on_half_close(call);
}

static int on_frame_recv(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
    (void)ng;
    epp_grpc_conn *c = ud;
    epp_grpc_call *call = f->hd.stream_id ? call_of(c, f->hd.stream_id) : NULL;
    if (!call)
        return 0;
    if (f->hd.type == NGHTTP2_HEADERS && f->headers.cat == NGHTTP2_HCAT_REQUEST) {
        int st = 0;
        if (call->refused_)
            st = call->message_[0] ? EPP_GRPC_UNIMPLEMENTED : EPP_GRPC_INVALID_ARGUMENT;
        else if (!call->path_[0])
            st = EPP_GRPC_INVALID_ARGUMENT;
        else
            st = c->s->h.on_call(call, call->path_);
        if (st) {
            c->s->stats.refused++;
            epp_grpc_finish(call, st,
                            call->message_[0]              ? call->message_
                            : st == EPP_GRPC_UNIMPLEMENTED ? "unknown method"
                                                           : "bad request headers");
        } else {
            call->accepted_ = true;
            if (!call->started_)
                start_response(c, call);
        }
    }
    if ((f->hd.type == NGHTTP2_HEADERS || f->hd.type == NGHTTP2_DATA) &&
        (f->hd.flags & NGHTTP2_FLAG_END_STREAM))
        half_close(c, call);
    return 0;
}

typedef struct deliver_arg {
    epp_grpc_conn *c;
    epp_grpc_call *call;
} deliver_arg;

static void deliver(const uint8_t *msg, size_t n, void *arg)
{
    deliver_arg *a = arg;
    if (a->call->finishing_ || a->call->closed_)
        return;
    a->c->s->stats.messages_in++;
    a->c->s->h.on_message(a->call, msg, n);
}

static int on_data_chunk(nghttp2_session *ng, uint8_t flags, int32_t sid, const uint8_t *data,
                         size_t len, void *ud)
{
    (void)ng;
    (void)flags;
    epp_grpc_conn *c = ud;
    epp_grpc_call *call = call_of(c, sid);
    if (!call || !call->accepted_ || call->finishing_)
        return 0; /* consumed and dropped: the call is answered already */
    epp_grpc_server *s = c->s;
    if (s->stats.buffered + len > s->lim.max_buffered) {
        epp_grpc_finish(call, EPP_GRPC_RESOURCE_EXHAUSTED, "server buffers full");
        return 0;
    }
    size_t before = call->in_.len;
    deliver_arg a = {c, call};
    int st = epp_grpc_deframe(&call->in_, data, len, s->lim.max_message, deliver, &a);
    s->stats.buffered = s->stats.buffered - before + call->in_.len;
    if (st)
        epp_grpc_finish(call, st,
                        st == EPP_GRPC_UNIMPLEMENTED        ? "compressed messages not supported"
                        : st == EPP_GRPC_RESOURCE_EXHAUSTED ? "message too large"
                                                            : "bad message prefix");
    return 0;
}

static int on_frame_send(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
    epp_grpc_conn *c = ud;
    /* Trailers sent while the client still sends: end its side too (as gRPC servers do). */
    if (f->hd.type == NGHTTP2_HEADERS && (f->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
        epp_grpc_call *call = call_of(c, f->hd.stream_id);
        if (call && !call->half_closed_)
            nghttp2_submit_rst_stream(ng, NGHTTP2_FLAG_NONE, f->hd.stream_id, NGHTTP2_NO_ERROR);
    }
    return 0;
}

/* The call is over: the handler hears it last, then it is freed. */
static void call_closed(epp_grpc_conn *c, epp_grpc_call *call)
{
    call->closed_ = true;
    if (call->accepted_ && c->s->h.on_close)
        c->s->h.on_close(call, call->finishing_);
    if (call->prev_)
        call->prev_->next_ = call->next_;
    else
        c->calls = call->next_;
    if (call->next_)
        call->next_->prev_ = call->prev_;
    c->s->stats.buffered -= call->in_.len + (call->out_.len - call->out_off_);
    c->s->stats.open_calls--;
    kvr_buf_free(&call->in_);
    kvr_buf_free(&call->out_);
    free(call);
}

static int on_stream_close(nghttp2_session *ng, int32_t sid, uint32_t error_code, void *ud)
{
    epp_grpc_conn *c = ud;
    epp_grpc_call *call = call_of(c, sid);
    if (!call)
        return 0;
    if (error_code != NGHTTP2_NO_ERROR)
        c->s->stats.resets++;
    nghttp2_session_set_stream_user_data(ng, sid, NULL);
    call_closed(c, call);
    return 0;
}

/* ---------- the session ---------- */

int epp_grpc_session_new(epp_grpc_conn *c)
{
    nghttp2_session_callbacks *cbs;
    nghttp2_session_callbacks_new(&cbs);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    int rv = nghttp2_session_server_new(&c->ng, cbs, c);
    nghttp2_session_callbacks_del(cbs);
    if (rv) {
        c->ng = NULL;
        return -1;
    }
    /* Windows of 1 MiB per stream and 16 MiB per connection: a body of several chunks need
     * not wait for a WINDOW_UPDATE round trip each 64 KiB. nghttp2 sends WINDOW_UPDATEs as
     * data is consumed (at once: every byte is deframed and copied out on arrival), and our
     * own per-call and total caps bound memory. */
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, c->s->lim.max_streams},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20},
    };
    nghttp2_submit_settings(c->ng, NGHTTP2_FLAG_NONE, iv, sizeof iv / sizeof *iv);
    nghttp2_session_set_local_window_size(c->ng, NGHTTP2_FLAG_NONE, 0, 16 << 20);
    return 0;
}

void epp_grpc_session_end(epp_grpc_conn *c)
{
    /* the calls still open end here (cancelled), before the session goes: a handler may
     * still call epp_grpc_send / finish on them, which see no connection and do nothing */
    while (c->calls) {
        c->calls->conn_ = NULL;
        c->s->stats.resets++;
        call_closed(c, c->calls);
    }
    nghttp2_session_del(c->ng);
    c->ng = NULL;
}
