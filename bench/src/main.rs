//! `outpost-bench BUNDLE GGUF`: `outpostd bench` on an Outpost bundle and the same measurements
//! by llama.cpp on a GGUF of the same model, one after the other in one run, with our figure over
//! llama.cpp's for each. Both sides get the same token ids (the bundle tokenizer's) and the same
//! thread count; llama.cpp runs in a child process, so that each side's peak memory is its own.

mod llama_cpp;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::Parser;
use llama_cpp::LlamaCppReport;
use outpost::bench::{BenchOptions, BenchReport, BenchSettings, PROMPT_PARAGRAPH};
use outpost::model::{Manifest, Tokenizer};
use serde::Serialize;

#[derive(Parser)]
#[command(version, about = "outpostd's model runtime and llama.cpp side by side on the same model")]
struct Cli {
    /// The Outpost model bundle (a directory with manifest.json).
    bundle: PathBuf,
    /// The GGUF file llama.cpp runs: the same model, as llama.cpp loads it.
    gguf: PathBuf,
    /// Threads for both sides (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    settings: BenchSettings,
    /// Run only llama.cpp's side with these prompt ids and print its figures as JSON (what the
    /// parent process starts).
    #[arg(long, hide = true, value_delimiter = ',')]
    llama_cpp_side: Option<Vec<u32>>,
}

impl Cli {
    fn options(&self) -> BenchOptions {
        let threads = self.threads.unwrap_or(BenchOptions::default().threads);
        self.settings.options(threads)
    }
}

/// Our median over llama.cpp's: above 1, we are faster.
#[derive(Debug, Serialize)]
struct Ratios {
    prefill: Vec<(usize, f64)>,
    decode: f64,
    load: f64,
}

#[derive(Debug, Serialize)]
struct SideBySide {
    ours: BenchReport,
    llama_cpp: LlamaCppReport,
    ours_over_llama_cpp: Ratios,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let options = cli.options();
    if let Some(ids) = &cli.llama_cpp_side {
        let report = llama_cpp::run(&cli.gguf, &options, ids)?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    check_gguf(&cli.gguf)?;
    let paragraph = paragraph_ids(&cli.bundle)?;
    let ours =
        outpost::bench::run(&cli.bundle, &options).with_context(|| format!("benchmarking {}", cli.bundle.display()))?;
    let llama_cpp = llama_cpp_in_child(&cli, &options, &paragraph)?;
    let ratios = ratios(&ours, &llama_cpp);
    let side_by_side = SideBySide { ours, llama_cpp, ours_over_llama_cpp: ratios };
    let mut stdout = std::io::stdout().lock();
    match cli.settings.json {
        true => writeln!(stdout, "{}", serde_json::to_string_pretty(&side_by_side)?)?,
        false => print_table(&mut stdout, &side_by_side)?,
    }
    Ok(())
}

/// Fails before any measurement if `gguf` cannot be llama.cpp's model file.
fn check_gguf(gguf: &Path) -> anyhow::Result<()> {
    let mut magic = [0u8; 4];
    std::fs::File::open(gguf)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic))
        .with_context(|| format!("cannot read the GGUF file {}", gguf.display()))?;
    if &magic != b"GGUF" {
        bail!("{} is not a GGUF file (it does not start with \"GGUF\")", gguf.display());
    }
    Ok(())
}

/// The bundle tokenizer's ids of the paragraph every prompt is made of.
fn paragraph_ids(bundle: &Path) -> anyhow::Result<Vec<u32>> {
    let (manifest, _) = Manifest::read(bundle).with_context(|| format!("reading {}", bundle.display()))?;
    let file = manifest.files.get("tokenizer").context("the bundle's manifest lists no tokenizer")?;
    let tokenizer = Tokenizer::load(&bundle.join(&file.path))?;
    Ok(tokenizer.encode(PROMPT_PARAGRAPH)?)
}

fn llama_cpp_in_child(cli: &Cli, options: &BenchOptions, paragraph: &[u32]) -> anyhow::Result<LlamaCppReport> {
    let ids: Vec<String> = paragraph.iter().map(u32::to_string).collect();
    let prefill: Vec<String> = options.prefill_tokens.iter().map(usize::to_string).collect();
    let output = Command::new(std::env::current_exe().context("finding this program")?)
        .arg(&cli.bundle)
        .arg(&cli.gguf)
        .args(["--threads", &options.threads.to_string(), "--runs", &options.runs.to_string()])
        .args(["--prefill", &prefill.join(","), "--decode", &options.decode_tokens.to_string()])
        .args(["--decode-after", &options.decode_after.to_string()])
        .args(["--llama-cpp-side", &ids.join(",")])
        .output()
        .context("starting the llama.cpp side")?;
    if !output.status.success() {
        bail!("the llama.cpp side failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    serde_json::from_slice(&output.stdout).context("reading the llama.cpp side's figures")
}

fn ratios(ours: &BenchReport, theirs: &LlamaCppReport) -> Ratios {
    let prefill = ours
        .prefill
        .iter()
        .zip(&theirs.prefill)
        .map(|(a, b)| (a.tokens, a.tokens_per_sec.median / b.tokens_per_sec.median))
        .collect();
    Ratios {
        prefill,
        decode: ours.decode_tokens_per_sec.median / theirs.decode_tokens_per_sec.median,
        // Times, not rates: llama.cpp's over ours, so that above 1 is still ours faster.
        load: theirs.load_secs / ours.load_secs,
    }
}

fn print_table(out: &mut impl Write, report: &SideBySide) -> std::io::Result<()> {
    let (ours, theirs, ratios) = (&report.ours, &report.llama_cpp, &report.ours_over_llama_cpp);
    writeln!(out, "{ours}")?;
    writeln!(out)?;
    writeln!(
        out,
        "llama.cpp: {} ({:.0} MB, {:.0}M parameters), {} threads, {} runs",
        theirs.gguf,
        theirs.file_bytes as f64 / 1e6,
        theirs.parameters as f64 / 1e6,
        ours.threads,
        ours.runs
    )?;
    writeln!(
        out,
        "load {:.2} s, peak RSS {}{}",
        theirs.load_secs,
        theirs.peak_rss_mb.map_or("?".into(), |mb| format!("{mb:.0} MB")),
        match theirs.same_prompt_ids {
            true => String::new(),
            false => "; its tokenizer splits the prompt differently: both were given the bundle's ids".into(),
        }
    )?;
    writeln!(out, "{:<34} {:>9} {:>9} {:>9} {:>12}", "", "min", "median", "max", "ours/theirs")?;
    for (figures, (_, ratio)) in theirs.prefill.iter().zip(&ratios.prefill) {
        let name = format!("prefill {} tokens (tokens/s)", figures.tokens);
        writeln!(out, "{name:<34} {} {:>11.2}x", figures.tokens_per_sec, ratio)?;
    }
    let name = format!("decode {} tokens after {} (tokens/s)", theirs.decode_tokens, theirs.decode_after);
    writeln!(out, "{name:<34} {} {:>11.2}x", theirs.decode_tokens_per_sec, ratios.decode)?;
    writeln!(out, "load: ours {:.2}x as fast", ratios.load)
}
