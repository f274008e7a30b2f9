//! The speech gate with the real silero VAD model (`silero_vad_op18_ifless.onnx` from the
//! silero-vad 6.2.3 wheel), fetched outside the repository by `deploy/models/fetch_silero_vad.sh`
//! (test.sh runs it and sets OUTPOST_SILERO_VAD; without it these tests are skipped, or fail under
//! OUTPOST_REQUIRE_REAL_MODEL=1).
//!
//! Upstream's numbers are in `tests/fixtures/silero-vad/speech_probs.json`, made by
//! `deploy/models/silero_vad_reference.py` (the wheel's own `OnnxWrapper` and
//! `get_speech_timestamps`, with onnxruntime) on `media/speech.wav`.

#[path = "common/prepared.rs"]
mod prepared;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use outpost::capture::{read_wav, AudioChunk};
use outpost::config::SpeechGateConfig;
use outpost::gate::{Segmenter, SegmenterParams, SileroVad, SpeechEvent, SpeechGate, VAD_SAMPLE_RATE, VAD_WINDOW};
use outpost::media::MediaRef;
use prepared::prepared_path;
use rand::{Rng, SeedableRng};

/// 100 ms at 16 kHz.
const TOLERANCE: u64 = 1600;
/// Where the test stream's first chunk was captured.
fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000)
}

fn speech_wav() -> Vec<i16> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("media/speech.wav");
    let recording = read_wav(&MediaRef::Path(path)).unwrap();
    assert_eq!(recording.sample_rate, VAD_SAMPLE_RATE);
    // read_wav gives s / 32768: exact in f32, so this is the file's samples again.
    recording.samples.iter().map(|s| (s * 32768.0).round() as i16).collect()
}

struct Fixture {
    probabilities: Vec<f32>,
    timestamps: Vec<(u64, u64)>,
    samples: u64,
}

fn fixture() -> Fixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/silero-vad/speech_probs.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let probabilities = json["probabilities"].as_array().unwrap().iter().map(|p| p.as_f64().unwrap() as f32).collect();
    let timestamps = json["speech_timestamps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["start"].as_u64().unwrap(), s["end"].as_u64().unwrap()))
        .collect();
    Fixture { probabilities, timestamps, samples: json["samples"].as_u64().unwrap() }
}

/// The first and last sample of the speech, found in the audio itself: the first and last
/// 10 ms block (160 samples, from sample 0) whose RMS level is above -50 dBFS; the speech runs
/// from the first such block's first sample to the last one's last sample. espeak-ng's output has
/// short silences of its own at both ends, so the edges are not the padding's.
fn speech_edges(samples: &[i16]) -> (u64, u64) {
    let threshold = 10f64.powf(-50.0 / 20.0);
    let loud: Vec<usize> = samples
        .chunks(160)
        .enumerate()
        .filter(|(_, block)| {
            let mean_square = block.iter().map(|&s| (f64::from(s) / 32768.0).powi(2)).sum::<f64>() / block.len() as f64;
            mean_square.sqrt() > threshold
        })
        .map(|(i, _)| i)
        .collect();
    let (first, last) = (*loud.first().unwrap(), *loud.last().unwrap());
    ((first * 160) as u64, ((last + 1) * 160).min(samples.len()) as u64)
}

/// Feeds `samples` to a gate in chunks of `chunk` samples, captured back to back from `t0()`,
/// then flushes it.
fn run_gate(gate: &mut SpeechGate, samples: &[i16], chunk: usize) -> Vec<SpeechEvent> {
    let mut events = Vec::new();
    for (seq, part) in samples.chunks(chunk).enumerate() {
        let offset = (seq * chunk) as u64;
        let captured_at = t0() + Duration::from_nanos(offset * 1_000_000_000 / u64::from(VAD_SAMPLE_RATE));
        let chunk = AudioChunk {
            seq: seq as u64,
            captured_at,
            sample_rate: VAD_SAMPLE_RATE,
            samples: heapless::Vec::from_slice(part).unwrap(),
        };
        events.extend(gate.observe(&chunk).unwrap());
    }
    events.extend(gate.flush().unwrap());
    events
}

