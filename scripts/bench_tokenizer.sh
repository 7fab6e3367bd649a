#!/usr/bin/env bash
# Builds and runs titan_bench_tokenizer: single-core encode MB/s of the byte-level BPE on
# generated English-like text and on the built-in corpus, with a BPE trained on the spot
# (--ranks N) or a real tokenizer (--tokenizer tokenizer.json|tokenizer.model). Arguments go
# to the benchmark, e.g.  ./scripts/bench_tokenizer.sh --mb 64 --ranks 32000
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
BUILD_TARGETS=titan_bench_tokenizer "$TITAN_REPO/scripts/build.sh"
cd "$TITAN_REPO"
titan_exec "${BUILD_DIR:-build}/titan_bench_tokenizer" "$@"
