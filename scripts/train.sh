#!/usr/bin/env bash
# Sets up if needed, builds titan_train, and trains: CONFIG_FILE (default
# configs/debug_model.toml), NPROC processes (default: all local GPUs, else 1), and any
# arguments are passed to titan_train as overrides, e.g.
#   ./scripts/train.sh --training.steps 50
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
BUILD_TARGETS=titan_train "$TITAN_REPO/scripts/build.sh"
cd "$TITAN_REPO"
build_dir="${BUILD_DIR:-build}"
config="${CONFIG_FILE:-configs/debug_model.toml}"
titan_exec "$build_dir/titan_train" --job.config_file "$config" "$@"
