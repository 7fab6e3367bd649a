#!/usr/bin/env bash
# Sets up if needed, builds titan_train, and trains. Environment:
#   CONFIG_FILE  job file (default configs/debug_model.toml of this repository; or give
#                --job.config_file among the arguments)
#   NPROC        processes on this machine (default: the GPUs CUDA_VISIBLE_DEVICES lets it use,
#                else 1); uses torchrun when it is installed, else scripts/launch.sh
#   LOG_RANK     ranks whose log lines are shown (default 0; "all", or a list such as 0,1);
#                every rank's warnings and errors are shown
# Arguments are passed to titan_train as config overrides:
#   ./scripts/train.sh --training.steps 50
#   NPROC=4 ./scripts/train.sh --parallelism.data_parallel_shard_degree 4
# Paths (CONFIG_FILE, --job.dump_folder, datasets, tokenizers) mean what they mean in the
# folder the script was started from, also when titan runs inside the build root.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
start_dir="$(pwd)"
BUILD_TARGETS=titan_train "$TITAN_REPO/scripts/build.sh"
build_dir="${BUILD_DIR:-build}"
case "$build_dir" in /*) ;; *) build_dir="$TITAN_REPO/$build_dir" ;; esac
config="${CONFIG_FILE:-$TITAN_REPO/configs/debug_model.toml}"
# A --job.config_file among the arguments is the job file (CONFIG_FILE then must not be set too).
config_args=(--job.config_file "$config")
for a in "$@"; do
  case "$a" in
    --job.config_file | --job.config_file=*)
      [ -z "${CONFIG_FILE:-}" ] || titan_die "CONFIG_FILE and --job.config_file both name a job file; use one"
      config_args=()
      ;;
  esac
done
[ "${#config_args[@]}" -eq 0 ] || [ -f "$config" ] || titan_die "CONFIG_FILE=$config: no such file"
# GPUs this run may use: CUDA_VISIBLE_DEVICES's list where set, else every GPU nvidia-smi lists.
gpus=0
command -v nvidia-smi >/dev/null 2>&1 && gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
if [ -n "${CUDA_VISIBLE_DEVICES+x}" ] && [ "$gpus" -gt 0 ]; then
  visible="${CUDA_VISIBLE_DEVICES//[[:space:]]/}"
  gpus=0
  [ -z "$visible" ] || gpus="$(tr ',' '\n' <<<"$visible" | grep -c .)"
fi
nproc="${NPROC:-$((gpus > 0 ? gpus : 1))}"
export LOG_RANK="${LOG_RANK:-0}" NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1
titan_runtime_env
cd "$start_dir"
if [ "$nproc" -gt 1 ] && command -v torchrun >/dev/null 2>&1; then
  # No --local-ranks-filter: titan_train applies LOG_RANK itself, and the ranks it leaves out
  # still print their warnings and errors (torchrun's filter would drop those too).
  exec torchrun --standalone --nproc_per_node="$nproc" \
    --no-python "$build_dir/titan_train" "${config_args[@]}" "$@"
fi
NPROC="$nproc" titan_exec_replace "$TITAN_REPO/scripts/launch.sh" "$build_dir/titan_train" \
  "${config_args[@]}" "$@"
