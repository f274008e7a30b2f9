//! The model stage: a bundle of graphs, tokenizer and settings on disk, and (to come) the tract
//! runtime that runs it. See ARCHITECTURE.md, "Model bundle".

mod bundle;

pub use bundle::{sha256_file, Architecture, Bundle, BundleError, BundleFile, Manifest, FORMAT, FORMAT_VERSION};
