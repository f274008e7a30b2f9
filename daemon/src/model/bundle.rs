//! A model bundle: a directory with `manifest.json` and the files it lists, each with its size and
//! sha256. Opening a bundle checks every file before anything is loaded, so a half-copied or
//! corrupted model is refused with the name of the file at fault, not half-run.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `format` every manifest names.
pub const FORMAT: &str = "outpost-model-bundle";
/// The manifest layout this build reads.
pub const FORMAT_VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";
const PREPARE_HINT: &str = "prepare the bundle again with deploy/models/ or copy it again";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Gemma 4 (E2B and its tiny test twin): text, image and audio.
    Gemma4,
    /// Gemma 3, text only: the real small model that proves the runtime on real weights.
    Gemma3,
}

impl Architecture {
    /// File roles a bundle of this architecture cannot do without.
    fn required_files(self) -> &'static [&'static str] {
        match self {
            Architecture::Gemma4 | Architecture::Gemma3 => &["decoder", "tokenizer"],
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Architecture::Gemma4 => "gemma4",
            Architecture::Gemma3 => "gemma3",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    /// Relative to the bundle directory.
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// `manifest.json`. The sections the runtime reads in detail (`text`, `special_tokens`, `graphs`,
/// `vision`, `audio`) are kept as JSON here and typed where they are used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub name: String,
    pub architecture: String,
    /// Chat template applied only when true; a base model gets the raw prompt.
    pub instruction_tuned: bool,
    pub graph_format: String,
    pub dtype: String,
    pub quantization: String,
    /// Role (`decoder`, `embed`, `vision`, `audio`, `tokenizer`, ...) to file.
    pub files: BTreeMap<String, BundleFile>,
    #[serde(flatten)]
    pub sections: BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    /// Reads and checks the manifest in `dir` (not the files it lists: see [`Bundle::open`]).
    pub fn read(dir: &Path) -> Result<(Self, Architecture), BundleError> {
        let manifest_path = dir.join(MANIFEST);
        let text = match std::fs::read_to_string(&manifest_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BundleError::NoManifest { dir: dir.into() })
            }
            Err(source) => return Err(BundleError::Read { path: manifest_path, source }),
        };
        let bad = |problem: String| BundleError::BadManifest { path: manifest_path.clone(), problem };
        let manifest: Self = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if manifest.format != FORMAT {
            return Err(bad(format!("`format` is \"{}\", expected \"{FORMAT}\"", manifest.format)));
        }
        if manifest.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "`format_version` {} is not the {FORMAT_VERSION} this outpostd reads: use the outpostd that matches the bundle, or prepare it again",
                manifest.format_version
            )));
        }
        let architecture: Architecture =
            serde_json::from_value(serde_json::Value::String(manifest.architecture.clone())).map_err(|_| {
                BundleError::UnsupportedArchitecture {
                    path: manifest_path.clone(),
                    architecture: manifest.architecture.clone(),
                }
            })?;
        for role in architecture.required_files() {
            if !manifest.files.contains_key(*role) {
                return Err(BundleError::MissingRole { path: manifest_path, role: (*role).into(), architecture });
            }
        }
        for (role, file) in &manifest.files {
            if !is_inside(&file.path) {
                return Err(bad(format!(
                    "`files.{role}.path` \"{}\" must be a relative path inside the bundle",
                    file.path
                )));
            }
            if file.sha256.len() != 64 || !file.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("`files.{role}.sha256` is not 64 hex digits")));
            }
        }
        Ok((manifest, architecture))
    }
}

/// A bundle whose manifest was read and whose files all match it.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub architecture: Architecture,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{dir}: no {MANIFEST}: not a model bundle ({PREPARE_HINT})")]
    NoManifest { dir: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid manifest: {problem}")]
    BadManifest { path: PathBuf, problem: String },
    #[error("{path}: architecture `{architecture}` is not supported (this build runs gemma4 and gemma3)")]
    UnsupportedArchitecture { path: PathBuf, architecture: String },
    #[error("{path}: lists no `{role}` file, which a {architecture} bundle needs ({PREPARE_HINT})")]
    MissingRole { path: PathBuf, role: String, architecture: Architecture },
    #[error("{path}: `{role}` file is missing ({PREPARE_HINT})")]
    MissingFile { path: PathBuf, role: String },
    #[error("{path}: `{role}` file is truncated: {actual} of {expected} bytes ({PREPARE_HINT})")]
    Truncated { path: PathBuf, role: String, actual: u64, expected: u64 },
    #[error("{path}: `{role}` file is {actual} bytes, the manifest says {expected} ({PREPARE_HINT})")]
    WrongSize { path: PathBuf, role: String, actual: u64, expected: u64 },
    #[error("{path}: `{role}` file is corrupt: sha256 {actual}, the manifest says {expected} ({PREPARE_HINT})")]
    ChecksumMismatch { path: PathBuf, role: String, actual: String, expected: String },
}

