#!/usr/bin/env bash
# Fault injection, end to end: trains the debug model with frequent checkpoints and kills it
# with SIGKILL at random moments (during training steps and during checkpoint saves, which a
# test hook stretches), resumes after each kill, and at the end compares every step's loss and
# grad norm with an uninterrupted run of the same job. Reports the rounds, how many kills hit
# a save, and whether every resumed step matched bit for bit.
#   scripts/fault_injection.sh [ROUNDS]      (default 20; NPROC=2 for two ranks)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
rounds="${1:-20}"
nproc="${NPROC:-1}"
BUILD_TARGETS=titan_train "$TITAN_REPO/scripts/build.sh" >/dev/null
bin="${BUILD_DIR:-build}/titan_train"
case "$bin" in /*) ;; *) bin="$TITAN_REPO/$bin" ;; esac
work="$(mktemp -d /tmp/titan_faults.XXXXXX)"
trap 'rm -rf "$work"' EXIT
steps=40
args=(--job.config_file "$TITAN_REPO/configs/debug_model.toml" --training.steps "$steps"
  --training.seq_len 64 --training.local_batch_size $((8 / nproc)) --metrics.log_freq 1
  --metrics.disable_color_printing --checkpoint.enable --checkpoint.interval 3
  --checkpoint.keep_latest_k 2 --checkpoint.last_save_model_only false)
run() {  # run DUMP [ENV...]: one attempt of the job in the background; its pid in $pid
  local dump="$1"
  shift
  (
    export OMP_NUM_THREADS=1 TITAN_DEVICE=cpu "$@"
    NPROC="$nproc" LOG_RANK=none titan_exec "$TITAN_REPO/scripts/launch.sh" "$bin" "${args[@]}" \
      --job.dump_folder "$dump" >>"$dump.log" 2>&1
  ) &
  pid=$!
}
titan_log "faults: reference run ($steps steps, $nproc rank(s))"
mkdir -p "$work/ref" "$work/run"
run "$work/ref"
wait "$pid" || titan_die "faults: the reference run failed; see $work/ref.log"
kills=0
save_kills=0
finished=0
for ((round = 1; round <= rounds; ++round)); do
  # Saves pause between their shard files and the commit, so some kills land inside a save.
  run "$work/run" TITAN_TEST_SAVE_DELAY_MS=$((300 + RANDOM % 1200))
  delay_ms=$((1500 + RANDOM % 3000))
  sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
  if kill -0 "$pid" 2>/dev/null; then
    in_save=0
    ls -d "$work/run/checkpoint/"*.partial >/dev/null 2>&1 && in_save=1
    # SIGKILL every process of the attempt (the ranks, not only the launcher).
    pkill -KILL -f -- "--job.dump_folder $work/run" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    kills=$((kills + 1))
    save_kills=$((save_kills + in_save))
  else
    wait "$pid" || titan_die "faults: round $round failed; see $work/run.log"
    finished=1
    break
  fi
done
if [ "$finished" = 0 ]; then
  run "$work/run"
  wait "$pid" || titan_die "faults: the final resume failed; see $work/run.log"
fi
python3 - "$work/ref/metrics.jsonl" "$work/run/metrics.jsonl" "$kills" "$save_kills" <<'PYEOF'
import json, sys
def records(path):
    out = {}
    for line in open(path):
        j = json.loads(line)
        if "loss" in j:
            out[j["step"]] = (j["loss"], j["grad_norm"])
    return out
ref, run = records(sys.argv[1]), records(sys.argv[2])
kills, save_kills = int(sys.argv[3]), int(sys.argv[4])
missing = sorted(set(ref) - set(run))
diff = [s for s in ref if s in run and run[s] != ref[s]]
print(f"faults: {kills} kills ({save_kills} during a checkpoint save); {len(run)} of {len(ref)} "
      f"steps logged; {len(ref) - len(missing) - len(diff)} identical to the uninterrupted run, "
      f"{len(diff)} different, {len(missing)} missing")
sys.exit(1 if diff or missing else 0)
PYEOF
