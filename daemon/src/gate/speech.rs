//! Speech: silero VAD marks where someone speaks, so that a later stage (the model) hears whole
//! utterances. The sound-level gate stays for loud sounds that are not speech.
//!
//! Three parts, each testable alone:
//! - [`SileroVad`] runs `silero_vad_op18_ifless.onnx` (from the silero-vad 6.2.3 wheel, fetched
//!   by `deploy/models/fetch_silero_vad.sh`) in tract, one 512-sample window (32 ms at 16 kHz)
//!   at a time, exactly as upstream's Python `OnnxWrapper` does: the last 64 samples of the
//!   previous window are put in front of each window, and the recurrent state is carried over.
//! - [`Segmenter`] turns the per-window speech probabilities into utterances with the hysteresis
//!   of upstream's `get_speech_timestamps`, streamed (see there).
//! - [`SpeechGate`] feeds it chunks of any length, keeps the audio of the utterance in progress,
//!   and hands out each finished utterance as a [`SpeechEvent`] with its samples.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tract_onnx::prelude::*;

use crate::capture::AudioChunk;
use crate::config::SpeechGateConfig;
use crate::model::values;

/// The only rate the model and the gate take.
pub const VAD_SAMPLE_RATE: u32 = 16_000;
/// Samples the model judges at a time (32 ms).
pub const VAD_WINDOW: usize = 512;
/// Samples of the previous window put in front of each window.
pub const VAD_CONTEXT: usize = 64;
const STATE_SHAPE: [usize; 3] = [2, 1, 128];

#[derive(Debug, thiserror::Error)]
pub enum VadError {
    #[error("{path}: cannot read the silero VAD model: {source} (deploy/models/fetch_silero_vad.sh fetches it)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a silero VAD model that tract can run: {source:#}")]
    Load { path: PathBuf, source: TractError },
    #[error("{path}: not a silero VAD v5/v6 model: {problem}")]
    Layout { path: PathBuf, problem: String },
    #[error("silero VAD failed on a window: {0:#}")]
    Run(TractError),
    #[error("the speech gate needs {VAD_SAMPLE_RATE} Hz audio, chunk {seq} is {rate} Hz")]
    SampleRate { seq: u64, rate: u32 },
}

/// The silero VAD model with the state of one audio stream. Cloning shares the optimised model
/// and copies the state, so one load serves many streams.
#[derive(Debug, Clone)]
pub struct SileroVad {
    plan: Arc<TypedRunnableModel>,
    path: Arc<Path>,
    /// Outputs: which is the probability `[1, 1]` (the other is the next state).
    probability_output: usize,
    state: Tensor,
    context: [f32; VAD_CONTEXT],
}

impl SileroVad {
    /// Loads and optimises the model for fixed shapes: `input` `[1, 576]` f32, `state`
    /// `[2, 1, 128]` f32, and `sr` folded in as the constant 16000 (which removes the model's
    /// one `If`, on the sample rate).
    pub fn load(path: &Path) -> Result<Self, VadError> {
        let layout = |problem: String| VadError::Layout { path: path.into(), problem };
        let load = |source: TractError| VadError::Load { path: path.into(), source };
        let mut file = std::fs::File::open(path).map_err(|source| VadError::Read { path: path.into(), source })?;
        // The declared shapes (inside the `If` branches too) name a symbolic batch that would
        // clash with the fixed batch of 1 set below: tract infers them instead.
        let mut model = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true)
            .model_for_read(&mut file)
            .map_err(load)?;

        let names: Vec<String> =
            model.input_outlets().map_err(load)?.iter().map(|outlet| model.node(outlet.node).name.clone()).collect();
        let position = |name: &str| {
            names.iter().position(|n| n == name).ok_or_else(|| {
                layout(format!(
                    "it has no `{name}` input (its inputs: {}; expected input, state, sr)",
                    names.join(", ")
                ))
            })
        };
        let (window_ix, state_ix, sr_ix) = (position("input")?, position("state")?, position("sr")?);
        if names.len() != 3 {
            return Err(layout(format!("expected the inputs input, state, sr; it has {}", names.join(", "))));
        }
        let window_len = VAD_CONTEXT + VAD_WINDOW;
        model.set_input_fact(window_ix, InferenceFact::dt_shape(f32::datum_type(), [1, window_len])).map_err(load)?;
        model.set_input_fact(state_ix, InferenceFact::dt_shape(f32::datum_type(), STATE_SHAPE)).map_err(load)?;
        model.set_input_fact(sr_ix, InferenceFact::dt_shape(i64::datum_type(), [0usize; 0])).map_err(load)?;
        let mut typed = model.into_typed().map_err(load)?;

