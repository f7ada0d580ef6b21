#!/bin/bash
# wide4w (issue 15): main's binary and the new one in one sitting. BEFORE/AFTER: exact_sweep
# binaries, OUT: a folder; writes OUT/before-*/, OUT/after-*/ (run.sh's tables) and
# OUT/beyond-{before,after}-CLASS.md plus .log (the 22 16-expert 4 x 8 layers beyond the sweep,
# per layer with SWEEP_VERBOSE=1).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
: "${BEFORE:?}" "${AFTER:?}" "${OUT:?}" "${BNAME:?}" "${ANAME:?}"
(lscpu | grep -E "Model name|^CPU\(s\)"; nproc; uptime) > "$OUT/machine.txt"
mkdir -p "$OUT/$BNAME" "$OUT/$ANAME"
B=$BEFORE OUTDIR=$OUT/$BNAME bash "$here/run.sh"
B=$AFTER OUTDIR=$OUT/$ANAME bash "$here/run.sh"
for which in before after; do
  bin=$BEFORE; [ $which = after ] && bin=$AFTER
  for cn in "zipf 10" "one-hot 6" "uniform 6"; do
    set -- $cn
    SWEEP_RANKS=4 SWEEP_VERBOSE=1 $bin $1 16 32 $2 4 > "$OUT/beyond-$which-$1.md" 2> "$OUT/beyond-$which-$1.log"
  done
done
uptime >> "$OUT/machine.txt"; date -u +%FT%TZ >> "$OUT/machine.txt"
