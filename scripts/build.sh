#!/usr/bin/env bash
# Configures and builds titan: inside the Debian 13 build root on a bare Debian 12 machine,
# natively where a LibTorch is found. BUILD_DIR (default build/), CMAKE_BUILD_TYPE
# (Release), JOBS (all cores) and BUILD_TARGETS (all) adjust it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
"$TITAN_REPO/scripts/setup.sh"
cd "$TITAN_REPO"

build_dir="${BUILD_DIR:-build}"
prefix_arg=""
if [ "$(titan_mode)" = native ] && [ ! -f /.titan-inside-root ]; then
  prefix_arg="-DCMAKE_PREFIX_PATH=$(titan_host_libtorch_prefix)"
fi
extra_args="${TITAN_CMAKE_ARGS:-}"

titan_exec bash -c "
  set -e
  export CCACHE_DIR=\${CCACHE_DIR:-/var/cache/ccache} CCACHE_BASEDIR='$TITAN_REPO' \
    CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime \
    CCACHE_MAXSIZE=\${CCACHE_MAXSIZE:-6G} CCACHE_NOHASHDIR=1
  generator=''
  command -v ninja >/dev/null && generator='-G Ninja'
  if [ ! -f '$build_dir/CMakeCache.txt' ]; then
    cmake -S . -B '$build_dir' \$generator -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-Release} \
      $prefix_arg $extra_args >/dev/null
  fi
  cmake --build '$build_dir' -j $(titan_jobs) ${BUILD_TARGETS:+--target $BUILD_TARGETS}
"
