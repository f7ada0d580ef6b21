#!/bin/bash
# The sweep behind docs/benchmarks/eplb-exact.md. B: an exact_sweep binary
# (`cargo build --release -p eplb --example exact_sweep`, target/release/examples/exact_sweep),
# OUTDIR: an existing folder for the tables. Run once per planner version (before-*/after-* here).
set -eu
B=${B:?path to the exact_sweep binary}
cd "${OUTDIR:?output folder}"
date -u +%FT%TZ > start.txt
uptime > load_start.txt
$B flashlb 8 16 1 > flashlb.md
for c in zipf uniform one-hot pareto; do
  for es in "8 16" "12 12" "12 24" "16 16" "16 24" "16 32"; do
    $B $c $es 10 | tail -n +3 >> one_$c.md
  done
done
for c in zipf pareto; do
  for es in "8 16" "12 24" "16 32"; do
    $B $c $es 5 4 | tail -n +3 >> four_$c.md
  done
done
uptime > load_end.txt
date -u +%FT%TZ > end.txt
