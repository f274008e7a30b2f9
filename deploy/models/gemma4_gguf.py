#!/usr/bin/env python3
"""Convert the text decoder of a Hugging Face Gemma 4 checkpoint to a GGUF file for llama.cpp.

    python deploy/models/gemma4_gguf.py --checkpoint DIR --out FILE.gguf [--type f32|f16|q8_0|q4_0]
        [--output-layer q8_0|q4_0]

DIR is a Gemma 4 checkpoint as `save_pretrained` writes it: config.json, *.safetensors and
tokenizer.json (tokenizer_config.json, generation_config.json and chat_template.jinja are read
when present). The GGUF holds exactly those weights, under the names and with the metadata that
the llama.cpp vendored by `llama-cpp-sys-2` (src/models/gemma4.cpp, arch `gemma4`) loads:
per-layer embeddings, sliding and full attention layers with their own head sizes, KV sharing,
proportional RoPE on the full layers, the final logit soft-cap. Vision and audio towers are left
out: llama.cpp keeps them in a separate mmproj file, and the benchmark runs text only.

Why it exists: `outpost-bench` measures our runtime beside llama.cpp on the same weights, and the
vendored convert_hf_to_gguf.py has no Gemma 4 converter. The hyperparameters and tensor names
follow upstream llama.cpp's `Gemma4Model` converter (conversion/gemma.py), checked against the
vendored C++ loader, which is the one that has to read the file.

--type: f32 (default) keeps the checkpoint's values (bf16/f16 widen exactly); f16 stores the
matrices in f16; q8_0 quantizes every matrix whose rows are a multiple of 32 long with
gguf.quants (the others go f16); q4_0 stores the decoder's projections (q/k/v/o, gate/up/down)
in Q4_0, quantized by `onnx_tract.q4_0_pack` as `prepare_gemma4.py --quantize q4_0` quantizes
them (so our bundle and this file hold the same values), and the rest as q8_0 does. Norms,
scalars and rope_freqs stay f32 in every case. --output-layer q4_0 stores the token table (tied to
the output layer) in Q4_0 too, as `prepare_gemma4.py --output-layer q4_0` does.

Tensors are read one at a time through a memory map and written in row chunks, so the memory
needed is a few chunks, not the model: the E2B per-layer embedding table alone is over 9 GB in f32.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

import gguf

log = logging.getLogger("gemma4_gguf")

CHUNK_BYTES = 64 << 20  # f32 bytes read and converted at a time
# Gemma 4 tokens the chat parser must see in the output (upstream marks them USER_DEFINED so that
# llama.cpp renders them instead of hiding them as control tokens).
VISIBLE_TOKENS = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                  "<tool_response|>", '<|"|>'}
# Weights of the multimodal parts, which llama.cpp keeps out of the text model's file.
MULTIMODAL_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
                       "vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.")


class CheckpointError(Exception):
    """A checkpoint this converter cannot turn into a loadable, equivalent GGUF."""


# --- safetensors -----------------------------------------------------------------------------

@dataclass
class StoredTensor:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int


SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


class Safetensors:
    """The tensors of every *.safetensors file in a directory, read lazily (memory-mapped).

    Parsed by hand rather than through torch so that bf16 checkpoints need no torch and a tensor
    can be read a few rows at a time."""

    def __init__(self, directory: Path):
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory}: no *.safetensors file (is it a save_pretrained checkpoint?)")
        self.tensors: dict[str, StoredTensor] = {}
        for path in files:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise CheckpointError(f"{path}: too short to be a safetensors file")
                (header_len,) = struct.unpack("<Q", head)
                try:
                    header = json.loads(f.read(header_len))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
            data_start = 8 + header_len
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                self.tensors[name] = StoredTensor(path, info["dtype"], tuple(info["shape"]), data_start + begin,
                                                  end - begin)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor (along its first axis) as float32."""
        t = self.tensors[name]
        dtype = SAFETENSORS_DTYPES[t.dtype]  # checked when the tensor was planned
        shape = t.shape or (1,)  # a 0-d scalar is read as one row
        row = math.prod(shape[1:])
        raw = np.memmap(t.path, dtype=dtype, mode="r", offset=t.offset + start * row * dtype.itemsize,
                        shape=((stop - start) * row,))
        if t.dtype == "BF16":
            # bf16 is the top half of an f32: widening is exact.
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.astype(np.float32)
        return out.reshape((stop - start,) + shape[1:])


