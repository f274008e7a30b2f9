//! `deploy/models/prepare_gemma4.py`, the tool a user runs on a downloaded Gemma 4 checkpoint,
//! run on the tiny checkpoint committed in `tests/fixtures/gemma4-tiny-hf`: the bundles it writes
//! load in tract and answer as PyTorch (f32) and onnxruntime (Q4_0, Q8_0) do.
//!
//! Needs the model tools' Python (`OUTPOST_PYTHON`, set by `test.sh` from
//! `deploy/models/prepare_test_models.sh`); skipped with a reason when it is not set.

#[path = "common/npy.rs"]
mod npy;
#[path = "common/prepared.rs"]
mod prepared;
#[path = "common/tiny_reference.rs"]
mod tiny_reference;

use std::path::{Path, PathBuf};
use std::process::Command;

use prepared::prepared_path;
use tiny_reference::{reference_audio_features, reference_image, reference_json};

use outpost::model::{Bundle, Runtime, Sampler, Sampling, SoftTokens};
use serde_json::Value;

/// The tiny model's per-layer inputs' projections in Q8_0: each of the 6 layers' gate (64 to 8)
/// and the model's projection (64 to 6 x 8); a layer's projection back (8 to 64) has rows too
/// short for a block.
const PER_LAYER_Q8_0_MATMULS: u64 = 7;

/// A top-2 logit margin below which tract and onnxruntime may pick different tokens. The tiny
/// Q4_0 model's answer stays the same through margins of 0.016 and parts at one of 0.007.
const NEAR_TIE: f64 = 0.01;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Runs prepare_gemma4.py on `checkpoint`, writing `out`.
fn run_prepare(python: &Path, checkpoint: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/models/prepare_gemma4.py");
    Command::new(python)
        .arg(script)
        .arg("--checkpoint")
        .arg(checkpoint)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// Prepares the tiny checkpoint into a fresh directory.
fn prepare(python: &Path, extra: &[&str]) -> (tempfile::TempDir, Bundle) {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("bundle");
    let output = run_prepare(python, &fixtures().join("gemma4-tiny-hf"), &out, extra);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "prepare_gemma4.py {extra:?} failed: {}", tail(&stderr, 3000));
    let bundle = Bundle::open(&out).unwrap_or_else(|e| panic!("{e}"));
    (work, bundle)
}

