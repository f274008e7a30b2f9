#!/usr/bin/env bash
# Builds the outpostd Debian package from a release build (cargo-deb; deploy/debian/README.md says
# what is in it) and prints its path.
#
#   bash deploy/package.sh [arm64|amd64] [OUT_DIR]     default: arm64 (a Pi), into ./dist
#
# arm64 on an amd64 machine is cross-compiled (cross/setup.sh installs what that needs); either
# architecture on a machine of its own kind is built natively. A cold release build takes about
# 20 minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."

arch="${1:-arm64}"
out="${2:-$PWD/dist}"
host="$(dpkg --print-architecture)"
case "$arch" in
  arm64 | amd64) ;;
  *) echo "deploy/package: the architecture must be arm64 or amd64, got $arch" >&2; exit 2 ;;
esac
bash deploy/dev-setup.sh >&2
mkdir -p "$out"

if [ "$arch" = "$host" ]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/outpost/target}"
  cargo deb --locked -p outpostd --quiet -o "$out"
elif [ "$arch" = arm64 ] && [ "$host" = amd64 ]; then
  bash cross/setup.sh >&2
  bash cross/aarch64.sh deb --quiet -o "$out"
else
  echo "deploy/package: cannot build $arch on $host; build it on an $arch machine" >&2
  exit 2
fi
