#!/usr/bin/env bash
# Builds outpostd for the Raspberry Pi 5 (aarch64) and tests it under qemu user-mode emulation
# with the Pi 5's CPU (Cortex-A76). Run cross/setup.sh once first (it installs the toolchain).
#
#   cross/aarch64.sh build            the release binary, stripped: prints its path
#   cross/aarch64.sh test [ARGS...]   the emulated test pass (see EMULATED_TESTS), or
#                                     `cargo test --target aarch64-unknown-linux-gnu ARGS...`
#   cross/aarch64.sh deb [ARGS...]    the arm64 Debian package (cargo-deb; ARGS go to it): its path
#
# The compiler is rustup's where it has the aarch64 target, otherwise Debian's own Rust (rustc-web),
# each with its own target directory under the cache: the two compilers' artifacts do not mix.
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
cache="${XDG_CACHE_HOME:-$HOME/.cache}/outpost"
sysroot="${OUTPOST_CROSS_SYSROOT:-$cache/arm64-sysroot}"

toolchain="${OUTPOST_CROSS_TOOLCHAIN:-auto}"
if [ "$toolchain" = auto ]; then
  toolchain=debian
  command -v rustup >/dev/null && rustup target list --installed 2>/dev/null | grep -qx "$target" && toolchain=rustup
fi
case "$toolchain" in
  rustup) cargo=(cargo) ;;
  debian)
    # rustup's cargo comes first on PATH; Debian's must be named, with its own rustc.
    cargo=(/usr/bin/cargo)
    export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
    ;;
  *) echo "cross/aarch64: OUTPOST_CROSS_TOOLCHAIN must be rustup or debian, got $toolchain" >&2; exit 2 ;;
esac
"${cargo[@]}" --version >/dev/null 2>&1 && [ -n "$("${RUSTC:-rustc}" --print sysroot 2>/dev/null)" ] &&
  [ -d "$("${RUSTC:-rustc}" --print sysroot)/lib/rustlib/$target/lib" ] || {
  echo "cross/aarch64: no $toolchain Rust standard library for $target: run cross/setup.sh first" >&2
  exit 1
}
[ -e "$sysroot/usr/lib/aarch64-linux-gnu/libasound.so" ] || {
  echo "cross/aarch64: no arm64 alsa-lib in $sysroot: run cross/setup.sh first" >&2
  exit 1
}
export CARGO_TARGET_DIR="${OUTPOST_CROSS_TARGET_DIR:-$cache/target-$target-$toolchain}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# C code (ring, alsa-sys's link) goes through the cross gcc; bindgen reads the arm64 kernel headers;
# pkg-config finds the arm64 alsa-lib in its own sysroot. All target-specific, so build scripts
# that run on the host are untouched.
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--sysroot=/usr/aarch64-linux-gnu"
export PKG_CONFIG_ALLOW_CROSS_aarch64_unknown_linux_gnu=1
export PKG_CONFIG_SYSROOT_DIR_aarch64_unknown_linux_gnu="$sysroot"
export PKG_CONFIG_LIBDIR_aarch64_unknown_linux_gnu="$sysroot/usr/lib/aarch64-linux-gnu/pkgconfig"

# The Pi 5's core: qemu's default CPU advertises SVE2, and tract, which picks its kernels at run
# time, would use ones a Pi 5 does not have. alsa-lib comes from the sysroot.
runner="qemu-aarch64 -cpu cortex-a76 -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=$sysroot/usr/lib/aarch64-linux-gnu"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$runner"
# Tests that start the daemon binary go through the same runner (no binfmt handler here).
export OUTPOST_TEST_RUNNER="$runner"

# The emulated pass (cross/README.md says why this set): the library's unit tests; the model
# runtime's parity tests on the tiny Gemma 4 (f32 against PyTorch's fixtures: prefill logits, the
# image and audio encoders, greedy text, image and audio prompts; Q4_0 against onnxruntime, through
# prepare_gemma4.py); the preprocessing against transformers; the bundle checks; capture through the
# arm64 alsa-lib; the CLI; and, of the real Gemma 3 270M, its 262144-token tokenizer (its forward
# passes take over ten minutes each under emulation).
EMULATED_TESTS=(--lib --test gemma4_tiny --test prepare_gemma4 --test preprocessing --test model_bundle
  --test alsa_capture --test cli)
EMULATED_GEMMA3=(--test gemma3_270m -- tokenizer_gives_transformers_ids_for_multilingual_text)

case "${1:-}" in
  build)
    "${cargo[@]}" build --locked --release --target "$target" -p outpostd
    binary="$CARGO_TARGET_DIR/$target/release/outpostd"
    aarch64-linux-gnu-strip -o "$binary.stripped" "$binary"
    $runner "$binary.stripped" --version >&2
    echo "$binary.stripped"
    ;;
  test)
    shift
    if (($#)); then
      exec "${cargo[@]}" test --locked --target "$target" "$@"
    fi
    "${cargo[@]}" test --locked --target "$target" -p outpostd "${EMULATED_TESTS[@]}"
    exec "${cargo[@]}" test --locked --target "$target" -p outpostd "${EMULATED_GEMMA3[@]}"
    ;;
  deb)
    shift
    exec "${cargo[@]}" deb --locked --target "$target" -p outpostd "$@"
    ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
