//! `deploy/models/gemma4_gguf.py` against PyTorch: the tiny Gemma 4 checkpoint
//! (`daemon/tests/fixtures/gemma4-tiny-hf`) converted to GGUF and run by the vendored llama.cpp
//! gives the logits transformers gave for it (`daemon/tests/fixtures/gemma4-tiny/reference`:
//! `text_full_forward_logits.npy`, one forward pass over the text prompt and its first 4 greedy
//! tokens). The 31 positions run past the sliding window (4) many times over and through all
//! three KV-shared layers, so a wrong head size, RoPE, window, sharing or PLE detail shows.
//!
//! Needs the model tools' Python (`OUTPOST_PYTHON`, set by `test.sh` from
//! `deploy/models/prepare_test_models.sh`); skipped with a reason when it is not set, unless
//! OUTPOST_REQUIRE_REAL_MODEL is set (test.sh sets it), as the daemon's model tests do.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use serde_json::Value;

/// f32 weights, f32 KV cache, no flash attention: what is left is ggml's GELU, which on CPU looks
/// x up in an f16 table (GGML_GELU_FP16 in ggml-cpu/vec.h), and summation order. Measured 5.6e-3;
/// PyTorch with that f16 GELU lands 5.2e-3 from its own logits and 1.8e-3 from llama.cpp's. The
/// random toy model magnifies every rounding (each layer re-normalises tiny outputs: rounding the
/// weights to f16 moves PyTorch's logits by 0.04), so this bound still rejects an f16-sized slip,
/// and a swapped pair of weights moves the logits by more than 1 (the negative control below).
/// Logits are about 1 in size (largest 5); no two leading logits are closer than 0.066.
const F32_TOLERANCE: f32 = 1e-2;
/// Q8_0 weights are compared with PyTorch running the same dequantized weights, with the
/// activations rounded as ggml's CPU matmuls round them (to Q8_0 blocks against Q8_0 weights, to
/// f16 against f16 ones) and the f16 GELU: measured 0.045. Against the f32 reference the Q8_0
/// rounding alone moves this toy model by 0.93 (PyTorch on the Q8_0 weights included), which no
/// useful bound could tell from a mistake.
const Q8_0_TOLERANCE: f32 = 0.15;

/// PyTorch's logits for the tiny checkpoint with the decoder weights the GGUF holds (dequantized
/// by gguf-py) and ggml's CPU roundings: what llama.cpp computes, up to summation order.
/// argv: checkpoint, GGUF, token ids (JSON), output .npy.
const SAME_WEIGHTS_PYTORCH: &str = r#"
import json, sys
import gguf, numpy as np, torch
from transformers import AutoModelForImageTextToText

checkpoint, gguf_path, ids, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
Q8_0, Q4_0, F16 = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0,
                   gguf.GGMLQuantizationType.F16)
stored = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}

def weight(name):
    t = stored[name]
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)), t.tensor_type

def round_input(qtype):
    # ggml converts a matmul's activations to the weight's vec_dot type first.
    def q8_0(x):
        rows = x.detach().numpy().reshape(-1, x.shape[-1])
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(rows, Q8_0), Q8_0).reshape(x.shape))
    # Q4_0 weights multiply Q8_0 activations too (ggml's vec_dot_type for Q4_0).
    return {Q8_0: lambda m, a: (q8_0(a[0]),), Q4_0: lambda m, a: (q8_0(a[0]),),
            F16: lambda m, a: (a[0].half().float(),)}.get(qtype)

class GeluF16(torch.nn.Module):
    # ggml_vec_gelu_f32 with GGML_GELU_FP16: x to f16, table of f16 results, exact beyond +-10.
    def forward(self, x):
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

def load(module, name):
    w, qtype = weight(name)
    module.weight.copy_(w.reshape(module.weight.shape))
    if (hook := round_input(qtype)) is not None:
        module.register_forward_pre_hook(hook)

