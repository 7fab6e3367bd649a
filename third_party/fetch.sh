#!/usr/bin/env bash
# Fills third_party/ with the dependencies listed in third_party/MANIFEST, copied from Debian 13
# packages: the titan build root's (created by scripts/setup.sh if needed), or the host's /usr
# when the host itself has them. Run it on a machine with Debian's packages, then carry the
# filled folder to machines without a package manager (the GPU machines):
#   third_party/fetch.sh            # -> third_party/{include,lib,src}
# Each package's version must be the MANIFEST's; TITAN_ALLOW_OTHER_VERSIONS=1 accepts others.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../scripts/lib/common.sh"
root=""
if ! dpkg-query -W libtomlplusplus-dev libspdlog-dev nlohmann-json3-dev libpcre2-dev googletest \
  zlib1g-dev >/dev/null 2>&1; then
  "$TITAN_REPO/scripts/setup.sh"
  root="$TITAN_ROOTFS"
fi
[ -f /.titan-inside-root ] && root=""
query() { if [ -n "$root" ]; then chroot "$root" dpkg-query "$@"; else dpkg-query "$@"; fi; }
status=0
while read -r name version package _; do
  case "$name" in '' | '#'*) continue ;; esac
  have="$(query -W -f='${Version}' "$package" 2>/dev/null || true)"
  if [ "$have" != "$version" ]; then
    echo "[titan] third_party: $package is ${have:-not installed}, MANIFEST pins $version" >&2
    [ "${TITAN_ALLOW_OTHER_VERSIONS:-0}" = 1 ] || status=1
  fi
done <"$here/MANIFEST"
[ "$status" = 0 ] || titan_die "third_party: versions differ from MANIFEST (TITAN_ALLOW_OTHER_VERSIONS=1 accepts them)"
rm -rf "$here/include" "$here/lib" "$here/src"
mkdir -p "$here/include" "$here/lib" "$here/src"
for d in toml++ spdlog fmt nlohmann; do cp -r "$root/usr/include/$d" "$here/include/"; done
cp "$root/usr/include/pcre2.h" "$here/include/"
cp "$root/usr/lib/x86_64-linux-gnu/libpcre2-8.a" "$here/lib/"
cp "$root/usr/include/zlib.h" "$root/usr/include/zconf.h" "$here/include/"
cp "$root/usr/lib/x86_64-linux-gnu/libz.a" "$here/lib/"
cp -r "$root/usr/src/googletest" "$here/src/"
du -sh "$here" | awk '{print "[titan] third_party/ filled: " $1}'
