#!/usr/bin/env bash
# Side-by-side benchmark on the current GPU machine: titan_train and the reference PyTorch
# trainer (../shared/bench/ref_train.py, or .bench/ref_train.py) with identical settings;
# prints both and the ratios. Scenarios:
#   1b: Llama 3 1B, 1 GPU, local batch 4, seq 2048, no activation checkpointing
#   3b: Llama 3 3B, 1 GPU, local batch 2, seq 4096, every 2nd block checkpointed
#   8b: Llama 3 8B, FSDP over all GPUs, local batch 2, seq 4096
#   fsdp3b: Llama 3 3B, FSDP over all GPUs, local batch 2, seq 4096, no activation checkpointing
#   1b-fp8, 3b-fp8, 8b-fp8: the same in float8 (both trainers: block linears' GEMMs in float8,
#   dynamic scales, output in bf16); FLOAT8_RECIPE=tensorwise (default) or rowwise.
# REF_COMPILE="0 1" (default; empty: titan only) picks the reference runs by torch.compile; BUILD_DIR the titan build.
# The reference takes the caller's allocator setting (on the device machines PyTorch's default);
# REF_ALLOC_CONF sets PYTORCH_CUDA_ALLOC_CONF for it. On an H100 (2026-12-07) the default was
# faster than torchtitan's launcher setting, expandable_segments:True: 3B float8 19,402 vs
# 16,583 TPS, 3B bf16 16,111-16,144 vs 15,477.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scenario="${1:-1b}"
BUILD_DIR="${BUILD_DIR:-build-gpu}"
OUT="${OUT:-/tmp/titan_bench}"
PY="${PYTHON:-python3}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ref=".bench/ref_train.py"
[ -f "$ref" ] || ref="../shared/bench/ref_train.py"
ngpu="$(nvidia-smi -L | wc -l)"
float8=none
if [ "${scenario%-fp8}" != "$scenario" ]; then
  float8="${FLOAT8_RECIPE:-tensorwise}"
  scenario="${scenario%-fp8}"
fi
case "$scenario" in
  1b) flavor=1B batch=4 seq=2048 ac=none nproc=1 cfg=configs/llama3_1b.toml ;;
  3b) flavor=3B batch=2 seq=4096 ac=selective nproc=1 cfg=configs/llama3_3b.toml ;;
  8b) flavor=8B batch=2 seq=4096 ac=none nproc="$ngpu" cfg=configs/llama3_8b.toml ;;
  fsdp3b) flavor=3B batch=2 seq=4096 ac=none nproc="$ngpu" cfg=configs/llama3_3b.toml ;;
  *) echo "unknown scenario $scenario (1b, 3b, 8b, fsdp3b)"; exit 2 ;;
esac
ref_ac=(--ac "$ac")
titan_ac=(--activation_checkpoint.mode "$ac")
if [ "$float8" != none ]; then
  ref_ac+=(--float8 "$float8")
  titan_ac+=(--model.converters float8 --quantize.linear.float8.recipe_name "$float8")
  scenario="$scenario-fp8-$float8"
fi
if [ "$ac" = selective ]; then
  ref_ac+=(--ac_every 2)
  titan_ac+=(--activation_checkpoint.selective_ac_option 2)
fi
mkdir -p "$OUT"
results=()
ref_env=()
[ -n "${REF_ALLOC_CONF+set}" ] && ref_env=(PYTORCH_CUDA_ALLOC_CONF="$REF_ALLOC_CONF")
for compile in ${REF_COMPILE-0 1}; do
  echo "== reference (compile=$compile): $flavor batch $batch seq $seq ac $ac float8 $float8 on $nproc GPU(s)"
  line="$(env "${ref_env[@]}" "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node="$nproc" "$ref" \
    --flavor "$flavor" --batch "$batch" --seq "$seq" --compile "$compile" "${ref_ac[@]}" \
    --steps "${REF_STEPS:-30}" --warmup "${REF_WARMUP:-10}" 2>&1 |
    tee "$OUT/ref_${scenario}_c$compile.log" | grep '^{' | tail -1)"
  echo "$line"
  results+=("ref_c$compile $line")
done
echo "== titan: $flavor batch $batch seq $seq ac $ac float8 $float8 on $nproc GPU(s)"
launcher=("$BUILD_DIR/titan_train")
if [ "$nproc" -gt 1 ]; then
  launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" --no-python
    "$BUILD_DIR/titan_train")
fi
# A fresh dump folder: metrics.jsonl keeps earlier runs' records, which a failed run here must
# not pass off as its own.
rm -rf "$OUT/titan_$scenario"
"${launcher[@]}" --job.config_file "$cfg" --training.local_batch_size "$batch" \
  --training.seq_len "$seq" "${titan_ac[@]}" --training.steps "${TITAN_STEPS:-30}" --metrics.log_freq 10 \
  --lr_scheduler.warmup_steps 5 --job.dump_folder "$OUT/titan_$scenario" \
  --metrics.disable_color_printing ${TITAN_ARGS:-} 2>&1 | tee "$OUT/titan_${scenario}.log" | grep -E "step:|error"
titan_status=${PIPESTATUS[0]}
if [ "$titan_status" != 0 ]; then
  echo "titan: titan_train exited with status $titan_status (log: $OUT/titan_${scenario}.log)"
  exit "$titan_status"
fi
"$PY" - "$OUT/titan_$scenario/metrics.jsonl" "${results[@]}" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tps"' in l]
t = rows[-1]
# Each record's peaks are its window's (reset after each log): the run's are their maximum.
peak = max(r['max_active_memory_gib'] for r in rows)
reserved = max(r['max_memory_gib'] for r in rows)
print(f"titan:        tps/gpu {t['tps']:,.0f}  mfu {t['mfu']:.2f}%  max_mem {peak:.1f} GiB allocated ({reserved:.1f} reserved)  step {t['step_seconds']:.3f}s")
for r in sys.argv[2:]:
    name, js = r.split(" ", 1)
    try:
        ref = json.loads(js)
    except Exception:
        print(f"{name}: no result"); continue
    print(f"{name}:      tps/gpu {ref['tps_per_gpu']:,}  mfu {100*ref['mfu']:.2f}%  max_mem {ref['max_mem_gib']:.1f} GiB allocated  step {ref['step_s']:.3f}s"
          f"   -> titan/ref tps ratio {t['tps']/ref['tps_per_gpu']:.3f}")
PYEOF
