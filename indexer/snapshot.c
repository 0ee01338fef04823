/* LMDB snapshot of the index: see snapshot.h for the file layout and the integrity scheme. */
#include "snapshot.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <lmdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>

#include "kvr_log.h"

#define META_MAGIC "KVRIDX01"
#define META_SIZE 80u
#define TRAILER_MAGIC "KVRSNAP1"
#define TRAILER_SIZE 32u
#define WORKER_VAL_SIZE 24u
/* What LMDB needs per record at most, generously: used to size the map and to bound counts. */
#define BYTES_PER_PAIR_MAX 64u
#define MIN_RECORD_BYTES 16u /* no LMDB record can take fewer bytes of file than this */

static inline void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (56 - 8 * i));
}

static inline uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static inline void put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (24 - 8 * i));
}

static inline uint32_t get_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* ---- sorting the image (writer thread) ------------------------------------------------- */

/* LSD radix sort of (ext, seq) pairs by ext, 16-bit digits; digits equal in every key are
 * skipped (small engine hashes often have zero upper halves). tmp holds n pairs. */
static void sort_pairs(uint64_t *p, uint64_t *tmp, uint32_t *count, uint64_t n)
{
    if (n < 2)
        return;
    if (n <= 64) { /* insertion sort */
        for (uint64_t i = 1; i < n; i++) {
            uint64_t k = p[2 * i], v = p[2 * i + 1], j = i;
            while (j > 0 && p[2 * (j - 1)] > k) {
                p[2 * j] = p[2 * (j - 1)];
                p[2 * j + 1] = p[2 * (j - 1) + 1];
                j--;
            }
            p[2 * j] = k;
            p[2 * j + 1] = v;
        }
        return;
    }
    uint64_t *src = p, *dst = tmp;
    for (int shift = 0; shift < 64; shift += 16) {
        memset(count, 0, 65536 * sizeof *count);
        for (uint64_t i = 0; i < n; i++)
            count[(src[2 * i] >> shift) & 0xffff]++;
        if (count[(src[0] >> shift) & 0xffff] == n)
            continue;
        uint32_t sum = 0;
        for (int d = 0; d < 65536; d++) {
            uint32_t c = count[d];
            count[d] = sum;
            sum += c;
        }
        for (uint64_t i = 0; i < n; i++) {
            uint32_t at = count[(src[2 * i] >> shift) & 0xffff]++;
            dst[2 * at] = src[2 * i];
            dst[2 * at + 1] = src[2 * i + 1];
        }
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != p)
        memcpy(p, src, n * 2 * sizeof(uint64_t));
}

static int cmp_worker(const void *a, const void *b)
{
    uint64_t x = ((const kvr_index_image_worker *)a)->worker_id;
    uint64_t y = ((const kvr_index_image_worker *)b)->worker_id;
    return x < y ? -1 : x > y;
}

/* ---- helpers ------------------------------------------------------------------------------ */

static int join(char *out, size_t cap, const char *dir, const char *name, kvr_err *err)
{
    int n = snprintf(out, cap, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= cap)
        return kvr_err_set(err, KVR_EINVAL, "snapshot path too long: %s/%s", dir, name);
    return 0;
}

static int mdb_fail(kvr_err *err, int code, int mrc, const char *what, const char *path)
{
    return kvr_err_set(err, code, "%s %s: %s", what, path, mdb_strerror(mrc));
}

/* XXH3-64 of bytes [0, len) of fd. */
static int hash_file(int fd, uint64_t len, uint64_t *out, const char *path, kvr_err *err)
{
    enum { CHUNK = 1 << 20 };
    uint8_t *buf = malloc(CHUNK);
    XXH3_state_t *st = XXH3_createState();
    int rc = 0;
    if (!buf || !st) {
        rc = kvr_err_set(err, KVR_ENOMEM, "hashing %s: out of memory", path);
        goto out;
    }
    XXH3_64bits_reset(st);
    for (uint64_t off = 0; off < len;) {
        size_t want = len - off < CHUNK ? (size_t)(len - off) : CHUNK;
        ssize_t got = pread(fd, buf, want, (off_t)off);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            rc = got < 0 ? kvr_err_set(err, KVR_EIO, "reading %s: %s", path, strerror(errno))
                         : kvr_err_set(err, KVR_ECORRUPT, "%s: truncated", path);
            goto out;
        }
        XXH3_64bits_update(st, buf, (size_t)got);
        off += (uint64_t)got;
    }
    *out = XXH3_64bits_digest(st);
