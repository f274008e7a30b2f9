#!/usr/bin/env python3
"""Prepare an outpostd model bundle from a Hugging Face Gemma 4 checkpoint directory.

    python deploy/models/prepare_gemma4.py --checkpoint DIR --out BUNDLE [--quantize q4_0|q8_0] [--output-layer q4_0]

DIR is a Gemma 4 checkpoint as `save_pretrained` writes it and as it is downloaded elsewhere:
config.json and *.safetensors, with tokenizer.json beside them. The model is instruction-tuned
(the runtime applies the chat template) when DIR has chat_template.jinja or a `chat_template` in
tokenizer_config.json. processor_config.json / preprocessor_config.json, when present, set the
image and audio preprocessing; transformers' Gemma 4 defaults otherwise. Nothing is downloaded.

The bundle: embed.onnx, decoder.onnx, vision.onnx, audio.onnx (opset 18, rewritten for tract;
a graph over 64 MiB keeps its weights in NAME.onnx.data), tokenizer.json and manifest.json (sha256
of every file). Before the manifest is written the graphs are run with onnxruntime against the
PyTorch model: embeddings, encoders, prefill and decode logits, and 32 greedy tokens for a text,
an image and an audio prompt. The figures go into the manifest's `parity`; the script exits with
1 when a greedy run differs from PyTorch's.

--quantize q4_0 or q8_0 rewrites the decoder's projection weights (q/k/v/o, gate/up/down of the
layers given by --layers, default all): q4_0 into com.microsoft MatMulNBits (4 bits, block 32, no
zero points: GGML's Q4_0); q8_0 into ai.outpost MatMulQ8_0 nodes (int8 weights, llama.cpp's Q8_0
rounding), each layer's q/k/v and its gate/up merged into one node. The per-layer inputs'
projections (those layers' gate and projection, and the model's projection into every layer's
input) go to MatMulQ8_0 either way, as gemma4_gguf.py stores them. The runtime multiplies both
with its own kernels (daemon/src/model/block_matmul.rs). Either way the output matmul and its
soft-cap leave the decoder graph, which then gives hidden_states: output_layer.q8_0 holds the
matrix as GGML Q8_0 blocks for the runtime's own kernels (daemon/src/model/output_layer.rs), and
the embed graph is dropped: Gemma 4 ties its token table to the output layer, so token rows are
read from output_layer.q8_0 (with --output-layer q4_0: output_layer.q4_0, GGML Q4_0 blocks, half
the bytes), and the per-layer embedding table goes to per_layer_embeddings.q8_0
(Q8_0 rows, read from disk a row per token: E2B's is 262144 x 8960, 2.5 GB in Q8_0, more than the
whole model may hold in memory). The f32 graphs are checked against PyTorch first; the quantized
ones are then compared with the f32 ones (greedy tokens and teacher-forced next-token agreement,
onnxruntime running a twin that computes as the runtime does: MatMulQ8_0 weights dequantized,
activations of the quantized products rounded to Q8_0 first), and those figures go into
`parity.quantized`.

--reference DIR also writes the PyTorch/onnxruntime outputs of the checks as .npy files and a
reference.json (the tiny test model's fixtures are made this way by make_tiny_gemma4.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnx_tract  # noqa: E402
from onnx_tract import (OUTPUT_LAYER_FILES, Q8_BLOCK, cache_presents, decoder_cache_and_masks,  # noqa: E402
                        runtime_twin, export, fix_string_hashing, fold_shape_only_ranges,
                        fuse_block_siblings, graph_io, kv_names, maxdiff, output_layer_logits, quantize_q4_0,
                        quantize_q8_0, read_blocks, rename_dims, save_graph, sha256, split_output_layer,
                        q8_0_rows, write_q4_0_blocks, write_q8_0_blocks)

REPO = Path(__file__).resolve().parents[2]
SPEECH_WAV = REPO / "daemon" / "media" / "speech.wav"
SEED = 20260402
AUDIO_MAX_FRAMES = 3000  # 30 s of 10 ms frames -> 750 audio soft tokens (the Gemma 4 cap)
PATCH_PIXELS = 3 * 16 * 16
GRAPHS = ("embed", "decoder", "vision", "audio")
PER_LAYER_FILE = "per_layer_embeddings.q8_0"
# Graphs with more weight bytes than this keep them in NAME.onnx.data: tract then reads each
# tensor from that file, where an embedded graph's protobuf holds all the weights beside tract's
# copies while it is parsed (an E2B vision graph: 449 MB for 226 MB of Q8_0). Smaller graphs, the
# tiny test model's among them, stay one file.
EXTERNAL_DATA_BYTES = 64 << 20
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The per-layer inputs' projections: each layer's gate and projection back, and the model's
# projection of the token embedding into every layer's input (E2B: 41 M parameters).
LAYER_PER_LAYER_PROJECTIONS = ("per_layer_input_gate", "per_layer_projection")
MODEL_PER_LAYER_PROJECTION = "per_layer_model_projection"
# The Gemma 4 special tokens the runtime needs, by their text in tokenizer.json.
SPECIAL_TOKEN_TEXT = {
    "pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>", "mask": "<mask>",
    "start_of_turn": "<|turn>", "end_of_turn_text": "<turn|>",
    "image": "<|image|>", "begin_image": "<|image>", "end_image": "<image|>",
    "audio": "<|audio|>", "begin_audio": "<|audio>", "end_audio": "<audio|>",
    "video": "<|video|>", "think": "<|think|>",
    "tool": ("<|tool>", "<tool|>"), "tool_call": ("<|tool_call>", "<tool_call|>"),
    "tool_response": ("<|tool_response>", "<tool_response|>"), "string_delim": '<|"|>',
}


def chat(user):
    return f"<bos><|turn>user\n{user}<turn|>\n<|turn>model\n"


# ----------------------------------------------------------------------------------------------
# checkpoint
# ----------------------------------------------------------------------------------------------

class CheckpointError(SystemExit):
    pass


def freeze_clip_bounds(model):
    """E2B's vision and audio linears clamp their inputs and outputs by bounds kept as buffers
    (`use_clipped_linears`). Traced as tensors, the exporter's optimizer folds the clamps into
    Clip nodes whose bound inputs it never defines (the graph fails onnx.checker), and without
    the optimizer the vision graph keeps SplitToSequence, which tract cannot load. The bounds are
    constants of the checkpoint: clamp by their values instead (the same outputs), and not at all
    by an infinite one."""
    import types

    import torch
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    def bounded(low, high):
        low, high = float(low), float(high)
        if math.isinf(low) and math.isinf(high):
            return lambda x: x
        return lambda x: torch.clamp(x, None if math.isinf(low) else low, None if math.isinf(high) else high)

    for module in model.modules():
        if isinstance(module, Gemma4ClippableLinear) and module.use_clipped_linears:
            clip_in = bounded(module.input_min, module.input_max)
            clip_out = bounded(module.output_min, module.output_max)
            module.forward = types.MethodType(lambda self, x, i=clip_in, o=clip_out: o(self.linear(i(x))), module)


def load_checkpoint(ckpt: Path):
    """(model in f32 with eager attention, tokenizers.Tokenizer, instruction_tuned, image
    processor, audio feature extractor) from a checkpoint directory, with a clear error for each
    missing piece."""
    import torch
    from tokenizers import Tokenizer
    from transformers import Gemma4ForConditionalGeneration
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_gemma4 import Gemma4ImageProcessor

    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"{ckpt}: no config.json: give the directory of a Hugging Face Gemma 4 checkpoint")
    config = json.loads((ckpt / "config.json").read_text())
    if config.get("model_type") != "gemma4":
        raise CheckpointError(f"{ckpt / 'config.json'}: model_type is {config.get('model_type')!r}, "
                              "expected 'gemma4' (Gemma 3 text models: prepare_gemma3.py)")
    if not any(ckpt.glob("*.safetensors")):
        raise CheckpointError(f"{ckpt}: no *.safetensors weights beside config.json")
    if not (ckpt / "tokenizer.json").is_file():
        raise CheckpointError(f"{ckpt}: no tokenizer.json (it comes with the checkpoint)")
    model = Gemma4ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    freeze_clip_bounds(model)
    cfg = model.config
    for sub in (cfg, cfg.text_config, cfg.vision_config, cfg.audio_config):
        sub._attn_implementation = "eager"
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))

    tok_cfg = ckpt / "tokenizer_config.json"
    instruction_tuned = (ckpt / "chat_template.jinja").is_file() or (
        tok_cfg.is_file() and "chat_template" in json.loads(tok_cfg.read_text()))

    def processor_section(key):
        for name in ("processor_config.json", "preprocessor_config.json"):
            p = ckpt / name
            if p.is_file():
                d = json.loads(p.read_text())
                return d.get(key, d if name == "preprocessor_config.json" and key == "image_processor" else {})
        return {}

    def known(cls, d):
        keys = cls().to_dict().keys()
        return {k: v for k, v in d.items() if k in keys}

    image_processor = Gemma4ImageProcessor(**known(Gemma4ImageProcessor, processor_section("image_processor")))
    feature_extractor = Gemma4AudioFeatureExtractor(
        **known(Gemma4AudioFeatureExtractor, processor_section("feature_extractor")))
    return model, tok, instruction_tuned, image_processor, feature_extractor


def special_tokens(tok):
    """Token ids of the Gemma 4 special tokens, looked up by text; an error names a missing one."""
    def id_of(text):
        i = tok.token_to_id(text)
        if i is None:
            raise CheckpointError(f"tokenizer.json has no {text!r} token: not a Gemma 4 tokenizer")
        return i

    ids = {}
    for role, text in SPECIAL_TOKEN_TEXT.items():
        ids[role] = [id_of(t) for t in text] if isinstance(text, tuple) else id_of(text)
    ids["end_of_turn"] = [ids["eos"], ids.pop("end_of_turn_text")]
    return ids


# ----------------------------------------------------------------------------------------------
# export wrappers
# ----------------------------------------------------------------------------------------------

def make_wrappers(model):
    import torch
    from torch import nn

    cfg = model.config
    tc = cfg.text_config
    lm = model.model.language_model
    n_cache = tc.num_hidden_layers - tc.num_kv_shared_layers  # layers that own a KV cache
    mm_ids = [cfg.image_token_id, cfg.audio_token_id, cfg.video_token_id]

    class Embed(nn.Module):
        """input_ids -> (inputs_embeds, per_layer_inputs). Multimodal placeholder ids are looked up
        as <pad>, as Gemma4Model.forward does; the host then overwrites those rows of
        inputs_embeds with the vision/audio soft tokens."""

        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            mm = (input_ids == mm_ids[0]) | (input_ids == mm_ids[1]) | (input_ids == mm_ids[2])
            ids = torch.where(mm, torch.zeros_like(input_ids), input_ids)
            emb = self.lm.embed_tokens(ids)
            ple = self.lm.embed_tokens_per_layer(ids).reshape(
                ids.shape[0], ids.shape[1], tc.num_hidden_layers, tc.hidden_size_per_layer_input)
            return emb, ple

    class Decoder(nn.Module):
        """(inputs_embeds, per_layer_inputs, past K/V of the cache-owning layers) ->
        (logits, present K/V). Positions are past_len + arange(seq); batch 1, no padding.
        Uses a plain DynamicCache (no sliding-window cache) and explicit additive masks."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, inputs_embeds, per_layer_inputs, *past):
            cache, position_ids, masks = decoder_cache_and_masks(past, inputs_embeds.shape[1], tc.sliding_window)
            out = self.model.model.language_model(
                inputs_embeds=inputs_embeds, per_layer_inputs=per_layer_inputs, attention_mask=masks,
                position_ids=position_ids, cache=cache, use_cache=True, return_dict=True)
            logits = self.model.lm_head(out.last_hidden_state)
            cap = tc.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
            return (logits, *cache_presents(cache, n_cache))

    class Vision(nn.Module):
        """(pixel_values [1,N,768] in [0,1], pixel_position_ids [1,N,2] (x,y), -1 = padding) ->
        (image_embeds [1,N/9,hidden] already projected into the text space, image_mask [1,N/9]).
        Padded soft tokens (mask false) must be dropped by the host. N must be a multiple of 9."""

        def __init__(self):
            super().__init__()
            self.vt = model.model.vision_tower
            self.ev = model.model.embed_vision

        def forward(self, pixel_values, pixel_position_ids):
            vt = self.vt
            k = cfg.vision_config.pooling_kernel_size
            n = pixel_values.shape[1]
            length = n // (k * k)
            padding = (pixel_position_ids[..., 0] < 0) & (pixel_position_ids[..., 1] < 0)
            h = vt.patch_embedder(pixel_values, pixel_position_ids, padding)
            h = vt.encoder(inputs_embeds=h, attention_mask=~padding,
                           pixel_position_ids=pixel_position_ids).last_hidden_state
            h = h.masked_fill(padding.unsqueeze(-1), 0.0)
            pos = pixel_position_ids.clamp(min=0)
            max_x = pos[..., 0].max(dim=-1, keepdim=True)[0] + 1
            kid = torch.div(pos, k, rounding_mode="floor")
            kid = kid[..., 0] + torch.div(max_x, k, rounding_mode="floor") * kid[..., 1]
            onehot = (kid[..., None] == torch.arange(length)[None, None, :]).to(torch.float32)
            weights = onehot / float(k * k)
            pooled = weights.transpose(1, 2) @ h
            mask = weights.sum(dim=1) > 0
            pooled = pooled * (cfg.vision_config.hidden_size ** 0.5)
            return self.ev(pooled), mask

    class Audio(nn.Module):
        """(input_features [1,T,128] log-mel, input_features_mask [1,T] bool) with T fixed at
        AUDIO_MAX_FRAMES -> (audio_embeds [1,T/4,hidden], audio_mask [1,T/4])."""

        def __init__(self):
            super().__init__()
            self.at = model.model.audio_tower
            self.ea = model.model.embed_audio

        def forward(self, input_features, input_features_mask):
            out = self.at(input_features, input_features_mask, return_dict=True)
            return self.ea(out.last_hidden_state), out.attention_mask

    return Embed().eval(), Decoder().eval(), Vision().eval(), Audio().eval(), n_cache


