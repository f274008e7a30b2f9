//! Shared by the test programs: where the plugin is, and writing the ALSA config that loads it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The plugin as cargo built it. Test programs are in `$CARGO_TARGET_DIR/<profile>/deps/`; the
/// library is built into that same directory by `cargo test` (it is the package's library, or a
/// dev-dependency of another package) and copied one level up by `cargo build`. The copy in
/// `deps/` comes first: `cargo test` does not refresh the one above.
pub fn plugin() -> PathBuf {
    const NAME: &str = "liboutpost_alsa_emulator.so";
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let candidates = [deps.join(NAME), deps.parent().unwrap().join(NAME)];
    let found = candidates.iter().find(|path| path.is_file());
    found
        .unwrap_or_else(|| {
            panic!(
                "{NAME} is not in {} or its parent: build it with `cargo build -p outpost-alsa-emulator` \
                 (same CARGO_TARGET_DIR and profile)",
                deps.display()
            )
        })
        .clone()
}

/// Writes `test.conf` in `dir` (the plugin's type, then `pcms`) and points ALSA_CONFIG_PATH at it,
/// after the system configuration. alsa-lib reads its configuration at the first open: call this
/// once per process, before any PCM is opened.
pub fn install_config(dir: &Path, pcms: &str) {
    let config = format!("pcm_type.outpost_emu {{ lib \"{}\" }}\n{pcms}", plugin().display());
    std::fs::write(dir.join("test.conf"), config).unwrap();
    std::env::set_var("ALSA_CONFIG_PATH", format!("/usr/share/alsa/alsa.conf:{}", dir.join("test.conf").display()));
}

/// One `outpost_emu` PCM definition.
pub fn pcm(name: &str, infile: &Path, rate: u32, channels: u32, present: Option<&Path>) -> String {
    let present = present.map(|p| format!("  present \"{}\"\n", p.display())).unwrap_or_default();
    format!(
        "pcm.{name} {{\n  type outpost_emu\n  infile \"{}\"\n  rate {rate}\n  channels {channels}\n{present}  hint {{ show on description \"Outpost emulated microphone\" }}\n}}\n",
        infile.display()
    )
}

/// Writes 16-bit samples as raw S16_LE.
pub fn write_raw(path: &Path, samples: &[i16]) {
    std::fs::write(path, samples.iter().flat_map(|s| s.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}
