#!/usr/bin/env python3
"""Turn the Gemma 3 270M GGUF (google/gemma-3-270m, base model) into an Outpost model bundle
that the daemon runs with tract 0.23.9:

    python deploy/models/prepare_gemma3.py --gguf FILE --out DIR [--quantize none|q4_0|q8_0]

The bundle directory holds
    embed.onnx      input_ids i64 [1, seq] -> inputs_embeds f32 [1, seq, 640]
                    (the table lookup times sqrt(640), as Gemma3TextScaledWordEmbedding does)
    decoder.onnx    inputs_embeds [1, seq, 640], past_key_i / past_value_i [1, 1, past_seq, 256]
                    (i = 0..17, key_0, value_0, key_1, ...) -> logits [1, seq, 262144],
                    present_key_i / present_value_i [1, 1, total_seq, 256]
    tokenizer.json  the HF fast tokenizer converted from the GGUF
    manifest.json   format "outpost-model-bundle" v1 (see daemon/tests/fixtures/gemma4-tiny)

transformers loads the GGUF dequantized to f32 (eager attention); the decoder is exported with
torch.onnx.export(dynamo=True, opset 18) through the general multi-token path, with a plain
DynamicCache and explicit additive masks (causal; sliding layers also q - k < sliding_window),
positions past_seq + arange(seq). Every graph is checked with onnxruntime against the HF model
(prefill, KV-cache decode steps, greedy 32 tokens vs generate).

--quantize q4_0 rewrites decoder projection MatMuls (q/k/v/o, gate/up/down) into com.microsoft
MatMulNBits (bits 4, block 32, no zero points: GGML's Q4_0, on our kernels). Gemma 3 270M is very sensitive to
Q4_0, so by default only the layers measured to keep >= 95% teacher-forced next-token agreement
with the f32 bundle are quantized (DEFAULT_Q4_LAYERS; --q4-layers all for every layer), with
llama.cpp's importance-weighted rounding (an importance matrix from CALIBRATION_TEXT). The
output matmul (lm_head) leaves the decoder graph, which then gives hidden_states [1, seq, 640]:
output_layer.q8_0 holds it as GGML Q8_0 blocks for the runtime's own kernels, exactly (the GGUF's
tied table is Q8_0); --output-layer graph keeps it in the graph, f32 unless --lm-head q4_0.
The embedding table is stored in the GGUF's own Q8_0
form (int8 + f16 scales, recovered exactly from the f32 table: the same inputs_embeds bits at a
quarter of the size; --embed-dtype f32/f16 for the others). The quantized graphs are checked with
onnxruntime against the f32 ones. --from-f32 DIR reuses an f32 bundle built by this script (no
GGUF loading, no torch export): the fast way to build both bundles.
--quantize q8_0 rewrites every layer's projections into ai.outpost MatMulQ8_0 nodes (int8 weights,
an f16 scale per 32 along K, llama.cpp's Q8_0 rounding) that the runtime registers with tract
(daemon/src/model/block_matmul.rs), each layer's q/k/v and its gate/up merged into one node and
a Split (one input quantization, one product shared out among threads); onnxruntime checks the
same graph with the weights dequantized. The output layer and embedding table are as for q4_0.
Default output: ~/.cache/outpost/bundles/gemma-3-270m-f32, .../gemma-3-270m-q4_0 and
.../gemma-3-270m-q8_0.
Prints how long each stage took; exits 1 if the f32 greedy run differs from HF generate.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_tract import (OUTPUT_LAYER_FILE, OUTPUT_LAYER_FILES, activation_importance, cache_presents,  # noqa: E402
                        decoder_cache_and_masks, runtime_twin, export_model, fix_string_hashing,
                        fuse_block_siblings, graph_io, Q8_BLOCK,
                        kv_names, maxdiff, output_layer_logits, q8_0_gather_nodes, q8_0_recover, q8_0_rows, quantize_q4_0,
                        quantize_q8_0, read_blocks, read_q8_0_blocks, rename_dims, sha256, split_output_layer,
                        write_q4_0_blocks, write_q8_0_blocks)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_GGUF = Path.home() / ".cache/outpost/gemma3-270m/gemma-3-270m-q4_k_m.gguf"
DEFAULT_OUT = Path.home() / ".cache/outpost/bundles"
PARITY_PROMPT = "The old lighthouse keeper climbed the stairs every evening, and"
THREADS = 2
# Calibration text for the Q4_0 importance matrix (mean squared activations per channel): plain
# prose, dialogue, lists, numbers and code in several languages, written for this script. Not the
# LICENSE text the agreement is measured on.
CALIBRATION_TEXT = """\
The harbour was quiet before dawn. Fishing boats rocked against the pier, their ropes creaking,
while gulls circled above the market where the first crates of sardines were being unloaded.
"Did you see the storm last night?" asked Marta. "The wind tore the sign off the bakery," said
her brother, pointing at the broken board lying in a puddle.
Recipe for a simple tomato soup: 1 kg ripe tomatoes, 2 onions, 3 cloves of garlic, olive oil,
salt and pepper. Chop the onions, fry them gently for 10 minutes, add the tomatoes and simmer
for 25 minutes, then blend until smooth.
Le train de 7 h 42 est arrivé avec vingt minutes de retard. Les voyageurs, pressés, se sont
dispersés dans la gare pendant qu'une annonce rappelait de ne pas oublier ses bagages.
Am Wochenende wandern wir durch den Schwarzwald. Die Wege sind gut markiert, und in den kleinen
Dörfern gibt es Kuchen, Kaffee und freundliche Gespräche.
El mercado abre a las ocho. Los vendedores colocan naranjas, pimientos y pan recién hecho
mientras los primeros clientes preguntan por los precios del día.
O rio atravessa a cidade de norte a sul, e à noite as pontes iluminadas refletem-se na água.
今日は朝から雨が降っています。駅まで歩く途中で、傘を忘れた子どもたちが走っていました。
我们明天早上九点在图书馆门口见面，然后一起去博物馆参观新的展览。
Вечером мы сидели на кухне, пили чай и обсуждали планы на лето: поехать к морю или в горы.
الطقس جميل اليوم، والشمس مشرقة، والأطفال يلعبون في الحديقة بالقرب من المدرسة.
오늘 회의는 오후 세 시에 시작합니다. 자료를 미리 준비해 주세요.
Meeting notes (2024-03-18): budget approved at $12,500; next review on April 2nd; action items
assigned to Priya (design), Tom (testing) and Lee (documentation).
def moving_average(values, window=3):
    result = []
    for i in range(len(values) - window + 1):
        result.append(sum(values[i:i + window]) / window)
    return result

