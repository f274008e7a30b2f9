//! The same measurements as `outpostd bench`, made with llama.cpp on a GGUF file: load, peak
//! resident memory, prefill at the same lengths and greedy decoding after the same prompt.

use std::num::NonZeroU32;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use outpost::bench::{peak_rss_mb, repeat_to, BenchOptions, PrefillFigures, Spread, PROMPT_PARAGRAPH};
use outpost::model::argmax;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaCppReport {
    pub gguf: String,
    pub file_bytes: u64,
    pub parameters: u64,
    pub load_secs: f64,
    /// Peak resident memory of the process that ran llama.cpp alone.
    pub peak_rss_mb: Option<f64>,
    pub prefill: Vec<PrefillFigures>,
    pub decode_tokens: usize,
    pub decode_after: usize,
    pub decode_tokens_per_sec: Spread,
    /// llama.cpp's tokenizer gives the prompt paragraph the same ids as the bundle's.
    pub same_prompt_ids: bool,
}

/// Loads `gguf` with llama.cpp (CPU, `options.threads` threads) and measures it like
/// `outpost::bench::run` does; `our_paragraph` is the bundle tokenizer's ids of
/// [`PROMPT_PARAGRAPH`], fed to both so that both runs see the same tokens.
pub fn run(gguf: &Path, options: &BenchOptions, our_paragraph: &[u32]) -> anyhow::Result<LlamaCppReport> {
    let mut backend = LlamaBackend::init().context("starting llama.cpp")?;
    backend.void_logs();
    let loading = Instant::now();
    let model = LlamaModel::load_from_file(&backend, gguf, &LlamaModelParams::default())
        .with_context(|| format!("llama.cpp cannot load {}", gguf.display()))?;
    let load_secs = loading.elapsed().as_secs_f64();

    let theirs = model.vocab().tokenize(PROMPT_PARAGRAPH.as_bytes(), false, false);
    let same_prompt_ids = theirs.iter().map(|t| t.0 as i64).eq(our_paragraph.iter().map(|&id| i64::from(id)));
    let longest = options.prefill_tokens.iter().copied().max().unwrap_or(0).max(options.decode_after);
    let text: Vec<LlamaToken> = repeat_to(our_paragraph, longest).into_iter().map(|id| LlamaToken(id as i32)).collect();

    let positions = longest.max(options.decode_after + options.decode_tokens);
    let threads = i32::try_from(options.threads).context("thread count")?;
    // One batch takes the longest prompt whole, as one call of our decoder does.
    let batch_size = u32::try_from(longest).context("prompt length")?.max(512);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(u32::try_from(positions).context("context length")?))
        .with_n_batch(batch_size)
        .with_n_ubatch(batch_size)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut context = model.new_context(&backend, params).context("llama.cpp cannot make a context")?;

    let mut prefill = Vec::new();
    for &tokens in &options.prefill_tokens {
        let rates = Spread::measure::<anyhow::Error>(options.runs, || {
            context.clear_kv_cache();
            let mut batch = prompt_batch(&text[..tokens])?;
            let started = Instant::now();
            context.decode(&mut batch).context("llama.cpp prefill")?;
            Ok(tokens as f64 / started.elapsed().as_secs_f64())
        })?;
        prefill.push(PrefillFigures { tokens, tokens_per_sec: rates });
    }

    let decode_tokens_per_sec = Spread::measure::<anyhow::Error>(options.runs, || {
        context.clear_kv_cache();
        let mut batch = prompt_batch(&text[..options.decode_after])?;
        context.decode(&mut batch).context("llama.cpp prefill")?;
        let started = Instant::now();
        for position in options.decode_after..options.decode_after + options.decode_tokens {
            // Greedy over the whole vocabulary, as ours: every step costs the same.
            let next = LlamaToken(argmax(last_logits(&context, &batch)) as i32);
            batch.clear();
            batch.add(next, position as i32, &[0], true)?;
            context.decode(&mut batch).context("llama.cpp decode step")?;
        }
        Ok(options.decode_tokens as f64 / started.elapsed().as_secs_f64())
    })?;

    Ok(LlamaCppReport {
        gguf: gguf.display().to_string(),
        file_bytes: std::fs::metadata(gguf).map_or(0, |m| m.len()),
        parameters: model.n_params(),
        load_secs,
        peak_rss_mb: peak_rss_mb(),
        prefill,
        decode_tokens: options.decode_tokens,
        decode_after: options.decode_after,
        decode_tokens_per_sec,
        same_prompt_ids,
    })
}

/// `tokens` from position 0, logits only for the last.
fn prompt_batch(tokens: &[LlamaToken]) -> anyhow::Result<LlamaBatch<'static>> {
    let mut batch = LlamaBatch::new(tokens.len(), 1);
    for (position, &token) in tokens.iter().enumerate() {
        batch.add(token, position as i32, &[0], position + 1 == tokens.len())?;
    }
    Ok(batch)
}

fn last_logits<'a>(context: &'a LlamaContext<'_>, batch: &LlamaBatch<'_>) -> &'a [f32] {
    context.get_logits_ith(batch.n_tokens() - 1)
}
