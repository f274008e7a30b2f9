//! Rust preprocessing against transformers' processors on the same real inputs, as saved by
//! `deploy/models/make_tiny_gemma4.py`.

#[path = "common/npy.rs"]
mod npy;

use std::path::{Path, PathBuf};

use outpost::capture::read_wav;
use outpost::media::MediaRef;
use outpost::model::{AudioFeatureParams, LogMelExtractor};

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny/reference")
}

/// `media/speech.wav` as the processor got it: 16-bit samples over 32768, read the daemon's way.
fn speech() -> Vec<f32> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("media/speech.wav");
    let recording = read_wav(&MediaRef::Path(path)).unwrap();
    assert_eq!(recording.sample_rate, 16_000);
    recording.samples
}

fn compare(name: &str, got: &[f32], got_mask: &[bool], expected: &npy::Npy, expected_mask: &[bool]) {
    assert_eq!(got_mask, expected_mask, "{name}: frame mask");
    assert_eq!(got.len(), expected.values.len(), "{name}: shape {:?}", expected.shape);
    let diff = got.iter().zip(&expected.values).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
    println!("{name}: {} frames, max abs diff {diff:e}", got_mask.len());
    assert!(diff <= 1e-5, "{name}: log-mel differs by {diff}");
}

#[test]
fn log_mel_of_real_speech_matches_transformers() {
    let extractor = LogMelExtractor::new(AudioFeatureParams::gemma4());
    let speech = speech();
    let features = extractor.extract(&speech);
    let expected = npy::read(&reference_dir().join("proc_speech_log_mel.npy"));
    let expected_mask = npy::read(&reference_dir().join("proc_speech_log_mel_mask.npy")).bools();
    compare("whole clip", &features.values, &features.mask, &expected, &expected_mask);

    // The first second, which fed the tiny model's audio reference.
    let first_second = extractor.extract(&speech[..16_000]);
    let expected = npy::read(&reference_dir().join("audio_input_features.npy"));
    let expected_mask = npy::read(&reference_dir().join("audio_input_features_mask.npy")).bools();
    compare("first second", &first_second.values, &first_second.mask, &expected, &expected_mask);
}