# ----------------------------------------------------------------------------------------------
# check inputs
# ----------------------------------------------------------------------------------------------

def read_wav(path: Path):
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2, "expect 16-bit mono"
        sr = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0, sr


def synthetic_image_patches(rng):
    """A 6x6-patch (96x96 px) image, values k/255, padded with 9 padding patches (N=45):
    5 soft-token slots of which 4 are real."""
    pix = rng.integers(0, 256, size=(36, PATCH_PIXELS)).astype(np.float32) * np.float32(1.0 / 255.0)
    pos = np.array([[x, y] for y in range(6) for x in range(6)], dtype=np.int64)
    pix_p = np.concatenate([pix, np.zeros((9, PATCH_PIXELS), np.float32)])[None]
    pos_p = np.concatenate([pos, -np.ones((9, 2), np.int64)])[None]
    return pix[None], pos[None], pix_p, pos_p


def speech_features(fe):
    """The first second of daemon/media/speech.wav through the feature extractor, and padded to
    the audio graph's fixed AUDIO_MAX_FRAMES."""
    wav, sr = read_wav(SPEECH_WAV)
    assert sr == 16000
    clip = wav[:16000]
    feats = fe([clip], sampling_rate=16000, return_tensors="np")
    af = feats["input_features"].astype(np.float32)            # [1, T, 128]
    am = feats["input_features_mask"].astype(bool)             # [1, T]
    frames = af.shape[1]
    af_pad = np.zeros((1, AUDIO_MAX_FRAMES, af.shape[2]), np.float32)
    af_pad[:, :frames] = af
    am_pad = np.zeros((1, AUDIO_MAX_FRAMES), bool)
    am_pad[:, :frames] = am
    return clip, af, am, af_pad, am_pad


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------

