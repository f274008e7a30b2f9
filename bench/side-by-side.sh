#!/usr/bin/env bash
# Builds outpost-bench for this CPU and runs it: our runtime and llama.cpp side by side on the
# same model (issue #7's figures, docs/benchmarks.md). Arguments go to outpost-bench; with none,
# the real Gemma 3 270M from deploy/models/prepare_test_models.sh (our Q8_0 bundle and the GGUF
# it was prepared from) at the default lengths:
#   bash bench/side-by-side.sh [BUNDLE GGUF] [--threads N] [--runs N] [--prefill 128,512] [--json]
#
# Both sides are compiled with `-C target-cpu=native`: llama.cpp's own default build is native
# (GGML_NATIVE), and llama-cpp-sys-2 builds it so only when Rust's target CPU is native. The
# native build lives in its own target directory, so that the portable one of the tests is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

if (($# == 0)) || [[ $1 == -* ]]; then
  models_env=$(bash deploy/models/prepare_test_models.sh)
  bundle=$(sed -n 's/^OUTPOST_GEMMA3_Q8_BUNDLE=//p' <<<"$models_env")
  gguf=$(sed -n 's/^OUTPOST_GEMMA3_GGUF=//p' <<<"$models_env")
  set -- "$bundle" "$gguf" "$@"
fi

export RUSTFLAGS="-C target-cpu=native"
export CARGO_TARGET_DIR="${OUTPOST_NATIVE_TARGET_DIR:-$HOME/.cache/outpost/target-native}"
cargo build --locked --release --quiet -p outpost-bench
exec "$CARGO_TARGET_DIR/release/outpost-bench" "$@"
