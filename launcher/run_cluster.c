#define _GNU_SOURCE
/* Paths are bounded up front (cluster dir <= 300 bytes); snprintf truncation is the intended
 * behaviour for anything else. */
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include "run_cluster.h"
#include "kvr_json.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* cluster.json is small; refuse anything absurd rather than allocate from it. */
#define RUN_CLUSTER_JSON_MAX (4 << 20)
#define RUN_MAX_PROCS 1024

static void copy_str(char *dst, size_t cap, const char *src)
{
    if (!src)
        src = "";
    snprintf(dst, cap, "%s", src);
}

void run_cluster_init(run_cluster *c, const char *dir)
{
    memset(c, 0, sizeof *c);
    copy_str(c->dir, sizeof c->dir, dir);
    copy_str(c->ns, sizeof c->ns, "kvr");
    copy_str(c->model, sizeof c->model, "sim");
}

void run_cluster_free(run_cluster *c)
{
    for (int i = 0; i < c->n; i++)
        for (int a = 0; a < c->procs[i].argc; a++)
            free(c->procs[i].argv[a]);
    free(c->procs);
    c->procs = NULL;
    c->n = c->cap = 0;
}

run_proc *run_cluster_add(run_cluster *c)
{
    if (c->n >= RUN_MAX_PROCS)
        return NULL;
    if (c->n == c->cap) {
        int ncap = c->cap ? c->cap * 2 : 16;
        run_proc *np = realloc(c->procs, (size_t)ncap * sizeof *np);
        if (!np)
            return NULL;
        c->procs = np;
        c->cap = ncap;
    }
    run_proc *p = &c->procs[c->n++];
    memset(p, 0, sizeof *p);
    return p;
}

int run_proc_set_argv(run_proc *p, char *const *argv, int argc, kvr_err *err)
{
    if (argc < 1 || argc > RUN_MAX_ARGS)
        return kvr_err_set(err, KVR_ELIMIT, "%s-%d: %d arguments (1..%d allowed)", p->role, p->id,
                           argc, RUN_MAX_ARGS);
    for (int a = 0; a < p->argc; a++)
        free(p->argv[a]);
    p->argc = 0;
    for (int a = 0; a < argc; a++) {
        p->argv[a] = strdup(argv[a]);
        if (!p->argv[a]) {
            p->argc = a;
            return kvr_err_set(err, KVR_ENOMEM, "copying arguments");
        }
    }
    p->argc = argc;
    p->argv[argc] = NULL;
    return 0;
}

run_proc *run_cluster_find(run_cluster *c, const char *role, int id)
{
    for (int i = 0; i < c->n; i++)
        if (strcmp(c->procs[i].role, role) == 0 && c->procs[i].id == id)
            return &c->procs[i];
    return NULL;
}

int run_cluster_count(const run_cluster *c, const char *role)
{
    int k = 0;
    for (int i = 0; i < c->n; i++)
        k += strcmp(c->procs[i].role, role) == 0;
    return k;
}

static int read_file(const char *path, size_t max, kvr_buf *out, kvr_err *err)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return kvr_err_set(err, KVR_ENOTFOUND, "opening %s: %s", path, strerror(errno));
    char tmp[8192];
    size_t n;
    int rc = 0;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0) {
        if (out->len + n > max) {
            rc = kvr_err_set(err, KVR_ELIMIT, "%s is larger than %zu bytes", path, max);
            break;
        }
        if (kvr_buf_append(out, tmp, n) != 0) {
            rc = kvr_err_set(err, KVR_ENOMEM, "reading %s", path);
            break;
        }
    }
    if (rc == 0 && ferror(f))
        rc = kvr_err_set(err, KVR_EIO, "reading %s: %s", path, strerror(errno));
    fclose(f);
    return rc;
}