def export_graphs(model, out: Path, n_cache, wrappers, image_example, audio_example):
    """The four f32 graphs into `out`; returns (paths, kv_shapes, rewrites)."""
    import torch
    from torch.export import Dim

    embed, decoder, vision, audio = wrappers
    tc = model.config.text_config
    seq, past = Dim("seq", min=1, max=4096), Dim("past_seq", min=0, max=4096)
    paths = {k: out / f"{k}.onnx" for k in GRAPHS}
    rewrites = {}

    ids_ex = torch.tensor([[2, 5, 40, 9, 60]])
    rewrites["embed"] = export(embed, [ids_ex], paths["embed"], ["input_ids"],
                               ["inputs_embeds", "per_layer_inputs"], {"input_ids": {1: seq}})
    rename_dims(paths["embed"], {("input_ids", 1): "seq", ("inputs_embeds", 1): "seq",
                                 ("per_layer_inputs", 1): "seq"})

    (kv_in, kv_out), kv_shapes = kv_names(n_cache), []
    emb_ex = torch.randn(1, 3, tc.hidden_size)
    ple_ex = torch.randn(1, 3, tc.num_hidden_layers, tc.hidden_size_per_layer_input)
    past_ex = []
    for i in range(n_cache):
        hd = tc.per_layer_config[i].head_dim
        nkv = tc.per_layer_config[i].num_key_value_heads
        kv_shapes.append((nkv, hd))
        past_ex += [torch.randn(1, nkv, 5, hd), torch.randn(1, nkv, 5, hd)]
    dyn_list = [{1: seq}, {1: seq}, tuple({2: past} for _ in range(2 * n_cache))]
    rewrites["decoder"] = export(decoder, [emb_ex, ple_ex, *past_ex], paths["decoder"],
                                 ["inputs_embeds", "per_layer_inputs", *kv_in], ["logits", *kv_out],
                                 tuple(dyn_list))
    names = {("inputs_embeds", 1): "seq", ("per_layer_inputs", 1): "seq", ("logits", 1): "seq"}
    for n in kv_in:
        names[(n, 2)] = "past_seq"
    for n in kv_out:
        names[(n, 2)] = "total_seq"
    rename_dims(paths["decoder"], names)

    pix_p, pos_p = image_example
    npatch = Dim("num_patches_div9", min=1, max=1200)
    rewrites["vision"] = export(vision, [torch.from_numpy(pix_p), torch.from_numpy(pos_p)], paths["vision"],
                                ["pixel_values", "pixel_position_ids"], ["image_embeds", "image_mask"],
                                ({1: 9 * npatch}, {1: 9 * npatch}))
    rename_dims(paths["vision"], {("pixel_values", 1): "num_patches", ("pixel_position_ids", 1): "num_patches",
                                  ("image_embeds", 1): "num_soft_tokens", ("image_mask", 1): "num_soft_tokens"})

    af_pad, am_pad = audio_example
    rewrites["audio"] = export(audio, [torch.from_numpy(af_pad), torch.from_numpy(am_pad)], paths["audio"],
                               ["input_features", "input_features_mask"], ["audio_embeds", "audio_mask"],
                               None, optimize=False)
    rewrites["audio"]["range_folded_shape_only"] = fold_shape_only_ranges(paths["audio"])
    return paths, kv_shapes, rewrites


