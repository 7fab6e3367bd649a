#!/usr/bin/env bash
# On a GPU machine: builds with the README's build (scripts/build.sh: the installed PyTorch's
# LibTorch with CUDA, its NCCL and cuDNN, all cores; third_party/ where the machine has no
# packages), runs the GPU tests, short GPU training runs and the benchmarks; logs go to $OUT.
# Multi-GPU stages take every GPU; MG_CONFIG (default configs/llama3_8b.toml), MG_SEQ and NGPU
# let them dry-run on CPU (PYTHON standing in for torchrun, BUILD_DIR=build).
# Stages (default: build test train): build test train bench1b bench3b unit profile1b
# snapshot1b gdbtest nccl bw ddp1b parity2 bench8b fsdp3b profilefsdp offload titan3b ckpt8b
# ckpt1b ckptload oom8b tp2 tp asynctp budget3b smoke2 pp cp terapipe1 terapipe float8 float8loss float8fsdp earlystep profile3b float8gemm
# membench gemmbench gemmtune ratios readme hftok
#   scripts/device_check.sh build test train bench1b
# Needs a filled third_party/ (third_party/fetch.sh) where the machine has no package manager
# and, for benchmarks, .bench/ref_train.py.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib/common.sh
OUT="${OUT:-/tmp/titan_device_out}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(titan_torch_python || echo python3)}"
export BUILD_DIR="${BUILD_DIR:-build-gpu}"
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build test train)
titan_runtime_env

summary="$OUT/summary.txt"
note() { echo "$*" | tee -a "$summary"; }

# GPU clocks, power and throttle reasons every 0.5 s while a stage runs (GPU 0's when busy,
# i.e. above 40% utilization), summarized in one line: tells whether a slow figure came from a
# clock- or power-capped card. Stays quiet where nvidia-smi is missing.
gpu_sampler_start() {
  command -v nvidia-smi >/dev/null || return 0
  local reasons=clocks_event_reasons.active
  nvidia-smi --query-gpu=$reasons --format=csv,noheader >/dev/null 2>&1 ||
    reasons=clocks_throttle_reasons.active
  nvidia-smi --query-gpu=index,utilization.gpu,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,$reasons \
    --format=csv,noheader,nounits -lms 500 >"$OUT/$1.gpu.csv" 2>/dev/null &
  sampler_pid=$!
}
gpu_sampler_stop() {
  [ -n "${sampler_pid:-}" ] || return 0
  kill "$sampler_pid" 2>/dev/null
  wait "$sampler_pid" 2>/dev/null
  sampler_pid=
  awk -F', *' '$1 == 0 && $2 + 0 > 40 {
      n++; sm += $3; if (min == "" || $3 < min) min = $3; mem += $4; if ($5 > pw) pw = $5
      lim = $6; if ($7 > t) t = $7; r[$8]++ }
    END { if (!n) exit; line = ""; for (k in r) line = line " " k ":" r[k]
      printf "  gpu0 busy %d samples: SM %.0f MHz mean (min %d), memory %.0f MHz, power max %.0f of %.0f W, %d C max, reasons%s\n", n, sm / n, min, mem / n, pw, lim, t, line }' \
    "$OUT/$1.gpu.csv" | tee -a "$summary"
}

run_stage() {
  local name="$1"
  shift
  local t0=$SECONDS
  [ "$name" = build ] || gpu_sampler_start "$name"
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  gpu_sampler_stop "$name"
  note "[$name] rc=$rc in $((SECONDS - t0))s"
  return $rc
}

do_build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  ./scripts/build.sh
}

do_test() {
  (cd "$BUILD_DIR" && ctest -L gpu --output-on-failure --timeout 600)
}

do_unit() {
  (cd "$BUILD_DIR" && ctest -L unit --output-on-failure -j 8 --timeout 600)
}

do_train() {
  "$BUILD_DIR/titan_train" --job.config_file configs/debug_model.toml --training.steps 50 \
    --metrics.log_freq 10 --job.dump_folder "$OUT/train_debug" --metrics.disable_color_printing
}

do_profile1b() {
  "$BUILD_DIR/titan_train" --job.config_file configs/llama3_1b.toml --training.local_batch_size 4 \
    --training.seq_len 2048 --activation_checkpoint.mode none --training.steps 10 \
    --metrics.log_freq 5 --profiling.enable_profiling --profiling.profile_freq 10 \
    --profiling.profiler_active 2 --profiling.profiler_warmup 2 --training.use_cuda_graphs false \
    --job.dump_folder "$OUT/profile_1b" \
    --metrics.enable_tensorboard false --metrics.disable_color_printing &&
    "$PY" scripts/trace_summary.py "$OUT/profile_1b/profile_traces/iteration_10/rank0_trace.json" --steps 2
}

