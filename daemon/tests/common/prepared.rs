//! What the test set-up prepares outside the repository (`deploy/models/prepare_test_models.sh`
//! and `fetch_silero_vad.sh`, run by `test.sh`): the model tools' Python, the real Gemma 3
//! bundles and the silero VAD model, named in environment variables.

use std::path::PathBuf;

/// The path in `variable`. Unset, the test is skipped with the reason, unless
/// OUTPOST_REQUIRE_REAL_MODEL is set (test.sh sets it): then it fails, so CI cannot skip silently.
pub fn prepared_path(variable: &str) -> Option<PathBuf> {
    match std::env::var_os(variable) {
        Some(path) => Some(PathBuf::from(path)),
        None if std::env::var_os("OUTPOST_REQUIRE_REAL_MODEL").is_some() => {
            panic!("{variable} is not set: run deploy/models/prepare_test_models.sh and fetch_silero_vad.sh (test.sh does)")
        }
        None => {
            eprintln!(
                "skipped: {variable} is not set (bash test.sh prepares the model tools and real models and sets it)"
            );
            None
        }
    }
}
