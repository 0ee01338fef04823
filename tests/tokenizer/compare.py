#!/usr/bin/env python3
"""Compares kvr-tokenize output with the reference (both one JSON object per text per line).
Exit 0 only when every field of every text is equal and every streaming decode joined up."""
import json
import sys

corpus = json.load(open(sys.argv[1], encoding="utf-8"))
ours = [json.loads(l) for l in open(sys.argv[2], encoding="utf-8")]
ref = [json.loads(l) for l in open(sys.argv[3], encoding="utf-8")]
bad = 0
if len(ours) != len(corpus) or len(ref) != len(corpus):
    print(f"count mismatch: corpus {len(corpus)} ours {len(ours)} ref {len(ref)}")
    sys.exit(1)
fields = ["ids", "ids_special", "decoded", "decoded_skip"]
for i, (o, r) in enumerate(zip(ours, ref)):
    for f in fields:
        if o[f] != r[f]:
            bad += 1
            if bad <= 10:
                print(f"text {i} {json.dumps(corpus[i][:80], ensure_ascii=False)}: {f} differs")
                print(f"  ours {json.dumps(o[f], ensure_ascii=False)[:300]}")
                print(f"  ref  {json.dumps(r[f], ensure_ascii=False)[:300]}")
    if not o.get("stream_ok", False):
        bad += 1
        print(f"text {i}: streaming decode did not join to the full decode")
total = len(corpus) * len(fields)
print(f"{total - bad}/{total} equal ({len(corpus)} texts x {len(fields)} fields)")
sys.exit(1 if bad else 0)
