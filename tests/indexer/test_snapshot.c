/* Snapshot tests: round trip through a real LMDB file, and every kind of bad file refused
 * cleanly (missing, zero-length, truncated, flipped bytes, random bytes, foreign LMDB, wrong
 * block size) without touching the index. */
#define _XOPEN_SOURCE 700 /* nftw */
#define _DEFAULT_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <fcntl.h>
#include <ftw.h>
#include <lmdb.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "index.h"
#include "kvr_hash.h"
#include "snapshot.h"

#define BS 4u

static char g_dir[256];
static char g_file[300];

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int setup(void **state)
{
    (void)state;
    const char *base = getenv("TMPDIR");
    snprintf(g_dir, sizeof g_dir, "%s/kvr-indexer-snap-XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(g_dir))
        return -1;
    snprintf(g_file, sizeof g_file, "%s/%s", g_dir, KVR_SNAPSHOT_FILE);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    nftw(g_dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
    return 0;
}

static kvr_index *mk(uint32_t bs)
{
    kvr_index *idx = NULL;
    kvr_index_opts o = {.block_size = bs};
    kvr_err err = {0};
    assert_int_equal(kvr_index_create(&idx, &o, &err), 0);
    return idx;
}

/* Fills idx with `docs` documents of `blocks` blocks spread over 5 workers, some shared. */
static void fill(kvr_index *idx, uint32_t docs, uint32_t blocks, uint32_t salt)
{
    static uint64_t hashes[1024];
    static uint32_t tokens[1024 * BS];
    kvr_err err = {0};
    for (uint32_t d = 0; d < docs; d++) {
        for (uint32_t j = 0; j < blocks; j++) {
            hashes[j] = ((uint64_t)(d % (docs / 2 + 1)) << 20) + j + salt; /* shared docs */
            for (uint32_t k = 0; k < BS; k++)
                tokens[j * BS + k] = (d % (docs / 2 + 1)) * 7919u + j * 31u + k + salt;
        }
        kvr_kv_event ev = {.type = KVR_KV_STORED,
                           .block_size = BS,
                           .n_hashes = blocks,
                           .n_tokens = blocks * BS,
                           .hashes = hashes,
                           .tokens = tokens};
        assert_int_equal(kvr_index_apply(idx, (d % 5) * 1000003ULL, &ev, &err), 0);
    }
}

static void assert_same(kvr_index *a, kvr_index *b)
{
    kvr_index_stats sa, sb;
    kvr_index_stats_get(a, &sa);
    kvr_index_stats_get(b, &sb);
    assert_true(kvr_index_digest(a) == kvr_index_digest(b));
    assert_int_equal(sa.entries, sb.entries);
    assert_int_equal(sa.blocks, sb.blocks);
    assert_int_equal(sa.workers, sb.workers);
    assert_int_equal(sa.ext_hashes, sb.ext_hashes);
    assert_int_equal(kvr_index_stream_seq(a), kvr_index_stream_seq(b));
    kvr_index_worker_info wa[16], wb;
    size_t n = kvr_index_workers(a, wa, 16);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(kvr_index_worker(b, wa[i].worker_id, &wb), 0);
        assert_int_equal(wa[i].capacity_blocks, wb.capacity_blocks);
        assert_int_equal(wa[i].last_event_seq, wb.last_event_seq);
        assert_int_equal(wa[i].entries, wb.entries);
    }
}

static int write_snapshot(kvr_index *idx, kvr_snapshot_info *info)
{
    kvr_index_image img;
    kvr_err err = {0};
    int rc = kvr_index_export(idx, &img, &err);
    if (rc == 0)
        rc = kvr_snapshot_write(&img, g_dir, info, &err);
    if (rc)
        print_error("write: %s\n", err.msg);
    kvr_index_image_free(&img);
    return rc;
}

static void test_round_trip(void **state)
{
    (void)state;
    kvr_index *a = mk(BS);
    fill(a, 300, 40, 0);
    assert_int_equal(kvr_index_set_worker_capacity(a, 2000006, 12345), 0);
    assert_int_equal(kvr_index_set_worker_cursor(a, 0, 777), 0);
    assert_int_equal(kvr_index_set_worker_cursor(a, 99, 5), 0); /* a worker with no entries */
    kvr_index_set_stream_seq(a, 4242);
    kvr_snapshot_info wi = {0}, ri = {0};
    assert_int_equal(write_snapshot(a, &wi), 0);
    assert_true(wi.file_bytes > 0);
    assert_int_equal(access(g_dir, F_OK), 0);
    char tmp[320];
    snprintf(tmp, sizeof tmp, "%s/%s", g_dir, KVR_SNAPSHOT_TMP_FILE);
    assert_int_not_equal(access(tmp, F_OK), 0); /* renamed away */

    kvr_index *b = mk(BS);
    fill(b, 10, 3, 999); /* content that the load must replace */
    kvr_err err = {0};
    assert_int_equal(kvr_snapshot_load(g_dir, b, &ri, &err), 0);
    assert_same(a, b);
    assert_int_equal(ri.stream_seq, 4242);
    assert_int_equal(ri.entries, wi.entries);
    assert_int_equal(ri.pairs, wi.pairs);
    assert_true(ri.digest == kvr_index_digest(a));

    /* a second snapshot replaces the first */
    fill(a, 20, 5, 12345);
    kvr_index_set_stream_seq(a, 5000);
    assert_int_equal(write_snapshot(a, NULL), 0);
    assert_int_equal(kvr_snapshot_load(g_dir, b, NULL, &err), 0);
    assert_same(a, b);

    /* an empty index round-trips too */
    kvr_index *e = mk(BS), *e2 = mk(BS);
    assert_int_equal(write_snapshot(e, NULL), 0);
    fill(e2, 4, 4, 1);
    assert_int_equal(kvr_snapshot_load(g_dir, e2, NULL, &err), 0);
    assert_same(e, e2);
    assert_true(kvr_index_digest(e2) == 0);
    kvr_index_destroy(e);
    kvr_index_destroy(e2);
    kvr_index_destroy(a);
    kvr_index_destroy(b);
}

/* Loads must fail with `code`, leave the target index exactly as it was, and explain. */
static void expect_refused(kvr_index *target, int code, const char *why)
{
    uint64_t d = kvr_index_digest(target);
    kvr_index_stats s0, s1;
    kvr_index_stats_get(target, &s0);
    kvr_err err = {0};
    int rc = kvr_snapshot_load(g_dir, target, NULL, &err);
    if (rc != code)
        fail_msg("%s: got %d (%s), want %d", why, rc, err.msg, code);
    assert_true(strlen(err.msg) > 0);
    assert_true(kvr_index_digest(target) == d);
    kvr_index_stats_get(target, &s1);
    assert_int_equal(s0.entries, s1.entries);
    assert_int_equal(s0.bytes, s1.bytes);
}

static void read_file(const char *p, uint8_t **data, size_t *len)
{
    FILE *f = fopen(p, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    *data = malloc(*len ? *len : 1);
    assert_non_null(*data);
    assert_int_equal(fread(*data, 1, *len, f), *len);
    fclose(f);
}

static void write_file(const char *p, const uint8_t *data, size_t len)
{
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    fclose(f);
}

static void test_missing(void **state)
{
    (void)state;
    kvr_index *t = mk(BS);
    fill(t, 10, 3, 5);
    expect_refused(t, KVR_ENOTFOUND, "empty dir");
    char sub[320];
    snprintf(sub, sizeof sub, "%s/none", g_dir);
    kvr_index_image img;
    kvr_err err = {0};
    assert_int_equal(kvr_snapshot_read(sub, 0, &img, NULL, &err), KVR_ENOTFOUND);
    kvr_index_destroy(t);
}

static void test_corrupt_files(void **state)
{
    (void)state;
    kvr_index *a = mk(BS);
    fill(a, 200, 30, 0);
    assert_int_equal(write_snapshot(a, NULL), 0);
    uint8_t *good;
    size_t len;
    read_file(g_file, &good, &len);
    kvr_index *t = mk(BS);
    fill(t, 10, 3, 5);

    /* zero-length */
    write_file(g_file, good, 0);
    expect_refused(t, KVR_ECORRUPT, "zero-length");
    /* truncations: tail, half, one byte */
    write_file(g_file, good, len - 1);
    expect_refused(t, KVR_ECORRUPT, "minus one byte");
    write_file(g_file, good, len / 2);
    expect_refused(t, KVR_ECORRUPT, "half");
    write_file(g_file, good, 100);
    expect_refused(t, KVR_ECORRUPT, "100 bytes");
    /* a byte flipped anywhere: meta pages, data pages, trailer */
    uint8_t *bad = malloc(len + 1);
    assert_non_null(bad);
    size_t positions = 0;
    for (size_t pos = 0; pos < len; pos += (pos < 8192 ? 509 : 4099)) {
        memcpy(bad, good, len);
        bad[pos] ^= 0x20;
        write_file(g_file, bad, len);
        expect_refused(t, KVR_ECORRUPT, "flipped byte");
        positions++;
    }
    memcpy(bad, good, len);
    bad[len > 0 ? len - 1 : 0] ^= 1;
    write_file(g_file, bad, len);
    expect_refused(t, KVR_ECORRUPT, "flipped last byte");
    assert_true(positions > 10);
    /* random bytes, of a plausible size */
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bad[i] = (uint8_t)x;
    }
    write_file(g_file, bad, len);
    expect_refused(t, KVR_ECORRUPT, "random bytes");
    /* the good file still loads */
    write_file(g_file, good, len);
    kvr_err err = {0};
    assert_int_equal(kvr_snapshot_load(g_dir, t, NULL, &err), 0);
    assert_same(a, t);
    free(bad);
    free(good);
    kvr_index_destroy(a);
    kvr_index_destroy(t);
}

/* Appends a valid-looking trailer so that the LMDB-level checks are the ones exercised. */
static void add_trailer(const char *p)
{
    uint8_t *data;
    size_t len;
    read_file(p, &data, &len);
    uint8_t *out = malloc(len + 32);
    assert_non_null(out);
    memcpy(out, data, len);
    uint8_t *t = out + len;
    memcpy(t, "KVRSNAP1", 8);
    uint64_t h = XXH3_64bits(data, len);
    for (int i = 0; i < 8; i++) {
        t[8 + i] = (uint8_t)((uint64_t)len >> (56 - 8 * i));
        t[16 + i] = (uint8_t)(h >> (56 - 8 * i));
    }
    uint64_t th = XXH3_64bits(t, 24);
    for (int i = 0; i < 8; i++)
        t[24 + i] = (uint8_t)(th >> (56 - 8 * i));
    write_file(p, out, len + 32);
    free(out);
    free(data);
}

static void test_foreign_lmdb(void **state)
{
    (void)state;
    kvr_index *t = mk(BS);
    fill(t, 10, 3, 5);
    /* an ordinary LMDB file, without our DBIs */
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 2), 0);
    assert_int_equal(mdb_env_open(env, g_file, MDB_NOSUBDIR | MDB_NOLOCK, 0644), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "other", MDB_CREATE, &dbi), 0);
    MDB_val k = {5, "hello"}, v = {5, "world"};
    assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    expect_refused(t, KVR_ECORRUPT, "foreign lmdb, no trailer");
    add_trailer(g_file);
    expect_refused(t, KVR_ECORRUPT, "foreign lmdb with a trailer");
    /* random bytes with a valid trailer: LMDB itself must refuse, not crash */
    uint8_t junk[16384];
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (uint8_t)(i * 131 + 7);
    write_file(g_file, junk, sizeof junk);
    add_trailer(g_file);
    expect_refused(t, KVR_ECORRUPT, "junk with a trailer");
    kvr_index_destroy(t);
}