static const char *jstr(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static long long jnum_item(const cJSON *v, long long dflt)
{
    int64_t n;
    return kvr_json_int_exact(v, &n) == 0 ? (long long)n : dflt;
}

static long long jnum(const cJSON *o, const char *key, long long dflt)
{
    return jnum_item(cJSON_GetObjectItemCaseSensitive(o, key), dflt);
}

int run_cluster_load(run_cluster *c, const char *dir, kvr_err *err)
{
    char path[RUN_PATH_MAX + 32];
    kvr_buf b;
    kvr_buf_init(&b);
    cJSON *root = NULL;
    int rc;
    run_cluster_init(c, dir);
    snprintf(path, sizeof path, "%s/cluster.json", dir);
    if ((rc = read_file(path, RUN_CLUSTER_JSON_MAX, &b, err)) != 0)
        goto out;
    root = cJSON_ParseWithLength(b.base, b.len);
    if (!root) {
        rc = kvr_err_set(err, KVR_EINVAL, "%s: not valid JSON", path);
        goto out;
    }
    if (jstr(root, "namespace"))
        copy_str(c->ns, sizeof c->ns, jstr(root, "namespace"));
    if (jstr(root, "model"))
        copy_str(c->model, sizeof c->model, jstr(root, "model"));
    const cJSON *procs = cJSON_GetObjectItemCaseSensitive(root, "processes");
    if (!cJSON_IsArray(procs)) {
        rc = kvr_err_set(err, KVR_EINVAL, "%s: no \"processes\" array", path);
        goto out;
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, procs)
    {
        run_proc *p = run_cluster_add(c);
        if (!p) {
            rc = kvr_err_set(err, KVR_ELIMIT, "%s: too many processes", path);
            goto out;
        }
        const char *role = jstr(it, "role");
        if (!role || strlen(role) >= sizeof p->role) {
            rc = kvr_err_set(err, KVR_EINVAL, "%s: process %d has no valid role", path, c->n - 1);
            goto out;
        }
        copy_str(p->role, sizeof p->role, role);
        p->id = (int)jnum(it, "id", 0);
        p->pid = (int)jnum(it, "pid", 0);
        p->start_time = jnum(it, "start_time", 0);
        copy_str(p->url, sizeof p->url, jstr(it, "url"));
        copy_str(p->log, sizeof p->log, jstr(it, "log"));
        copy_str(p->data_dir, sizeof p->data_dir, jstr(it, "data_dir"));
        const cJSON *ports = cJSON_GetObjectItemCaseSensitive(it, "ports");
        if (cJSON_IsObject(ports)) {
            const cJSON *first = ports->child;
            p->port = (int)jnum(ports, "http", jnum_item(first, 0));
            if (strcmp(p->role, "nats") == 0)
                p->port = (int)jnum(ports, "client", p->port);
            p->raft_port = (int)jnum(ports, "raft", 0);
        }
        const cJSON *argv = cJSON_GetObjectItemCaseSensitive(it, "argv");
        if (cJSON_IsArray(argv)) {
            int n = cJSON_GetArraySize(argv);
            if (n < 1 || n > RUN_MAX_ARGS) {
                rc = kvr_err_set(err, KVR_ELIMIT, "%s: %s-%d has %d arguments", path, p->role,
                                 p->id, n);
                goto out;
            }
            char *args[RUN_MAX_ARGS + 1];
            int k = 0;
            const cJSON *a;
            cJSON_ArrayForEach(a, argv)
            {
                if (!cJSON_IsString(a)) {
                    rc = kvr_err_set(err, KVR_EINVAL, "%s: %s-%d: argv holds a non-string", path,
                                     p->role, p->id);
                    goto out;
                }
                args[k++] = a->valuestring;
            }
            if ((rc = run_proc_set_argv(p, args, k, err)) != 0)
                goto out;
        }
    }
out:
    cJSON_Delete(root);
    kvr_buf_free(&b);
    if (rc != 0)
        run_cluster_free(c);
    return rc;
}

int run_cluster_save(const run_cluster *c, kvr_err *err)
{
    cJSON *root = cJSON_CreateObject();
    char *text = NULL;
    int rc = 0;
    if (!root)
        return kvr_err_set(err, KVR_ENOMEM, "building cluster.json");
    cJSON_AddStringToObject(root, "dir", c->dir);
    cJSON_AddStringToObject(root, "namespace", c->ns);
    cJSON_AddStringToObject(root, "model", c->model);
    cJSON *arr = cJSON_AddArrayToObject(root, "processes");
    for (int i = 0; arr && i < c->n; i++) {
        const run_proc *p = &c->procs[i];
        cJSON *o = cJSON_CreateObject();
        if (!o)
            break;
        cJSON_AddItemToArray(arr, o);
        cJSON_AddStringToObject(o, "role", p->role);
        cJSON_AddNumberToObject(o, "id", p->id);
        cJSON_AddNumberToObject(o, "pid", p->pid);
        cJSON_AddNumberToObject(o, "start_time", (double)p->start_time);
        cJSON_AddStringToObject(o, "url", p->url);
        cJSON *ports = cJSON_AddObjectToObject(o, "ports");
        if (ports) {
            cJSON_AddNumberToObject(ports, strcmp(p->role, "nats") == 0 ? "client" : "http",
                                    p->port);
            if (p->raft_port) {
                cJSON_AddNumberToObject(ports, "raft", p->raft_port);
                cJSON_AddNumberToObject(ports, "raft_forward", p->raft_port + 1);
            }
        }
        cJSON_AddStringToObject(o, "log", p->log);
        if (p->data_dir[0])
            cJSON_AddStringToObject(o, "data_dir", p->data_dir);
        cJSON *argv = cJSON_AddArrayToObject(o, "argv");
        for (int a = 0; argv && a < p->argc; a++)
            cJSON_AddItemToArray(argv, cJSON_CreateString(p->argv[a]));
    }
    text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text)
        return kvr_err_set(err, KVR_ENOMEM, "printing cluster.json");
    char path[RUN_PATH_MAX + 32], tmp[RUN_PATH_MAX + 48];
    snprintf(path, sizeof path, "%s/cluster.json", c->dir);
    snprintf(tmp, sizeof tmp, "%s/cluster.json.tmp.%d", c->dir, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) {
        rc = kvr_err_set(err, KVR_EIO, "writing %s: %s", tmp, strerror(errno));
        goto out;
    }
    size_t len = strlen(text);
    bool ok = fwrite(text, 1, len, f) == len && fputc('\n', f) != EOF;
    ok = (fflush(f) == 0) && ok;
    ok = (fsync(fileno(f)) == 0) && ok;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        rc = kvr_err_set(err, KVR_EIO, "writing %s: %s", path, strerror(errno));
        unlink(tmp);
    }
