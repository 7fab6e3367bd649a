#!/usr/bin/env bash
# Idempotent set-up: finds a LibTorch on the host, or else creates (once) a Debian 13 build
# root with LibTorch, toml++, spdlog, GoogleTest and friends in a cache folder outside the repo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

if [ "$(titan_mode)" = native ]; then
  if [ -f /.titan-inside-root ]; then
    exit 0
  fi
  titan_log "using the host's LibTorch at $(titan_host_libtorch_prefix)$(titan_torch_has_cuda &&
    echo ' (CUDA: NCCL and cuDNN from its wheel)')"
  titan_native_packages
  exit 0
fi

# A stamp holds the package list it was made with: a new list re-runs only the install.
if [ -f "$TITAN_ROOT_STAMP" ] && [ "$(cat "$TITAN_ROOT_STAMP")" = "$TITAN_ROOT_PACKAGES" ]; then
  exit 0
fi

[ "$(id -u)" = 0 ] || titan_die "creating the Debian 13 build root needs root (debootstrap, chroot);
  or point CMAKE_PREFIX_PATH at a LibTorch >= 2.4 and re-run"
command -v unshare >/dev/null || titan_die "unshare (util-linux) is missing"

if ! command -v debootstrap >/dev/null; then
  titan_log "installing debootstrap on the host"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null; } ||
    titan_die "could not install debootstrap with apt-get"
fi

mkdir -p "$TITAN_CACHE_DIR"
exec 9>"$TITAN_CACHE_DIR/.setup.lock"
flock 9 # a second set-up running at the same time waits for the first

if [ ! -x "$TITAN_ROOTFS/usr/bin/apt-get" ] || [ ! -f "$TITAN_ROOTFS/.titan-bootstrapped" ]; then
  titan_log "creating the Debian 13 (trixie) build root in $TITAN_ROOTFS (about a minute)"
  rm -rf "$TITAN_ROOTFS.partial"
  : >"$TITAN_CACHE_DIR/debootstrap.log"
  # About 80 packages, each retrieved, extracted, unpacked and configured (318 steps measured).
  titan_watch "debootstrap" "$TITAN_CACHE_DIR/debootstrap.log" 318 \
    '^I: (Retrieving|Extracting|Unpacking|Configuring) ' &
  watcher=$!
  debootstrap --variant=minbase trixie "$TITAN_ROOTFS.partial" >"$TITAN_CACHE_DIR/debootstrap.log" 2>&1 ||
    { kill "$watcher" 2>/dev/null; titan_die "debootstrap failed; see $TITAN_CACHE_DIR/debootstrap.log"; }
  kill "$watcher" 2>/dev/null || true
  touch "$TITAN_ROOTFS.partial/.titan-bootstrapped" "$TITAN_ROOTFS.partial/.titan-inside-root"
  rm -rf "$TITAN_ROOTFS"
  mv "$TITAN_ROOTFS.partial" "$TITAN_ROOTFS"
fi

titan_log "installing build packages into the root (about a minute)"
cp /etc/resolv.conf "$TITAN_ROOTFS/etc/resolv.conf" 2>/dev/null || true
: >"$TITAN_CACHE_DIR/apt.log"
titan_watch "packages" "$TITAN_CACHE_DIR/apt.log" apt '^(Unpacking|Setting up) ' &
watcher=$!
unshare --mount --propagation private -- /bin/bash -c '
  set -e
  root="$1"; pkgs="$2"
  mount -t proc proc "$root/proc"
  mount --rbind /dev "$root/dev"
  chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    DEBIAN_FRONTEND=noninteractive /bin/bash -c "
      apt-get update -q && apt-get install -y -q --no-install-recommends $pkgs && apt-get clean"
' titan-setup "$TITAN_ROOTFS" "$TITAN_ROOT_PACKAGES" >"$TITAN_CACHE_DIR/apt.log" 2>&1 ||
  { kill "$watcher" 2>/dev/null; titan_die "installing packages into the root failed; see $TITAN_CACHE_DIR/apt.log"; }
kill "$watcher" 2>/dev/null || true
mkdir -p "$TITAN_ROOTFS/var/cache/ccache"
printf '%s' "$TITAN_ROOT_PACKAGES" >"$TITAN_ROOT_STAMP"
titan_log "build root ready"
