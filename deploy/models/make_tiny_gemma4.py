#!/usr/bin/env python3
"""Build a tiny random-weight Gemma 4, export it to four ONNX graphs for tract, and write
PyTorch reference outputs as test fixtures.

    python deploy/models/make_tiny_gemma4.py --out daemon/tests/fixtures/gemma4-tiny

Everything is deterministic (fixed seeds, fixed corpus); no network access is needed.
The model keeps every distinctive Gemma 4 feature at toy size:
  * per-layer embeddings (PLE), width 8, for all 6 layers
  * sliding (head_dim 16, window 4) and full attention (head_dim 32, proportional RoPE) layers
  * KV sharing: layers 3..5 reuse the K/V of layers 1 (sliding) and 2 (full)
  * final logit soft-cap 30
  * vision tower (patch 16, 3x3 pooling, 2-D RoPE) and Conformer audio tower

Token ids of the 512-token vocabulary (ids 0..21 are special, 22..277 the 256 byte-level
symbols, 278..511 BPE merges learnt from a fixed built-in corpus):
    0 <pad>   1 <eos>   2 <bos>   3 <unk>   4 <mask>
    5 <|turn>   6 <turn|>                    (start / end of turn; 6 is an end-of-turn id)
    7 <|image>  8 <image|>  9 <|image|>      (begin image, end image, image soft token)
   10 <|audio> 11 <audio|> 12 <|audio|>      (begin audio, end audio, audio soft token)
   13 <|video|>  14 <|think|>
   15 <|tool>  16 <tool|>  17 <|tool_call>  18 <tool_call|>  19 <|tool_response>  20 <tool_response|>
   21 <|"|>
"""
from __future__ import annotations

import argparse
import hashlib
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
from onnx_tract import export, fold_shape_only_ranges, graph_io, maxdiff, rename_dims, sha256  # noqa: E402

SEED = 20260402
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>",
    "<|image>", "<image|>", "<|image|>",
    "<|audio>", "<audio|>", "<|audio|>",
    "<|video|>", "<|think|>",
    "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
    '<|"|>',
]
TOK = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
VOCAB = 512
AUDIO_MAX_FRAMES = 3000  # 30 s of 10 ms frames -> 750 audio soft tokens (the Gemma 4 cap)
PATCH_PIXELS = 3 * 16 * 16

REPO = Path(__file__).resolve().parents[2]
SPEECH_WAV = REPO / "daemon" / "media" / "speech.wav"
ASTRONAUT = Path("/usr/lib/python3/dist-packages/skimage/data/astronaut.png")

CORPUS = """\
The sentinel watches the gate through the night and reports what it sees and hears.
A person walks past the camera carrying a bag; a car stops near the entrance; a dog barks twice.
Describe the picture. What do you hear? Is anyone at the door? The light is on in the garage.
Outpost runs offline on a small computer, listens to the microphone and looks through the camera.
It answers questions, calls tools, and writes short reports: time, place, objects, people, sounds.
Hello sentinel, what happened at the front door this morning? Nothing unusual was detected.
The weather is cold and rainy; the wind moves the trees; a truck delivers a parcel at noon.
Alert: motion in zone two. Camera one shows a cat on the wall. Battery level is low, please charge.
numbers 0 1 2 3 4 5 6 7 8 9 10 100 2026 12:30 zone_1 zone_2 {"box_2d": [120, 340, 560, 780]}
"""


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------

def tiny_config():
    from transformers import Gemma4Config

    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        sliding_window=4, num_kv_shared_layers=3,
        vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
        final_logit_softcapping=30.0, max_position_embeddings=4096,
        pad_token_id=0, eos_token_id=[1, 6], bos_token_id=2,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=16, pooling_kernel_size=3,
                  position_embedding_size=128)
    # subsampling_conv_channels[0] must equal the 128 mel bins (input_proj_linear width formula)
    audio = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 subsampling_conv_channels=[128, 8], output_proj_dims=48)
    cfg = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=audio,
        boi_token_id=TOK["<|image>"], eoi_token_id=TOK["<image|>"], image_token_id=TOK["<|image|>"],
        boa_token_id=TOK["<|audio>"], eoa_token_index=TOK["<audio|>"], audio_token_id=TOK["<|audio|>"],
        video_token_id=TOK["<|video|>"],
    )
    return cfg