out:
    free(buf);
    XXH3_freeState(st);
    return rc;
}

static int fsync_dir(const char *dir, kvr_err *err)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        return kvr_err_set(err, KVR_EIO, "opening dir %s: %s", dir, strerror(errno));
    int rc = 0;
    if (fsync(fd) != 0)
        rc = kvr_err_set(err, KVR_EIO, "fsync dir %s: %s", dir, strerror(errno));
    close(fd);
    return rc;
}

static void encode_trailer(uint8_t t[TRAILER_SIZE], uint64_t lmdb_len, uint64_t content_hash)
{
    memcpy(t, TRAILER_MAGIC, 8);
    put_be64(t + 8, lmdb_len);
    put_be64(t + 16, content_hash);
    put_be64(t + 24, XXH3_64bits(t, 24));
}

/* ---- write -------------------------------------------------------------------------------- */

int kvr_snapshot_write(kvr_index_image *img, const char *dir, kvr_snapshot_info *info, kvr_err *err)
{
    char tmp[PATH_MAX], final[PATH_MAX];
    int rc;
    if ((rc = join(tmp, sizeof tmp, dir, KVR_SNAPSHOT_TMP_FILE, err)) ||
        (rc = join(final, sizeof final, dir, KVR_SNAPSHOT_FILE, err)))
        return rc;
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return kvr_err_set(err, KVR_EIO, "creating snapshot dir %s: %s", dir, strerror(errno));

    /* Sort: workers by id, then each worker's pairs by external hash (MDB_APPEND order). */
    uint64_t maxrange = 0;
    for (uint32_t k = 0; k < img->n_workers; k++) {
        const kvr_index_image_worker *w = &img->workers[k];
        if (w->first_pair > img->n_pairs || w->n_pairs > img->n_pairs - w->first_pair)
            return kvr_err_set(err, KVR_EINVAL, "snapshot: image worker %" PRIu64 " out of range",
                               w->worker_id);
        if (w->n_pairs > maxrange)
            maxrange = w->n_pairs;
    }
    if (img->n_workers > 1)
        qsort(img->workers, img->n_workers, sizeof *img->workers, cmp_worker);
    if (maxrange > 64) {
        uint64_t *sorttmp = malloc(maxrange * 2 * sizeof(uint64_t));
        uint32_t *count = malloc(65536 * sizeof(uint32_t));
        if (!sorttmp || !count) {
            free(sorttmp);
            free(count);
            return kvr_err_set(err, KVR_ENOMEM, "snapshot: out of memory sorting");
        }
        for (uint32_t k = 0; k < img->n_workers; k++)
            sort_pairs(img->pairs + 2 * img->workers[k].first_pair, sorttmp, count,
                       img->workers[k].n_pairs);
        free(sorttmp);
        free(count);
    } else {
        for (uint32_t k = 0; k < img->n_workers; k++)
            sort_pairs(img->pairs + 2 * img->workers[k].first_pair, NULL, NULL,
                       img->workers[k].n_pairs);
    }

    unlink(tmp); /* a leftover from a crashed writer */
    MDB_env *env = NULL;
    MDB_txn *txn = NULL;
    int fd = -1;
    int mrc;
    uint64_t est = img->n_pairs * BYTES_PER_PAIR_MAX + (uint64_t)img->n_workers * 256 + (16u << 20);
    size_t mapsize = (size_t)(2 * est + (64u << 20));
    if ((mrc = mdb_env_create(&env)) || (mrc = mdb_env_set_maxdbs(env, 4)) ||
        (mrc = mdb_env_set_mapsize(env, mapsize)) ||
        (mrc = mdb_env_open(env, tmp, MDB_NOSUBDIR | MDB_NOSYNC | MDB_NOLOCK, 0644))) {
        rc = mdb_fail(err, KVR_EIO, mrc, "creating snapshot", tmp);
        goto fail;
    }
    MDB_dbi dmeta, dworkers, dext;
    if ((mrc = mdb_txn_begin(env, NULL, 0, &txn)) ||
        (mrc = mdb_dbi_open(txn, "meta", MDB_CREATE, &dmeta)) ||
        (mrc = mdb_dbi_open(txn, "workers", MDB_CREATE, &dworkers)) ||
        (mrc = mdb_dbi_open(txn, "ext", MDB_CREATE, &dext))) {
        rc = mdb_fail(err, KVR_EIO, mrc, "starting snapshot txn", tmp);
        goto fail;
    }
    XXH3_state_t sum;
    XXH3_64bits_reset(&sum);
    for (uint32_t k = 0; k < img->n_workers; k++) {
        const kvr_index_image_worker *w = &img->workers[k];
        uint8_t kb[8], vb[WORKER_VAL_SIZE];
        put_be64(kb, w->worker_id);
        put_be64(vb, w->capacity_blocks);
        put_be64(vb + 8, w->last_event_seq);
        put_be64(vb + 16, w->n_pairs);
        XXH3_64bits_update(&sum, kb, sizeof kb);
        XXH3_64bits_update(&sum, vb, sizeof vb);
        MDB_val key = {sizeof kb, kb}, val = {sizeof vb, vb};
        if ((mrc = mdb_put(txn, dworkers, &key, &val, MDB_APPEND))) {
            rc = mdb_fail(err, KVR_EIO, mrc, "writing worker records to", tmp);
            goto fail;
        }
    }
    for (uint32_t k = 0; k < img->n_workers; k++) {
        const kvr_index_image_worker *w = &img->workers[k];
        const uint64_t *p = img->pairs + 2 * w->first_pair;
        uint8_t kb[16], vb[8];
        put_be64(kb, w->worker_id);
        for (uint64_t i = 0; i < w->n_pairs; i++, p += 2) {
            put_be64(kb + 8, p[0]);
            put_be64(vb, p[1]);
            XXH3_64bits_update(&sum, kb, sizeof kb);
            XXH3_64bits_update(&sum, vb, sizeof vb);
            MDB_val key = {sizeof kb, kb}, val = {sizeof vb, vb};
            if ((mrc = mdb_put(txn, dext, &key, &val, MDB_APPEND))) {
                rc = mdb_fail(err, KVR_EIO, mrc, "writing ext records to", tmp);
                goto fail;
            }
        }
    }
    uint8_t meta[META_SIZE] = {0};
    uint64_t created = (uint64_t)kvr_now_ms();
    memcpy(meta, META_MAGIC, 8);
    put_be32(meta + 8, KVR_SNAPSHOT_FORMAT);
    put_be32(meta + 12, img->block_size);
    put_be64(meta + 16, img->stream_seq);
    put_be32(meta + 24, img->n_workers);
    put_be32(meta + 28, img->format);
    put_be64(meta + 32, img->n_pairs);
    put_be64(meta + 40, img->entries);
    put_be64(meta + 48, img->digest);
    put_be64(meta + 56, XXH3_64bits_digest(&sum));
    put_be64(meta + 64, created);
    put_be64(meta + 72, XXH3_64bits(meta, 72));
    MDB_val mkey = {4, "meta"}, mval = {sizeof meta, meta};
    if ((mrc = mdb_put(txn, dmeta, &mkey, &mval, 0))) {
        rc = mdb_fail(err, KVR_EIO, mrc, "writing meta to", tmp);
        goto fail;
    }
    mrc = mdb_txn_commit(txn);
    txn = NULL;
    if (mrc) {
        rc = mdb_fail(err, KVR_EIO, mrc, "committing", tmp);
        goto fail;
    }
    if ((mrc = mdb_env_sync(env, 1))) {
        rc = mdb_fail(err, KVR_EIO, mrc, "syncing", tmp);
        goto fail;
    }
    mdb_env_close(env);
    env = NULL;

    /* Trailer: lets a reader verify every byte before LMDB trusts any page. */
    fd = open(tmp, O_RDWR | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        rc = kvr_err_set(err, KVR_EIO, "reopening %s: %s", tmp, strerror(errno));
        goto fail;
    }
    uint64_t lmdb_len = (uint64_t)st.st_size, h;
    if ((rc = hash_file(fd, lmdb_len, &h, tmp, err)))
        goto fail;
    uint8_t trailer[TRAILER_SIZE];
    encode_trailer(trailer, lmdb_len, h);
    if (pwrite(fd, trailer, sizeof trailer, (off_t)lmdb_len) != (ssize_t)sizeof trailer ||
        fsync(fd) != 0) {
        rc = kvr_err_set(err, KVR_EIO, "writing trailer of %s: %s", tmp, strerror(errno));
        goto fail;
    }
    close(fd);
    fd = -1;
    if (rename(tmp, final) != 0) {
        rc = kvr_err_set(err, KVR_EIO, "renaming %s to %s: %s", tmp, final, strerror(errno));
        goto fail;
    }
    if ((rc = fsync_dir(dir, err)))
        return rc; /* the new file is in place; only its durability is in doubt */
    if (info) {
        info->file_bytes = lmdb_len + TRAILER_SIZE;
        info->pairs = img->n_pairs;
        info->entries = img->entries;
        info->workers = img->n_workers;
        info->block_size = img->block_size;
        info->stream_seq = img->stream_seq;
        info->digest = img->digest;
        info->created_ms = created;
    }
    return 0;
fail:
    if (txn)
        mdb_txn_abort(txn);
    if (env)
        mdb_env_close(env);
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    return rc;
}

