#!/usr/bin/python3
"""Writes the KV-event golden payloads, independently of the C encoder.

Run with Debian's /usr/bin/python3 (needs python3-msgpack and python3-xxhash):
    /usr/bin/python3 tests/common/gen_kv_golden.py

For each case NAME it writes
    tests/common/golden/NAME.msgpack   the payload, packed by python3-msgpack
    tests/common/golden/NAME.expect    what the C decoder must return
and copies every payload to tests/fuzz/seeds/kv_event/NAME (the fuzzer's seed corpus),
plus a few raw msgpack values to tests/fuzz/seeds/mp/. Files named regress_* in the seed
folders are fuzzer findings added by hand; regeneration keeps them.

.expect format (whitespace separated):
    ok
    ts HEXFLOAT
    dp_rank none | dp_rank N
    events N
    then per event:  event stored|removed|cleared
                     hashes N H...          (u64 the decoder reports)
                     parent none|H          (stored)
                     block_size B           (stored)
                     lora none|N            (stored)
                     tokens N T...          (stored)
    or
    reject REASON
    errcontains TEXT...      (optional: substring of the error message, rest of the line)
"""
import hashlib
import os
import shutil
import struct

import msgpack
import xxhash

HERE = os.path.dirname(os.path.abspath(__file__))
GOLD = os.path.join(HERE, "golden")
SEEDS = os.path.join(HERE, "..", "fuzz", "seeds", "kv_event")
MP_SEEDS = os.path.join(HERE, "..", "fuzz", "seeds", "mp")
M64 = (1 << 64) - 1


def hid(h):
    """The u64 the decoder must report for a hash value as sent."""
    if isinstance(h, int):
        return h & M64
    if isinstance(h, str):
        h = h.encode()
    return xxhash.xxh3_64_intdigest(h, seed=0)


def sha(i):
    return hashlib.sha256(b"block-%d" % i).digest()


class Ev:
    def __init__(self, kind, hashes=(), parent=None, tokens=(), block_size=0, lora=None):
        self.kind, self.hashes, self.parent = kind, list(hashes), parent
        self.tokens, self.block_size, self.lora = list(tokens), block_size, lora

    def expect(self):
        out = ["event %s" % self.kind]
        if self.kind in ("stored", "removed"):
            out.append("hashes %d %s" % (len(self.hashes), " ".join(str(hid(h)) for h in self.hashes)))
        if self.kind == "stored":
            out.append("parent %s" % ("none" if self.parent is None else hid(self.parent)))
            out.append("block_size %d" % self.block_size)
            out.append("lora %s" % ("none" if self.lora is None else self.lora))
            out.append("tokens %d %s" % (len(self.tokens), " ".join(map(str, self.tokens))))
        return out


def expect_ok(ts, events, dp=None):
    lines = ["ok", "ts %s" % float(ts).hex(), "dp_rank %s" % ("none" if dp is None else dp),
             "events %d" % len(events)]
    for e in events:
        lines += e.expect()
    return "\n".join(lines) + "\n"


cases = {}  # name -> (payload bytes, expect text)


def ok(name, obj, ts, events, dp=None, **pack_kw):
    cases[name] = (msgpack.packb(obj, use_bin_type=True, **pack_kw), expect_ok(ts, events, dp))


def bad(name, payload, reason, contains=None):
    if not isinstance(payload, (bytes, bytearray)):
        payload = msgpack.packb(payload, use_bin_type=True)
    text = "reject %s\n" % reason
    if contains:
        text += "errcontains %s\n" % contains
    cases[name] = (bytes(payload), text)


DEEP = "@@deep-nesting-placeholder@@"


def with_deep(obj, depth):
    """Packs obj, then swaps the DEEP placeholder for depth nested 1-element arrays (raw bytes:
    msgpack's packer itself refuses to nest that deep)."""
    raw = msgpack.packb(obj, use_bin_type=True)
    ph = msgpack.packb(DEEP)
    assert raw.count(ph) == 1
    return raw.replace(ph, b"\x91" * depth + b"\x00")


