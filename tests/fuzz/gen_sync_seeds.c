/* Writes seed inputs for fuzz_sync (mode byte + length-prefixed encoded commands, an entry, a
 * snapshot) into the directory given as argv[1]. Built and run by hand when the command format
 * changes:  cc -Ibase -Iproto -Isync tests/fuzz/gen_sync_seeds.c build/sync/libkvr_sync.a
 *           build/base/libkvr_base.a build/proto/libkvr_proto.a -lxxhash -lm && ./a.out tests/fuzz/seeds/sync */
#include "cmd.h"
#include "entry.h"
#include "fsm.h"

#include <stdio.h>
#include <string.h>

static void put(kvr_buf *b, const kvr_cmd *c)
{
    kvr_buf one;
    kvr_buf_init(&one);
    if (kvr_cmd_encode(c, &one, NULL) == 0 && one.len < 256) {
        uint8_t l = (uint8_t)one.len;
        kvr_buf_append(b, &l, 1);
        kvr_buf_append(b, one.base, one.len);
    }
    kvr_buf_free(&one);
}

static void save(const char *dir, const char *name, const kvr_buf *b)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(b->base, 1, b->len, f);
        fclose(f);
    }
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    kvr_buf b;
    kvr_buf_init(&b);
    uint8_t mode = 1;
    kvr_buf_append(&b, &mode, 1);
    for (uint64_t w = 1; w <= 3; w++) {
        kvr_cmd c = {.type = KVR_CMD_WORKER_UP};
        c.u.worker = (kvr_worker_info){.id = w, .ns = KVR_SLICE_LIT("ns"), .model = KVR_SLICE_LIT("m"),
                                       .url = KVR_SLICE_LIT("http://127.0.0.1:9000"),
                                       .block_size = 64, .capacity_blocks = 1024};
        put(&b, &c);
    }
    kvr_route_candidate cand[2] = {{1, 4}, {2, 1}};
    for (int i = 0; i < 3; i++) {
        kvr_cmd c = {.type = KVR_CMD_ROUTE};
        memset(c.u.route.request_id, 'a' + i, KVR_REQUEST_ID_LEN);
        c.u.route.frontend_id = 7;
        c.u.route.now_ms = 1000 + (uint64_t)i;
        c.u.route.request_blocks = 8;
        c.u.route.model = KVR_SLICE_LIT("m");
        c.u.route.ns = KVR_SLICE_LIT("ns");
        c.u.route.candidates = cand;
        c.u.route.n_candidates = 2;
        put(&b, &c);
    }
    kvr_cmd pd = {.type = KVR_CMD_PREFILL_DONE};
    memset(pd.u.request_id, 'a', KVR_REQUEST_ID_LEN);
    put(&b, &pd);
    kvr_cmd fr = {.type = KVR_CMD_FREE};
    memset(fr.u.request_id, 'b', KVR_REQUEST_ID_LEN);
    put(&b, &fr);
    kvr_cmd fs = {.type = KVR_CMD_FRONTEND_SEEN, .u.frontend = {7, 1500}};
    put(&b, &fs);
    kvr_cmd ex = {.type = KVR_CMD_EXPIRE, .u.before_ms = 1001};
    put(&b, &ex);
    kvr_cmd wd = {.type = KVR_CMD_WORKER_DOWN, .u.worker_id = 2};
    put(&b, &wd);
    kvr_cmd ps = {.type = KVR_CMD_POOL_SET};
    ps.u.pool = (kvr_pool_cmd){kvr_slice_of("ns"), kvr_slice_of("m"), KVR_POOL_SLEEPING, 1600};
    put(&b, &ps);
    /* the replicated route policy, then a ROUTE it decides (no weights of its own) */
    kvr_cmd pol = {.type = KVR_CMD_ROUTE_POLICY};
    pol.u.policy.set_by = 2;
    pol.u.policy.cost = kvr_cost_params_default();
    pol.u.policy.cost.load_weight = 0.25;
    pol.u.policy.cost.tie_band = 0.01;
    put(&b, &pol);
    kvr_cmd rp = {.type = KVR_CMD_ROUTE};
    memset(rp.u.route.request_id, 'd', KVR_REQUEST_ID_LEN);
    rp.u.route.frontend_id = 7;
    rp.u.route.now_ms = 1700;
    rp.u.route.request_blocks = 8;
    rp.u.route.model = KVR_SLICE_LIT("m");
    rp.u.route.ns = KVR_SLICE_LIT("ns");
    rp.u.route.candidates = cand;
    rp.u.route.n_candidates = 2;
    put(&b, &rp);
    save(argv[1], "commands", &b);

    /* the same commands as one entry, and the resulting state as a snapshot */
    kvr_fsm_options o = {0};
    o.max_bookings = 64;
    kvr_fsm *f = kvr_fsm_new(&o);
    kvr_buf e;
    kvr_buf_init(&e);
    mode = 0;
    kvr_buf_append(&e, &mode, 1);
    size_t start = e.len;
    kvr_entry_begin(&e, 1, 42, 1);
    for (size_t off = 1; off < b.len;) {
        size_t len = (uint8_t)b.base[off++];
        kvr_entry_add(&e, start, b.base + off, len);
        kvr_fsm_result res;
        kvr_fsm_apply_bytes(f, b.base + off, len, &res);
        off += len;
    }
    save(argv[1], "entry", &e);
    kvr_buf s;
    kvr_buf_init(&s);
    mode = 2;
    kvr_buf_append(&s, &mode, 1);
    kvr_buf snap;
    kvr_buf_init(&snap);
    kvr_fsm_snapshot(f, &snap, NULL);
    kvr_buf_append(&s, snap.base, snap.len);
    save(argv[1], "snapshot", &s);
    printf("seeds: commands %zu bytes, entry %zu, snapshot %zu\n", b.len, e.len, s.len);
    kvr_fsm_free(f);
    kvr_buf_free(&b);
    kvr_buf_free(&e);
    kvr_buf_free(&s);
    kvr_buf_free(&snap);
    return 0;
}
