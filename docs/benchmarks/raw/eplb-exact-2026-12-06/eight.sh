#!/bin/bash
# Two slots per rank with 2 and 8 windows, outside the sweep (docs/benchmarks/eplb-exact.md,
# "Four windows"): each row planned by every binary in turn, per layer (SWEEP_VERBOSE), with
# the count search's counters (EPLB_DEBUG). BINS: "label=path ..." of exact_sweep binaries
# (the ones before pair_caps need the example's SWEEP_RANKS, so build them with this tree's
# eplb/examples/exact_sweep.rs); OUTDIR: an existing folder.
set -eu
cd "${OUTDIR:?output folder}"
date -u +%FT%TZ > start.txt
uptime > load_start.txt
for row in "zipf 24 48 3 8 24" "zipf 24 48 5 8 24" "zipf 24 48 8 8 24" "zipf 16 32 5 8 16" "uniform 16 32 5 8 16" "zipf 16 32 5 2 16"; do
  set -- $row
  for lb in ${BINS:?label=binary ...}; do
    label=${lb%%=*}
    SWEEP_RANKS=$6 SWEEP_VERBOSE=1 EPLB_DEBUG=1 ${lb#*=} $1 $2 $3 $4 $5 \
      > "$label-$1-$2x$5w-n$4.md" 2> "$label-$1-$2x$5w-n$4.log"
  done
done
uptime > load_end.txt
date -u +%FT%TZ > end.txt
