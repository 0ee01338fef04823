/* termguard (sync/termguard.h): a term or vote the inner io cannot store mutes the node. Over
 * a fake inner raft_io whose set_term/set_vote fail on demand (no disk); the real case (a data
 * dir removed under a loaded cluster) is tests/chaos/test_data_dir_lost.sh. */
#include "termguard.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

typedef struct fake {
    int fail_writes; /* set_term/set_vote fail while > 0 */
    raft_term term;
    raft_id vote;
    int n_sent, n_appends;
    bool closed;
} fake;

static fake F;

static int f_set_term(struct raft_io *io, raft_term t)
{
    (void)io;
    if (F.fail_writes)
        return RAFT_IOERR;
    F.term = t;
    return 0;
}
static int f_set_vote(struct raft_io *io, raft_id id)
{
    (void)io;
    if (F.fail_writes)
        return RAFT_IOERR;
    F.vote = id;
    return 0;
}
static int f_send(struct raft_io *io, struct raft_io_send *req, const struct raft_message *m,
                  raft_io_send_cb cb)
{
    (void)io;
    (void)req;
    (void)m;
    (void)cb;
    F.n_sent++;
    return 0;
}
static int f_append(struct raft_io *io, struct raft_io_append *req, const struct raft_entry e[],
                    unsigned n, raft_io_append_cb cb)
{
    (void)io;
    (void)req;
    (void)e;
    (void)n;
    (void)cb;
    F.n_appends++;
    return 0;
}
static void f_close(struct raft_io *io, raft_io_close_cb cb)
{
    F.closed = true;
    cb(io);
}

static struct raft_io_send send_req[4];
static int send_status[4] = {-1, -1, -1, -1};
static struct raft_io_append append_req;
static int append_status = -1;

static void send_cb(struct raft_io_send *req, int status)
{
    send_status[req - send_req] = status;
}
static void append_cb(struct raft_io_append *req, int status)
{
    (void)req;
    append_status = status;
}
static void closed_cb(struct raft_io *io)
{
    (void)io;
}

static bool muted(struct raft_io *io)
{
    kvr_termguard_stats st;
    kvr_termguard_get_stats(io, &st);
    return st.muted;
}

/* Stored terms and votes pass through; the first one that fails is reported stored, and from
 * then on nothing is sent or appended (answered on a later loop turn, never passed on). */
static void test_mute_after_failed_term(void **state)
{
    (void)state;
    memset(&F, 0, sizeof F);
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    struct raft_io inner = {0}, io;
    inner.set_term = f_set_term;
    inner.set_vote = f_set_vote;
    inner.send = f_send;
    inner.append = f_append;
    inner.close = f_close;
    assert_int_equal(kvr_termguard_init(&io, &inner, &loop), 0);
    struct raft_message msg = {.type = RAFT_IO_REQUEST_VOTE_RESULT};

    assert_int_equal(io.set_term(&io, 2), 0);
    assert_int_equal(F.term, 2);
    assert_int_equal(io.send(&io, &send_req[0], &msg, send_cb), 0);
    assert_int_equal(F.n_sent, 1);
    assert_false(muted(&io));

    F.fail_writes = 1;
    assert_int_equal(io.set_term(&io, 3), 0); /* raft must not see the failure */
    assert_true(muted(&io));
    assert_int_equal(io.set_vote(&io, 2), 0);
    assert_int_equal(io.send(&io, &send_req[1], &msg, send_cb), 0);
    struct raft_entry e = {.term = 3, .type = RAFT_COMMAND};
    assert_int_equal(io.append(&io, &append_req, &e, 1, append_cb), 0);
    assert_int_equal(F.n_sent, 1);    /* the vote result never left */
    assert_int_equal(F.n_appends, 0); /* nor was the entry of term 3 written */
    assert_int_equal(send_status[1], -1);
    uv_run(&loop, UV_RUN_NOWAIT);
    assert_int_equal(send_status[1], RAFT_CANCELED);
    assert_int_equal(append_status, RAFT_IOERR);

    F.fail_writes = 0; /* the disk came back: still muted until a restart reloads the term */
    assert_int_equal(io.set_term(&io, 4), 0);
    assert_true(muted(&io));
    assert_int_equal(io.send(&io, &send_req[2], &msg, send_cb), 0);
    assert_int_equal(F.n_sent, 1);

    kvr_termguard_stats st;
    kvr_termguard_get_stats(&io, &st);
    assert_int_equal(st.failed_writes, 2);
    assert_int_equal(st.dropped_sends, 2);

    io.close(&io, closed_cb); /* the queued send is answered, cancelled */
    assert_int_equal(send_status[2], RAFT_CANCELED);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_true(F.closed);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mute_after_failed_term),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
