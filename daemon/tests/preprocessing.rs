//! Rust preprocessing against transformers' processors on the same real inputs, as saved by
//! `deploy/models/make_tiny_gemma4.py`.

#[path = "common/npy.rs"]
mod npy;

use std::path::{Path, PathBuf};

use outpost::capture::read_wav;
use outpost::media::MediaRef;
use outpost::model::{prepare_image, AudioFeatureParams, ImageParams, LogMelExtractor};

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

/// Two real pictures: skimage's astronaut (square, 512x512: shrunk) and the first frame of the
/// sample camera clip (320x240: enlarged at budget 280), both saved as PNG by the fixture script.
#[test]
fn picture_patches_match_transformers() {
    for picture_name in ["image", "frame"] {
        let path = reference_dir().join(format!("proc_{picture_name}_input.png"));
        let picture = image::open(&path).unwrap().to_rgb8();
        for budget in [70, 280] {
            let case = format!("{picture_name} {}x{} at budget {budget}", picture.width(), picture.height());
            let patches = prepare_image(&picture, &ImageParams::gemma4(budget)).unwrap();
            let stored =
                |what: &str| npy::read(&reference_dir().join(format!("proc_{picture_name}_{budget}_{what}.npy")));
            let expected = stored("pixel_values_u8");
            assert_eq!(expected.shape, vec![1, patches.max_patches, patches.patch_values], "{case}");
            assert_eq!(patches.positions, stored("position_ids").i64(), "{case}: positions");
            let mut worst = 0.0f64;
            let mut off_by = 0usize;
            for (got, &byte) in patches.pixel_values.iter().zip(&expected.values) {
                let want = byte as f32 * (1.0f32 / 255.0);
                let diff = f64::from((got - want).abs());
                if diff > 0.0 {
                    off_by += 1;
                }
                worst = worst.max(diff);
            }
            println!(
                "{case}: resized to {:?}, {} soft tokens, {off_by} values differ, max abs diff {worst:e}",
                patches.resized, patches.soft_tokens
            );
            assert!(worst <= 1e-5, "{case}: pixel values differ by {worst} ({off_by} values)");
        }
    }
}
