#!/usr/bin/env bash
# tokenizer_parity: our C tokenizer vs the Rust `tokenizers` library on the real tokenizer.json
# of qwen3, llama3_1 and gemma3, over the corpus of make_corpus.py: ids without and with
# special tokens, decode with and without skipping specials, and the streaming decoder. Also two
# small synthetic files (the fuzz seeds) for the components the three families do not use:
# Metaspace, Digits, Prepend, Strip, ByteLevel with its own regex and prefix space, fuse_unk,
# added tokens with lstrip/rstrip/single_word/normalized and ids the library re-assigns.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=$("$KVR_SRC/scripts/fetch-models" | tail -1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 "$here/make_corpus.py" >"$tmp/corpus.json"
for s in bytelevel spiece; do
  mkdir -p "$tmp/models/seed_$s"
  python3 -c 'import sys; d=open(sys.argv[1], encoding="utf-8").read(); open(sys.argv[2], "w", encoding="utf-8").write(d.split("\n\x01\n")[0])' \
    "$here/../fuzz/seeds/tokenizer/$s.json" "$tmp/models/seed_$s/tokenizer.json"
done
fail=0
for f in ${KVR_MODEL_FAMILIES:-qwen3 llama3_1 gemma3 seed_bytelevel seed_spiece}; do
  echo "== $f"
  dir="$cache/models/$f"
  [ -d "$dir" ] || dir="$tmp/models/$f"
  timeout 240 node "$here/reference.js" "$cache/node/node_modules" "$dir" \
    "$tmp/corpus.json" >"$tmp/ref_$f.jsonl"
  timeout 240 "$KVR_BIN/kvr-tokenize" "$dir" "$tmp/corpus.json" >"$tmp/ours_$f.jsonl"
  python3 "$here/compare.py" "$tmp/corpus.json" "$tmp/ours_$f.jsonl" "$tmp/ref_$f.jsonl" || fail=1
done
exit $fail