def build_model():
    import torch
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(SEED)
    cfg = tiny_config()
    cfg._attn_implementation = "eager"
    for sub in (cfg.text_config, cfg.vision_config, cfg.audio_config):
        sub._attn_implementation = "eager"
    model = Gemma4ForConditionalGeneration(cfg).eval()
    # Re-initialise with larger, deterministic weights so that activations are O(1) and greedy
    # decoding has clear margins (HF's std=0.02 init gives near-tied logits).
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                if "position_embedding_table" in name:
                    std = 0.5
                else:
                    std = 1.0 / math.sqrt(max(1, p[0].numel()))
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.generation_config.eos_token_id = None  # fixtures force 32 tokens (no early stop)
    model.generation_config.pad_token_id = 0
    return model


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------

def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, min_frequency=1, show_progress=False, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = CORPUS.splitlines() * 3
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    for t, i in TOK.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    return tok


# ----------------------------------------------------------------------------------------------
# export wrappers
# ----------------------------------------------------------------------------------------------

def make_wrappers(model):
    import torch
    from torch import nn
    from transformers.cache_utils import DynamicCache

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
            seq = inputs_embeds.shape[1]
            past_len = past[0].shape[2]
            cache = DynamicCache()
            for i in range(n_cache):
                cache.update(past[2 * i], past[2 * i + 1], i)
            q_pos = torch.arange(seq) + past_len
            k_pos = torch.arange(past_len + seq)
            causal = k_pos[None, :] <= q_pos[:, None]
            window = (q_pos[:, None] - k_pos[None, :]) < tc.sliding_window
            neg = torch.finfo(torch.float32).min
            zero = torch.zeros((), dtype=torch.float32)
            full_mask = torch.where(causal, zero, neg)[None, None]
            slide_mask = torch.where(causal & window, zero, neg)[None, None]
            out = self.model.model.language_model(
                inputs_embeds=inputs_embeds, per_layer_inputs=per_layer_inputs,
                attention_mask={"full_attention": full_mask, "sliding_attention": slide_mask},
                position_ids=q_pos[None], cache=cache, use_cache=True, return_dict=True)
            logits = self.model.lm_head(out.last_hidden_state)
            cap = tc.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
            presents = []
            for i in range(n_cache):
                presents += [cache.layers[i].keys, cache.layers[i].values]
            return (logits, *presents)

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
# inputs
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


