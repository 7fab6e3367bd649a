#!/usr/bin/env bash
# On a GPU machine: configure against the installed PyTorch's LibTorch with CUDA + NCCL, build
# with all cores, run the GPU tests, short GPU training runs and the benchmarks; logs go to
# $OUT. Stages (default: build test train): build test train bench1b bench3b unit
#   scripts/device_check.sh build test train bench1b
# Needs .deps/ (scripts/device_deps.sh) and, for benchmarks, .bench/ref_train.py.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/titan_device_out}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BUILD_DIR="${BUILD_DIR:-build-gpu}"
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build test train)

site="$("$PY" -c 'import site; print(site.getsitepackages()[0])')"
torch_prefix="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
nccl_root="$site/nvidia/nccl"
cudnn_root="$site/nvidia/cudnn"
export LD_LIBRARY_PATH="$nccl_root/lib:$cudnn_root/lib:$site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
export TORCH_CUDA_ARCH_LIST=9.0a
export PATH="/usr/local/cuda/bin:$PATH"

summary="$OUT/summary.txt"
note() { echo "$*" | tee -a "$summary"; }

run_stage() {
  local name="$1"
  shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  note "[$name] rc=$rc in $((SECONDS - t0))s"
  return $rc
}

do_build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$torch_prefix" -DTITAN_DEPS_DIR="$PWD/.deps" \
    -DTITAN_NCCL_ROOT="$nccl_root" -DCUDNN_INCLUDE_PATH="$cudnn_root/include" \
    -DCUDNN_LIBRARY_PATH="$cudnn_root/lib/libcudnn.so.9" -DCMAKE_CUDA_ARCHITECTURES=90a &&
    cmake --build "$BUILD_DIR" -j "$(nproc)"
}

do_test() {
  (cd "$BUILD_DIR" && ctest -L gpu --output-on-failure --timeout 600)
}

do_unit() {
  (cd "$BUILD_DIR" && ctest -L unit --output-on-failure -j 8 --timeout 600)
}

do_train() {
  "$BUILD_DIR/titan_train" --job.config_file configs/debug_model.toml --training.steps 50 \
    --metrics.log_freq 10 --job.dump_folder "$OUT/train_debug" --metrics.disable_color_printing
}

for s in "${stages[@]}"; do
  case "$s" in
    build) run_stage build do_build || { tail -50 "$OUT/build.log"; exit 1; } ;;
    test) run_stage gpu_tests do_test; tail -30 "$OUT/gpu_tests.log" ;;
    unit) run_stage unit_tests do_unit; tail -15 "$OUT/unit_tests.log" ;;
    train) run_stage train_debug do_train; grep -E "step:|error" "$OUT/train_debug.log" | tail -8 ;;
    bench1b) run_stage bench_1b scripts/bench.sh 1b; tail -6 "$OUT/bench_1b.log" ;;
    bench3b) run_stage bench_3b scripts/bench.sh 3b; tail -6 "$OUT/bench_3b.log" ;;
    *) note "unknown stage $s" ;;
  esac
done
cat "$summary"
