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
libspdlog-dev libgtest-dev libpcre2-dev nlohmann-json3-dev python3 python3-torch python3-tiktoken \
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
titan_exec() {
  if [ "$(titan_mode)" = native ]; then
    "$@"
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
  unshare --mount --propagation private -- /bin/bash -c '
    set -e
    root="$1"; parent="$2"; cwd="$3"; shift 3
    mkdir -p "$root$parent" "$root/proc" "$root/dev" "$root/tmp"
    mount --bind "$parent" "$root$parent"
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    cmd="$1"; shift
    exec chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
      PATH=/usr/lib/ccache:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      CCACHE_DIR=/var/cache/ccache "$@" /bin/bash -c "cd \"$cwd\" && $cmd"
  ' titan-root "$TITAN_ROOTFS" "$TITAN_PARENT" "$cwd" "${q[*]}" "${envs[@]}"
}

# Number of parallel build jobs: all cores unless JOBS says otherwise.
titan_jobs() { echo "${JOBS:-$(nproc 2>/dev/null || echo 2)}"; }