model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
lm = model.model.language_model
projections = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "per_layer_input_gate": "inp_gate", "per_layer_projection": "proj"}
with torch.no_grad():
    for i, layer in enumerate(lm.layers):
        layer.act_fn = GeluF16()
        layer.mlp.act_fn = GeluF16()
        for hf, name in projections.items():
            if f"blk.{i}.{name}.weight" in stored:
                load(layer.get_submodule(hf), f"blk.{i}.{name}.weight")
    lm.embed_tokens.weight.copy_(weight("token_embd.weight")[0])
    lm.embed_tokens_per_layer.weight.copy_(weight("per_layer_token_embd.weight")[0])
    load(lm.per_layer_model_projection, "per_layer_model_proj.weight")
    # The tied output layer is token_embd in llama.cpp too, activations rounded alike.
    assert model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()
    if (hook := round_input(stored["token_embd.weight"].tensor_type)) is not None:
        model.lm_head.register_forward_pre_hook(hook)
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
np.save(out, logits.numpy().astype(np.float32))
"#;

fn python() -> Option<PathBuf> {
    match std::env::var_os("OUTPOST_PYTHON") {
        Some(path) => Some(PathBuf::from(path)),
        None if std::env::var_os("OUTPOST_REQUIRE_REAL_MODEL").is_some() => {
            panic!("OUTPOST_PYTHON is not set: run deploy/models/prepare_test_models.sh (test.sh does)")
        }
        None => {
            eprintln!("skipped: OUTPOST_PYTHON is not set (bash test.sh prepares the model tools and sets it)");
            None
        }
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tiny_checkpoint() -> PathBuf {
    repo().join("daemon/tests/fixtures/gemma4-tiny-hf")
}

fn run_converter(python: &Path, checkpoint: &Path, out: &Path, storage: &str, output_layer: &str) -> Output {
    Command::new(python)
        .arg(repo().join("deploy/models/gemma4_gguf.py"))
        .arg("--checkpoint")
        .arg(checkpoint)
        .arg("--out")
        .arg(out)
        .args(["--type", storage, "--output-layer", output_layer])
        .output()
        .unwrap()
}

fn convert(python: &Path, checkpoint: &Path, dir: &Path, storage: &str) -> PathBuf {
    convert_with_output_layer(python, checkpoint, dir, storage, "q8_0")
}

/// The GGUF with its token table (tied to the output layer) stored as `output_layer` says.
fn convert_with_output_layer(
    python: &Path,
    checkpoint: &Path,
    dir: &Path,
    storage: &str,
    output_layer: &str,
) -> PathBuf {
    let out = dir.join(format!("model-{storage}-{output_layer}.gguf"));
    let output = run_converter(python, checkpoint, &out, storage, output_layer);
    assert!(output.status.success(), "gemma4_gguf.py --type {storage}: {}", String::from_utf8_lossy(&output.stderr));
    out
}

/// A little-endian f32 C-order .npy file: its shape and values.
fn read_npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"), "{header}");
    let dims = header.split("'shape': (").nth(1).and_then(|rest| rest.split(')').next()).unwrap();
    let shape = dims.split(',').map(str::trim).filter(|d| !d.is_empty()).map(|d| d.parse().unwrap()).collect();
    let values =
        bytes[start + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (shape, values)
}

/// PyTorch's reference: the token ids and, for each position, the logits over the vocabulary.
struct Reference {
    ids: Vec<i32>,
    prompt_len: usize,
    /// transformers' logits at each position.
    logits: Vec<Vec<f32>>,
}

fn rows(shape: &[usize], values: &[f32], positions: usize) -> Vec<Vec<f32>> {
    assert_eq!(shape, [positions, 512]);
    values.chunks(512).map(<[f32]>::to_vec).collect()
}

fn reference() -> Reference {
    let dir = repo().join("daemon/tests/fixtures/gemma4-tiny/reference");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let text = &json["greedy"]["text"];
    let ids_of = |v: &Value| v.as_array().unwrap().iter().map(|id| id.as_i64().unwrap() as i32).collect::<Vec<_>>();
    let mut ids = ids_of(&text["prompt_ids"]);
    let prompt_len = ids.len();
    // text_full_forward_logits.npy is the forward pass over the prompt and its first 4 greedy ids.
    ids.extend(&ids_of(&text["hf_ids"])[..4]);
    let (shape, values) = read_npy_f32(&dir.join("text_full_forward_logits.npy"));
    let logits = rows(&shape, &values, ids.len());
    Reference { ids, prompt_len, logits }
}

fn backend() -> &'static LlamaBackend {
    // llama.cpp's backend starts once per process; the tests share it.
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        let mut backend = LlamaBackend::init().unwrap();
        backend.void_logs();
        backend
    })
}