def deterministic_picture():
    """Fallback picture (512x384 RGB) when skimage's astronaut.png is not installed."""
    from PIL import Image

    h, w = 384, 512
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127.5 + 127.5 * np.sin(x / 37.0) * np.cos(y / 23.0)
    g = 255.0 * (x / w)
    b = 255.0 * ((x - w / 2) ** 2 + (y - h / 2) ** 2 < 90 ** 2)
    return Image.fromarray(np.stack([r, g, b], -1).round().clip(0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "daemon/tests/fixtures/gemma4-tiny"))
    ap.add_argument("--keep-hf", default=None, help="also save the HF checkpoint here")
    ap.add_argument("--skip-processor", action="store_true")
    args = ap.parse_args()

    import torch
    import onnxruntime as ort
    import transformers

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    ref_dir = out / "reference"
    if out.exists():
        shutil.rmtree(out)
    ref_dir.mkdir(parents=True)
    parity = {}
    refs = {}

    # ---------------------------------------------------------------- model + tokenizer
    model = build_model()
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    hf_dir = Path(args.keep_hf) if args.keep_hf else Path(tempfile.mkdtemp(prefix="gemma4-tiny-hf-"))
    model.save_pretrained(hf_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters, HF checkpoint in {hf_dir}")
    tc = model.config.text_config

    embed, decoder, vision, audio, n_cache = make_wrappers(model)

    # ---------------------------------------------------------------- export
    from torch.export import Dim

    seq, past = Dim("seq", min=1, max=4096), Dim("past_seq", min=0, max=4096)
    rng = np.random.default_rng(SEED)
    paths = {k: out / f"{k}.onnx" for k in ("embed", "decoder", "vision", "audio")}
    rewrites = {}

    ids_ex = torch.tensor([[2, 5, 40, 9, 60]])
    rewrites["embed"] = export(embed, [ids_ex], paths["embed"], ["input_ids"],
                               ["inputs_embeds", "per_layer_inputs"], {"input_ids": {1: seq}})
    rename_dims(paths["embed"], {("input_ids", 1): "seq", ("inputs_embeds", 1): "seq",
                                 ("per_layer_inputs", 1): "seq"})

    kv_in, kv_out, kv_shapes = [], [], []
    for i in range(n_cache):
        kv_in += [f"past_key_{i}", f"past_value_{i}"]
        kv_out += [f"present_key_{i}", f"present_value_{i}"]
    emb_ex = torch.randn(1, 3, tc.hidden_size)
    ple_ex = torch.randn(1, 3, tc.num_hidden_layers, tc.hidden_size_per_layer_input)
    past_ex = []
    for i in range(n_cache):
        hd = tc.per_layer_config[i].head_dim
        nkv = tc.per_layer_config[i].num_key_value_heads
        kv_shapes.append((nkv, hd))
        past_ex += [torch.randn(1, nkv, 5, hd), torch.randn(1, nkv, 5, hd)]
    dyn = {"inputs_embeds": {1: seq}, "per_layer_inputs": {1: seq}}
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

    pix_u, pos_u, pix_p, pos_p = synthetic_image_patches(rng)
    npatch = Dim("num_patches_div9", min=1, max=1200)
    rewrites["vision"] = export(vision, [torch.from_numpy(pix_p), torch.from_numpy(pos_p)], paths["vision"],
                                ["pixel_values", "pixel_position_ids"], ["image_embeds", "image_mask"],
                                ({1: 9 * npatch}, {1: 9 * npatch}))
    rename_dims(paths["vision"], {("pixel_values", 1): "num_patches", ("pixel_position_ids", 1): "num_patches",
                                  ("image_embeds", 1): "num_soft_tokens", ("image_mask", 1): "num_soft_tokens"})

    # audio reference input: first second of speech.wav through the real feature extractor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    fe = Gemma4AudioFeatureExtractor()
    wav, sr = read_wav(SPEECH_WAV)
    assert sr == 16000
    clip = wav[:16000]
    feats = fe([clip], sampling_rate=16000, return_tensors="np")
    af = feats["input_features"].astype(np.float32)            # [1, T, 128]
    am = feats["input_features_mask"].astype(bool)             # [1, T]
    T = af.shape[1]
    af_pad = np.zeros((1, AUDIO_MAX_FRAMES, 128), np.float32)
    af_pad[:, :T] = af
    am_pad = np.zeros((1, AUDIO_MAX_FRAMES), bool)
    am_pad[:, :T] = am
    rewrites["audio"] = export(audio, [torch.from_numpy(af_pad), torch.from_numpy(am_pad)], paths["audio"],
                               ["input_features", "input_features_mask"], ["audio_embeds", "audio_mask"],
                               None, optimize=False)
    rewrites["audio"]["range_folded_shape_only"] = fold_shape_only_ranges(paths["audio"])
    print("rewrites:", rewrites)

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}

    # ---------------------------------------------------------------- vision parity
    with torch.no_grad():
        v_ref = model.model.get_image_features(torch.from_numpy(pix_u), torch.from_numpy(pos_u),
                                               return_dict=True).pooler_output[0].numpy()
        v_wrap, v_wmask = vision(torch.from_numpy(pix_p), torch.from_numpy(pos_p))
    v_onnx, v_mask = sess["vision"].run(None, {"pixel_values": pix_p, "pixel_position_ids": pos_p})
    assert v_mask.tolist() == [[True] * 4 + [False]], v_mask
    parity["vision"] = {"onnx_vs_hf_get_image_features": maxdiff(v_onnx[0][v_mask[0]], v_ref),
                        "torch_wrapper_vs_hf": maxdiff(v_wrap[0][v_wmask[0]].numpy(), v_ref)}
    n_img = int(v_mask.sum())

    # ---------------------------------------------------------------- audio parity
    with torch.no_grad():
        a_out = model.model.get_audio_features(torch.from_numpy(af), torch.from_numpy(am), return_dict=True)
        a_ref = a_out.pooler_output[0][a_out.attention_mask[0]].numpy()
    a_onnx, a_mask = sess["audio"].run(None, {"input_features": af_pad, "input_features_mask": am_pad})
    n_aud = int(a_mask.sum())
    assert n_aud == a_ref.shape[0], (n_aud, a_ref.shape)
    parity["audio"] = {"onnx_vs_hf_get_audio_features": maxdiff(a_onnx[0][a_mask[0]], a_ref),
                       "valid_frames": int(am.sum()), "soft_tokens": n_aud}

    # ---------------------------------------------------------------- prompts
    def chat(user):
        return f"<bos><|turn>user\n{user}<turn|>\n<|turn>model\n"

    prompts = {
        "text": chat("Hello sentinel, is anyone at the front door?"),
        "image": chat("<|image>" + "<|image|>" * n_img + "<image|>Describe the picture."),
        "audio": chat("<|audio>" + "<|audio|>" * n_aud + "<audio|>What do you hear?"),
    }

    def onnx_embed(ids, soft=None, soft_id=None):
        e, p = sess["embed"].run(None, {"input_ids": np.asarray([ids], np.int64)})
        if soft is not None:
            rows = np.where(np.asarray(ids) == soft_id)[0]
            assert len(rows) == soft.shape[0]
            e[0, rows] = soft
        return e, p

    def empty_past():
        feed = {}
        for i, (nkv, hd) in enumerate(kv_shapes):
            feed[f"past_key_{i}"] = np.zeros((1, nkv, 0, hd), np.float32)
            feed[f"past_value_{i}"] = np.zeros((1, nkv, 0, hd), np.float32)
        return feed

    def onnx_greedy(ids, soft, soft_id, steps=32):
        e, p = onnx_embed(ids, soft, soft_id)
        feed = {"inputs_embeds": e, "per_layer_inputs": p, **empty_past()}
        gen, logits_all, margins = [], [], []
        for step in range(steps):
            res = sess["decoder"].run(None, feed)
            last = res[0][0, -1]
            logits_all.append(last)
            srt = np.sort(last)
            margins.append(float(srt[-1] - srt[-2]))
            nxt = int(last.argmax())
            gen.append(nxt)
            e, p = onnx_embed([nxt])
            feed = {"inputs_embeds": e, "per_layer_inputs": p}
            for i in range(n_cache):
                feed[f"past_key_{i}"] = res[1 + 2 * i]
                feed[f"past_value_{i}"] = res[2 + 2 * i]
        return gen, np.stack(logits_all), margins

    greedy = {}
    for name, text in prompts.items():
        ids = tok.encode(text, add_special_tokens=False).ids
        kw = {}
        soft, soft_id = None, None
        if name == "image":
            kw = dict(pixel_values=torch.from_numpy(pix_u), image_position_ids=torch.from_numpy(pos_u))
            soft, soft_id = v_onnx[0][v_mask[0]], TOK["<|image|>"]
        if name == "audio":
            kw = dict(input_features=torch.from_numpy(af), input_features_mask=torch.from_numpy(am))
            soft, soft_id = a_onnx[0][a_mask[0]], TOK["<|audio|>"]
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                                output_scores=True, return_dict_in_generate=True, **kw)
            hf_ids = hf.sequences[0, len(ids):].tolist()
            hf_logits = torch.stack(hf.scores)[:, 0].numpy()
        o_ids, o_logits, margins = onnx_greedy(ids, soft, soft_id)
        greedy[name] = {"prompt_ids": ids, "hf_ids": hf_ids, "onnx_ids": o_ids, "equal": hf_ids == o_ids,
                        "max_abs_diff_logits": maxdiff(o_logits, hf_logits), "min_top2_margin": min(margins),
                        "text": tok.decode(o_ids, skip_special_tokens=False)}
        print(f"greedy {name}: equal={hf_ids == o_ids} logits diff={greedy[name]['max_abs_diff_logits']:.2e}"
              f" min margin={min(margins):.3f}")
        np.save(ref_dir / f"greedy_{name}_logits.npy", o_logits.astype(np.float32))
    parity["greedy"] = {k: {kk: v[kk] for kk in ("equal", "max_abs_diff_logits", "min_top2_margin")}
                        for k, v in greedy.items()}

    # ---------------------------------------------------------------- decoder parity (prefill + decode)
    ids = greedy["text"]["prompt_ids"]
    cont = greedy["text"]["hf_ids"][:4]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids + cont]), use_cache=False).logits[0].numpy()
    e, p = onnx_embed(ids)
    feed = {"inputs_embeds": e, "per_layer_inputs": p, **empty_past()}
    res = sess["decoder"].run(None, feed)
    with torch.no_grad():
        tres = decoder(torch.from_numpy(e), torch.from_numpy(p), *[torch.from_numpy(feed[k]) for k in kv_in])
    dec = {"prefill_logits_vs_hf_forward": maxdiff(res[0][0], full[: len(ids)]),
           "prefill_onnx_vs_torch_wrapper_logits": maxdiff(res[0], tres[0].numpy()),
           "prefill_onnx_vs_torch_wrapper_kv": max(maxdiff(a, b.numpy()) for a, b in zip(res[1:], tres[1:]))}
    np.save(ref_dir / "text_prefill_inputs_embeds.npy", e)
    np.save(ref_dir / "text_prefill_per_layer_inputs.npy", p)
    np.save(ref_dir / "text_prefill_logits.npy", res[0])
    step_diffs = []
    for s, t in enumerate(cont):
        e, p = onnx_embed([t])
        feed = {"inputs_embeds": e, "per_layer_inputs": p}
        for i in range(n_cache):
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = res[1 + 2 * i], res[2 + 2 * i]
        res = sess["decoder"].run(None, feed)
        step_diffs.append(maxdiff(res[0][0, 0], full[len(ids) + s]))
    dec["decode_steps_vs_hf_forward"] = step_diffs
    for i in range(n_cache):
        np.save(ref_dir / f"text_after_decode_present_key_{i}.npy", res[1 + 2 * i])
        np.save(ref_dir / f"text_after_decode_present_value_{i}.npy", res[2 + 2 * i])
    np.save(ref_dir / "text_full_forward_logits.npy", full.astype(np.float32))
    parity["decoder"] = dec

    # embed parity
    with torch.no_grad():
        t_emb = model.model.language_model.embed_tokens(torch.tensor([ids])).numpy()
    parity["embed"] = {"inputs_embeds_vs_hf": maxdiff(onnx_embed(ids)[0], t_emb)}

    # ---------------------------------------------------------------- reference tensors
    np.save(ref_dir / "image_pixel_values_u8.npy", np.round(pix_p * 255.0).astype(np.uint8))
    np.save(ref_dir / "image_pixel_position_ids.npy", pos_p)
    np.save(ref_dir / "image_embeds.npy", v_onnx)
    np.save(ref_dir / "image_mask.npy", v_mask)
    np.save(ref_dir / "audio_input_features.npy", af)
    np.save(ref_dir / "audio_input_features_mask.npy", am)
    np.save(ref_dir / "audio_embeds.npy", a_onnx[0][a_mask[0]][None])
    np.save(ref_dir / "audio_waveform_1s.npy", clip)

    # ---------------------------------------------------------------- processor fixtures
    processor_info = {}
    if not args.skip_processor:
        processor_info = processor_fixtures(ref_dir, wav)

    # ---------------------------------------------------------------- manifest
    files = {}
    for k, pth in list(paths.items()) + [("tokenizer", out / "tokenizer.json")]:
        files[k] = {"path": pth.name, "sha256": sha256(pth), "bytes": pth.stat().st_size}
    graphs = {k: graph_io(p) for k, p in paths.items()}
    fe_d = fe.to_dict()
    manifest = {
        "format": "outpost-model-bundle", "format_version": 1, "name": "gemma4-tiny-random",
        "architecture": "gemma4", "instruction_tuned": True, "graph_format": "onnx", "dtype": "f32",
        "quantization": "none",
        "description": "Tiny random-weight Gemma 4 (not a real model: outputs are meaningless) "
                       "keeping PLE, sliding/full attention, KV sharing, soft-cap, vision and audio towers.",
        "parameters": n_params,
        "generator": {"script": "deploy/models/make_tiny_gemma4.py", "seed": SEED,
                      "torch": torch.__version__, "transformers": transformers.__version__},
        "files": files,
        "text": {
            "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size, "num_layers": tc.num_hidden_layers,
            "num_attention_heads": tc.num_attention_heads,
            "num_kv_heads": [tc.per_layer_config[i].num_key_value_heads for i in range(tc.num_hidden_layers)],
            "layer_types": list(tc.layer_types), "sliding_window": tc.sliding_window,
            "head_dims": {"sliding_attention": tc.per_layer_config[tc.layer_types.index("sliding_attention")].head_dim,
                          "full_attention": tc.per_layer_config[tc.layer_types.index("full_attention")].head_dim},
            "kv_sharing": {"num_kv_shared_layers": tc.num_kv_shared_layers,
                           "modes": list(tc.kv_sharing_modes),
                           "cache_layers": list(range(n_cache)),
                           "note": "shared layers reuse the K/V of the last non-shared layer of the same type"},
            "ple_width": tc.hidden_size_per_layer_input, "final_logit_softcap": tc.final_logit_softcapping,
            "max_context": tc.max_position_embeddings,
            "rope": tc.rope_parameters,
            "embed_scale": tc.hidden_size ** 0.5,
            "kv_cache": {name: {"heads": s[0], "head_dim": s[1]} for name, s in
                         zip([f"layer_{i}" for i in range(n_cache)], kv_shapes)},
        },
        "special_tokens": {
            "pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4,
            "start_of_turn": TOK["<|turn>"], "end_of_turn": [1, TOK["<turn|>"]],
            "image": TOK["<|image|>"], "begin_image": TOK["<|image>"], "end_image": TOK["<image|>"],
            "audio": TOK["<|audio|>"], "begin_audio": TOK["<|audio>"], "end_audio": TOK["<audio|>"],
            "video": TOK["<|video|>"], "think": TOK["<|think|>"],
            "tool": [TOK["<|tool>"], TOK["<tool|>"]], "tool_call": [TOK["<|tool_call>"], TOK["<tool_call|>"]],
            "tool_response": [TOK["<|tool_response>"], TOK["<tool_response|>"]], "string_delim": TOK['<|"|>'],
        },
        "prompt_format": {
            "template": "<bos><|turn>user\n{user}<turn|>\n<|turn>model\n",
            "image": "<|image>" + "<|image|>x{soft_tokens}" + "<image|>",
            "audio": "<|audio>" + "<|audio|>x{soft_tokens}" + "<audio|>",
            "multimodal_placeholders": "embed graph looks placeholder ids up as <pad>; the host overwrites "
                                       "those rows of inputs_embeds with image_embeds/audio_embeds (valid rows "
                                       "in order); per_layer_inputs keep the <pad> rows",
        },
        "graphs": graphs,
        "vision": {
            "patch_size": 16, "pooling_kernel_size": 3, "patches_per_soft_token": 9,
            "soft_token_budgets": [70, 140, 280, 560, 1120], "default_soft_tokens": 280,
            "resize": "keep aspect ratio, bicubic antialiased, largest size within budget with sides multiple of 48",
            "rescale_factor": 1.0 / 255.0, "normalize": False,
            "patch_layout": "(row, col, channel) flattened, 768 values per patch",
            "position_ids": "(x, y) per patch, -1 for padding",
            "position_embedding_size": model.config.vision_config.position_embedding_size,
            "num_patches_must_be_multiple_of": 9,
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
    if processor_info:
        manifest["processor_fixtures"] = processor_info

    reference = {
        "description": "PyTorch (transformers) reference outputs for the tiny random Gemma 4; ONNX "
                       "Runtime outputs equal them within 'parity'. Greedy runs force 32 tokens (EOS ignored).",
        "greedy": greedy,
        "inputs": {
            "image": {"pixel_values": "image_pixel_values_u8.npy [1,45,768] u8; f32 = f32(u8) * f32(1/255) "
                                      "(36 random patches of a 6x6 grid + 9 zero padding rows)", "pixel_position_ids": "image_pixel_position_ids.npy [1,45,2] i64",
                      "soft_tokens": n_img},
            "audio": {"input_features": "audio_input_features.npy [1,T,128] f32 (first 1 s of media/speech.wav "
                                        "through Gemma4AudioFeatureExtractor; pad to max_frames with zeros)",
                      "input_features_mask": "audio_input_features_mask.npy [1,T] bool", "frames": T,
                      "soft_tokens": n_aud, "waveform": "audio_waveform_1s.npy f32 16 kHz"},
        },
        "outputs": {
            "greedy_<prompt>_logits.npy": "[32, vocab] last-position logits at each greedy step (ONNX)",
            "text_prefill_*.npy": "decoder inputs and logits for the text prompt prefill (empty past)",
            "text_after_decode_present_*.npy": "KV cache after prefill + 4 decode steps of the first greedy ids",
            "text_full_forward_logits.npy": "HF full forward logits over prompt + 4 greedy ids",
            "image_embeds.npy / image_mask.npy": "vision graph outputs for the padded reference image",
            "audio_embeds.npy": "valid audio soft tokens [1,n,hidden]",
        },
        "parity": parity,
    }
    if processor_info:
        reference["processor"] = processor_info
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=float) + "\n")
    (ref_dir / "reference.json").write_text(json.dumps(reference, indent=1, default=float) + "\n")
    if not args.keep_hf:
        shutil.rmtree(hf_dir, ignore_errors=True)
    print(json.dumps(parity, indent=1))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"bundle: {out} ({total / 1e6:.2f} MB)")
    ok = all(g["equal"] for g in greedy.values())
    return 0 if ok else 1


