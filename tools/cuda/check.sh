#!/usr/bin/env bash
# The CUDA backend in one go, on a machine with an NVIDIA GPU (no CUDA toolkit needed: the
# driver and NVRTC are loaded at run time; put NVRTC's lib folder on LD_LIBRARY_PATH if it
# is not installed system-wide, e.g. from the nvidia-cuda-nvrtc-cu12 wheel):
#   1. builds with --features cuda,
#   2. checks every kernel against the CPU path on fresh random data,
#   3. times the decode step's products at Qwen2.5-Coder-0.5B's shapes: 3/4-bit GB/s and
#      fraction of the measured device read, the low-rank branch fused vs unfused, QDEC's
#      slowdown at the k_chunk the bandwidth model picks for this GPU,
#   4. whole-model decode at Qwen2.5-Coder-0.5B's shapes with random 3- and 4-bit weights
#      (the model itself cannot be fetched on a machine without internet: speed only),
#   5. with MODEL=DIR (a recoup checkpoint, optionally QDEC=sidecar), whole-model decode of
#      real weights: `recoup bench --device cuda`.
set -euo pipefail
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
cargo build --release --features cuda
cargo test --release -p recoup-kernels --features cuda cuda:: -- --nocapture --test-threads 1
cargo bench -p recoup-kernels --features cuda --bench cuda
R=target/release/recoup
for bits in 3 4; do
  $R bench --device cuda --model tools/cuda/qwen2.5-coder-0.5b --random-weights $bits --pp 0 --tg 128 --reps 5
done
if [ -n "${MODEL:-}" ]; then
  for path in fused unfused off; do
    $R bench --device cuda --model "$MODEL" --tg 128 --reps 5 --lowrank-path $path
  done
  if [ -n "${QDEC:-}" ]; then
    $R bench --device cuda --model "$MODEL" --tg 128 --reps 5 --qdec "$QDEC" --qdec-k "${QDEC_K:-8}" --qdec-select "${QDEC_SELECT:-exact}"
  fi
fi
