#!/bin/bash
# Same-run comparison of `circularity-check` before and after a change: the whole command on a
# folder, from a checkout of the earlier commit (BEFORE) and this tree, calls alternating
# (ABAB, BABA); results.csv compared byte for byte.
#   benchmarks/circularity_before_after.sh BEFORE_CHECKOUT FOLDER [ROUNDS]
# e.g. git worktree add /tmp/before 32b198d; python benchmarks/bench_circularity.py's folder, or any.
# Python's bytecode cache is on (as a user's Python has it), whatever PYTHONDONTWRITEBYTECODE says.
set -euo pipefail
BEFORE=$(cd "$1" && pwd); FOLDER=$2; ROUNDS=${3:-8}
AFTER=$(cd "$(dirname "$0")/.." && pwd); PY=${PYTHON:-$AFTER/.venv/bin/python}
OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT
one() {  # one call from checkout $1, output into $OUT/$2: prints "wall measuring"
  local s e; s=$(date +%s.%N)
  (cd "$1" && env -u PYTHONDONTWRITEBYTECODE "$PY" -m pipeline.cli.circularity_check "$FOLDER" --out "$OUT/$2" \
     --workers 2 --overwrite >/dev/null 2>&1)
  e=$(date +%s.%N)
  "$PY" -c "import json, sys; print(round($e - $s, 3), round(json.load(open(sys.argv[1]))['seconds'], 3))" "$OUT/$2/summary.json"
}
echo "circularity-check $FOLDER --workers 2, a fresh interpreter per call, bytecode cache on;"
echo "before = $(git -C "$BEFORE" rev-parse --short HEAD), after = $(git -C "$AFTER" rev-parse --short HEAD); calls alternate (ABAB, BABA), one warm-up call each"
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores," \
     "flags: $(grep -o -w -E 'avx2|avx512f|amx_bf16|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
one "$BEFORE" before >/dev/null; one "$AFTER" after >/dev/null
echo "round  before: wall s (measuring s)  after: wall s (measuring s)"
pairs=()
for i in $(seq "$ROUNDS"); do
  if (( i % 2 )); then b=$(one "$BEFORE" before); a=$(one "$AFTER" after)
  else a=$(one "$AFTER" after); b=$(one "$BEFORE" before); fi
  read -r bw bm <<< "$b"; read -r aw am <<< "$a"
  echo "$i  $bw ($bm)  $aw ($am)"; pairs+=("$bw $aw")
done
printf '%s\n' "${pairs[@]}" | "$PY" -c "
import statistics as st, sys
rows = [tuple(map(float, line.split())) for line in sys.stdin]
b, a = [r[0] for r in rows], [r[1] for r in rows]
images = int(sys.argv[1])
print(f'median wall: before {st.median(b):.3f} s ({images / st.median(b):.0f} images/s), after {st.median(a):.3f} s ({images / st.median(a):.0f} images/s)')
print(f'after/before: ratio of medians {st.median(a) / st.median(b):.3f}; per round ' + ', '.join(f'{y / x:.2f}' for x, y in rows))
" "$(tail -n +2 "$OUT/after/results.csv" | wc -l)"
cmp -s "$OUT/before/results.csv" "$OUT/after/results.csv" && echo "results.csv byte-identical before and after" || echo "results.csv differs"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
