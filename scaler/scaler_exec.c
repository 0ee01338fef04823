/* scaler_exec.c: the exec back end (scaler.h): `COMMAND NAMESPACE MODEL REPLICAS`, no shell,
 * in its own process group so that a timeout kills what it started too. */
#include "scaler_int.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>

static void proc_closed(uv_handle_t *h)
{
    kvr_scaler_op *op = h->data;
    op->proc_running = false;
    if (op->killed_by_close) {
        snprintf(op->errmsg, sizeof op->errmsg, "scaler closed");
        scaler_op_finish(op, KVR_ECLOSED);
        return;
    }
    if (op->timed_out) {
        snprintf(op->errmsg, sizeof op->errmsg, "%s timed out after %ld ms", op->s->command,
                 op->s->timeout_ms);
        scaler_attempt_failed(op, KVR_ETIMEDOUT, true);
        return;
    }
    if (op->errmsg[0]) {
        scaler_attempt_failed(op, KVR_EIO, true);
        return;
    }
    scaler_op_finish(op, 0);
}

static void on_exit_cb(uv_process_t *p, int64_t exit_status, int term_signal)
{
    kvr_scaler_op *op = p->data;
    uv_timer_stop(&op->timer);
    op->errmsg[0] = 0;
    if (term_signal)
        snprintf(op->errmsg, sizeof op->errmsg, "%s killed by signal %d", op->s->command,
                 term_signal);
    else if (exit_status != 0)
        snprintf(op->errmsg, sizeof op->errmsg, "%s exited with status %lld", op->s->command,
                 (long long)exit_status);
    uv_close((uv_handle_t *)p, proc_closed);
}

static void kill_group(kvr_scaler_op *op)
{
    /* the child is a group leader (UV_PROCESS_DETACHED → setsid) */
    if (op->proc.pid > 0)
        kill(-op->proc.pid, SIGKILL);
}

static void on_timeout(uv_timer_t *t)
{
    kvr_scaler_op *op = t->data;
    op->timed_out = true;
    kill_group(op);
}

void scaler_exec_kill(kvr_scaler_op *op)
{
    op->killed_by_close = true;
    kill_group(op);
}

int scaler_exec_attempt(kvr_scaler_op *op)
{
    kvr_scaler *s = op->s;
    char reps[16];
    snprintf(reps, sizeof reps, "%u", op->replicas);
    char *args[] = {s->command, op->ns, op->model, reps, NULL};
    uv_stdio_container_t stdio[3] = {
        {.flags = UV_IGNORE}, {.flags = UV_INHERIT_FD, .data.fd = 2},
        {.flags = UV_INHERIT_FD, .data.fd = 2}};
    uv_process_options_t po = {
        .exit_cb = on_exit_cb,
        .file = s->command,
        .args = args,
        .flags = UV_PROCESS_DETACHED,
        .stdio_count = 3,
        .stdio = stdio,
    };
    op->timed_out = false;
    op->errmsg[0] = 0;
    op->proc.data = op;
    int rc = uv_spawn(s->loop, &op->proc, &po);
    if (rc != 0) {
        /* uv_spawn leaves a handle to close even when it fails */
        snprintf(op->errmsg, sizeof op->errmsg, "cannot run %s: %s", s->command, uv_strerror(rc));
        op->proc_running = true;
        uv_close((uv_handle_t *)&op->proc, proc_closed);
        return 0;
    }
    op->proc_running = true;
    uv_timer_start(&op->timer, on_timeout, (uint64_t)s->timeout_ms, 0);
    return 0;
}