out:
    free(text);
    return rc;
}

long long run_pid_start_time(int pid)
{
    if (pid <= 0)
        return 0;
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    /* comm may hold spaces and parentheses: fields resume after the last ')'. */
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return 0;
    p += 2;
    char state = *p;
    if (state == 'Z' || state == 'X')
        return 0;
    /* p is field 3 (state); start time is field 22. */
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (!p)
            return 0;
        p++;
    }
    return strtoll(p, NULL, 10);
}

bool run_proc_alive(const run_proc *p)
{
    if (p->pid <= 0)
        return false;
    long long st = run_pid_start_time(p->pid);
    if (st == 0)
        return false;
    return p->start_time == 0 || p->start_time == st;
}

int run_proc_spawn(run_proc *p, kvr_err *err)
{
    if (p->argc < 1)
        return kvr_err_set(err, KVR_EINVAL, "%s-%d: no command line recorded", p->role, p->id);
    /* Everything the child needs is prepared before fork: it only calls async-signal-safe
     * functions until exec. */
    int logfd = open(p->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (logfd < 0)
        return kvr_err_set(err, KVR_EIO, "%s-%d: opening log %s: %s", p->role, p->id, p->log,
                           strerror(errno));
    int nullfd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (nullfd < 0) {
        close(logfd);
        return kvr_err_set(err, KVR_EIO, "opening /dev/null: %s", strerror(errno));
    }
    /* A pipe whose write end closes on exec tells the parent whether exec worked. */
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) != 0) {
        close(logfd);
        close(nullfd);
        return kvr_err_set(err, KVR_EIO, "pipe: %s", strerror(errno));
    }
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(logfd);
        close(nullfd);
        close(pfd[0]);
        close(pfd[1]);
        return kvr_err_set(err, KVR_EIO, "%s-%d: fork: %s", p->role, p->id, strerror(e));
    }
    if (pid == 0) {
        setsid();
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        dup2(nullfd, 0);
        dup2(logfd, 1);
        dup2(logfd, 2);
        execv(p->argv[0], p->argv);
        int e = errno;
        (void)!write(pfd[1], &e, sizeof e);
        _exit(127);
    }
    close(pfd[1]);
    close(logfd);
    close(nullfd);
    int child_errno = 0;
    ssize_t n;
    do {
        n = read(pfd[0], &child_errno, sizeof child_errno);
    } while (n < 0 && errno == EINTR);
    close(pfd[0]);
    if (n == (ssize_t)sizeof child_errno) {
        waitpid(pid, NULL, 0);
        return kvr_err_set(err, KVR_EIO, "%s-%d: exec %s: %s", p->role, p->id, p->argv[0],
                           strerror(child_errno));
    }
    p->pid = (int)pid;
    p->start_time = run_pid_start_time(pid);
    return 0;
}

