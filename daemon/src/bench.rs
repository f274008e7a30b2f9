//! `outpostd bench`: how fast the model runs on this machine, and how close that is to what its
//! memory allows. Load time, peak resident memory, prefill and decode rates, a scene request's
//! time to first token and the encoders' times, each over repeated runs (min, median, max), with
//! the thread count. Beside them the physical limit: decoding reads every decoder weight once
//! per token, so the machine's memory read bandwidth over the weights' bytes caps tokens/s. Last,
//! the whole station: the sample clip through the motion gate and the model to a broker in this
//! process, timed from the gate firing to the broker's acknowledgement of the report.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::capture::{read_wav, split_jpeg_frames};
use crate::media::{MediaRef, PEOPLE_MJPEG, SPEECH_WAV};
use crate::model::{argmax, last_row, Encoders, LogitRows, Model, ModelError, Question, RuntimeError, Sampling};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("the built-in sample media cannot be read: {0}")]
    Media(String),
    #[error("{what} needs {needed} positions, but the model's context holds {max}")]
    Context { what: String, needed: usize, max: usize },
    #[error("the station run for the gate-to-report figure failed: {0}")]
    Station(String),
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Runs of each measurement; the figures are their min, median and max.
    pub runs: usize,
    pub threads: usize,
    /// Prompt lengths whose prefill is timed.
    pub prefill_tokens: Vec<usize>,
    /// Tokens decoded one by one after a prompt of `decode_after` tokens.
    pub decode_tokens: usize,
    pub decode_after: usize,
    /// Bytes the memory-bandwidth probe reads, more than the caches hold.
    pub probe_bytes: usize,
    /// Also run the whole station for the gate-to-report latency.
    pub station: bool,
    pub encoders: Encoders,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            runs: 3,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prefill_tokens: vec![128, 512],
            decode_tokens: 128,
            decode_after: DECODE_PROMPT_TOKENS,
            probe_bytes: 256 << 20,
            station: true,
            encoders: Encoders::Resident,
        }
    }
}

/// What to measure, as `outpostd bench` and `outpost-bench` (bench/) take it on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchSettings {
    /// Runs of each measurement: the table gives their min, median and max.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Prompt lengths whose prefill is timed.
    #[arg(long, value_delimiter = ',', default_values_t = [128, 512])]
    pub prefill: Vec<usize>,
    /// Tokens decoded after a short prompt.
    #[arg(long, default_value_t = 128)]
    pub decode: usize,
    /// The prompt's length before the decoded tokens: a scene request's (an image's 280 soft
    /// tokens and its text) is some 400, where attention reads more of the cache each step.
    #[arg(long, default_value_t = DECODE_PROMPT_TOKENS)]
    pub decode_after: usize,
    /// Print the figures as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Measure the model alone: skip the whole-station run (the gate-to-report latency), for
    /// quicker runs and for profiling.
    #[arg(long)]
    pub model_only: bool,
    /// Keep the image and audio encoders in memory (`resident`) or load them for each request
    /// (`on_demand`); by default as the --config file's `[model] encoders` says, else resident.
    #[arg(long)]
    pub encoders: Option<Encoders>,
}

impl BenchSettings {
    pub fn options(&self, threads: usize) -> BenchOptions {
        BenchOptions {
            runs: self.runs,
            threads,
            prefill_tokens: self.prefill.clone(),
            decode_tokens: self.decode,
            decode_after: self.decode_after,
            station: !self.model_only,
            encoders: self.encoders.unwrap_or_default(),
            ..BenchOptions::default()
        }
    }
}

