/* routerd snapshots of the index (routerd_int.h). */
#include "routerd_int.h"

/* ------------------------------------------------------------------------------------------ */
/* snapshots */

typedef struct snap_job {
    uv_work_t req;
    kvr_routerd *rd;
    kvr_index_image img;
    char *dir;
    int rc;
    kvr_err err;
    kvr_snapshot_info info;
    int64_t t0_ns;
    double export_s; /* time the loop was busy copying the index */
    bool final;
} snap_job;

static void snap_work(uv_work_t *req)
{
    snap_job *j = req->data;
    j->rc = kvr_snapshot_write(&j->img, j->dir, &j->info, &j->err);
}


static void snap_after(uv_work_t *req, int status)
{
    snap_job *j = req->data;
    kvr_routerd *rd = j->rd;
    double secs = (double)(kvr_mono_ns() - j->t0_ns) / 1e9;
    rd->snap_running = false;
    if (j->rc == 0) {
        rd->snap_last_written_seq = j->img.stream_seq;
        rd->snap_last_digest = j->img.digest;
        kvr_metric_inc(rd->m_snaps);
        kvr_metric_observe(rd->m_snap_duration, 0, secs);
        kvr_metric_set(rd->m_snap_bytes, 0, (double)j->info.file_bytes);
        KVR_LOG_INFO("snapshot written", "stream_seq=%" PRIu64 " entries=%" PRIu64
                     " bytes=%" PRIu64 " seconds=%.3f export_seconds=%.4f final=%d",
                     j->img.stream_seq, j->img.entries, j->info.file_bytes, secs, j->export_s,
                     j->final);
    } else {
        kvr_metric_inc(rd->m_snap_failures);
        KVR_LOG_ERROR("snapshot failed", "error=\"%s\"", j->err.msg);
    }
    bool was_final = j->final;
    kvr_index_image_free(&j->img);
    free(j);
    if (rd->stopping) {
        /* a periodic snapshot was running when SIGTERM came: now write the final one */
        if (!was_final)
            rd_start_snapshot(rd, true);
        rd_maybe_finish_stop(rd);
    }
}

int rd_start_snapshot(kvr_routerd *rd, bool final)
{
    if (rd->snap_running)
        return KVR_EAGAIN;
    if (!rd->stream_started && !rd->snap_loaded)
        return 0; /* nothing consumed yet: keep whatever is on disk */
    uint64_t seq = kvr_index_stream_seq(rd->idx);
    uint64_t dg = kvr_index_digest(rd->idx);
    if (seq == rd->snap_last_written_seq && dg == rd->snap_last_digest) {
        /* Nothing changed since the last snapshot: the file on disk already is the final one. */
        if (final)
            KVR_LOG_INFO("snapshot current", "stream_seq=%" PRIu64 " final=1", seq);
        return 0;
    }
    snap_job *j = calloc(1, sizeof(*j));
    if (!j)
        return KVR_ENOMEM;
    j->rd = rd;
    j->dir = rd->snap_dir;
    j->final = final;
    j->t0_ns = kvr_mono_ns();
    kvr_err err = {0};
    int rc = kvr_index_export(rd->idx, &j->img, &err);
    j->export_s = (double)(kvr_mono_ns() - j->t0_ns) / 1e9;
    kvr_metric_set(rd->m_snap_export, 0, j->export_s);
    if (rc != 0) {
        KVR_LOG_ERROR("snapshot export failed", "error=\"%s\"", err.msg);
        free(j);
        return rc;
    }
    j->req.data = j;
    rd->snap_running = true;
    if (uv_queue_work(rd->loop, &j->req, snap_work, snap_after) != 0) {
        rd->snap_running = false;
        kvr_index_image_free(&j->img);
        free(j);
        return KVR_EIO;
    }
    return 0;
}

void rd_on_snap_timer(uv_timer_t *t)
{
    kvr_routerd *rd = t->data;
    rd_start_snapshot(rd, false);
}

void rd_load_snapshot(kvr_routerd *rd)
{
    kvr_index_image img = {0};
    kvr_err err = {0};
    int64_t t0 = kvr_mono_ns();
    int rc = kvr_snapshot_read(rd->snap_dir, rd->cfg.block_size, &img, NULL, &err);
    if (rc == KVR_ENOTFOUND) {
        KVR_LOG_INFO("no snapshot: building the index from the stream start", "dir=%s", rd->snap_dir);
        return;
    }
    if (rc != 0) {
        KVR_LOG_WARN("snapshot unusable: rebuilding from the stream start", "error=\"%s\"", err.msg);
        return;
    }
    rc = kvr_index_import(rd->idx, &img, &err);
    if (rc != 0) {
        KVR_LOG_WARN("snapshot import failed: rebuilding from the stream start", "error=\"%s\"",
                     err.msg);
        kvr_index_image_free(&img);
        rd_recreate_index(rd);
        return;
    }
    rd->snap_loaded = true;
    rd->snap_seq = img.stream_seq;
    rd->snap_last_written_seq = img.stream_seq;
    rd->snap_last_digest = img.digest;
    KVR_LOG_INFO("snapshot loaded", "stream_seq=%" PRIu64 " entries=%" PRIu64 " seconds=%.3f",
                 img.stream_seq, img.entries, (double)(kvr_mono_ns() - t0) / 1e9);
    kvr_index_image_free(&img);
}

