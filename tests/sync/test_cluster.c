/* A real 3-node kvr_sync group in one process: one uv loop, loopback TCP (Raft + forwarding),
 * real data dirs. Leader loss mid-burst, restart and catch-up, quorum loss (local mode) and
 * reconciliation. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <ftw.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "kvr_log.h"
#include "sync.h"
#include "sync_test_util.h"

#define N 3

static uv_loop_t loop;
static char tmpdir[256];
static int base_port;
static kvr_sync *nodes[N + 2]; /* N voters + one node added at run time */
static char peers[256];
static char urls[8][64];

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

/* Ports P..P+2N-1 must be free (raft port and raft port + 1 per node). Start from a value
 * derived from the pid and probe by binding. They are taken from below Linux's ephemeral range
 * (32768-60999): node 4 binds minutes after the probe, and a port in that range can meanwhile
 * become some other process's outgoing connection (seen under ASan in CI: "Address already in
 * use" for node 4). */
static int port_free(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int ok = bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
    close(fd);
    return ok;
}

static int pick_base_port(void)
{
    for (int attempt = 0; attempt < 200; attempt++) {
        int p = 10000 + (int)((getpid() * 7919u + (unsigned)attempt * 104729u) % 22000);
        int ok = 1;
        for (int i = 0; i < 2 * (N + 1) && ok; i++)
            ok = port_free(p + i);
        if (ok)
            return p;
    }
    return -1;
}

static void start_node(int id)
{
    kvr_sync_options o;
    kvr_sync_options_default(&o);
    char addr[64], dir[512];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", base_port + 2 * (id - 1));
    snprintf(dir, sizeof dir, "%s/node%d", tmpdir, id);
    o.id = (uint32_t)id;
    o.raft_addr = addr;
    o.peers = peers;
    o.data_dir = dir;
    o.election_timeout_ms = 300;
    o.heartbeat_timeout_ms = 50;
    o.degraded_after_ms = 1500;
    o.forward_timeout_ms = 500;
    o.max_wait_ms = 10000;
    o.snapshot_threshold = getenv("SNAP") ? (uint32_t)atoi(getenv("SNAP")) : 16;
    o.snapshot_trailing = 4;
    o.join = id > N;
    o.housekeeping_ms = 100;
    o.lease_ttl_ms = 1500;
    /* sync_cluster_mem: the same scenario on the in-memory log (memlog.h; restarts come back
     * empty and catch up from the leader) */
    o.memory_log = getenv("KVR_SYNC_MEMORY") && *getenv("KVR_SYNC_MEMORY") == '1';
    o.coalesce_us = 30000; /* wide, so the coalescing check below is not a race */
    /* sync_cluster_auth: Raft and forwarding over the authenticated transport
     * (auth_transport.h), whose read buffer hands raft its messages in the pieces raft asks
     * for; run without snapshots on the in-memory log, a restarted node catches up through
     * one AppendEntries larger than that buffer */
    static kvr_auth_key key;
    if (getenv("KVR_SYNC_AUTH") && *getenv("KVR_SYNC_AUTH") == '1') {
        key.len = 32;
        memset(key.k, 0x5a, key.len);
        o.auth_key = &key;
    }
    kvr_err e = {0};
    int rc = kvr_sync_init(&nodes[id], &loop, &o, &e);
    if (rc)
        fail_msg("init node %d: %s", id, e.msg);
    rc = kvr_sync_start(nodes[id], &e);
    if (rc)
        fail_msg("start node %d: %s", id, e.msg);
}

static int closed_count;
static void on_closed(void *data)
{
    (void)data;
    closed_count++;
}

static void stop_node(int id)
{
    int before = closed_count;
    kvr_sync_close(nodes[id], on_closed, NULL);
    nodes[id] = NULL;
    while (closed_count == before)
        uv_run(&loop, UV_RUN_ONCE);
}

static void wake(uv_timer_t *t)
{
    (void)t;
}

/* Runs the loop until cond() or timeout. */
static bool run_until(bool (*cond)(void *), void *arg, int timeout_ms)
{
    uv_timer_t t;
    uv_timer_init(&loop, &t);
    uv_timer_start(&t, wake, 5, 5);
    int64_t end = kvr_mono_ms() + timeout_ms;
    bool ok = false;
    while (kvr_mono_ms() < end) {
        if (cond(arg)) {
            ok = true;
            break;
        }
        uv_run(&loop, UV_RUN_ONCE);
    }
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
    return ok;
}