/// The minimum, median and maximum of repeated runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `samples` (NaN for none).
    pub fn of(mut samples: Vec<f64>) -> Spread {
        samples.sort_by(f64::total_cmp);
        let median = match samples.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => samples[n / 2],
            n => (samples[n / 2 - 1] + samples[n / 2]) / 2.0,
        };
        Spread {
            min: samples.first().copied().unwrap_or(f64::NAN),
            median,
            max: samples.last().copied().unwrap_or(f64::NAN),
        }
    }

    /// Runs `measure` `runs` times (at least once) and gives the spread of what it measured.
    pub fn measure<E>(runs: usize, mut measure: impl FnMut() -> Result<f64, E>) -> Result<Spread, E> {
        let samples = (0..runs.max(1)).map(|_| measure()).collect::<Result<Vec<_>, _>>()?;
        Ok(Spread::of(samples))
    }
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>9.1} {:>9.1} {:>9.1}", self.min, self.median, self.max)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrefillFigures {
    pub tokens: usize,
    pub tokens_per_sec: Spread,
}

/// What decoding could reach if it did nothing but read the weights.
#[derive(Debug, Clone, Serialize)]
pub struct PhysicalLimit {
    /// The decoder graph's and output layer's bytes on disk: every weight is read once per
    /// decoded token.
    pub weight_bytes_per_token: u64,
    /// Measured here, every core reading one large buffer: the best of three passes after each
    /// decode run and one at the end. A shared machine's bandwidth comes and goes; the best
    /// reading is the ceiling.
    pub read_bandwidth_gb_per_sec: f64,
    pub ceiling_tokens_per_sec: f64,
    /// Median decode rate over the ceiling.
    pub fraction_reached: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub bundle: String,
    pub machine: String,
    /// The kernel our block-quantized products (Q8_0, Q4_0 weights) run on this CPU.
    pub product_kernel: String,
    pub threads: usize,
    pub runs: usize,
    pub encoders: Encoders,
    pub load_secs: f64,
    /// Resident memory once the model is loaded, before it runs.
    pub loaded_rss_mb: Option<f64>,
    /// Peak resident memory while the model alone was measured.
    pub peak_rss_mb: Option<f64>,
    /// Peak resident memory during the scene requests (a picture and a short prompt), where the
    /// bundle sees and Linux lets the peak be restarted.
    pub scene_peak_rss_mb: Option<f64>,
    /// Peak resident memory once the whole station had run too (its model loaded anew), if it ran.
    pub station_peak_rss_mb: Option<f64>,
    pub prefill: Vec<PrefillFigures>,
    pub decode_tokens: usize,
    /// The prompt's length before them.
    pub decode_after: usize,
    pub decode_tokens_per_sec: Spread,
    /// One sample picture at the default budget and a short prompt, to the first token.
    pub scene_first_token_ms: Option<Spread>,
    pub image_encoder_ms: Option<Spread>,
    pub audio_encoder_ms: Option<Spread>,
    /// From the motion gate firing on the sample clip to the broker acknowledging the report,
    /// through the whole station (capture, gate, model, outbox, MQTT); one report per run.
    /// `None` with `--model-only`, or when the station run failed.
    pub gate_to_report_ms: Option<Spread>,
    /// Why the station run gave no figure (a random-weight model may never finish a report,
    /// for one): the model's figures above stand all the same.
    pub station_failure: Option<String>,
    pub limit: PhysicalLimit,
}