class OnnxModel:
    """onnxruntime sessions of a bundle's graphs with the runtime's calling convention."""

    def __init__(self, paths, kv_shapes, output_layer=None, tables=None):
        """`output_layer`: (q, d, softcap) when the decoder gives hidden states; `tables`: a
        RowTables where the bundle has no embed graph."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        self.sess = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
                     for k, p in paths.items()}
        self.kv_shapes = kv_shapes
        self.output_layer = output_layer
        self.tables = tables

    def run(self, graph, feed):
        res = self.sess[graph].run(None, feed)
        if graph == "decoder" and self.output_layer is not None:
            q, d, softcap = self.output_layer
            res[0] = output_layer_logits(res[0], (q, d), softcap)
        return res

    def embed(self, ids, soft=None, soft_id=None):
        if self.tables is not None:
            e, p = self.tables(ids)
        else:
            e, p = self.run("embed", {"input_ids": np.asarray([ids], np.int64)})
        if soft is not None:
            rows = np.where(np.asarray(ids) == soft_id)[0]
            assert len(rows) == soft.shape[0]
            e[0, rows] = soft
        return e, p

    def empty_past(self):
        feed = {}
        for i, (nkv, hd) in enumerate(self.kv_shapes):
            feed[f"past_key_{i}"] = np.zeros((1, nkv, 0, hd), np.float32)
            feed[f"past_value_{i}"] = np.zeros((1, nkv, 0, hd), np.float32)
        return feed

    def step_feed(self, ids, res):
        e, p = self.embed(ids)
        feed = {"inputs_embeds": e, "per_layer_inputs": p}
        for i in range(len(self.kv_shapes)):
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = res[1 + 2 * i], res[2 + 2 * i]
        return feed

    def greedy(self, ids, soft=None, soft_id=None, steps=32):
        e, p = self.embed(ids, soft, soft_id)
        feed = {"inputs_embeds": e, "per_layer_inputs": p, **self.empty_past()}
        gen, logits_all, margins = [], [], []
        for _ in range(steps):
            res = self.run("decoder", feed)
            last = res[0][0, -1]
            logits_all.append(last)
            srt = np.sort(last)
            margins.append(float(srt[-1] - srt[-2]))
            gen.append(int(last.argmax()))
            feed = self.step_feed([gen[-1]], res)
        return gen, np.stack(logits_all), margins

    def teacher_forced_argmax(self, ids):
        e, p = self.embed(ids)
        return self.run("decoder", {"inputs_embeds": e, "per_layer_inputs": p, **self.empty_past()})[0][0].argmax(-1)


# ----------------------------------------------------------------------------------------------
# checks against PyTorch
# ----------------------------------------------------------------------------------------------

def check_against_pytorch(model, tok, tokens, wrappers, onnx: OnnxModel, image, audio, ref_dir: Path | None):
    """onnxruntime vs PyTorch: encoders, embeddings, prefill and decode logits, and 32 greedy
    tokens for a text, an image and an audio prompt. Returns (parity, greedy, inputs)."""
    import torch

    embed, decoder, vision, audio_wrapper = wrappers
    pix_u, pos_u, pix_p, pos_p = image
    clip, af, am, af_pad, am_pad = audio
    parity = {}

    with torch.no_grad():
        v_ref = model.model.get_image_features(torch.from_numpy(pix_u), torch.from_numpy(pos_u),
                                               return_dict=True).pooler_output[0].numpy()
        v_wrap, v_wmask = vision(torch.from_numpy(pix_p), torch.from_numpy(pos_p))
    v_onnx, v_mask = onnx.run("vision", {"pixel_values": pix_p, "pixel_position_ids": pos_p})
    assert v_mask.tolist() == [[True] * 4 + [False]], v_mask
    parity["vision"] = {"onnx_vs_hf_get_image_features": maxdiff(v_onnx[0][v_mask[0]], v_ref),
                        "torch_wrapper_vs_hf": maxdiff(v_wrap[0][v_wmask[0]].numpy(), v_ref)}
    n_img = int(v_mask.sum())

    with torch.no_grad():
        a_out = model.model.get_audio_features(torch.from_numpy(af), torch.from_numpy(am), return_dict=True)
        a_ref = a_out.pooler_output[0][a_out.attention_mask[0]].numpy()
    a_onnx, a_mask = onnx.run("audio", {"input_features": af_pad, "input_features_mask": am_pad})
    n_aud = int(a_mask.sum())
    assert n_aud == a_ref.shape[0], (n_aud, a_ref.shape)
    parity["audio"] = {"onnx_vs_hf_get_audio_features": maxdiff(a_onnx[0][a_mask[0]], a_ref),
                       "valid_frames": int(am.sum()), "soft_tokens": n_aud}

    prompts = {
        "text": chat("Hello sentinel, is anyone at the front door?"),
        "image": chat("<|image>" + "<|image|>" * n_img + "<image|>Describe the picture."),
        "audio": chat("<|audio>" + "<|audio|>" * n_aud + "<audio|>What do you hear?"),
    }
    greedy = {}
    for name, text in prompts.items():
        ids = tok.encode(text, add_special_tokens=False).ids
        kw, soft, soft_id = {}, None, None
        if name == "image":
            kw = dict(pixel_values=torch.from_numpy(pix_u), image_position_ids=torch.from_numpy(pos_u))
            soft, soft_id = v_onnx[0][v_mask[0]], tokens["image"]
        if name == "audio":
            kw = dict(input_features=torch.from_numpy(af), input_features_mask=torch.from_numpy(am))
            soft, soft_id = a_onnx[0][a_mask[0]], tokens["audio"]
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=32, do_sample=False, eos_token_id=None,
                                pad_token_id=tokens["pad"], output_scores=True, return_dict_in_generate=True, **kw)
            hf_ids = hf.sequences[0, len(ids):].tolist()
            hf_logits = torch.stack(hf.scores)[:, 0].numpy()
        o_ids, o_logits, margins = onnx.greedy(ids, soft, soft_id)
        greedy[name] = {"prompt_ids": ids, "hf_ids": hf_ids, "onnx_ids": o_ids, "equal": hf_ids == o_ids,
                        "max_abs_diff_logits": maxdiff(o_logits, hf_logits), "min_top2_margin": min(margins),
                        "text": tok.decode(o_ids, skip_special_tokens=False)}
        print(f"greedy {name}: equal={hf_ids == o_ids} logits diff={greedy[name]['max_abs_diff_logits']:.2e}"
              f" min margin={min(margins):.3f}")
        if ref_dir:
            np.save(ref_dir / f"greedy_{name}_logits.npy", o_logits.astype(np.float32))
    parity["greedy"] = {k: {kk: v[kk] for kk in ("equal", "max_abs_diff_logits", "min_top2_margin")}
                        for k, v in greedy.items()}

    # prefill, then 4 decode steps with the KV cache, against one full forward pass
    n_cache = len(onnx.kv_shapes)
    kv_in = kv_names(n_cache)[0]
    ids = greedy["text"]["prompt_ids"]
    cont = greedy["text"]["hf_ids"][:4]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids + cont]), use_cache=False).logits[0].numpy()
    e, p = onnx.embed(ids)
    feed = {"inputs_embeds": e, "per_layer_inputs": p, **onnx.empty_past()}
    res = onnx.run("decoder", feed)
    with torch.no_grad():
        tres = decoder(torch.from_numpy(e), torch.from_numpy(p), *[torch.from_numpy(feed[k]) for k in kv_in])
    dec = {"prefill_logits_vs_hf_forward": maxdiff(res[0][0], full[: len(ids)]),
           "prefill_onnx_vs_torch_wrapper_logits": maxdiff(res[0], tres[0].numpy()),
           "prefill_onnx_vs_torch_wrapper_kv": max(maxdiff(a, b.numpy()) for a, b in zip(res[1:], tres[1:]))}
    if ref_dir:
        np.save(ref_dir / "text_prefill_inputs_embeds.npy", e)
        np.save(ref_dir / "text_prefill_per_layer_inputs.npy", p)
        np.save(ref_dir / "text_prefill_logits.npy", res[0])
    step_diffs = []
    for s, t in enumerate(cont):
        res = onnx.run("decoder", onnx.step_feed([t], res))
        step_diffs.append(maxdiff(res[0][0, 0], full[len(ids) + s]))
    dec["decode_steps_vs_hf_forward"] = step_diffs
    parity["decoder"] = dec
    if ref_dir:
        for i in range(n_cache):
            np.save(ref_dir / f"text_after_decode_present_key_{i}.npy", res[1 + 2 * i])
            np.save(ref_dir / f"text_after_decode_present_value_{i}.npy", res[2 + 2 * i])
        np.save(ref_dir / "text_full_forward_logits.npy", full.astype(np.float32))
        np.save(ref_dir / "image_pixel_values_u8.npy", np.round(pix_p * 255.0).astype(np.uint8))
        np.save(ref_dir / "image_pixel_position_ids.npy", pos_p)
        np.save(ref_dir / "image_embeds.npy", v_onnx)
        np.save(ref_dir / "image_mask.npy", v_mask)
        np.save(ref_dir / "audio_input_features.npy", af)
        np.save(ref_dir / "audio_input_features_mask.npy", am)
        np.save(ref_dir / "audio_embeds.npy", a_onnx[0][a_mask[0]][None])
        np.save(ref_dir / "audio_waveform_1s.npy", clip)

    with torch.no_grad():
        t_emb = model.model.language_model.embed_tokens(torch.tensor([ids])).numpy()
    parity["embed"] = {"inputs_embeds_vs_hf": maxdiff(onnx.embed(ids)[0], t_emb)}
    inputs = {"image_soft_tokens": n_img, "audio_frames": int(af.shape[1]), "audio_soft_tokens": n_aud}
    return parity, greedy, inputs


# ----------------------------------------------------------------------------------------------
# quantization
# ----------------------------------------------------------------------------------------------

def projection_weights(model, names=PROJECTIONS):
    """{(K, N): [(layer, projection, weight [K, N] as the graph holds it)]} for the decoder
    layers' projections called `names`: the exporter names its constants val_N, so weights are
    told apart by value."""
    from torch import nn

    found = {}
    for name, mod in model.model.language_model.layers.named_modules():
        proj = name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.Linear) and proj in names:
            w = mod.weight.detach().numpy().T
            found.setdefault(w.shape, []).append((int(name.split(".")[0]), proj, w))
    return found


def per_layer_projection_weights(model, layers):
    """projection_weights' map for the per-layer inputs' projections of `layers`, and the
    model's projection into every layer's input (which serves them all)."""
    found = {shape: [(layer, proj, w) for layer, proj, w in ws if layer in layers]
             for shape, ws in projection_weights(model, LAYER_PER_LAYER_PROJECTIONS).items()}
    model_projection = getattr(model.model.language_model, MODEL_PER_LAYER_PROJECTION, None)
    if model_projection is not None:
        w = model_projection.weight.detach().numpy().T
        found.setdefault(w.shape, []).append((None, MODEL_PER_LAYER_PROJECTION, w))
    return found


def quantize_graphs(model, paths, quantize, layers, encoders_q8_0=False, output_layer="q8_0", log=print):
    """The decoder's projections of `layers` in `quantize` (q4_0 or q8_0), its output layer out
    of the graph into output_layer.q8_0 (or .q4_0, as `output_layer` says), and the embed graph
    replaced by row tables: token rows from the output layer (tied), per-layer rows in
    per_layer_embeddings.q8_0. In place: the
    embed graph's files are deleted and `paths` loses it. Returns (what was rewritten, for the
    manifest; a scratch directory of the graphs onnxruntime runs in their place, as the runtime
    computes them (`runtime_twin`): decoder.onnx, and vision.onnx and audio.onnx with
    `encoders_q8_0`, which makes the vision and audio encoders' linears MatMulQ8_0 too)."""
    import onnx
    from onnx import numpy_helper

    tc = model.config.text_config
    lm = model.model.language_model
    head = model.lm_head.weight.detach().numpy()
    if not np.array_equal(head, lm.embed_tokens.weight.detach().numpy()):
        raise SystemExit("the checkpoint's output layer is not its token embedding table (Gemma 4 ties them): "
                         "a quantized bundle reads token rows from the output layer, so it cannot be made")
    dm = onnx.load(str(paths["decoder"]))
    inits = {i.name: i for i in dm.graph.initializer}
    candidates = projection_weights(model)

    def chosen(node, weight, k, n):
        if k % 32:
            return False
        arr = numpy_helper.to_array(inits[weight]) if weight in inits else None
        for layer, _proj, w in candidates.get((k, n), []):
            if arr is not None and np.array_equal(arr, w):
                return layer in layers
        return False

    if quantize == "q4_0":
        matmuls = quantize_q4_0(dm, select=chosen, log=log)
    else:
        matmuls = quantize_q8_0(dm, select=chosen, log=log)
    # The per-layer inputs' projections in Q8_0 either way, as gemma4_gguf.py stores them for
    # llama.cpp: E2B's 41 M parameters are 165 MB in f32, held and read at every token.
    per_layer = per_layer_projection_weights(model, layers)

    def chosen_per_layer(_node, weight, k, n):
        arr = numpy_helper.to_array(inits[weight]) if weight in inits else None
        return arr is not None and any(np.array_equal(arr, w) for _l, _p, w in per_layer.get((k, n), []))

    per_layer_matmuls = quantize_q8_0(dm, select=chosen_per_layer, log=log)
    del per_layer
    fused = fuse_block_siblings(dm, log=log)

    def is_head(_name, init):
        return tuple(init.dims) == head.shape[::-1] and np.array_equal(numpy_helper.to_array(init), head.T)

    table = split_output_layer(dm, is_head, tc.hidden_size)
    layer_path = paths["decoder"].with_name(OUTPUT_LAYER_FILES[output_layer])
    if output_layer == "q4_0":
        write_q4_0_blocks(layer_path, table)
        exact = False
    else:
        exact = write_q8_0_blocks(layer_path, table)
    del table, head
    # Each twin first: saving a graph with external data moves its weights out of the ModelProto.
    twins = Path(tempfile.mkdtemp(prefix="gemma4-twin-"))
    save_graph(runtime_twin(dm), twins / "decoder.onnx")
    save_graph(dm, paths["decoder"])
    encoders = {}
    # E2B's vision tower is most of a scene request's first token.
    for role in ("vision", "audio") if encoders_q8_0 else ():
        em = onnx.load(str(paths[role]))
        encoders[role] = len(quantize_q8_0(em, select=lambda _n, _w, k, _m: k % Q8_BLOCK == 0, log=log))
        save_graph(runtime_twin(em), twins / f"{role}.onnx")
        save_graph(em, paths[role])
        del em
    del dm

    # The per-layer table's rows are padded with zeros to whole Q8_0 blocks (the tiny model's
    # 6 x 8 values); the runtime reads the first layers x width of each.
    ple = lm.embed_tokens_per_layer.weight.detach().numpy()
    rows, values = ple.shape
    padded = -(-values // Q8_BLOCK) * Q8_BLOCK
    if padded != values:
        ple = np.pad(ple, ((0, 0), (0, padded - values)))
    ple_exact = write_q8_0_blocks(paths["decoder"].with_name(PER_LAYER_FILE), ple)
    del ple
    for p in (paths["embed"], paths["embed"].with_name(paths["embed"].name + ".data")):
        p.unlink(missing_ok=True)
    del paths["embed"]
    tied_scale = float(lm.embed_tokens.embed_scale)
    done = {f"{quantize}_matmuls": len(matmuls), "layers": sorted(layers),
            "weight_rmse_max": max((d["rmse"] for d in matmuls), default=0.0),
            "per_layer_q8_0_matmuls": len(per_layer_matmuls),
            "fused_groups": len(fused), **({"encoder_q8_0_matmuls": encoders} if encoders else {}),
            "output_layer": {"format": output_layer, "rows": tc.vocab_size, "columns": tc.hidden_size,
                             "softcap": tc.final_logit_softcapping, "exact": exact, "embed_scale": tied_scale},
            "per_layer_embeddings": {"format": "q8_0", "rows": int(rows), "columns": int(padded),
                                     "layers": tc.num_hidden_layers, "width": tc.hidden_size_per_layer_input,
                                     "scale": float(lm.embed_tokens_per_layer.embed_scale), "exact": ple_exact}}
    return done, twins


class RowTables:
    """A quantized bundle's embeddings, looked up as the runtime does: token rows of the output
    layer (Q8_0 or Q4_0) and per-layer rows of per_layer_embeddings.q8_0, each times its scale, with the
    multimodal placeholders looked up as id 0 (<pad>), as the embed graph does."""

    def __init__(self, out: Path, done, placeholders):
        layer, ple = done["output_layer"], done["per_layer_embeddings"]
        self.tokens = read_blocks(out / OUTPUT_LAYER_FILES[layer["format"]], layer["columns"], layer["format"])
        self.token_scale = layer["embed_scale"]
        self.ple = read_blocks(out / PER_LAYER_FILE, ple["columns"], "q8_0")
        self.ple_scale, self.ple_shape = ple["scale"], (ple["layers"], ple["width"])
        self.placeholders = list(placeholders)

    def __call__(self, ids):
        ids = np.where(np.isin(ids, self.placeholders), 0, np.asarray(ids))
        layers, width = self.ple_shape
        emb = q8_0_rows(self.tokens, ids, self.token_scale)
        ple = q8_0_rows(self.ple, ids, self.ple_scale)[:, :layers * width]
        return emb[None], ple.reshape(1, len(ids), layers, width)


def compare_quantized(f32: OnnxModel, quantized: OnnxModel, greedy, tok):
    """Quantized vs f32 graphs: greedy ids for the text prompt, and teacher-forced next-token
    agreement over the check prompts' answers."""
    text = greedy["text"]
    q_ids, _, margins = quantized.greedy(text["prompt_ids"])
    common = next((i for i, (a, b) in enumerate(zip(q_ids, text["onnx_ids"])) if a != b), len(q_ids))
    forced = [2] + tok.encode(" ".join(g["text"] for g in greedy.values()), add_special_tokens=False).ids
    a, b = f32.teacher_forced_argmax(forced), quantized.teacher_forced_argmax(forced)
    return {"greedy_text": {"ids": q_ids, "equal_to_f32": q_ids == text["onnx_ids"],
                            "common_prefix_with_f32": common, "min_top2_margin": min(margins),
                            "top2_margins": margins},
            "teacher_forced": {"positions": len(forced), "agreement_with_f32": float((a == b).mean())}}


def compare_encoders(twin_dir: Path, inputs, f32_outputs):
    """The quantized encoders (their dequantized twins in `twin_dir`) against the f32 ones on the
    check image and audio: the largest difference of a valid soft token's value, and that over
    the largest f32 value."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    found = {}
    for role, feed in inputs.items():
        sess = ort.InferenceSession(str(twin_dir / f"{role}.onnx"), so, providers=["CPUExecutionProvider"])
        (q, q_mask), (f, f_mask) = sess.run(None, feed), f32_outputs[role]
        del sess
        assert np.array_equal(q_mask, f_mask), f"{role}: the quantized encoder's mask differs"
        diff = maxdiff(q[0][q_mask[0]], f[0][f_mask[0]])
        found[role] = {"max_abs_diff": diff, "relative_to_max": diff / float(np.abs(f[0][f_mask[0]]).max())}
    return found


# ----------------------------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------------------------

def bundle_files(out: Path):
    files = {}
    for role in GRAPHS:
        p = out / f"{role}.onnx"
        if not p.exists():
            continue
        files[role] = {"path": p.name, "sha256": sha256(p), "bytes": p.stat().st_size}
        data = out / f"{role}.onnx.data"
        if data.exists():
            files[f"{role}_data"] = {"path": data.name, "sha256": sha256(data), "bytes": data.stat().st_size}
    for role, name in (*(("output_layer", f) for f in OUTPUT_LAYER_FILES.values()),
                       ("per_layer_embeddings", PER_LAYER_FILE), ("tokenizer", "tokenizer.json")):
        p = out / name
        if p.exists():
            files[role] = {"path": p.name, "sha256": sha256(p), "bytes": p.stat().st_size}
    return files


def manifest_for(model, out, name, description, generator, instruction_tuned, quantization, tokens,
                 kv_shapes, image_processor, fe, parity, rewrites):
    tc = model.config.text_config
    vc = model.config.vision_config
    n_cache = len(kv_shapes)
    fe_d = fe.to_dict()
    layer_head_dim = {t: tc.per_layer_config[tc.layer_types.index(t)].head_dim for t in set(tc.layer_types)}
    return {
        "format": "outpost-model-bundle", "format_version": 1, "name": name,
        "architecture": "gemma4", "instruction_tuned": instruction_tuned, "graph_format": "onnx", "dtype": "f32",
        "quantization": quantization,
        "description": description,
        "parameters": sum(p.numel() for p in model.parameters()),
        "generator": generator,
        "files": bundle_files(out),
        "text": {
            "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size, "num_layers": tc.num_hidden_layers,
            "num_attention_heads": tc.num_attention_heads,
            "num_kv_heads": [tc.per_layer_config[i].num_key_value_heads for i in range(tc.num_hidden_layers)],
            "layer_types": list(tc.layer_types), "sliding_window": tc.sliding_window,
            "head_dims": dict(sorted(layer_head_dim.items(), reverse=True)),
            "kv_sharing": {"num_kv_shared_layers": tc.num_kv_shared_layers,
                           "modes": list(tc.kv_sharing_modes),
                           "cache_layers": list(range(n_cache)),
                           "note": "shared layers reuse the K/V of the last non-shared layer of the same type"},
            "ple_width": tc.hidden_size_per_layer_input, "final_logit_softcap": tc.final_logit_softcapping,
            "max_context": tc.max_position_embeddings,
            "rope": tc.rope_parameters,
            "embed_scale": tc.hidden_size ** 0.5,
            "kv_cache": {f"layer_{i}": {"heads": s[0], "head_dim": s[1]} for i, s in enumerate(kv_shapes)},
            **({key: parity["quantized"][key] for key in ("output_layer", "per_layer_embeddings")}
               if "quantized" in parity else {}),
            "multimodal_placeholder_ids": [model.config.image_token_id, model.config.audio_token_id,
                                           model.config.video_token_id],
        },
        "special_tokens": tokens,
        "prompt_format": {
            "template": "<bos><|turn>user\n{user}<turn|>\n<|turn>model\n",
            "image": "<|image>" + "<|image|>x{soft_tokens}" + "<image|>",
            "audio": "<|audio>" + "<|audio|>x{soft_tokens}" + "<audio|>",
            "multimodal_placeholders": "text.multimodal_placeholder_ids are looked up as id 0 (<pad>), in the embed "
                                       "graph or its row tables; the host overwrites "
                                       "those rows of inputs_embeds with image_embeds/audio_embeds (valid rows "
                                       "in order); per_layer_inputs keep the <pad> rows",
        },
        "graphs": {k: graph_io(out / f"{k}.onnx") for k in GRAPHS if (out / f"{k}.onnx").exists()},
        "vision": {
            "patch_size": vc.patch_size, "pooling_kernel_size": vc.pooling_kernel_size,
            "patches_per_soft_token": vc.pooling_kernel_size ** 2,
            "soft_token_budgets": [70, 140, 280, 560, 1120], "default_soft_tokens": image_processor.max_soft_tokens,
            "resize": "keep aspect ratio, bicubic antialiased, largest size within budget with sides multiple of 48",
            "rescale_factor": 1.0 / 255.0, "normalize": False,
            "patch_layout": "(row, col, channel) flattened, 768 values per patch",
            "position_ids": "(x, y) per patch, -1 for padding",
            "position_embedding_size": vc.position_embedding_size,
            "num_patches_must_be_multiple_of": vc.pooling_kernel_size ** 2,
        },
        "audio": {
            "sample_rate": fe.sampling_rate, "mel_bins": fe.feature_size, "frame_length": fe.frame_length,
            "hop_length": fe.hop_length, "fft_length": int(fe_d.get("fft_length", 512)),
            "fmin": fe.min_frequency, "fmax": fe.max_frequency, "log_offset": float(fe.mel_floor),
            "log": "log(mel + log_offset)", "normalize": False, "pad_to_multiple_of_samples": 128,
            "time_padding": "semicausal: frame_length//2 zeros prepended",
            "ms_per_soft_token": 40, "frames_per_soft_token": 4,
            "max_frames": AUDIO_MAX_FRAMES, "max_soft_tokens": AUDIO_MAX_FRAMES // 4,
            "graph_frames_fixed": True,
        },
        "parity": parity,
        "onnx_rewrites": rewrites,
    }


# ----------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------

def prepare(ckpt: Path, out: Path, *, name=None, description=None, quantize="none", layers=None, encoders_q8_0=False,
            output_layer="q8_0", reference_dir: Path | None = None, generator_extra=None):
    """Checkpoint directory -> bundle in `out` (replaced). Returns (manifest, greedy, inputs, ok)."""
    import torch
    import transformers

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    model, tok, instruction_tuned, image_processor, fe = load_checkpoint(ckpt)
    # One thread keeps a small model's check figures reproducible run to run; a real one needs all.
    small = sum(p.numel() for p in model.parameters()) < 10_000_000
    torch.set_num_threads(1 if small else (os.cpu_count() or 1))
    model.generation_config.eos_token_id = None  # the checks force 32 tokens (no early stop)
    tokens = special_tokens(tok)
    tc = model.config.text_config
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if reference_dir:
        reference_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckpt / "tokenizer.json", out / "tokenizer.json")

    *wrappers, n_cache = make_wrappers(model)
    rng = np.random.default_rng(SEED)
    image = synthetic_image_patches(rng)
    audio = speech_features(fe)
    # the f32 graphs go straight into the bundle, or to a scratch dir when they are quantized next
    f32_dir = out if quantize == "none" else Path(tempfile.mkdtemp(prefix="gemma4-f32-"))
    try:
        paths, kv_shapes, rewrites = export_graphs(model, f32_dir, n_cache, wrappers, image[2:], audio[3:])
        print("rewrites:", rewrites)
        f32 = OnnxModel(paths, kv_shapes)
        parity, greedy, inputs = check_against_pytorch(model, tok, tokens, wrappers, f32, image, audio, reference_dir)
        ok = all(g["equal"] for g in greedy.values())
        quantization = "none"
        if quantize != "none":
            if not ok:
                raise SystemExit("the f32 graphs do not match PyTorch's greedy tokens: not quantizing them")
            layers = list(range(tc.num_hidden_layers)) if layers is None else layers
            # The comparison runs text alone: the encoders' sessions only cost memory from here on
            # (E2B's are 1.8 GB in f32).
            encoder_inputs = {"vision": {"pixel_values": image[2], "pixel_position_ids": image[3]},
                              "audio": {"input_features": audio[3], "input_features_mask": audio[4]}}
            encoder_f32 = {role: f32.run(role, feed) for role, feed in encoder_inputs.items()}
            for role in ("vision", "audio"):
                f32.sess.pop(role, None)
            for role, p in paths.items():
                shutil.copyfile(p, out / p.name)
                if p.with_name(p.name + ".data").exists():
                    shutil.copyfile(p.with_name(p.name + ".data"), out / (p.name + ".data"))
            q_paths = {k: out / p.name for k, p in paths.items()}
            done, twins = quantize_graphs(model, q_paths, quantize, set(layers), encoders_q8_0, output_layer)
            try:
                layer = done["output_layer"]
                q, d = read_blocks(out / OUTPUT_LAYER_FILES[layer["format"]], layer["columns"], layer["format"])
                placeholders = [model.config.image_token_id, model.config.audio_token_id, model.config.video_token_id]
                quantized = OnnxModel({"decoder": twins / "decoder.onnx"}, kv_shapes,
                                      output_layer=(q, d, layer["softcap"]),
                                      tables=RowTables(out, done, placeholders))
                parity["quantized"] = compare_quantized(f32, quantized, greedy, tok)
                if encoders_q8_0:
                    parity["quantized"]["encoders_vs_f32"] = compare_encoders(twins, encoder_inputs, encoder_f32)
            finally:
                shutil.rmtree(twins, ignore_errors=True)
            parity["quantized"].update(done)
            weights = {"q4_0": "q4_0 (MatMulNBits block 32, no zero points = GGML Q4_0)",
                       "q8_0": "q8_0 (ai.outpost MatMulQ8_0, llama.cpp's Q8_0 rounding; q/k/v and gate/up merged)"}
            quantization = (f"{weights[quantize]} for the {', '.join(PROJECTIONS)} weights of layers "
                            f"{done['layers']} ({done[quantize + '_matmuls']} matmuls); the per-layer inputs' "
                            f"projections in q8_0 ({done['per_layer_q8_0_matmuls']} matmuls); the output layer outside "
                            f"the graph in {output_layer} ({OUTPUT_LAYER_FILES[output_layer]}), also the token "
                            f"embedding table (tied); the "
                            f"per-layer embeddings in q8_0 rows read from disk ({PER_LAYER_FILE})"
                            + ("; the vision and audio encoders' linears in q8_0 (MatMulQ8_0)" if encoders_q8_0
                               else "") + "; the rest f32")
            print("quantized:", json.dumps(parity["quantized"]))
    finally:
        if f32_dir != out:
            shutil.rmtree(f32_dir, ignore_errors=True)

    generator = {"script": "deploy/models/prepare_gemma4.py", "checkpoint": ckpt.name,
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 **(generator_extra or {})}
    manifest = manifest_for(model, out, name or ckpt.name, description or f"Gemma 4 from {ckpt.name}",
                            generator, instruction_tuned, quantization, tokens, kv_shapes, image_processor, fe,
                            parity, rewrites)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=float) + "\n")
    print(json.dumps(parity, indent=1))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"bundle: {out} ({total / 1e6:.2f} MB)")
    return manifest, greedy, inputs, ok


def parse_layers(spec):
    if spec is None or spec.strip() == "all":
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--layers: {spec!r} is not 'all' or a comma-separated list of layer numbers")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="Hugging Face Gemma 4 checkpoint directory")
    ap.add_argument("--out", required=True, help="bundle directory to write (replaced if it exists)")
    ap.add_argument("--name", default=None, help="bundle name (default: the checkpoint directory's name)")
    ap.add_argument("--quantize", choices=["none", "q4_0", "q8_0"], default="none")
    ap.add_argument("--encoders", choices=["f32", "q8_0"], default="f32",
                    help="with --quantize q4_0 or q8_0: the vision and audio encoders' linears in q8_0 too (a faster first "
                         "token for a picture; on the tiny random model their soft tokens move by 3-5%% of the "
                         "largest value, not yet measured on real weights)")
    ap.add_argument("--output-layer", choices=["q8_0", "q4_0"], default="q8_0",
                    help="with --quantize q4_0 or q8_0: the output layer (also the token table) in q8_0, or in q4_0 "
                         "(E2B: 227 MB instead of 428, read once per generated token; on Gemma 3 270M it took "
                         "the teacher-forced agreement with f32 from 0.79 to 0.71)")
    ap.add_argument("--layers", "--q4-layers", dest="layers", default="all",
                    help="decoder layers whose projections are quantized: all, or a list such as 0,1,2")
    ap.add_argument("--external-data-over", type=int, default=EXTERNAL_DATA_BYTES, metavar="BYTES",
                    help="graphs with more weight bytes than this keep them in NAME.onnx.data (default 64 MiB: the "
                         "runtime then reads each weight once, where a graph's protobuf holds them all while it "
                         "is parsed)")
    ap.add_argument("--reference", default=None, help="also write the check outputs here (.npy, reference.json)")
    args = ap.parse_args()
    onnx_tract.EXTERNAL_DATA_BYTES = args.external_data_over
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise SystemExit(f"--checkpoint {ckpt}: not a directory")
    if args.encoders == "q8_0" and args.quantize == "none":
        raise SystemExit("--encoders q8_0 goes with --quantize q4_0 or q8_0")
    if args.output_layer == "q4_0" and args.quantize == "none":
        raise SystemExit("--output-layer q4_0 goes with --quantize q4_0 or q8_0")
    ref = Path(args.reference) if args.reference else None
    manifest, greedy, inputs, ok = prepare(ckpt, Path(args.out), name=args.name, quantize=args.quantize,
                                           layers=parse_layers(args.layers),
                                           encoders_q8_0=args.encoders == "q8_0", output_layer=args.output_layer,
                                           reference_dir=ref)
    if ref:
        (ref / "reference.json").write_text(json.dumps({"greedy": greedy, "inputs": inputs,
                                                        "parity": manifest["parity"]}, indent=1, default=float) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    fix_string_hashing()
    sys.exit(main())