/// llama.cpp's logits at every position of `reference.ids`, computed twice: all positions in
/// one batch, and the prompt in one batch followed by one token at a time through the KV cache.
fn llama_cpp_logits(gguf: &Path, reference: &Reference) -> [Vec<Vec<f32>>; 2] {
    let model = LlamaModel::load_from_file(backend(), gguf, &LlamaModelParams::default())
        .unwrap_or_else(|e| panic!("llama.cpp cannot load {}: {e}", gguf.display()));
    assert_eq!(model.n_vocab(), 512);
    assert_eq!(model.n_layer(), 6);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(64))
        .with_n_batch(64)
        .with_n_ubatch(64)
        .with_n_threads(2)
        .with_n_threads_batch(2)
        // An f32 cache and no flash attention (LLAMA_FLASH_ATTN_TYPE_DISABLED): the default f16
        // cache would round K and V, which PyTorch keeps in f32.
        .with_type_k(KvCacheType::F32)
        .with_type_v(KvCacheType::F32)
        .with_flash_attention_policy(0);
    let mut context = model.new_context(backend(), params).expect("llama.cpp context");
    let ids = &reference.ids;

    let mut batch = LlamaBatch::new(ids.len(), 1);
    let whole = decode(&mut context, &mut batch, ids, 0..ids.len());

    context.clear_kv_cache();
    let mut stepped = decode(&mut context, &mut batch, ids, 0..reference.prompt_len);
    for position in reference.prompt_len..ids.len() {
        stepped.extend(decode(&mut context, &mut batch, ids, position..position + 1));
    }
    [whole, stepped]
}

/// Decodes `ids[positions]` at their positions, after what the cache holds; the logits of each.
fn decode(
    context: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    ids: &[i32],
    positions: std::ops::Range<usize>,
) -> Vec<Vec<f32>> {
    batch.clear();
    for position in positions.clone() {
        batch.add(LlamaToken(ids[position]), position as i32, &[0], true).unwrap();
    }
    context.decode(batch).expect("llama.cpp decode");
    (0..positions.len() as i32).map(|i| context.get_logits_ith(i).to_vec()).collect()
}

/// The largest absolute difference from `expected`, and the position where it is.
fn max_difference(ours: &[Vec<f32>], expected: &[Vec<f32>]) -> (f32, usize) {
    assert_eq!(ours.len(), expected.len());
    let mut worst = (0.0f32, 0);
    for (position, (a, b)) in ours.iter().zip(expected).enumerate() {
        assert_eq!(a.len(), b.len());
        // A NaN logit is the worst difference of all (f32::max would drop it).
        let difference = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, |worst: f32, d| {
            if d.is_nan() || worst.is_nan() {
                f32::NAN
            } else {
                worst.max(d)
            }
        });
        if difference.is_nan() || difference > worst.0 {
            worst = (difference, position);
        }
    }
    worst
}

fn argmax(logits: &[f32]) -> usize {
    logits.iter().enumerate().fold(0, |best, (i, &x)| if x > logits[best] { i } else { best })
}

/// At every position whose expected top two are more than `2 * tolerance` apart, the same token wins.
fn assert_same_choices(ours: &[Vec<f32>], expected: &[Vec<f32>], tolerance: f32, what: &str) {
    for (position, (a, b)) in ours.iter().zip(expected).enumerate() {
        let best = argmax(b);
        let runner_up = b.iter().enumerate().filter(|&(i, _)| i != best).map(|(_, &x)| x).fold(f32::MIN, f32::max);
        if b[best] - runner_up > 2.0 * tolerance {
            assert_eq!(argmax(a), best, "{what}: position {position}");
        }
    }
}