static uint32_t leader_of_all(void)
{
    uint32_t l = 0;
    for (int i = 1; i <= N; i++) {
        if (!nodes[i])
            continue;
        kvr_sync_state st;
        kvr_sync_get_state(nodes[i], &st);
        if (st.leader_id == 0 || (l && st.leader_id != l))
            return 0;
        l = st.leader_id;
    }
    return l && nodes[l] ? l : 0;
}

static bool have_leader(void *arg)
{
    (void)arg;
    return leader_of_all() != 0;
}

typedef struct answer {
    int done, status;
    kvr_sync_mode mode;
    kvr_fsm_result res;
    int node;
    int64_t done_ns;
} answer;

static void on_answer(kvr_sync *s, int status, const kvr_fsm_result *res, kvr_sync_mode mode, void *data)
{
    (void)s;
    answer *a = data;
    a->done++;
    a->done_ns = kvr_mono_ns();
    a->status = status;
    a->mode = mode;
    if (res)
        a->res = *res;
}

typedef struct wait_all {
    answer *a;
    int n;
} wait_all;

static bool all_done(void *arg)
{
    wait_all *w = arg;
    for (int i = 0; i < w->n; i++)
        if (!w->a[i].done)
            return false;
    return true;
}

static void submit_route(int node, uint64_t rid, answer *a)
{
    kvr_route_candidate cand[2] = {{rid % 4 + 1, 3}, {(rid + 1) % 4 + 1, 1}};
    kvr_cmd c = tu_route(rid, 5, (uint64_t)kvr_now_ms(), 4, cand, 2);
    memset(a, 0, sizeof *a);
    a->node = node;
    assert_int_equal(kvr_sync_route(nodes[node], &c.u.route, on_answer, a), 0);
}

/* arg non-NULL: compare only the nodes that are running */
static bool digests_equal(void *arg)
{
    uint64_t d = 0;
    uint64_t applied = 0;
    int k = 0;
    for (int i = 1; i <= N; i++) {
        if (!nodes[i]) {
            if (arg)
                continue;
            return false;
        }
        kvr_sync_state st;
        kvr_sync_get_state(nodes[i], &st);
        if (k++ == 0) {
            d = st.digest;
            applied = st.applied_index;
        } else if (st.digest != d || st.applied_index != applied) {
            return false;
        }
    }
    return true;
}

static void check_booked(int node, uint64_t rid, uint64_t worker)
{
    uint8_t id[16];
    tu_rid(id, rid);
    kvr_fsm_booking_view bv;
    int rc = kvr_fsm_booking_get(kvr_sync_fsm(nodes[node]), id, &bv);
    if (rc != 0)
        fail_msg("node %d: request %llu not booked", node, (unsigned long long)rid);
    assert_int_equal(bv.worker_id, worker);
}

static int change_status;
static void on_change(kvr_sync *s, int status, void *data)
{
    (void)s;
    (void)data;
    change_status = status;
}
static bool change_done(void *arg)
{
    (void)arg;
    return change_status != 1;
}

static bool lease_gone(void *arg)
{
    (void)arg;
    uint64_t last;
    for (int i = 1; i <= N; i++)
        if (kvr_fsm_frontend_last_seen(kvr_sync_fsm(nodes[i]), 9, &last) == 0)
            return false;
    return true;
}

static bool digests_equal4(void *arg)
{
    (void)arg;
    kvr_sync_state a, b;
    kvr_sync_get_state(nodes[N + 1], &b);
    for (int i = 1; i <= N; i++) {
        kvr_sync_get_state(nodes[i], &a);
        if (a.digest != b.digest || a.applied_index != b.applied_index)
            return false;
    }
    return true;
}

#define BURST 400

typedef struct feeder {
    answer *a;
    int sent, dead;
} feeder;

/* Each tick submits 3 commands to every live node. */
static void feed(uv_timer_t *t)
{
    feeder *f = t->data;
    for (int k = 0; k < 3; k++)
        for (int nd = 1; nd <= N && f->sent < 3 * BURST; nd++) {
            int to = nd;
            for (int k2 = 0; !nodes[to] && k2 < N; k2++)
                to = to % N + 1; /* a stopped node's share goes to the next live one */
            submit_route(to, (uint64_t)f->sent + 1, &f->a[f->sent]);
            f->sent++;
        }
}

