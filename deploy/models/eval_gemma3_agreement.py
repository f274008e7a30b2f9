#!/usr/bin/env python3
"""Teacher-forced next-token agreement of Gemma 3 bundles (onnxruntime), over the 2000 positions
of the LICENSE text stored in make_gemma3_reference.py's reference.json:

    python deploy/models/eval_gemma3_agreement.py \
        --reference daemon/tests/fixtures/gemma3-270m/reference.json \
        ~/.cache/outpost/bundles/gemma-3-270m ~/.cache/outpost/bundles/gemma-3-270m-q4_0 [--write-manifest]

For each bundle: the argmax next token at each position (prefill in chunks of 256 through the KV
cache), compared with PyTorch's argmax (reference.json) and with the first bundle's (normally the
f32 one). --write-manifest stores the figures under parity.teacher_forcing in each bundle's
manifest.json (the manifest's own sha256 is not recorded anywhere, so this is safe).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_gemma3 import OrtLM  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def bundle_lm(path: Path):
    m = json.loads((path / "manifest.json").read_text())
    t = m["text"]
    return OrtLM(path, t["num_layers"], t["num_kv_heads"], t["head_dim"]), m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--reference", default=str(REPO / "daemon/tests/fixtures/gemma3-270m/reference.json"))
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--write-manifest", action="store_true")
    args = ap.parse_args()

    import torch  # noqa: F401  (import order as in prepare_gemma3)

    ref = json.loads(Path(args.reference).read_text(encoding="utf-8"))["teacher_forcing"]
    tokens, pt = ref["ids"], np.array(ref["pytorch_argmax"])
    margin = np.array(ref["pytorch_margin"])
    n = len(pt)
    results = {}
    first = None
    for b in args.bundles:
        t0 = time.time()
        lm, manifest = bundle_lm(Path(b))
        am = lm.teacher_forced_argmax(tokens[:n], chunk=args.chunk)
        del lm
        r = {"positions": n, "chunk": args.chunk,
             "agreement_vs_pytorch": float((am == pt).mean()),
             "disagreements_vs_pytorch": int((am != pt).sum()),
             "disagreements_vs_pytorch_with_margin_over_0.1": int(((am != pt) & (margin > 0.1)).sum())}
        if first is None:
            first = (b, am)
        else:
            r["agreement_vs_first_bundle"] = float((am == first[1]).mean())
            r["first_bundle"] = Path(first[0]).name
        r["seconds"] = round(time.time() - t0, 1)
        results[b] = r
        print(Path(b).name, json.dumps(r), flush=True)
        if args.write_manifest:
            mp = Path(b) / "manifest.json"
            manifest = json.loads(mp.read_text())
            entry = {k: v for k, v in r.items() if k != "seconds"}
            entry["text"] = ref["source"]
            manifest.setdefault("parity", {})["teacher_forcing"] = entry
            mp.write_text(json.dumps(manifest, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
