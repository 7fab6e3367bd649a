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

do_profile1b() {
  "$BUILD_DIR/titan_train" --job.config_file configs/llama3_1b.toml --training.local_batch_size 4 \
    --training.seq_len 2048 --activation_checkpoint.mode none --training.steps 10 \
    --metrics.log_freq 5 --profiling.enable_profiling --profiling.profile_freq 10 \
    --profiling.profiler_active 2 --profiling.profiler_warmup 2 --job.dump_folder "$OUT/profile_1b" \
    --metrics.enable_tensorboard false --metrics.disable_color_printing &&
    "$PY" scripts/trace_summary.py "$OUT/profile_1b/profile_traces/iteration_10/rank0_trace.json" --steps 2
}

do_gdbtest() {
  cuda-gdb -batch -ex run -ex bt --args "$BUILD_DIR/tests/titan_gpu_tests" \
    --gtest_filter=GpuTraining.FusedKernelLossCurveMatchesUnfusedWithinBf16Noise 2>&1 | tail -60
}

for s in "${stages[@]}"; do
  case "$s" in
    build) run_stage build do_build || { tail -50 "$OUT/build.log"; exit 1; } ;;
    test) run_stage gpu_tests do_test; tail -30 "$OUT/gpu_tests.log" ;;
    unit) run_stage unit_tests do_unit; tail -15 "$OUT/unit_tests.log" ;;
    train) run_stage train_debug do_train; grep -E "step:|error" "$OUT/train_debug.log" | tail -8 ;;
    bench1b) run_stage bench_1b scripts/bench.sh 1b; tail -6 "$OUT/bench_1b.log" ;;
    bench3b) run_stage bench_3b scripts/bench.sh 3b; tail -6 "$OUT/bench_3b.log" ;;
    profile1b) run_stage profile_1b do_profile1b; tail -28 "$OUT/profile_1b.log" ;;
    gdbtest) run_stage gdbtest do_gdbtest; tail -40 "$OUT/gdbtest.log" ;;
    *) note "unknown stage $s" ;;
  esac
done
cat "$summary"