def nested(depth, inner=0):
    v = inner
    for _ in range(depth):
        v = [v]
    return v


# ---------------------------------------------------------------- valid, array form
toks8 = list(range(100, 108))
e_st = Ev("stored", [11, 22], None, toks8, 4)
e_rm = Ev("removed", [11])
e_cl = Ev("cleared")
ok("arr_int_basic",
   [1700000000.25, [["BlockStored", [11, 22], None, toks8, 4, None], ["BlockRemoved", [11]],
                    ["AllBlocksCleared"]]],
   1700000000.25, [e_st, e_rm, e_cl])

big = (1 << 64) - 5
e1 = Ev("stored", [big, 1 << 63], 777, [0, 0xFFFFFFFF, 5, 6], 2, 7)
ok("arr_int_dp_parent_lora",
   [12.5, [["BlockStored", [big, 1 << 63], 777, [0, 0xFFFFFFFF, 5, 6], 2, 7]], 3],
   12.5, [e1], dp=3)

neg = [-1, -(1 << 63), -12345]
e2 = Ev("stored", neg, -42, list(range(3)), 1)
e3 = Ev("removed", [-7, 8])
ok("arr_negint",
   [0.5, [["BlockStored", neg, -42, [0, 1, 2], 1, None], ["BlockRemoved", [-7, 8]]]],
   0.5, [e2, e3])

e4 = Ev("stored", [5], 4, [9, 9], 2, 1)
e5 = Ev("removed", [5])
ok("arr_trailing_fields",
   [99.0, [["BlockStored", [5], 4, [9, 9], 2, 1, "GPU", None, {"x": [1, 2, {"y": b"z"}]}, 3.5],
           ["BlockRemoved", [5], "CPU", [[], {}], None],
           ["AllBlocksCleared", "extra", 1]],
    0, "future", {"k": [1, 2]}],
   99.0, [e4, e5, Ev("cleared")], dp=0)

ok("arr_ts_int_no_lora_field",
   [1700000001, [["BlockStored", [1, 2, 3], None, [7, 8, 9], 1]]],
   1700000001, [Ev("stored", [1, 2, 3], None, [7, 8, 9], 1)])

ok("arr_ts_float32",
   [1.5, [["BlockRemoved", [1, 2]]]], 1.5, [Ev("removed", [1, 2])], use_single_float=True)

ok("arr_empty_events", [3.25, []], 3.25, [])

ok("arr_dp_nil", [3.0, [["AllBlocksCleared"]], None], 3.0, [Ev("cleared")])

toks64 = [(i * 2654435761) & 0xFFFFFFFF for i in range(128)]
ok("arr_bs64_bin32",
   [7.0, [["BlockStored", [sha(1), sha(2)], sha(0), toks64, 64, None, "GPU"]]],
   7.0, [Ev("stored", [sha(1), sha(2)], sha(0), toks64, 64)])

# 20 events x 4 blocks of 16, mixed hash kinds, for the corpus and multi-event decoding
evs, objs = [], []
for i in range(20):
    hs = [(i * 1000 + j) if j % 3 else sha(i * 10 + j) for j in range(4)]
    if i % 4 == 0:
        hs[1] = -(i + 1)
    tk = [(i * 7 + j) % 50000 for j in range(64)]
    par = None if i == 0 else hs[0]
    evs.append(Ev("stored", hs, par, tk, 16))
    objs.append(["BlockStored", hs, par, tk, 16, None])
    if i % 5 == 4:
        evs.append(Ev("removed", hs[:2]))
        objs.append(["BlockRemoved", hs[:2]])
ok("arr_many_events", [1234.5, objs, 1], 1234.5, evs, dp=1)

