/* disklog (sync/disklog.h): the fence after a failed append, over a fake inner raft_io whose
 * appends and snapshot puts the test completes with the status it chooses (no disk). The
 * real case (a full tmpfs under a router) is tests/chaos/test_disk_full.sh. */
#include "disklog.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* what the fake inner io was asked to write, in order */
typedef struct fake {
    struct raft_io_append *appends[16];
    raft_io_append_cb append_cbs[16];
    int n_appends;
    struct raft_io_snapshot_put *puts[4];
    raft_io_snapshot_put_cb put_cbs[4];
    int n_puts;
    bool closed;
    int fail_at_once; /* the next append is queued, then refused at once with this */
} fake;

static fake F;

static int f_append(struct raft_io *io, struct raft_io_append *req, const struct raft_entry e[],
                    unsigned n, raft_io_append_cb cb)
{
    (void)io;
    (void)n;
    assert_true(F.n_appends < 16);
    F.appends[F.n_appends] = req;
    F.append_cbs[F.n_appends] = cb;
    (void)e;
    F.n_appends++;
    int rv = F.fail_at_once;
    F.fail_at_once = 0;
    return rv;
}
static int f_put(struct raft_io *io, unsigned trailing, struct raft_io_snapshot_put *req,
                 const struct raft_snapshot *s, raft_io_snapshot_put_cb cb)
{
    (void)io;
    (void)trailing;
    (void)s;
    assert_true(F.n_puts < 4);
    F.puts[F.n_puts] = req;
    F.put_cbs[F.n_puts] = cb;
    F.n_puts++;
    return 0;
}
static raft_time f_time(struct raft_io *io)
{
    (void)io;
    return 1000;
}
static void f_close(struct raft_io *io, raft_io_close_cb cb)
{
    F.closed = true;
    cb(io);
}

static void fake_io(struct raft_io *io)
{
    memset(io, 0, sizeof *io);
    io->version = 1;
    io->append = f_append;
    io->snapshot_put = f_put;
    io->time = f_time;
    io->close = f_close;
}

/* what raft saw: the status of each of its requests, by request */
typedef struct seen {
    struct raft_io_append req[16];
    int status[16];
    bool done[16];
    struct raft_io_snapshot_put put[4];
    int put_status[4];
} seen;

static seen S;

static void append_cb(struct raft_io_append *req, int status)
{
    int i = (int)(req - S.req);
    assert_false(S.done[i]);
    S.done[i] = true;
    S.status[i] = status;
}
static void put_cb(struct raft_io_snapshot_put *req, int status)
{
    S.put_status[req - S.put] = status;
}

typedef struct env {
    uv_loop_t loop;
    struct raft_io inner, io;
} env;

static void env_init(env *e)
{
    memset(&F, 0, sizeof F);
    memset(&S, 0, sizeof S);
    for (int i = 0; i < 4; i++)
        S.put_status[i] = -1;
    assert_int_equal(uv_loop_init(&e->loop), 0);
    fake_io(&e->inner);
    assert_int_equal(kvr_disklog_init(&e->io, &e->inner, &e->loop), 0);
}

static void closed_cb(struct raft_io *io)
{
    (void)io;
}

static void env_close(env *e)
{
    e->io.close(&e->io, closed_cb);
    uv_run(&e->loop, UV_RUN_DEFAULT);
    assert_true(F.closed);
    assert_null(e->io.impl);
    assert_int_equal(uv_loop_close(&e->loop), 0);
}

/* raft's request i: one entry */
static int append(env *e, int i)
{
    struct raft_entry ent = {.term = (raft_term)(100 + i), .type = RAFT_COMMAND};
    return e->io.append(&e->io, &S.req[i], &ent, 1, append_cb);
}

static bool fenced(env *e)
{
    kvr_disklog_stats st;
    kvr_disklog_get_stats(&e->io, &st);
    return st.fenced;
}

/* Appends pass through while nothing failed; the first failure fences; a write that was queued
 * behind the failed one and succeeded is reported failed (raft must not count it); later
 * appends never reach the disk and fail on a later loop turn. */