/// llama.cpp on `gguf`, both ways, within `tolerance` of `expected` and choosing the same tokens.
fn check(gguf: &Path, reference: &Reference, expected: &[Vec<f32>], tolerance: f32, what: &str) {
    for (logits, mode) in llama_cpp_logits(gguf, reference).iter().zip(["one batch", "prefill then decode"]) {
        let (difference, position) = max_difference(logits, expected);
        eprintln!("{what}, {mode}: max |llama.cpp - PyTorch| = {difference:e} (position {position})");
        assert!(difference <= tolerance, "{what}, {mode}: logits differ by {difference} at position {position}");
        assert_same_choices(logits, expected, tolerance, what);
        let (from_f32, _) = max_difference(logits, &reference.logits);
        eprintln!("{what}, {mode}: max |llama.cpp - PyTorch f32 checkpoint| = {from_f32:e}");
    }
}

#[test]
fn the_f32_gguf_gives_pytorchs_logits() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gguf = convert(&python, &tiny_checkpoint(), dir.path(), "f32");
    let reference = reference();
    check(&gguf, &reference, &reference.logits, F32_TOLERANCE, "f32");
}

/// PyTorch's logits for the tiny checkpoint with the weights `gguf` holds (`SAME_WEIGHTS_PYTORCH`).
fn same_weights_logits(python: &Path, gguf: &Path, reference: &Reference, dir: &Path) -> Vec<Vec<f32>> {
    let expected = dir.join("same-weights.npy");
    let ids = serde_json::to_string(&reference.ids).unwrap();
    let output = Command::new(python)
        .args(["-c", SAME_WEIGHTS_PYTORCH])
        .arg(tiny_checkpoint())
        .arg(gguf)
        .arg(ids)
        .arg(&expected)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let (shape, values) = read_npy_f32(&expected);
    rows(&shape, &values, reference.ids.len())
}

#[test]
fn the_q8_0_gguf_stays_close_to_pytorch() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gguf = convert(&python, &tiny_checkpoint(), dir.path(), "q8_0");
    let f32_bytes = std::fs::metadata(convert(&python, &tiny_checkpoint(), dir.path(), "f32")).unwrap().len();
    let q8_bytes = std::fs::metadata(&gguf).unwrap().len();
    // Most of the weights are in matrices with rows of 64 or 128: Q8_0 stores them in 34/128 of f32.
    assert!(q8_bytes * 2 < f32_bytes, "q8_0 {q8_bytes} bytes, f32 {f32_bytes}");
    let model = LlamaModel::load_from_file(backend(), &gguf, &LlamaModelParams::default()).unwrap();
    assert_eq!(model.meta_val_str("general.file_type").unwrap(), "7", "LLAMA_FTYPE_MOSTLY_Q8_0");
    drop(model);

    let reference = reference();
    let expected = same_weights_logits(&python, &gguf, &reference, dir.path());
    // The Q8_0 rounding must show, or the matrices were not quantized.
    assert!(max_difference(&expected, &reference.logits).0 > 10.0 * F32_TOLERANCE);
    check(&gguf, &reference, &expected, Q8_0_TOLERANCE, "q8_0");
}

/// The projections' Q4_0 values in the GGUF, and the token table's where it is Q4_0, against
/// `onnx_tract.q4_0_pack` of the checkpoint's weights (what `prepare_gemma4.py --quantize q4_0`
/// and `--output-layer q4_0` put in a bundle): prints how many matrices were compared and how
/// many differ.
const Q4_0_SAME_AS_BUNDLE: &str = r#"
import sys
sys.path.insert(0, sys.argv[3])
import gguf, numpy as np
from safetensors.numpy import load_file
from onnx_tract import q4_0_pack
checkpoint, gguf_path = sys.argv[1], sys.argv[2]
weights = load_file(f"{checkpoint}/model.safetensors")
names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}
compared = differ = 0
for t in gguf.GGUFReader(gguf_path).tensors:
    block, layer, name, _ = (t.name.split(".") + [""] * 4)[:4]
    if t.name == "token_embd.weight" and t.tensor_type == gguf.GGMLQuantizationType.Q4_0:
        source = "model.language_model.embed_tokens.weight"
    elif block == "blk" and name in names:
        source = f"model.language_model.layers.{layer}.{names[name]}.weight"
    else:
        continue
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, (t.name, t.tensor_type)
    w = weights[source].astype(np.float32)
    stored = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(w.shape)
    compared += 1
    differ += int(not np.array_equal(stored, q4_0_pack(w)[2]))
