/* raftbench_load.c: the load of `kvr-bench raft --mode process`: K route requests in flight
 * over NATS `kvr.route` on one uv loop, each answered booking freed (at once or after
 * --free-after-ms), latencies and per-router answers recorded; and the analysis of the
 * best-effort phase's decisions made on stale load. */
#define _GNU_SOURCE
#pragma GCC diagnostic ignored "-Wformat-truncation" /* error texts are cut on purpose */
#include "raftbench_int.h"

#include "kvr_json.h"
#include "kvr_log.h"
#include "kvr_mp.h"
#include "raftbench.h"
#include "route_msg.h"
#include "run_cluster.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void rb_send(rb_run *r);
static int rb_send_req(rb_run *r, rb_req *q);

static uint64_t rb_rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void rb_free(rb_run *r, const uint8_t rid[16])
{
    kvr_buf ev;
    kvr_buf_init(&ev);
    kvr_route_event fe = {.type = KVR_ROUTE_EVENT_FREE};
    memcpy(fe.request_id, rid, sizeof fe.request_id);
    if (kvr_route_event_encode(&ev, &fe) == 0 &&
        kvr_nats_publish(&r->nats, "kvr.route.event", ev.base, ev.len) == 0)
        r->frees++;
    else
        r->free_errors++;
    kvr_buf_free(&ev);
}

static void rb_hold_free(rb_run *r, const uint8_t rid[16], int64_t due_ns, size_t be_idx)
{
    if (r->held_head + r->n_held == r->cap_held) {
        if (r->held_head > 0) { /* compact */
            memmove(r->held, r->held + r->held_head, r->n_held * sizeof *r->held);
            r->held_head = 0;
        }
        if (r->n_held == r->cap_held) {
            size_t nc = r->cap_held ? r->cap_held * 2 : 65536;
            struct held_free *nh = realloc(r->held, nc * sizeof *nh);
            if (!nh) {
                rb_free(r, rid); /* out of memory: free now rather than never */
                return;
            }
            r->held = nh;
            r->cap_held = nc;
        }
    }
    struct held_free *h = &r->held[r->held_head + r->n_held++];
    memcpy(h->rid, rid, 16);
    h->due_ns = due_ns;
    h->be_idx = be_idx;
}

/* Publishes the held frees that are due (all of them when all is set). */
static void rb_release_frees(rb_run *r, bool all)
{
    int64_t now = kvr_mono_ns();
    while (r->n_held > 0) {
        struct held_free *h = &r->held[r->held_head];
        if (!all && h->due_ns > now)
            break;
        rb_free(r, h->rid);
        if (h->be_idx < r->n_be)
            r->be[h->be_idx].free_ns = now;
        r->held_head++;
        r->n_held--;
    }
}

static void rb_on_free_timer(uv_timer_t *t)
{
    rb_release_frees(t->data, false);
}

