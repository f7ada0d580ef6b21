#!/usr/bin/env bash
# Runs the GPU tests and benchmarks on a device machine from binaries built on the
# development machine and carried in .carry/kernels. Usage: run_gpu.sh single|multi
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
B=.carry/kernels
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
mode=${1:-single}
nvidia-smi -L | tee "$OUT/gpus_$mode.txt"
if [ "$mode" = single ]; then
  timeout 60 $B/cpu_tests 2>&1 | tail -3
  timeout 180 $B/gpu_tests --test-threads=1 --nocapture 2>&1 | tee "$OUT/gpu_tests_single.txt"
  timeout 200 $B/kernel-bench single 2>&1 | tee "$OUT/rust_single.txt"
  timeout 240 python3 kernels/bench/torch_ref.py single 2>&1 | tee "$OUT/torch_single.txt"
else
  timeout 200 $B/gpu_tests --test-threads=1 --nocapture 2>&1 | tee "$OUT/gpu_tests_multi.txt"
  timeout 200 $B/kernel-bench multi 2>&1 | tee "$OUT/rust_multi.txt"
  timeout 150 python3 kernels/bench/torch_ref.py multi 2>&1 | tee "$OUT/torch_multi.txt"
fi
