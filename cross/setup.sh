#!/usr/bin/env bash
# Installs what building outpostd for aarch64 and testing it under qemu needs, once; safe to run
# again. Two routes to the aarch64 Rust standard library:
#   - rustup, where it can add the target (a workstation online): `rustup target add`;
#   - Debian 12's own Rust (`rustc-web`, 1.96) and its arm64 standard library, where rustup cannot
#     (these build machines). The arm64 package is unpacked, not installed: installing it pulls
#     libc6:arm64, and two glibc builds mixed make binaries hang under qemu in pthread_create.
# Both routes need the cross gcc (linker, and C code such as ring's), the arm64 kernel headers (the
# v4l crate runs bindgen over linux/videodev2.h), qemu-user, and alsa-lib for arm64, which goes
# into a sysroot of its own under the cache ($OUTPOST_CROSS_SYSROOT) for the same reason.
set -euo pipefail

cache="${XDG_CACHE_HOME:-$HOME/.cache}/outpost"
sysroot="${OUTPOST_CROSS_SYSROOT:-$cache/arm64-sysroot}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_get() { DEBIAN_FRONTEND=noninteractive $sudo apt-get -qq -o DPkg::Lock::Timeout=600 "$@"; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# OUTPOST_CROSS_TOOLCHAIN=debian (or rustup) picks a route; by default rustup's where it works.
toolchain="${OUTPOST_CROSS_TOOLCHAIN:-auto}"
rustup_has_target() {
  command -v rustup >/dev/null && rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu
}
if [ "$toolchain" != debian ] && ! rustup_has_target && command -v rustup >/dev/null &&
  rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1; then
  echo "cross/setup: added the aarch64 target to rustup" >&2
fi
if [ "$toolchain" = auto ]; then
  if rustup_has_target; then toolchain=rustup; else toolchain=debian; fi
elif [ "$toolchain" = rustup ] && ! rustup_has_target; then
  echo "cross/setup: rustup could not add the aarch64-unknown-linux-gnu target" >&2
  exit 1
fi

packages=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user libclang-dev pkg-config)
[ "$toolchain" = rustup ] || packages+=(rustc-web cargo-web)
missing=()
for package in "${packages[@]}"; do installed "$package" || missing+=("$package"); done
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "cross/setup: adding the arm64 architecture to dpkg (for apt-get download only)" >&2
  $sudo dpkg --add-architecture arm64
  updated=no
fi
if ((${#missing[@]})) || [ "${updated:-yes}" = no ]; then
  echo "cross/setup: installing ${missing[*]:-nothing new}" >&2
  apt_get update
  ((${#missing[@]} == 0)) || apt_get install -y "${missing[@]}" >/dev/null
fi

# The arm64 packages are fetched into the cache and unpacked, never installed.
debs="$cache/arm64-debs"
mkdir -p "$debs" "$sysroot"
unpack() { # package[=version] destination
  local name="${1%%=*}" version="${1#*=}"
  local marker="$2/.unpacked-$name"
  [ "$1" = "$name" ] && version=""
  [ -e "$marker" ] && [ "$(cat "$marker")" = "$version" ] && return
  rm -f "$debs/${name}"_*_arm64.deb
  local spec="$name:arm64${version:+=$version}"
  (cd "$debs" && { apt-get download -qq "$spec" 2>/dev/null || { apt_get update && apt-get download -qq "$spec"; }; })
  $sudo dpkg-deb -x "$debs/${name}"_*_arm64.deb "$2"
  echo "$version" | $sudo tee "$marker" >/dev/null
}
if [ "$toolchain" = debian ]; then
  # The standard library must sit in the Debian compiler's own sysroot (/usr/lib/rustlib), and be
  # the exact build of the installed compiler.
  unpack "libstd-rust-web-dev=$(dpkg-query -W -f='${Version}' rustc-web)" /
fi
unpack libasound2 "$sysroot"
unpack libasound2-dev "$sysroot"
echo "cross/setup: ready: $toolchain Rust for aarch64, arm64 alsa-lib in $sysroot" >&2