        // `sr` becomes a constant: the graph then holds only the 16 kHz branch. The inputs are
        // then the window and the state, in that order.
        let inputs = typed.input_outlets().map_err(load)?.to_vec();
        let mut patch = TypedModelPatch::default();
        let sr = patch.add_const("sr_16000", tensor0(i64::from(VAD_SAMPLE_RATE))).map_err(load)?;
        patch.shunt_outside(&typed, inputs[sr_ix], sr).map_err(load)?;
        patch.apply(&mut typed).map_err(load)?;
        typed.set_input_outlets(&[inputs[window_ix], inputs[state_ix]]).map_err(load)?;

        let outputs = typed.output_outlets().map_err(load)?.to_vec();
        if outputs.len() != 2 {
            return Err(layout(format!("expected 2 outputs (probability, next state), it has {}", outputs.len())));
        }
        let mut probability_output = None;
        for (ix, outlet) in outputs.iter().enumerate() {
            let fact = typed.outlet_fact(*outlet).map_err(load)?;
            match fact.shape.as_concrete() {
                Some([1, 1]) => probability_output = Some(ix),
                Some(shape) if shape == STATE_SHAPE => {}
                _ => {
                    return Err(layout(format!(
                        "output {ix} has the shape {:?}, expected [1, 1] or [2, 1, 128]",
                        fact.shape
                    )))
                }
            }
        }
        let probability_output =
            probability_output.ok_or_else(|| layout("no output of shape [1, 1] (the probability)".into()))?;
        let plan = typed.into_optimized().and_then(|m| m.into_runnable()).map_err(load)?;
        Ok(Self { plan, path: path.into(), probability_output, state: zero_state(), context: [0.0; VAD_CONTEXT] })
    }

    /// The model file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Forgets the stream: zero state and context, as upstream's `reset_states`.
    pub fn reset(&mut self) {
        self.state = zero_state();
        self.context = [0.0; VAD_CONTEXT];
    }

    /// The speech probability of the next window of the stream: 512 samples scaled to [-1, 1]
    /// (`i16 / 32768`, as torchaudio reads 16-bit PCM).
    pub fn probability(&mut self, window: &[f32; VAD_WINDOW]) -> Result<f32, VadError> {
        let mut input = [0f32; VAD_CONTEXT + VAD_WINDOW];
        input[..VAD_CONTEXT].copy_from_slice(&self.context);
        input[VAD_CONTEXT..].copy_from_slice(window);
        let input = Tensor::from_shape(&[1, VAD_CONTEXT + VAD_WINDOW], &input).map_err(VadError::Run)?;
        let state = self.state.clone().into_tvalue();
        let mut outputs = self.plan.run(tvec![input.into_tvalue(), state]).map_err(VadError::Run)?;
        let next_state = outputs.remove(1 - self.probability_output);
        let probability = values::<f32>(&outputs[0]).map_err(VadError::Run)?.first().copied().unwrap_or(0.0);
        // The stream moves on only once the window has run.
        self.context.copy_from_slice(&window[VAD_WINDOW - VAD_CONTEXT..]);
        self.state = next_state.into_tensor();
        Ok(probability)
    }
}

fn zero_state() -> Tensor {
    tract_ndarray::Array3::<f32>::zeros((STATE_SHAPE[0], STATE_SHAPE[1], STATE_SHAPE[2])).into_tensor()
}

/// How probabilities become utterances; the defaults are upstream's `get_speech_timestamps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegmenterParams {
    /// A window at or above this is speech.
    pub threshold: f32,
    /// In an utterance, a window below `threshold - 0.15` (at least 0.01) is silence.
    pub neg_threshold: f32,
    /// Silence this long (samples) ends an utterance.
    pub min_silence: u64,
    /// Shorter utterances (before padding) are dropped.
    pub min_speech: u64,
    /// Added before and after each utterance.
    pub pad: u64,
    /// Longest utterance, padding included (samples): it is cut there.
    pub max_speech: u64,
}