for (let i = 0; i < items.length; i++) { total += items[i].price * items[i].quantity; }
SELECT name, COUNT(*) AS visits FROM sensors WHERE zone = 'north' GROUP BY name ORDER BY visits DESC;
The sensor reported 23.5 degrees at 14:05, 24.1 at 14:10 and 26.8 at 14:15, a rise of 3.3 degrees
in ten minutes. Question: what is 17 multiplied by 23? Answer: 391.
"""

T0 = time.time()
_last = [T0]
TIMINGS = {}


def stage(name):
    """Prints and records how long the stage that just ended took."""
    now = time.time()
    TIMINGS[name] = round(now - _last[0], 2)
    print(f"[{now - T0:7.1f} s] {name}: {now - _last[0]:.1f} s", flush=True)
    _last[0] = now


# ----------------------------------------------------------------------------------------------
# loading the GGUF
# ----------------------------------------------------------------------------------------------

def _cache_gguf_reader():
    """transformers parses the GGUF once for the config, once for the tokenizer and once for
    the weights (about 20 s each here, mostly the 262144-entry vocabulary metadata): share one
    gguf.GGUFReader per path."""
    import gguf

    if getattr(gguf.GGUFReader, "_outpost_cached", False):
        return
    orig = gguf.GGUFReader
    cache = {}

    def reader(path, *a, **k):
        key = (str(Path(path).resolve()), a, tuple(sorted(k.items())))
        if key not in cache:
            cache[key] = orig(path, *a, **k)
        return cache[key]

    reader._outpost_cached = True
    gguf.GGUFReader = reader


def load_gguf(gguf_path: Path, tokenizer=True):
    """(model, tokenizer) from the GGUF: f32, eager attention, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _cache_gguf_reader()
    d, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name) if tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    model.config._attn_implementation = "eager"
    model.generation_config.eos_token_id = None  # fixtures force N tokens (no early stop)
    model.generation_config.pad_token_id = 0
    return model, tok


def check_special_tokens(tok):
    want = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>"}
    got = {i: tok.convert_ids_to_tokens(i) for i in want}
    assert got == want, f"special tokens differ: {got}"
    return {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "start_of_turn": 105, "end_of_turn": [1, 106]}


# ----------------------------------------------------------------------------------------------
# graphs
# ----------------------------------------------------------------------------------------------

def tied_to_output_layer(table: np.ndarray, layer_path: Path):
    """Whether the f32 embedding table is exactly the Q8_0 output layer written at `layer_path`."""
    rec = q8_0_recover(table)
    if rec is None:
        return False
    q, d = rec
    lq, ld = read_q8_0_blocks(layer_path, table.shape[1])
    return np.array_equal(q, lq) and np.array_equal(d.astype(np.float32), ld)