# Every parallelism over NCCL on 2 GPUs, debug model, 30 steps: loss against one GPU on the same
# global batch (bf16 noise): FSDP 2, TP 2 (sync, async), each pipeline schedule at pp 2, CP 2 (both
# rotate methods), FSDP 2 with float8 and the float8 all-gather, and TP 2 with float8 (float8
# against float8 on 1 GPU).
do_smoke2() {
  local tmp=/tmp/titan_smoke2
  rm -rf "$tmp" && mkdir -p "$tmp"
  local common=(--job.config_file configs/debug_model.toml --training.steps "${SMOKE_STEPS:-30}" --metrics.log_freq 1
    --training.local_batch_size 8 --metrics.disable_color_printing --metrics.enable_tensorboard false)
  local f8=(--model.converters float8 --quantize.linear.float8.filter_fqns output)
  CUDA_VISIBLE_DEVICES=0 "$BUILD_DIR/titan_train" "${common[@]}" \
    --job.dump_folder "$tmp/smoke_1gpu" >"$tmp/smoke_1gpu.log" 2>&1 || tail -5 "$tmp/smoke_1gpu.log"
  CUDA_VISIBLE_DEVICES=0 "$BUILD_DIR/titan_train" "${common[@]}" "${f8[@]}" \
    --job.dump_folder "$tmp/smoke_1gpu_f8" >"$tmp/smoke_1gpu_f8.log" 2>&1 ||
    tail -5 "$tmp/smoke_1gpu_f8.log"
  local name base extra
  for name in ${SMOKE_RUNS:-fsdp2 tp2 tp2_async pp2_GPipe pp2_1F1B pp2_Interleaved1F1B
    pp2_InterleavedZeroBubble pp2_ZBVZeroBubble pp2_TeraPipe cp2_allgather cp2_alltoall
    fsdp2_f8 fsdp2_f8_gather fsdp2_f8_gather_pre tp2_f8}; do
    base=smoke_1gpu
    case "$name" in
      fsdp2) extra=(--training.local_batch_size 4) ;;
      tp2) extra=(--parallelism.tensor_parallel_degree 2) ;;
      tp2_async) extra=(--parallelism.tensor_parallel_degree 2
        --parallelism.enable_async_tensor_parallel) ;;
      pp2_TeraPipe*) extra=(--parallelism.pipeline_parallel_degree 2
        --parallelism.pipeline_parallel_schedule TeraPipe
        --parallelism.pipeline_parallel_microbatch_size 1)
        [ "$name" = pp2_TeraPipeFixed ] &&
          extra+=(--parallelism.pipeline_parallel_token_slices 128,128)
        [ "$name" = pp2_TeraPipeFixed3 ] &&
          extra+=(--parallelism.pipeline_parallel_token_slices 64,64,128) ;;
      pp2_*) extra=(--parallelism.pipeline_parallel_degree 2
        --parallelism.pipeline_parallel_schedule "${name#pp2_}"
        --parallelism.pipeline_parallel_microbatch_size 1) ;;
      cp2_*) extra=(--parallelism.context_parallel_degree 2
        --parallelism.context_parallel_rotate_method "${name#cp2_}") ;;
      tp2_f8) base=smoke_1gpu_f8 extra=(--parallelism.tensor_parallel_degree 2 "${f8[@]}") ;;
      fsdp2_f8) base=smoke_1gpu_f8 extra=(--training.local_batch_size 4 "${f8[@]}") ;;
      fsdp2_f8_gather) base=smoke_1gpu_f8 extra=(--training.local_batch_size 4 "${f8[@]}"
        --quantize.linear.float8.enable_fsdp_float8_all_gather) ;;
      fsdp2_f8_gather_pre) base=smoke_1gpu_f8 extra=(--training.local_batch_size 4 "${f8[@]}"
        --quantize.linear.float8.enable_fsdp_float8_all_gather
        --quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp) ;;
    esac
    [ "$name" = fsdp2 ] || [ "${name#fsdp2_f8}" != "$name" ] ||
      extra+=(--parallelism.data_parallel_shard_degree 1)
    CUDA_VISIBLE_DEVICES=0,1 with_stacks 100 "$PY" -m torch.distributed.run --standalone \
      --nproc_per_node=2 --no-python "$BUILD_DIR/titan_train" "${common[@]}" "${extra[@]}" \
      --comm.init_timeout_seconds 60 --comm.train_timeout_seconds 40 \
      --job.dump_folder "$tmp/smoke_$name" >"$tmp/smoke_$name.log" 2>&1 || {
      echo "$name FAILED (whole log: $OUT/smoke_$name.log):"
      cp "$tmp/smoke_$name.log" "$OUT/"
      grep -vE "^\s*$|^\*+$|OMP_NUM_THREADS|socket|TCPStore" "$tmp/smoke_$name.log" |
        grep -vE "^#|^Thread|^== stacks" | cut -c1-300 | tail -30
      continue
    }
    compare_losses "bf16 $name vs 1 GPU" "$tmp/$base/metrics.jsonl" "$tmp/smoke_$name/metrics.jsonl"
  done
}