# --- configuration ---------------------------------------------------------------------------

@dataclass
class Layer:
    sliding: bool
    head_dim: int
    n_kv_heads: int
    has_kv: bool  # False: reuses the K/V of an earlier layer (KV sharing)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def text_config(config: dict, config_path: Path) -> tuple[dict, str]:
    """The decoder's config and the prefix of its tensor names, for both ways a checkpoint is saved
    (the multimodal Gemma4ForConditionalGeneration, or the text-only Gemma4ForCausalLM)."""
    model_type = config.get("model_type")
    if model_type == "gemma4" and isinstance(config.get("text_config"), dict):
        return config["text_config"], "model.language_model."
    if model_type == "gemma4_text":
        return config, "model."
    raise CheckpointError(f"{config_path}: not a Gemma 4 checkpoint (model_type {model_type!r}, expected 'gemma4' "
                          "with a text_config, or 'gemma4_text')")


def layer_plan(cfg: dict) -> list[Layer]:
    n_layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if not types or len(types) != n_layers:
        raise CheckpointError(f"config: layer_types must list all {n_layers} layers")
    # Two config spellings: newer transformers write per_layer_config (overrides by layer index),
    # the released checkpoints global_head_dim / num_global_key_value_heads for the full layers.
    per_layer = cfg.get("per_layer_config")
    if per_layer is None:
        full = {"head_dim": cfg.get("global_head_dim", 512)}
        if cfg.get("attention_k_eq_v") and cfg.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = cfg["num_global_key_value_heads"]
        per_layer = {str(i): full for i, t in enumerate(types) if t == "full_attention"}
    first_shared = n_layers - cfg.get("num_kv_shared_layers", 0)
    layers = []
    for i, t in enumerate(types):
        if t not in ("sliding_attention", "full_attention"):
            raise CheckpointError(f"config: layer {i} has type {t!r}")
        override = per_layer.get(str(i), per_layer.get(i, {})) or {}
        layers.append(Layer(sliding=t == "sliding_attention",
                            head_dim=override.get("head_dim", cfg["head_dim"]),
                            n_kv_heads=override.get("num_key_value_heads", cfg["num_key_value_heads"]),
                            has_kv=i < first_shared))
    return layers


def check_supported(cfg: dict, layers: list[Layer]) -> None:
    """Refuses what the vendored llama.cpp would load but compute differently from transformers."""
    if cfg.get("enable_moe_block"):
        raise CheckpointError("config: enable_moe_block (the 26B-A4B MoE) is not supported by this converter")
    if cfg.get("use_bidirectional_attention") == "all":
        raise CheckpointError("config: use_bidirectional_attention='all' is not supported")
    if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise CheckpointError(f"config: hidden_activation {cfg['hidden_activation']!r}; llama.cpp's gemma4 uses "
                              "the tanh GELU")
    # llama.cpp has one head size for all sliding layers and one for all full layers (n_embd_head_k_swa /
    # n_embd_head_k_full, llama-hparams.cpp n_embd_head_k()).
    for sliding in (True, False):
        dims = {layer.head_dim for layer in layers if layer.sliding == sliding}
        if len(dims) > 1:
            raise CheckpointError(f"config: {'sliding' if sliding else 'full'} layers have several head sizes {dims}")
    if {layer.sliding for layer in layers} != {True, False}:
        raise CheckpointError("config: llama.cpp's gemma4 needs both sliding and full attention layers")
    n_kv = sum(layer.has_kv for layer in layers)
    if n_kv < len(layers):
        # llama-model.cpp (the gemma4 layer_reuse_cb): a shared sliding layer reads layer n_kv-2, a shared
        # full layer n_kv-1. transformers reads the last unshared layer of the same type: the same layers
        # only when the last unshared layer is full and the one before it sliding.
        if n_kv < 2 or layers[n_kv - 1].sliding or not layers[n_kv - 2].sliding:
            raise CheckpointError(f"config: KV sharing from layer {n_kv} needs layer {n_kv - 1} full and layer "
                                  f"{n_kv - 2} sliding for llama.cpp to share the same layers transformers does")
    if (cfg.get("hidden_size_per_layer_input") or 0) and \
            cfg.get("vocab_size_per_layer_input", cfg["vocab_size"]) != cfg["vocab_size"]:
        raise CheckpointError("config: vocab_size_per_layer_input differs from vocab_size; llama.cpp indexes both "
                              "tables with the same token id")


