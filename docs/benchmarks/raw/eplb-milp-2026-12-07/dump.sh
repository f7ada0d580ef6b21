#!/bin/sh
# Dumps the four-window sweep instances (the full sweep's RNG draws) with joint's result per layer.
set -e
cd "$(dirname "$0")"
B=${EXACT_SWEEP:-/work/tgt-main/release/examples/exact_sweep}
mkdir -p dump
for spec in "zipf 8 16 4" "zipf 8 16 8" "pareto 8 16 4" "zipf 12 24 3" "zipf 12 24 12" "zipf 16 32 8" "pareto 16 32 8" "pareto 16 32 4" "zipf 16 32 4" "zipf 16 32 16" "zipf 12 24 6" "zipf 12 24 8" "pareto 12 24 6"; do
  set -- $spec
  SWEEP_RANKS=$4 SWEEP_VERBOSE=1 $B $1 $2 $3 5 4 > dump/$1_$2_$3_r$4.out 2> dump/$1_$2_$3_r$4.err
done
python3 parse_dump.py dump > instances.json
