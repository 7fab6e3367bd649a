#!/usr/bin/env bash
# Collects the header-only forms of titan's dependencies (toml++, spdlog, fmt, nlohmann-json,
# PCRE2's header) and GoogleTest's sources from the Debian 13 build root into .deps/, for
# machines with no package manager (the GPU machines). Run here; carry .deps to the device.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
"$TITAN_REPO/scripts/setup.sh"
root="$TITAN_ROOTFS"
[ -f /.titan-inside-root ] && root=""
dest="$TITAN_REPO/.deps"
rm -rf "$dest"
mkdir -p "$dest/include" "$dest/src"
for d in toml++ spdlog fmt nlohmann; do cp -r "$root/usr/include/$d" "$dest/include/"; done
cp "$root/usr/include/pcre2.h" "$dest/include/"
cp -r "$root/usr/src/googletest" "$dest/src/"
# Debian builds spdlog against an external fmt; keep that and make fmt header-only.
du -sh "$dest" | awk '{print "[titan] device dependency bundle: " $1 " in .deps/"}'
