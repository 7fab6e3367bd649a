#!/usr/bin/env bash
# Generates the example dataset of configs/debug_model_jsonl.toml, deterministically from
# titan's built-in corpus: OUT/train.jsonl, OUT/validation.jsonl and a ~1000-rank BPE
# tokenizer OUT/tokenizer.model (tiktoken format) trained on the training split.
#   ./scripts/make_example_data.sh [OUT]      (default OUT: ./outputs/example_data)
# Builds titan_tokenize if needed (BUILD_DIR, default build/); TITAN_TOKENIZE names an
# existing binary instead. EXAMPLE_DOCS (20000) and EXAMPLE_RANKS (1000) size it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
out="${1:-$TITAN_REPO/outputs/example_data}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
tool="${TITAN_TOKENIZE:-}"
if [ -z "$tool" ]; then
  BUILD_TARGETS=titan_tokenize "$TITAN_REPO/scripts/build.sh"
  tool="${BUILD_DIR:-build}/titan_tokenize"
  case "$tool" in /*) ;; *) tool="$TITAN_REPO/$tool" ;; esac
fi
docs="${EXAMPLE_DOCS:-20000}"
ranks="${EXAMPLE_RANKS:-1000}"
titan_exec "$tool" --export_corpus "$docs" --split train --output "$out/train.jsonl"
titan_exec "$tool" --export_corpus 500 --split validation --output "$out/validation.jsonl"
titan_exec "$tool" --train_bpe "$ranks" --output "$out/tokenizer.model" "$out/train.jsonl"
titan_log "example data in $out: train.jsonl ($docs documents), validation.jsonl, tokenizer.model"