def write_embed(path: Path, table: np.ndarray, scale: float, dtype: str):
    """embed.onnx built directly (a Gather is all there is to it; tracing the 671 MB table through
    the exporter only costs time): Gather(table, input_ids) [-> Cast f32] * f32(scale).
    dtype f32 / f16 (table stored as f16, Cast to f32) / q8_0 (the GGUF's own Q8_0 form,
    recovered exactly: int8 table and f16 per-32 scales, f32(q) * f32(d) as gguf/transformers
    dequantize it, so the output is bit-identical to f32 at a quarter of the size)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    vocab, hidden = table.shape
    F = TensorProto.FLOAT
    if dtype == "q8_0":
        rec = q8_0_recover(table)
        if rec is None:
            raise SystemExit("the embedding table is not exactly Q8_0: use --embed-dtype f32 or f16")
        q, d = rec
        inits = [numpy_helper.from_array(q, "embed_tokens.weight_q8"),
                 numpy_helper.from_array(d, "embed_tokens.weight_scales"),
                 numpy_helper.from_array(np.array(scale, np.float32), "embed_scale")]
        nodes, shapes = q8_0_gather_nodes("embed_tokens.weight_q8", "embed_tokens.weight_scales", "input_ids",
                                          "rows", hidden, "embed")
        inits += shapes
        nodes.append(helper.make_node("Mul", ["rows", "embed_scale"], ["inputs_embeds"], name="scale"))
    else:
        tab = table.astype(np.float16 if dtype == "f16" else np.float32, copy=False)
        inits = [numpy_helper.from_array(tab, "embed_tokens.weight"),
                 numpy_helper.from_array(np.array(scale, np.float32), "embed_scale")]
        nodes = [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["rows"], name="gather", axis=0)]
        src = "rows"
        if dtype == "f16":
            nodes.append(helper.make_node("Cast", ["rows"], ["rows_f32"], name="cast_f32", to=F))
            src = "rows_f32"
        nodes.append(helper.make_node("Mul", [src, "embed_scale"], ["inputs_embeds"], name="scale"))
    g = helper.make_graph(
        nodes, "embed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("inputs_embeds", F, [1, "seq", hidden])],
        initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], producer_name="outpost-prepare_gemma3")
    m.ir_version = 10
    onnx.save(m, str(path))


def make_decoder(model):
    import torch
    from torch import nn

    cfg = model.config
    n_layers = cfg.num_hidden_layers

    class Decoder(nn.Module):
        """(inputs_embeds, past K/V of every layer) -> (logits, present K/V). Positions are
        past_len + arange(seq); batch 1, no padding. A plain DynamicCache (no sliding-window cache:
        its Slice(starts=-W) trips tract) and explicit additive masks."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, inputs_embeds, *past):
            cache, position_ids, masks = decoder_cache_and_masks(past, inputs_embeds.shape[1], cfg.sliding_window)
            out = self.model.model(
                inputs_embeds=inputs_embeds, attention_mask=masks,
                position_ids=position_ids, cache=cache, use_cache=True, return_dict=True)
            logits = self.model.lm_head(out.last_hidden_state)
            cap = cfg.final_logit_softcapping
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            return (logits, *cache_presents(cache, n_layers))

    return Decoder().eval()


PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def weight_role(name: str):
    """(layer, projection) for the decoder's weight names set by name_weights; (None, "lm_head")."""
    if name == "lm_head.weight_t":
        return None, "lm_head"
    parts = name.split(".")
    if parts[0] == "layers" and parts[1].isdigit() and name.endswith(".weight_t"):
        return int(parts[1]), ".".join(parts[2:4])
    return None, None


def name_weights(m, model):
    """Gives the exporter's weight constants (val_57, ...) the names of the HF parameters they
    hold, transposed ([K, N]): layers.{i}.self_attn.q_proj.weight_t, ..., lm_head.weight_t. Each
    is matched by node order and checked value by value against the HF model."""
    from onnx import numpy_helper

    inits = {i.name: i for i in m.graph.initializer}
    mm = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits
          and len(inits[n.input[1]].dims) == 2]
    expected = [(f"layers.{i}.{p}", getattr(getattr(model.model.layers[i], p.split(".")[0]), p.split(".")[1]).weight)
                for i in range(len(model.model.layers)) for p in PROJECTIONS]
    expected.append(("lm_head", model.lm_head.weight))
    assert len(mm) == len(expected), f"{len(mm)} constant-weight MatMuls, expected {len(expected)}"
    rename = {}
    for node, (name, w) in zip(mm, expected):
        old = node.input[1]
        arr = numpy_helper.to_array(inits[old])
        ref = w.detach().numpy().T
        assert arr.shape == ref.shape and np.array_equal(arr, ref), f"{node.name}: {old} is not {name}"
        assert old not in rename, f"{old} feeds two MatMuls"
        rename[old] = f"{name}.weight_t"
    for i in m.graph.initializer:
        if i.name in rename:
            i.name = rename[i.name]
    for n in m.graph.node:
        for k, x in enumerate(n.input):
            if x in rename:
                n.input[k] = rename[x]
    return len(rename)


def export_decoder(model, path: Path):
    """Exports, tractifies, names dims and weights in memory; saves once. Returns
    (rewrites, graph_io)."""
    import onnx
    import torch
    from torch.export import Dim

    cfg = model.config
    n_layers, nkv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    max_ctx = cfg.max_position_embeddings
    seq, past = Dim("seq", min=1, max=max_ctx), Dim("past_seq", min=0, max=max_ctx)
    kv_in, kv_out = kv_names(n_layers)
    g = torch.Generator().manual_seed(0)
    # seq >= 2 and past_seq >= 1: the general (multi-token) attention path, nothing specialised
    emb_ex = torch.randn(1, 3, cfg.hidden_size, generator=g)
    past_ex = [torch.randn(1, nkv, 5, hd, generator=g) for _ in range(2 * n_layers)]
    dyn = ({1: seq}, tuple({2: past} for _ in range(2 * n_layers)))
    m, rewrites = export_model(make_decoder(model), [emb_ex, *past_ex], ["inputs_embeds", *kv_in],
                               ["logits", *kv_out], dyn)
    stage("torch.onnx.export decoder (+ tractify in memory)")
    names = {("inputs_embeds", 1): "seq", ("logits", 1): "seq"}
    for n in kv_in:
        names[(n, 2)] = "past_seq"
    for n in kv_out:
        names[(n, 2)] = "total_seq"
    rename_dims(m, names)
    rewrites["weights_named"] = name_weights(m, model)
    io = graph_io(m)
    onnx.save(m, str(path))
    stage("decoder.onnx: names, save")
    return rewrites, io


