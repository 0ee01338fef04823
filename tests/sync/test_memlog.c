/* memlog (sync/memlog.h): the vote rule of a router restarted with an empty log, driven
 * deterministically: a real struct raft over memlog over a fake inner raft_io whose clock,
 * durable term/vote and network the test controls (no sockets, no disk). */
#include "memlog.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

typedef struct fake {
    raft_term term;
    raft_id vote;
    raft_time now;
    raft_io_recv_cb recv;
    struct raft_message sent[64];
    struct raft_io_send *reqs[64];
    raft_io_send_cb cbs[64];
    int n_sent;
} fake;

static fake F;

static int f_init(struct raft_io *io, raft_id id, const char *a)
{
    (void)io;
    (void)id;
    (void)a;
    return 0;
}
static void f_close(struct raft_io *io, raft_io_close_cb cb)
{
    cb(io);
}
static int f_load(struct raft_io *io, raft_term *t, raft_id *v, struct raft_snapshot **s,
                  raft_index *start, struct raft_entry *e[], size_t *n)
{
    (void)io;
    *t = F.term;
    *v = F.vote;
    *s = NULL;
    *start = 1;
    *e = NULL;
    *n = 0;
    return 0;
}
static int f_start(struct raft_io *io, unsigned ms, raft_io_tick_cb tick, raft_io_recv_cb recv)
{
    (void)io;
    (void)ms;
    (void)tick;
    F.recv = recv;
    return 0;
}
static int f_set_term(struct raft_io *io, raft_term t)
{
    (void)io;
    F.term = t;
    F.vote = 0;
    return 0;
}
static int f_set_vote(struct raft_io *io, raft_id id)
{
    (void)io;
    F.vote = id;
    return 0;
}
static int f_send(struct raft_io *io, struct raft_io_send *req, const struct raft_message *m,
                  raft_io_send_cb cb)
{
    (void)io;
    assert_true(F.n_sent < 64);
    F.sent[F.n_sent] = *m;
    F.reqs[F.n_sent] = req;
    F.cbs[F.n_sent] = cb;
    F.n_sent++;
    return 0;
}
static raft_time f_time(struct raft_io *io)
{
    (void)io;
    return F.now;
}
static int f_random(struct raft_io *io, int min, int max)
{
    (void)io;
    (void)max;
    return min;
}

static void fake_io(struct raft_io *io)
{
    memset(io, 0, sizeof *io);
    io->version = 1;
    io->init = f_init;
    io->close = f_close;
    io->load = f_load;
    io->start = f_start;
    io->set_term = f_set_term;
    io->set_vote = f_set_vote;
    io->send = f_send;
    io->time = f_time;
    io->random = f_random;
}

static int fsm_apply(struct raft_fsm *f, const struct raft_buffer *b, void **r)
{
    (void)f;
    (void)b;
    *r = NULL;
    return 0;
}
static int fsm_snapshot(struct raft_fsm *f, struct raft_buffer *b[], unsigned *n)
{
    (void)f;
    (void)b;
    (void)n;
    return RAFT_NOMEM;
}
static int fsm_restore(struct raft_fsm *f, struct raft_buffer *b)
{
    (void)f;
    (void)b;
    return RAFT_NOMEM;
}

typedef struct node {
    uv_loop_t loop;
    struct raft_io inner, io;
    struct raft_fsm fsm;
    struct raft raft;
} node;

/* Node 1 of voters 1, 2, 3, starting with durable term `term`. */
static void node_start(node *n, raft_term term, bool rule_off)
{
    memset(&F, 0, sizeof F);
    F.term = term;
    F.now = 1000;
    uv_loop_init(&n->loop);
    fake_io(&n->inner);
    assert_int_equal(kvr_memlog_init(&n->io, &n->inner, &n->loop, NULL), 0);
    kvr_memlog_disable_vote_rule(&n->io, rule_off);
    memset(&n->fsm, 0, sizeof n->fsm);
    n->fsm.version = 1;
    n->fsm.apply = fsm_apply;
    n->fsm.snapshot = fsm_snapshot;
    n->fsm.restore = fsm_restore;
    assert_int_equal(raft_init(&n->raft, &n->io, &n->fsm, 1, "1"), 0);
    struct raft_configuration conf;
    raft_configuration_init(&conf);
    raft_configuration_add(&conf, 1, "1", RAFT_VOTER);
    raft_configuration_add(&conf, 2, "2", RAFT_VOTER);
    raft_configuration_add(&conf, 3, "3", RAFT_VOTER);
    assert_int_equal(raft_bootstrap(&n->raft, &conf), 0); /* memory: every start bootstraps */
    raft_configuration_close(&conf);
    assert_int_equal(raft_start(&n->raft), 0);
    assert_int_equal(raft_last_index(&n->raft), 1); /* entry 1: the configuration */
    assert_int_equal(n->raft.configuration.n, 3);
}