static bool fed_half(void *arg)
{
    feeder *f = arg;
    int done = 0;
    for (int i = 0; i < f->sent; i++)
        done += f->a[i].done;
    return f->sent >= 3 * BURST / 2 && done > 0;
}

static bool fed_all(void *arg)
{
    return ((feeder *)arg)->sent >= 3 * BURST;
}

static int sum_blocks(const kvr_fsm_booking_view *b, void *data)
{
    uint64_t *sum = data;
    if (b->worker_id < 16)
        sum[b->worker_id] += b->blocks;
    return 0;
}

static void test_cluster(void **state)
{
    (void)state;
    kvr_log_setup("test", NULL, getenv("KVR_TEST_LOG") ? KVR_LOG_DEBUG : KVR_LOG_WARN);
    assert_int_equal(uv_loop_init(&loop), 0);
    base_port = pick_base_port();
    assert_true(base_port > 0);
    snprintf(peers, sizeof peers, "1@127.0.0.1:%d,2@127.0.0.1:%d,3@127.0.0.1:%d", base_port,
             base_port + 2, base_port + 4);
    for (int i = 1; i <= N; i++)
        start_node(i);
    assert_true(run_until(have_leader, NULL, 10000));
    uint32_t leader = leader_of_all();
    print_message("leader %u elected\n", leader);

    /* workers, registered through a follower (forwarded) */
    int follower = leader == 1 ? 2 : 1;
    answer wa[4];
    for (int w = 0; w < 4; w++) {
        kvr_cmd c = tu_worker_up((uint64_t)w + 1, "m", "ns", urls[w + 1], sizeof urls[w + 1]);
        memset(&wa[w], 0, sizeof wa[w]);
        assert_int_equal(kvr_sync_submit(nodes[follower], &c, on_answer, &wa[w]), 0);
    }
    wait_all ww = {wa, 4};
    assert_true(run_until(all_done, &ww, 10000));
    for (int w = 0; w < 4; w++) {
        assert_int_equal(wa[w].status, 0);
        assert_int_equal(wa[w].res.outcome, KVR_OUT_OK);
        assert_int_equal(wa[w].mode, KVR_SYNC_RAFT);
    }

    /* a disaggregated ROUTE submitted on a follower: the pair the leader's apply booked comes
     * back through the forward reply (path, prefill worker and its url); then the prefill
     * worker goes down again, so the rest of the test routes among workers 1-4 as before */
    {
        answer da[4];
        memset(da, 0, sizeof da);
        kvr_cmd up = tu_worker_up(7, "m", "ns", urls[7], sizeof urls[7]);
        up.u.worker.role = KVR_ROLE_PREFILL;
        assert_int_equal(kvr_sync_submit(nodes[follower], &up, on_answer, &da[0]), 0);
        wait_all w0 = {da, 1};
        assert_true(run_until(all_done, &w0, 10000));
        kvr_cmd r = tu_route(800000, 7, 1000, 40, NULL, 0);
        r.u.route.disagg = true;
        r.u.route.tokens = 40 * 64;
        r.u.route.block_size = 64;
        r.u.route.max_local_prefill = 1000;
        r.u.route.max_prefill_queue = 2;
        assert_int_equal(kvr_sync_submit(nodes[follower], &r, on_answer, &da[1]), 0);
        wait_all w1 = {da + 1, 1};
        assert_true(run_until(all_done, &w1, 10000));
        assert_int_equal(da[1].status, 0);
        assert_int_equal(da[1].mode, KVR_SYNC_RAFT);
        assert_int_equal(da[1].res.outcome, KVR_OUT_OK);
        assert_int_equal(da[1].res.path, KVR_DISAGG_REMOTE);
        assert_true(da[1].res.prefill_worker_id == 7);
        assert_string_equal(da[1].res.prefill_url, urls[7]);
        assert_true(da[1].res.worker_id >= 1 && da[1].res.worker_id <= 4);
        kvr_cmd fr = tu_req(KVR_CMD_FREE, 800000);
        kvr_cmd down = {.type = KVR_CMD_WORKER_DOWN, .u.worker_id = 7};
        assert_int_equal(kvr_sync_submit(nodes[follower], &fr, on_answer, &da[2]), 0);
        assert_int_equal(kvr_sync_submit(nodes[follower], &down, on_answer, &da[3]), 0);
        wait_all w2 = {da + 2, 2};
        assert_true(run_until(all_done, &w2, 10000));
        assert_int_equal(da[2].res.freed, 1);
    }

    /* group commit: commands that reach the leader while an entry awaits its commit wait and
     * go out together in the next entry, instead of one entry (a disk write on every node) each */
    {
        enum { GC = 24 };
        static answer ga[GC], gf[GC];
        kvr_sync_metrics m0, m1;
        kvr_sync_get_metrics(nodes[leader], &m0);
        for (int i = 0; i < GC; i++) {
            submit_route((int)leader, 900000 + (uint64_t)i, &ga[i]);
            uv_run(&loop, UV_RUN_NOWAIT); /* one loop turn: proposes if nothing is in flight */
        }
        wait_all gw = {ga, GC};
        assert_true(run_until(all_done, &gw, 10000));
        kvr_sync_get_metrics(nodes[leader], &m1);
        print_message("group commit: %d commands over %d loop turns in %llu entries\n", GC, GC,
                      (unsigned long long)(m1.proposals - m0.proposals));
        /* on the memory log an entry commits within a loop turn or two: fewer share one */
        bool mem = getenv("KVR_SYNC_MEMORY") && *getenv("KVR_SYNC_MEMORY") == '1';
        assert_true(m1.proposals - m0.proposals < (mem ? GC : GC / 2));
        for (int i = 0; i < GC; i++) {
            assert_int_equal(ga[i].status, 0);
            kvr_cmd f = tu_req(KVR_CMD_FREE, 900000 + (uint64_t)i);
            memset(&gf[i], 0, sizeof gf[i]);
            assert_int_equal(kvr_sync_submit(nodes[leader], &f, on_answer, &gf[i]), 0);
        }
        wait_all gfw = {gf, GC};
        assert_true(run_until(all_done, &gfw, 10000));
    }

    /* burst from every node, fed over many loop turns (so it spans many log entries and
     * snapshots); the leader is closed half-way with commands in flight */
    static answer ra[3 * BURST];
    feeder fd = {ra, 0, 0};
    uv_timer_t ft;
    uv_timer_init(&loop, &ft);
    ft.data = &fd;
    uv_timer_start(&ft, feed, 1, 1);
    assert_true(run_until(fed_half, &fd, 20000));
    int in_flight = 0;
    for (int i = 0; i < fd.sent; i++)
        in_flight += !ra[i].done;
    stop_node((int)leader);
    fd.dead = (int)leader;
    assert_true(run_until(fed_all, &fd, 30000));
    uv_close((uv_handle_t *)&ft, NULL);
    int sent = fd.sent;
    /* commands the closed node could not answer come back ECLOSED: resubmit elsewhere with the
     * same request id, as a frontend would */
    int alive = leader == 1 ? 2 : 1;
    int resubmitted = 0;
    wait_all all = {ra, sent};
    for (int round = 0; round < 3; round++) {
        assert_true(run_until(all_done, &all, 30000));
        for (int i = 0; i < sent; i++)
            if (ra[i].status == KVR_ECLOSED) {
                submit_route(alive, (uint64_t)i + 1, &ra[i]);
                resubmitted++;
            }
    }
    assert_true(run_until(all_done, &all, 30000));
    assert_true(run_until(have_leader, NULL, 10000));
    uint32_t leader2 = leader_of_all();
    assert_true(leader2 != leader);
    print_message("leader %u closed mid-burst (%d in flight), new leader %u, %d resubmitted\n", leader,
                  in_flight, leader2, resubmitted);
    assert_true(in_flight > 0);
    /* followers learn the commit index with the next heartbeat */
    assert_true(run_until(digests_equal, "alive", 10000));
    int n_local = 0;
    for (int i = 0; i < sent; i++) {
        assert_int_equal(ra[i].done, 1);
        assert_int_equal(ra[i].status, 0);
        assert_true(ra[i].res.outcome == KVR_OUT_OK || ra[i].res.outcome == KVR_OUT_DUPLICATE);
        n_local += ra[i].mode == KVR_SYNC_LOCAL;
    }
    assert_int_equal(n_local, 0);
    /* none booked twice: every answer names the worker the replicas hold */
    for (int nd = 1; nd <= N; nd++) {
        if (!nodes[nd])
            continue;
        kvr_sync_state s0;
        kvr_sync_get_state(nodes[nd], &s0);
        print_message("node %d role=%s leader=%u term=%llu commit=%llu applied=%llu bookings=%u workers=%u\n", nd,
                      s0.role, s0.leader_id, (unsigned long long)s0.term, (unsigned long long)s0.commit_index,
                      (unsigned long long)s0.applied_index, s0.bookings, s0.workers);
        assert_int_equal(kvr_fsm_booking_count(kvr_sync_fsm(nodes[nd])), sent);
        for (int i = 0; i < sent; i++)
            check_booked(nd, (uint64_t)i + 1, ra[i].res.worker_id);
    }

    /* restart the closed node: it catches up (snapshot + log) */
    start_node((int)leader);
    if (!run_until(digests_equal, NULL, 20000)) {
        for (int nd = 1; nd <= N; nd++) {
            kvr_sync_state s0;
            kvr_sync_get_state(nodes[nd], &s0);
            print_message("node %d role=%s leader=%u term=%llu commit=%llu applied=%llu bookings=%u digest=%llx\n", nd,
                          s0.role, s0.leader_id, (unsigned long long)s0.term, (unsigned long long)s0.commit_index,
                          (unsigned long long)s0.applied_index, s0.bookings, (unsigned long long)s0.digest);
        }
        fail_msg("restarted node did not catch up");
    }
    for (int i = 0; i < sent; i++)
        check_booked((int)leader, (uint64_t)i + 1, ra[i].res.worker_id);
    print_message("node %u restarted and caught up\n", leader);

    /* two nodes down: the survivor answers locally after degraded_after */
    int survivor = 3, down1 = 1, down2 = 2;
    stop_node(down1);
    stop_node(down2);
    static answer la[40];
    for (int i = 0; i < 40; i++)
        submit_route(survivor, 100000 + (uint64_t)i, &la[i]);
    wait_all lw = {la, 40};
    assert_true(run_until(all_done, &lw, 20000));
    for (int i = 0; i < 40; i++) {
        assert_int_equal(la[i].status, 0);
        assert_int_equal(la[i].mode, KVR_SYNC_LOCAL);
        assert_int_equal(la[i].res.outcome, KVR_OUT_OK);
    }
    /* half of them finish while still degraded */
    static answer fa[20];
    for (int i = 0; i < 20; i++) {
        kvr_cmd f = tu_req(KVR_CMD_FREE, 100000 + (uint64_t)i);
        memset(&fa[i], 0, sizeof fa[i]);
        assert_int_equal(kvr_sync_submit(nodes[survivor], &f, on_answer, &fa[i]), 0);
    }
    wait_all fw = {fa, 20};
    assert_true(run_until(all_done, &fw, 10000));
    for (int i = 0; i < 20; i++)
        assert_int_equal(fa[i].mode, KVR_SYNC_LOCAL);
    kvr_sync_state st;
    kvr_sync_get_state(nodes[survivor], &st);
    assert_true(st.degraded);
    assert_int_equal(st.bookings, sent); /* the Raft replica is untouched */

    /* both back: quorum, reconcile, convergence. Ten of the locally live requests finish as
     * soon as the two are back, through a restarted node: their FREEs race the survivor's
     * pinned reconcile ROUTEs to Raft; in either commit order nothing may stay booked. */
    start_node(down1);
    start_node(down2);
    static answer ea[10];
    for (int i = 0; i < 10; i++) {
        kvr_cmd f = tu_req(KVR_CMD_FREE, 100030 + (uint64_t)i);
        memset(&ea[i], 0, sizeof ea[i]);
        assert_int_equal(kvr_sync_submit(nodes[down1], &f, on_answer, &ea[i]), 0);
    }
    assert_true(run_until(have_leader, NULL, 20000));
    assert_true(run_until(digests_equal, NULL, 20000));
    /* digests can be equal before the reconcile proposals land: wait for the bookings */
    for (int tries = 0; tries < 200; tries++) {
        kvr_sync_get_state(nodes[survivor], &st);
        if (st.bookings == (uint32_t)sent + 10 && st.local_pending == 0)
            break;
        run_until(digests_equal, NULL, 100);
        uv_sleep(10);
    }
    wait_all ew = {ea, 10};
    assert_true(run_until(all_done, &ew, 20000));
    assert_true(run_until(digests_equal, NULL, 20000));
    for (int nd = 1; nd <= N; nd++) {
        kvr_sync_get_state(nodes[nd], &st);
        assert_int_equal(st.bookings, sent + 10);
        for (int i = 20; i < 30; i++)
            check_booked(nd, 100000 + (uint64_t)i, la[i].res.worker_id);
        /* load accounting = the sum of the live bookings, per worker */
        uint64_t sum[16] = {0};
        kvr_fsm_foreach_booking(kvr_sync_fsm(nodes[nd]), sum_blocks, sum);
        kvr_fsm_worker_view wv;
        for (uint32_t w = 0; kvr_fsm_worker_at(kvr_sync_fsm(nodes[nd]), w, &wv) == 0; w++)
            assert_true(wv.id < 16 && wv.active_blocks == sum[wv.id]);
        for (int i = 0; i < 20; i++) {
            uint8_t id[16];
            kvr_fsm_booking_view bv;
            tu_rid(id, 100000 + (uint64_t)i);
            assert_int_equal(kvr_fsm_booking_get(kvr_sync_fsm(nodes[nd]), id, &bv), KVR_ENOTFOUND);
            tu_rid(id, 100030 + (uint64_t)(i % 10));
            assert_int_equal(kvr_fsm_booking_get(kvr_sync_fsm(nodes[nd]), id, &bv), KVR_ENOTFOUND);
            assert_true(kvr_fsm_finished_has(kvr_sync_fsm(nodes[nd]), id));
        }
    }
    kvr_sync_metrics m;
    kvr_sync_get_metrics(nodes[survivor], &m);
    print_message("reconciled=%llu degraded_answers=%llu forwards=%llu\n",
                  (unsigned long long)m.reconciled, (unsigned long long)m.degraded_answers,
                  (unsigned long long)m.forwards);
    assert_true(m.reconciled >= 20);

    /* frontend lease: frontend 9 is seen once, books, then goes silent: the leader expires
     * its lease after lease_ttl_ms and its booking is freed on every replica */
    {
        kvr_cmd seen = {.type = KVR_CMD_FRONTEND_SEEN};
        seen.u.frontend.frontend_id = 9;
        seen.u.frontend.now_ms = (uint64_t)kvr_now_ms();
        answer sa, ba;
        memset(&sa, 0, sizeof sa);
        assert_int_equal(kvr_sync_submit(nodes[1], &seen, on_answer, &sa), 0);
        kvr_cmd bk = tu_route(555555, 9, (uint64_t)kvr_now_ms(), 4, NULL, 0);
        memset(&ba, 0, sizeof ba);
        assert_int_equal(kvr_sync_route(nodes[2], &bk.u.route, on_answer, &ba), 0);
        wait_all bw = {&sa, 1}, bw2 = {&ba, 1};
        assert_true(run_until(all_done, &bw, 10000));
        assert_true(run_until(all_done, &bw2, 10000));
        assert_int_equal(ba.res.outcome, KVR_OUT_OK);
        uint64_t last;
        assert_true(run_until(digests_equal, NULL, 1000));
        assert_int_equal(kvr_fsm_frontend_last_seen(kvr_sync_fsm(nodes[3]), 9, &last), 0);
        assert_true(run_until(lease_gone, NULL, 10000));
        assert_true(run_until(digests_equal, NULL, 10000));
        for (int nd = 1; nd <= N; nd++) {
            uint8_t id[16];
            kvr_fsm_booking_view bv;
            tu_rid(id, 555555);
            assert_int_equal(kvr_fsm_booking_get(kvr_sync_fsm(nodes[nd]), id, &bv), KVR_ENOTFOUND);
        }
        print_message("frontend lease expired, its booking freed everywhere\n");
    }

    /* membership at run time: node 4 starts empty, is added as a spare, promoted to voter,
     * catches up; then removed again */
    start_node(N + 1);
    uint32_t ldr = leader_of_all();
    assert_true(ldr > 0);
    char addr4[64];
    snprintf(addr4, sizeof addr4, "127.0.0.1:%d", base_port + 2 * N);
    change_status = 1;
    uint32_t other = 0;
    int l2 = ldr == 1 ? 2 : 1;
    assert_int_equal(kvr_sync_add_node(nodes[l2], N + 1, addr4, on_change, NULL, &other), KVR_EAGAIN);
    assert_int_equal(other, ldr);
    assert_int_equal(kvr_sync_add_node(nodes[ldr], N + 1, addr4, on_change, NULL, NULL), 0);
    assert_true(run_until(change_done, NULL, 10000));
    assert_int_equal(change_status, 0);
    change_status = 1;
    assert_int_equal(kvr_sync_promote_node(nodes[ldr], N + 1, on_change, NULL, NULL), 0);
    assert_true(run_until(change_done, NULL, 20000));
    assert_int_equal(change_status, 0);
    assert_true(run_until(digests_equal4, NULL, 20000));
    kvr_sync_get_state(nodes[N + 1], &st);
    assert_int_equal(st.bookings, sent + 10);
    /* the new voter forwards like any router */
    answer na;
    submit_route(N + 1, 777777, &na);
    wait_all nw = {&na, 1};
    assert_true(run_until(all_done, &nw, 10000));
    assert_int_equal(na.status, 0);
    assert_int_equal(na.mode, KVR_SYNC_RAFT);
    ldr = leader_of_all();
    change_status = 1;
    assert_int_equal(kvr_sync_remove_node(nodes[ldr], N + 1, on_change, NULL, NULL), 0);
    assert_true(run_until(change_done, NULL, 10000));
    assert_int_equal(change_status, 0);
    print_message("node %d added, promoted, caught up, removed\n", N + 1);

    /* Issue 19: FREEs nobody waits for share an entry. A FREE submitted 10 ms after another
     * (well inside the 30 ms window) is committed in the same entry: both answered in the
     * same batch callback. Without coalescing the first is proposed at once, alone. The
     * premise is the gap: a loaded machine can stall the 10 ms wait past the window (CI saw
     * it once), so a try whose second FREE left 20 ms or more after the first is run again
     * (at most 3 tries; the assertions hold for the try that kept the premise). */
    ldr = leader_of_all();
    assert_true(ldr > 0);
    answer cf[2];
    wait_all w1 = {cf, 2};
    int64_t t0 = 0, gap = 0;
    for (int try_no = 0; try_no < 3; try_no++) {
        memset(cf, 0, sizeof cf);
        kvr_cmd f0 = tu_req(KVR_CMD_FREE, 4242001 + 10 * (uint64_t)try_no);
        kvr_cmd f1 = tu_req(KVR_CMD_FREE, 4242002 + 10 * (uint64_t)try_no);
        t0 = kvr_mono_ns();
        assert_int_equal(kvr_sync_submit(nodes[ldr], &f0, on_answer, &cf[0]), 0);
        wait_all w0 = {cf, 1};
        run_until(all_done, &w0, 10);
        gap = kvr_mono_ns() - t0;
        if (gap < 20 * 1000000LL)
            assert_int_equal(cf[0].done, 0); /* still waiting for company */
        assert_int_equal(kvr_sync_submit(nodes[ldr], &f1, on_answer, &cf[1]), 0);
        assert_true(run_until(all_done, &w1, 10000));
        if (gap < 20 * 1000000LL)
            break;
        print_message("FREE coalescing: the 10 ms wait took %.1f ms, trying again\n",
                      (double)gap / 1e6);
    }
    assert_true(gap < 20 * 1000000LL);
    assert_int_equal(cf[0].status, 0);
    assert_int_equal(cf[1].status, 0);
    assert_true(cf[0].done_ns - t0 >= 25 * 1000000LL);
    assert_true(cf[1].done_ns - cf[0].done_ns < 1000000LL);
    /* a command someone waits for takes the queued FREE along at once */
    memset(cf, 0, sizeof cf);
    kvr_cmd f2 = tu_req(KVR_CMD_FREE, 4242003);
    t0 = kvr_mono_ns();
    assert_int_equal(kvr_sync_submit(nodes[ldr], &f2, on_answer, &cf[0]), 0);
    submit_route(ldr, 4242004, &cf[1]);
    assert_true(run_until(all_done, &w1, 10000));
    assert_int_equal(cf[1].status, 0);
    assert_true(cf[1].done_ns - cf[0].done_ns < 1000000LL && cf[0].done_ns - cf[1].done_ns < 1000000LL);
    print_message("FREEs coalesced; a FREE queued with a ROUTE answered after %.1f ms\n",
                  (double)(cf[0].done_ns - t0) / 1e6);

    for (int i = 1; i <= N + 1; i++)
        if (nodes[i])
            stop_node(i);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static int setup(void **state)
{
    (void)state;
    const char *t = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/kvr-sync-test-XXXXXX", t && *t ? t : "/tmp");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    nftw(tmpdir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cluster),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