/// Loads `bundle` and measures it.
pub fn run(bundle: &Path, options: &BenchOptions) -> Result<BenchReport, BenchError> {
    crate::model::use_threads(options.threads);
    let loading = Instant::now();
    let model = Model::load_with(bundle, options.encoders)?;
    let load_secs = loading.elapsed().as_secs_f64();
    let loaded_rss_mb = resident_mb();
    let runtime = model.runtime();
    let longest = options.prefill_tokens.iter().copied().max().unwrap_or(0);
    let text = prompt_ids(&model, longest.max(options.decode_after))?;
    let (decode_tokens, decode_after) = (options.decode_tokens, options.decode_after);
    // Every length is checked before anything is measured.
    for &tokens in &options.prefill_tokens {
        check_context(&model, "prefill", tokens)?;
    }
    check_context(
        &model,
        &format!("decoding {decode_tokens} tokens after a {decode_after}-token prompt"),
        decode_after + decode_tokens,
    )?;

    let mut prefill = Vec::new();
    for &tokens in &options.prefill_tokens {
        let rates = Spread::measure::<BenchError>(options.runs, || {
            let mut cache = runtime.empty_cache()?;
            let started = Instant::now();
            runtime.decode(runtime.embed(&text[..tokens])?, &mut cache, LogitRows::Last)?;
            Ok(tokens as f64 / started.elapsed().as_secs_f64())
        })?;
        prefill.push(PrefillFigures { tokens, tokens_per_sec: rates });
    }

    // The machine's limit, whatever the thread count under test: every core reads.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut probes = BandwidthProbes::new(options.probe_bytes, cores);
    let decode_rates = Spread::measure::<BenchError>(options.runs, || {
        let mut cache = runtime.empty_cache()?;
        let mut logits = runtime.decode(runtime.embed(&text[..decode_after])?, &mut cache, LogitRows::Last)?;
        let started = Instant::now();
        for _ in 0..decode_tokens {
            // Greedy, and never stopped by an end-of-turn token: every step costs the same.
            let next = argmax(last_row(&logits)?);
            logits = runtime.decode(runtime.embed(&[next])?, &mut cache, LogitRows::Last)?;
        }
        let rate = decode_tokens as f64 / started.elapsed().as_secs_f64();
        // Right after the run, in the conditions it met.
        probes.probe();
        Ok(rate)
    })?;

    let sees = model.bundle.file("vision").is_some();
    let hears = model.bundle.file("audio").is_some();
    let (mut scene, mut image_encoder, mut scene_peak_rss_mb) = (None, None, None);
    let mut earlier_peak_rss_mb = None;
    if sees {
        earlier_peak_rss_mb = max_mb(probes.peak_before_mb, peak_rss_mb());
        let restarted = restart_peak_rss();
        let picture = sample_picture()?;
        let mut encoder = Vec::new();
        let first_token = Spread::measure::<BenchError>(options.runs, || {
            let question = one_token_question("What is happening in this picture?", Some(picture.clone()), None);
            let answer = model.answer(&question, |_| {})?;
            encoder.push(millis(answer.encode_time));
            Ok(millis(answer.first_token_time))
        })?;
        scene = Some(first_token);
        image_encoder = Some(Spread::of(encoder));
        scene_peak_rss_mb = restarted.then(peak_rss_mb).flatten();
    }
    let audio_encoder = match hears {
        true => {
            let speech = sample_speech()?;
            Some(Spread::measure::<BenchError>(options.runs, || {
                let answer = model.answer(&one_token_question("What was said?", None, Some(speech.clone())), |_| {})?;
                Ok(millis(answer.encode_time))
            })?)
        }
        false => None,
    };

    // The decoder graph and the output layer outside it, if any (the embedding tables are read
    // by row).
    let weight_bytes_per_token: u64 = model
        .bundle
        .manifest
        .files
        .iter()
        .filter(|(role, _)| role.starts_with("decoder") || *role == "output_layer")
        .map(|(_, f)| f.bytes)
        .sum();
    let model_peak_rss_mb = max_mb(max_mb(probes.peak_before_mb, earlier_peak_rss_mb), peak_rss_mb());
    probes.probe();
    let read_bandwidth_gb_per_sec = probes.best_gb_per_sec;
    let ceiling_tokens_per_sec = read_bandwidth_gb_per_sec * 1e9 / weight_bytes_per_token.max(1) as f64;
    let bundle_name = model.bundle.manifest.name.clone();
    // The station loads the model itself: one copy in memory at a time.
    drop(model);
    let (gate_to_report_ms, station_failure) = match options.station.then(|| gate_to_report(bundle, options)) {
        None => (None, None),
        Some(Ok(latency)) => (Some(latency), None),
        Some(Err(e)) => (None, Some(e.to_string())),
    };
    Ok(BenchReport {
        bundle: bundle_name,
        machine: machine(),
        product_kernel: crate::model::block_kernel().into(),
        threads: options.threads,
        runs: options.runs,
        encoders: options.encoders,
        load_secs,
        loaded_rss_mb,
        peak_rss_mb: model_peak_rss_mb,
        scene_peak_rss_mb,
        station_peak_rss_mb: options.station.then(peak_rss_mb).flatten(),
        prefill,
        decode_tokens,
        decode_after,
        decode_tokens_per_sec: decode_rates,
        scene_first_token_ms: scene,
        image_encoder_ms: image_encoder,
        audio_encoder_ms: audio_encoder,
        gate_to_report_ms,
        station_failure,
        limit: PhysicalLimit {
            weight_bytes_per_token,
            read_bandwidth_gb_per_sec,
            ceiling_tokens_per_sec,
            fraction_reached: decode_rates.median / ceiling_tokens_per_sec,
        },
    })
}