def processor_fixtures(ref_dir: Path, wav):
    """transformers' own image processor and feature extractor outputs, for the preprocessing
    proofs on the Rust side. Pixel values are stored as uint8 (value*255, exact) to keep the
    fixtures small when that round-trip is exact."""
    from PIL import Image
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_gemma4 import Gemma4ImageProcessor

    info = {}
    if ASTRONAUT.exists():
        img = Image.open(ASTRONAUT).convert("RGB")
        src = str(ASTRONAUT)
    else:
        img = deterministic_picture()
        src = "deterministic_picture() in make_tiny_gemma4.py"
    img.save(ref_dir / "proc_image_input.png")
    for budget in (70, 280):
        ip = Gemma4ImageProcessor(max_soft_tokens=budget)
        r = ip(images=[img], return_tensors="np")
        pv = np.asarray(r["pixel_values"], np.float32)
        pos = np.asarray(r["image_position_ids"], np.int64)
        q = np.round(pv * 255.0)
        exact = bool(np.array_equal(q.astype(np.float32) * np.float32(1.0 / 255.0), pv)) and q.min() >= 0 and q.max() <= 255
        if exact:
            np.save(ref_dir / f"proc_image_{budget}_pixel_values_u8.npy", q.astype(np.uint8))
        else:
            np.save(ref_dir / f"proc_image_{budget}_pixel_values.npy", pv.astype(np.float16))
        np.save(ref_dir / f"proc_image_{budget}_position_ids.npy", pos.astype(np.int16))
        info[f"image_{budget}"] = {
            "source": src, "input_size_wh": list(img.size), "pixel_values_shape": list(pv.shape),
            "stored_as": "uint8 (f32 = f32(u8) * f32(1/255), bit-exact)" if exact else "float16 (not exact)",
            "position_ids_shape": list(pos.shape), "position_ids_dtype_stored": "int16",
            "valid_patches": int((pos[0, :, 0] >= 0).sum()),
            "num_soft_tokens": [int(x) for x in np.asarray(r.get("num_soft_tokens_per_image", [])).ravel()],
            "pixel_values_sha256_f32": hashlib.sha256(pv.tobytes()).hexdigest(),
        }
    fe = Gemma4AudioFeatureExtractor()
    r = fe([wav], sampling_rate=16000, return_tensors="np")
    mel = np.asarray(r["input_features"], np.float32)
    mask = np.asarray(r["input_features_mask"], bool)
    np.save(ref_dir / "proc_speech_log_mel.npy", mel)
    np.save(ref_dir / "proc_speech_log_mel_mask.npy", mask)
    info["speech"] = {"source": "daemon/media/speech.wav", "samples": int(wav.shape[0]),
                      "features_shape": list(mel.shape), "valid_frames": int(mask.sum()),
                      "feature_extractor": {k: v for k, v in fe.to_dict().items()
                                            if isinstance(v, (int, float, str, bool))}}
    return info


if __name__ == "__main__":
    # transformers iterates over a set of layer-type strings while building the decoder graph:
    # fix string hashing so the exported node order (and so the file bytes) are reproducible.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.exit(main())
