#!/bin/bash
# usage: sweep4.sh BIN OUTDIR ; the four-window sweep of run.sh, with per-layer lines
BIN=$1; OUT=$2; mkdir -p $OUT
date -u +%FT%TZ > $OUT/start.txt; uptime > $OUT/load_start.txt
for c in zipf pareto; do
  for es in "8 16" "12 24" "16 32"; do
    SWEEP_VERBOSE=1 $BIN $c $es 5 4 > $OUT/t.md 2> $OUT/t.err
    tail -n +3 $OUT/t.md >> $OUT/four_$c.md
    grep "ranks:" $OUT/t.err | sed "s/^/$c $es /" >> $OUT/layers_$c.txt
  done
done
rm -f $OUT/t.md $OUT/t.err
uptime > $OUT/load_end.txt; date -u +%FT%TZ > $OUT/end.txt
