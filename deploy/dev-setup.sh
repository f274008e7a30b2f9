#!/usr/bin/env bash
# Installs what building and testing outpostd needs on Debian 12 (or a Pi OS based on it), once.
# Rust itself comes from rustup (https://rustup.rs). Safe to run again: it installs only what is
# missing.
set -euo pipefail

packages=(
  mosquitto          # the broker the end-to-end tests start on loopback
  mosquitto-clients  # mosquitto_sub, to watch a station
  libasound2-dev     # alsa-lib, which the microphone source links against
  pkg-config         # finds alsa-lib for the build
  libclang-dev       # bindgen, which the v4l crate runs to read the kernel's V4L2 headers
  cmake              # builds llama.cpp for outpost-bench's side-by-side runs (bench/)
  g++                # the same
  systemd            # systemd-analyze, which checks the unit (verify, security)
  openssh-server     # the station deploy/deploy.sh installs to in the package tests
  openssh-client
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
# The model tools (deploy/models/) run in a Python venv; Debian's python3 needs python3-venv for it.
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)

if ((${#missing[@]})); then
  echo "dev-setup: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || {
  echo "dev-setup: cargo not found: install Rust from https://rustup.rs, then run this again" >&2
  exit 1
}

# The Debian package (deploy/debian/) is made by cargo-deb; this version's maintainer-script
# snippets are the ones daemon/tests/debian_package.rs runs.
cargo_deb_version=3.8.0
if ! cargo deb --version 2>/dev/null | grep -qx "cargo-deb $cargo_deb_version"; then
  echo "dev-setup: installing cargo-deb $cargo_deb_version" >&2
  cargo install --locked --quiet cargo-deb --version "$cargo_deb_version"
fi