/// The sample clip played once through a station that reports on motion, publishing to a broker
/// in this process, `options.runs` times; each run's report timed from its gate firing to the
/// broker's acknowledgement.
fn gate_to_report(bundle: &Path, options: &BenchOptions) -> Result<Spread, BenchError> {
    let station = |e: &dyn fmt::Display| BenchError::Station(e.to_string());
    let broker = crate::broker::start_embedded().map_err(|e| station(&e))?;
    let bundle = bundle.canonicalize().map_err(|e| station(&format!("{}: {e}", bundle.display())))?;
    let outbox = std::env::temp_dir().join(format!("outpost-bench-{}", std::process::id()));
    let text = station_toml(&bundle, broker, &outbox, options.threads);
    let config =
        crate::config::parse(&text, Path::new("(the bench's station)"), Path::new("/")).map_err(|e| station(&e))?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| station(&e))?;
    let mut latencies = Vec::new();
    for _ in 0..options.runs.max(1) {
        let delivered =
            runtime.block_on(crate::service::run(config.clone(), crate::service::ServiceOptions::default()));
        let delivered = delivered.map_err(|e| station(&e))?;
        if delivered.report_latencies.is_empty() {
            return Err(station(&"the sample clip's motion led to no delivered report"));
        }
        latencies.extend(delivered.report_latencies.iter().map(|&latency| millis(latency)));
    }
    // Every report was acknowledged, so the outbox is empty.
    let _ = std::fs::remove_dir_all(&outbox);
    Ok(Spread::of(latencies))
}

/// A station with the camera only, playing the sample clip once, and one look per run: the first
/// motion. A random-weight model wanders to the report schema's limits, hence the token room.
fn station_toml(bundle: &Path, broker: std::net::SocketAddr, outbox: &Path, threads: usize) -> String {
    let quoted = |path: &Path| toml::Value::String(path.display().to_string());
    format!(
        "[station]\nid = \"bench\"\n\
         [mqtt]\nhost = \"{host}\"\nport = {port}\n\
         [outbox]\ndir = {outbox}\n\
         [camera]\nsource = \"mjpeg\"\npath = \"builtin:{PEOPLE_MJPEG}\"\nfps = 10\nloop = false\n\
         [model]\nbundle = {bundle}\nthreads = {threads}\n\
         [analysis]\ntriggers = [\"motion\"]\ncooldown_secs = 3600\nmax_tokens = 2048\n",
        host = broker.ip(),
        port = broker.port(),
        outbox = quoted(outbox),
        bundle = quoted(bundle),
    )
}

fn check_context(model: &Model, what: &str, needed: usize) -> Result<(), BenchError> {
    let max = model.runtime().max_context();
    match needed <= max {
        true => Ok(()),
        false => Err(BenchError::Context { what: what.into(), needed, max }),
    }
}

/// The prompt the timed decoding follows, by default.
pub const DECODE_PROMPT_TOKENS: usize = 16;

/// The text every prompt of the bench is made of, here and on the llama.cpp side (`bench/`).
pub const PROMPT_PARAGRAPH: &str = "A station on the hill watches the road and the river. When something moves, it \
    looks closely, describes what it sees, and tells the people who keep watch. ";

/// At least `tokens` ids of ordinary text: the same paragraph again and again.
fn prompt_ids(model: &Model, tokens: usize) -> Result<Vec<u32>, BenchError> {
    let paragraph = model.tokenizer().encode(PROMPT_PARAGRAPH).map_err(ModelError::from)?;
    Ok(repeat_to(&paragraph, tokens))
}

