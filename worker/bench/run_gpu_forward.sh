#!/usr/bin/env bash
# The forward API on one GPU (docs/benchmarks/forward-api-gpu.md): run on a device machine with
# a stripped release moe-worker carried in .carry/fwd/moe-worker (build here:
# `cargo build --release -p moe-worker && strip -o .carry/fwd/moe-worker target/release/moe-worker`).
set -u
export PYTHONUNBUFFERED=1 WORKER=${WORKER:-.carry/fwd/moe-worker}
nvidia-smi -L
chmod +x "$WORKER"
timeout 480 python3 worker/bench/gpu_forward.py 2>&1 | tee "${OUT:-/tmp}/gpu_forward.txt"