static void flush(node *n)
{
    for (int i = 0; i < F.n_sent; i++)
        if (F.cbs[i])
            F.cbs[i](F.reqs[i], 0), F.cbs[i] = NULL;
    uv_run(&n->loop, UV_RUN_NOWAIT);
}

static void closed(struct raft *r)
{
    (void)r;
}

static void node_stop(node *n)
{
    flush(n);
    raft_close(&n->raft, closed);
    uv_run(&n->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&n->loop), 0);
}

/* Candidate `from` asks for our vote; returns whether the answer sent back granted it. */
static bool ask(node *n, raft_id from, raft_term term, raft_term last_term, raft_index last_index)
{
    struct raft_message m;
    memset(&m, 0, sizeof m);
    m.type = RAFT_IO_REQUEST_VOTE;
    m.server_id = from;
    m.server_address = from == 2 ? "2" : "3";
    m.request_vote.term = term;
    m.request_vote.candidate_id = from;
    m.request_vote.last_log_index = last_index;
    m.request_vote.last_log_term = last_term;
    m.request_vote.disrupt_leader = true; /* past raft's own "heard from a leader" check */
    int before = F.n_sent;
    F.recv(&n->inner, &m);
    for (int i = before; i < F.n_sent; i++)
        if (F.sent[i].type == RAFT_IO_REQUEST_VOTE_RESULT && F.sent[i].server_id == from)
            return F.sent[i].request_vote_result.vote_granted;
    fail_msg("no vote result sent");
    return false;
}

static void heartbeat(node *n, raft_id from, raft_term term, raft_index commit)
{
    struct raft_message m;
    memset(&m, 0, sizeof m);
    m.type = RAFT_IO_APPEND_ENTRIES;
    m.server_id = from;
    m.server_address = from == 2 ? "2" : "3";
    m.append_entries.term = term;
    m.append_entries.prev_log_index = 1;
    m.append_entries.prev_log_term = 1;
    m.append_entries.leader_commit = commit;
    F.recv(&n->inner, &m);
    flush(n);
}

/* A router that never acknowledged anything (bootstrap term 1) votes normally. */
static void test_pristine_votes(void **state)
{
    (void)state;
    node n;
    node_start(&n, 0, false);
    assert_true(ask(&n, 2, 2, 1, 1));
    kvr_memlog_stats st;
    kvr_memlog_get_stats(&n.io, &st);
    assert_false(st.restricted);
    assert_int_equal(st.withheld, 0);
    node_stop(&n);
}

/* Restarted empty (durable term 5): a candidate with a log no longer than ours is refused
 * (it may lack entries we acknowledged before the restart) ... unless the rule is off, which
 * is exactly the unsafe vote. */
static void test_restarted_withholds(void **state)
{
    (void)state;
    node n;
    node_start(&n, 5, false);
    assert_false(ask(&n, 2, 6, 1, 1));
    assert_int_equal(F.vote, 2); /* raft recorded the vote: stricter, never looser */
    kvr_memlog_stats st;
    kvr_memlog_get_stats(&n.io, &st);
    assert_true(st.restricted);
    assert_false(st.may_vote);
    assert_int_equal(st.withheld, 1);
    node_stop(&n);

    node_start(&n, 5, true);
    assert_true(ask(&n, 2, 6, 1, 1));
    node_stop(&n);
}

/* Whole-group restart: once every other voter has asked, a candidate whose log is at least as
 * up to date as every log seen is granted; a shorter one is not. */
static void test_whole_group(void **state)
{
    (void)state;
    node n;
    node_start(&n, 5, false);
    assert_false(ask(&n, 2, 6, 1, 1)); /* only 2 asked */
    assert_true(ask(&n, 3, 7, 4, 9));  /* both asked; 3's log is the longest seen */
    node_stop(&n);

    node_start(&n, 5, false);
    assert_false(ask(&n, 3, 6, 4, 9));
    assert_false(ask(&n, 2, 7, 1, 1)); /* all asked, but 2's log is behind 3's: refused */
    assert_true(ask(&n, 3, 8, 4, 9));  /* 3 has the longest log seen: granted */
    node_stop(&n);

    node_start(&n, 5, false); /* all empty: they agree */
    assert_false(ask(&n, 2, 6, 1, 1));
    assert_true(ask(&n, 3, 7, 1, 1));
    node_stop(&n);
}