impl SegmenterParams {
    pub fn from_config(config: &SpeechGateConfig) -> Self {
        let samples = |ms: u64| ms * u64::from(VAD_SAMPLE_RATE) / 1000;
        let threshold = config.threshold as f32;
        Self {
            threshold,
            neg_threshold: (threshold - 0.15).max(0.01),
            min_silence: samples(config.min_silence_ms),
            min_speech: samples(config.min_speech_ms),
            pad: samples(config.speech_pad_ms),
            max_speech: (config.max_speech_secs * f64::from(VAD_SAMPLE_RATE)).round() as u64,
        }
    }
}

impl Default for SegmenterParams {
    fn default() -> Self {
        Self::from_config(&SpeechGateConfig::default())
    }
}

/// One utterance in sample offsets from the start of the stream, padding included: `[start, end)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub start: u64,
    pub end: u64,
    /// Mean and largest probability of the windows from the speech start to the speech end.
    pub mean_probability: f32,
    pub peak_probability: f32,
    /// Cut at the longest utterance; the speech may go on in the next one.
    pub truncated: bool,
}

/// Upstream's `get_speech_timestamps` hysteresis, fed one window's probability at a time.
///
/// An utterance starts at the first window with `p >= threshold`. Once in one, the first window
/// with `p < neg_threshold` is a possible end; a window back at `p >= threshold` cancels it, and
/// when `min_silence` samples have passed since the possible end, the utterance ends there. It is
/// dropped when not longer than `min_speech`, and padded by `pad` on each side. Differences from
/// upstream, which sees the whole recording: the end padding is clamped to the audio seen so far
/// (it is only short of `pad` when `pad` is more than `min_silence` plus a window); the start
/// padding never reaches back into the previous utterance (upstream splits a gap shorter than two
/// pads in the middle); and an utterance that reaches `max_speech` is cut there (upstream's
/// `use_max_poss_sil_at_max_speech` would look back for its longest pause).
#[derive(Debug, Clone)]
pub struct Segmenter {
    params: SegmenterParams,
    /// Windows seen so far.
    windows: u64,
    /// The unpadded start of the utterance in progress.
    start: Option<u64>,
    /// Where the silence that may end it began (upstream's `temp_end`, 0 for none).
    temp_end: u64,
    /// Probabilities of the utterance's windows so far.
    probabilities: Vec<f32>,
    /// The padded end of the last utterance handed out: the next one starts no earlier.
    last_end: u64,
}

impl Segmenter {
    pub fn new(params: SegmenterParams) -> Self {
        Self { params, windows: 0, start: None, temp_end: 0, probabilities: Vec::new(), last_end: 0 }
    }

    pub fn params(&self) -> &SegmenterParams {
        &self.params
    }

    /// The earliest sample an utterance still to come may start at (the padded start of the one
    /// in progress, or `pad` before the next window): audio before it can be let go.
    pub fn keep_from(&self) -> u64 {
        let next = self.start.unwrap_or(self.windows * VAD_WINDOW as u64);
        next.saturating_sub(self.params.pad).max(self.last_end)
    }

    /// The next window's probability; an utterance when this window ends one.
    pub fn push(&mut self, probability: f32) -> Option<Segment> {
        let p = self.params;
        let cur = self.windows * VAD_WINDOW as u64;
        self.windows += 1;
        let speech = probability >= p.threshold;
        if speech && self.temp_end != 0 {
            self.temp_end = 0;
        }
        let Some(start) = self.start else {
            if speech {
                self.start = Some(cur);
                self.probabilities.clear();
                self.probabilities.push(probability);
            }
            return None;
        };
        // Upstream's `max_speech_samples`: the padded utterance stays within `max_speech`.
        let max_unpadded = p.max_speech.saturating_sub(VAD_WINDOW as u64 + 2 * p.pad);
        if cur - start > max_unpadded {
            let segment = self.close(start, cur, true);
            return Some(segment);
        }
        self.probabilities.push(probability);
        if probability < p.neg_threshold {
            if self.temp_end == 0 {
                self.temp_end = cur;
            }
            if cur - self.temp_end >= p.min_silence {
                let end = self.temp_end;
                let segment = self.close(start, end, false);
                return (end - start > p.min_speech).then_some(segment);
            }
        }
        None
    }

    /// The end of the stream after `total` samples: the utterance in progress, if long enough,
    /// ends there.
    pub fn finish(&mut self, total: u64) -> Option<Segment> {
        let start = self.start?;
        let end = total.max(start);
        let segment = self.close(start, end, false);
        self.windows = 0;
        self.last_end = 0;
        (end - start > self.params.min_speech).then_some(segment)
    }

