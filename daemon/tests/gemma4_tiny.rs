//! The tiny random-weight Gemma 4 bundle through tract, against PyTorch's outputs saved by
//! `deploy/models/make_tiny_gemma4.py`.

#[path = "common/binary.rs"]
mod binary;
#[path = "common/npy.rs"]
mod npy;
#[path = "common/tiny_reference.rs"]
mod tiny_reference;

use std::path::{Path, PathBuf};

use outpost::model::{values, Bundle, Encoders, LogitRows, Runtime, Sampler, Sampling};
use serde_json::Value;
use tiny_reference::{reference, reference_audio_features, reference_image, reference_json};

const TOLERANCE: f64 = 1e-4;

fn bundle_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny")
}

fn runtime() -> Runtime {
    Runtime::load(&Bundle::open(&bundle_dir()).unwrap()).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs())).fold(0.0, f64::max)
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

#[test]
fn prefill_logits_match_pytorch() {
    let runtime = runtime();
    let prompt = ids(&reference_json()["greedy"]["text"]["prompt_ids"]);
    let embedded = runtime.embed(&prompt).unwrap();
    let expected_embeds = reference("text_prefill_inputs_embeds.npy");
    assert_eq!(embedded.embeds.shape(), expected_embeds.shape.as_slice());
    assert!(max_abs_diff(values::<f32>(&embedded.embeds).unwrap(), &expected_embeds.f32()) <= TOLERANCE);
    let expected_per_layer = reference("text_prefill_per_layer_inputs.npy");
    let per_layer = embedded.per_layer.as_ref().expect("Gemma 4 has per-layer inputs");
    assert!(max_abs_diff(values::<f32>(per_layer).unwrap(), &expected_per_layer.f32()) <= TOLERANCE);

    let mut cache = runtime.empty_cache().unwrap();
    let logits = runtime.decode(embedded, &mut cache, LogitRows::All).unwrap();
    let expected = reference("text_prefill_logits.npy");
    assert_eq!(logits.shape(), expected.shape.as_slice());
    let diff = max_abs_diff(values::<f32>(&logits).unwrap(), &expected.f32());
    println!("prefill logits: max abs diff {diff:e}");
    assert!(diff <= TOLERANCE, "prefill logits differ by {diff}");
    assert_eq!(cache.positions(), prompt.len());
    assert!(cache.grows_in_place(), "the next step would copy the cache");
}

#[test]
fn image_and_audio_encoders_match_pytorch_kept_in_memory_or_loaded_on_demand() {
    let expected = reference("image_embeds.npy");
    let expected_mask = reference("image_mask.npy").bools();
    let hidden = *expected.shape.last().unwrap();
    let expected_image: Vec<f32> = expected
        .f32()
        .chunks(hidden)
        .zip(&expected_mask)
        .filter(|(_, &valid)| valid)
        .flat_map(|(row, _)| row.to_vec())
        .collect();
    let expected_audio = reference("audio_embeds.npy").f32();
    let bundle = Bundle::open(&bundle_dir()).unwrap();
    for encoders in [Encoders::Resident, Encoders::OnDemand] {
        let runtime = Runtime::load_with(&bundle, encoders).unwrap();
        // Twice: the second run reuses the kept plan, or loads the encoder again.
        for run in 1..=2 {
            let image = runtime.encode_image(&reference_image()).unwrap();
            let diff = max_abs_diff(&image.rows, &expected_image);
            println!("{encoders:?}, run {run}, vision: {} soft tokens, max abs diff {diff:e}", image.count());
            assert!(diff <= TOLERANCE);

            let audio = runtime.encode_audio(&reference_audio_features()).unwrap();
            let diff = max_abs_diff(&audio.rows, &expected_audio[..audio.rows.len()]);
            println!("{encoders:?}, run {run}, audio: {} soft tokens, max abs diff {diff:e}", audio.count());
            assert_eq!(audio.count(), reference_json()["inputs"]["audio"]["soft_tokens"].as_u64().unwrap() as usize);
            assert!(diff <= TOLERANCE);
        }
    }
}