# ----------------------------------------------------------------------------------------------
# onnxruntime helpers
# ----------------------------------------------------------------------------------------------

def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OrtLM:
    """embed + decoder sessions with the bundle's calling convention."""

    def __init__(self, bundle: Path, n_layers: int, nkv: int, hd: int, decoder: Path | None = None,
                 embed_scale: float | None = None):
        """`decoder`: the graph onnxruntime runs instead of the bundle's (its Q8_0 twin).
        `embed_scale`: for a bundle without embed.onnx, whose output layer is its embedding
        table (default: the manifest's `text.output_layer.embed_scale`)."""
        self.decoder = ort_session(decoder or bundle / "decoder.onnx")
        self.n_layers, self.nkv, self.hd = n_layers, nkv, hd
        # A bundle whose decoder gives hidden states: its output layer (Q8_0 or Q4_0), as written.
        hidden = self.decoder.get_outputs()[0].shape[-1]
        self.output_layer = None
        for fmt, name in OUTPUT_LAYER_FILES.items():
            if (bundle / name).exists():
                self.output_layer = read_blocks(bundle / name, hidden, fmt)
        self.embed = ort_session(bundle / "embed.onnx") if (bundle / "embed.onnx").exists() else None
        if self.embed is None and embed_scale is None:
            embed_scale = json.loads((bundle / "manifest.json").read_text())["text"]["output_layer"]["embed_scale"]
        self.embed_scale = embed_scale

    def embeds(self, ids):
        if self.embed is None:
            return q8_0_rows(self.output_layer, ids, self.embed_scale)[None]
        return self.embed.run(None, {"input_ids": np.asarray([ids], np.int64)})[0]

    def empty_past(self):
        z = np.zeros((1, self.nkv, 0, self.hd), np.float32)
        return [z] * (2 * self.n_layers)

    def step(self, ids, past):
        feed = {"inputs_embeds": self.embeds(ids)}
        for i in range(self.n_layers):
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = past[2 * i], past[2 * i + 1]
        res = self.decoder.run(None, feed)
        first = res[0] if self.output_layer is None else output_layer_logits(res[0], self.output_layer, None)
        return first, res[1:]

    def greedy(self, ids, steps=32):
        logits, past = self.step(ids, self.empty_past())
        gen, last_all, margins = [], [], []
        for _ in range(steps):
            last = logits[0, -1]
            last_all.append(last)
            top2 = np.partition(last, -2)[-2:]
            margins.append(float(abs(top2[1] - top2[0])))
            nxt = int(last.argmax())
            gen.append(nxt)
            logits, past = self.step([nxt], past)
        return gen, np.stack(last_all), margins

    def teacher_forced_argmax(self, ids, chunk=256):
        """argmax next token at each position of ids, chunked prefill with the KV cache."""
        past = self.empty_past()
        out = []
        for s in range(0, len(ids), chunk):
            logits, past = self.step(ids[s:s + chunk], past)
            out.append(logits[0].argmax(-1))
        return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def build_f32(args, out: Path, manifest_extra):
    import torch
    import transformers

    torch.set_num_threads(THREADS)
    model, tok = load_gguf(Path(args.gguf))
    cfg = model.config
    stage("load GGUF (tokenizer + model, dequantized to f32)")
    special = check_special_tokens(tok)
    tok.save_pretrained(str(out / "_tok"))
    shutil.move(str(out / "_tok" / "tokenizer.json"), str(out / "tokenizer.json"))
    shutil.rmtree(out / "_tok")
    stage("tokenizer.json")

    emb_mod = model.model.embed_tokens
    table = emb_mod.weight.detach().numpy()
    scale = float(emb_mod.embed_scale.to(torch.float32).item())
    write_embed(out / "embed.onnx", table, scale, "f32")
    stage("embed.onnx")
    rewrites, dec_io = export_decoder(model, out / "decoder.onnx")

    # ------------------------------------------------------------ parity with onnxruntime
    n_layers, nkv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    lm = OrtLM(out, n_layers, nkv, hd)
    stage("onnxruntime sessions")
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = [2] + tok(PARITY_PROMPT, add_special_tokens=False).input_ids
    assert [2] + fast.encode(PARITY_PROMPT, add_special_tokens=False).ids == ids
    parity = {"prompt": PARITY_PROMPT, "prompt_tokens": len(ids)}
    with torch.no_grad():
        t_emb = emb_mod(torch.tensor([ids])).numpy()
        hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                            pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        hf_ids = hf.sequences[0, len(ids):].tolist()
        hf_logits = torch.stack(hf.logits)[:, 0].numpy()
        cont = hf_ids[:4]
        full = model(input_ids=torch.tensor([ids + cont]), use_cache=False).logits[0].numpy()
    stage("HF generate 32 + full forward")
    parity["embed_vs_hf"] = maxdiff(lm.embeds(ids), t_emb)
    logits, past = lm.step(ids, lm.empty_past())
    parity["prefill_logits_vs_hf_forward"] = maxdiff(logits[0], full[:len(ids)])
    parity["logits_abs_max"] = float(np.abs(full).max())
    steps = []
    for s, t in enumerate(cont):
        logits, past = lm.step([t], past)
        steps.append(maxdiff(logits[0, 0], full[len(ids) + s]))
    parity["decode_steps_vs_hf_forward"] = steps
    o_ids, o_logits, margins = lm.greedy(ids)
    parity["greedy_32_vs_hf_generate"] = {
        "equal": o_ids == hf_ids, "max_abs_diff_logits": maxdiff(o_logits, hf_logits),
        "min_top2_margin": min(margins), "ids": o_ids, "text": tok.decode(o_ids)}
    stage("onnxruntime parity (prefill, 4 decode steps, greedy 32)")
    print(json.dumps({k: v for k, v in parity.items()}, indent=1, default=float))

    texts = [PARITY_PROMPT, "Voilà 3 émojis 🙂🚀 et des\tTABS\n\n  日本語 — Привет", "fn main() {\n    println!(\"{}\", 1 + 2);\n}"]
    tok_ok = all(fast.encode(t, add_special_tokens=False).ids == tok(t, add_special_tokens=False).input_ids
                 for t in texts)
    assert tok_ok, "tokenizers.Tokenizer(tokenizer.json) disagrees with the HF tokenizer"

    rope = {k: dict(v) for k, v in cfg.rope_parameters.items()}
    text = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_layers": n_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_kv_heads": nkv, "head_dim": hd,
        "intermediate_size": cfg.intermediate_size,
        "layer_types": list(cfg.layer_types), "sliding_window": cfg.sliding_window,
        "max_context": cfg.max_position_embeddings, "rope": rope,
        "final_logit_softcap": cfg.final_logit_softcapping,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "rms_norm_eps": cfg.rms_norm_eps,
        "embed_scale": scale, "tied_embeddings": bool(cfg.tie_word_embeddings),
        "kv_cache": {"layers": list(range(n_layers)), "heads": nkv, "head_dim": hd,
                     "layout": "[1, heads, positions, head_dim], one key and one value tensor per layer; "
                               "sliding layers still receive the whole past (the mask applies the window)"},
    }
    manifest_extra.update(
        text=text, special_tokens=special, parity_f32=parity, rewrites=rewrites, decoder_io=dec_io,
        versions={"torch": torch.__version__, "transformers": transformers.__version__})
    return model, tok


