#!/usr/bin/env bash
# run_parity.sh RENDER_BIN MODELS_DIR: every template (MODELS_DIR/<name>/tokenizer_config.json) over every
# conversation in convs/, rendered by kvr_tmpl and by jinja2 (render_ref.py), byte for byte.
set -euo pipefail
bin=$1; models=$2
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fails=0; runs=0
for m in "$models"/*/; do
  [ -f "$m/tokenizer_config.json" ] || continue
  grep -q "\"chat_template\"" "$m/tokenizer_config.json" 2>/dev/null || continue # no template (e.g. base models)
  rm -rf "$tmp/refs"; mkdir "$tmp/refs"
  python3 "$here/render_ref.py" "$m" -o "$tmp/refs" "$here"/convs/*.json 2>"$tmp/ref.err" || { echo "ref failed: $m"; cat "$tmp/ref.err"; exit 1; }
  for c in "$here"/convs/*.json; do
    runs=$((runs + 1))
    name="$(basename "$m")/$(basename "$c" .json)"
    cp "$tmp/refs/$(basename "$c")" "$tmp/ref"
    "$bin" "$m" "$c" >"$tmp/got" 2>"$tmp/got.err" || { echo "FAIL $name: render tool failed"; cat "$tmp/got.err"; fails=$((fails + 1)); continue; }
    if ! cmp -s "$tmp/ref" "$tmp/got"; then
      echo "FAIL $name"; diff <(od -c "$tmp/ref") <(od -c "$tmp/got") | head -20 || true; cat "$tmp/got.err"
      fails=$((fails + 1))
    fi
  done
done
echo "parity: $runs renders, $fails mismatches"
[ "$runs" -gt 0 ] && [ "$fails" -eq 0 ]
