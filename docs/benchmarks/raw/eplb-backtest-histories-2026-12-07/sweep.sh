#!/bin/bash
# The first replays (../eplb-backtest-2026-12-07: 16 experts on 4 x 5, random walk of sd 0.15,
# seeds 11 and 12) as one command each: `moectl backtest --history 1,2,4,8`, a step every
# window, the latest 24 steps. MOECTL: a moectl binary; OUTDIR: an existing folder.
set -eu
M=${MOECTL:?path to moectl}
here=$(cd "$(dirname "$0")" && pwd)
cd "${OUTDIR:?output folder}"
for s in 11 12; do
  python3 "$here/../eplb-backtest-2026-12-07/gen.py" $s > rw$s.json
  /usr/bin/time -f "%e s" $M backtest --load rw$s.json --ranks 4 --redundant 4 --history 1,2,4,8 \
    --steps 24 --markdown rw$s-sweep.md > rw$s-sweep.txt 2> rw$s-sweep.log
done
