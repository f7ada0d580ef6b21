#!/usr/bin/env bash
# Runs the worker's CUDA test and benchmarks on a device machine from binaries built on the
# development machine and carried in .carry/w (see docs/benchmarks/worker.md):
#   cargo test --release -p moe-worker --test cuda --no-run   -> .carry/w/cuda-test
#   cargo build --release -p moe-worker --bins   -> .carry/w/moe-worker-bench, .carry/w/moe-worker
# Usage: worker/bench/run_gpu.sh [ranks...]   (default: 2 4; 2 ranks use GPUs 0 and 1)
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
B=.carry/w
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m; nproc; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
MOE_WORKER_BIN=$PWD/$B/moe-worker timeout 240 $B/cuda-test --nocapture 2>&1 | tee "$OUT/cuda_test.txt" | tail -5
# DeepSeek-V3-like layer (H7168, I2048: 84 MiB per expert; 64 routed experts + 8 redundant,
# top-8 of 8 groups, 4 groups kept, sigmoid scoring), 2048 tokens per rank per step.
SHAPE="--layers 4 --experts 64 --redundant 8 --hidden 7168 --intermediate 2048 --top-k 8
  --groups 8 --topk-groups 4 --scoring sigmoid --tokens 2048 --skew 1.2 --steps 150
  --warmup 10 --async-rounds ${ASYNC_ROUNDS:-9}"
for n in "${@:-2 4}"; do
  for r in $n; do
    devs=$(seq -s, 0 $((r - 1)))
    CUDA_VISIBLE_DEVICES=$devs RUST_LOG=info timeout 280 $B/moe-worker-bench --ranks "$r" \
      --backend cuda $SHAPE 2>"$OUT/bench_${r}_log.txt" | tee "$OUT/bench_${r}.txt"
    echo "exit ${PIPESTATUS[0]} (ranks $r)"; tail -3 "$OUT/bench_${r}_log.txt"
  done
done