/* A record altered inside a well-formed file (trailer recomputed): the checksum over the
 * records catches it. */
static void test_record_checksum(void **state)
{
    (void)state;
    kvr_index *a = mk(BS);
    fill(a, 50, 10, 0);
    kvr_index_image img;
    kvr_err err = {0};
    assert_int_equal(kvr_index_export(a, &img, &err), 0);
    uint64_t seq = img.pairs[1];
    kvr_index_image_free(&img);
    assert_int_equal(write_snapshot(a, NULL), 0);
    uint8_t *data;
    size_t len;
    read_file(g_file, &data, &len);
    uint8_t be[8];
    for (int i = 0; i < 8; i++)
        be[i] = (uint8_t)(seq >> (56 - 8 * i));
    size_t at = SIZE_MAX;
    for (size_t i = 0; i + 8 <= len - 32; i++)
        if (memcmp(data + i, be, 8) == 0) {
            at = i;
            break;
        }
    assert_true(at != SIZE_MAX);
    data[at + 7] ^= 0x01;
    write_file(g_file, data, len - 32); /* drop the old trailer, add a matching one */
    add_trailer(g_file);
    kvr_index *t = mk(BS);
    expect_refused(t, KVR_ECORRUPT, "altered record");
    int rc = kvr_snapshot_read(g_dir, 0, &img, NULL, &err);
    assert_int_equal(rc, KVR_ECORRUPT);
    assert_non_null(strstr(err.msg, "checksum"));
    free(data);
    kvr_index_destroy(a);
    kvr_index_destroy(t);
}

