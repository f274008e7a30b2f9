#!/usr/bin/env python3
"""Build a random-weight Gemma 4 with Gemma 4 E2B's widths and a chosen number of decoder layers,
saved as a Hugging Face checkpoint that prepare_gemma4.py and gemma4_gguf.py take as they would
take the real google/gemma-4-E2B-it (which cannot be downloaded here).

    python deploy/models/make_e2b_shaped.py --layers N --out DIR [--seed S]

For benchmarks only: the weights are random, the text it writes is noise. Nothing is downloaded.

Shape (E2B's, except the depth):
  text    vocab 262144, hidden 1536, 8 query heads, 1 KV head, head_dim 256 (sliding) / 512 (full),
          sliding window 512, full attention every 5th layer (layers 4, 9, 14, ...) and the last
          layer full, RoPE 10k (sliding) / 1M proportional with partial factor 0.25 (full),
          MLP 6144 (12288 in KV-shared layers: use_double_wide_mlp), PLE width 256 for every layer,
          final logit soft-cap 30, tied output layer, RMS eps 1e-6, GELU-tanh, 128K positions.
  KV sharing  E2B: the last 20 of 35 layers reuse the K/V of layer 13 (sliding) and 14 (full).
          Here num_kv_shared_layers is the one closest to N * 20/35 that keeps the cache-owning
          layers ending "sliding, full" (so a multiple of 5 of them, at least 5), which is what
          transformers (both types must own a cache) and llama.cpp's gemma4 loader (a shared layer
          reads layer n_kv-2 / n_kv-1) both need: N <= 5 has none, N = 6..10 shares N - 5, N = 35
          shares 20 as E2B does.
  vision  hidden 768, 16 layers, 12 heads, head_dim 64, MLP 3072, patch 16, 3x3 pooling, position
          table 10240, clipped linears (about 150 M parameters, as E2B's).
  audio   Conformer hidden 1024, 12 layers, 8 heads, subsampling channels [128, 32], conv kernel 5,
          chunk 12, left context 13, output 1536, clipped linears (about 300 M, as E2B's).
  tokens  pad 0, eos 1, bos 2; image 258880, audio 258881, video 258884, begin/end image
          255999/258882, begin/end audio 256000/258883; end of turn [1, 106].

Where the values come from:
  * transformers 5.24 (the project venv): Gemma4TextConfig / Gemma4VisionConfig /
    Gemma4AudioConfig / Gemma4Config, documented as "google/gemma-4-e2b-it": their defaults give
    the vision and audio towers, the token ids, RoPE, window 512, PLE width 256, vocab 262144,
    8 query heads and global_head_dim 512 above. The text defaults (hidden 2304, 30 layers, 4 KV
    heads, MLP 9216, no soft-cap) are not E2B's and are overridden.
  * /work/shared/briefing/model.md (from gemma.cpp's configs): 35 layers, hidden 1536, 4:1
    sliding:full, window 512, head_dim 256/512, 20 KV-shared layers, PLE 256, soft-cap 30, vocab
    262144, pad/eos/bos 0/1/2, vision ~150 M, audio ~300 M.
  * google/gemma.cpp PR 919 (Gemma 4 E2B config): model_dim 1536, 35 layers, TTTTF pattern,
    mixed FFN 6144/12288.
  * Public copies of E2B's config.json (seen as test fixtures in third-party repositories, found
    with the `search` tool): text num_key_value_heads 1, intermediate_size 6144,
    use_double_wide_mlp true, attention_k_eq_v false, final_logit_softcapping 30,
    vision/audio use_clipped_linears true, eos [1, 106]. Not an authoritative source, but
    consistent with the two above.

Weights: drawn from N(0, 1/fan_in) for matrices (fan_in = the size of one output row), norm scales
1 +- 0.1, other vectors 0.1 * N(0, 1), the vision position table 0.5 * N(0, 1), from one seeded
generator. transformers' own init (std 0.02) would leave the 262144 logits nearly tied, and
prepare_gemma4.py compares greedy tokens with PyTorch, which needs clear top-2 margins. Clipped
linears get finite bounds (the real checkpoint has finite ones) wide enough never to bind.
Saved in bf16, as E2B is distributed; the tools widen it to f32 exactly.

Tokenizer: the real 262144-token Gemma tokenizer (Gemma 3's tokenizer.json, from
$OUTPOST_GEMMA3_BUNDLE unless --tokenizer says otherwise). Gemma 4 uses the same vocabulary with
the chat and multimodal tokens renamed in slots that Gemma 3 leaves unused: those (listed in
GEMMA4_TOKENS, ids from the config above and from public Gemma 4 tokenizer fixtures) are renamed
here so prepare_gemma4.py finds every token it needs. A minimal chat template marks the
checkpoint as instruction-tuned. Ordinary text tokenizes as it does for the real model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

E2B_LAYERS = 35
E2B_SHARED = 20
FULL_EVERY = 5  # E2B: layers 4, 9, 14, ... are full attention

# Gemma 4 token text by id, where Gemma 3's tokenizer.json has another (unused) token there.
GEMMA4_TOKENS = {
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>",
    50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>',
    98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>",
    255999: "<|image>", 256000: "<|audio>",
    258880: "<|image|>", 258881: "<|audio|>", 258882: "<image|>", 258883: "<audio|>", 258884: "<|video|>",
}

CHAT_TEMPLATE = """{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}
{{ m['content'] }}<turn|>
{% endfor %}{% if add_generation_prompt %}<|turn>model
{% endif %}"""


def layer_plan(n: int) -> tuple[list[str], int]:
    """(layer types, number of KV-shared layers) for an E2B-patterned decoder of n layers."""
    types = ["full_attention" if (i + 1) % FULL_EVERY == 0 else "sliding_attention" for i in range(n)]
    types[-1] = "full_attention"  # transformers forces it; E2B's last layer is full anyway
    want_owners = n - round(n * E2B_SHARED / E2B_LAYERS)
    # cache owners must end "sliding, full": a multiple of FULL_EVERY, below n (n itself means no sharing)
    owners = max(FULL_EVERY, round(want_owners / FULL_EVERY) * FULL_EVERY)
    return types, (n - owners if owners < n else 0)


def e2b_config(n_layers: int):
    from transformers import Gemma4Config

    types, shared = layer_plan(n_layers)
    text = dict(
        vocab_size=262144, vocab_size_per_layer_input=262144, hidden_size=1536, intermediate_size=6144,
        num_hidden_layers=n_layers, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
        global_head_dim=512, attention_k_eq_v=False, layer_types=types, sliding_window=512,
        num_kv_shared_layers=shared, use_double_wide_mlp=True, hidden_size_per_layer_input=256,
        final_logit_softcapping=30.0, max_position_embeddings=131072, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=[1, 106], bos_token_id=2,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                            "rope_theta": 1_000_000.0}},
    )
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                  num_key_value_heads=12, head_dim=64, patch_size=16, pooling_kernel_size=3,
                  position_embedding_size=10240, use_clipped_linears=True, standardize=False)
    audio = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, subsampling_conv_channels=[128, 32],
                 conv_kernel_size=5, attention_chunk_size=12, attention_context_left=13, attention_context_right=0,
                 output_proj_dims=1536, residual_weight=0.5, use_clipped_linears=True)
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=audio,
                        boi_token_id=255999, eoi_token_id=258882, image_token_id=258880, audio_token_id=258881,
                        boa_token_id=256000, eoa_token_index=258883, video_token_id=258884,
                        tie_word_embeddings=True)


def draw(p, mean: float, std: float, g, chunk_values: int = 1 << 25):
    """N(mean, std) drawn in f32 and rounded into p, a block of rows at a time (a whole f32 copy of
    the per-layer table would be 9.4 GB at full depth). torch draws blocks of 16 values, so blocks of
    whole rows give the same numbers as one draw when a row is a multiple of 16 long."""
    import torch

    row = p[0].numel() if p.dim() > 1 else p.numel()
    rows = max(1, chunk_values // row) if p.dim() > 1 and row % 16 == 0 else p.shape[0]
    for start in range(0, p.shape[0], rows):
        block = p[start:start + rows]
        block.copy_(torch.empty(block.shape, dtype=torch.float32).normal_(mean, std, generator=g))


def build_model(n_layers: int, seed: int):
    import torch
    from transformers import Gemma4ForConditionalGeneration
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    torch.manual_seed(seed)
    cfg = e2b_config(n_layers)
    # skip transformers' own init: every parameter is drawn again below (saves minutes at this size)
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(cfg)
    # bf16 (as E2B is distributed) halves the memory: 35 layers are 5.1 B parameters, 20 GB in f32
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()
    model.tie_weights()  # to_empty gives lm_head its own storage: E2B's output layer is the embedding table
    with torch.no_grad():
        # buffers were left uninitialised by to_empty: transformers' init gives them their values
        # (it draws the parameters too, which are drawn again just below)
        for module in model.modules():
            model._init_weights(module)
            if isinstance(module, Gemma4ClippableLinear) and module.use_clipped_linears:
                for b, v in (("input_min", -1e4), ("input_max", 1e4), ("output_min", -1e4), ("output_max", 1e4)):
                    getattr(module, b).fill_(v)
        g = torch.Generator().manual_seed(seed)
        for name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                mean, std = 0.0, 0.5 if "position_embedding_table" in name else 1.0 / math.sqrt(p[0].numel())
            else:
                mean, std = (1.0, 0.1) if "norm" in name else (0.0, 0.1)
            draw(p, mean, std, g)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    return model


def gemma4_tokenizer(src: Path) -> dict:
    """Gemma 3's tokenizer.json with the Gemma 4 token names in their slots."""
    tj = json.loads(src.read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    for i, text in GEMMA4_TOKENS.items():
        old = by_id[i]
        if text in vocab and vocab[text] != i:
            raise SystemExit(f"{src}: {text!r} already has id {vocab[text]}, expected {i}")
        del vocab[old]
        vocab[text] = i
    added = {a["id"]: a for a in tj["added_tokens"]}
    for i, text in GEMMA4_TOKENS.items():
        if i not in added:
            raise SystemExit(f"{src}: id {i} is not an added token; not the Gemma tokenizer this expects")
        added[i]["content"] = text
        added[i]["special"] = True
    return tj


def check_tokenizer(path: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    assert tok.get_vocab_size() == 262144, tok.get_vocab_size()
    for i, text in GEMMA4_TOKENS.items():
        assert tok.token_to_id(text) == i, (text, tok.token_to_id(text), i)
    ids = tok.encode("<bos><|turn>user\nHello sentinel<turn|>\n<|turn>model\n", add_special_tokens=False).ids
    assert ids[:2] == [2, 105] and 106 in ids, ids
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, required=True, help="decoder layers (E2B has 35)")
    ap.add_argument("--out", required=True, help="checkpoint directory to write (must not exist or be empty)")
    ap.add_argument("--seed", type=int, default=20260402)
    ap.add_argument("--tokenizer", default=None,
                    help="Gemma 3 tokenizer.json (default $OUTPOST_GEMMA3_BUNDLE/tokenizer.json)")
    args = ap.parse_args()
    if args.layers < 2:
        raise SystemExit("--layers: at least 2 (one sliding and one full attention layer)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out}: exists and is not empty")
    tok_src = Path(args.tokenizer) if args.tokenizer else None
    if tok_src is None:
        bundle = os.environ.get("OUTPOST_GEMMA3_BUNDLE")
        if not bundle:
            raise SystemExit("no --tokenizer and no OUTPOST_GEMMA3_BUNDLE: source /tmp/models.env first")
        tok_src = Path(bundle) / "tokenizer.json"

    import torch

    t0 = time.time()
    tj = gemma4_tokenizer(tok_src)
    types, shared = layer_plan(args.layers)
    model = build_model(args.layers, args.seed)
    counts = {part: sum(p.numel() for n, p in model.named_parameters() if n.startswith(f"model.{part}"))
              for part in ("language_model", "vision_tower", "audio_tower")}
    lm = model.model.language_model
    ple = lm.embed_tokens_per_layer.weight.numel()
    print(f"layers {args.layers}: {''.join('F' if t == 'full_attention' else 'S' for t in types)}, "
          f"KV-shared {shared} (layers {args.layers - shared}..{args.layers - 1})" if shared else
          f"layers {args.layers}: {''.join('F' if t == 'full_attention' else 'S' for t in types)}, no KV sharing")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,} "
          f"(text {counts['language_model']:,} of which PLE table {ple:,}; vision {counts['vision_tower']:,}; "
          f"audio {counts['audio_tower']:,}); built in {time.time() - t0:.0f} s")

    # a quick sanity check that activations stay O(1) through the random decoder
    with torch.no_grad():
        ids = torch.tensor([[2, 105, 2364, 107, 9259, 106, 107, 105, 4368, 107]])
        logits = model(input_ids=ids).logits[0, -1]
        top2 = logits.topk(2).values
    print(f"check forward: last logits std {logits.std():.3f}, max {logits.max():.2f}, "
          f"top-2 margin {float(top2[0] - top2[1]):.3f}")

    model.generation_config.eos_token_id = [1, 106]
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 2
    model.save_pretrained(out)
    del model
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    check_tokenizer(out / "tokenizer.json")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
         "mask_token": "<mask>"}, indent=1) + "\n")
    (out / "e2b_shaped.json").write_text(json.dumps(
        {"made_by": "deploy/models/make_e2b_shaped.py", "seed": args.seed, "layers": args.layers,
         "e2b_layers": E2B_LAYERS, "kv_shared_layers": shared, "layer_types": types,
         "tokenizer_source": str(tok_src), "random_weights": True}, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"checkpoint: {out} ({size / 1e9:.2f} GB) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
