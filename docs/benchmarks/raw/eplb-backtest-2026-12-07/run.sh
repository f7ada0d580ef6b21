#!/bin/bash
# The replays behind docs/eplb.md ("Replaying a recorded trace", what a first replay showed):
# two generated random-walk traces (gen.py), 16 experts on 4 ranks x 5 slots, replayed with 1,
# 2, 4 and 8 windows of history, a step every window, the latest 24 steps. MOECTL: a moectl
# binary; OUTDIR: an existing folder for the reports.
set -eu
M=${MOECTL:?path to moectl}
here=$(cd "$(dirname "$0")" && pwd)
cd "${OUTDIR:?output folder}"
date -u +%FT%TZ > start.txt
uptime > load_start.txt
for s in 11 12; do
  python3 "$here/gen.py" $s > rw$s.json
  for h in 1 2 4 8; do
    $M backtest --load rw$s.json --ranks 4 --redundant 4 --history $h --stride 1 --steps 24 \
      --markdown rw$s-h$h.md > /dev/null 2> rw$s-h$h.log
  done
done
uptime > load_end.txt
date -u +%FT%TZ > end.txt