/// `[start, end)` of an event in samples of the stream, from its capture time and its audio.
fn span(event: &SpeechEvent) -> (u64, u64) {
    let start = event.at.duration_since(t0()).unwrap().as_nanos() * u128::from(VAD_SAMPLE_RATE) / 1_000_000_000;
    let start = start as u64;
    (start, start + event.audio.len() as u64)
}

/// Every utterance lies within the speech, give or take 100 ms; the first starts and the last
/// ends within 100 ms of the speech's edges; each carries the stream's own samples.
fn check_edges(what: &str, events: &[SpeechEvent], samples: &[i16], (first, last): (u64, u64)) {
    let spans: Vec<(u64, u64)> = events.iter().map(span).collect();
    eprintln!("{what}: speech {first}..{last}, utterances {spans:?}");
    assert!(!spans.is_empty(), "{what}: no speech found");
    for (event, &(start, end)) in events.iter().zip(&spans) {
        assert!(start + TOLERANCE >= first && end <= last + TOLERANCE, "{what}: {start}..{end} lies in the padding");
        assert_eq!(&event.audio[..], &samples[start as usize..end as usize], "{what}: the audio of {start}..{end}");
        assert_eq!(event.duration_ms, (end - start) * 1000 / 16000);
        assert_eq!(event.chunk_seq, start / 1600);
        assert!(event.peak_probability >= 0.5 && event.mean_probability > 0.5, "{what}: {event:?}");
    }
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{what}: utterances overlap: {spans:?}");
    let (start, end) = (spans[0].0, spans.last().unwrap().1);
    assert!(start.abs_diff(first) <= TOLERANCE, "{what}: speech starts at {first}, the first utterance at {start}");
    assert!(end.abs_diff(last) <= TOLERANCE, "{what}: speech ends at {last}, the last utterance at {end}");
}

fn model() -> Option<SileroVad> {
    let path = prepared_path("OUTPOST_SILERO_VAD")?;
    Some(SileroVad::load(&path).unwrap_or_else(|e| panic!("{e}")))
}

