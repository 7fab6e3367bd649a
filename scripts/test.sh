#!/usr/bin/env bash
# Sets up if needed, builds, and runs every test suite with ctest. Extra arguments go to
# ctest (e.g. -R Config, -L unit).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
"$TITAN_REPO/scripts/build.sh"
# CUDA code cannot run here, but it must compile: kernels with the host's nvcc, CUDA-only C++
# paths as a syntax check (skipped where the host has no /usr/local/cuda).
"$TITAN_REPO/scripts/check_cuda.sh"
cd "$TITAN_REPO"
build_dir="${BUILD_DIR:-build}"
# Suites run side by side: one OpenMP thread per test process (unless set), else every CPU test
# spawns a thread per core and they starve each other.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
titan_exec bash -c "cd '$build_dir' && ctest --output-on-failure -j $(titan_jobs) --timeout 1200 $(printf '%q ' "$@")"
# Paths outside the repository, as a user types them (config, data, tokenizer, outputs). Only
# with the full suite: arguments select a part of it.
[ "$#" -gt 0 ] || BUILD_DIR="$build_dir" "$TITAN_REPO/scripts/test_host_paths.sh"