def rope_freqs(cfg: dict, head_dim_full: int) -> np.ndarray:
    """llama.cpp rotates all head_dim dims of a full layer (NEOX pairs i, i+head_dim/2, frequency
    base^(-2i/head_dim)) and divides frequency i by this tensor. transformers' proportional RoPE
    gives the first partial_rotary_factor * head_dim / 2 pairs base^(-2i/head_dim) / factor and the
    rest frequency 0: so `factor` for the rotated pairs and 1e30 (angle 0) for the others."""
    params = cfg["rope_parameters"]["full_attention"]
    rope_type = params.get("rope_type", "default")
    factor = float(params.get("factor", 1.0))
    if rope_type == "proportional":
        rotated = int(params.get("partial_rotary_factor", 1.0) * head_dim_full // 2)
    elif rope_type == "default" and params.get("partial_rotary_factor", 1.0) == 1.0:
        rotated, factor = head_dim_full // 2, 1.0
    else:
        raise CheckpointError(f"config: full-attention rope {params} is not supported")
    return np.array([factor] * rotated + [1e30] * (head_dim_full // 2 - rotated), dtype=np.float32)


# --- tensors ---------------------------------------------------------------------------------

@dataclass
class Planned:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows first): ggml's ne reversed
    read: Callable[[int, int], np.ndarray]  # rows [start, stop) as float32


LAYER_TENSORS = {  # transformers name in layer N -> GGUF name in blk.N (llama-arch.cpp LLM_TENSOR_NAMES)
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "per_layer_input_gate.weight": "inp_gate.weight",
    "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight",
    "layer_scalar": "layer_output_scale.weight",
}
KV_TENSORS = {"self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight"}
OPTIONAL_LAYER_TENSORS = {"self_attn.v_proj.weight",  # absent with attention_k_eq_v (V = K)
                          "layer_scalar"}  # a buffer of ones; llama.cpp's out_scale is optional too


def plan_tensors(st: Safetensors, cfg: dict, prefix: str, layers: list[Layer]) -> tuple[list[Planned], list[int]]:
    """The GGUF tensors in writing order, and each layer's feed-forward width."""
    hidden, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    ple = cfg.get("hidden_size_per_layer_input") or 0
    vocab = cfg["vocab_size"]
    n_layers = len(layers)
    used: set[str] = set()
    planned: list[Planned] = []

    def add(hf: str, gguf_name: str, expected: tuple[int, ...] | None, required: bool = True) -> tuple[int, ...] | None:
        stored = st.tensors.get(hf)
        if stored is None:
            if required:
                raise CheckpointError(f"checkpoint: tensor {hf} is missing")
            return None
        if stored.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"checkpoint: {hf} is {stored.dtype}; F32, F16 or BF16 expected")
        shape = stored.shape if stored.shape else (1,)
        if expected is not None and shape != expected:
            raise CheckpointError(f"checkpoint: {hf} has shape {list(shape)}, the config implies {list(expected)}")
        used.add(hf)
        planned.append(Planned(gguf_name, shape, lambda a, b, hf=hf: st.rows(hf, a, b)))
        return shape

    add(prefix + "embed_tokens.weight", "token_embd.weight", (vocab, hidden))
    if ple:
        add(prefix + "embed_tokens_per_layer.weight", "per_layer_token_embd.weight", (vocab, n_layers * ple))
        add(prefix + "per_layer_model_projection.weight", "per_layer_model_proj.weight", (n_layers * ple, hidden))
        add(prefix + "per_layer_projection_norm.weight", "per_layer_proj_norm.weight", (ple,))
    add(prefix + "norm.weight", "output_norm.weight", (hidden,))
    if not cfg.get("tie_word_embeddings", True):
        add("lm_head.weight", "output.weight", (vocab, hidden))

    freqs = rope_freqs(cfg, next(layer.head_dim for layer in layers if not layer.sliding))
    planned.append(Planned("rope_freqs.weight", freqs.shape, lambda a, b: freqs[a:b]))

    n_ff = []
    for i, layer in enumerate(layers):
        hd, kv = layer.head_dim, layer.n_kv_heads * layer.head_dim
        gate = st.tensors.get(f"{prefix}layers.{i}.mlp.gate_proj.weight")
        ff = gate.shape[0] if gate else cfg["intermediate_size"]  # wider in KV-shared layers with use_double_wide_mlp
        n_ff.append(ff)
        expected = {
            "input_layernorm.weight": (hidden,), "self_attn.q_proj.weight": (n_heads * hd, hidden),
            "self_attn.k_proj.weight": (kv, hidden), "self_attn.v_proj.weight": (kv, hidden),
            "self_attn.o_proj.weight": (hidden, n_heads * hd), "self_attn.q_norm.weight": (hd,),
            "self_attn.k_norm.weight": (hd,), "post_attention_layernorm.weight": (hidden,),
            "pre_feedforward_layernorm.weight": (hidden,), "mlp.gate_proj.weight": (ff, hidden),
            "mlp.up_proj.weight": (ff, hidden), "mlp.down_proj.weight": (hidden, ff),
            "post_feedforward_layernorm.weight": (hidden,), "per_layer_input_gate.weight": (ple, hidden),
            "per_layer_projection.weight": (hidden, ple), "post_per_layer_input_norm.weight": (hidden,),
            "layer_scalar": (1,),
        }
        for hf_suffix, gguf_suffix in LAYER_TENSORS.items():
            hf = f"{prefix}layers.{i}.{hf_suffix}"
            if hf_suffix.startswith(("per_layer_", "post_per_layer")) and not ple:
                continue
            if hf_suffix in KV_TENSORS and not layer.has_kv:
                # KV-shared layers never use their own K/V (llama.cpp: has_kv(il) is false, the tensors are
                # optional); transformers does not save them, older saves may: leave them out either way.
                used.add(hf)
                continue
            add(hf, f"blk.{i}.{gguf_suffix}", expected[hf_suffix], required=hf_suffix not in OPTIONAL_LAYER_TENSORS)

    # Every decoder weight must have gone somewhere: a dropped one would give a file that loads and is wrong.
    leftover = [n for n in st.tensors if n not in used and not n.startswith(MULTIMODAL_PREFIXES)
                and not (cfg.get("tie_word_embeddings", True) and n == "lm_head.weight")]
    if leftover:
        raise CheckpointError(f"checkpoint: tensors this converter does not know: {', '.join(sorted(leftover)[:8])}")
    return planned, n_ff


# --- tokenizer -------------------------------------------------------------------------------

def add_tokenizer(writer: gguf.GGUFWriter, ckpt: Path, cfg: dict, n_vocab: int) -> None:
    tj = read_json(ckpt / "tokenizer.json", "the tokenizer, needed for the GGUF's vocabulary")
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"{ckpt / 'tokenizer.json'}: a {model.get('type')} tokenizer; Gemma 4's is BPE")
    tokens: list[str | None] = [None] * n_vocab
    types = [gguf.TokenType.NORMAL] * n_vocab
    for text, i in model["vocab"].items():
        if i >= n_vocab:
            raise CheckpointError(f"tokenizer.json: token {text!r} has id {i}, beyond the {n_vocab} embedding rows")
        tokens[i] = text
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types[i] = gguf.TokenType.BYTE
    for added in tj.get("added_tokens", []):
        i, text = added["id"], added["content"]
        if i >= n_vocab:
            raise CheckpointError(f"tokenizer.json: added token {text!r} has id {i}, beyond {n_vocab} rows")
        tokens[i] = text
        if added.get("special") and text not in VISIBLE_TOKENS:
            types[i] = gguf.TokenType.CONTROL
        else:
            types[i] = gguf.TokenType.USER_DEFINED
    for i, text in enumerate(tokens):
        if text is None:  # embedding rows no token maps to (padding of the table)
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED

    if model.get("byte_fallback"):
        # The released Gemma 4 tokenizer: SentencePiece-style BPE (spaces as U+2581, <0xXX> byte
        # tokens). llama-vocab.cpp: tokenizer model "gemma4" -> BPE with pre-tokenizer GEMMA4.
        writer.add_tokenizer_model("gemma4")
    elif (tj.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        # A GPT-2 style byte-level BPE (the tiny test checkpoint's): "gemma4" would escape spaces as
        # U+2581 and split differently; llama.cpp's "gpt2" model with the GPT-2 pre-tokenizer is the
        # one that tokenizes as this tokenizer.json does.
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
    else:
        raise CheckpointError("tokenizer.json: neither a byte-fallback (Gemma 4) nor a byte-level BPE")
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0] * n_vocab)  # BPE ranks come from the merges; upstream writes -1000 too
    writer.add_token_types([int(t) for t in types])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_token_merges(merges)

    ids = {text: i for i, text in enumerate(tokens)}
    tok_cfg = {}
    if (ckpt / "tokenizer_config.json").is_file():
        tok_cfg = read_json(ckpt / "tokenizer_config.json", "tokenizer settings")

    def special(kind: str, fallback: int | list | None) -> int | None:
        text = tok_cfg.get(f"{kind}_token")
        if isinstance(text, dict):
            text = text.get("content")
        if text in ids:
            return ids[text]
        return fallback[0] if isinstance(fallback, list) else fallback

    for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id),
                      ("mask", writer.add_mask_token_id)):
        token_id = special(kind, cfg.get(f"{kind}_token_id"))
        if token_id is not None:
            add(token_id)
    # Gemma prompts start with <bos> (llama.cpp forces it for the gemma4 tokenizer anyway).
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    template = ckpt / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text(encoding="utf-8"))
    elif isinstance(tok_cfg.get("chat_template"), str):
        writer.add_chat_template(tok_cfg["chat_template"])


