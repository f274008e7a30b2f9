#!/usr/bin/env python3
"""Build a tiny random-weight Gemma 4 from a config alone, save it as a Hugging Face checkpoint
(what a user downloads for the real model), prepare its bundle with the same tool users run
(prepare_gemma4.py), and write PyTorch reference outputs and processor outputs as test fixtures.

    python deploy/models/make_tiny_gemma4.py     # -> daemon/tests/fixtures/gemma4-tiny{,-hf}

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
import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_tract import fix_string_hashing  # noqa: E402
from prepare_gemma4 import SEED, SPEECH_WAV, prepare, read_wav  # noqa: E402

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
REPO = Path(__file__).resolve().parents[2]
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
# inputs
# ----------------------------------------------------------------------------------------------

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

# A minimal Gemma 4 chat template: its presence marks the checkpoint as instruction-tuned.
CHAT_TEMPLATE = """{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}
{{ m['content'] }}<turn|>
{% endfor %}{% if add_generation_prompt %}<|turn>model
{% endif %}"""


def save_checkpoint(model, tok, ckpt: Path):
    """The checkpoint directory layout of a downloaded Gemma 4: config, safetensors, tokenizer,
    chat template."""
    if ckpt.exists():
        shutil.rmtree(ckpt)
    model.save_pretrained(ckpt)
    tok.save(str(ckpt / "tokenizer.json"))
    (ckpt / "chat_template.jinja").write_text(CHAT_TEMPLATE + "\n")
    (ckpt / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "daemon/tests/fixtures/gemma4-tiny"))
    ap.add_argument("--checkpoint", default=str(REPO / "daemon/tests/fixtures/gemma4-tiny-hf"),
                    help="where the HF checkpoint is saved")
    ap.add_argument("--skip-processor", action="store_true")
    args = ap.parse_args()

    out, ckpt = Path(args.out), Path(args.checkpoint)
    model = build_model()
    tok = build_tokenizer()
    save_checkpoint(model, tok, ckpt)
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters, HF checkpoint in {ckpt}")
    del model

    ref_dir = out / "reference"
    picture = None if args.skip_processor else reference_picture(ref_dir)
    manifest, greedy, inputs, ok = prepare(
        ckpt, out, name="gemma4-tiny-random", reference_dir=ref_dir,
        description="Tiny random-weight Gemma 4 (not a real model: outputs are meaningless) "
                    "keeping PLE, sliding/full attention, KV sharing, soft-cap, vision and audio towers.",
        generator_extra={"made_by": "deploy/models/make_tiny_gemma4.py", "seed": SEED})

    processor_info = {}
    if not args.skip_processor:
        processor_info = processor_fixtures(ref_dir, read_wav(SPEECH_WAV)[0],
                                            [("image", *picture), ("frame", *camera_frame())])
        manifest["processor_fixtures"] = processor_info
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=float) + "\n")

    reference = {
        "description": "PyTorch (transformers) reference outputs for the tiny random Gemma 4; ONNX "
                       "Runtime outputs equal them within 'parity'. Greedy runs force 32 tokens (EOS ignored).",
        "greedy": greedy,
        "inputs": {
            "image": {"pixel_values": "image_pixel_values_u8.npy [1,45,768] u8; f32 = f32(u8) * f32(1/255) "
                                      "(36 random patches of a 6x6 grid + 9 zero padding rows)",
                      "pixel_position_ids": "image_pixel_position_ids.npy [1,45,2] i64",
                      "soft_tokens": inputs["image_soft_tokens"]},
            "audio": {"input_features": "audio_input_features.npy [1,T,128] f32 (first 1 s of media/speech.wav "
                                        "through Gemma4AudioFeatureExtractor; pad to max_frames with zeros)",
                      "input_features_mask": "audio_input_features_mask.npy [1,T] bool",
                      "frames": inputs["audio_frames"], "soft_tokens": inputs["audio_soft_tokens"],
                      "waveform": "audio_waveform_1s.npy f32 16 kHz"},
        },
        "outputs": {
            "greedy_<prompt>_logits.npy": "[32, vocab] last-position logits at each greedy step (ONNX)",
            "text_prefill_*.npy": "decoder inputs and logits for the text prompt prefill (empty past)",
            "text_after_decode_present_*.npy": "KV cache after prefill + 4 decode steps of the first greedy ids",
            "text_full_forward_logits.npy": "HF full forward logits over prompt + 4 greedy ids",
            "image_embeds.npy / image_mask.npy": "vision graph outputs for the padded reference image",
            "audio_embeds.npy": "valid audio soft tokens [1,n,hidden]",
        },
        "parity": manifest["parity"],
    }
    if processor_info:
        reference["processor"] = processor_info
    (ref_dir / "reference.json").write_text(json.dumps(reference, indent=1, default=float) + "\n")
    return 0 if ok else 1


def reference_picture(ref_dir: Path):
    """(picture, where it came from): skimage's astronaut.png (Debian's python3-skimage), else
    the copy of it committed with the fixtures, else a generated picture. Read before the
    fixtures directory is rewritten."""
    from PIL import Image

    committed = ref_dir / "proc_image_input.png"
    for path in (ASTRONAUT, committed):
        if path.exists():
            return Image.open(path).convert("RGB"), (str(ASTRONAUT) if path == ASTRONAUT else
                                                     f"{ASTRONAUT} (the copy committed as {committed.name})")
    return deterministic_picture(), "deterministic_picture() in make_tiny_gemma4.py"


def camera_frame():
    """The first frame of daemon/media/people.mjpeg (320x240, not square, from a camera), decoded
    by Pillow; saved as PNG so that the Rust side reads the very same pixels."""
    from PIL import Image

    clip = (REPO / "daemon/media/people.mjpeg").read_bytes()
    start = clip.index(b"\xff\xd8")
    end = clip.index(b"\xff\xd9", start) + 2
    return Image.open(io.BytesIO(clip[start:end])).convert("RGB"), "daemon/media/people.mjpeg, first frame"


def processor_fixtures(ref_dir: Path, wav, pictures):
    """transformers' own image processor and feature extractor outputs, for the preprocessing
    proofs on the Rust side: `pictures` is [(name, picture, where it came from)], each saved as
    proc_{name}_input.png with its patches at budgets 70 and 280. Pixel values are stored as uint8
    (value*255, exact) to keep the fixtures small when that round-trip is exact."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_gemma4 import Gemma4ImageProcessor

    info = {}
    for name, img, src in pictures:
        img.save(ref_dir / f"proc_{name}_input.png")
        for budget in (70, 280):
            ip = Gemma4ImageProcessor(max_soft_tokens=budget)
            r = ip(images=[img], return_tensors="np")
            pv = np.asarray(r["pixel_values"], np.float32)
            pos = np.asarray(r["image_position_ids"], np.int64)
            q = np.round(pv * 255.0)
            exact = (bool(np.array_equal(q.astype(np.float32) * np.float32(1.0 / 255.0), pv))
                     and q.min() >= 0 and q.max() <= 255)
            if exact:
                np.save(ref_dir / f"proc_{name}_{budget}_pixel_values_u8.npy", q.astype(np.uint8))
            else:
                np.save(ref_dir / f"proc_{name}_{budget}_pixel_values.npy", pv.astype(np.float16))
            np.save(ref_dir / f"proc_{name}_{budget}_position_ids.npy", pos.astype(np.int16))
            info[f"{name}_{budget}"] = {
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
    fix_string_hashing()
    sys.exit(main())
