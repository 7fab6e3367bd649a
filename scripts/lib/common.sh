# Shared helpers for titan's scripts: where things live, and how a command runs either
# natively (a LibTorch was found) or inside the cached Debian 13 build root.
# Sourced, never executed.

TITAN_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TITAN_PARENT="$(dirname "$TITAN_REPO")"
# Binding "/" into the root would nest it in itself: then only the repo is visible.
[ "$TITAN_PARENT" != / ] || TITAN_PARENT="$TITAN_REPO"
# The build root lives outside the repo so fresh clones (CI) reuse it.
TITAN_CACHE_DIR="${TITAN_CACHE_DIR:-/var/cache/titan}"
TITAN_ROOTFS="${TITAN_ROOTFS:-$TITAN_CACHE_DIR/trixie-root}"
# Packages of the build root; changing this list re-runs the install step.
TITAN_ROOT_PACKAGES="g++ cmake ninja-build ccache libtorch-dev libgloo-dev libtomlplusplus-dev \
libspdlog-dev libgtest-dev libpcre2-dev zlib1g-dev nlohmann-json3-dev python3 python3-torch python3-tiktoken \
python3-safetensors python3-numpy procps libopenblas0-openmp"
TITAN_ROOT_STAMP="$TITAN_ROOTFS/.titan-root-ready"

titan_log() { printf '[titan] %s\n' "$*" >&2; }
# titan_watch LABEL LOG TOTAL REGEX: every PERIOD s (default 10) while running in the background,
# reports how many lines of LOG match REGEX out of TOTAL, with elapsed time and an ETA. TOTAL
# "apt" takes apt's "N newly installed" count (each package is unpacked and set up: 2N steps).
titan_watch() {
  local label="$1" log="$2" total="$3" regex="$4" start=$SECONDS last=-1 n t el
  while sleep "${TITAN_WATCH_PERIOD:-10}"; do
    n=$(grep -cE "$regex" "$log" 2>/dev/null) || n=0
    t="$total"
    if [ "$t" = apt ]; then
      t=$(grep -oE '[0-9]+ newly installed' "$log" 2>/dev/null | head -1 | cut -d' ' -f1) || t=0
      t=$((2 * ${t:-0}))
    fi
    [ "$n" = "$last" ] && continue
    last=$n
    el=$((SECONDS - start))
    if [ "$t" -gt 0 ] && [ "$n" -gt 0 ]; then
      [ "$n" -lt "$t" ] || n=$((t - 1))
      titan_log "$label: $n/$t steps ($((100 * n / t))%), ${el}s elapsed, about $((el * (t - n) / n))s left"
    else
      titan_log "$label: $n steps, ${el}s elapsed"
    fi
  done
}

titan_die() {
  printf '[titan] error: %s\n' "$*" >&2
  exit 1
}