static void test_fence_after_failure(void **state)
{
    (void)state;
    env e;
    env_init(&e);
    assert_int_equal(append(&e, 0), 0);
    assert_int_equal(F.n_appends, 1);
    F.append_cbs[0](F.appends[0], 0);
    assert_true(S.done[0]);
    assert_int_equal(S.status[0], 0);
    assert_false(fenced(&e));

    assert_int_equal(append(&e, 1), 0);
    assert_int_equal(append(&e, 2), 0);
    assert_int_equal(F.n_appends, 3);
    F.append_cbs[1](F.appends[1], RAFT_IOERR);
    assert_int_equal(S.status[1], RAFT_IOERR);
    assert_true(fenced(&e));
    F.append_cbs[2](F.appends[2], 0);
    assert_int_equal(S.status[2], RAFT_IOERR);

    assert_int_equal(append(&e, 3), 0);
    assert_int_equal(append(&e, 4), 0);
    assert_int_equal(F.n_appends, 3); /* nothing more written */
    assert_false(S.done[3]);          /* completed later, as a write would be */
    uv_run(&e.loop, UV_RUN_NOWAIT);
    assert_true(S.done[3] && S.done[4]);
    assert_int_equal(S.status[3], RAFT_IOERR);
    assert_int_equal(S.status[4], RAFT_IOERR);

    kvr_disklog_stats st;
    kvr_disklog_get_stats(&e.io, &st);
    assert_int_equal(st.failed_appends, 1);
    assert_int_equal(st.refused, 2);
    assert_int_equal(st.fenced_ms, 1000);
    env_close(&e);
}

/* The router's own snapshot leaves the fence up; a leader's snapshot (an install: trailing 0)
 * replaces the log and lifts it, and appends reach the disk again; a failed install does not. */
static void test_install_lifts_fence(void **state)
{
    (void)state;
    env e;
    env_init(&e);
    struct raft_snapshot snap = {.index = 50, .term = 2};
    assert_int_equal(append(&e, 0), 0);
    F.append_cbs[0](F.appends[0], RAFT_IOERR);
    assert_true(fenced(&e));

    assert_int_equal(e.io.snapshot_put(&e.io, 8, &S.put[0], &snap, put_cb), 0);
    F.put_cbs[0](F.puts[0], 0);
    assert_int_equal(S.put_status[0], 0);
    assert_true(fenced(&e));

    assert_int_equal(e.io.snapshot_put(&e.io, 0, &S.put[1], &snap, put_cb), 0);
    F.put_cbs[1](F.puts[1], RAFT_IOERR);
    assert_int_equal(S.put_status[1], RAFT_IOERR);
    assert_true(fenced(&e));

    assert_int_equal(e.io.snapshot_put(&e.io, 0, &S.put[2], &snap, put_cb), 0);
    F.put_cbs[2](F.puts[2], 0);
    assert_false(fenced(&e));

    assert_int_equal(append(&e, 1), 0);
    assert_int_equal(F.n_appends, 2);
    F.append_cbs[1](F.appends[1], 0);
    assert_int_equal(S.status[1], 0);
    env_close(&e);
}

/* raft_uv can refuse an append at once after queueing it; raft's own path for that frees
 * entries twice, so raft sees a failed write later instead, and if the inner io still calls
 * the refused request back, raft does not hear of it a second time. */
static void test_refused_at_once(void **state)
{
    (void)state;
    env e;
    env_init(&e);
    F.fail_at_once = RAFT_IOERR;
    assert_int_equal(append(&e, 0), 0);
    assert_true(fenced(&e));
    assert_false(S.done[0]);
    uv_run(&e.loop, UV_RUN_NOWAIT);
    assert_true(S.done[0]);
    assert_int_equal(S.status[0], RAFT_IOERR);
    F.append_cbs[0](F.appends[0], RAFT_IOERR); /* append_cb asserts it runs once */
    assert_int_equal(append(&e, 1), 0);
    assert_int_equal(F.n_appends, 1); /* fenced: not passed on */
    uv_run(&e.loop, UV_RUN_NOWAIT);
    assert_int_equal(S.status[1], RAFT_IOERR);
    env_close(&e);
}

/* raft waits for every request at close: refused appends still queued are cancelled. */
static void test_close_cancels_refused(void **state)
{
    (void)state;
    env e;
    env_init(&e);
    assert_int_equal(append(&e, 0), 0);
    F.append_cbs[0](F.appends[0], RAFT_IOERR);
    assert_int_equal(append(&e, 1), 0);
    assert_false(S.done[1]);
    env_close(&e);
    assert_true(S.done[1]);
    assert_int_equal(S.status[1], RAFT_CANCELED);
}

/* An io no raft took is released on a later loop turn (valgrind: nothing left). */
static void test_discard(void **state)
{
    (void)state;
    env e;
    env_init(&e);
    kvr_disklog_discard(&e.io);
    assert_null(e.io.impl);
    uv_run(&e.loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&e.loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fence_after_failure),
        cmocka_unit_test(test_install_lifts_fence),
        cmocka_unit_test(test_close_cancels_refused),
        cmocka_unit_test(test_refused_at_once),
        cmocka_unit_test(test_discard),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