    /// Ends the utterance in progress at `end` (unpadded) and pads it.
    fn close(&mut self, start: u64, end: u64, truncated: bool) -> Segment {
        let seen = self.windows * VAD_WINDOW as u64;
        let windows = (end.saturating_sub(start)).div_ceil(VAD_WINDOW as u64).max(1) as usize;
        let counted = &self.probabilities[..windows.min(self.probabilities.len())];
        let mean_probability = counted.iter().sum::<f32>() / counted.len().max(1) as f32;
        let peak_probability = counted.iter().copied().fold(0.0, f32::max);
        let segment = Segment {
            start: start.saturating_sub(self.params.pad).max(self.last_end),
            end: (end + self.params.pad).min(seen.max(end)),
            mean_probability,
            peak_probability,
            truncated,
        };
        self.start = None;
        self.temp_end = 0;
        self.probabilities.clear();
        self.last_end = segment.end;
        segment
    }
}

/// A finished utterance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpeechEvent {
    /// The chunk the utterance (with its padding) starts in.
    pub chunk_seq: u64,
    /// When its first sample was captured: the chunk's capture time plus the sample's offset.
    #[serde(skip)]
    pub at: SystemTime,
    pub duration_ms: u64,
    pub mean_probability: f32,
    pub peak_probability: f32,
    /// Cut at `max_speech_secs`: the speech may go on in the next event.
    pub truncated: bool,
    /// The utterance, padding included, 16 kHz mono, for the model to hear whole.
    #[serde(skip)]
    pub audio: Arc<[i16]>,
}

/// Where a chunk's first sample lies in the stream, so sample offsets become capture times.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    offset: u64,
    seq: u64,
    captured_at: SystemTime,
}

/// The speech gate: chunks of 16 kHz mono audio in, finished utterances out.
///
/// Chunks may be any length: samples past the last whole 512-sample window wait for the next
/// chunk. Audio is kept from the padded start of the utterance in progress (or `pad` before the
/// next window while there is none), so memory is bounded by `max_speech_secs`.
#[derive(Debug)]
pub struct SpeechGate {
    vad: SileroVad,
    segmenter: Segmenter,
    /// Samples `[held_from, held_from + held.len())` of the stream.
    held: VecDeque<i16>,
    held_from: u64,
    /// Samples seen so far; windows run up to the last multiple of 512 below it.
    total: u64,
    anchors: VecDeque<Anchor>,
}

impl SpeechGate {
    /// Loads the model named by the config (a relative path is resolved from `base_dir`, the
    /// config file's directory).
    pub fn new(config: &SpeechGateConfig, base_dir: &Path) -> Result<Self, VadError> {
        let vad = SileroVad::load(&base_dir.join(&config.model))?;
        Ok(Self::with_model(vad, config))
    }

    /// A gate over a model already loaded (its stream state is reset).
    pub fn with_model(mut vad: SileroVad, config: &SpeechGateConfig) -> Self {
        vad.reset();
        Self::with_params(vad, SegmenterParams::from_config(config))
    }

    pub fn with_params(mut vad: SileroVad, params: SegmenterParams) -> Self {
        vad.reset();
        Self {
            vad,
            segmenter: Segmenter::new(params),
            held: VecDeque::new(),
            held_from: 0,
            total: 0,
            anchors: VecDeque::new(),
        }
    }

    /// Takes the next chunk; returns the utterances it ended, in order (nearly always none or
    /// one; a single chunk of up to 300 ms can end two when the config allows very short
    /// utterances and silences).
    pub fn observe(&mut self, chunk: &AudioChunk) -> Result<Vec<SpeechEvent>, VadError> {
        if chunk.sample_rate != VAD_SAMPLE_RATE {
            return Err(VadError::SampleRate { seq: chunk.seq, rate: chunk.sample_rate });
        }
        if chunk.samples.is_empty() {
            return Ok(Vec::new());
        }
        self.anchors.push_back(Anchor { offset: self.total, seq: chunk.seq, captured_at: chunk.captured_at });
        self.held.extend(chunk.samples.iter().copied());
        self.total += chunk.samples.len() as u64;
        let mut events = Vec::new();
        let window = VAD_WINDOW as u64;
        while self.segmenter.windows * window + window <= self.total {
            let start = self.segmenter.windows * window;
            let samples = self.window_at(start);
            // A window the model cannot judge counts as silence: the stream must go on, and the
            // utterances already found in this chunk must not be lost.
            let probability = self.vad.probability(&samples).unwrap_or_else(|e| {
                tracing::warn!("speech gate: window at sample {start} taken as silence: {e}");
                0.0
            });
            if let Some(segment) = self.segmenter.push(probability) {
                events.push(self.event(&segment));
            }
            self.let_go();
        }
        Ok(events)
    }

