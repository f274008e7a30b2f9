#!/usr/bin/env bash
# Runs every test of the workspace, installing what the tests need first (deploy/dev-setup.sh).
# Extra arguments go to `cargo test`, e.g. `bash test.sh --test end_to_end`.
set -euo pipefail
cd "$(dirname "$0")"
bash deploy/dev-setup.sh
cargo test --workspace --locked "$@"