/// `paragraph` again and again, cut at `tokens` ids (zeros if it is empty).
pub fn repeat_to(paragraph: &[u32], tokens: usize) -> Vec<u32> {
    match paragraph.is_empty() {
        true => vec![0; tokens],
        false => paragraph.iter().copied().cycle().take(tokens).collect(),
    }
}

fn one_token_question(prompt: &str, image: Option<image::RgbImage>, audio: Option<Vec<f32>>) -> Question {
    Question {
        prompt: prompt.into(),
        // The budget a station's looks use by default.
        image: image.map(|picture| (picture, crate::config::AnalysisConfig::default().image_tokens)),
        audio,
        max_tokens: 1,
        sampling: Sampling::from_temperature(0.0, None, None, 0),
        system: None,
        tools: None,
        constraint: None,
        history: Vec::new(),
    }
}

/// The first frame of the built-in sample clip.
fn sample_picture() -> Result<image::RgbImage, BenchError> {
    let clip = MediaRef::parse(&format!("builtin:{PEOPLE_MJPEG}"), Path::new("")).map_err(BenchError::Media)?;
    let bytes = clip.read().map_err(|e| BenchError::Media(e.to_string()))?;
    let first = split_jpeg_frames(&bytes).map_err(BenchError::Media)?.into_iter().next();
    let first = first.ok_or_else(|| BenchError::Media(format!("{clip} holds no frame")))?;
    let picture = image::load_from_memory(&bytes[first]).map_err(|e| BenchError::Media(e.to_string()))?;
    Ok(picture.to_rgb8())
}

