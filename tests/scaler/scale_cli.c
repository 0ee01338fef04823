/* kvr-test-scale: drives one kvr_scaler (scaler/scaler.h) from the command line, for the
 * scaler tests: each NS:MODEL:TARGET:REPLICAS argument is one operation, all started at
 * once; prints one line per result and the stats, exits 0 when all succeeded.
 *
 *   kvr-test-scale exec COMMAND [--timeout-ms N] [--attempts N] [--backoff-ms N] OP...
 *   kvr-test-scale kube URL TOKEN_FILE CA_FILE KUBE_NS [--timeout-ms N] ... OP...
 *   --close-after-ms N closes the scaler N ms after the start (pending ops fail "closed"). */
#include "kvr_log.h"
#include "scaler.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures, pending;
static kvr_scaler sc;
static uv_timer_t close_timer;

static void done(int status, const char *errmsg, void *data)
{
    char *op = data;
    printf("result op=%s status=%d%s%s\n", op, status, errmsg ? " error=" : "",
           errmsg ? errmsg : "");
    fflush(stdout);
    if (status != 0)
        failures++;
    pending--;
    if (pending == 0 && !uv_is_closing((uv_handle_t *)&close_timer)) {
        uv_timer_stop(&close_timer);
        uv_close((uv_handle_t *)&close_timer, NULL);
        kvr_scaler_close(&sc, NULL);
    }
}

static void close_now(uv_timer_t *t)
{
    uv_close((uv_handle_t *)t, NULL);
    kvr_scaler_close(&sc, NULL);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: see the comment in tests/scaler/scale_cli.c\n");
        return 2;
    }
    kvr_log_setup("test-scale", "1", KVR_LOG_INFO);
    kvr_log_set_fd(2);
    kvr_scaler_config cfg = {0};
    int i = 2;
    if (strcmp(argv[1], "exec") == 0) {
        cfg.kind = KVR_SCALER_EXEC;
        cfg.command = argv[i++];
    } else if (strcmp(argv[1], "kube") == 0 && argc > 6) {
        cfg.kind = KVR_SCALER_KUBERNETES;
        cfg.api_url = argv[i++];
        cfg.token_file = argv[i++];
        cfg.ca_file = argv[i++];
        cfg.kube_namespace = argv[i++];
    } else {
        fprintf(stderr, "unknown kind %s\n", argv[1]);
        return 2;
    }
    long close_after = 0;
    for (; i + 1 < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
        long v = atol(argv[i + 1]);
        if (strcmp(argv[i], "--timeout-ms") == 0)
            cfg.timeout_ms = v;
        else if (strcmp(argv[i], "--attempts") == 0)
            cfg.max_attempts = (int)v;
        else if (strcmp(argv[i], "--backoff-ms") == 0)
            cfg.backoff_ms = v;
        else if (strcmp(argv[i], "--close-after-ms") == 0)
            close_after = v;
        else {
            fprintf(stderr, "unknown flag %s\n", argv[i]);
            return 2;
        }
    }
    uv_loop_t *loop = uv_default_loop();
    kvr_err err = {0};
    if (kvr_scaler_init(&sc, loop, &cfg, &err) != 0) {
        printf("init error=%s\n", err.msg);
        return 1;
    }
    uv_timer_init(loop, &close_timer);
    for (; i < argc; i++) {
        char *spec = strdup(argv[i]);
        char *ns = strtok(spec, ":"), *model = strtok(NULL, ":"), *target = strtok(NULL, ":"),
             *reps = strtok(NULL, ":");
        if (!ns || !model || !target || !reps) {
            fprintf(stderr, "bad op %s\n", argv[i]);
            return 2;
        }
        int rc = kvr_scaler_scale(&sc, ns, model, target, (uint32_t)atol(reps), done, argv[i]);
        if (rc != 0) {
            printf("result op=%s status=%d error=refused at start\n", argv[i], rc);
            failures++;
        } else {
            pending++;
        }
        free(spec);
    }
    if (close_after > 0)
        uv_timer_start(&close_timer, close_now, (uint64_t)close_after, 0);
    if (pending == 0) {
        uv_close((uv_handle_t *)&close_timer, NULL);
        kvr_scaler_close(&sc, NULL);
    }
    uv_run(loop, UV_RUN_DEFAULT);
    const kvr_scaler_stats *st = kvr_scaler_get_stats(&sc);
    printf("stats ok=%llu failed=%llu retries=%llu attempts=%llu\n", (unsigned long long)st->ok,
           (unsigned long long)st->failed, (unsigned long long)st->retries,
           (unsigned long long)st->attempts);
    uv_loop_close(loop);
    return failures ? 1 : 0;
}