def write_manifest(out: Path, args, name, quantization, description, info, parity, embed_dtype, extra=None):
    import onnxruntime
    import onnx

    files = {}
    for k, fn in (("embed", "embed.onnx"), ("decoder", "decoder.onnx"),
                  *(("output_layer", f) for f in OUTPUT_LAYER_FILES.values()), ("tokenizer", "tokenizer.json")):
        p = out / fn
        if p.exists() or k in ("decoder", "tokenizer"):
            files[k] = {"path": fn, "sha256": sha256(p), "bytes": p.stat().st_size}
    gguf = Path(info["gguf"])
    manifest = {
        "format": "outpost-model-bundle", "format_version": 1, "name": name,
        "architecture": "gemma3", "instruction_tuned": False, "graph_format": "onnx", "dtype": "f32",
        "quantization": quantization,
        "description": description,
        "generator": {"script": "deploy/models/prepare_gemma3.py", **info["versions"],
                      "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                      "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
        "files": files,
        "embed_table_dtype": embed_dtype,
        "text": info["text"],
        "special_tokens": info["special_tokens"],
        "prompt_format": {"template": "<bos>{text}", "note": "base model (not instruction-tuned): raw text "
                          "after <bos>; <start_of_turn>/<end_of_turn> exist in the vocabulary"},
        "graphs": {**({"embed": graph_io(out / "embed.onnx")} if (out / "embed.onnx").exists() else {}),
                   "decoder": info["decoder_io"]},
        "source": {"gguf": gguf.name, "sha256": info["gguf_sha256"],
                   "model": "google/gemma-3-270m (base) GGUF Q4_K_M, dequantized to f32 by transformers",
                   "license": "Gemma Terms of Use"},
        "parity": parity,
        "onnx_rewrites": info["rewrites"],
        "timings_s": dict(TIMINGS),
    }
    if extra:
        manifest.update(extra)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=float) + "\n")
    return manifest


# Decoder layers whose projections --quantize q4_0 rewrites by default: the largest set that keeps
# the teacher-forced next-token agreement with the f32 bundle at >= 95% (2000 positions of
# LICENSE, onnxruntime, importance-weighted Q4_0). Gemma 3 270M is very sensitive to Q4_0:
# layer 14 alone gives 96.4%, layers 14 + 7 94.2%, all 18 layers 79.0% (71.5% with plain
# round-to-nearest), all layers and the lm_head 75.0%. See deploy/models/README.md.
DEFAULT_Q4_LAYERS = [14]


