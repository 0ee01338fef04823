/* kvr_http_int.h: private to net/kvr_http*.c (the HTTP/1.1 server of kvr_http.h): the
 * connection state shared by the connection side (kvr_http_conn.c: accept, read, write, timers,
 * close), the llhttp callbacks (kvr_http_parse.c) and the request/response API (kvr_http.c).
 *
 * Per connection: one uv_tcp_t, one uv_timer_t (header/body/idle/linger timeouts), one llhttp
 * parser, and `in`, the input not yet parsed. Input is always appended to `in` and parsed from
 * there, so the parser can stop (paused) at the end of a request while the handler works; the
 * rest waits in `in` (bounded: reading stops when it is full). The request being parsed owns
 * copies of its head and body, so a handler can keep it after the connection is gone.
 *
 * Threads: everything here runs on the server's loop thread. */
#ifndef KVR_HTTP_INT_H
#define KVR_HTTP_INT_H

#include "kvr_http.h"

#include <llhttp.h>

#define KVR_HTTP_READ_BUF (64 * 1024)
#define KVR_HTTP_MAX_PIPELINED (64 * 1024) /* buffered input while a request is handled */
#define KVR_HTTP_MAX_HEADERS 100
#define KVR_HTTP_MAX_EXTRA_HEADERS 8192
#define KVR_HTTP_LINGER_MS 2000
#define KVR_HTTP_MAX_UNSENT 64 /* responses queued to a client that does not read */

enum { T_NONE, T_HEADER, T_BODY, T_IDLE, T_LINGER, T_WRITE };
enum { RS_HANDLING = 0, RS_STREAMING = 1, RS_FINISHED = 2 };
enum { H_NONE, H_FIELD, H_VALUE };

struct kvr_http_conn {
    kvr_http_conn *next, *prev;
    kvr_http_server *srv;
    uv_tcp_t tcp;
    uv_timer_t timer;
    llhttp_t parser;
    kvr_buf in;
    size_t in_off;
    kvr_http_req *cur;    /* being parsed */
    kvr_http_req *ready;  /* complete, set by on_message_complete, not yet dispatched */
    kvr_http_req *active; /* handed to the handler, not finished */
    size_t head_bytes;
    size_t url_off, url_len;
    int hstate;
    bool in_body;          /* head complete: header callbacks now carry trailer fields */
    bool out_full;         /* unsent responses over the bound: not reading, not dispatching */
    uint64_t req_start_ms; /* uv_now() at the first byte of the request being parsed */
    kvr_http_conn *rnext, *rprev; /* srv->reading list (oldest first) while cur != NULL */
    bool in_rlist;
    int err_status; /* status to answer a parse error with (0 → 400) */
    int timer_mode;
    int writes; /* outstanding uv_write requests */
    int handles_open;
    bool reading;
    bool in_process;
    bool closing;     /* uv_close called */
    bool close_after; /* no more requests: shut down once writes are done */
    bool shut;        /* shutdown requested */
    bool counted;     /* counts in connections_active */
};

typedef struct wreq {
    uv_write_t w;
    kvr_http_conn *conn;
    size_t len;
    char data[];
} wreq;

void kh_req_free(kvr_http_req *r);
void kh_count_status(kvr_http_server *srv, int status);
void kh_rlist_add(kvr_http_conn *c);
void kh_rlist_del(kvr_http_conn *c);
int kh_conn_write2(kvr_http_conn *c, const char *a, size_t alen, const char *b, size_t blen,
                   const char *t, size_t tlen);
void kh_conn_shed(kvr_http_conn *c);
void kh_conn_gone(kvr_http_conn *c);
void kh_conn_start_close(kvr_http_conn *c);
void kh_timer_set(kvr_http_conn *c, int mode, uint64_t ms);
void kh_conn_process(kvr_http_conn *c);
kvr_slice kh_trim(kvr_slice s);
/* The parser callbacks (kvr_http_parse.c), set up once per process on first use. */
const llhttp_settings_t *kh_settings(void);

#endif
