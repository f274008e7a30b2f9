#!/usr/bin/env bash
# Runs every test of the workspace, installing what the tests need first (deploy/dev-setup.sh)
# and preparing the real Gemma 3 270M bundles outside the repository
# (deploy/models/prepare_test_models.sh, cached in ~/.cache/outpost) and the silero VAD model
# (deploy/models/fetch_silero_vad.sh, same cache). The models are prepared while the tests
# compile. Extra arguments go to `cargo test`, e.g. `bash test.sh --test end_to_end`.
set -euo pipefail
cd "$(dirname "$0")"
bash deploy/dev-setup.sh

models_env=$(mktemp)
trap 'rm -f "$models_env"' EXIT
{
  bash deploy/models/prepare_test_models.sh
  silero_vad=$(bash deploy/models/fetch_silero_vad.sh)
  echo "OUTPOST_SILERO_VAD=$silero_vad"
} > "$models_env" &
preparing=$!
cargo test --workspace --locked --no-run "$@"
wait "$preparing" || { echo "test.sh: preparing the real-weight test models failed (see above)" >&2; exit 1; }
set -a
# shellcheck disable=SC1090
source "$models_env"
set +a
export OUTPOST_REQUIRE_REAL_MODEL=1
cargo test --workspace --locked "$@"