# ---------------------------------------------------------------- valid, map form
hb = [sha(10), sha(11), sha(12)]
tk12 = list(range(1, 13))
ok("map_bin32_dp",
   {"ts": 1700000002.75,
    "events": [{"type": "BlockStored", "block_hashes": hb, "parent_block_hash": sha(9),
                "token_ids": tk12, "block_size": 4, "medium": "GPU", "lora_name": None,
                "extra_keys": [["img", 3]], "group_idx": 0, "kv_cache_spec_kind": "full"},
               {"type": "BlockRemoved", "block_hashes": [sha(10)], "medium": "GPU"},
               {"type": "AllBlocksCleared"}],
    "data_parallel_rank": 5},
   1700000002.75,
   [Ev("stored", hb, sha(9), tk12, 4), Ev("removed", [sha(10)]), Ev("cleared")], dp=5)

shs = ["a1b2c3", "deadbeef" * 8, ""]
ok("map_str_hashes_keys_reordered",
   {"events": [{"token_ids": [4, 5, 6], "block_size": 1, "lora_id": 12,
                "parent_block_hash": "parent-str", "block_hashes": shs, "type": "BlockStored"},
               {"block_hashes": ["x"], "type": "BlockRemoved"}],
    "ts": 10.125},
   10.125, [Ev("stored", shs, "parent-str", [4, 5, 6], 1, 12), Ev("removed", ["x"])])

mixed = [1, -2, sha(3), "four", (1 << 64) - 1]
ok("map_mixed_hashes_ts_int_dp_nil",
   {"ts": 42, "data_parallel_rank": None, "unknown_top": {"a": [1, [2, [3]]]},
    "events": [{"type": "BlockStored", "block_hashes": mixed, "parent_block_hash": None,
                "token_ids": list(range(10)), "block_size": 2, "lora_id": None}]},
   42, [Ev("stored", mixed, None, list(range(10)), 2)])

ok("map_negative_dp_and_lora",
   {"ts": -1.0, "events": [{"type": "BlockStored", "block_hashes": [3], "parent_block_hash": 2,
                            "token_ids": [1], "block_size": 1, "lora_id": -9}],
    "data_parallel_rank": -1},
   -1.0, [Ev("stored", [3], 2, [1], 1, -9)], dp=-1)

ok("map_removed_with_stray_stored_fields",
   {"ts": 1.0, "events": [{"type": "BlockRemoved", "block_hashes": [1, 2], "token_ids": [1, 2, 3],
                           "block_size": 3, "lora_id": 4}]},
   1.0, [Ev("removed", [1, 2])])

ok("map_nested_unknown_ok",
   {"ts": 2.0, "zzz": nested(30), "events": [{"type": "AllBlocksCleared", "q": nested(20)}]},
   2.0, [Ev("cleared")])

# ---------------------------------------------------------------- malformed
bad("bad_tokens_mismatch", [1.0, [["BlockStored", [1, 2], None, [1, 2, 3], 2, None]]],
    "invalid", "event 0: BlockStored: 3 token_ids")
bad("bad_tokens_mismatch_map",
    {"ts": 1.0, "events": [{"type": "AllBlocksCleared"},
                           {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
                            "token_ids": [1], "block_size": 2}]},
    "invalid", "event 1:")
bad("bad_block_size_zero", [1.0, [["BlockStored", [], None, [], 0, None]]], "invalid",
    "block_size")
bad("bad_block_size_huge", [1.0, [["BlockStored", [1], None, [], 5000, None]]], "limit",
    "block_size")
bad("bad_unknown_tag", [1.0, [["BlockFrobbed", [1]]]], "unknown", "BlockFrobbed")
bad("bad_unknown_type_map", {"ts": 1.0, "events": [{"type": "Nope"}]}, "unknown", "Nope")
bad("bad_missing_type", {"ts": 1.0, "events": [{"block_hashes": [1]}]}, "invalid", "type")
bad("bad_missing_tokens_map",
    {"ts": 1.0, "events": [{"type": "BlockStored", "block_hashes": [1], "block_size": 1}]},
    "invalid", "token_ids")
