#!/bin/bash
# Where joint's single-window over-fitting shows (docs/eplb.md, "Replaying a recorded trace"):
# random-walk traces from ../eplb-backtest-2026-12-07/gen.py (seed 11; 8 or 16 experts, step sd
# 0.05 or 0.15 a window) replayed by `moectl backtest --history 1,2` on several rank x slot
# layouts, a step every window, the latest 16 steps. MOECTL: a moectl binary; OUTDIR: an
# existing folder for the reports; then `python3 summarize.py OUTDIR > summary.md` (it reads the NAME.txt outputs).
set -eu
M=${MOECTL:?path to moectl}
here=$(cd "$(dirname "$0")" && pwd)
gen="$here/../eplb-backtest-2026-12-07/gen.py"
cd "${OUTDIR:?output folder}"
date -u +%FT%TZ > start.txt
uptime > load_start.txt
# experts ranks redundant
for layout in "16 4 4" "16 8 8" "16 4 12" "16 8 16" "8 4 4" "8 2 2" "8 8 8"; do
  set -- $layout
  for sd in 0.05 0.15; do
    name="e$1-g$2-r$3-sd$sd"
    python3 "$gen" 11 "$sd" "$1" > "$name.json"
    $M backtest --load "$name.json" --ranks "$2" --redundant "$3" --history 1,2 --steps 16 \
      --markdown "$name.md" > "$name.txt" 2> "$name.log"
  done
done
uptime > load_end.txt
date -u +%FT%TZ > end.txt