void run_reap(void)
{
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int run_proc_signal(const run_proc *p, int sig)
{
    if (!run_proc_alive(p))
        return KVR_ENOTFOUND;
    /* Each process leads its own group (setsid); signal the group so helpers die too. */
    if (getpgid(p->pid) == p->pid && kill(-p->pid, sig) == 0)
        return 0;
    return kill(p->pid, sig) == 0 ? 0 : KVR_EIO;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

int run_proc_stop(const run_proc *p, int timeout_ms)
{
    if (run_proc_signal(p, SIGTERM) != 0)
        return run_proc_alive(p) ? KVR_EIO : 0;
    for (int waited = 0; waited < timeout_ms; waited += 50) {
        run_reap();
        if (!run_proc_alive(p))
            return 0;
        sleep_ms(50);
    }
    run_proc_signal(p, SIGKILL);
    for (int waited = 0; waited < 2000; waited += 50) {
        run_reap();
        if (!run_proc_alive(p))
            return 0;
        sleep_ms(50);
    }
    return KVR_ETIMEDOUT;
}

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
}
void run_http_global_init(void)
{
    pthread_once(&curl_once, curl_init_once);
}

static size_t http_write_cb(char *ptr, size_t size, size_t nmemb, void *ud)
{
    kvr_buf *b = ud;
    size_t n = size * nmemb;
    if (!b)
        return n;
    if (b->len + n > (64u << 20))
        return 0; /* bounded: abort absurd bodies */
    return kvr_buf_append(b, ptr, n) == 0 ? n : 0;
}

/* The options every request shares, then the request itself; cleans h up. */
static int http_perform(CURL *h, const char *url, long timeout_ms, long *status, kvr_buf *body)
{
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_NOPROXY, "*");
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, http_write_cb);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, body);
    CURLcode cc = curl_easy_perform(h);
    if (cc == CURLE_OK)
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, status);
    curl_easy_cleanup(h);
    return cc == CURLE_OK ? 0 : KVR_EIO;
}

int run_http_get(const char *url, long timeout_ms, long *status, kvr_buf *body)
{
    run_http_global_init();
    *status = 0;
    CURL *h = curl_easy_init();
    if (!h)
        return KVR_ENOMEM;
    return http_perform(h, url, timeout_ms, status, body);
}

int run_http_post(const char *url, const char *token, const char *body, long timeout_ms,
                  long *status, kvr_buf *resp)
{
    run_http_global_init();
    *status = 0;
    CURL *h = curl_easy_init();
    if (!h)
        return KVR_ENOMEM;
    struct curl_slist *hdrs = curl_slist_append(NULL, "Content-Type: application/json");
    char auth[512];
    if (token && hdrs) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", token);
        struct curl_slist *more = curl_slist_append(hdrs, auth);
        hdrs = more ? more : hdrs;
    }
    curl_easy_setopt(h, CURLOPT_POST, 1L);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body ? body : "");
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    int rc = http_perform(h, url, timeout_ms, status, resp);
    curl_slist_free_all(hdrs);
    explicit_bzero(auth, sizeof auth); /* the admin token */
    return rc;
}

