#!/usr/bin/env bash
# Fetches the silero VAD model (speech probabilities for the speech gate, `[gates.speech]`) from
# the PyPI wheel silero-vad 6.2.3, checks the sha256 of the wheel and of the model, and prints the
# path of the .onnx file (progress goes to stderr).
#   bash deploy/models/fetch_silero_vad.sh [DEST]
#        (default ~/.cache/outpost/silero-vad/silero_vad_op18_ifless.onnx)
# Also unpacks the wheel beside the model (silero-vad-6.2.3/: the upstream Python, which
# deploy/models/silero_vad_reference.py runs) and copies its license as LICENSE.silero-vad.
#
# Of the wheel's ONNX variants, `silero_vad_op18_ifless.onnx` is the one tract runs: the plain
# `silero_vad.onnx` ones have `If` nodes on the sample rate that tract cannot fold.
# The model is MIT-licensed (Copyright (c) 2020-present Silero Team), so it may be shipped with
# the package later, with its license text beside it. It is still fetched, never committed to git.
set -euo pipefail

version="6.2.3"
wheel_name="silero_vad-$version-py3-none-any.whl"
wheel_sha256="7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8"
member="silero_vad/data/silero_vad_op18_ifless.onnx"
model_sha256="7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28"
license_member="silero_vad-$version.dist-info/licenses/LICENSE"

dest="${1:-$HOME/.cache/outpost/silero-vad/silero_vad_op18_ifless.onnx}"
dir="$(dirname "$dest")"

log() { echo "fetch_silero_vad: $*" >&2; }
has_sha256() { [ -f "$1" ] && echo "$2  $1" | sha256sum --check --status; }

if has_sha256 "$dest" "$model_sha256" && [ -f "$dir/LICENSE.silero-vad" ] && [ -d "$dir/silero-vad-$version" ]; then
  echo "$dest"
  exit 0
fi

# A Python with pip: the model tools' venv when there is one (test.sh makes it first), else the
# system's if it has pip, else a small venv of its own (Debian's python3 has no pip by default;
# dev-setup.sh installs python3-venv).
pip_python() {
  local venv_python="${OUTPOST_PYTHON:-$HOME/.cache/outpost/venv/bin/python}"
  if [ -x "$venv_python" ] && "$venv_python" -m pip --version >/dev/null 2>&1; then
    echo "$venv_python"
  elif python3 -m pip --version >/dev/null 2>&1; then
    echo python3
  else
    [ -x "$dir/pip-venv/bin/python" ] || python3 -m venv "$dir/pip-venv" >&2
    echo "$dir/pip-venv/bin/python"
  fi
}

mkdir -p "$dir/wheels"
wheel="$dir/wheels/$wheel_name"
if ! has_sha256 "$wheel" "$wheel_sha256"; then
  log "downloading silero-vad==$version"
  rm -f "$wheel"
  "$(pip_python)" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    "silero-vad==$version" --dest "$dir/wheels" >&2
  if ! has_sha256 "$wheel" "$wheel_sha256"; then
    log "$wheel has the wrong sha256 (expected $wheel_sha256)"
    exit 1
  fi
fi

unpacked="$dir/silero-vad-$version"
rm -rf "$unpacked.tmp"
python3 -m zipfile -e "$wheel" "$unpacked.tmp" >&2
if ! has_sha256 "$unpacked.tmp/$member" "$model_sha256"; then
  log "$member in $wheel has the wrong sha256 (expected $model_sha256)"
  exit 1
fi
rm -rf "$unpacked"
mv "$unpacked.tmp" "$unpacked"
cp "$unpacked/$license_member" "$dir/LICENSE.silero-vad"
cp "$unpacked/$member" "$dest.tmp"
mv "$dest.tmp" "$dest"
log "fetched $dest"
echo "$dest"