# with_stacks SECONDS CMD...: runs CMD; past SECONDS, prints (into CMD's output) every thread's
# stack of each titan_train process (cuda-gdb), then ends CMD (exit 124).
with_stacks() {
  local secs="$1"
  shift
  "$@" &
  local pid=$! waited=0
  while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$secs" ]; do
    sleep 1
    waited=$((waited + 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    local p
    for p in $(pgrep -x titan_train); do
      echo "== stacks of titan_train pid $p after ${secs}s"
      timeout 60 cuda-gdb -p "$p" -batch -ex "thread apply all bt 12" 2>&1 |
        grep -E "^#|^Thread|ptrace|attach|rror" | cut -c1-220 | head -80
      kill -CONT "$p" 2>/dev/null  # in case the debugger was stopped while attached
    done
    pkill -TERM -P "$pid" 2>/dev/null
    kill -TERM "$pid" 2>/dev/null
    wait "$pid"
    return 124
  fi
  wait "$pid"
}

# 3B at the bench settings (every 2nd block checkpointed), profiled: the breakdown, and which
# host code launches the copies and the generic elementwise kernels.
do_profile3b() {
  local trace="$OUT/profile_3b/profile_traces/iteration_10/rank0_trace.json"
  "$BUILD_DIR/titan_train" --job.config_file configs/llama3_3b.toml --training.local_batch_size 2 \
    --training.seq_len 4096 --activation_checkpoint.mode selective \
    --activation_checkpoint.selective_ac_option 2 --training.steps 10 \
    --metrics.log_freq 5 --profiling.enable_profiling --profiling.profile_freq 10 \
    --profiling.profiler_active 2 --profiling.profiler_warmup 2 --training.use_cuda_graphs false \
    --job.dump_folder "$OUT/profile_3b" ${TITAN_ARGS:-} \
    --metrics.enable_tensorboard false --metrics.disable_color_printing &&
    "$PY" scripts/trace_summary.py "$trace" --steps 2 --top 45 --who "copy|memcpy|CatArray" &&
    "$PY" scripts/trace_summary.py "$trace" --steps 2 --who "elementwise|reduce_kernel" | tail -26
}

do_snapshot1b() {
  "$BUILD_DIR/titan_train" --job.config_file configs/llama3_1b.toml --training.local_batch_size 4 \
    --training.seq_len 2048 --activation_checkpoint.mode none --training.steps 6 \
    --metrics.log_freq 3 --profiling.enable_memory_snapshot --profiling.profile_freq 6 \
    --job.dump_folder "$OUT/snapshot_1b" --metrics.enable_tensorboard false \
    --metrics.disable_color_printing &&
    "$PY" scripts/snapshot_summary.py \
      "$OUT/snapshot_1b/memory_snapshot/iteration_6/rank0_memory_snapshot.pickle"
}

# 3B (or MG_CONFIG, e.g. configs/llama3_8b.toml) FSDP over all GPUs, profiled (exposed
# communication) with a memory snapshot of rank 0.
do_profilefsdp() {
  local dump="$OUT/profile_fsdp"
  trun "$(ngpu)" "$BUILD_DIR/titan_train" --job.config_file "${MG_CONFIG:-configs/llama3_3b.toml}" \
    --training.local_batch_size 2 --training.seq_len 4096 --activation_checkpoint.mode none \
    --training.steps 8 --metrics.log_freq 4 --profiling.enable_profiling \
    --profiling.profile_freq 8 --profiling.profiler_active 2 --profiling.profiler_warmup 1 \
    --profiling.enable_memory_snapshot --job.dump_folder "$dump" \
    --metrics.enable_tensorboard false --metrics.disable_color_printing 2>&1 | grep -E "step:|error|rror"
  "$PY" scripts/trace_summary.py "$dump/profile_traces/iteration_8/rank0_trace.json" --steps 2
  "$PY" scripts/snapshot_summary.py "$dump/memory_snapshot/iteration_8/rank0_memory_snapshot.pickle"
}

# CPU offload (shards and optimizer state in pinned host memory) against the same FSDP run on
# the device: debug model, 2 GPUs, 20 steps; then (unless OFFLOAD_1B=0) the 1B flavor's speed.
do_offload() {
  local common=(--job.config_file configs/debug_model.toml --training.steps 20 --metrics.log_freq 1
    --metrics.disable_color_printing --metrics.enable_tensorboard false)
  CUDA_VISIBLE_DEVICES=0,1 trun 2 "$BUILD_DIR/titan_train" "${common[@]}" \
    --job.dump_folder "$OUT/offload_off" >/dev/null 2>&1 || echo "FSDP run failed"
  CUDA_VISIBLE_DEVICES=0,1 trun 2 "$BUILD_DIR/titan_train" "${common[@]}" \
    --training.enable_cpu_offload --job.dump_folder "$OUT/offload_on" 2>&1 | tail -3
  compare_losses "cpu offload vs on-device FSDP-2" "$OUT/offload_off/metrics.jsonl" \
    "$OUT/offload_on/metrics.jsonl"
  [ "${OFFLOAD_1B:-1}" = 1 ] || return 0
  OMP_NUM_THREADS=$(($(nproc) / 2)) CUDA_VISIBLE_DEVICES=0,1 trun 2 "$BUILD_DIR/titan_train" \
    --job.config_file configs/llama3_1b.toml \
    --training.local_batch_size 4 --training.seq_len 2048 --activation_checkpoint.mode none \
    --training.enable_cpu_offload --training.steps 4 --metrics.log_freq 2 \
    --job.dump_folder "$OUT/offload_1b" --metrics.enable_tensorboard false \
    --metrics.disable_color_printing 2>&1 | grep -E "step:|error|rror"
}

# configs/llama3_8b.toml on one GPU as a newcomer would run it: the start-up estimate warns,
# then the out-of-memory error says what ran out and what to change (no stack trace).
do_oom8b() {
  "$BUILD_DIR/titan_train" --job.config_file configs/llama3_8b.toml --training.steps 3 \
    --job.dump_folder "$OUT/oom8b" --metrics.disable_color_printing \
    --metrics.enable_tensorboard false 2>&1 | grep -vE "^\s*$" | tail -12
  echo "exit code: ${PIPESTATUS[0]}"
}

do_gdbtest() {
  cuda-gdb -batch -ex run -ex bt --args "$BUILD_DIR/tests/titan_gpu_tests" \
    --gtest_filter=GpuTraining.FusedKernelLossCurveMatchesUnfusedWithinBf16Noise 2>&1 | tail -60
}

# compare_losses LABEL A.jsonl B.jsonl: the largest relative loss difference of two runs.
compare_losses() {
  "$PY" - "$@" <<'PYEOF'
import json, sys
label, fa, fb = sys.argv[1:4]
def losses(path):  # step records (the run's start event has no loss)
    return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]
a, b = losses(fa), losses(fb)
rel = max(abs(x - y) / x for x, y in zip(a, b))
print(f"{label}, {len(a)} steps: loss {a[0]:.4f} -> {a[-1]:.4f} vs {b[-1]:.4f}; max relative difference {rel:.2e}")
PYEOF
}

# GPUs of the machine (NGPU overrides: CPU dry runs with Gloo ranks).
ngpu() { if [ -n "${NGPU:-}" ]; then echo "$NGPU"; else nvidia-smi -L | grep -c '^GPU'; fi; }
trun() {  # trun NPROC CMD...: torchrun-style launch of a binary
  local n="$1"
  shift
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$n" --no-python "$@"
}

do_nccl() {
  for n in 2 "$(ngpu)"; do
    echo "== NCCL collectives on $n GPUs"
    TITAN_DEVICE=cuda trun "$n" "$BUILD_DIR/tests/titan_dist_worker" collectives \
      --parallelism.data_parallel_replicate_degree 2 || return 1
  done
  echo "== NCCL collectives, 2 x 2 mesh with tp"
  TITAN_DEVICE=cuda trun "$(ngpu)" "$BUILD_DIR/tests/titan_dist_worker" collectives \
    --parallelism.tensor_parallel_degree 2 || return 1
  echo "== watchdog with NCCL: rank 1 skips a collective"
  TITAN_DEVICE=cuda CUDA_VISIBLE_DEVICES=0,1 trun 2 "$BUILD_DIR/tests/titan_dist_worker" hang \
    --comm.train_timeout_seconds 5 --job.dump_folder "$OUT/hang" 2>&1 | tee "$OUT/hang.log"
  echo "hang run: torchrun exit code ${PIPESTATUS[0]}; ranks' $(grep -o 'exitcode *: *-*[0-9]*' \
    "$OUT/hang.log" | tr -s ' ' | sort -u | tr '\n' ' ')(4: the watchdog ended that rank)"
}

do_bw() {
  echo "== titan all-gather / reduce-scatter bus bandwidth on $(ngpu) GPUs (GB/s)"
  TITAN_DEVICE=cuda trun "$(ngpu)" "$BUILD_DIR/tests/titan_dist_worker" bench | grep '^{'
  echo "== torch.distributed"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$(ngpu)" scripts/bench_comm.py | grep '^{'
}

do_ddp1b() {
  CUDA_VISIBLE_DEVICES=0,1 trun 2 "$BUILD_DIR/titan_train" --job.config_file configs/llama3_1b.toml \
    --parallelism.data_parallel_replicate_degree 2 --parallelism.data_parallel_shard_degree 1 \
    --training.local_batch_size 4 --training.seq_len 2048 --activation_checkpoint.mode none \
    --training.steps 20 --metrics.log_freq 10 --job.dump_folder "$OUT/ddp1b" \
    --metrics.enable_tensorboard false --metrics.disable_color_printing
}

do_parity2() {
  local common=(--job.config_file configs/debug_model.toml --training.steps 30 --metrics.log_freq 1
    --metrics.disable_color_printing)
  CUDA_VISIBLE_DEVICES=0 "$BUILD_DIR/titan_train" "${common[@]}" --training.local_batch_size 8 \
    --job.dump_folder "$OUT/parity_1gpu" >/dev/null 2>&1
  CUDA_VISIBLE_DEVICES=0,1 trun 2 "$BUILD_DIR/titan_train" "${common[@]}" \
    --training.local_batch_size 4 --job.dump_folder "$OUT/parity_fsdp2" >/dev/null 2>&1
  compare_losses "bf16 FSDP-2 vs 1 GPU" "$OUT/parity_1gpu/metrics.jsonl" \
    "$OUT/parity_fsdp2/metrics.jsonl"
}

do_titan3b() {
  CUDA_VISIBLE_DEVICES=0 "$BUILD_DIR/titan_train" --job.config_file configs/llama3_3b.toml \
    --training.local_batch_size 2 --training.seq_len 4096 --activation_checkpoint.mode selective \
    --activation_checkpoint.selective_ac_option 2 --training.steps 20 --metrics.log_freq 10 \
    --job.dump_folder "$OUT/titan3b" --metrics.enable_tensorboard false --metrics.disable_color_printing
  "$PY" -c "import json;rs=[json.loads(l) for l in open('$OUT/titan3b/metrics.jsonl') if '\"tps\"' in l];r=rs[-1];print('3B titan: tps', round(r['tps']), 'mfu', round(r['mfu'],2), 'allocated GiB', round(max(x['max_active_memory_gib'] for x in rs),1))"
}

# Checkpoint I/O (dump folder on tmpfs): synchronous saves at steps 3 and 6, then a resume and
# asynchronous saves (pinned memory) at steps 9 and 12 (the second reuses the pinned buffers).
# ckpt_io NPROC LABEL CONFIG BATCH SEQ;
# CKPT_ARGS: more titan_train arguments.
ckpt_io() {
  local n="$1" label="$2" dump=/dev/shm/titan_ckpt common launch
  rm -rf "$dump"
  common=(--job.config_file "$3" --training.local_batch_size "$4"
    --training.seq_len "$5" --activation_checkpoint.mode none --metrics.log_freq 3
    --checkpoint.enable --checkpoint.interval 3 --checkpoint.last_save_model_only false
    --checkpoint.keep_latest_k 1 --job.dump_folder "$dump" --metrics.enable_tensorboard false
    --metrics.disable_color_printing ${CKPT_ARGS:-})
  launch=("$BUILD_DIR/titan_train")
  [ "$n" -gt 1 ] && launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$n"
    --no-python "$BUILD_DIR/titan_train")
  echo "== $label: synchronous saves at steps 3 and 6 ($BUILD_DIR)"
  "${launch[@]}" "${common[@]}" --training.steps 6 2>&1 | grep -E "checkpoint|step:|error"
  echo "== resume from step 6, asynchronous saves (pinned memory) at steps 9 and 12"
  "${launch[@]}" "${common[@]}" --training.steps 12 \
    --checkpoint.async_mode async_with_pinned_mem 2>&1 | grep -E "checkpoint|resum|step:|error"
  du -sh "$dump"/checkpoint/* 2>/dev/null
  rm -rf "$dump"
}
do_ckpt8b() { ckpt_io "$(ngpu)" "8B FSDP-$(ngpu)" configs/llama3_8b.toml 2 4096; }
# 1B on one GPU: 16.7 GiB per save with the AdamW moments.
do_ckpt1b() { ckpt_io 1 "1B, one GPU" configs/llama3_1b.toml 4 2048; }
# Checkpoint load thread scaling, 1B on one GPU: one save, then loads with 1 and 16 reader threads
# (the log's "loaded ... reading" line), with page faults counted by perf where it exists.
do_ckptload() {
  local dump=/dev/shm/titan_ckptload common threads
  rm -rf "$dump"
  common=(--job.config_file configs/llama3_1b.toml --training.local_batch_size 2
    --training.seq_len 2048 --activation_checkpoint.mode none --metrics.log_freq 1
    --checkpoint.enable --checkpoint.interval 1 --checkpoint.last_save_model_only false
    --job.dump_folder "$dump" --metrics.enable_tensorboard false --metrics.disable_color_printing)
  echo "== transparent huge pages: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
  echo "== save at step 1"
  "$BUILD_DIR/titan_train" "${common[@]}" --training.steps 1 2>&1 | grep -E "checkpoint|error"
  for threads in 1 4 16; do
    echo "== load with OMP_NUM_THREADS=$threads"
    if command -v perf >/dev/null; then
      OMP_NUM_THREADS=$threads perf stat -e page-faults,task-clock -o "$OUT/perf_load_$threads.txt" \
        "$BUILD_DIR/titan_train" "${common[@]}" --training.steps 2 --checkpoint.interval 100 \
        2>&1 | grep -E "checkpoint|resum|error"
      grep -E "page-faults|task-clock|elapsed" "$OUT/perf_load_$threads.txt"
    elif [ -x /usr/bin/time ]; then
      OMP_NUM_THREADS=$threads /usr/bin/time -v "$BUILD_DIR/titan_train" "${common[@]}" \
        --training.steps 2 --checkpoint.interval 100 2>&1 |
        grep -E "checkpoint|resum|error|page faults|Elapsed|Percent of CPU"
    else
      OMP_NUM_THREADS=$threads "$BUILD_DIR/titan_train" "${common[@]}" --training.steps 2 \
        --checkpoint.interval 100 2>&1 | grep -E "checkpoint|resum|error"
    fi
  done
  rm -rf "$dump"
}

# Tensor parallel over NCCL on 2 GPUs: bf16 loss parity of tp 2 (sync, async, gathered logits)
# with one GPU on the debug model; then 8B on 2 GPUs, FSDP 2 against tp 2 and async tp 2 at the
# same tokens per GPU (full activation checkpointing), the async run profiled (exposed
# communication).
do_tp2() {
  local common=(--job.config_file configs/debug_model.toml --training.steps 30 --metrics.log_freq 1
    --metrics.disable_color_printing --metrics.enable_tensorboard false)
  CUDA_VISIBLE_DEVICES=0 "$BUILD_DIR/titan_train" "${common[@]}" --training.local_batch_size 8 \
    --job.dump_folder "$OUT/tp_1gpu" >/dev/null 2>&1 || echo "1-GPU run failed"
  local name extra
  for name in tp2 tp2_async tp2_gathered; do
    case "$name" in
      tp2) extra=() ;;
      tp2_async) extra=(--parallelism.enable_async_tensor_parallel) ;;
      tp2_gathered) extra=(--parallelism.disable_loss_parallel) ;;
    esac
    CUDA_VISIBLE_DEVICES=0,1 trun 2 "$BUILD_DIR/titan_train" "${common[@]}" \
      --training.local_batch_size 8 --parallelism.tensor_parallel_degree 2 \
      --parallelism.data_parallel_shard_degree 1 "${extra[@]}" \
      --job.dump_folder "$OUT/$name" >"$OUT/$name.log" 2>&1 || tail -20 "$OUT/$name.log"
    compare_losses "bf16 $name vs 1 GPU" "$OUT/tp_1gpu/metrics.jsonl" "$OUT/$name/metrics.jsonl"
  done
  local big=(--job.config_file configs/llama3_8b.toml --training.seq_len 4096
    --activation_checkpoint.mode full --training.steps "${TP_STEPS:-15}" --metrics.log_freq 5
    --metrics.enable_tensorboard false --metrics.disable_color_printing)
  for name in fsdp2_8b tp2_8b tp2_async_8b; do
    case "$name" in
      fsdp2_8b) extra=(--training.local_batch_size 2) ;;
      tp2_8b) extra=(--training.local_batch_size 4 --parallelism.tensor_parallel_degree 2
        --parallelism.data_parallel_shard_degree 1) ;;
      tp2_async_8b) extra=(--training.local_batch_size 4 --parallelism.tensor_parallel_degree 2
        --parallelism.data_parallel_shard_degree 1 --parallelism.enable_async_tensor_parallel
        --profiling.enable_profiling --profiling.profile_freq 10 --profiling.profiler_active 2
        --profiling.profiler_warmup 1) ;;
    esac
    CUDA_VISIBLE_DEVICES=0,1 trun 2 "$BUILD_DIR/titan_train" "${big[@]}" "${extra[@]}" \
      --job.dump_folder "$OUT/$name" >"$OUT/$name.log" 2>&1 || tail -20 "$OUT/$name.log"
    run_figures "$name"
  done
  "$PY" scripts/trace_summary.py "$OUT/tp2_async_8b/profile_traces/iteration_10/rank0_trace.json" \
    --steps 2 | tail -25
}

# Tensor parallel over NCCL on every GPU (n, 4 or more): 8B (MG_CONFIG), seq 4096, full AC,
# TP_STEPS (default 30) steps: FSDP n against FSDP n/2 x TP 2, synchronous and async, on the
# same global batch (loss parity in bf16 noise, TPS/GPU, memory); the async run profiled
# (exposed TP communication).
do_tp() {
  local n steps="${TP_STEPS:-30}"
  n="$(ngpu)"
  local big=(--job.config_file "${MG_CONFIG:-configs/llama3_8b.toml}" --training.seq_len
    "${MG_SEQ:-4096}" --activation_checkpoint.mode full --training.steps "$steps"
    --metrics.log_freq 1)
  mg_run "tp_fsdp$n" "$n" "${big[@]}" --training.local_batch_size 2 || return 1
  local name extra rc=0
  for name in "fsdp$((n / 2))_tp2" "fsdp$((n / 2))_tp2_async"; do
    extra=(--training.local_batch_size 4 --parallelism.tensor_parallel_degree 2)
    # The async run profiles the two steps before the last (the last step's TPS stays clean).
    [ "${name%_async}" != "$name" ] && extra+=(--parallelism.enable_async_tensor_parallel
      --profiling.enable_profiling --profiling.profile_freq $((steps - 1))
      --profiling.profiler_active 2 --profiling.profiler_warmup 1)
    { mg_run "$name" "$n" "${big[@]}" "${extra[@]}" &&
      compare_losses "bf16 $name vs FSDP $n" "$OUT/tp_fsdp$n/metrics.jsonl" \
        "$OUT/$name/metrics.jsonl"; } || rc=1
  done
  local trace="$OUT/fsdp$((n / 2))_tp2_async/profile_traces/iteration_$((steps - 1))/rank0_trace.json"
  [ -f "$trace" ] && "$PY" scripts/trace_summary.py "$trace" --steps 2 | head -12
  return $rc
}

# Async-TP micro-benchmark on all GPUs: titan's plain and ring (async) all-gather + matmul and
# matmul + reduce-scatter against PyTorch's plain and symmetric-memory fused ops, 8B FFN shapes.
do_asynctp() {
  echo "== titan (titan_dist_worker tpbench) on $(ngpu) GPUs"
  TITAN_DEVICE=cuda trun "$(ngpu)" "$BUILD_DIR/tests/titan_dist_worker" tpbench | grep '^{'
  echo "== torch (scripts/bench_async_tp.py)"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$(ngpu)" \
    scripts/bench_async_tp.py 2>&1 | grep -E '^\{|Error' | tail -3
}

# 3B, local batch 2, seq 4096 on one GPU: activation_checkpoint.mode = memory_budget at budgets
# 0, 0.25, 0.5 and 1 next to every 2nd block checkpointed (the benchmark's policy): TPS, MFU,
# peak allocated memory, and the choice each budget made.
do_budget3b() {
  local name
  for name in every2 b0 b0.25 b0.5 b1; do
    local extra=(--activation_checkpoint.mode memory_budget --activation_checkpoint.memory_budget
      "${name#b}")
    [ "$name" = every2 ] && extra=(--activation_checkpoint.mode selective
      --activation_checkpoint.selective_ac_option 2)
    "$BUILD_DIR/titan_train" --job.config_file configs/llama3_3b.toml --training.local_batch_size 2 \
      --training.seq_len 4096 "${extra[@]}" --training.steps "${BUDGET_STEPS:-20}" \
      --metrics.log_freq 10 --job.dump_folder "$OUT/budget3b_$name" \
      --metrics.enable_tensorboard false --metrics.disable_color_printing >"$OUT/budget3b_$name.log" 2>&1
    grep -o "memory budget.*" "$OUT/budget3b_$name.log" | head -1
    "$PY" -c "import json;rs=[json.loads(l) for l in open('$OUT/budget3b_$name/metrics.jsonl') if '\"tps\"' in l];r=rs[-1];print('3B $name: tps', round(r['tps']), 'mfu', round(r['mfu'],2), 'allocated GiB', round(max(x['max_active_memory_gib'] for x in rs),1))" || tail -5 "$OUT/budget3b_$name.log"
  done
}

# run_figures NAME: TPS/GPU, MFU, peak allocated/reserved memory and loss of the last logged step
# of the run in $OUT/NAME (CPU dry runs log no MFU or device memory: zeros).
run_figures() {
  "$PY" -c "import json;rs=[json.loads(l) for l in open('$OUT/$1/metrics.jsonl') if '\"tps\"' in l];r=rs[-1];f=lambda k,d: round(r.get(k) or 0,d);m=lambda k: round(max(x.get(k) or 0 for x in rs),1);print('$1: tps/gpu', int(f('tps',0)), 'mfu', f('mfu',2), 'allocated GiB', m('max_active_memory_gib'), 'reserved GiB', m('max_memory_gib'), 'loss', f('loss',4))"
}

# One multi-GPU training run: NAME, number of GPUs, then titan_train arguments; prints TPS/GPU,
# MFU, peak allocated/reserved memory and the last loss (issue 18's figures).
mg_run() {
  local name="$1" n="$2"
  shift 2
  trun "$n" "$BUILD_DIR/titan_train" "$@" --job.dump_folder "$OUT/$name" \
    --metrics.enable_tensorboard false --metrics.disable_color_printing >"$OUT/$name.log" 2>&1 ||
    { tail -8 "$OUT/$name.log"; return 1; }
  run_figures "$name"
}

# Pipeline parallel over NCCL on every GPU (n): 8B, seq 4096, full AC, every schedule at
# PP_MICROBATCHES (default 8) microbatches of one sequence against FSDP n on the same global batch
# (loss parity in bf16 noise, TPS/GPU, memory); every schedule's last step profiled on every rank:
# the bubble measured from the traces (scripts/pipeline_bubble.py) beside the simulator's (full
# AC: forward 1, input gradient 2 with the recompute, weight gradient 1). PP_ARGS: more flags
# for the pipeline runs (e.g. --parallelism.pipeline_parallel_last_stage_less_layers 4).
do_pp() {
  local n mbs="${PP_MICROBATCHES:-8}" steps="${PP_STEPS:-10}"
  n="$(ngpu)"
  [ $((mbs % n)) = 0 ] || { echo "PP_MICROBATCHES=$mbs is not a multiple of $n GPUs"; return 1; }
  local big=(--job.config_file "${MG_CONFIG:-configs/llama3_8b.toml}" --training.seq_len
    "${MG_SEQ:-4096}" --activation_checkpoint.mode full --training.steps "$steps"
    --metrics.log_freq 1)
  mg_run "pp_fsdp${n}_$mbs" "$n" "${big[@]}" --training.local_batch_size $((mbs / n)) || return 1
  local schedule name rc=0
  for schedule in ${PP_SCHEDULES:-GPipe 1F1B Interleaved1F1B InterleavedZeroBubble ZBVZeroBubble}; do
    name="pp${n}_${schedule}_$mbs"
    # The step before the last is profiled (the last step's TPS stays clean).
    { mg_run "$name" "$n" "${big[@]}" --training.local_batch_size "$mbs" \
      --parallelism.pipeline_parallel_degree "$n" --parallelism.data_parallel_shard_degree 1 \
      --parallelism.pipeline_parallel_schedule "$schedule" \
      --parallelism.pipeline_parallel_microbatch_size 1 ${PP_ARGS:-} --profiling.enable_profiling \
      --profiling.profile_freq $((steps - 1)) --profiling.profiler_active 1 \
      --profiling.profiler_warmup 1 &&
      compare_losses "bf16 pp$n $schedule vs FSDP $n" "$OUT/pp_fsdp${n}_$mbs/metrics.jsonl" \
        "$OUT/$name/metrics.jsonl"; } || rc=1
    "$PY" scripts/pipeline_bubble.py "$OUT/$name/profile_traces/iteration_$((steps - 1))" "$n" \
      >"$OUT/$name/bubble.txt" 2>&1
    grep -E "^measured|^warning|^no " "$OUT/$name/bubble.txt"
    echo "predicted: $("$BUILD_DIR/titan_train" schedule --pp "$n" --microbatches "$mbs" \
      --schedule "$schedule" --forward 1 --backward_input 2 --backward_weight 1 | grep '^bubble')"
  done
  return $rc
}

# Context parallel over NCCL on every GPU (n): 8B with full AC; FSDP n at 32k against CP n (both
# rotate methods) and, with 4 GPUs or more, FSDP n/2 x CP 2, at the same global batch (loss
# parity); then CP n at 64k (unless CP_LONG=0). CP_SEQ (default 32768) sets the shorter length.
do_cp() {
  local n steps="${CP_STEPS:-6}" seq="${CP_SEQ:-32768}"
  n="$(ngpu)"
  local k="$seq" k2="$((2 * seq))"  # run names: 32k, 64k (tokens below 1024: as they are)
  [ "$seq" -ge 1024 ] && k="$((seq / 1024))k" k2="$((seq / 512))k"
  local big=(--job.config_file "${MG_CONFIG:-configs/llama3_8b.toml}" --activation_checkpoint.mode full
    --training.steps "$steps" --metrics.log_freq 1)
  mg_run "cp_fsdp${n}_$k" "$n" "${big[@]}" --training.seq_len "$seq" --training.local_batch_size 1 ||
    return 1
  local rotate rc=0
  for rotate in ${CP_ROTATE:-allgather alltoall}; do
    if [ "$n" -ge 4 ]; then
      { mg_run "fsdp$((n / 2))_cp2_${k}_$rotate" "$n" "${big[@]}" \
        --training.seq_len "$seq" --training.local_batch_size 2 \
        --parallelism.context_parallel_degree 2 \
        --parallelism.context_parallel_rotate_method "$rotate" &&
        compare_losses "bf16 FSDP $((n / 2)) x CP 2 ($rotate) vs FSDP $n at $k" \
          "$OUT/cp_fsdp${n}_$k/metrics.jsonl" \
          "$OUT/fsdp$((n / 2))_cp2_${k}_$rotate/metrics.jsonl"; } || rc=1
    fi
    { mg_run "cp${n}_${k}_$rotate" "$n" "${big[@]}" --training.seq_len "$seq" \
      --training.local_batch_size "$n" --parallelism.context_parallel_degree "$n" \
      --parallelism.data_parallel_shard_degree 1 \
      --parallelism.context_parallel_rotate_method "$rotate" &&
      compare_losses "bf16 CP $n ($rotate) vs FSDP $n at $k" "$OUT/cp_fsdp${n}_$k/metrics.jsonl" \
        "$OUT/cp${n}_${k}_$rotate/metrics.jsonl"; } || rc=1
  done
  [ "${CP_LONG:-1}" = 1 ] || return $rc
  mg_run "cp${n}_$k2" "$n" "${big[@]}" --training.seq_len $((2 * seq)) --training.local_batch_size 1 \
    --parallelism.context_parallel_degree "$n" --parallelism.data_parallel_shard_degree 1 || rc=1
  return $rc
}

# TeraPipe on one GPU: one 8B block's forward + backward timed per token slice on this GPU (as
# token_slices = "auto" does at start-up), the dynamic program's slicing, and the simulated
# step of pp 4 with one or two long sequences, 1F1B against TeraPipe.
do_terapipe1() {
  local seq mbs schedule
  for seq in 8192 32768; do
    for mbs in 1 2; do
      for schedule in 1F1B TeraPipe; do
        echo "== 8B, pp 4, $mbs microbatch(es) of $seq tokens, $schedule (measured slice times)"
        "$BUILD_DIR/titan_train" schedule --pp 4 --microbatches "$mbs" --schedule "$schedule" \
          --seq-len "$seq" --flavor 8B --measure | grep -vE "^rank|^measured"
      done
    done
  done
}

# TeraPipe over NCCL on every GPU (n): 8B pp n, one sequence of TERAPIPE_SEQ (default 16384)
# tokens per step, full AC: 1F1B against TeraPipe with the automatic slicing (its predicted step
# time is in the log) and loss parity.
do_terapipe() {
  local n seq="${TERAPIPE_SEQ:-16384}" steps="${TERAPIPE_STEPS:-8}"
  n="$(ngpu)"
  local big=(--job.config_file "${MG_CONFIG:-configs/llama3_8b.toml}" --training.seq_len "$seq"
    --activation_checkpoint.mode full --training.steps "$steps" --metrics.log_freq 1
    --training.local_batch_size 1 --parallelism.pipeline_parallel_degree "$n"
    --parallelism.data_parallel_shard_degree 1 --parallelism.pipeline_parallel_microbatch_size 1)
  mg_run "pp${n}_1F1B_$seq" "$n" "${big[@]}" --parallelism.pipeline_parallel_schedule 1F1B
  mg_run "pp${n}_TeraPipe_$seq" "$n" "${big[@]}" --parallelism.pipeline_parallel_schedule TeraPipe &&
    compare_losses "bf16 pp$n TeraPipe vs 1F1B at $seq" "$OUT/pp${n}_1F1B_$seq/metrics.jsonl" \
      "$OUT/pp${n}_TeraPipe_$seq/metrics.jsonl"
  grep -h "TeraPipe:" "$OUT/pp${n}_TeraPipe_$seq.log" | cut -c1-400
}

# Float8 on one GPU (scripts/bench.sh float8 scenarios, reference compiled): FLOAT8_SIZES (default
# "3b 1b") with FLOAT8_RECIPES (default "tensorwise rowwise"), each next to the reference with the
# same recipe, and titan bf16 at the same settings.
do_float8() {
  local size recipe
  for size in ${FLOAT8_SIZES:-3b 1b}; do
    for recipe in ${FLOAT8_RECIPES:-tensorwise rowwise}; do
      local ref_compile=1
      [ "$recipe" = rowwise ] && [ "${FLOAT8_REF_ROWWISE:-1}" = 0 ] && ref_compile=
      echo "== $size float8 $recipe"
      FLOAT8_RECIPE="$recipe" REF_COMPILE="$ref_compile" scripts/bench.sh "$size-fp8" | tail -3
    done
    echo "== $size titan bf16"
    REF_COMPILE= scripts/bench.sh "$size" | tail -1
  done
}

# Float8 numerics on one GPU: 1B, 300 steps on the built-in corpus, bf16 against float8
# tensorwise and rowwise; the mean loss of the last 50 steps of each.
do_float8loss() {
  local name extra
  for name in bf16 tensorwise rowwise; do
    extra=()
    [ "$name" != bf16 ] && extra=(--model.converters float8 --quantize.linear.float8.recipe_name "$name")
    "$BUILD_DIR/titan_train" --job.config_file configs/llama3_1b.toml --training.local_batch_size 4 \
      --training.seq_len 2048 --training.steps "${FLOAT8_LOSS_STEPS:-300}" --metrics.log_freq 1 \
      --job.dump_folder "$OUT/f8loss_$name" --metrics.enable_tensorboard false \
      --metrics.disable_color_printing "${extra[@]}" >"$OUT/f8loss_$name.log" 2>&1 ||
      tail -5 "$OUT/f8loss_$name.log"
    "$PY" -c "import json;r=[json.loads(l) for l in open('$OUT/f8loss_$name/metrics.jsonl') if '\"loss\"' in l];print('1B $name: last-50 mean loss', round(sum(x['loss'] for x in r[-50:])/50,4), 'tps', round(r[-1]['tps']))"
  done
}

# Float8 under FSDP over every GPU (8B, scripts/bench.sh 8b-fp8): tensorwise next to the compiled
# reference, then with the float8 all-gather (per-unit scales, and precomputed), and titan bf16.
do_float8fsdp() {
  local gather=--quantize.linear.float8.enable_fsdp_float8_all_gather
  local pre=--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp
  echo "== 8B FSDP float8 tensorwise, bf16 all-gather"
  FLOAT8_RECIPE=tensorwise REF_COMPILE=1 scripts/bench.sh 8b-fp8 | tail -2
  echo "== 8B FSDP float8 tensorwise, float8 all-gather"
  FLOAT8_RECIPE=tensorwise REF_COMPILE= TITAN_ARGS="$gather" scripts/bench.sh 8b-fp8 | tail -1
  echo "== 8B FSDP float8 tensorwise, float8 all-gather, precomputed scales"
  FLOAT8_RECIPE=tensorwise REF_COMPILE= TITAN_ARGS="$gather $pre" scripts/bench.sh 8b-fp8 | tail -1
  echo "== 8B FSDP titan bf16"
  REF_COMPILE= scripts/bench.sh 8b | tail -1
}

# optimizer.early_step_in_backward on one GPU (titan only, no clipping in both runs): 3B with
# every 2nd block checkpointed and 1B without checkpointing (scripts/bench.sh settings).
do_earlystep() {
  local size
  for size in ${EARLY_SIZES:-3b 1b}; do
    echo "== $size step after the backward"
    REF_COMPILE= TITAN_ARGS="--training.max_norm 0" scripts/bench.sh "$size" | tail -1
    echo "== $size early_step_in_backward"
    REF_COMPILE= TITAN_ARGS="--training.max_norm 0 --optimizer.early_step_in_backward" \
      scripts/bench.sh "$size" | tail -1
  done
}

# torchtitan's test tokenizer: titan's ids against Hugging Face's library with torchtitan's
# special-token handling (the GPU machine's Python has `tokenizers`; needs titan_tokenize built).
do_hftok() {
  "$PY" scripts/hf_tokenizer_check.py tests/data/torchtitan/v0.2.2/tokenizer \
    "$BUILD_DIR/titan_tokenize" "$OUT/hftok"
}

# The single-GPU ratios of the float8 and activation-checkpointing issues in one call, each
# beside the compiled reference: 3B every 2nd block checkpointed in float8 tensorwise and bf16,
# titan's memory_budget (RATIO_BUDGET, default 0.45) against the reference's every 2nd block, and
# 1B without checkpointing in bf16 and float8 tensorwise (RATIO_1B, default "1b 1b-fp8").
do_ratios() {
  local s
  for s in 3b-fp8 3b; do
    echo "== $s"
    REF_COMPILE=1 OUT="$OUT/ratios" scripts/bench.sh "$s" | tail -2
  done
  echo "== 3b memory_budget ${RATIO_BUDGET:-0.45} (titan only; the reference is the 3b row's)"
  REF_COMPILE= OUT="$OUT/ratios_budget" TITAN_ARGS="--activation_checkpoint.mode memory_budget \
    --activation_checkpoint.memory_budget ${RATIO_BUDGET:-0.45}" scripts/bench.sh 3b | tail -1
  for s in ${RATIO_1B:-1b 1b-fp8}; do
    echo "== $s"
    REF_COMPILE=1 OUT="$OUT/ratios" scripts/bench.sh "$s" | tail -2
  done
}

# Tuned GEMMs against cuBLAS's own pick (TITAN_GEMM_TUNING 1 / 0), alternating, twice each.
do_gemmtune() {
  local size t
  for size in ${GEMMTUNE_SIZES:-1b 3b}; do
    for t in 0 1 0 1; do
      echo "== $size TITAN_GEMM_TUNING=$t"
      TITAN_GEMM_TUNING=$t REF_COMPILE= TITAN_ARGS="--metrics.enable_tensorboard false" \
        OUT="$OUT/gemmtune_${size}_$t" scripts/bench.sh "$size" | tail -1
    done
  done
}

for s in "${stages[@]}"; do
  case "$s" in
    build) run_stage build do_build || { tail -50 "$OUT/build.log"; exit 1; } ;;
    test) run_stage gpu_tests do_test; tail -30 "$OUT/gpu_tests.log" ;;
    unit) run_stage unit_tests do_unit; tail -15 "$OUT/unit_tests.log" ;;
    train) run_stage train_debug do_train; grep -E "step:|error" "$OUT/train_debug.log" | tail -8 ;;
    bench1b) run_stage bench_1b scripts/bench.sh 1b; tail -6 "$OUT/bench_1b.log" ;;
    bench3b) run_stage bench_3b scripts/bench.sh 3b; tail -6 "$OUT/bench_3b.log" ;;
    profile1b) run_stage profile_1b do_profile1b; tail -28 "$OUT/profile_1b.log" ;;
    profile3b) run_stage profile_3b do_profile3b; tail -110 "$OUT/profile_3b.log" | cut -c1-260 ;;
    gdbtest) run_stage gdbtest do_gdbtest; tail -40 "$OUT/gdbtest.log" ;;
    snapshot1b) run_stage snapshot_1b do_snapshot1b; tail -14 "$OUT/snapshot_1b.log" ;;
    fsdp3b) REF_COMPILE="${REF_COMPILE:-0}" run_stage bench_fsdp3b scripts/bench.sh fsdp3b
      tail -4 "$OUT/bench_fsdp3b.log" ;;
    profilefsdp) run_stage profile_fsdp do_profilefsdp; tail -40 "$OUT/profile_fsdp.log" ;;
    offload) run_stage offload do_offload; tail -8 "$OUT/offload.log" ;;
    nccl) run_stage nccl do_nccl; grep -E "==|OK|error|exit code" "$OUT/nccl.log" | tail -20 ;;
    bw) run_stage bw do_bw; cat "$OUT/bw.log" ;;
    ddp1b) run_stage ddp1b do_ddp1b; grep -E "step:|launch|error" "$OUT/ddp1b.log" | tail -4 ;;
    parity2) run_stage parity2 do_parity2; tail -2 "$OUT/parity2.log" ;;
    bench8b) REF_COMPILE="${REF_COMPILE:-0 1}" run_stage bench_8b scripts/bench.sh 8b; tail -5 "$OUT/bench_8b.log" ;;
    titan3b) run_stage titan_3b do_titan3b; grep -E "step:|error" "$OUT/titan_3b.log" | tail -2 ;;
    ckpt8b) run_stage ckpt8b do_ckpt8b; cat "$OUT/ckpt8b.log" | cut -c1-220 ;;
    oom8b) run_stage oom8b do_oom8b; cut -c1-400 "$OUT/oom8b.log" ;;
    tp2) run_stage tp2 do_tp2; cat "$OUT/tp2.log" | cut -c1-200 ;;
    tp) run_stage tp do_tp; cat "$OUT/tp.log" | cut -c1-300 ;;
    asynctp) run_stage asynctp do_asynctp; cat "$OUT/asynctp.log" ;;
    budget3b) run_stage budget3b do_budget3b; cat "$OUT/budget3b.log" | cut -c1-300 ;;
    pp | pp4) run_stage pp do_pp; cat "$OUT/pp.log" | cut -c1-300 ;;
    cp | cp4) run_stage cp do_cp; cat "$OUT/cp.log" | cut -c1-300 ;;
    smoke2) run_stage smoke2 do_smoke2; cat "$OUT/smoke2.log" | cut -c1-300 ;;
    float8) run_stage float8 do_float8; cat "$OUT/float8.log" | cut -c1-300 ;;
    float8loss) run_stage float8loss do_float8loss; cat "$OUT/float8loss.log" ;;
    float8fsdp) run_stage float8fsdp do_float8fsdp; cat "$OUT/float8fsdp.log" | cut -c1-300 ;;
    membench) run_stage membench bash -c "nvcc -O3 -std=c++17 -arch=sm_90a scripts/membench.cu \
      src/kernels/adamw.cu src/kernels/float8.cu -o '$BUILD_DIR/titan_membench' &&
      '$BUILD_DIR/titan_membench'"; cat "$OUT/membench.log" ;;
    gemmbench) run_stage gemmbench bash -c "nvcc -O3 -std=c++17 -arch=sm_90a scripts/gemmbench.cu \
      -lcublasLt -lcublas -o '$BUILD_DIR/titan_gemmbench' && '$BUILD_DIR/titan_gemmbench'"
      cat "$OUT/gemmbench.log" ;;
    float8gemm) run_stage float8gemm bash -c "'$BUILD_DIR/titan_bench_float8' --tokens 8192 &&
      '$BUILD_DIR/titan_bench_float8' --tokens 16384"; cat "$OUT/float8gemm.log" ;;
    gemmtune) run_stage gemmtune do_gemmtune; cat "$OUT/gemmtune.log" ;;
    ckpt1b) run_stage ckpt1b do_ckpt1b; cat "$OUT/ckpt1b.log" ;;
    ckptload) run_stage ckptload do_ckptload; cat "$OUT/ckptload.log" | cut -c1-300 ;;
    ratios) run_stage ratios do_ratios; grep -E "^==|titan/ref|^titan:" "$OUT/ratios.log" ;;
    hftok) run_stage hftok do_hftok; cat "$OUT/hftok.log" ;;
    earlystep) run_stage earlystep do_earlystep; cat "$OUT/earlystep.log" | cut -c1-300 ;;
    terapipe1) run_stage terapipe1 do_terapipe1; cat "$OUT/terapipe1.log" | cut -c1-400 ;;
    terapipe | terapipe4) run_stage terapipe do_terapipe; cat "$OUT/terapipe.log" | cut -c1-400 ;;
    *) note "unknown stage $s" ;;
  esac
done
cat "$summary"
