#!/usr/bin/python3
"""Golden vectors of the route API (proto/route_msg.h, docs/DESIGN.md section 5), encoded by
python3-msgpack: an encoder that is not ours. test_route_msg.c checks that our encoder produces
these bytes exactly and that our decoder reads them back. Run it to regenerate golden/."""
import os
import msgpack

RID = bytes(range(16))
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")

CASES = {
    "req_basic": {"request_id": RID, "frontend_id": 9, "model": "m", "namespace": "ns",
                  "tokens": 200, "seq_hashes": [1, 2**64 - 1, 77]},
    "req_role": {"request_id": RID, "frontend_id": 2**40, "model": "Qwen/Qwen3-8B",
                 "namespace": "prod", "role": "prefill", "tokens": 4294967295,
                 "seq_hashes": [2**63, 0, 65535, 65536, 2**32]},
    "req_no_hashes": {"request_id": RID, "frontend_id": 0, "model": "m", "namespace": "",
                      "tokens": 0, "seq_hashes": []},
    # a newer peer's extra field is skipped (not byte-compared: we do not write it)
    "req_unknown_key": {"request_id": RID, "x-future": [1, {"a": None}], "frontend_id": 1,
                        "model": "m", "namespace": "ns", "tokens": 64, "seq_hashes": [5]},
    "reply_ok": {"ok": True, "worker_id": 3, "url": "http://127.0.0.1:9003",
                 "overlap_blocks": 2, "router_id": 1, "mode": "raft"},
    "reply_local_view": {"worker_bookings": 4, "decided_ns": 123456789012, "ok": True,
                         "worker_id": 2**64 - 1, "url": "http://10.0.0.7:8000",
                         "overlap_blocks": 0, "router_id": 3, "mode": "local"},
    "reply_best": {"ok": True, "worker_id": 3, "url": "http://127.0.0.1:9003",
                   "overlap_blocks": 2, "best_overlap_blocks": 7, "router_id": 1, "mode": "raft"},
    "reply_disagg_remote": {"ok": True, "worker_id": 4, "url": "http://127.0.0.1:9004",
                            "overlap_blocks": 0, "router_id": 2, "mode": "raft",
                            "disagg": "remote", "prefill_worker_id": 2**40 + 1,
                            "prefill_url": "http://127.0.0.1:9001"},
    "reply_disagg_local": {"ok": True, "worker_id": 4, "url": "http://127.0.0.1:9004",
                           "overlap_blocks": 3, "router_id": 2, "mode": "raft",
                           "disagg": "local"},
    "reply_error": {"ok": False, "error": "no live worker for this model/namespace"},
    "reply_waking": {"ok": False, "pool_state": "waking", "retry_after_ms": 250,
                     "error": "pool waking"},
    "event_free": {"request_id": RID, "event": "free"},
    "event_prefill_done": {"request_id": RID, "event": "prefill_done"},
    "event_free_relayed": {"request_id": RID, "event": "free", "relayed": True},
}

os.makedirs(OUT, exist_ok=True)
for name, obj in CASES.items():
    with open(os.path.join(OUT, name + ".msgpack"), "wb") as f:
        f.write(msgpack.packb(obj, use_bin_type=True))