/* Caught up from a leader of a term >= the durable one, plus the hold (4 s): votes again. */
static void test_caught_up(void **state)
{
    (void)state;
    node n;
    node_start(&n, 5, false);
    heartbeat(&n, 2, 4, 1); /* an older term's leader does not count */
    assert_false(ask(&n, 3, 6, 1, 1));
    heartbeat(&n, 2, 7, 1); /* leader of term 7, commit 1: we hold all of it */
    F.now += 3000;
    assert_false(ask(&n, 3, 8, 1, 1)); /* within the hold */
    F.now += 1500;
    assert_true(ask(&n, 3, 9, 1, 1));
    kvr_memlog_stats st;
    kvr_memlog_get_stats(&n.io, &st);
    assert_true(st.may_vote);
    node_stop(&n);
}

/* --- snapshots, straight on the io (no raft): answered on a later loop turn, cancelled at
 * close (a queued get's copy freed: valgrind) --- */

static int put_status[2], get_status[2];
static struct raft_snapshot *got[2];

static void put_cb(struct raft_io_snapshot_put *req, int status)
{
    put_status[(int)(intptr_t)req->data] = status;
}
static void get_cb(struct raft_io_snapshot_get *req, struct raft_snapshot *snap, int status)
{
    int i = (int)(intptr_t)req->data;
    get_status[i] = status;
    got[i] = snap;
}
static void io_closed(struct raft_io *io)
{
    (void)io;
}

static void test_snapshot_put_get(void **state)
{
    (void)state;
    memset(&F, 0, sizeof F);
    uv_loop_t loop;
    struct raft_io inner, io;
    uv_loop_init(&loop);
    fake_io(&inner);
    assert_int_equal(kvr_memlog_init(&io, &inner, &loop, NULL), 0);
    char data[] = "fsm state";
    struct raft_buffer buf = {.base = data, .len = sizeof data};
    struct raft_snapshot snap = {.index = 7, .term = 2, .bufs = &buf, .n_bufs = 1};
    raft_configuration_init(&snap.configuration);
    raft_configuration_add(&snap.configuration, 1, "1", RAFT_VOTER);
    struct raft_io_snapshot_put put[2];
    struct raft_io_snapshot_get get[2];
    for (int i = 0; i < 2; i++) {
        put[i].data = (void *)(intptr_t)i;
        get[i].data = (void *)(intptr_t)i;
        put_status[i] = get_status[i] = -1;
        got[i] = NULL;
    }
    /* answered on the next loop turn, not inside the call */
    assert_int_equal(io.snapshot_put(&io, 0, &put[0], &snap, put_cb), 0);
    assert_int_equal(io.snapshot_get(&io, &get[0], get_cb), 0);
    assert_int_equal(put_status[0], -1);
    assert_int_equal(get_status[0], -1);
    uv_run(&loop, UV_RUN_NOWAIT);
    assert_int_equal(put_status[0], 0);
    assert_int_equal(get_status[0], 0);
    assert_non_null(got[0]);
    assert_int_equal(got[0]->index, 7);
    assert_int_equal(got[0]->bufs[0].len, sizeof data);
    assert_memory_equal(got[0]->bufs[0].base, data, sizeof data);
    raft_configuration_close(&got[0]->configuration);
    raft_free(got[0]->bufs[0].base);
    raft_free(got[0]->bufs);
    raft_free(got[0]);
    /* still queued at close: cancelled, the get's copy freed by the io */
    assert_int_equal(io.snapshot_put(&io, 0, &put[1], &snap, put_cb), 0);
    assert_int_equal(io.snapshot_get(&io, &get[1], get_cb), 0);
    io.close(&io, io_closed);
    assert_int_equal(put_status[1], RAFT_CANCELED);
    assert_int_equal(get_status[1], RAFT_CANCELED);
    assert_null(got[1]);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_null(io.impl);
    raft_configuration_close(&snap.configuration);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pristine_votes),   cmocka_unit_test(test_restarted_withholds),
        cmocka_unit_test(test_whole_group),      cmocka_unit_test(test_caught_up),
        cmocka_unit_test(test_snapshot_put_get),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