#[test]
fn greedy_generation_matches_pytorch_for_text_image_and_audio_prompts() {
    let runtime = runtime();
    let reference_json = reference_json();
    for prompt_kind in ["text", "image", "audio"] {
        let case = &reference_json["greedy"][prompt_kind];
        let prompt = ids(&case["prompt_ids"]);
        let expected_ids = ids(&case["hf_ids"]);
        let image = (prompt_kind == "image").then(|| runtime.encode_image(&reference_image()).unwrap());
        let audio = (prompt_kind == "audio").then(|| runtime.encode_audio(&reference_audio_features()).unwrap());
        let expected_logits = reference(&format!("greedy_{prompt_kind}_logits.npy")).f32();
        let vocab = expected_logits.len() / expected_ids.len();
        let mut step = 0;
        let mut worst: f64 = 0.0;
        let mut sampler = Sampler::new(Sampling::Greedy);
        // The references ignore end-of-turn to produce all 32 tokens: no stop ids here.
        let got = runtime
            .generate(
                &prompt,
                image.as_ref(),
                audio.as_ref(),
                expected_ids.len(),
                &mut sampler,
                &[],
                |_| {},
                |logits| {
                    worst = worst.max(max_abs_diff(logits, &expected_logits[step * vocab..(step + 1) * vocab]));
                    step += 1;
                },
            )
            .unwrap();
        println!("{prompt_kind}: {} tokens, logits max abs diff {worst:e}", got.len());
        assert_eq!(got, expected_ids, "{prompt_kind} prompt");
        assert!(worst <= TOLERANCE, "{prompt_kind}: logits differ by {worst}");
    }
}

#[test]
fn context_cap_is_a_clear_error() {
    let runtime = runtime();
    let err = runtime
        .generate(&[2; 10], None, None, 1_000_000, &mut Sampler::new(Sampling::Greedy), &[], |_| {}, |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.starts_with("prompt of 10 tokens plus 1000000 new ones exceeds the context of"), "{err}");
}

#[test]
fn tokenizer_gives_the_reference_prompt_ids() {
    use outpost::model::{render_chat, Architecture, Role, Tokenizer, Turn};
    let tokenizer = Tokenizer::load(&bundle_dir().join("tokenizer.json")).unwrap();
    let case = &reference_json()["greedy"]["text"];
    let expected = ids(&case["prompt_ids"]);
    // The reference prompt decodes to a user turn; rendering that turn again gives the same ids.
    let user_text = tokenizer.decode(&expected[6..expected.len() - 8]);
    let prompt = render_chat(Architecture::Gemma4, &[Turn::text(Role::User, user_text.clone())], true);
    assert_eq!(tokenizer.encode(&prompt).unwrap(), expected, "prompt {prompt:?}");
    assert_eq!(tokenizer.token_id("<bos>").unwrap(), 2);
}

#[test]
fn model_run_streams_pytorchs_greedy_answer() {
    let case = &reference_json()["greedy"]["text"];
    // The bundle named on the command line, or by a station config's [model] table.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("station.toml");
    let model_table = format!("[model]\nbundle = {:?}\nthreads = 1\n", bundle_dir().display().to_string());
    std::fs::write(&config, format!("[microphone]\nsource = \"wav\"\npath = \"builtin:speech.wav\"\n{model_table}"))
        .unwrap();
    for choice in [["--threads", "1"], ["--config", config.to_str().unwrap()]] {
        let mut command = binary::outpostd();
        command.args(["model", "run"]);
        if choice[0] == "--threads" {
            command.arg(bundle_dir());
        }
        let output = command
            .args(choice)
            .args(["--prompt", "Hello sentinel, is anyone at the front door?", "--max-tokens", "32"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert_eq!(stdout.trim_end_matches('\n'), case["text"].as_str().unwrap());
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains("(1 threads)") && stderr.contains("27 prompt tokens, 32 generated"), "{stderr}");
    }
}

#[test]
fn model_run_without_a_bundle_says_what_it_needs() {
    let output = binary::outpostd().args(["model", "run", "--prompt", "Hello"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("<BUNDLE>"), "{stderr}");
}