bad("bad_hash_float", [1.0, [["BlockRemoved", [1, 2.5]]]], "type", "block_hashes[1]")
bad("bad_hash_nil", [1.0, [["BlockRemoved", [None]]]], "type", "block_hashes[0]")
bad("bad_hash_too_long", [1.0, [["BlockRemoved", [b"x" * 300]]]], "limit", "block_hashes[0]")
bad("bad_parent_list", [1.0, [["BlockStored", [1], [2], [1], 1, None]]], "type",
    "parent_block_hash")
bad("bad_token_negative", [1.0, [["BlockStored", [1], None, [-1], 1, None]]], "type",
    "token_ids[0]")
bad("bad_token_u33", [1.0, [["BlockStored", [1], None, [1 << 32], 1, None]]], "invalid",
    "token_ids[0]")
bad("bad_token_str", [1.0, [["BlockStored", [1], None, ["a"], 1, None]]], "type",
    "token_ids[0]")
bad("bad_block_size_str", [1.0, [["BlockStored", [1], None, [1], "1", None]]], "type",
    "block_size")
bad("bad_lora_str", [1.0, [["BlockStored", [1], None, [1], 1, "lora"]]], "type", "lora_id")
bad("bad_ts_str", ["now", []], "type", "ts")
bad("bad_ts_missing_map", {"events": []}, "invalid", "ts")
bad("bad_events_missing_map", {"ts": 1.0}, "invalid", "events")
bad("bad_events_not_array", [1.0, {"a": 1}], "type", "events")
bad("bad_event_int", [1.0, [5]], "type", "event")
bad("bad_event_empty_array", [1.0, [[]]], "invalid", "empty")
bad("bad_stored_too_few_fields", [1.0, [["BlockStored", [1], None, [1]]]], "invalid",
    "BlockStored")
bad("bad_removed_no_hashes", [1.0, [["BlockRemoved"]]], "invalid", "BlockRemoved")
bad("bad_tag_int", [1.0, [[1, [1]]]], "type", "type tag")
bad("bad_batch_int", 5, "type", "batch")
bad("bad_batch_one_elem", [1.0], "invalid", "batch")
bad("bad_dp_str", [1.0, [], "x"], "type", "data_parallel_rank")
bad("bad_dp_u64", [1.0, [], 1 << 63], "type", "data_parallel_rank")
# Python dicts cannot hold a key twice: these two are written byte by byte.
bad("bad_duplicate_key",
    b"\x83\xa2ts\xcb" + struct.pack(">d", 1.0) + b"\xa6events\x90\xa2ts\x01", "invalid", "duplicate")
bad("bad_duplicate_event_key",
    b"\x82\xa2ts\x01\xa6events\x91\x82\xa4type\xb0AllBlocksCleared\xa4type\xb0AllBlocksCleared",
    "invalid", "duplicate")
bad("bad_trailing_garbage", msgpack.packb([1.0, []]) + b"\x00", "trailing", "1 bytes after")
bad("bad_trailing_second_batch", msgpack.packb([1.0, []]) * 2, "trailing")
bad("bad_array32_huge", b"\xdd\x05\xf5\xe1\x00", "truncated", "array of 100000000 elements")
bad("bad_events_array32_huge", b"\x92\x01\xdd\x05\xf5\xe1\x00", "truncated", "events: truncated")
bad("bad_hashes_array32_huge", b"\x92\x01\x91\x92\xacBlockRemoved\xdd\xff\xff\xff\xff\x01",
    "truncated", "event 0: block_hashes: truncated (array of 4294967295 elements, 1 bytes left)")
bad("bad_str32_huge_hash", b"\x92\x01\x91\x92\xacBlockRemoved\x91\xdb\xff\xff\xff\xff\x01",
    "truncated", "block_hashes[0]")
