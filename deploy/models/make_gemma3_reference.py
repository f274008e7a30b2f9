#!/usr/bin/env python3
"""PyTorch (transformers, f32 dequantized from the GGUF, eager attention) reference fixtures for
the real Gemma 3 270M base model, for the Rust tests that run the bundle from prepare_gemma3.py:

    python deploy/models/make_gemma3_reference.py --gguf FILE \
        --out daemon/tests/fixtures/gemma3-270m/reference.json

* greedy: raw-text prompts in several languages (the base model's prompt is <bos> + text: id 2,
  then the text's ids, no chat template); 32 greedy tokens each (forced: EOS ignored) and, per
  step, PyTorch's top-5 [id, logit] (logits rounded to 5 decimals) so that a near-tie (top-2
  within 1e-3) can be told from a real divergence.
* tokenizer: ~30 texts (multilingual, emoji, whitespace runs, digits, URLs, code, special-token
  strings) with the HF tokenizer's ids (add_special_tokens=False); the script checks that
  tokenizers.Tokenizer(tokenizer.json) gives the same ids (what the Rust `tokenizers` crate runs).
* teacher_forcing: the repo's LICENSE (Apache-2.0 text) as [2] + ids(text), truncated to 2001
  tokens, and PyTorch's argmax next token (and top-2 margin) at each of the 2000 positions.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_tract import fix_string_hashing, sha256  # noqa: E402
from prepare_gemma3 import DEFAULT_GGUF, THREADS, check_special_tokens, load_gguf  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STEPS = 32
TOP_K = 5
TF_TOKENS = 2001

PROMPTS = [
    ("en_capital", "The capital of France is"),
    ("en_story", "Once upon a time, in a small village by the sea, there lived"),
    ("fr", "La recette traditionnelle de la ratatouille commence par"),
    ("de", "Die wichtigsten Sehenswürdigkeiten in Berlin sind"),
    ("es", "El agua hierve a cien grados cuando"),
    ("pt", "O Brasil é o maior país da América do Sul e"),
    ("ja", "日本の首都は東京です。東京には"),
    ("zh", "中国的长城是"),
    ("ru", "Москва — столица России. В этом городе"),
    ("ar", "اللغة العربية هي"),
    ("code_python", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ("code_rust", "fn main() {\n    let v: Vec<i32> ="),
    ("numbers", "1, 2, 3, 5, 8, 13, 21,"),
    ("qa_math", "Question: What is 12 times 12?\nAnswer:"),
]

EXTRA_TOKENIZER_TEXTS = [
    "I ❤️ pizza 🍕🍕 and 👩‍👩‍👧‍👦 families! 🙂🚀",
    "Tokyo東京Москва Cairo القاهرة München Αθήνα",
    "a    b\t\tc\n\n\nd   ",
    "   leading and trailing spaces   ",
    "line1\nline2\r\nline3\ttab\t\tend",
    "3.14159265358979 1234567890 007 1e-9 -42 1,000,000.50 2026-11-26",
    "Ça va? naïve café résumé Ångström Zürich niño façade",
    "안녕하세요, 세계! 한국어 텍스트입니다.",
    "नमस्ते दुनिया, यह हिंदी पाठ है।",
    "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่าง",
    "https://example.com/path/to/page?q=gemma&lang=fr#section-2 mailto:someone@example.org",
    "for (int i = 0; i < n; ++i) { sum += a[i]; } // C\n\tif x != None: return {'k': [1, 2]}",
    "<start_of_turn>user\nHello there!<end_of_turn>\n<start_of_turn>model\n",
    "Γειά σου Κόσμε, שלום עולם, Привет мир",
    "e\u0301 vs é, ﬁ ligature, ＡＢＣ fullwidth, \u200bzero\u200bwidth",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 \U0001F9EC ☃",
    "",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=str(DEFAULT_GGUF))
    ap.add_argument("--out", default=str(REPO / "daemon/tests/fixtures/gemma3-270m/reference.json"))
    ap.add_argument("--license", default=str(REPO / "LICENSE"))
    args = ap.parse_args()

    import torch
    import transformers
    from tokenizers import Tokenizer

    torch.set_num_threads(THREADS)
    t0 = time.time()
    gguf = Path(args.gguf)
    model, tok = load_gguf(gguf)
    special = check_special_tokens(tok)
    print(f"loaded in {time.time() - t0:.1f} s", flush=True)

    def ids_of(text):
        return tok(text, add_special_tokens=False).input_ids

    # ------------------------------------------------------------ tokenizer
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        fast = Tokenizer.from_file(str(Path(d) / "tokenizer.json"))
    texts = [t for _, t in PROMPTS] + EXTRA_TOKENIZER_TEXTS
    tok_cases = []
    mismatches = []
    for t in texts:
        ids = ids_of(t)
        if fast.encode(t, add_special_tokens=False).ids != ids:
            mismatches.append(t)
        tok_cases.append({"text": t, "ids": ids})
    if mismatches:
        raise SystemExit(f"tokenizer.json (tokenizers crate semantics) disagrees with the HF tokenizer on {mismatches}")
    print(f"tokenizer: {len(tok_cases)} texts, tokenizers.Tokenizer agrees ({time.time() - t0:.1f} s)", flush=True)

    # ------------------------------------------------------------ greedy
    greedy = []
    min_margin = None
    for name, text in PROMPTS:
        prompt_ids = [2] + ids_of(text)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                 max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        gen = out.sequences[0, len(prompt_ids):].tolist()
        logits = torch.stack(out.logits)[:, 0].float()
        assert len(gen) == STEPS and logits.argmax(-1).tolist() == gen
        top_v, top_i = logits.topk(TOP_K, dim=-1)
        top = [[[int(i), round(float(v), 5)] for i, v in zip(ii, vv)] for ii, vv in zip(top_i.tolist(), top_v.tolist())]
        margins = (top_v[:, 0] - top_v[:, 1]).tolist()
        min_margin = min(margins) if min_margin is None else min(min_margin, min(margins))
        greedy.append({"name": name, "prompt": text, "prompt_ids": prompt_ids, "ids": gen,
                       "text": tok.decode(gen), "near_ties": [s for s, m in enumerate(margins) if m < 1e-3],
                       "top": top})
        print(f"greedy {name}: {tok.decode(gen)!r} (min top-2 margin {min(margins):.4f}, {time.time() - t0:.1f} s)",
              flush=True)
    print(f"greedy done ({time.time() - t0:.1f} s)", flush=True)

    # ------------------------------------------------------------ teacher forcing
    lic = Path(args.license)
    lic_text = lic.read_text(encoding="utf-8")
    all_ids = [2] + ids_of(lic_text)
    if len(all_ids) < TF_TOKENS:
        raise SystemExit(f"{lic} gives only {len(all_ids)} tokens (< {TF_TOKENS}); not changing the text")
    tf_ids = all_ids[:TF_TOKENS]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tf_ids]), use_cache=False).logits[0, :TF_TOKENS - 1]
        top2 = logits.topk(2, dim=-1).values
        argmax = logits.argmax(-1).tolist()
        margin = (top2[:, 0] - top2[:, 1]).tolist()
        del logits
    agree_text = float(np.mean(np.array(argmax) == np.array(tf_ids[1:])))
    print(f"teacher forcing: {len(argmax)} positions, argmax == next text token for {agree_text:.3f} "
          f"({time.time() - t0:.1f} s)", flush=True)

    ref = {
        "description": "PyTorch (transformers, f32 dequantized from the GGUF, eager attention) reference for "
                       "google/gemma-3-270m (base). Prompts are raw text after <bos> (id 2), no chat template. "
                       "Greedy runs force 32 tokens (EOS ignored). Tokenizer ids use add_special_tokens=False.",
        "source": {"gguf": gguf.name, "sha256": sha256(gguf), "transformers": transformers.__version__,
                   "torch": torch.__version__, "dtype": "float32", "attn_implementation": "eager",
                   "script": "deploy/models/make_gemma3_reference.py"},
        "special_tokens": special,
        "greedy_info": {"steps": STEPS, "top_k": TOP_K, "near_tie_threshold": 1e-3, "min_top2_margin": min_margin,
                        "note": "per case: prompt_ids = [2] + ids(prompt); ids = 32 greedy tokens of HF generate; "
                                "top[s] = the top-5 [id, logit] of PyTorch's raw logits at step s (5 decimals), "
                                "ids[s] == top[s][0][0]; near_ties = steps whose top-2 logits are < 1e-3 apart"},
        "greedy": greedy,
        "tokenizer_info": {"add_special_tokens": False, "tokenizers_crate_agrees": True,
                           "note": "ids from the HF tokenizer; tokenizers.Tokenizer.from_file(tokenizer.json)"
                                   ".encode(text, add_special_tokens=False) gives the same ids"},
        "tokenizer": tok_cases,
        "teacher_forcing": {
            "source": "LICENSE (repository root, Apache License 2.0 text)",
            "source_sha256": sha256(lic), "source_total_tokens": len(all_ids),
            "tokens": len(tf_ids),
            "note": f"ids = [2] + ids(LICENSE text) truncated to {TF_TOKENS} tokens; pytorch_argmax[p] is PyTorch's "
                    f"argmax next token after ids[0..=p] (one full forward, p < {TF_TOKENS - 1}), pytorch_margin[p] "
                    f"its top-2 logit margin (4 decimals)",
            "ids": tf_ids,
            "pytorch_argmax": argmax, "pytorch_margin": [round(m, 4) for m in margin],
            "argmax_equals_next_token": agree_text,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ref, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} KB) in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    fix_string_hashing()
    sys.exit(main())