bool run_http_ok(const char *base_url, const char *path, long timeout_ms)
{
    char url[256];
    long st = 0;
    snprintf(url, sizeof url, "%s%s", base_url, path);
    return run_http_get(url, timeout_ms, &st, NULL) == 0 && st == 200;
}

/* The raw JSON token after "key": in text (numbers above 2^53 would lose digits in cJSON). */
static void raw_token(const char *text, size_t len, const char *key, char *out, size_t cap)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\"", key);
    out[0] = 0;
    const char *end = text + len;
    const char *p = memmem(text, len, pat, strlen(pat));
    if (!p)
        return;
    p += strlen(pat);
    while (p < end && (*p == ' ' || *p == ':' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    if (p < end && *p == '"')
        p++;
    size_t k = 0;
    while (p < end && k + 1 < cap && *p != '"' && *p != ',' && *p != '}' && *p != ' ' && *p != '\n')
        out[k++] = *p++;
    out[k] = 0;
}

int run_router_get_state(const run_proc *p, long timeout_ms, run_router_state *st, kvr_err *err)
{
    memset(st, 0, sizeof *st);
    char url[256];
    snprintf(url, sizeof url, "%s/v1/state", p->url);
    kvr_buf b;
    kvr_buf_init(&b);
    long status = 0;
    int rc = run_http_get(url, timeout_ms, &status, &b);
    if (rc != 0 || status != 200) {
        kvr_buf_free(&b);
        return kvr_err_set(err, KVR_EIO, "router-%d: GET %s: %s", p->id, url,
                           rc ? "no response" : "not 200");
    }
    cJSON *root = cJSON_ParseWithLength(b.base, b.len);
    if (!root) {
        kvr_buf_free(&b);
        return kvr_err_set(err, KVR_EINVAL, "router-%d: /v1/state is not JSON", p->id);
    }
    const cJSON *raft = cJSON_GetObjectItemCaseSensitive(root, "raft");
    const cJSON *index = cJSON_GetObjectItemCaseSensitive(root, "index");
    if (raft) {
        copy_str(st->role, sizeof st->role, jstr(raft, "role"));
        st->leader = jnum(raft, "leader", 0);
        st->applied_index = jnum(raft, "applied_index", 0);
    }
    const cJSON *workers = cJSON_GetObjectItemCaseSensitive(root, "workers");
    const cJSON *w;
    if (cJSON_IsArray(workers))
        cJSON_ArrayForEach(w, workers)
        {
            const cJSON *up = cJSON_GetObjectItemCaseSensitive(w, "up");
            st->workers_up += cJSON_IsTrue(up) || (!up && cJSON_IsObject(w));
        }
    if (index) {
        st->blocks = jnum(index, "blocks", 0);
        /* "index" comes before any other "digest" in the router's output; search from it. */
        const char *ip = memmem(b.base, b.len, "\"index\"", 7);
        if (ip)
            raw_token(ip, b.len - (size_t)(ip - b.base), "digest", st->digest, sizeof st->digest);
    }
    cJSON_Delete(root);
    kvr_buf_free(&b);
    return 0;
}

int run_cluster_pick_router(run_cluster *c, const char *which, kvr_err *err)
{
    bool want_leader = strcmp(which, "leader") == 0, want_follower = strcmp(which, "follower") == 0;
    if (!want_leader && !want_follower) {
        char *end;
        long id = strtol(which, &end, 10);
        if (*which == 0 || *end != 0 || id < 0)
            return kvr_err_set(err, KVR_EINVAL, "router '%s': want an id, leader or follower",
                               which);
        for (int i = 0; i < c->n; i++)
            if (strcmp(c->procs[i].role, "router") == 0 && c->procs[i].id == id)
                return i;
        return kvr_err_set(err, KVR_ENOTFOUND, "no router %ld in %s/cluster.json", id, c->dir);
    }
    int leader_votes[RUN_MAX_PROCS] = {0};
    int self_leader = -1, follower = -1;
    for (int i = 0; i < c->n; i++) {
        run_proc *p = &c->procs[i];
        if (strcmp(p->role, "router") != 0 || !run_proc_alive(p))
            continue;
        run_router_state st;
        if (run_router_get_state(p, 1000, &st, NULL) != 0)
            continue;
        if (strcmp(st.role, "leader") == 0 && self_leader < 0)
            self_leader = i;
        else if (strcmp(st.role, "follower") == 0 && follower < 0)
            follower = i;
        if (st.leader > 0 && st.leader < RUN_MAX_PROCS)
            leader_votes[st.leader]++;
    }
    if (want_follower) {
        if (follower < 0)
            return kvr_err_set(err, KVR_ENOTFOUND, "no live router reports itself follower");
        return follower;
    }
    if (self_leader >= 0)
        return self_leader;
    int best = 0;
    for (int id = 1; id < RUN_MAX_PROCS; id++)
        if (leader_votes[id] > leader_votes[best])
            best = id;
    if (best > 0)
        for (int i = 0; i < c->n; i++)
            if (strcmp(c->procs[i].role, "router") == 0 && c->procs[i].id == best &&
                run_proc_alive(&c->procs[i]))
                return i;
    return kvr_err_set(err, KVR_ENOTFOUND, "no live router knows a leader");
}

void run_tail_file(const char *path, int lines, char *out, size_t cap)
{
    out[0] = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    off_t size = lseek(fd, 0, SEEK_END);
    size_t want = cap - 1;
    off_t start = size > (off_t)want ? size - (off_t)want : 0;
    ssize_t n = pread(fd, out, want, start);
    close(fd);
    if (n <= 0) {
        out[0] = 0;
        return;
    }
    out[n] = 0;
    /* Keep the last `lines` lines. */
    int seen = 0;
    for (ssize_t i = n - 1; i >= 0; i--) {
        if (out[i] == '\n' && i != n - 1 && ++seen == lines) {
            memmove(out, out + i + 1, (size_t)(n - i));
            return;
        }
    }
}

int run_prom_sum(const char *text, size_t len, const char *name, double *out)
{
    size_t nl = strlen(name);
    const char *p = text, *end = text + len;
    bool found = false;
    double sum = 0;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol)
            eol = end;
        if (p[0] != '#' && (size_t)(eol - p) > nl && memcmp(p, name, nl) == 0 &&
            (p[nl] == ' ' || p[nl] == '{')) {
            const char *v = p + nl;
            if (*v == '{') {
                v = memchr(v, '}', (size_t)(eol - v));
                v = v ? v + 1 : eol;
            }
            char num[64];
            size_t k = 0;
            while (v < eol && *v == ' ')
                v++;
            while (v < eol && *v != ' ' && k + 1 < sizeof num)
                num[k++] = *v++;
            num[k] = 0;
            char *e;
            double d = strtod(num, &e);
            if (k > 0 && *e == 0) {
                sum += d;
                found = true;
            }
        }
        p = eol + 1;
    }
    if (!found)
        return KVR_ENOTFOUND;
    *out = sum;
    return 0;
}

int run_kvrctl(const char *who, char *const *args, bool own_pgroup)
{
    char self[PATH_MAX], path[PATH_MAX + 16];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    self[n > 0 ? n : 0] = 0;
    char *slash = strrchr(self, '/');
    if (slash)
        *slash = 0;
    snprintf(path, sizeof path, "%s/kvrctl", self);
    char *argv[RUN_MAX_ARGS + 2];
    int k = 0;
    argv[k++] = path;
    for (int i = 0; args[i] && k < RUN_MAX_ARGS; i++)
        argv[k++] = args[i];
    argv[k] = NULL;
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        if (own_pgroup) {
            setpgid(0, 0);
            signal(SIGINT, SIG_DFL);
            signal(SIGTERM, SIG_DFL);
        }
        dup2(2, 1);
        execv(path, argv);
        fprintf(stderr, "%s: exec %s: %s\n", who, path, strerror(errno));
        _exit(127);
    }
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}
