#!/usr/bin/env bash
# Sets up if needed, builds, and runs every test suite with ctest. Extra arguments go to
# ctest (e.g. -R Config, -L unit).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
"$TITAN_REPO/scripts/build.sh"
cd "$TITAN_REPO"
build_dir="${BUILD_DIR:-build}"
titan_exec bash -c "cd '$build_dir' && ctest --output-on-failure -j $(titan_jobs) --timeout 1200 $(printf '%q ' "$@")"
