#!/usr/bin/env bash
# Runs every test of the workspace, installing what the tests need first (deploy/dev-setup.sh)
# and preparing the real Gemma 3 270M bundles outside the repository
# (deploy/models/prepare_test_models.sh, cached in ~/.cache/outpost) and the silero VAD model
# (deploy/models/fetch_silero_vad.sh, same cache). The models are prepared while the tests
# compile. Then the emulated aarch64 pass (cross/aarch64.sh test) and the arm64 package's check.
# Extra arguments go to the native `cargo test` alone, e.g. `bash test.sh --test end_to_end`.
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

# The same runtime built for the Raspberry Pi 5 and tested under qemu (cross/README.md): the model
# parity tests prove tract's NEON and fp16 paths give the answers they give here. Only for the
# whole suite (no extra arguments); OUTPOST_SKIP_AARCH64=1 leaves it out.
if (($# == 0)) && [ -z "${OUTPOST_SKIP_AARCH64:-}" ]; then
  bash cross/setup.sh
  bash cross/aarch64.sh test
  # The arm64 Debian package, made from that pass's binary, installed into a scratch root like the
  # amd64 one above (daemon/tests/debian_package.rs).
  packages=$(mktemp -d)
  trap 'rm -rf "$models_env" "$packages"' EXIT
  arm64_package=$(bash cross/aarch64.sh deb --no-build --profile dev --fast --quiet -o "$packages")
  OUTPOST_TEST_DEB="$arm64_package" cargo test --locked -p outpostd --test debian_package scratch_root
fi
