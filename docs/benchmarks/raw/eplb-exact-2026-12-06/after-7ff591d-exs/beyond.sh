#!/bin/bash
# Narrow layers (three or four slots per rank) beyond the sweep that the cover search for several episodes takes, both binaries one
# after the other per row. BEFORE / AFTER: exact_sweep binaries; OUTDIR: existing folder.
set -eu
cd "${OUTDIR:?}"
date -u +%FT%TZ > beyond-start.txt; uptime >> beyond-start.txt
row() { # name ranks args...
  local name=$1 ranks=$2; shift 2
  for v in before after; do
    if [ $v = before ]; then b=$BEFORE; else b=$AFTER; fi
    SWEEP_RANKS=$ranks SWEEP_VERBOSE=1 $b "$@" > beyond-$name-$v.log 2>&1
    grep '^| [a-z]' beyond-$name-$v.log | tail -n +2 > beyond-$name-$v.md || true
  done
}
row zipf16-8x4 8 zipf 16 32 10 4
row uniform16-8x4 8 uniform 16 32 6 4
row zipf12-6x4-8x3 6,8 zipf 12 24 15 4
row pareto12-6x4-8x3 6,8 pareto 12 24 15 4
row uniform12-8x3 8 uniform 12 24 6 4

row pareto16-8x4 8 pareto 16 32 10 4
date -u +%FT%TZ > beyond-end.txt; uptime >> beyond-end.txt