print(compared, differ)
"#;

#[test]
fn the_q4_0_gguf_holds_the_bundles_values_and_stays_close_to_pytorch() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gguf = convert(&python, &tiny_checkpoint(), dir.path(), "q4_0");
    let model = LlamaModel::load_from_file(backend(), &gguf, &LlamaModelParams::default()).unwrap();
    assert_eq!(model.meta_val_str("general.file_type").unwrap(), "2", "LLAMA_FTYPE_MOSTLY_Q4_0");
    drop(model);

    let same_as_bundle = |gguf: &Path| {
        let output = Command::new(&python)
            .args(["-c", Q4_0_SAME_AS_BUNDLE])
            .arg(tiny_checkpoint())
            .arg(gguf)
            .arg(repo().join("deploy/models"))
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    // 7 projections in 6 layers, less the K/V of the 3 KV-shared layers (as the bundle's 36).
    assert_eq!(same_as_bundle(&gguf), "36 0", "projections compared, and of them differing from the bundle's");
    // With the token table in Q4_0 as well, as `--output-layer q4_0` makes the bundle's.
    let q4_0_table = convert_with_output_layer(&python, &tiny_checkpoint(), dir.path(), "q4_0", "q4_0");
    assert_eq!(same_as_bundle(&q4_0_table), "37 0", "the token table is the bundle's output layer");

    let reference = reference();
    let expected = same_weights_logits(&python, &gguf, &reference, dir.path());
    assert!(max_difference(&expected, &reference.logits).0 > 10.0 * F32_TOLERANCE);
    check(&gguf, &reference, &expected, Q8_0_TOLERANCE, "q4_0");
}

/// The negative control: a checkpoint with two same-shaped weights swapped (layer 1's gate and up
/// projections) converts and loads, and the comparison above rejects it by a wide margin.
#[test]
fn two_swapped_weights_are_caught() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let swapped = dir.path().join("swapped");
    let script = r#"
import shutil, sys
from pathlib import Path
from safetensors.numpy import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, dst)
weights = load_file(src / "model.safetensors")
gate, up = (f"model.language_model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up"))
weights[gate], weights[up] = weights[up], weights[gate]
save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
"#;
    let output = Command::new(&python).args(["-c", script]).arg(tiny_checkpoint()).arg(&swapped).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let gguf = convert(&python, &swapped, dir.path(), "f32");
    let reference = reference();
    for logits in llama_cpp_logits(&gguf, &reference) {
        let (difference, _) = max_difference(&logits, &reference.logits);
        assert!(difference > 20.0 * F32_TOLERANCE, "a swapped pair moved the logits by only {difference}");
    }
}

#[test]
fn a_checkpoint_that_cannot_be_converted_is_refused_with_the_reason() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let not_gemma4 = dir.path().join("llama");
    std::fs::create_dir(&not_gemma4).unwrap();
    std::fs::write(not_gemma4.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let no_tokenizer = dir.path().join("no-tokenizer");
    std::fs::create_dir(&no_tokenizer).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny_checkpoint().join(file), no_tokenizer.join(file)).unwrap();
    }
    let no_weights = dir.path().join("no-weights");
    std::fs::create_dir(&no_weights).unwrap();
    std::fs::copy(tiny_checkpoint().join("config.json"), no_weights.join("config.json")).unwrap();
    let cases = [
        (dir.path().join("missing"), "no such checkpoint directory".to_string()),
        (not_gemma4.clone(), "not a Gemma 4 checkpoint (model_type 'llama'".to_string()),
        (no_tokenizer.clone(), format!("{}: missing", no_tokenizer.join("tokenizer.json").display())),
        (no_weights.clone(), "no *.safetensors file".to_string()),
    ];
    for (checkpoint, message) in cases {
        let out = dir.path().join("out.gguf");
        let output = run_converter(&python, &checkpoint, &out, "f32", "q8_0");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{}: {stderr}", checkpoint.display());
        assert!(stderr.contains(&message), "{}: expected {message:?} in {stderr}", checkpoint.display());
        assert!(!stderr.contains("Traceback"), "{stderr}");
        assert!(!out.exists(), "nothing is left behind for {}", checkpoint.display());
    }
}