    /// The end of the input: the last partial window is judged padded with zeros (as upstream
    /// does), an utterance in progress ends at the last sample, and the gate starts afresh.
    pub fn flush(&mut self) -> Result<Option<SpeechEvent>, VadError> {
        let window = VAD_WINDOW as u64;
        let mut event = None;
        let next = self.segmenter.windows * window;
        if next < self.total {
            let samples = self.window_at(next);
            let probability = self.vad.probability(&samples)?;
            if let Some(segment) = self.segmenter.push(probability) {
                event = Some(self.event(&segment));
            }
        }
        if event.is_none() {
            if let Some(segment) = self.segmenter.finish(self.total) {
                event = Some(self.event(&segment));
            }
        }
        self.vad.reset();
        self.segmenter = Segmenter::new(*self.segmenter.params());
        self.held.clear();
        self.held_from = 0;
        self.total = 0;
        self.anchors.clear();
        Ok(event)
    }

    /// The window of 512 samples from `start`, scaled to [-1, 1], zero past what was seen.
    fn window_at(&self, start: u64) -> [f32; VAD_WINDOW] {
        let mut out = [0f32; VAD_WINDOW];
        let from = (start - self.held_from) as usize;
        for (slot, sample) in out.iter_mut().zip(self.held.iter().skip(from)) {
            *slot = f32::from(*sample) / 32768.0;
        }
        out
    }

    fn event(&self, segment: &Segment) -> SpeechEvent {
        let from = segment.start.max(self.held_from);
        let to = segment.end.min(self.total).max(from);
        let audio: Arc<[i16]> =
            self.held.iter().skip((from - self.held_from) as usize).take((to - from) as usize).copied().collect();
        let anchor = self.anchors.iter().rev().find(|a| a.offset <= from).or(self.anchors.front()).copied();
        let (chunk_seq, at) = match anchor {
            Some(a) => (a.seq, a.captured_at + samples_to_duration(from.saturating_sub(a.offset))),
            None => (0, SystemTime::now()),
        };
        SpeechEvent {
            chunk_seq,
            at,
            duration_ms: (to - from) * 1000 / u64::from(VAD_SAMPLE_RATE),
            mean_probability: segment.mean_probability,
            peak_probability: segment.peak_probability,
            truncated: segment.truncated,
            audio,
        }
    }

    /// Drops the audio and chunk anchors no utterance can need any more.
    fn let_go(&mut self) {
        let keep_from = self.segmenter.keep_from().min(self.total);
        if keep_from > self.held_from {
            let drop = ((keep_from - self.held_from) as usize).min(self.held.len());
            self.held.drain(..drop);
            self.held_from += drop as u64;
        }
        while self.anchors.len() > 1 && self.anchors[1].offset <= self.held_from {
            self.anchors.pop_front();
        }
    }
}