static void rb_on_reply(int status, const char *data, size_t len, void *cbdata)
{
    rb_req *q = cbdata;
    rb_run *r = q->r;
    int64_t now = kvr_mono_ns();
    r->inflight--;
    if (status == 0) {
        kvr_route_reply rep;
        int rc = kvr_route_reply_decode(data, len, &rep, NULL);
        bool ok = rc == 0 && rep.ok;
        uint64_t router = rep.router_id, worker = rep.worker_id;
        uint64_t wbookings = rep.has_view ? rep.worker_bookings : 0;
        uint64_t decided = rep.has_view ? rep.decided_ns : 0;
        kvr_slice mode = rep.mode, err = rep.error;
        if (rc == 0 && ok) {
            r->ok++;
            if (kvr_slice_eq_cstr(mode, "raft"))
                r->mode_raft++;
            else if (kvr_slice_eq_cstr(mode, "local"))
                r->mode_local++;
            else
                r->mode_other++;
            if (router >= 1 && router <= RB_MAX_ROUTERS)
                r->by_router[router]++;
            else
                r->by_router_other++;
            if (r->n_lat == r->cap_lat) {
                size_t nc = r->cap_lat ? r->cap_lat * 2 : 65536;
                int64_t *nl = realloc(r->lat_us, nc * sizeof *nl);
                if (nl) {
                    r->lat_us = nl;
                    r->cap_lat = nc;
                }
            }
            if (r->n_lat < r->cap_lat)
                r->lat_us[r->n_lat++] = (now - q->t0_ns) / 1000;
            size_t be_idx = SIZE_MAX;
            if (r->record_be && decided && wbookings) {
                if (r->n_be == r->cap_be) {
                    size_t nc = r->cap_be ? r->cap_be * 2 : 65536;
                    struct be_rec *nb = realloc(r->be, nc * sizeof *nb);
                    if (nb) {
                        r->be = nb;
                        r->cap_be = nc;
                    }
                }
                if (r->n_be < r->cap_be) {
                    be_idx = r->n_be;
                    r->be[r->n_be++] =
                        (struct be_rec){worker, (int64_t)decided, now, (uint32_t)(wbookings - 1)};
                }
            }
            /* the request is over: free its booking at once, or after --free-after-ms */
            if (r->o->free_after_ms <= 0)
                rb_free(r, q->rid);
            else
                rb_hold_free(r, q->rid, now + (int64_t)r->o->free_after_ms * 1000000, be_idx);
        } else {
            r->failed++;
            if (!r->first_error[0])
                snprintf(r->first_error, sizeof r->first_error, "%.*s",
                         rc == 0 ? (int)(err.len > 150 ? 150 : err.len) : 17,
                         rc == 0 ? (err.base ? err.base : "") : "malformed reply");
        }
    } else if (status == KVR_ETIMEDOUT) {
        r->timeouts++;
    } else if (status == KVR_NATS_NO_RESPONDERS &&
               kvr_route_target_no_responders(&r->target, q->subject, kvr_mono_ms())) {
        r->leader_fallbacks++; /* as a frontend does: the same request to any router, at once */
        if (rb_send_req(r, q) == 0)
            return;
        q = NULL;
    } else if (status == KVR_NATS_NO_RESPONDERS) {
        r->no_responders++;
    } else {
        r->closed++;
    }
    free(q);
    if (!r->stopping)
        rb_send(r);
}

/* Sends q (its id written into its template) to the subject the route target says; on failure
 * counts it, frees q and returns non-zero. */
static int rb_send_req(rb_run *r, rb_req *q)
{
    memcpy(r->tpl[q->tpl].base + r->rid_off[q->tpl], q->rid, 16);
    q->subject = kvr_route_target_subject(&r->target, 1, kvr_mono_ms());
    r->inflight++;
    int rc = kvr_nats_request(&r->nats, q->subject, r->tpl[q->tpl].base, r->tpl[q->tpl].len,
                              (uint32_t)r->o->timeout_ms, rb_on_reply, q);
    if (rc != 0) {
        r->inflight--;
        free(q);
        r->failed++;
        if (!r->first_error[0])
            snprintf(r->first_error, sizeof r->first_error, "request not sent: %s",
                     kvr_strerror(rc));
    }
    return rc;
}

static void rb_send(rb_run *r)
{
    if (r->o->max_requests && r->sent >= r->o->max_requests) {
        if (!r->stopping) {
            r->stopping = true;
            r->t_end_ns = kvr_mono_ns();
        }
        return;
    }
    rb_req *q = malloc(sizeof *q);
    if (!q) {
        r->failed++;
        return;
    }
    q->r = r;
    q->tpl = (size_t)(rb_rnd(&r->rng) % RB_TEMPLATES);
    uint64_t id = ++r->next_id;
    memcpy(q->rid, &id, 8);
    memcpy(q->rid + 8, &r->tag, 8);
    q->t0_ns = kvr_mono_ns();
    if (rb_send_req(r, q) != 0)
        return;
    r->sent++;
}

