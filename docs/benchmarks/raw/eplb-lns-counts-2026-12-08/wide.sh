#!/bin/bash
# usage: wide.sh BIN ; per-layer objective of 20 zipf + 20 pareto 16/32 8x4 and 10+10 on 4x8
BIN=$1
for spec in "zipf 8 20" "pareto 8 20" "zipf 4 10" "pareto 4 10"; do set -- $spec
  SWEEP_RANKS=$2 SWEEP_VERBOSE=1 $BIN $1 16 32 $3 4 2>&1 | grep -E "ranks:" | awk -v c="$1/$2" '{printf "%s %s %s %s\n", c, $4, $6, $11}'
done
