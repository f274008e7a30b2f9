//! The inputs PyTorch's encoders were given when `deploy/models/make_tiny_gemma4.py` saved the
//! tiny Gemma 4's reference outputs (`tests/fixtures/gemma4-tiny/reference`). Include `npy.rs`
//! beside it.
#![allow(dead_code)] // each test file uses its own part of this

use std::path::{Path, PathBuf};

use outpost::model::{AudioFeatures, ImagePatches};
use serde_json::Value;

use super::npy;

pub fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny/reference")
}

pub fn reference(name: &str) -> npy::Npy {
    npy::read(&reference_dir().join(name))
}

pub fn reference_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(reference_dir().join("reference.json")).unwrap()).unwrap()
}

/// The patches PyTorch's vision encoder was given, and their positions.
pub fn reference_image() -> ImagePatches {
    let pixels = reference("image_pixel_values_u8.npy");
    let positions = reference("image_pixel_position_ids.npy");
    ImagePatches {
        // Stored as bytes: f32(u8) * f32(1/255) gives exactly the values PyTorch saw.
        pixel_values: pixels.values.iter().map(|&v| v as f32 * (1.0f32 / 255.0)).collect(),
        positions: positions.i64(),
        max_patches: pixels.shape[1],
        patch_values: pixels.shape[2],
        soft_tokens: reference_json()["inputs"]["image"]["soft_tokens"].as_u64().unwrap() as usize,
        resized: (0, 0),
    }
}

/// The features PyTorch's audio encoder was given: the first second of `media/speech.wav`.
pub fn reference_audio_features() -> AudioFeatures {
    let features = reference("audio_input_features.npy");
    let mask = reference("audio_input_features_mask.npy").bools();
    AudioFeatures { frames: features.shape[1], mel_bins: features.shape[2], values: features.f32(), mask }
}