bad("bad_deep_nesting_array_trailing",
    with_deep([1.0, [["BlockRemoved", [1], DEEP]]], 1000), "limit", "event 0: trailing field: nested deeper than 32")
bad("bad_deep_nesting_map_unknown",
    with_deep({"ts": 1.0, "events": [{"type": "AllBlocksCleared", "deep": DEEP}]}, 1000),
    "limit", "event 0:")
bad("bad_deep_nesting_top_unknown", with_deep({"ts": 1.0, "x": DEEP, "events": []}, 1000),
    "limit", "batch")
bad("bad_deep_nesting_33", with_deep([1.0, [], None, DEEP], 33), "limit", "batch")
# a cut deep inside a skipped field: truncation, not nesting
bad("bad_truncated_inside_unknown", msgpack.packb({"ts": 1.0, "x": [1, [2, [3]]], "events": []})[:20],
    "truncated", "batch: unknown key's value: truncated (a count inside")
bad("bad_count_inside_unknown",
    b"\x83\xa2ts\x01\xa1x\x92\x01\xdd\x00\x01\x00\x00\xa6events\x90",
    "truncated", "batch: unknown key's value: truncated (a count inside")
# kvr_mp_skip allows KVR_MP_MAX_DEPTH (32) levels inside one skipped field
cases["arr_nesting_32_in_trailing_ok"] = (with_deep([1.0, [], None, DEEP], 32),
                                          expect_ok(1.0, []))
bad("bad_too_many_hashes", [1.0, [["BlockRemoved", [0] * 65537]]], "limit",
    "block_hashes")
bad("bad_invalid_byte_c1", b"\x92\x01\x91\xc1", "type", "event")
bad("bad_empty_payload", b"", "truncated")
bad("bad_truncated_str", b"\x92\x01\x91\x91\xabBlockStor", "truncated", "type tag")
bad("bad_ext_event", b"\x92\x01\x91\xd4\x01\x00", "type", "event")


def main():
    os.makedirs(GOLD, exist_ok=True)
    os.makedirs(SEEDS, exist_ok=True)
    os.makedirs(MP_SEEDS, exist_ok=True)
    # Regenerate our own files; keep fuzzer findings (regress_*) checked in by hand.
    for d in (GOLD, SEEDS):
        for f in os.listdir(d):
            if not f.startswith("regress_"):
                os.remove(os.path.join(d, f))
    for name, (payload, expect) in sorted(cases.items()):
        with open(os.path.join(GOLD, name + ".msgpack"), "wb") as f:
            f.write(payload)
        with open(os.path.join(GOLD, name + ".expect"), "w") as f:
            f.write(expect)
        if len(payload) <= 65536:
            shutil.copyfile(os.path.join(GOLD, name + ".msgpack"), os.path.join(SEEDS, name))
    mp_values = {
        "scalars": [None, True, False, 0, 127, 128, -1, -33, 1 << 40, -(1 << 40), 1.5, "s", b"b"],
        "nested": {"a": [1, {"b": [2, [3, {"c": None}]]}], "d": "x" * 40},
        "ints": [0, 255, 65535, 1 << 32, (1 << 64) - 1, -(1 << 63)],
        "strs": ["", "a" * 31, "b" * 32, "c" * 300, b"\x00" * 70000],
        "deep": nested(40),
    }
    for name, v in mp_values.items():
        with open(os.path.join(MP_SEEDS, name), "wb") as f:
            f.write(msgpack.packb(v, use_bin_type=True))
    with open(os.path.join(MP_SEEDS, "ext"), "wb") as f:
        f.write(msgpack.packb([msgpack.ExtType(1, b"a"), msgpack.ExtType(2, b"x" * 16),
                               msgpack.ExtType(3, b"y" * 300)]))
    print("wrote %d golden cases" % len(cases))


if __name__ == "__main__":
    main()
