#!/bin/bash
# usage: four.sh BIN label  (env passed through); prints per-layer objective/bound/ms for the 3 rows with the 4 target layers
BIN=$1; shift
for spec in "zipf 8" "pareto 8" "pareto 4"; do set -- $spec
  SWEEP_RANKS=$2 SWEEP_VERBOSE=1 $BIN $1 16 32 5 4 2>&1 | grep -E "ranks:" | awk -v c="$1/$2" '{printf "%s %s/%s/%s ", c, $4, $6, $11}'; echo
done
