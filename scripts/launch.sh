#!/usr/bin/env bash
# Starts NPROC local ranks of a command the way torchrun does (RANK, WORLD_SIZE, LOCAL_RANK,
# LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), prefixes each rank's output with "[rank N]"
# (titan's log lines carry it already), and if any rank fails, stops the others and exits with
# that rank's status. LOG_RANK (0,2 or all; default all) is for titan_train itself: the ranks it
# leaves out still print their warnings and errors, which pass through here like the rest.
#   NPROC=4 scripts/launch.sh build/titan_train --job.config_file configs/debug_model.toml
set -uo pipefail
nproc="${NPROC:-1}"
[ "$#" -ge 1 ] || { echo "usage: NPROC=n $0 COMMAND [ARGS...]" >&2; exit 2; }
case "$nproc" in '' | *[!0-9]* | 0) echo "NPROC must be a positive integer, got '$nproc'" >&2; exit 2 ;; esac
if [ "$nproc" -eq 1 ] && [ -z "${MASTER_PORT:-}" ]; then exec "$@"; fi

port="${MASTER_PORT:-$((29500 + RANDOM % 10000))}"
addr="${MASTER_ADDR:-127.0.0.1}"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Each rank runs in its own process group (job control), so stopping a rank stops everything
# it started (its output filter, anything it spawned) and no process outlives the launch.
set -m
pids=()
tmp="$(mktemp -d)"
stop_ranks() {  # stop_ranks SIGNAL: signal every rank's process group
  local p
  for p in "${pids[@]}"; do kill "-$1" -- "-$p" 2>/dev/null; done
}
cleanup() {
  stop_ranks TERM
  sleep 0.2
  stop_ranks KILL
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for ((r = 0; r < nproc; r++)); do
  (
    set +m
    export RANK=$r WORLD_SIZE=$nproc LOCAL_RANK=$r LOCAL_WORLD_SIZE=$nproc MASTER_ADDR=$addr \
      MASTER_PORT=$port OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(((($(nproc) + nproc - 1) / nproc)))}"
    # titan's own log lines name their rank already.
    "$@" 2>&1 | sed -u "/^\[titan\] \[rank /!s/^/[rank $r] /"
    echo "${PIPESTATUS[0]}" >"$tmp/rc.$r"
  ) &
  pids+=($!)
done
set +m  # the groups exist now; no job-control notices while waiting
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
        if [ "$rc" = 137 ]; then
          echo "[launch] rank $r was killed by SIGKILL: most often the kernel's out-of-memory" \
            "killer (see dmesg, or memory.events of the job's cgroup); its log's memory" \
            "estimate says what the plan needs" >&2
        fi
      fi
    elif kill -0 "${pids[$r]}" 2>/dev/null; then
      remaining=$((remaining + 1))
    elif [ "$status" = 0 ]; then
      status=1  # the rank's group was killed before it could report
      echo "[launch] rank $r ended without an exit status; stopping the other ranks" >&2
    fi
  done
  [ "$status" != 0 ] && break
done
if [ "$status" != 0 ]; then
  # Give the ranks a moment to report, then end every process of every rank.
  stop_ranks TERM
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    alive=0
    for p in "${pids[@]}"; do kill -0 -- "-$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.5
  done
  stop_ranks KILL
fi
wait 2>/dev/null
exit "$status"
