//! Sample media built into the binary, and how a config's `path` names either them or a file.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

/// Prefix that names built-in sample media in a config's `path`.
pub const BUILTIN_PREFIX: &str = "builtin:";

/// People walking across a square: 6 s, 320x240, 10 fps (see `media/README.md`).
pub const PEOPLE_MJPEG: &str = "people.mjpeg";
/// A spoken call for help between two seconds of silence, 16 kHz mono.
pub const SPEECH_WAV: &str = "speech.wav";

const BUILTINS: &[(&str, &[u8])] =
    &[(PEOPLE_MJPEG, include_bytes!("../media/people.mjpeg")), (SPEECH_WAV, include_bytes!("../media/speech.wav"))];

/// Where a source's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaRef {
    Builtin { name: &'static str, bytes: &'static [u8] },
    Path(PathBuf),
}

impl MediaRef {
    /// Reads `spec` as written in a config: `builtin:<name>`, or a path taken relative to `base_dir`.
    pub fn parse(spec: &str, base_dir: &Path) -> Result<Self, String> {
        match spec.strip_prefix(BUILTIN_PREFIX) {
            Some(name) => BUILTINS
                .iter()
                .find(|(known, _)| *known == name)
                .map(|(name, bytes)| MediaRef::Builtin { name, bytes })
                .ok_or_else(|| {
                    let known: Vec<_> = BUILTINS.iter().map(|(n, _)| format!("{BUILTIN_PREFIX}{n}")).collect();
                    format!("no built-in media named `{name}` (there are: {})", known.join(", "))
                }),
            None => Ok(MediaRef::Path(base_dir.join(spec))),
        }
    }

    /// The whole content, borrowed for built-ins.
    pub fn read(&self) -> std::io::Result<Cow<'static, [u8]>> {
        match self {
            MediaRef::Builtin { bytes, .. } => Ok(Cow::Borrowed(bytes)),
            MediaRef::Path(path) => std::fs::read(path).map(Cow::Owned),
        }
    }
}

impl fmt::Display for MediaRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MediaRef::Builtin { name, .. } => write!(f, "{BUILTIN_PREFIX}{name}"),
            MediaRef::Path(path) => write!(f, "{}", path.display()),
        }
    }
}
