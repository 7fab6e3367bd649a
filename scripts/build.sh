#!/usr/bin/env bash
# Configures and builds titan: inside the Debian 13 build root on a bare Debian 12 machine,
# natively where a LibTorch is found (an installed PyTorch: with CUDA, its wheel's NCCL and
# cuDNN, and the GPUs' architecture). BUILD_DIR (default build/), CMAKE_BUILD_TYPE (Release),
# JOBS (all cores) and BUILD_TARGETS (all) adjust it; TITAN_CMAKE_ARGS adds CMake arguments.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
"$TITAN_REPO/scripts/setup.sh"
cd "$TITAN_REPO"

build_dir="${BUILD_DIR:-build}"
cmake_args=()
if [ "$(titan_mode)" = native ] && [ ! -f /.titan-inside-root ]; then
  mapfile -t cmake_args < <(titan_native_cmake_args)
  titan_runtime_env
  for a in "${cmake_args[@]}"; do
    case "$a" in
      # Torch's CMake takes the CUDA architectures from TORCH_CUDA_ARCH_LIST ("9.0a").
      -DCMAKE_CUDA_ARCHITECTURES=*)
        arch="${a#*=}"        # 90a
        num="${arch%a}"       # 90
        export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${num:0:-1}.${num: -1}${arch#"$num"}}"
        ;;
    esac
  done
fi
extra_args="${TITAN_CMAKE_ARGS:-}"
quoted=""
for a in "${cmake_args[@]}"; do quoted="$quoted $(printf '%q' "$a")"; done
# A new build folder is configured (Release unless CMAKE_BUILD_TYPE says otherwise); an existing
# one again only when CMAKE_BUILD_TYPE or TITAN_CMAKE_ARGS are given, so that they take effect.
configure=0
build_type="-DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-Release}"
case "$build_dir" in /*) cache="$build_dir/CMakeCache.txt" ;; *) cache="$TITAN_REPO/$build_dir/CMakeCache.txt" ;; esac
if [ ! -f "$cache" ]; then
  configure=1
elif [ -n "${CMAKE_BUILD_TYPE:-}" ] || [ -n "$extra_args" ]; then
  configure=1
  [ -n "${CMAKE_BUILD_TYPE:-}" ] || build_type=""
  quoted=""  # the machine's arguments are in the cache already
fi

titan_exec bash -c "
  set -e
  export CCACHE_DIR=\${CCACHE_DIR:-/var/cache/ccache} CCACHE_BASEDIR='$TITAN_REPO' \
    CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime \
    CCACHE_MAXSIZE=\${CCACHE_MAXSIZE:-6G} CCACHE_NOHASHDIR=1
  [ -w \"\$CCACHE_DIR\" ] || mkdir -p \"\$CCACHE_DIR\" 2>/dev/null || export CCACHE_DIR=\"\$HOME/.cache/ccache\"
  generator=''
  command -v ninja >/dev/null && generator='-G Ninja'
  [ -f '$build_dir/CMakeCache.txt' ] && generator=''
  if [ $configure = 1 ]; then
    cmake -S . -B '$build_dir' \$generator $build_type $quoted $extra_args >/dev/null
  fi
  cmake --build '$build_dir' -j $(titan_jobs) ${BUILD_TARGETS:+--target $BUILD_TARGETS}
"