static void test_wrong_block_size(void **state)
{
    (void)state;
    kvr_index *a = mk(BS);
    fill(a, 20, 5, 0);
    assert_int_equal(write_snapshot(a, NULL), 0);
    kvr_index *t = mk(BS * 2);
    expect_refused(t, KVR_EUNSUPPORTED, "block size");
    kvr_index_image img;
    kvr_err err = {0};
    assert_int_equal(kvr_snapshot_read(g_dir, BS * 2, &img, NULL, &err), KVR_EUNSUPPORTED);
    assert_non_null(strstr(err.msg, "block size"));
    assert_int_equal(kvr_snapshot_read(g_dir, 0, &img, NULL, &err), 0);
    assert_int_equal(img.block_size, BS);
    kvr_index_image_free(&img);
    kvr_index_destroy(a);
    kvr_index_destroy(t);
}

/* The threading contract: the image is written on another thread while the owner keeps
 * changing the index; the file holds exactly the exported state. */
typedef struct writer_arg {
    kvr_index_image *img;
    int rc;
    kvr_err err;
} writer_arg;

static void *writer_main(void *p)
{
    writer_arg *a = p;
    a->rc = kvr_snapshot_write(a->img, g_dir, NULL, &a->err);
    return NULL;
}

static void test_write_on_other_thread(void **state)
{
    (void)state;
    kvr_index *a = mk(BS);
    fill(a, 400, 50, 0);
    kvr_index_set_stream_seq(a, 10);
    kvr_index_image img;
    kvr_err err = {0};
    assert_int_equal(kvr_index_export(a, &img, &err), 0);
    uint64_t exported = kvr_index_digest(a);
    writer_arg wa = {.img = &img};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, writer_main, &wa), 0);
    fill(a, 300, 20, 77777); /* the owner goes on */
    kvr_kv_event clr = {.type = KVR_KV_CLEARED};
    assert_int_equal(kvr_index_apply(a, 0, &clr, &err), 0);
    kvr_index_set_stream_seq(a, 11);
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_int_equal(wa.rc, 0);
    kvr_index_image_free(&img);
    assert_true(kvr_index_digest(a) != exported);
    kvr_index *b = mk(BS);
    kvr_snapshot_info info;
    assert_int_equal(kvr_snapshot_load(g_dir, b, &info, &err), 0);
    assert_true(kvr_index_digest(b) == exported);
    assert_int_equal(info.stream_seq, 10);
    kvr_index_destroy(a);
    kvr_index_destroy(b);
}

/* Enough entries for the radix sort and several LMDB pages per worker. */
static void test_large(void **state)
{
    (void)state;
    kvr_index *a = mk(BS);
    fill(a, 2000, 100, 3);
    kvr_index_stats st;
    kvr_index_stats_get(a, &st);
    assert_true(st.entries >= 100000);
    assert_int_equal(write_snapshot(a, NULL), 0);
    kvr_index *b = mk(BS);
    kvr_err err = {0};
    assert_int_equal(kvr_snapshot_load(g_dir, b, NULL, &err), 0);
    assert_same(a, b);
    kvr_index_destroy(a);
    kvr_index_destroy(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_corrupt_files, setup, teardown),
        cmocka_unit_test_setup_teardown(test_foreign_lmdb, setup, teardown),
        cmocka_unit_test_setup_teardown(test_record_checksum, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_block_size, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_on_other_thread, setup, teardown),
        cmocka_unit_test_setup_teardown(test_large, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
