#!/usr/bin/env bash
# Sets up if needed, builds titan_train, and trains. Environment:
#   CONFIG_FILE  job file (default configs/debug_model.toml of this repository)
#   NPROC        processes on this machine (default: the number of local GPUs, else 1); uses
#                torchrun when it is installed, else scripts/launch.sh
#   LOG_RANK     ranks whose output is shown (default 0; "all", or a list such as 0,1)
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
[ -f "$config" ] || titan_die "CONFIG_FILE=$config: no such file"
gpus=0
command -v nvidia-smi >/dev/null 2>&1 && gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
nproc="${NPROC:-$((gpus > 0 ? gpus : 1))}"
export LOG_RANK="${LOG_RANK:-0}" NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1
titan_runtime_env
cd "$start_dir"
if [ "$nproc" -gt 1 ] && command -v torchrun >/dev/null 2>&1; then
  # torchrun's filter takes a list of ranks; "all" is its default (no filter).
  filter=()
  [ "$LOG_RANK" = all ] || filter=(--local-ranks-filter="$LOG_RANK")
  exec torchrun --standalone --nproc_per_node="$nproc" "${filter[@]}" \
    --no-python "$build_dir/titan_train" --job.config_file "$config" "$@"
fi
NPROC="$nproc" titan_exec "$TITAN_REPO/scripts/launch.sh" "$build_dir/titan_train" \
  --job.config_file "$config" "$@"