# Prints the CMake prefix of a usable LibTorch on the host, or nothing.
titan_host_libtorch_prefix() {
  local p
  IFS=':' read -ra _prefixes <<<"${CMAKE_PREFIX_PATH:-}"
  for p in "${_prefixes[@]}"; do
    [ -n "$p" ] || continue
    if [ -f "$p/share/cmake/Torch/TorchConfig.cmake" ] || [ -f "$p/Torch/TorchConfig.cmake" ] ||
      [ -f "$p/TorchConfig.cmake" ]; then
      echo "$p"
      return 0
    fi
  done
  local py
  for py in "${PYTHON:-}" python3; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    p="$("$py" -c 'import torch, sys; print(torch.utils.cmake_prefix_path)' 2>/dev/null)" || continue
    if [ -n "$p" ] && [ -f "$p/Torch/TorchConfig.cmake" ]; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

# The Python whose PyTorch provides LibTorch (native mode), or nothing.
titan_torch_python() {
  local py
  for py in "${PYTHON:-}" python3; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    "$py" -c 'import torch' >/dev/null 2>&1 && { echo "$py"; return 0; }
  done
  return 1
}

# The site-packages folder of the PyTorch wheel (its nvidia/* wheels hold NCCL and cuDNN).
titan_torch_site() {
  local py
  py="$(titan_torch_python)" || return 1
  "$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))'
}

# Whether the native LibTorch was built with CUDA.
titan_torch_has_cuda() {
  local p
  p="$(titan_host_libtorch_prefix)" || return 1
  [ -n "$(find "$p/../.." -maxdepth 3 -name 'libtorch_cuda.so' 2>/dev/null | head -1)" ]
}

# Run-time environment of a native CUDA build: the libraries of the PyTorch wheel's nvidia/*
# packages (NCCL, cuDNN, cuBLAS, CUDA runtime) on LD_LIBRARY_PATH, the CUDA toolkit on PATH.
# Does nothing in root mode or without CUDA.
titan_runtime_env() {
  [ "$(titan_mode)" = native ] || return 0
  local site d libs=""
  site="$(titan_torch_site 2>/dev/null)" || return 0
  for d in "$site"/nvidia/*/lib; do
    [ -d "$d" ] && libs="$libs${libs:+:}$d"
  done
  [ -n "$libs" ] && export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  [ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
  return 0
}

# CMake arguments of a native build: LibTorch's prefix and, with a CUDA PyTorch wheel, the
# NCCL and cuDNN of its nvidia/* packages and the GPUs' architecture (nvidia-smi; default
# Hopper, sm_90a). Prints one argument per line.
titan_native_cmake_args() {
  local prefix site cap arch
  prefix="$(titan_host_libtorch_prefix)" || return 0
  echo "-DCMAKE_PREFIX_PATH=$prefix"
  titan_torch_has_cuda || return 0
  site="$(titan_torch_site 2>/dev/null)" || true
  if [ -n "$site" ] && [ -f "$site/nvidia/nccl/include/nccl.h" ]; then
    echo "-DTITAN_NCCL_ROOT=$site/nvidia/nccl"
  fi
  if [ -n "$site" ] && [ -d "$site/nvidia/cudnn/include" ]; then
    echo "-DCUDNN_INCLUDE_PATH=$site/nvidia/cudnn/include"
    local lib
    lib="$(ls "$site"/nvidia/cudnn/lib/libcudnn.so* 2>/dev/null | head -1)"
    [ -n "$lib" ] && echo "-DCUDNN_LIBRARY_PATH=$lib"
  fi
  cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
  arch="${cap:-90}"
  # Hopper's wgmma and TMA instructions need the architecture-specific target (sm_90a).
  [ "$arch" = 90 ] && arch=90a
  echo "-DCMAKE_CUDA_ARCHITECTURES=$arch"
}

# Native builds need toml++, spdlog, nlohmann-json, PCRE2, zlib and GoogleTest: the system's
# packages, else a filled third_party/ (third_party/fetch.sh), else apt-get installs them.
titan_native_packages() {
  local have=1 h
  for h in /usr/include/toml++/toml.hpp /usr/include/spdlog/spdlog.h /usr/include/nlohmann/json.hpp \
    /usr/include/pcre2.h /usr/include/zlib.h /usr/include/gtest/gtest.h; do
    [ -f "$h" ] || have=0
  done
  [ "$have" = 1 ] && return 0
  if [ -f "$TITAN_REPO/third_party/include/toml++/toml.hpp" ]; then
    titan_log "toml++/spdlog/nlohmann-json/PCRE2/zlib/GoogleTest: using third_party/ (see third_party/MANIFEST)"
    return 0
  fi
  local pkgs="libtomlplusplus-dev libspdlog-dev nlohmann-json3-dev libpcre2-dev zlib1g-dev libgtest-dev"
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    titan_log "installing $pkgs with apt-get"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q $pkgs >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $pkgs >/dev/null 2>&1; }; then
      return 0
    fi
  fi
  titan_die "toml++, spdlog, nlohmann-json, PCRE2, zlib and GoogleTest are missing and apt-get could not
  install them: install $pkgs, or run third_party/fetch.sh on a Debian machine and copy the filled
  third_party/ folder into this checkout"
}

# "native" when the host can build titan itself, "root" when the Debian 13 root is used.
titan_mode() {
  if [ -n "${TITAN_MODE:-}" ]; then
    echo "$TITAN_MODE"
  elif [ -f /.titan-inside-root ]; then
    echo native
  elif titan_host_libtorch_prefix >/dev/null; then
    echo native
  else
    echo root
  fi
}

# Runs "$@" in the build environment with the working directory preserved.
# In root mode: a private mount namespace (unshare) holds the bind mounts, so they vanish
# with the process even if it is killed; nothing is left mounted on the host.
titan_exec() { _titan_exec "" "$@"; }
# The same in place of the calling shell (exec): a signal to the script's process (a
# supervisor's SIGTERM) then reaches the command itself rather than orphaning it.
titan_exec_replace() { _titan_exec exec "$@"; }
_titan_exec() {
  local replace="$1"
  shift
  if [ "$(titan_mode)" = native ]; then
    $replace "$@"
    return $?
  fi
  [ -f "$TITAN_ROOT_STAMP" ] || titan_die "build root $TITAN_ROOTFS is not ready; run scripts/setup.sh"
  local cwd
  cwd="$(pwd)"
  local q=()
  local a
  for a in "$@"; do q+=("$(printf '%q' "$a")"); done
  # Environment passed into the root: what the scripts and titan_train read.
  local envs=()
  local v
  for v in $(compgen -e); do
    case "$v" in
      NPROC | CONFIG_FILE | LOG_RANK | TITAN_* | RANK | WORLD_SIZE | LOCAL_RANK | LOCAL_WORLD_SIZE | \
        MASTER_ADDR | MASTER_PORT | SLURM_* | CTEST_* | OMP_NUM_THREADS | GTEST_* | JOBS | BUILD_* | \
        CMAKE_BUILD_TYPE | TERM)
        envs+=("$v=${!v}")
        ;;
    esac
  done
  # Every host path works inside the root as the user typed it: the host's own top-level
  # folders (/tmp, /home, /root, /data, /mnt, /work, ...) are bound over the root's at the same
  # paths; only the operating system's folders (/usr, /etc, /var, ...) stay the root's. The
  # repository's parent and the working directory are bound wherever they are.
  $replace unshare --mount --propagation private -- /bin/bash -c '
    set -e
    root="$1"; parent="$2"; cwd="$3"; shift 3
    mkdir -p "$root/proc" "$root/dev" "$root/tmp"
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    for d in /*; do
      case "$d" in
        /bin | /boot | /dev | /etc | /lib | /lib32 | /lib64 | /libx32 | /lost+found | /proc | \
          /run | /sbin | /sys | /usr | /var) continue ;;
      esac
      # A top-level link to a folder (/data -> /mnt/data) is bound at its own name too, unless
      # the root has that name already.
      [ -d "$d" ] || continue
      if [ -L "$d" ] && { [ -L "$root$d" ] || { [ -e "$root$d" ] && [ ! -d "$root$d" ]; }; }; then
        continue
      fi
      [ "$d" -ef "$root" ] && continue
      mkdir -p "$root$d"
      mount --rbind "$d" "$root$d"
    done
    [ -d /var/tmp ] && mkdir -p "$root/var/tmp" && mount --rbind /var/tmp "$root/var/tmp"
    for p in "$parent" "$cwd"; do
      [ -d "$root$p" ] && [ "$root$p" -ef "$p" ] && continue
      mkdir -p "$root$p"
      mount --rbind "$p" "$root$p"
    done
    cmd="$1"; shift
    exec chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
      PATH=/usr/lib/ccache:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      CCACHE_DIR=/var/cache/ccache "$@" /bin/bash -c "cd \"$cwd\" && $cmd"
  ' titan-root "$TITAN_ROOTFS" "$TITAN_PARENT" "$cwd" "${q[*]}" "${envs[@]}"
}

# Number of parallel build jobs: all cores unless JOBS says otherwise.
titan_jobs() { echo "${JOBS:-$(nproc 2>/dev/null || echo 2)}"; }