static void rb_on_stop(uv_timer_t *t)
{
    rb_run *r = t->data;
    if (!r->stopping) {
        r->stopping = true;
        r->t_end_ns = kvr_mono_ns();
    }
}

static void rb_on_poll(uv_timer_t *t)
{
    if (rb_stop)
        rb_on_stop(t);
}

static void rb_on_state(kvr_nats *kn, kvr_nats_state st, void *data)
{
    rb_run *r = data;
    if (st == KVR_NATS_CONNECTED || st == KVR_NATS_RECONNECTED)
        r->conn_up = true;
}

static void rb_on_closed(kvr_nats *kn)
{
    rb_run *r = kn->data;
    r->nats_closed = true;
}

int rb_cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

int64_t rb_pct(const int64_t *v, size_t n, double p)
{
    if (n == 0)
        return 0;
    size_t i = (size_t)ceil(p * (double)n); /* nearest rank */
    return v[i ? i - 1 : 0];
}

/* Builds the request templates: B random seq hashes each (no worker holds them: the index is
 * empty, so every route books by load alone; the cost of matching is still paid). */
static int rb_templates(rb_run *r)
{
    r->rng = 0x9E3779B97F4A7C15ull ^ r->tag;
    for (size_t k = 0; k < RB_TEMPLATES; k++) {
        kvr_buf *b = &r->tpl[k];
        kvr_buf_init(b);
        int rc = 0;
        uint32_t blocks = 1 + (uint32_t)(rb_rnd(&r->rng) % (uint64_t)r->o->blocks);
        uint64_t *hashes = malloc(blocks * sizeof *hashes);
        if (!hashes)
            return -1;
        for (uint32_t i = 0; i < blocks; i++)
            hashes[i] = rb_rnd(&r->rng);
        kvr_route_req rq = {.frontend_id = 7,
                            .model = {r->model, strlen(r->model)},
                            .ns = {r->ns, strlen(r->ns)},
                            .role = {"both", 4},
                            .tokens = blocks * 64,
                            .seq_hashes = hashes,
                            .n_hashes = blocks};
        memcpy(rq.request_id, "0123456789abcdef", 16);
        rc = kvr_route_req_encode(b, &rq);
        free(hashes);
        r->rid_off[k] = KVR_ROUTE_REQ_ID_OFFSET;
        if (rc != 0)
            return -1;
    }
    return 0;
}

/* Runs the load; returns 0 when the loop ran (results in r), -1 when it could not start. */
int rb_load(rb_run *r)
{
    if (rb_templates(r) != 0) {
        fprintf(stderr, "kvr-bench raft: out of memory building requests\n");
        return -1;
    }
    if (uv_loop_init(&r->loop) != 0)
        return -1;
    kvr_err err = {0};
    kvr_nats_opts no = {
        .url = r->nats_url, .name = "kvr-bench-raft", .on_state = rb_on_state, .state_data = r};
    r->nats.data = r;
    if (kvr_nats_init(&r->nats, &r->loop, &no, &err) != 0) {
        fprintf(stderr, "kvr-bench raft: nats: %s\n", err.msg);
        uv_loop_close(&r->loop);
        return -1;
    }
    uv_timer_init(&r->loop, &r->stop_timer);
    uv_timer_init(&r->loop, &r->poll_timer);
    uv_timer_init(&r->loop, &r->free_timer);
    r->stop_timer.data = r->poll_timer.data = r->free_timer.data = r;
    uv_timer_start(&r->poll_timer, rb_on_poll, 50, 50);
    if (r->o->free_after_ms > 0)
        uv_timer_start(&r->free_timer, rb_on_free_timer, 1, 1);
    int64_t deadline = kvr_mono_ms() + 10000;
    while (!r->conn_up && !rb_stop && kvr_mono_ms() < deadline)
        uv_run(&r->loop, UV_RUN_ONCE);
    int rc = 0;
    if (!r->conn_up) {
        fprintf(stderr, "kvr-bench raft: could not connect to %s\n", r->nats_url);
        rc = -1;
    } else if (!rb_stop) {
        uv_timer_start(&r->stop_timer, rb_on_stop, (uint64_t)r->o->duration_s * 1000, 0);
        r->t0_ns = kvr_mono_ns();
        for (int i = 0; i < r->o->inflight && !r->stopping; i++)
            rb_send(r);
        while (!r->stopping || r->inflight > 0)
            uv_run(&r->loop, UV_RUN_ONCE);
    }
    if (!r->t_end_ns)
        r->t_end_ns = kvr_mono_ns();
    uv_timer_stop(&r->stop_timer);
    uv_timer_stop(&r->poll_timer);
    uv_timer_stop(&r->free_timer);
    if (r->conn_up)
        rb_release_frees(r, true); /* the load is over: every booking still held goes now */
    kvr_nats_close(&r->nats, rb_on_closed); /* flushes the last frees */
    uv_close((uv_handle_t *)&r->stop_timer, NULL);
    uv_close((uv_handle_t *)&r->poll_timer, NULL);
    uv_close((uv_handle_t *)&r->free_timer, NULL);
    while (!r->nats_closed)
        uv_run(&r->loop, UV_RUN_ONCE);
    uv_run(&r->loop, UV_RUN_DEFAULT);
    uv_loop_close(&r->loop);
    for (size_t k = 0; k < RB_TEMPLATES; k++)
        kvr_buf_free(&r->tpl[k]);
    return rc;
}