fn tail(text: &str, chars: usize) -> &str {
    let start = text.char_indices().rev().nth(chars).map_or(0, |(i, _)| i);
    &text[start..]
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn greedy(runtime: &Runtime, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(Sampling::Greedy);
    runtime.generate(prompt, None, None, steps, &mut sampler, &[], |_| {}, |_| {}).unwrap()
}

#[test]
fn f32_bundle_from_the_checkpoint_is_the_committed_one() {
    let Some(python) = prepared_path("OUTPOST_PYTHON") else { return };
    let (_work, bundle) = prepare(&python, &[]);
    let committed = Bundle::open(&fixtures().join("gemma4-tiny")).unwrap();
    // The graphs and tokenizer are byte for byte those the gemma4_tiny tests hold to PyTorch.
    for role in ["embed", "decoder", "vision", "audio", "tokenizer"] {
        assert_eq!(bundle.manifest.files[role].sha256, committed.manifest.files[role].sha256, "{role}");
    }
    assert!(bundle.manifest.instruction_tuned, "the checkpoint has a chat template");
    assert_eq!(bundle.manifest.sections["special_tokens"], committed.manifest.sections["special_tokens"]);

    let case = &reference_json()["greedy"]["text"];
    let runtime = Runtime::load(&bundle).unwrap();
    assert_eq!(greedy(&runtime, &ids(&case["prompt_ids"]), 32), ids(&case["hf_ids"]));
}

/// What every quantized bundle holds: no embed graph (token rows come from the output layer,
/// per-layer rows from their table on disk), tract answering as onnxruntime does, and at least
/// `agreement` of the teacher-forced next tokens those of the f32 graphs.
fn check_quantized(bundle: &Bundle, agreement: f64) {
    let files = &bundle.manifest.files;
    assert!(!files.contains_key("embed"), "the embed graph is replaced by row tables");
    for role in ["output_layer", "per_layer_embeddings"] {
        assert!(files.contains_key(role), "{role} is not in the manifest");
    }
    let text = &bundle.manifest.sections["text"];
    assert_eq!(text["output_layer"]["embed_scale"], 8.0, "hidden 64: the token rows are scaled by its square root");
    let ple = &text["per_layer_embeddings"];
    assert_eq!((&ple["layers"], &ple["width"], &ple["columns"]), (&6.into(), &8.into(), &64.into()));
    // 6 x 8 values per row, padded to two blocks of 32.
    assert_eq!(files["per_layer_embeddings"].bytes, 512 * 2 * 34);

    let quantized = &bundle.manifest.sections["parity"]["quantized"];
    let prompt = ids(&reference_json()["greedy"]["text"]["prompt_ids"]);
    let runtime = Runtime::load(bundle).unwrap();
    let expected = ids(&quantized["greedy_text"]["ids"]);
    // tract and onnxruntime sum in different orders: where onnxruntime's two likeliest tokens
    // were nearly tied, either may come first, and the answers may part from there.
    let margins: Vec<f64> =
        quantized["greedy_text"]["top2_margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
    let decided = margins.iter().position(|&margin| margin < NEAR_TIE).unwrap_or(margins.len());
    println!("onnxruntime's greedy answer: {decided} tokens before a near tie (margins {margins:.3?})");
    assert!(decided >= 8, "too few tokens to compare: {margins:?}");
    let got = greedy(&runtime, &prompt, decided);
    assert_eq!(got, expected[..decided], "tract vs onnxruntime on the quantized graphs");
    assert!(quantized["teacher_forced"]["agreement_with_f32"].as_f64().unwrap() >= agreement, "{quantized}");
}

#[test]
fn q4_0_bundle_with_external_weights_answers_as_onnxruntime_does() {
    let Some(python) = prepared_path("OUTPOST_PYTHON") else { return };
    // Every graph keeps its weights in NAME.onnx.data, as the real E2B's large graphs must.
    let (_work, bundle) =
        prepare(&python, &["--quantize", "q4_0", "--output-layer", "q4_0", "--external-data-over", "0"]);
    for role in ["decoder_data", "vision_data", "audio_data"] {
        assert!(bundle.manifest.files.contains_key(role), "{role} is not in the manifest");
    }
    let quantized = &bundle.manifest.sections["parity"]["quantized"];
    assert!(bundle.manifest.quantization.starts_with("q4_0"), "{}", bundle.manifest.quantization);
    assert_eq!(quantized["q4_0_matmuls"], 36, "7 projections in 6 layers, less the K/V of the 3 KV-shared layers");
    assert_eq!(quantized["per_layer_q8_0_matmuls"], PER_LAYER_Q8_0_MATMULS);
    // Merged as in Q8_0: q/k/v of the layers that own a cache, gate/up everywhere.
    assert_eq!(quantized["fused_groups"], 9);
    let decoder_bytes = bundle.manifest.files["decoder"].bytes + bundle.manifest.files["decoder_data"].bytes;
    let f32_decoder_bytes = Bundle::open(&fixtures().join("gemma4-tiny")).unwrap().manifest.files["decoder"].bytes;
    println!("decoder: {decoder_bytes} bytes in Q4_0, {f32_decoder_bytes} in f32");
    assert!(decoder_bytes * 2 < f32_decoder_bytes);
    // The output layer (also the token table) in GGML Q4_0 blocks: 512 rows of two 18-byte blocks.
    assert_eq!(bundle.manifest.sections["text"]["output_layer"]["format"], "q4_0");
    assert_eq!(bundle.manifest.files["output_layer"].path, "output_layer.q4_0");
    assert_eq!(bundle.manifest.files["output_layer"].bytes, 512 * 2 * 18);
    // 4 bits cost the tiny random model's near-tied logits much more than 8 (0.65 against 0.93).
    check_quantized(&bundle, 0.6);
}

#[test]
fn q8_0_bundle_runs_its_projections_on_our_kernels_and_answers_as_onnxruntime_does() {
    let Some(python) = prepared_path("OUTPOST_PYTHON") else { return };
    let (_work, bundle) = prepare(&python, &["--quantize", "q8_0", "--encoders", "q8_0"]);
    let quantized = &bundle.manifest.sections["parity"]["quantized"];
    assert!(bundle.manifest.quantization.starts_with("q8_0"), "{}", bundle.manifest.quantization);
    assert_eq!(quantized["q8_0_matmuls"], 36, "7 projections in 6 layers, less the K/V of the 3 KV-shared layers");
    assert_eq!(quantized["per_layer_q8_0_matmuls"], PER_LAYER_Q8_0_MATMULS);
    // q/k/v of the 3 layers that own a cache, q alone in the shared ones; gate/up everywhere.
    assert_eq!(quantized["fused_groups"], 9);
    assert_eq!(bundle.manifest.sections["text"]["output_layer"]["format"], "q8_0");
    assert_eq!(bundle.manifest.files["output_layer"].bytes, 512 * 2 * 34);
    check_quantized(&bundle, 0.9);

    // The encoders' linears are Q8_0 too: tract's soft tokens stay near those of the f32 bundle
    // (which match PyTorch's, gemma4_tiny.rs), within 8% of the largest value. The tiny random
    // model's move by 3-4% in onnxruntime (8-bit weights) and by 5% in tract (8-bit activations
    // too): why the encoders stay f32 unless asked.
    let runtime = Runtime::load(&bundle).unwrap();
    let f32_runtime = Runtime::load(&Bundle::open(&fixtures().join("gemma4-tiny")).unwrap()).unwrap();
    let (image, audio) = (reference_image(), reference_audio_features());
    for (what, role, soft, expected) in [
        ("image", "vision", runtime.encode_image(&image).unwrap(), f32_runtime.encode_image(&image).unwrap()),
        ("audio", "audio", runtime.encode_audio(&audio).unwrap(), f32_runtime.encode_audio(&audio).unwrap()),
    ] {
        let relative = relative_difference(&soft, &expected);
        println!("{what} soft tokens, Q8_0 against f32: largest difference {relative:.4} of the largest value");
        assert!(relative < 0.08, "{what}: {relative}");
        let reported = quantized["encoders_vs_f32"][role]["relative_to_max"].as_f64().unwrap();
        assert!(reported < 0.05, "{what}: onnxruntime's figure {reported}");
    }
}

/// The largest difference between two encoders' soft tokens, over the largest value of `expected`.
fn relative_difference(soft: &SoftTokens, expected: &SoftTokens) -> f64 {
    assert_eq!((soft.count(), soft.hidden), (expected.count(), expected.hidden));
    let diff = soft.rows.iter().zip(&expected.rows).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, f64::max);
    diff / expected.rows.iter().map(|v| f64::from(v.abs())).fold(0.0, f64::max)
}

#[test]
fn a_directory_that_is_not_a_checkpoint_gets_a_clear_error() {
    let Some(python) = prepared_path("OUTPOST_PYTHON") else { return };
    let work = tempfile::tempdir().unwrap();
    // A bundle directory is not a checkpoint: it has no config.json.
    let output = run_prepare(&python, &fixtures().join("gemma4-tiny"), &work.path().join("bundle"), &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("gemma4-tiny: no config.json: give the directory of a Hugging Face Gemma 4 checkpoint"),
        "{stderr}"
    );
    assert!(!work.path().join("bundle").exists(), "nothing is written for a bad checkpoint");
}