impl Bundle {
    /// Reads the manifest in `dir` and checks every file it lists: present, of the stated size,
    /// with the stated sha256.
    pub fn open(dir: &Path) -> Result<Self, BundleError> {
        let (manifest, architecture) = Manifest::read(dir)?;
        for (role, file) in &manifest.files {
            verify_file(dir, role, file)?;
        }
        Ok(Self { dir: dir.into(), manifest, architecture })
    }

    /// Full path of the file that plays `role`, if the bundle has one.
    pub fn file(&self, role: &str) -> Option<PathBuf> {
        self.manifest.files.get(role).map(|f| self.dir.join(&f.path))
    }

    /// Total size of the bundle's files.
    pub fn total_bytes(&self) -> u64 {
        self.manifest.files.values().map(|f| f.bytes).sum()
    }
}

fn is_inside(path: &str) -> bool {
    let path = Path::new(path);
    !path.as_os_str().is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

fn verify_file(dir: &Path, role: &str, file: &BundleFile) -> Result<(), BundleError> {
    let path = dir.join(&file.path);
    let read_error = |source| BundleError::Read { path: path.clone(), source };
    let actual = match std::fs::metadata(&path) {
        Ok(metadata) => metadata.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BundleError::MissingFile { path, role: role.into() });
        }
        Err(e) => return Err(read_error(e)),
    };
    if actual != file.bytes {
        let (role, expected) = (role.to_owned(), file.bytes);
        return Err(if actual < expected {
            BundleError::Truncated { path, role, actual, expected }
        } else {
            BundleError::WrongSize { path, role, actual, expected }
        });
    }
    let actual = sha256_file(&path).map_err(read_error)?;
    if !actual.eq_ignore_ascii_case(&file.sha256) {
        return Err(BundleError::ChecksumMismatch { path, role: role.into(), actual, expected: file.sha256.clone() });
    }
    Ok(())
}

/// Hex sha256 of a file, read in pieces: the real model's files are gigabytes.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

impl fmt::Display for Bundle {
    /// What `outpostd model inspect` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.manifest;
        writeln!(f, "bundle        {}", self.dir.display())?;
        writeln!(f, "name          {}", m.name)?;
        writeln!(f, "architecture  {}", self.architecture)?;
        writeln!(
            f,
            "chat template {}",
            if m.instruction_tuned { "yes (instruction-tuned)" } else { "no (base model)" }
        )?;
        writeln!(f, "graphs        {}, {} weights, quantization: {}", m.graph_format, m.dtype, m.quantization)?;
        writeln!(f, "size          {}", human_bytes(self.total_bytes()))?;
        writeln!(f, "files         (all present, sizes and sha256 checked)")?;
        for (role, file) in &m.files {
            writeln!(
                f,
                "  {role:<10} {:<28} {:>10}  sha256 {}",
                file.path,
                human_bytes(file.bytes),
                &file.sha256[..16]
            )?;
        }
        if let Some(serde_json::Value::Object(text)) = m.sections.get("text") {
            writeln!(f, "text model")?;
            for (key, value) in text {
                writeln!(f, "  {key:<20} {value}")?;
            }
        }
        Ok(())
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_inside_the_bundle() {
        assert!(is_inside("decoder.onnx"));
        assert!(is_inside("graphs/decoder.onnx"));
        for outside in ["", "/etc/passwd", "../x.onnx", "a/../../x", "./x"] {
            assert!(!is_inside(outside), "{outside}");
        }
    }

    #[test]
    fn sha256_has_the_standard_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, "abc").unwrap();
        assert_eq!(sha256_file(&path).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn sizes_read_as_a_person_would() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(253_113_024), "241.4 MiB");
    }
}
