#!/usr/bin/env bash
# Compile checks of the CUDA code on a machine without a GPU or a CUDA LibTorch: the kernels
# (.cu, no torch headers) with the host's nvcc for sm_90a, and a syntax check of every
# CUDA-only C++ path (TITAN_WITH_CUDA) against the build root's ATen headers plus the host's
# CUDA headers. Skips quietly where /usr/local/cuda is absent.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$TITAN_REPO"
NVCC="${NVCC:-/usr/local/cuda/bin/nvcc}"
if [ ! -x "$NVCC" ]; then
  titan_log "check_cuda: no nvcc at $NVCC; skipped"
  exit 0
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for f in src/kernels/*.cu; do
  "$NVCC" -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -c "$f" -o "$out/$(basename "$f").o"
done
titan_log "check_cuda: $(ls src/kernels/*.cu | wc -l) kernel files compile for sm_90a"
[ "$(titan_mode)" = root ] || exit 0
# CUDA headers for the syntax check, copied once into the build root.
inc="$TITAN_ROOTFS/usr/local/titan-cuda-include"
if [ ! -f "$inc/.copied" ] || [ /usr/local/cuda/include -nt "$inc/.copied" ]; then
  rm -rf "$inc" && mkdir -p "$inc" && cp -a /usr/local/cuda/include/. "$inc/" && touch "$inc/.copied"
fi
# Debian's CPU LibTorch ships c10/cuda headers without their generated config header.
mkdir -p "$inc/c10/cuda/impl"
echo '#pragma once' >"$inc/c10/cuda/impl/cuda_cmake_macros.h"
files="src/kernels/kernels_cuda.cpp src/kernels/gemm_cuda.cpp src/dist/nccl_communicator.cpp src/ops/attention.cpp
  src/ops/cross_entropy.cpp src/ops/linear.cpp src/ops/rmsnorm.cpp src/ops/rope.cpp
  src/ops/swiglu.cpp src/ops/float8.cpp src/train/trainer.cpp src/train/optimizer.cpp src/util/device.cpp
  src/metrics/memory_snapshot.cpp tests/gpu/kernels_test.cpp tests/gpu/training_test.cpp
  tests/gpu/tensor_parallel_test.cpp tests/gpu/context_parallel_test.cpp tests/gpu/terapipe_test.cpp tests/gpu/float8_test.cpp"
titan_exec bash -c "
  set -e
  for f in $(echo $files); do
    g++ -std=gnu++20 -fsyntax-only -DTITAN_WITH_CUDA=1 -DPCRE2_CODE_UNIT_WIDTH=8 \
      -Iinclude -Isrc/kernels -Itests -I/usr/include/torch/csrc/api/include -isystem /usr/local/titan-cuda-include \
      -DTITAN_TRAIN_BINARY='\"\"' -DTITAN_SOURCE_DIR='\"\"' \"\$f\"
  done"
titan_log "check_cuda: CUDA-only C++ paths pass a syntax check"
