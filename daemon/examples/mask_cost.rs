//! What constrained decoding costs per token: llguidance's mask, our -inf fill of the logits,
//! and advancing the parser, over real constrained generations of a `SceneObservation`.
//!
//! ```text
//! cargo run --release --example mask_cost -- BUNDLE_DIR [RUNS] [MAX_TOKENS]
//! ```
//!
//! With the Gemma 3 270M bundle this measures the 262144-token vocabulary; with
//! `daemon/tests/fixtures/gemma4-tiny` the 512-token one. Runs sample at temperature 1 with seeds
//! 0, 1, ..., so they walk different paths through the schema. Prints figures; asserts nothing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use outpost::model::{Model, Question, Sampling};
use outpost::report::SceneObservation;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: mask_cost BUNDLE_DIR [RUNS] [MAX_TOKENS]")?);
    let runs: u64 = args.next().map_or(Ok(3), |n| n.parse())?;
    let max_tokens: usize = args.next().map_or(Ok(400), |n| n.parse())?;

    let start = Instant::now();
    let model = Model::load(&dir)?;
    println!("{}: loaded in {:.2?}", model.bundle.manifest.name, start.elapsed());
    let constraints = model.token_constraints()?;
    println!(
        "vocabulary {} tokens: tokenizer.json read and llguidance's parser factory built in {:.2?}",
        constraints.vocab_size(),
        constraints.build_time
    );

    let (mut mask, mut apply, mut consume, mut lookup, mut compile) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut tokens, mut forced, mut model_time) = (0, 0, Duration::ZERO);
    for seed in 0..runs {
        let question = Question {
            prompt: "Scene: a white van stops at the north gate at night; two people carry boxes to the door.".into(),
            image: None,
            audio: None,
            max_tokens,
            sampling: Sampling::Random { temperature: 1.0, top_k: None, top_p: None, seed },
            system: Some(SceneObservation::instructions()),
            tools: None,
            constraint: Some(SceneObservation::grammar()),
            history: Vec::new(),
        };
        let answer = match model.answer(&question, |_| {}) {
            Ok(answer) => answer,
            Err(e) => {
                println!("run {seed}: {e}");
                continue;
            }
        };
        let timings = answer.constraint_timings.ok_or("a constrained answer has timings")?;
        println!("run {seed}: {} tokens ({} forced): {}", answer.token_ids.len(), timings.forced_tokens, answer.text);
        tokens += answer.token_ids.len();
        forced += timings.forced_tokens;
        model_time += answer.total_time.saturating_sub(answer.first_token_time);
        compile.push(timings.compile);
        mask.extend(timings.mask);
        apply.extend(timings.apply);
        consume.extend(timings.consume);
        lookup.extend(timings.forced_lookup);
    }
    println!("\nper token, over {tokens} generated tokens ({forced} forced) in {runs} runs:");
    for (what, samples) in [
        ("grammar compile (per request)", &mut compile),
        ("compute_mask", &mut mask),
        ("apply mask (-inf fill)", &mut apply),
        ("consume_token", &mut consume),
        ("compute_ff_tokens", &mut lookup),
    ] {
        print_stats(what, samples);
    }
    if tokens > 1 {
        println!(
            "whole generation after the first token (model, sampling and constraint): {:.1} ms/token",
            model_time.as_secs_f64() * 1e3 / (tokens - 1) as f64
        );
    }
    Ok(())
}

fn print_stats(what: &str, samples: &mut [Duration]) {
    if samples.is_empty() {
        println!("  {what:<30} no samples");
        return;
    }
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = samples.iter().map(|&d| us(d)).sum::<f64>() / samples.len() as f64;
    let at = |q: f64| us(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    println!(
        "  {what:<30} n={:<5} mean {mean:>8.1} µs  p50 {:>8.1} µs  p99 {:>8.1} µs  max {:>8.1} µs",
        samples.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}
