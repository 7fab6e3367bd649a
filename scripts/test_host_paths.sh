#!/usr/bin/env bash
# End-to-end check that every host path works as typed, also when titan runs inside the build
# root: a job whose config file, JSONL dataset, BPE tokenizer and dump folder all live in a fresh
# `mktemp -d` folder (outside the repository's parent) is started with the README's train
# command from that folder, and its metrics.jsonl and checkpoint must appear there on the host.
# Run by scripts/test.sh after the test suites; exits non-zero on failure.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
work="$(mktemp -d /tmp/titan_paths.XXXXXX)"
trap 'rm -rf "$work"' EXIT
EXAMPLE_DOCS=1500 EXAMPLE_RANKS=300 "$TITAN_REPO/scripts/make_example_data.sh" "$work/data" \
  >"$work/data.log" 2>&1 || { cat "$work/data.log"; titan_die "host paths: making the data failed"; }
cat >"$work/job.toml" <<TOML
[job]
dump_folder = "$work/run"
[model]
flavor = "debugmodel"
tokenizer_path = "$work/data/tokenizer.model"
[training]
dataset = "example_jsonl"
dataset_path = "$work/data/train.jsonl"
local_batch_size = 2
seq_len = 64
steps = 4
[metrics]
log_freq = 1
[checkpoint]
enable = true
interval = 2
TOML
cd "$work"
NPROC=1 CONFIG_FILE=job.toml "$TITAN_REPO/scripts/train.sh" --metrics.disable_color_printing \
  >"$work/train.log" 2>&1 || { cat "$work/train.log"; titan_die "host paths: training failed"; }
# One "start" event record, then one record per step.
lines="$(grep -vc '"event"' "$work/run/metrics.jsonl" 2>/dev/null || echo 0)"
[ "$lines" = 4 ] || { cat "$work/train.log"; titan_die "host paths: $work/run/metrics.jsonl has $lines step records, expected 4"; }
grep -q '"event":"start"' "$work/run/metrics.jsonl" ||
  titan_die "host paths: $work/run/metrics.jsonl has no start event record"
[ -f "$work/run/checkpoint/step-2/metadata.json" ] && [ -f "$work/run/checkpoint/step-4/metadata.json" ] ||
  { ls -R "$work/run"; titan_die "host paths: no checkpoint under $work/run/checkpoint"; }
titan_log "host paths: config, data, tokenizer and outputs in $work (mode $(titan_mode)): metrics.jsonl ($lines steps) and checkpoints step-2, step-4 written there"