/// The built-in sample recording (16 kHz mono).
fn sample_speech() -> Result<Vec<f32>, BenchError> {
    let media = MediaRef::parse(&format!("builtin:{SPEECH_WAV}"), Path::new("")).map_err(BenchError::Media)?;
    read_wav(&media).map(|recording| recording.samples).map_err(|e| BenchError::Media(e.to_string()))
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The read bandwidth probed several times through a bench, and the peak resident memory before
/// the probes: their buffer (a quarter of a GB) is more than many a model's own peak, and is
/// left out of the figures where Linux lets the peak be restarted.
struct BandwidthProbes {
    bytes: usize,
    threads: usize,
    best_gb_per_sec: f64,
    peak_before_mb: Option<f64>,
}

impl BandwidthProbes {
    fn new(bytes: usize, threads: usize) -> Self {
        Self { bytes, threads, best_gb_per_sec: 0.0, peak_before_mb: None }
    }

    fn probe(&mut self) {
        self.peak_before_mb = max_mb(self.peak_before_mb, peak_rss_mb());
        self.best_gb_per_sec = self.best_gb_per_sec.max(read_bandwidth(self.bytes, self.threads));
        restart_peak_rss();
    }
}

/// The larger of two memory figures, either of which may be unknown.
fn max_mb(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// GB/s of `threads` threads summing disjoint parts of one buffer of `bytes`, best of three
/// passes: the rate a decode step's weight reads could reach at best.
pub fn read_bandwidth(bytes: usize, threads: usize) -> f64 {
    let words = vec![1u64; bytes / 8];
    let chunk = words.len().div_ceil(threads.max(1));
    let mut best = 0.0f64;
    for _ in 0..3 {
        let started = Instant::now();
        let total: u64 = std::thread::scope(|scope| {
            let parts: Vec<_> = words.chunks(chunk).map(|part| scope.spawn(move || sum_words(part))).collect();
            parts.into_iter().map(|part| part.join().unwrap_or(0)).sum()
        });
        let secs = started.elapsed().as_secs_f64();
        // The sum is used, so the reads cannot be optimised away.
        std::hint::black_box(total);
        best = best.max((words.len() * 8) as f64 / secs / 1e9);
    }
    best
}

/// Four independent sums, so that several cache-line loads are in flight at once, as in a
/// matrix kernel.
fn sum_words(words: &[u64]) -> u64 {
    let mut sums = [0u64; 4];
    let mut quads = words.chunks_exact(4);
    for quad in &mut quads {
        for (sum, &word) in sums.iter_mut().zip(quad) {
            *sum = sum.wrapping_add(word);
        }
    }
    quads.remainder().iter().chain(&sums).fold(0, |total: u64, &word| total.wrapping_add(word))
}

/// The process's peak resident memory so far (`VmHWM`), where Linux tells it.
pub fn peak_rss_mb() -> Option<f64> {
    process_status_mb("VmHWM:")
}

/// The process's resident memory now (`VmRSS`).
pub fn resident_mb() -> Option<f64> {
    process_status_mb("VmRSS:")
}

fn process_status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Starts `VmHWM` again from the resident memory now (Linux 4.0 and later), so that the next
/// peak is of what runs next; false where it cannot.
fn restart_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The CPU model and core count, for the record.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name") || l.starts_with("Model"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, name)| name.trim().to_owned())
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {cores} cores")
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} on {}, {} threads, {} runs, product kernel {}{}",
            self.bundle,
            self.machine,
            self.threads,
            self.runs,
            self.product_kernel,
            match self.encoders {
                Encoders::Resident => "",
                Encoders::OnDemand => ", encoders loaded on demand",
            }
        )?;
        let megabytes = |mb: Option<f64>| mb.map_or("?".into(), |mb| format!("{mb:.0} MB"));
        write!(
            f,
            "load {:.2} s, RSS {} once loaded, peak RSS {}",
            self.load_secs,
            megabytes(self.loaded_rss_mb),
            megabytes(self.peak_rss_mb)
        )?;
        if let Some(mb) = self.scene_peak_rss_mb {
            write!(f, ", {} during a scene request", megabytes(Some(mb)))?;
        }
        match self.station_peak_rss_mb {
            Some(mb) => writeln!(f, " (the whole station: {})", megabytes(Some(mb)))?,
            None => writeln!(f)?,
        }
        writeln!(f, "{:<34} {:>9} {:>9} {:>9}", "", "min", "median", "max")?;
        for prefill in &self.prefill {
            writeln!(f, "{:<34} {}", format!("prefill {} tokens (tokens/s)", prefill.tokens), prefill.tokens_per_sec)?;
        }
        writeln!(
            f,
            "{:<34} {}",
            format!("decode {} tokens after {} (tokens/s)", self.decode_tokens, self.decode_after),
            self.decode_tokens_per_sec
        )?;
        let rows = [
            ("scene request, first token (ms)", self.scene_first_token_ms),
            ("image encoder (ms)", self.image_encoder_ms),
            ("audio encoder (ms)", self.audio_encoder_ms),
        ];
        for (name, figures) in rows {
            match figures {
                Some(figures) => writeln!(f, "{name:<34} {figures}")?,
                None => writeln!(f, "{name:<34} (not in this bundle)")?,
            }
        }
        let station = "gate firing to report PUBACK (ms)";
        match (self.gate_to_report_ms, &self.station_failure) {
            (Some(latency), _) => writeln!(f, "{station:<34} {latency}")?,
            (None, Some(why)) => writeln!(f, "{station:<34} (no figure: {why})")?,
            (None, None) => {}
        }
        let limit = &self.limit;
        write!(
            f,
            "limit: {:.0} MB of weights per token at {:.1} GB/s read = {:.1} tokens/s; decode reaches {:.0}% of it",
            limit.weight_bytes_per_token as f64 / 1e6,
            limit.read_bandwidth_gb_per_sec,
            limit.ceiling_tokens_per_sec,
            limit.fraction_reached * 100.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bandwidth_probe_sums_every_word() {
        let words: Vec<u64> = (1..=11).collect();
        assert_eq!(sum_words(&words), 66);
    }

    #[test]
    fn spread_gives_min_median_max_of_odd_and_even_counts() {
        assert_eq!(Spread::of(vec![3.0, 1.0, 2.0]), Spread { min: 1.0, median: 2.0, max: 3.0 });
        assert_eq!(Spread::of(vec![4.0, 1.0, 2.0, 3.0]), Spread { min: 1.0, median: 2.5, max: 4.0 });
    }
}