#[test]
fn tract_gives_upstreams_probabilities() {
    let Some(mut vad) = model() else { return };
    let samples = speech_wav();
    let fixture = fixture();
    assert_eq!(fixture.samples, samples.len() as u64);
    let mut worst: (f32, usize) = (0.0, 0);
    let started = Instant::now();
    for (i, expected) in fixture.probabilities.iter().enumerate() {
        let mut window = [0f32; VAD_WINDOW];
        for (slot, s) in window.iter_mut().zip(samples.iter().skip(i * VAD_WINDOW)) {
            *slot = f32::from(*s) / 32768.0;
        }
        let got = vad.probability(&window).unwrap();
        let diff = (got - expected).abs();
        if diff > worst.0 {
            worst = (diff, i);
        }
        assert!(diff < 1e-3, "window {i}: tract {got}, upstream {expected}");
    }
    let per_window = started.elapsed() / fixture.probabilities.len() as u32;
    eprintln!(
        "{} windows, largest difference {:.2e} (window {}), {per_window:?} a window",
        fixture.probabilities.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn segmenter_on_upstreams_probabilities_gives_upstreams_timestamps() {
    let fixture = fixture();
    let mut segmenter = Segmenter::new(SegmenterParams::default());
    let mut found: Vec<(u64, u64)> =
        fixture.probabilities.iter().filter_map(|p| segmenter.push(*p)).map(|s| (s.start, s.end)).collect();
    found.extend(segmenter.finish(fixture.samples).map(|s| (s.start, s.end)));
    assert_eq!(found, fixture.timestamps);
}

#[test]
fn speech_between_silences_is_found_within_100_ms_of_its_edges() {
    let Some(vad) = model() else { return };
    let samples = speech_wav();
    let edges = speech_edges(&samples);
    let mut gate = SpeechGate::with_model(vad, &SpeechGateConfig::default());
    let events = run_gate(&mut gate, &samples, 1600);
    check_edges("speech.wav in 100 ms chunks", &events, &samples, edges);
    // Upstream cuts the same utterances from the whole file.
    let spans: Vec<(u64, u64)> = events.iter().map(span).collect();
    assert_eq!(spans, fixture().timestamps);
    // Chunks that are not a multiple of the window give the same utterances.
    let summary = |events: &[SpeechEvent]| -> Vec<_> {
        events.iter().map(|e| (e.at, e.duration_ms, e.mean_probability, e.peak_probability, e.audio.clone())).collect()
    };
    for chunk in [160, 1000, 4800] {
        let again = run_gate(&mut gate, &samples, chunk);
        assert_eq!(summary(&again), summary(&events), "chunks of {chunk} samples");
    }
}

#[test]
fn speech_in_white_noise_is_found_within_100_ms_of_its_edges() {
    let Some(vad) = model() else { return };
    let speech = speech_wav();
    let (first, last) = speech_edges(&speech);
    let core = &speech[first as usize..last as usize];
    // 2 s either side; white noise at -45 dBFS RMS over everything (uniform in +-a: RMS a/sqrt 3).
    let lead = 2 * VAD_SAMPLE_RATE as usize;
    let amplitude = 10f64.powf(-45.0 / 20.0) * 3f64.sqrt() * 32768.0;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(45);
    let mut samples = vec![0i16; lead];
    samples.extend_from_slice(core);
    samples.resize(samples.len() + lead, 0);
    for s in &mut samples {
        let noise = rng.random_range(-amplitude..amplitude);
        *s = (f64::from(*s) + noise).round().clamp(-32768.0, 32767.0) as i16;
    }
    let noise_dbfs = outpost::gate::level_dbfs(&samples[..lead]);
    assert!((noise_dbfs + 45.0).abs() < 0.5, "{noise_dbfs}");
    let edges = (lead as u64, (lead + core.len()) as u64);
    let mut gate = SpeechGate::with_model(vad, &SpeechGateConfig::default());
    let events = run_gate(&mut gate, &samples, 1600);
    check_edges("speech in -45 dBFS white noise", &events, &samples, edges);
}

#[test]
fn a_missing_or_broken_model_is_named() {
    let missing = PathBuf::from("/nonexistent/silero_vad_op18_ifless.onnx");
    let err = SileroVad::load(&missing).unwrap_err().to_string();
    assert!(err.starts_with("/nonexistent/silero_vad_op18_ifless.onnx: cannot read the silero VAD model: "), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("vad.onnx");
    std::fs::write(&broken, b"not an onnx model").unwrap();
    let err = SileroVad::load(&broken).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}: not a silero VAD model that tract can run", broken.display())), "{err}");

    let config = SpeechGateConfig { enabled: true, model: "models/vad.onnx".into(), ..SpeechGateConfig::default() };
    let err = SpeechGate::new(&config, dir.path()).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}/models/vad.onnx: cannot read", dir.path().display())), "{err}");
}

#[test]
fn other_sample_rates_are_refused() {
    let Some(vad) = model() else { return };
    let mut gate = SpeechGate::with_model(vad, &SpeechGateConfig::default());
    let chunk = AudioChunk {
        seq: 3,
        captured_at: t0(),
        sample_rate: 48_000,
        samples: heapless::Vec::from_slice(&[0; 480]).unwrap(),
    };
    assert_eq!(
        gate.observe(&chunk).unwrap_err().to_string(),
        "the speech gate needs 16000 Hz audio, chunk 3 is 48000 Hz"
    );
}
