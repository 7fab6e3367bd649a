#!/usr/bin/env bash
# Starts NPROC local ranks of a command the way torchrun does (RANK, WORLD_SIZE, LOCAL_RANK,
# LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), prefixes each rank's output with "[rank N]"
# (LOG_RANK=0,2 or LOG_RANK=all chooses which ranks print; default: all), and if any rank
# fails, stops the others and exits with that rank's status.
#   NPROC=4 scripts/launch.sh build/titan_train --job.config_file configs/debug_model.toml
set -uo pipefail
nproc="${NPROC:-1}"
[ "$#" -ge 1 ] || { echo "usage: NPROC=n $0 COMMAND [ARGS...]" >&2; exit 2; }
case "$nproc" in '' | *[!0-9]* | 0) echo "NPROC must be a positive integer, got '$nproc'" >&2; exit 2 ;; esac
if [ "$nproc" -eq 1 ] && [ -z "${MASTER_PORT:-}" ]; then exec "$@"; fi

port="${MASTER_PORT:-$((29500 + RANDOM % 10000))}"
addr="${MASTER_ADDR:-127.0.0.1}"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
shows_rank() {
  local want="${LOG_RANK:-all}" r
  [ "$want" = all ] && return 0
  for r in ${want//,/ }; do [ "$r" = "$1" ] && return 0; done
  return 1
}
pids=()
tmp="$(mktemp -d)"
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$tmp"' EXIT
for ((r = 0; r < nproc; r++)); do
  (
    export RANK=$r WORLD_SIZE=$nproc LOCAL_RANK=$r LOCAL_WORLD_SIZE=$nproc MASTER_ADDR=$addr \
      MASTER_PORT=$port OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(((($(nproc) + nproc - 1) / nproc)))}"
    if shows_rank "$r"; then
      "$@" 2>&1 | sed -u "s/^/[rank $r] /"
    else
      "$@" >/dev/null 2>&1
    fi
    echo "${PIPESTATUS[0]}" >"$tmp/rc.$r"
  ) &
  pids+=($!)
done
status=0
remaining=$nproc
while [ "$remaining" -gt 0 ]; do
  wait -n "${pids[@]}" 2>/dev/null
  remaining=0
  for ((r = 0; r < nproc; r++)); do
    if [ -f "$tmp/rc.$r" ]; then
      rc="$(cat "$tmp/rc.$r")"
      if [ "$rc" != 0 ] && [ "$status" = 0 ]; then
        status=$rc
        echo "[launch] rank $r exited with status $rc; stopping the other ranks" >&2
        kill "${pids[@]}" 2>/dev/null
        pkill -P $$ 2>/dev/null
      fi
    else
      remaining=$((remaining + 1))
    fi
  done
  [ "$status" != 0 ] && break
done
wait 2>/dev/null
exit "$status"