# --- writing ---------------------------------------------------------------------------------

# The decoder's projections, which prepare_gemma4.py --quantize q4_0 stores in Q4_0.
PROJECTIONS = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")


def storage_type(name: str, shape: tuple[int, ...], wanted: str, output_layer: str = "q8_0") -> gguf.GGMLQuantizationType:
    if len(shape) == 1 or wanted == "f32":
        return gguf.GGMLQuantizationType.F32  # norms, scalars, rope_freqs: ggml multiplies by them in f32
    if output_layer == "q4_0" and name == "token_embd.weight":
        return gguf.GGMLQuantizationType.Q4_0
    if wanted == "q4_0" and shape[-1] % 32 == 0 and PROJECTIONS.fullmatch(name):
        return gguf.GGMLQuantizationType.Q4_0
    if wanted in ("q8_0", "q4_0") and shape[-1] % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16  # f16, and q8_0's fallback for rows that do not fill 32-blocks


def encode(rows: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(rows, dtype="<f4")
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(rows, dtype="<f2")
    if qtype == gguf.GGMLQuantizationType.Q4_0:
        from onnx_tract import q4_0_blocks

        return q4_0_blocks(rows)
    return gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), qtype)  # blocks never cross rows


def chunks(t: Planned, qtype: gguf.GGMLQuantizationType) -> Iterator[np.ndarray]:
    rows = t.shape[0]
    per_row = math.prod(t.shape[1:]) * 4
    step = max(1, CHUNK_BYTES // per_row)
    for start in range(0, rows, step):
        yield encode(t.read(start, min(rows, start + step)), qtype)


def convert(ckpt: Path, out: Path, wanted: str, output_layer: str = "q8_0") -> None:
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    config = read_json(ckpt / "config.json", "the model configuration")
    cfg, prefix = text_config(config, ckpt / "config.json")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "rope_parameters", "sliding_window", "rms_norm_eps", "max_position_embeddings"):
        if key not in cfg:
            raise CheckpointError(f"{ckpt / 'config.json'}: text config has no {key!r}")
    layers = layer_plan(cfg)
    check_supported(cfg, layers)
    st = Safetensors(ckpt)
    planned, n_ff = plan_tensors(st, cfg, prefix, layers)

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA4]
    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(ckpt.resolve().name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[wanted])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    sliding = next(layer for layer in layers if layer.sliding)
    full = next(layer for layer in layers if not layer.sliding)
    rope = cfg["rope_parameters"]
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length(n_ff[0] if len(set(n_ff)) == 1 else n_ff)
    writer.add_head_count(cfg["num_attention_heads"])
    n_kv_heads = [layer.n_kv_heads for layer in layers]
    writer.add_head_count_kv(n_kv_heads[0] if len(set(n_kv_heads)) == 1 else n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    # key_length is the full layers' head size, key_length_swa the sliding layers' (llama-hparams.cpp
    # n_embd_head_k(il) picks by is_swa(il)).
    writer.add_key_length(full.head_dim)
    writer.add_value_length(full.head_dim)
    writer.add_key_length_swa(sliding.head_dim)
    writer.add_value_length_swa(sliding.head_dim)
    # Full layers rotate all dims and rope_freqs switches the unrotated ones off; sliding layers rotate
    # partial_rotary_factor of theirs. Without dimension_count_swa llama.cpp would take the full size.
    writer.add_rope_dimension_count(full.head_dim)
    sliding_rope = rope["sliding_attention"]
    if sliding_rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"config: sliding-attention rope {sliding_rope} is not supported")
    writer.add_rope_dimension_count_swa(int(sliding.head_dim * sliding_rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    writer.add_rope_freq_base_swa(sliding_rope["rope_theta"])
    # transformers and llama.cpp (LLAMA_SWA_TYPE_STANDARD) both let a token see the last `window` positions.
    writer.add_sliding_window(cfg["sliding_window"])
    writer.add_sliding_window_pattern([layer.sliding for layer in layers])
    writer.add_shared_kv_layers(cfg.get("num_kv_shared_layers", 0))
    writer.add_embedding_length_per_layer_input(cfg.get("hidden_size_per_layer_input") or 0)
    if cfg.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])

    add_tokenizer(writer, ckpt, cfg, cfg["vocab_size"])

    types = []
    for t in planned:
        qtype = storage_type(t.name, t.shape, wanted, output_layer)
        types.append(qtype)
        if qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
            byte_shape = gguf.quants.quant_shape_to_byte_shape(t.shape, qtype)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
        else:
            dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(t.name, t.shape, dtype, math.prod(t.shape) * dtype.itemsize)

    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # Tensor data in the order of the infos, each aligned as GGUFWriter.write_tensor_data aligns it, but
    # written chunk by chunk so that no tensor has to be in memory whole.
    fout = writer.fout[0]
    for t, qtype in zip(planned, types):
        expected = writer.tensors[0].pop(t.name).nbytes
        writer.write_padding(fout, fout.tell())
        written = 0
        for chunk in chunks(t, qtype):
            chunk.tofile(fout)
            written += chunk.nbytes
        if written != expected:
            raise RuntimeError(f"{t.name}: wrote {written} bytes, the header says {expected}")
        writer.write_padding(fout, written)
        log.info("%-32s %-6s %s", t.name, qtype.name, list(t.shape))
    writer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="Hugging Face Gemma 4 checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    parser.add_argument("--type", choices=("f32", "f16", "q8_0", "q4_0"), default="f32", help="storage of the matrices")
    parser.add_argument("--output-layer", choices=("q8_0", "q4_0"), default="q8_0",
                        help="with --type q8_0 or q4_0: storage of the token table, which is also the output layer")
    args = parser.parse_args()
    if args.output_layer == "q4_0" and args.type not in ("q8_0", "q4_0"):
        parser.error("--output-layer q4_0 goes with --type q8_0 or q4_0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert(args.checkpoint, args.out, args.type, args.output_layer)
    except CheckpointError as e:
        print(f"gemma4_gguf: {e}", file=sys.stderr)
        args.out.unlink(missing_ok=True)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
