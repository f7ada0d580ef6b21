#!/bin/bash
export CARGO_TARGET_DIR=$HOME/.cache/moe-operator/target
run() {
  v=$1; s=$2
  cd /tmp/hist-$v || exit 1
  ./scripts/images build > /tmp/hist-$v-images360.log 2>&1 || { echo "images failed"; exit 1; }
  cargo build -q --locked --bins -p moe-worker -p moe-operator -p moectl > /tmp/hist-$v-build360.log 2>&1 || { echo "build failed"; exit 1; }
  echo "=== $v $(git log --oneline -1 | cut -c1-7) seed $s measuring $(date -u +%T) load $(cat /proc/loadavg)"
  MOE_E2E_HISTORY_SECS=360 MOE_E2E_HISTORY_SEED=$s MOE_E2E_NODE=real cargo test -q --locked -p moe-e2e --test product -- --ignored --nocapture history_ > /tmp/hist-$v-seed$s-360.log 2>&1
  echo "=== $v rc $? end $(date -u +%T) load $(cat /proc/loadavg)"
  grep "^|" /tmp/hist-$v-seed$s-360.log
}
run new 11; run new 5; run old 11; run old 5