fn samples_to_duration(samples: u64) -> Duration {
    Duration::from_nanos(samples * 1_000_000_000 / u64::from(VAD_SAMPLE_RATE))
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = VAD_WINDOW as u64;

    /// Runs a probability per window through the segmenter, then ends the stream.
    fn segments(params: SegmenterParams, probabilities: &[f32]) -> Vec<Segment> {
        let mut segmenter = Segmenter::new(params);
        let mut out: Vec<Segment> = probabilities.iter().filter_map(|p| segmenter.push(*p)).collect();
        out.extend(segmenter.finish(probabilities.len() as u64 * W));
        out
    }

    fn run(pattern: &[(f32, usize)]) -> Vec<f32> {
        pattern.iter().flat_map(|&(p, n)| std::iter::repeat_n(p, n)).collect()
    }

    #[test]
    fn the_gate_can_move_to_its_thread() {
        fn send<T: Send + 'static>() {}
        send::<SpeechGate>();
        send::<SpeechEvent>();
    }

    #[test]
    fn defaults_are_upstreams() {
        let p = SegmenterParams::default();
        assert_eq!((p.threshold, p.min_silence, p.min_speech, p.pad, p.max_speech), (0.5, 1600, 4000, 480, 480_000));
        assert!((p.neg_threshold - 0.35).abs() < 1e-6);
    }

    #[test]
    fn speech_is_found_and_padded() {
        // 10 windows of silence, 20 of speech, 10 of silence.
        let found = segments(SegmenterParams::default(), &run(&[(0.01, 10), (0.9, 20), (0.01, 10)]));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].start, 10 * W - 480);
        // Ends where the silence began, plus the pad.
        assert_eq!(found[0].end, 30 * W + 480);
        assert!((found[0].mean_probability - 0.9).abs() < 1e-6);
        assert_eq!(found[0].peak_probability, 0.9);
        assert!(!found[0].truncated);
    }

    #[test]
    fn a_short_dip_does_not_end_an_utterance_but_a_long_one_does() {
        // The end is decided at a window at least 100 ms (1600 samples) after the silence began:
        // the 5th silent window (4 * 512 = 2048). A dip of 4 windows is still one utterance.
        let one = segments(SegmenterParams::default(), &run(&[(0.9, 10), (0.1, 4), (0.9, 10), (0.0, 10)]));
        assert_eq!(one.len(), 1, "{one:?}");
        assert_eq!((one[0].start, one[0].end), (0, 24 * W + 480));
        let two = segments(SegmenterParams::default(), &run(&[(0.9, 10), (0.1, 5), (0.9, 10), (0.0, 10)]));
        assert_eq!(two.len(), 2, "{two:?}");
        assert_eq!(two[0].end, 10 * W + 480);
        assert_eq!(two[1].start, 15 * W - 480);
    }

    #[test]
    fn between_the_thresholds_is_neither() {
        // 0.4 neither starts speech nor counts as silence inside it.
        assert!(segments(SegmenterParams::default(), &run(&[(0.4, 50)])).is_empty());
        let found = segments(SegmenterParams::default(), &run(&[(0.9, 10), (0.4, 30), (0.0, 10)]));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].end, 40 * W + 480);
        // Silence that started, then 0.4, still ends it where the silence started.
        let found = segments(SegmenterParams::default(), &run(&[(0.9, 10), (0.1, 1), (0.4, 5), (0.0, 10)]));
        assert_eq!(found[0].end, 10 * W + 480);
    }

    #[test]
    fn short_utterances_are_dropped() {
        // 7 windows = 3584 samples < 4000 (250 ms): dropped; 8 = 4096: kept.
        assert!(segments(SegmenterParams::default(), &run(&[(0.0, 5), (0.9, 7), (0.0, 10)])).is_empty());
        assert_eq!(segments(SegmenterParams::default(), &run(&[(0.0, 5), (0.9, 8), (0.0, 10)])).len(), 1);
    }

    #[test]
    fn long_speech_is_cut_at_the_cap() {
        let params = SegmenterParams { max_speech: 16_000, ..SegmenterParams::default() };
        let found = segments(params, &run(&[(0.9, 100), (0.0, 10)]));
        // max_unpadded = 16000 - 512 - 960 = 14528: cut at the first window past it (29 * 512).
        assert!(found.len() >= 3, "{found:?}");
        assert!(found[0].truncated);
        assert_eq!((found[0].start, found[0].end), (0, 29 * W + 480));
        assert!(found.iter().all(|s| s.end - s.start <= 16_000), "{found:?}");
        // Consecutive pieces do not overlap.
        assert!(found.windows(2).all(|w| w[0].end <= w[1].start), "{found:?}");
        assert!(!found.last().unwrap().truncated);
    }

    #[test]
    fn speech_at_the_end_of_the_stream_ends_there() {
        let found = segments(SegmenterParams::default(), &run(&[(0.0, 10), (0.9, 20)]));
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].start, found[0].end), (10 * W - 480, 30 * W));
    }

    #[test]
    fn audio_before_the_padded_start_is_let_go() {
        let mut segmenter = Segmenter::new(SegmenterParams::default());
        for _ in 0..10 {
            segmenter.push(0.0);
        }
        assert_eq!(segmenter.keep_from(), 10 * W - 480);
        segmenter.push(0.9);
        for _ in 0..100 {
            segmenter.push(0.9);
        }
        assert_eq!(segmenter.keep_from(), 10 * W - 480, "the utterance in progress is kept whole");
    }
}