/* ---- read --------------------------------------------------------------------------------- */

int kvr_snapshot_read(const char *dir, uint32_t expected_block_size, kvr_index_image *img,
                      kvr_snapshot_info *info, kvr_err *err)
{
    memset(img, 0, sizeof *img);
    char path[PATH_MAX];
    int rc;
    if ((rc = join(path, sizeof path, dir, KVR_SNAPSHOT_FILE, err)))
        return rc;
    MDB_env *env = NULL;
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    int mrc;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return kvr_err_set(err, errno == ENOENT ? KVR_ENOTFOUND : KVR_EIO, "opening %s: %s", path,
                           strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = kvr_err_set(err, KVR_EIO, "stat %s: %s", path, strerror(errno));
        goto fail;
    }
    uint64_t size = (uint64_t)st.st_size;
    if (!S_ISREG(st.st_mode) || size < TRAILER_SIZE + 2 * 4096 || size > KVR_SNAPSHOT_MAX_BYTES) {
        rc = kvr_err_set(err, KVR_ECORRUPT,
                         "%s: %" PRIu64 " bytes is not a snapshot (truncated or foreign)", path,
                         size);
        goto fail;
    }
    uint8_t tr[TRAILER_SIZE], want[TRAILER_SIZE];
    if (pread(fd, tr, sizeof tr, (off_t)(size - TRAILER_SIZE)) != (ssize_t)sizeof tr) {
        rc = kvr_err_set(err, KVR_EIO, "reading %s: %s", path, strerror(errno));
        goto fail;
    }
    uint64_t lmdb_len = size - TRAILER_SIZE;
    if (memcmp(tr, TRAILER_MAGIC, 8) != 0 || get_be64(tr + 8) != lmdb_len ||
        get_be64(tr + 24) != XXH3_64bits(tr, 24)) {
        rc = kvr_err_set(err, KVR_ECORRUPT, "%s: no valid snapshot trailer (truncated or foreign)",
                         path);
        goto fail;
    }
    uint64_t h;
    if ((rc = hash_file(fd, lmdb_len, &h, path, err)))
        goto fail;
    encode_trailer(want, lmdb_len, h);
    if (memcmp(want, tr, sizeof tr) != 0) {
        rc = kvr_err_set(err, KVR_ECORRUPT, "%s: content checksum mismatch", path);
        goto fail;
    }
    close(fd);
    fd = -1;

    size_t mapsize = (size_t)((lmdb_len + (1u << 20)) & ~(uint64_t)((1u << 20) - 1)) + (1u << 20);
    if ((mrc = mdb_env_create(&env)) || (mrc = mdb_env_set_maxdbs(env, 4)) ||
        (mrc = mdb_env_set_mapsize(env, mapsize)) ||
        (mrc = mdb_env_open(env, path, MDB_NOSUBDIR | MDB_RDONLY | MDB_NOLOCK, 0444))) {
        rc = mdb_fail(err,
                      mrc == MDB_INVALID || mrc == MDB_VERSION_MISMATCH || mrc == MDB_CORRUPTED ||
                              mrc == MDB_PAGE_NOTFOUND
                          ? KVR_ECORRUPT
                          : KVR_EIO,
                      mrc, "opening", path);
        goto fail;
    }
    MDB_dbi dmeta, dworkers, dext;
    if ((mrc = mdb_txn_begin(env, NULL, MDB_RDONLY, &txn))) {
        rc = mdb_fail(err, KVR_EIO, mrc, "read txn on", path);
        goto fail;
    }
    if ((mrc = mdb_dbi_open(txn, "meta", 0, &dmeta)) ||
        (mrc = mdb_dbi_open(txn, "workers", 0, &dworkers)) ||
        (mrc = mdb_dbi_open(txn, "ext", 0, &dext))) {
        rc = mdb_fail(err, mrc == MDB_NOTFOUND ? KVR_ECORRUPT : KVR_EIO, mrc,
                      "not a kvroute index snapshot:", path);
        goto fail;
    }
    MDB_val mkey = {4, "meta"}, mval;
    if ((mrc = mdb_get(txn, dmeta, &mkey, &mval))) {
        rc = mdb_fail(err, KVR_ECORRUPT, mrc, "no meta record in", path);
        goto fail;
    }
    const uint8_t *m = mval.mv_data;
    if (mval.mv_size != META_SIZE || memcmp(m, META_MAGIC, 8) != 0 ||
        get_be64(m + 72) != XXH3_64bits(m, 72)) {
        rc = kvr_err_set(err, KVR_ECORRUPT, "%s: bad meta record", path);
        goto fail;
    }
    uint32_t format = get_be32(m + 8), bs = get_be32(m + 12);
    if (format != KVR_SNAPSHOT_FORMAT || get_be32(m + 28) != KVR_INDEX_IMAGE_FORMAT) {
        rc = kvr_err_set(err, KVR_EUNSUPPORTED, "%s: snapshot format %u, this build reads %u", path,
                         format, KVR_SNAPSHOT_FORMAT);
        goto fail;
    }
    if (expected_block_size && bs != expected_block_size) {
        rc = kvr_err_set(err, KVR_EUNSUPPORTED, "%s: block size %u, the router's is %u", path, bs,
                         expected_block_size);
        goto fail;
    }
    uint32_t n_workers = get_be32(m + 24);
    uint64_t n_pairs = get_be64(m + 32);
    /* Bound the counts by what the file can hold before allocating from them. */
    if (n_workers > KVR_INDEX_MAX_WORKERS_LIMIT || n_pairs > lmdb_len / MIN_RECORD_BYTES) {
        rc = kvr_err_set(err, KVR_ECORRUPT,
                         "%s: meta claims %u workers and %" PRIu64 " pairs, impossible for %" PRIu64
                         " bytes",
                         path, n_workers, n_pairs, lmdb_len);
        goto fail;
    }
    img->format = KVR_INDEX_IMAGE_FORMAT;
    img->block_size = bs;
    img->stream_seq = get_be64(m + 16);
    img->entries = get_be64(m + 40);
    img->digest = get_be64(m + 48);
    uint64_t want_sum = get_be64(m + 56);
    uint64_t created = get_be64(m + 64);
    img->workers = calloc(n_workers ? n_workers : 1, sizeof *img->workers);
    img->pairs = malloc((n_pairs ? n_pairs : 1) * 2 * sizeof(uint64_t));
    if (!img->workers || !img->pairs) {
        rc = kvr_err_set(err, KVR_ENOMEM, "reading %s: out of memory", path);
        goto fail;
    }
    XXH3_state_t sum;
    XXH3_64bits_reset(&sum);
    MDB_val key, val;
    uint32_t nw = 0;
    uint64_t covered = 0;
    if ((mrc = mdb_cursor_open(txn, dworkers, &cur))) {
        rc = mdb_fail(err, KVR_EIO, mrc, "cursor on", path);
        goto fail;
    }
    for (mrc = mdb_cursor_get(cur, &key, &val, MDB_FIRST); mrc == 0;
         mrc = mdb_cursor_get(cur, &key, &val, MDB_NEXT)) {
        if (nw >= n_workers || key.mv_size != 8 || val.mv_size != WORKER_VAL_SIZE) {
            rc = kvr_err_set(err, KVR_ECORRUPT, "%s: unexpected worker record %u", path, nw);
            goto fail;
        }
        const uint8_t *v = val.mv_data;
        kvr_index_image_worker *w = &img->workers[nw++];
        w->worker_id = get_be64(key.mv_data);
        w->capacity_blocks = get_be64(v);
        w->last_event_seq = get_be64(v + 8);
        w->n_pairs = get_be64(v + 16);
        w->first_pair = covered;
        if (w->n_pairs > n_pairs - covered) {
            rc = kvr_err_set(err, KVR_ECORRUPT,
                             "%s: worker records claim more than %" PRIu64 " pairs", path, n_pairs);
            goto fail;
        }
        covered += w->n_pairs;
        XXH3_64bits_update(&sum, key.mv_data, 8);
        XXH3_64bits_update(&sum, val.mv_data, WORKER_VAL_SIZE);
    }
    if (mrc != MDB_NOTFOUND) {
        rc = mdb_fail(err, KVR_ECORRUPT, mrc, "reading worker records of", path);
        goto fail;
    }
    mdb_cursor_close(cur);
    cur = NULL;
    if (nw != n_workers || covered != n_pairs) {
        rc = kvr_err_set(err, KVR_ECORRUPT,
                         "%s: %u worker records covering %" PRIu64
                         " pairs, meta says %u and %" PRIu64,
                         path, nw, covered, n_workers, n_pairs);
        goto fail;
    }
    img->n_workers = n_workers;
    if ((mrc = mdb_cursor_open(txn, dext, &cur))) {
        rc = mdb_fail(err, KVR_EIO, mrc, "cursor on", path);
        goto fail;
    }
    uint64_t np = 0;
    uint32_t wk = 0;
    for (mrc = mdb_cursor_get(cur, &key, &val, MDB_FIRST); mrc == 0;
         mrc = mdb_cursor_get(cur, &key, &val, MDB_NEXT)) {
        while (wk < n_workers && np == img->workers[wk].first_pair + img->workers[wk].n_pairs)
            wk++;
        if (np >= n_pairs || wk >= n_workers || key.mv_size != 16 || val.mv_size != 8 ||
            get_be64(key.mv_data) != img->workers[wk].worker_id) {
            rc = kvr_err_set(err, KVR_ECORRUPT, "%s: unexpected ext record %" PRIu64, path, np);
            goto fail;
        }
        img->pairs[2 * np] = get_be64((const uint8_t *)key.mv_data + 8);
        img->pairs[2 * np + 1] = get_be64(val.mv_data);
        np++;
        XXH3_64bits_update(&sum, key.mv_data, 16);
        XXH3_64bits_update(&sum, val.mv_data, 8);
    }
    if (mrc != MDB_NOTFOUND) {
        rc = mdb_fail(err, KVR_ECORRUPT, mrc, "reading ext records of", path);
        goto fail;
    }
    if (np != n_pairs) {
        rc = kvr_err_set(err, KVR_ECORRUPT, "%s: %" PRIu64 " ext records, meta says %" PRIu64, path,
                         np, n_pairs);
        goto fail;
    }
    img->n_pairs = n_pairs;
    if (XXH3_64bits_digest(&sum) != want_sum) {
        rc = kvr_err_set(err, KVR_ECORRUPT, "%s: records checksum mismatch", path);
        goto fail;
    }
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    mdb_env_close(env);
    if (info) {
        info->file_bytes = size;
        info->pairs = n_pairs;
        info->entries = img->entries;
        info->workers = n_workers;
        info->block_size = bs;
        info->stream_seq = img->stream_seq;
        info->digest = img->digest;
        info->created_ms = created;
    }
    return 0;
fail:
    if (cur)
        mdb_cursor_close(cur);
    if (txn)
        mdb_txn_abort(txn);
    if (env)
        mdb_env_close(env);
    if (fd >= 0)
        close(fd);
    kvr_index_image_free(img);
    return rc;
}

int kvr_snapshot_load(const char *dir, kvr_index *idx, kvr_snapshot_info *info, kvr_err *err)
{
    kvr_index_image img;
    int rc = kvr_snapshot_read(dir, kvr_index_block_size(idx), &img, info, err);
    if (rc)
        return rc;
    rc = kvr_index_import(idx, &img, err);
    if (rc)
        kvr_err_wrap(err, rc, "loading snapshot from %s", dir);
    kvr_index_image_free(&img);
    return rc;
}