/* Best-effort phase: a decision was made on stale load when the deciding router knew of fewer
 * live bookings on the worker it chose than there were: another router had booked it and the
 * broadcast had not arrived yet. Live = from a booking's decision to this client's free (all
 * processes share the monotonic clock). A conservative count: a router that has not yet heard
 * of a free counts that booking as live, which can mask a missing one. */
static int cmp_be_worker(const void *a, const void *b)
{
    uint64_t x = ((const struct be_rec *)a)->worker, y = ((const struct be_rec *)b)->worker;
    return x < y ? -1 : x > y;
}

/* Index of the first of v[0..n) (sorted) that is >= x (strict) or > x (!strict). */
size_t rb_lower(const int64_t *v, size_t n, int64_t x, bool strict)
{
    size_t a = 0, b = n;
    while (a < b) {
        size_t mid = (a + b) / 2;
        if (strict ? v[mid] < x : v[mid] <= x)
            a = mid + 1;
        else
            b = mid;
    }
    return a;
}

void rb_be_analyse(rb_phase *ph)
{
    rb_run *r = &ph->run;
    size_t n = r->n_be;
    ph->be_decisions = n;
    ph->be_stale = 0;
    int64_t *st = n ? malloc(n * sizeof *st) : NULL, *en = n ? malloc(n * sizeof *en) : NULL;
    if (!st || !en)
        goto out;
    qsort(r->be, n, sizeof *r->be, cmp_be_worker);
    for (size_t lo = 0; lo < n;) {
        size_t hi = lo;
        while (hi < n && r->be[hi].worker == r->be[lo].worker)
            hi++;
        size_t m = hi - lo;
        for (size_t k = 0; k < m; k++) {
            st[k] = r->be[lo + k].decided_ns;
            en[k] = r->be[lo + k].free_ns;
        }
        qsort(st, m, sizeof *st, rb_cmp_i64);
        qsort(en, m, sizeof *en, rb_cmp_i64);
        for (size_t k = 0; k < m; k++) {
            const struct be_rec *e = &r->be[lo + k];
            /* booked strictly before this decision, minus freed at or before it */
            size_t started = rb_lower(st, m, e->decided_ns, true);
            size_t ended = rb_lower(en, m, e->decided_ns, false);
            uint64_t live = started > ended ? started - ended : 0;
            if (e->seen < live)
                ph->be_stale++;
        }
        lo = hi;
    }
out:
    free(st);
    free(en);
}