def parse_layers(spec: str, n_layers: int):
    if spec.strip() == "all":
        return list(range(n_layers))
    if spec.strip() in ("", "none"):
        return []
    layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    assert all(0 <= i < n_layers for i in layers), f"layers are 0..{n_layers - 1}"
    return layers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=str(DEFAULT_GGUF))
    ap.add_argument("--out", default=None, help="bundle dir (default ~/.cache/outpost/bundles/NAME)")
    ap.add_argument("--quantize", choices=["none", "q4_0", "q8_0"], default="none")
    ap.add_argument("--q4-layers", default=",".join(map(str, DEFAULT_Q4_LAYERS)),
                    help="with --quantize q4_0: decoder layers whose projections become Q4_0: comma-separated "
                         "indices, 'all' or 'none' (default %(default)s: the largest set measured to keep 95%% "
                         "teacher-forced agreement with f32)")
    ap.add_argument("--q4-projections", default=",".join(PROJECTIONS),
                    help="with --quantize q4_0: which projections of those layers (default: all seven)")
    ap.add_argument("--lm-head", choices=["f32", "q4_0"], default="f32",
                    help="with --quantize q4_0: also quantize the 262144 x 640 output matmul")
    ap.add_argument("--output-layer", choices=["graph", "q8_0", "q4_0"], default="q8_0",
                    help="with --quantize q4_0: the output matmul outside the decoder graph, in the runtime's "
                         "own Q8_0 kernels (default: exact, since the GGUF's tied table is Q8_0) or Q4_0 ones "
                         "(half the bytes; also the embedding table, requantized), or left in the graph (f32 "
                         "unless --lm-head q4_0)")
    ap.add_argument("--rounding", choices=["imatrix", "search", "reference"], default="imatrix",
                    help="Q4_0 rounding: llama.cpp's make_qx_quants weighted by an importance matrix from "
                         "CALIBRATION_TEXT (default), the same with uniform weights, or the plain reference "
                         "d = max / -8 round-to-nearest")
    ap.add_argument("--embed-dtype", choices=["f32", "f16", "q8_0"], default=None,
                    help="embedding table storage (default: f32 for none, q8_0 for q4_0; q8_0 is exact, "
                         "f16 moves inputs_embeds by up to 6e-3)")
    ap.add_argument("--from-f32", default=None,
                    help="with --quantize q4_0: quantize this f32 bundle (built by this script) "
                         "instead of loading the GGUF and exporting again")
    args = ap.parse_args()

    import torch  # noqa: F401  (import before onnxruntime: keeps the thread settings)

    q = args.quantize
    embed_dtype = args.embed_dtype or ("f32" if q == "none" else "q8_0")
    if embed_dtype != "f32" and q == "none":
        raise SystemExit("--embed-dtype f16/q8_0 is only for a quantized bundle")
    q4_layers = parse_layers(args.q4_layers, 18)
    q4_projs = [p for p in PROJECTIONS if p in {x.strip() for x in args.q4_projections.split(",")}]
    assert q4_projs or args.lm_head == "q4_0", f"nothing to quantize; projections are {PROJECTIONS}"
    if args.lm_head == "q4_0" and args.output_layer != "graph":
        raise SystemExit("--lm-head q4_0 quantizes the output matmul inside the graph: add --output-layer graph")
    name = "gemma-3-270m"
    if q == "q8_0":
        name += "-q8_0"
    if q == "q4_0":
        name += "-q4_0"
        if q4_layers != DEFAULT_Q4_LAYERS or q4_projs != PROJECTIONS:
            name += "-all" if q4_layers == list(range(18)) and q4_projs == PROJECTIONS else "-custom"
        if args.lm_head == "q4_0":
            name += "-lmhead"
        if args.output_layer == "q4_0":
            name += "-q4out"
    out = Path(args.out) if args.out else DEFAULT_OUT / (name + ("-f32" if q == "none" else ""))
    gguf = Path(args.gguf)
    print(f"bundle {name} -> {out}")

    if q == "none" or not args.from_f32:
        work = out if q == "none" else Path(tempfile.mkdtemp(prefix="gemma3-f32-"))
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        info = {}
        build_f32(args, work, info)
        info["gguf"] = str(gguf)
        info["gguf_sha256"] = sha256(gguf)
        m = write_manifest(work, args, "gemma-3-270m", "none",
                           "google/gemma-3-270m (base model) from the Q4_K_M GGUF, dequantized to f32.",
                           info, info["parity_f32"], "f32")
        stage("manifest")
        ok = info["parity_f32"]["greedy_32_vs_hf_generate"]["equal"]
        if q == "none":
            print(f"bundle: {out} ({sum(f['bytes'] for f in m['files'].values()) / 1e6:.1f} MB)")
            print("timings:", json.dumps(TIMINGS))
            return 0 if ok else 1
        if not ok:
            raise SystemExit("the f32 export does not match HF generate: not quantizing it")
        f32_dir = work
    else:
        f32_dir = Path(args.from_f32)
    return build_quantized(args, f32_dir, out, name, embed_dtype, q4_layers, q4_projs, cleanup=not args.from_f32)


