# How before-6228105-reach and after-reach-relist were made (binaries copied to /tmp/reach-bin:
# before-6228105 built from main 6228105, after1 from branch reach; outputs then copied here,
# beyond-*.log keeping only the per-layer "ranks:" lines of SWEEP_VERBOSE).
set -u
cd /work/wt-reach
for n in before-6228105-reach after-reach; do mkdir -p /tmp/reach-out/$n; done
B=/tmp/reach-bin/before-6228105 OUTDIR=/tmp/reach-out/before-6228105-reach bash docs/benchmarks/raw/eplb-exact-2026-12-06/run.sh
B=/tmp/reach-bin/after1 OUTDIR=/tmp/reach-out/after-reach bash docs/benchmarks/raw/eplb-exact-2026-12-06/run.sh
for which in before after; do
  bin=/tmp/reach-bin/after1; [ $which = before ] && bin=/tmp/reach-bin/before-6228105
  for cn in "zipf 10" "one-hot 6" "uniform 6"; do
    set -- $cn
    SWEEP_RANKS=4 SWEEP_VERBOSE=1 $bin $1 16 32 $2 4 > /tmp/reach-out/beyond-$which-$1.md 2> /tmp/reach-out/beyond-$which-$1.log
  done
done
date -u > /tmp/reach-out/done