def build_quantized(args, f32_dir: Path, out: Path, name, embed_dtype, q4_layers, q4_projs, cleanup):
    import onnx
    from onnx import numpy_helper
    from tokenizers import Tokenizer

    fm = json.loads((f32_dir / "manifest.json").read_text())
    assert fm["quantization"] == "none" and fm["architecture"] == "gemma3", f32_dir
    text = fm["text"]
    n_layers, nkv, hd, vocab = text["num_layers"], text["num_kv_heads"], text["head_dim"], text["vocab_size"]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(f32_dir / "tokenizer.json", out / "tokenizer.json")
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))

    # ------------------------------------------------------------ decoder
    dm = onnx.load(str(f32_dir / "decoder.onnx"))
    stage("load f32 decoder")
    output_layer = None
    if args.output_layer in OUTPUT_LAYER_FILES:
        head = split_output_layer(dm, lambda name, _: name == "lm_head.weight_t", text["hidden_size"])
        layer_file = OUTPUT_LAYER_FILES[args.output_layer]
        if args.output_layer == "q4_0":
            write_q4_0_blocks(out / layer_file, head)
            exact = False
        else:
            exact = write_q8_0_blocks(out / layer_file, head)
        del head
        output_layer = {"format": args.output_layer, "rows": vocab, "columns": text["hidden_size"],
                        "softcap": text["final_logit_softcap"], "exact": exact}
        stage(f"{layer_file} ({'exact' if exact else 'requantized'})")

    # ------------------------------------------------------------ embed
    em = onnx.load(str(f32_dir / "embed.onnx"))
    inits = {i.name: i for i in em.graph.initializer}
    assert "embed_tokens.weight" in inits, f"{f32_dir} is not an f32 bundle of this script"
    table = numpy_helper.to_array(inits["embed_tokens.weight"])
    scale = float(numpy_helper.to_array(inits["embed_scale"]))
    del em, inits
    if embed_dtype == "q8_0" and output_layer is not None and (
            output_layer["format"] == "q4_0" or tied_to_output_layer(table, out / OUTPUT_LAYER_FILE)):
        # Gemma ties the two: the runtime reads embeddings from the output layer's rows, and
        # the table is held once (178 MB less here, 400 MB less for E2B). A Q4_0 output layer
        # is the same table, requantized: its rows become the embeddings, as in a Q4_0 GGUF.
        output_layer["embed_scale"] = scale
        stage(f"embeddings from the output layer (the same table, {output_layer['format']})")
    else:
        write_embed(out / "embed.onnx", table, scale, embed_dtype)
        stage(f"embed.onnx ({embed_dtype})")
    del table

    def select(node, weight, k, n):
        layer, proj = weight_role(weight)
        if proj == "lm_head":
            assert n == vocab
            return args.lm_head == "q4_0"
        if layer is None:
            raise ValueError(f"unexpected constant-weight MatMul {node.name} ({weight}, K={k}, N={n})")
        return layer in q4_layers and proj in q4_projs

    importance = None
    calibration_tokens = 0
    if args.quantize == "q4_0" and args.rounding == "imatrix":
        f32_embed = ort_session(f32_dir / "embed.onnx")
        cal = [2] + fast.encode(CALIBRATION_TEXT, add_special_tokens=False).ids
        calibration_tokens = len(cal)
        feed = dict(zip(kv_names(n_layers)[0], [np.zeros((1, nkv, 0, hd), np.float32)] * (2 * n_layers)))
        feed["inputs_embeds"] = f32_embed.run(None, {"input_ids": np.asarray([cal], np.int64)})[0]
        del f32_embed
        inits = {i.name for i in dm.graph.initializer}
        names = sorted({n.input[0] for n in dm.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                        and select(n, n.input[1], 0, vocab if weight_role(n.input[1])[1] == "lm_head" else 0)})
        importance = activation_importance(dm, [feed], names)
        stage(f"importance matrix ({len(cal)} calibration tokens, {len(names)} activations)")
    twin = None
    if args.quantize == "q8_0":
        done = quantize_q8_0(dm, select=lambda node, weight, k, n: weight_role(weight)[0] is not None)
        fused = fuse_block_siblings(dm)
        assert len(fused) == 2 * n_layers, f"merged {len(fused)} groups, expected q/k/v and gate/up per layer"
        expected = n_layers * len(PROJECTIONS)
        twin = Path(tempfile.mkdtemp(prefix="gemma3-q8_0-twin-")) / "decoder.onnx"
        onnx.save(runtime_twin(dm), str(twin))
    else:
        done = quantize_q4_0(dm, select=select, search=args.rounding == "search", importance=importance)
        fuse_block_siblings(dm)
        onnx.checker.check_model(dm)
        expected = len(q4_layers) * len(q4_projs) + (1 if args.lm_head == "q4_0" else 0)
    stage(f"quantize_{args.quantize}")
    dec_io = graph_io(dm)
    onnx.save(dm, str(out / "decoder.onnx"))
    del dm
    stage(f"save {args.quantize} decoder")
    assert len(done) == expected, f"rewrote {len(done)} MatMuls, expected {expected}"

    # ------------------------------------------------------------ parity vs the f32 bundle
    f32 = OrtLM(f32_dir, n_layers, nkv, hd)
    qlm = OrtLM(out, n_layers, nkv, hd, decoder=twin, embed_scale=(output_layer or {}).get("embed_scale"))
    stage("onnxruntime sessions")
    ids = [2] + fast.encode(PARITY_PROMPT, add_special_tokens=False).ids
    parity = {"reference": "the f32 bundle (onnxruntime)", "prompt": PARITY_PROMPT, "prompt_tokens": len(ids)}
    rows = list(range(0, vocab, 97))
    e32 = f32.embeds(rows)
    parity["embed_vs_f32_every_97th_row"] = maxdiff(qlm.embeds(rows), e32)
    parity["embed_abs_max"] = float(np.abs(e32).max())
    l32, _ = f32.step(ids, f32.empty_past())
    lq, _ = qlm.step(ids, qlm.empty_past())
    parity["prefill_logits_vs_f32"] = maxdiff(lq, l32)
    parity["prefill_argmax_agreement_vs_f32"] = float((lq[0].argmax(-1) == l32[0].argmax(-1)).mean())
    g32 = fm["parity"]["greedy_32_vs_hf_generate"]["ids"]
    gq, _, _ = qlm.greedy(ids)
    same = 0
    while same < len(gq) and gq[same] == g32[same]:
        same += 1
    parity["greedy_32"] = {"ids": gq, "equal_to_f32": gq == g32, "common_prefix_with_f32": same,
                           "text": fast.decode(gq, skip_special_tokens=False)}
    stage("onnxruntime parity vs f32 (prefill, greedy 32)")
    print(json.dumps(parity, indent=1, default=float))

    rounding = {"imatrix": "llama.cpp make_qx_quants weighted by an importance matrix",
                "search": "llama.cpp make_qx_quants, uniform weights",
                "reference": "llama.cpp reference rounding (d = max / -8)"}[args.rounding]
    layers_desc = "all layers" if q4_layers == list(range(n_layers)) else f"layers {q4_layers}"
    projs_desc = "q/k/v/o and gate/up/down projections" if q4_projs == PROJECTIONS else f"{q4_projs}"
    if args.quantize == "q8_0":
        q4_layers, layers_desc = list(range(n_layers)), "q8_0 (ai.outpost MatMulQ8_0, llama.cpp's Q8_0 rounding)"
        quant_desc = (f"{layers_desc} for the q/k/v/o and gate/up/down projections of all layers "
                      "(q/k/v and gate/up each merged into one product)")
    else:
        quant_desc = (f"q4_0 (MatMulNBits block 32, no zero points = GGML Q4_0; {rounding}) for the {projs_desc} "
                      f"of {layers_desc}" + ("" if q4_layers == list(range(n_layers)) else ", other layers f32"))
    quant_desc = (quant_desc
                  + (f"; lm_head {args.lm_head}" if output_layer is None else
                     f"; the output layer outside the graph in {output_layer['format'].upper()} "
                     f"({OUTPUT_LAYER_FILES[output_layer['format']]}"
                     + (", the GGUF's own, exact)" if output_layer["exact"] else ")"))
                  + f"; embedding table {embed_dtype}"
                  + (" (the GGUF's Q8_0, exact)" if embed_dtype == "q8_0" else ""))
    if output_layer is not None:
        text = {**text, "output_layer": output_layer}
    info = {"gguf": fm["source"]["gguf"], "gguf_sha256": fm["source"]["sha256"], "text": text, "decoder_io": dec_io,
            "special_tokens": fm["special_tokens"], "rewrites": fm.get("onnx_rewrites", {}),
            "versions": {k: fm["generator"][k] for k in ("torch", "transformers")}}
    write_manifest(out, args, name, quant_desc,
                   "google/gemma-3-270m (base model) from the Q4_K_M GGUF, dequantized to f32, decoder "
                   f"projections re-quantized to {args.quantize.upper()}.", info, parity, embed_dtype,
                   extra={"quantized_matmuls": {"format": args.quantize, "count": len(done), "layers": q4_layers,
                                                "projections": q4_projs,
                                                "lm_head": args.lm_head, "output_layer": args.output_layer,
                                                "rounding": args.rounding if args.quantize == "q4_0" else
                                                "llama.cpp quantize_row_q8_0 (d = max / 127)",
                                                "calibration_tokens": calibration_tokens,
                                                "weight_rmse_max": max(d["rmse"] for d in done)},
                          "f32_parity": fm["parity"]})
    stage("manifest")
    if cleanup:
        shutil.rmtree(f32_dir, ignore_errors=True)
    if twin is not None:
        shutil.rmtree(twin.parent, ignore_errors=True)
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    print(f"bundle: {out} {sizes}")
    print("timings:", json.dumps(TIMINGS))
    return 0


if __name__ == "__main__":
    fix_string_hashing()
    sys.exit(main())
